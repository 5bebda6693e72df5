"""Per-address limits in a real ``twist chat``: an attacker on 127.0.0.2, an honest
client on 127.0.0.1 (the machine itself, trusted), and behind ``haproxy:`` the
address a PROXY header names.
"""

from __future__ import annotations

import select
import signal
import socket
import subprocess
import time

from . import installed
from .helpers import f_online, s_error
from .test_e2e_server import DEADLINE, Client, free_port


def client_from(port: int, source: str) -> Client:
    """A Client whose socket is bound to ``source``, another address of loopback."""
    c = Client.__new__(Client)
    c.sock = socket.socket()
    c.sock.settimeout(DEADLINE)
    c.sock.bind((source, 0))
    c.sock.connect(("127.0.0.1", port))
    c.buf, c.eof = b"", False
    return c


def test_an_attacker_on_127_0_0_2_is_limited_while_the_machine_itself_is_not(server):
    srv = server("--registrations-per-hour", "3", "--max-address-connections", "2")
    attacker = client_from(srv.port, "127.0.0.2")
    attacker.send(b"01" * 5)
    frames = attacker.read(5)  # a refusal is written at once, a 02 after its commit
    assert sorted(f[:2] for f in frames) == [b"02"] * 3 + [b"12"] * 2
    assert [f for f in frames if f[:2] == b"12"] == [s_error(b"01", b"10")] * 2
    second = client_from(srv.port, "127.0.0.2")
    third = client_from(srv.port, "127.0.0.2")
    assert third.read(1) == [s_error(b"00", b"11")]
    third.read_closed()
    # The machine itself: as many registrations and connections as it likes.
    honest = [srv.client() for _ in range(4)]
    for c in honest:
        c.send(b"01" * 4)
        assert [f[:2] for f in c.read(4)] == [b"02"] * 4
    second.send(b"01")
    assert second.read(1) == [s_error(b"01", b"10")], "the address's budget is shared"


def test_behind_haproxy_the_limits_count_the_address_the_proxy_header_names(tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [installed.python(), "-m", "twisted", "chat", "--port", f"haproxy:tcp:{port}:interface=127.0.0.1"]
            + ["--db", str(tmp_path / "chat.sqlite3"), "--max-address-connections", "1"],
            cwd=installed.outside(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    clients: list[Client] = []
    try:
        deadline = time.monotonic() + DEADLINE
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                select.select([], [], [], 0.02)

        def proxied(source: str) -> Client:
            c = Client(port)
            clients.append(c)
            c.send(b"PROXY TCP4 %s 127.0.0.1 40000 7000\r\n" % source.encode())
            return c

        first = proxied("198.51.100.7")
        first.send(b"01")
        (made,) = first.read(1)
        assert made[:2] == b"02"
        # The load balancer's own address is the trusted 127.0.0.1: the
        # limit counts the client's, from the header.
        again = proxied("198.51.100.7")
        again.send(b"01")
        assert again.read(1) == [s_error(b"00", b"11")]
        again.read_closed()
        other = proxied("198.51.100.8")
        other.send(f_online(made[2:15]))
        assert other.read(1) == [b"04" + made[2:15]]
    finally:
        for c in clients:
            c.sock.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(DEADLINE)
