"""Limits and identity end to end: a real ``twist chat`` process on loopback, raw sockets.

The rate limit, the connection cap, the login timeout, a slow reader that
must not grow the server's memory, many clients crossing messages, and the
option that requires secrets. Nothing sleeps for a fixed time: every wait
polls for what it expects, up to a deadline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import select
import signal
import socket
import time
from pathlib import Path

from .helpers import f_online, f_online_secret, f_received, f_send, s_delivered, s_error, s_message, ts
from .test_e2e_server import DEADLINE, REPO, Client

_spec = importlib.util.spec_from_file_location("soak", REPO / "bench" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)


def pause(seconds: float) -> None:
    """The interval between two attempts of a poll."""
    select.select([], [], [], seconds)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def register_secret(client: Client) -> tuple[bytes, bytes]:
    client.send(b"13")
    (frame,) = client.read(1)
    assert frame[:2] == b"14", frame
    return frame[2:15], frame[15:47]


# -- the frame rate limit -------------------------------------------------------------


def test_a_flood_gets_12_code_10_and_other_connections_are_not_slowed(server):
    srv = server("--max-frame-rate", "5", "--frame-burst", "10")
    setup = srv.client()
    a, b = setup.register(), setup.register()
    ca, cb = srv.client(), srv.client()
    ca.login(a)
    cb.login(b)
    # 30 frames at once from a: its burst (10, less the 03) is accepted, the rest refused.
    # A 16 on a 03 session is accepted silently, so every answer here is a refusal.
    ca.send(*[f_received(b, a, ts(i)) for i in range(30)])
    # b, on its own budget, is not slowed: its 9 messages (burst less its 03) reach a.
    cb.send(*[f_send(b, a, ts(100 + i), b"from b %d" % i) for i in range(9)])
    assert cb.read(9) == [s_delivered(a, ts(100 + i)) for i in range(9)]
    # a is not cut off either: once its bucket refills, a message goes through.
    frames = []
    deadline = time.monotonic() + DEADLINE
    attempt = 0
    while True:
        attempt += 1
        mine = s_message(a, a, ts(1000 + attempt), b"slower now")
        ca.send(f_send(a, a, ts(1000 + attempt), b"slower now"))
        (frame,) = ca.read(1)
        while frame not in (mine, s_error(b"05", b"10")):
            frames.append(frame)
            (frame,) = ca.read(1)
        if frame == mine:
            break
        assert time.monotonic() < deadline, "a was never allowed to send again"
        pause(0.05)
    assert ca.read(1) == [s_delivered(a, ts(1000 + attempt))]
    refused = [f for f in frames if f == s_error(b"16", b"10")]
    got = [f for f in frames if f[:2] == b"06"]
    assert got == [s_message(b, a, ts(100 + i), b"from b %d" % i) for i in range(9)]
    assert len(refused) + len(got) == len(frames), frames
    # 9 tokens were left after the 03; at 5 a second, at most a few more came back meanwhile.
    assert 15 <= len(refused) <= 21, len(refused)


# -- the connection cap ---------------------------------------------------------------


def test_one_connection_past_the_cap_gets_12_00_11_and_a_close(server):
    srv = server("--max-connections", "3")
    # One after the other: by its 02, the server has seen the close of the probe
    # that the fixture opened to know it was listening.
    first = srv.client()
    a = first.register()
    second = srv.client()
    b = second.register()
    third = srv.client()
    third.register()
    fourth = srv.client()
    assert fourth.read(1) == [s_error(b"00", b"11")]
    fourth.read_closed()
    # The three keep working.
    second.login(b)
    second.send(f_send(b, b, ts(1), b"still here"))
    assert second.read(2) == [s_message(b, b, ts(1), b"still here"), s_delivered(b, ts(1))]
    # A place freed is a place taken: once the server saw the close, a newcomer is served.
    first.close()
    deadline = time.monotonic() + DEADLINE
    while True:
        newcomer = srv.client()
        newcomer.send(f_online(a))
        (frame,) = newcomer.read(1)
        if frame == b"04" + a:
            break
        assert frame == s_error(b"00", b"11"), frame
        newcomer.read_closed()
        assert time.monotonic() < deadline, "the freed place was never given to anyone"
        pause(0.02)


# -- the login timeout ----------------------------------------------------------------


def test_a_connection_that_never_logs_in_is_closed_and_a_logged_in_one_is_not(server):
    srv = server("--login-timeout", "0.5")
    logged = srv.client()
    a = logged.register()
    logged.login(a)
    registered_only = srv.client()
    registered_only.register()
    start = time.monotonic()
    idle = srv.client()
    idle.read_closed(timeout=5)
    assert time.monotonic() - start >= 0.45, "closed before its timeout"
    # Connected before idle, so their timers were due first: a 01 is not a login.
    registered_only.read_closed(timeout=5)
    logged.send(f_send(a, a, ts(1), b"still open"))
    assert logged.read(2) == [s_message(a, a, ts(1), b"still open"), s_delivered(a, ts(1))]


# -- a slow reader ----------------------------------------------------------------------


def chat_round(ca: Client, cb: Client, a: bytes, b: bytes, first: int, count: int) -> None:
    """a and b each send ``count`` messages to the other and read every 06 and 07."""
    ca.send(*[f_send(a, b, ts(first + i), b"a%d" % i) for i in range(count)])
    cb.send(*[f_send(b, a, ts(first + i), b"b%d" % i) for i in range(count)])
    for me, other, conn, tag in ((a, b, ca, b"b"), (b, a, cb, b"a")):
        frames = conn.read(2 * count)
        assert sorted(frames) == sorted(
            [s_message(other, me, ts(first + i), b"%s%d" % (tag, i)) for i in range(count)]
            + [s_delivered(other, ts(first + i)) for i in range(count)]
        )


def slow_reader(server, max_buffer: int, n: int = 40_000) -> int:
    """c logs in with 15 and stops reading while a sends it ``n`` messages and a and b
    chat at full speed; then c reads again and must get everything, and a every 07.

    Returns how much the server's RSS grew (KiB) from before the flood to its peak.
    """
    srv = server("--max-buffer", str(max_buffer), "--max-frame-rate", "0")
    setup = srv.client()
    a, b = setup.register(), setup.register()
    c, secret = register_secret(setup)
    ca, cb = srv.client(), srv.client()
    ca.login(a)
    cb.login(b)
    cc = Client.__new__(Client)
    cc.sock = socket.socket()
    cc.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    cc.sock.settimeout(DEADLINE)
    cc.sock.connect(("127.0.0.1", srv.port))
    cc.buf, cc.eof = b"", False
    cc.send(f_online_secret(c, secret))
    assert cc.read(1) == [b"04" + c]
    for r in range(10):  # warm up: allocator pools, SQLite's page cache
        chat_round(ca, cb, a, b, 10_000 + 200 * r, 200)
    baseline = rss_kib(srv.proc.pid)
    peak = baseline
    batch = 2000
    for r in range(n // batch):
        ca.send(*[f_send(a, c, ts(1_000_000 + r * batch + i), b"for c %d" % i) for i in range(batch)])
        chat_round(ca, cb, a, b, 100_000 + 200 * r, 200)
        peak = max(peak, rss_kib(srv.proc.pid))
    print(f"slow reader, --max-buffer {max_buffer}: {n} messages for c; RSS {baseline} -> {peak} KiB")
    # c reads again: everything comes, once each after de-duplication, and a gets every 07.
    want = {(ts(1_000_000 + r * batch + i), b"for c %d" % i) for r in range(n // batch) for i in range(batch)}
    got = set()
    deadline = time.monotonic() + 30
    while got != want:
        assert time.monotonic() < deadline, f"c got {len(got)} of {n}"
        cc._fill(deadline)
        frames = []
        while len(cc.buf) >= 256 or (cc.buf[:2] and cc.buf[:2] != b"06" and len(cc.buf) >= 6):
            assert cc.buf[:2] == b"06", cc.buf[:40]
            frames.append(cc.buf[:256])
            cc.buf = cc.buf[256:]
        for f in frames:
            assert f[2:28] == a + c, f[:40]
            got.add((f[28:38], f[38:].rstrip(b"\0")))
        if frames:
            cc.send(*[f_received(f[2:15], f[15:28], f[28:38]) for f in frames])
    confirmed = ca.read(n, timeout=30)
    assert sorted(confirmed) == sorted(s_delivered(c, when) for when, _ in want)
    return peak - baseline


def test_a_reader_that_stops_reading_does_not_grow_the_server_and_gets_everything_later(server):
    """40,000 06s (10,000 KiB) for c while it reads nothing: with a 256 KiB cap, past
    half of it they wait in the store and the server's RSS stays nearly flat."""
    growth = slow_reader(server, 256 * 1024)
    assert growth < 8 * 1024, f"RSS grew by {growth} KiB while c was not reading"


# -- many clients crossing messages ----------------------------------------------------------


def test_many_clients_crossing_messages_each_06_reaches_only_its_addressee(tmp_path):
    """Twenty clients (03 and 15) send direct and group messages at once, no faults.

    The soak's clients check every 06 as it arrives: its DST is the receiving
    user or a group it belongs to, and some client really sent it.
    """
    counts, failures = soak.soak(
        ["--clients", "20", "--groups", "8", "--duration", "3", "--kills", "0", "--rate", "40"]
        + ["--mean-connected", "1e9", "--fuzzers", "1", "--drain", "20", "--seed", "11"]
    )
    assert failures == []
    assert counts["misrouted"] == counts["forged"] == 0
    assert counts["sent"] > 1000
    assert counts["delivered"] == counts["expected deliveries"]
    assert counts["duplicates dropped"] == 0, "no fault, so no resend"


# -- identity -----------------------------------------------------------------------------------


def test_require_secrets_refuses_01_and_03_and_secrets_are_stored_hashed(server, tmp_path):
    db = str(tmp_path / "chat.sqlite3")
    srv = server(db=db)
    setup = srv.client()
    old = setup.register()  # made with 01 before secrets were required
    setup.close()
    assert srv.stop() in (0, -signal.SIGTERM)
    srv = server("--require-secrets", db=db)
    conn = srv.client()
    conn.send(b"01")
    assert conn.read(1) == [s_error(b"01", b"08")]
    conn.send(f_online(old))
    assert conn.read(1) == [s_error(b"03", b"08")]
    user, secret = register_secret(conn)
    conn.send(f_online(user))
    assert conn.read(1) == [s_error(b"03", b"08")]
    conn.send(f_online_secret(user, b"0" * 32))
    assert conn.read(1) == [s_error(b"15", b"08")]
    conn.send(f_online_secret(user, secret))
    assert conn.read(1) == [b"04" + user]
    conn.close()
    assert srv.stop() in (0, -signal.SIGTERM)
    stored = b"".join(p.read_bytes() for p in Path(tmp_path).glob("chat.sqlite3*"))
    assert secret not in stored
    assert hashlib.sha256(secret).hexdigest().encode() in stored
