"""TCP keepalive: the real server's accepted connections have it (read from
the kernel's own table), and so do the client's, beneath TLS too."""

from __future__ import annotations

import socket
import sys
import time

import pytest
from twisted.internet.testing import StringTransport

from chatproto import keepalive
from chatproto.client import ChatClientProtocol

from .test_e2e_server import DEADLINE


class SocketTransport(StringTransport):
    """A fake transport over a real TCP socket, as Twisted's has ``getHandle``."""

    def __init__(self, sock):
        super().__init__()
        self.sock = sock

    def getHandle(self):
        return self.sock


class Wrapper(StringTransport):
    """What TLS puts between a protocol and the TCP transport."""

    def __init__(self, inner):
        super().__init__()
        self.transport = inner

    def getHandle(self):
        return object()  # an OpenSSL connection, not a socket


@pytest.fixture
def tcp_pair():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    yield client, server
    client.close()
    server.close()


def settings(sock) -> tuple[int, int, int, int]:
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    )


linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's socket options and /proc")


@linux
def test_enable_sets_the_documented_timers(tcp_pair):
    client, _ = tcp_pair
    assert settings(client)[0] == 0
    assert keepalive.enable(SocketTransport(client))
    assert settings(client) == (1, keepalive.IDLE, keepalive.INTERVAL, keepalive.COUNT)
    assert keepalive.DEAD_AFTER == 120


@linux
def test_enable_reaches_the_socket_beneath_tls(tcp_pair):
    client, _ = tcp_pair
    assert keepalive.enable(Wrapper(SocketTransport(client)))
    assert settings(client)[0] == 1


def test_no_socket_or_a_unix_socket_is_left_alone():
    assert not keepalive.enable(StringTransport())
    a, b = socket.socketpair()
    with a, b:
        assert not keepalive.enable(SocketTransport(a))


@linux
def test_the_clients_connection_has_keepalive(tcp_pair):
    client, _ = tcp_pair
    protocol = ChatClientProtocol(model=None, clock=None)
    protocol.makeConnection(SocketTransport(client))
    assert settings(client) == (1, keepalive.IDLE, keepalive.INTERVAL, keepalive.COUNT)


def keepalive_timer(local_port: int, remote_port: int) -> float | None:
    """Seconds left on the kernel's keepalive timer of that TCP socket, from /proc/net/tcp."""
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        local, remote, timer = fields[1], fields[2], fields[5]
        if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == remote_port:
            kind, when = timer.split(":")
            return int(when, 16) / 100 if int(kind, 16) == 2 else None  # 2: the keepalive timer
    raise AssertionError(f"no socket {local_port} -> {remote_port} in /proc/net/tcp")


@linux
def test_the_real_servers_connections_have_keepalive(server):
    srv = server()
    client = socket.create_connection(("127.0.0.1", srv.port), timeout=DEADLINE)
    try:
        client.sendall(b"01")
        assert client.recv(15)[:2] == b"02"  # the server has run connectionMade
        mine = client.getsockname()[1]
        deadline = time.monotonic() + DEADLINE
        while (left := keepalive_timer(srv.port, mine)) is None:
            assert time.monotonic() < deadline, "the server's socket has no keepalive timer"
            time.sleep(0.02)
        assert keepalive.IDLE - 5 <= left <= keepalive.IDLE, left
    finally:
        client.close()
