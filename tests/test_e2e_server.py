"""End to end: a real ``twist chat`` process on a free loopback port, raw sockets.

Nothing here sleeps for a fixed time: every wait polls for the bytes (or the
port, or the exit) it expects, up to a deadline.
"""

from __future__ import annotations

import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from chatproto.service import Options

from . import installed
from .helpers import (
    SERVER_FRAME_LEN,
    f_online,
    f_seen,
    f_send,
    s_delivered,
    s_error,
    s_message,
    s_seen_by,
    ts,
)

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m twisted chat`` from the repository root, as a user would start it."""

    def __init__(self, db: str, log: Path, *extra: str):
        self.db = db
        self.log = log
        self.extra = extra
        self.proc = None
        self.start()

    def start(self):
        self.port = free_port()
        self._log_file = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [installed.python(), "-m", "twisted", "chat"]
            + ["--port", f"tcp:{self.port}:interface=127.0.0.1", "--db", self.db, *self.extra],
            cwd=installed.outside(),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + DEADLINE
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the server exited with {self.proc.returncode}:\n{self.log.read_text()}"
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("the server never listened:\n" + self.log.read_text()) from None
                select.select([], [], [], 0.02)

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=DEADLINE)
        finally:
            self._log_file.close()
        return code

    def restart(self, sig) -> None:
        code = self.stop(sig)
        if sig == signal.SIGTERM:
            # Twisted re-raises the signal once it has shut down cleanly.
            assert code in (0, -signal.SIGTERM), "a SIGTERM is a clean stop:\n" + self.log.read_text()
        self.start()

    def client(self) -> Client:
        return Client(self.port)


class Client:
    """A raw socket that reads whole server frames."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.buf = b""
        self.eof = False

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def _frame_len(self) -> int | None:
        code = self.buf[:2]
        if len(code) < 2:
            return None
        assert code in SERVER_FRAME_LEN, f"the server sent an unknown code: {self.buf!r}"
        if code == b"11":
            if len(self.buf) < 27:
                return None
            return 27 + 13 * int(self.buf[25:27])
        return SERVER_FRAME_LEN[code]

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0 or self.eof:
            raise AssertionError(f"waited in vain; have {self.buf!r} (eof={self.eof})")
        ready, _, _ = select.select([self.sock], [], [], left)
        if ready:
            data = self.sock.recv(65536)
            if not data:
                self.eof = True
            self.buf += data

    def read(self, count: int, timeout: float = DEADLINE) -> list[bytes]:
        """Exactly ``count`` frames, waiting for them up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        frames = []
        while len(frames) < count:
            length = self._frame_len()
            if length is not None and len(self.buf) >= length:
                frames.append(self.buf[:length])
                self.buf = self.buf[length:]
            else:
                self._fill(deadline)
        return frames

    def read_closed(self, timeout: float = DEADLINE) -> None:
        """The server closes the connection, with nothing more unread."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            self._fill(deadline)
        assert self.buf == b""

    def register(self) -> bytes:
        self.send(b"01")
        (frame,) = self.read(1)
        assert frame[:2] == b"02"
        return frame[2:]

    def login(self, user: bytes) -> None:
        self.send(f_online(user))
        assert self.read(1) == [b"04" + user]

    def close(self):
        self.sock.close()


def test_two_users_register_talk_and_see_07_and_09(server):
    srv = server()
    setup = srv.client()
    a, b = setup.register(), setup.register()
    ca, cb = srv.client(), srv.client()
    ca.login(a)
    cb.login(b)
    ca.send(f_send(a, b, ts(1700000001), "hi bob 👋".encode()))
    assert cb.read(1) == [s_message(a, b, ts(1700000001), "hi bob 👋".encode())]
    assert ca.read(1) == [s_delivered(b, ts(1700000001))]
    cb.send(f_seen(a, ts(1700000001)))
    assert ca.read(1) == [s_seen_by(b, ts(1700000001))]
    cb.send(f_send(b, a, ts(1700000002), b"hi alice"))
    assert ca.read(1) == [s_message(b, a, ts(1700000002), b"hi alice")]
    assert cb.read(1) == [s_delivered(a, ts(1700000002))]
    ca.send(f_send(b, a, ts(1700000003), b"spoof"))
    assert ca.read(1) == [s_error(b"05", b"05")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "kill -9"])
def test_messages_for_an_offline_user_survive_a_restart(server, sig):
    """Queued while b is offline, then the server stops (cleanly or not): nothing is lost.

    a's later message to the online c is confirmed with 07 before the stop; the
    server handles one connection's frames in order, so the earlier ones to b
    are committed by then.
    """
    srv = server()
    setup = srv.client()
    a, b, c = setup.register(), setup.register(), setup.register()
    ca, cc = srv.client(), srv.client()
    ca.login(a)
    cc.login(c)
    queued = [f_send(a, b, ts(1700000010 + i), b"queued %d" % i) for i in range(5)]
    ca.send(*queued, f_send(a, c, ts(1700000020), b"sync"))
    assert cc.read(1) == [s_message(a, c, ts(1700000020), b"sync")]
    assert ca.read(1) == [s_delivered(c, ts(1700000020))]
    srv.restart(sig)
    cb = srv.client()
    cb.login(b)
    assert cb.read(5) == [s_message(a, b, ts(1700000010 + i), b"queued %d" % i) for i in range(5)]
    ca = srv.client()
    ca.login(a)
    assert ca.read(5) == [s_delivered(b, ts(1700000010 + i)) for i in range(5)]
    ca.send(queued[0])
    assert ca.read(1) == [s_delivered(b, ts(1700000010))], "a resend after the restart is recognised"


def test_a_second_login_closes_the_first_connection(server):
    srv = server()
    first = srv.client()
    a = first.register()
    first.login(a)
    second = srv.client()
    second.login(a)
    assert first.read(1) == [s_error(b"03", b"09")]
    first.read_closed()


def test_garbage_closes_only_its_own_connection(server):
    srv = server()
    good = srv.client()
    a = good.register()
    good.login(a)
    bad = srv.client()
    bad.send(b"\x16\x03\x01\x02\x00" + b"\xff" * 300)  # a TLS hello, say
    assert bad.read(1) == [s_error(b"\x16\x03", b"02")]
    bad.read_closed()
    good.send(f_send(a, a, ts(5), b"still fine"))
    assert good.read(2) == [s_message(a, a, ts(5), b"still fine"), s_delivered(a, ts(5))]


def test_memory_database_works_and_leaves_no_file(server, tmp_path):
    before = set(installed.outside().iterdir())
    srv = server(db=":memory:")
    conn = srv.client()
    a = conn.register()
    conn.login(a)
    conn.send(f_send(a, a, ts(1), b"note to self"))
    assert conn.read(2) == [s_message(a, a, ts(1), b"note to self"), s_delivered(a, ts(1))]
    assert srv.stop() in (0, -signal.SIGTERM)
    assert not [p for p in set(installed.outside().iterdir()) - before if "memory" in p.name]


def test_the_real_process_tests_run_the_installed_package_not_the_checkout():
    assert installed.running_installed()


def test_help_lists_every_option():
    """``twist chat --help`` documents every option the plugin accepts."""
    out = subprocess.run(
        [installed.python(), "-m", "twisted", "chat", "--help"],
        cwd=installed.outside(),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert out.returncode == 0, out.stderr
    names = [opt[0] for opt in Options.optParameters + Options.optFlags]
    assert {"port", "db", "require-secrets"} <= set(names)
    for name in names:
        assert f"--{name}" in out.stdout, f"--{name} is missing from --help"
    for opt in Options.optParameters + Options.optFlags:
        description = opt[3] if len(opt) > 3 else opt[2]
        assert description.split()[0] in out.stdout, f"--{opt[0]} has no description"


def test_an_unacknowledged_message_is_sent_again_after_kill_9(server):
    """A 15 session's 06 counts only once acknowledged: a crash before the 16 loses nothing."""
    srv = server()
    setup = srv.client()
    a = setup.register()
    setup.send(b"13")
    (made,) = setup.read(1)
    b, secret = made[2:15], made[15:]
    ca, cb = srv.client(), srv.client()
    ca.login(a)
    cb.send(b"15" + b + secret)
    assert cb.read(1) == [b"04" + b]
    ca.send(f_send(a, b, ts(1700000030), b"ack me"))
    assert cb.read(1) == [s_message(a, b, ts(1700000030), b"ack me")]
    srv.restart(signal.SIGKILL)
    cb = srv.client()
    cb.send(b"15" + b + secret)
    assert cb.read(2) == [b"04" + b, s_message(a, b, ts(1700000030), b"ack me")]
    ca = srv.client()
    ca.login(a)
    cb.send(b"16" + a + b + ts(1700000030))
    assert ca.read(1) == [s_delivered(b, ts(1700000030))]
