"""SIGTERM: the server stops within its bound, says how long it took, and
loses nothing it answered for.

Each test runs a real server (tests/test_e2e_server.py's fixture) and reads
every frame from raw sockets, before the stop and after a restart.
"""

from __future__ import annotations

import contextlib
import re
import select
import signal
import socket
import threading
import time

from twisted.logger import eventFromJSON, formatEvent

from .helpers import SERVER_FRAME_LEN, f_online_secret, f_send, s_delivered, s_message, ts
from .test_e2e_server import DEADLINE, Client, free_port
from .test_metrics import scrape, value

T0 = 1700001000


def log_lines(srv) -> list[str]:
    """The server's log as text (twist writes JSON lines when not on a terminal)."""
    lines = []
    for line in srv.log.read_text().splitlines():
        try:
            lines.append(formatEvent(eventFromJSON(line)))
        except ValueError:
            lines.append(line)
    return lines


def stopped_in_ms(srv) -> int:
    found = [m for line in log_lines(srv) if (m := re.search(r"chatproto stopped in (\d+) ms", line))]
    assert found, "no 'stopped in' line:\n" + "\n".join(log_lines(srv))
    return int(found[-1].group(1))


def pull(client: Client) -> list[bytes]:
    """The whole frames already read into the client's buffer."""
    frames = []
    buf, at = client.buf, 0
    while len(buf) - at >= 2:
        length = SERVER_FRAME_LEN[buf[at : at + 2]]  # no 11 in these tests
        if len(buf) - at < length:
            break
        frames.append(buf[at : at + length])
        at += length
    client.buf = buf[at:]
    return frames


def read_some(clients: list[Client], timeout: float) -> None:
    """Whatever arrives on any of ``clients`` within ``timeout``; EOF (or a reset) is noted."""
    open_ = [c for c in clients if not c.eof]
    if not open_:
        return
    ready, _, _ = select.select([c.sock for c in open_], [], [], timeout)
    for c in open_:
        if c.sock in ready:
            try:
                data = c.sock.recv(1 << 16)
            except ConnectionError:
                data = b""
            if not data:
                c.eof = True
            c.buf += data


def read_until(client: Client, last: bytes) -> list[bytes]:
    """Every frame up to and including ``last``."""
    deadline = time.monotonic() + DEADLINE
    frames = []
    while last not in frames:
        assert time.monotonic() < deadline and not client.eof, f"no {last!r} after {len(frames)} frames"
        read_some([client], deadline - time.monotonic())
        frames += pull(client)
    assert frames[-1] == last, "nothing after the marker"
    return frames[:-1]


def sent_at(frame: bytes) -> int:
    """The TIMESTAMP of a 06 or a 07."""
    return int(frame[28:38] if frame[:2] == b"06" else frame[15:25])


def test_sigterm_with_traffic_in_flight_loses_nothing(server):  # noqa: F811 - the fixture
    """a pipelines messages to b (online, 03) and b reads them; SIGTERM comes mid-way.

    Afterwards, and after a restart: b has a gapless, ordered run of a's
    messages with none twice (the ones the server had read), and a has exactly
    one 07 for each of them and for nothing else. A graceful stop writes the
    answers to everything it committed, so nothing is delivered twice either.
    """
    srv = server("--max-frame-rate", "0")
    setup = srv.client()
    a, b = setup.register(), setup.register()
    setup.close()
    ca, cb = srv.client(), srv.client()
    ca.login(a)
    cb.login(b)
    total = 20_000
    frames = [f_send(a, b, ts(T0 + i), b"in flight %d" % i) for i in range(total)]

    def pump():
        try:
            for at in range(0, total, 100):
                ca.sock.sendall(b"".join(frames[at : at + 100]))
        except OSError:
            pass  # the server closed the connection: the rest was never read

    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    got_b, got_a = [], []
    term_at = None
    closed = []
    deadline = time.monotonic() + 3 * DEADLINE
    while not (ca.eof and cb.eof):
        assert time.monotonic() < deadline, f"never closed: a eof={ca.eof}, b eof={cb.eof}"
        read_some([ca, cb], 0.5)
        got_a += pull(ca)
        got_b += pull(cb)
        if term_at is None and len(got_b) >= 1000:
            srv.proc.send_signal(signal.SIGTERM)
            term_at = time.monotonic()
        for c in (ca, cb):
            if c.eof and c not in closed:
                closed.append(c)
                with contextlib.suppress(OSError):  # a reset connection is gone already
                    c.sock.shutdown(socket.SHUT_RDWR)  # the half-closed server waits for our close
    sender.join(DEADLINE)
    code = srv.proc.wait(DEADLINE)
    took = time.monotonic() - term_at
    assert code in (0, -signal.SIGTERM), "\n".join(log_lines(srv))
    assert took < 10, f"the server took {took:.1f} s to stop"
    assert stopped_in_ms(srv) <= took * 1000
    assert {f[:2] for f in got_b} <= {b"06"} and {f[:2] for f in got_a} <= {b"07"}
    before_b = [sent_at(f) for f in got_b]
    before_a = [sent_at(f) for f in got_a]

    srv.restart(signal.SIGTERM)  # already stopped: this only starts it again
    cb = srv.client()
    cb.login(b)
    cb.send(f_send(b, b, ts(T0 - 1), b"sync"))
    after_b = read_until(cb, s_message(b, b, ts(T0 - 1), b"sync"))
    ca = srv.client()
    ca.login(a)
    ca.send(f_send(a, a, ts(T0 - 2), b"sync"))
    after_a = [f for f in read_until(ca, s_delivered(a, ts(T0 - 2))) if f[:2] == b"07"]
    assert all(f[:2] == b"06" for f in after_b)
    after_b = [sent_at(f) for f in after_b]
    after_a = [sent_at(f) for f in after_a if f[2:15] == b]

    recorded = before_b + after_b
    assert recorded == list(range(T0, T0 + len(recorded))), "a gap, a repeat or a reordering"
    assert 1000 <= len(recorded) < total, "the stop did not come with traffic in flight"
    assert not set(before_b) & set(after_b), "delivered before the stop and again after it"
    assert sorted(before_a + after_a) == recorded, "not exactly one 07 per delivered message"
    # And the stop wrote, before closing, the answer to everything it had
    # committed: nothing waited for the restart (the old stop left thousands).
    assert (after_b, after_a) == ([], [])


def test_a_client_that_does_not_read_is_dropped_at_the_deadline(server):  # noqa: F811
    """b logs in with 15 and never reads; the stop drops it after --shutdown-timeout.

    Nothing is lost by that: a 15 session's messages stay held until its 16,
    so after a restart b gets every message a sent, in order.
    """
    mport = free_port()
    srv = server(
        "--shutdown-timeout",
        "1",
        "--max-frame-rate",
        "0",
        "--metrics",
        f"tcp:{mport}:interface=127.0.0.1",
    )
    setup = srv.client()
    a = setup.register()
    setup.send(b"13")
    (registered,) = setup.read(1)
    b, secret = registered[2:15], registered[15:47]
    setup.close()
    cb = socket.socket()
    cb.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    cb.connect(("127.0.0.1", srv.port))
    cb.sendall(f_online_secret(b, secret))
    ca = srv.client()
    ca.login(a)
    total = 20_000
    for at in range(0, total, 1000):
        ca.send(*(f_send(a, b, ts(T0 + i), b"unread %d" % i) for i in range(at, min(total, at + 1000))))
    deadline = time.monotonic() + 3 * DEADLINE
    while True:  # every frame read by the server, and b's reader far behind
        samples = scrape(mport)
        if (
            value(samples, "chatproto_frames_received_total", code="05") == total
            and value(samples, "chatproto_store_queue_operations") == 0
            and value(samples, "chatproto_slow_reader_backlog_bytes") > 0
        ):
            break
        assert time.monotonic() < deadline, "b's reader never fell behind"
        time.sleep(0.05)

    term_at = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    ca.read_closed()
    ca.close()
    code = srv.proc.wait(DEADLINE)
    took = time.monotonic() - term_at
    assert code in (0, -signal.SIGTERM), "\n".join(log_lines(srv))
    assert 1 <= took < 5, f"stopped in {took:.1f} s with a 1 s bound"
    assert 1000 <= stopped_in_ms(srv) < 5000
    assert any("dropped 1 connections" in line for line in log_lines(srv)), "\n".join(log_lines(srv))
    cb.close()

    srv.restart(signal.SIGTERM)  # already stopped: this only starts it again
    cb = srv.client()
    cb.send(f_online_secret(b, secret))
    assert cb.read(1) == [b"04" + b]
    cb.send(f_send(b, b, ts(T0 - 1), b"sync"))
    held = read_until(cb, s_message(b, b, ts(T0 - 1), b"sync"))
    assert held == [s_message(a, b, ts(T0 + i), b"unread %d" % i) for i in range(total)]
