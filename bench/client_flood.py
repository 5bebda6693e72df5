"""A flood into the terminal client's open conversation (issue 20): is the keyboard still answered?

    python bench/client_flood.py [--messages 2000] [--size 100x30] [--client-root DIR] [--output FILE]

A real server (``twist chat`` on a loopback port, a fresh SQLite file) and the
real client in tmux. A raw-socket sender registers, the client adds it as a
contact (so its conversation is the open one), and then the sender writes
``--messages`` 05s in one ``sendall``, as fast as a socket allows. A second raw
user ("a friend") writes one message right after the flood.

While the flood is being handled, F1 is pressed again and again: each time, how
long until the help is on screen (capture-pane polled), then Esc. Measured:

- F1 latency during the flood (each probe, and the worst);
- when the client had acknowledged every message (the sender's last 07:
  the client stores each 06 and answers 16, the server turns that into 07);
- when the friend's message was acknowledged;
- when the last flood message was on screen, after the sender finished writing.

``--client-root`` runs another checkout's client (its ``chatproto`` and
``clients`` directories) against this server, for a before/after figure.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chatproto import wire  # noqa: E402
from tests.test_tui_tmux import Server, Tmux, free_port, wait_for  # noqa: E402


class RawUser:
    """A user on a plain socket: registers, logs in, counts the 07s it is sent, on a thread."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.sock.sendall(wire.register_secret())
        frame = self._next()
        assert frame[:2] == wire.REGISTERED_SECRET, frame
        self.id, secret = frame[2:15], frame[15:47]
        self.sock.sendall(wire.online_secret(self.id, secret))
        assert self._next()[:2] == wire.ONLINE_OK
        self.delivered = 0
        self.last_delivered = 0.0
        self.errors: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)

    def _next(self) -> bytes:
        while True:
            frames, self.buffer, _ = wire.split_frames(wire.SERVER_FRAME_LEN, self.buffer)
            if frames:
                first, rest = frames[0], b"".join(frames[1:])
                self.buffer = rest + self.buffer
                return first
            chunk = self.sock.recv(65536)
            assert chunk, "the server closed the connection"
            self.buffer += chunk

    def start_counting(self) -> None:
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                return
            now = time.monotonic()
            frames, self.buffer, _ = wire.split_frames(wire.SERVER_FRAME_LEN, self.buffer + chunk)
            for f in frames:
                if f[:2] == wire.DELIVERED:
                    self.delivered += 1
                    self.last_delivered = now
                elif f[:2] == wire.ERROR:
                    self.errors.append(f)

    def close(self) -> None:
        self.sock.close()


def client_command(root: Path, port: int, data_dir: Path, profile: str) -> str:
    env = f"LANG=C.UTF-8 LC_ALL=C.UTF-8 PYTHONPATH={root}:{root / 'clients'}"
    return (
        f"env {env} {sys.executable} -m chatproto_tui --server 127.0.0.1:{port}"
        f" --data-dir {data_dir} --profile {profile} --no-bell"
    )


def flood(tmux: Tmux, port: int, data_dir: Path, messages: int, size=(100, 30), client_root: Path = ROOT):
    """One run; returns the figures (seconds) as a dict."""
    cols, rows = size
    command = client_command(client_root, port, data_dir, "victim")
    tmux.run("new-session", "-d", "-s", "v", "-x", str(cols), "-y", str(rows), command)
    victim = tmux.wait("v", r"you: (\d{13})").group(1).encode()
    tmux.wait("v", r"● connected")
    sender, friend = RawUser(port), RawUser(port)
    tmux.keys("v", "F2")
    tmux.wait("v", "Add a contact")
    tmux.type("v", sender.id.decode())
    tmux.wait("v", r"Id: *" + sender.id.decode())
    tmux.keys("v", "Enter")
    tmux.type("v", "Flood")
    tmux.wait("v", "Nickname: *Flood")
    tmux.keys("v", "Enter")
    tmux.wait("v", r"Flood  \(id ")

    ts0 = int(time.time()) - messages - 10
    filler = "lorem ipsum dolor " * 10
    frames = b"".join(
        wire.send(sender.id, victim, wire.timestamp(ts0 + i), f"flood {i + 1:05d} {filler}".encode()[:200])
        for i in range(messages)
    )
    last_text = f"flood {messages:05d}"
    sender.start_counting()
    friend.start_counting()
    start = time.monotonic()
    sender.sock.sendall(frames)
    friend.sock.sendall(wire.send(friend.id, victim, wire.timestamp(int(time.time())), b"friend says hi"))
    written = time.monotonic()

    probes = []
    while sender.delivered < messages and time.monotonic() - start < 120:
        pressed = time.monotonic()
        tmux.keys("v", "F1")
        wait_for("the help", lambda: "Show this help" in tmux.screen("v"), timeout=60, interval=0.005)
        probes.append(time.monotonic() - pressed)
        tmux.keys("v", "Escape")
        closed = lambda: "Show this help" not in tmux.screen("v")  # noqa: E731
        wait_for("the help to close", closed, timeout=60, interval=0.005)
    acked = sender.last_delivered or time.monotonic()
    try:
        wait_for("the last message", lambda: last_text in tmux.screen("v"), timeout=30, interval=0.005)
    except AssertionError:
        raise AssertionError(
            f"{last_text!r} never appeared ({sender.delivered} acknowledged, errors {sender.errors[:3]},"
            f" {len(probes)} probes):\n{tmux.screen('v')}"
        ) from None
    on_screen = time.monotonic()
    wait_for("the friend's 07", lambda: friend.delivered, timeout=60)
    result = {
        "messages": messages,
        "size": f"{cols}x{rows}",
        "write_s": written - start,
        "f1_probes": len(probes),
        "f1_worst_s": max(probes) if probes else None,
        "f1_median_s": sorted(probes)[len(probes) // 2] if probes else None,
        "all_acked_s": acked - start,
        "rate_per_s": messages / (acked - start),
        "friend_acked_s": friend.last_delivered - start,
        "last_on_screen_after_end_s": on_screen - max(written, acked),
        "last_on_screen_s": on_screen - start,
        "errors": len(sender.errors),
    }
    sender.close()
    friend.close()
    return result


def report(r: dict) -> str:
    ms = lambda s: "n/a" if s is None else f"{s * 1000:.0f} ms"  # noqa: E731
    return (
        f"{r['messages']} messages at {r['size']}: all acknowledged after {ms(r['all_acked_s'])}"
        f" ({r['rate_per_s']:.0f} msg/s); F1 answered in {ms(r['f1_median_s'])} median,"
        f" {ms(r['f1_worst_s'])} worst over {r['f1_probes']} presses during the flood;"
        f" the friend's message acknowledged after {ms(r['friend_acked_s'])};"
        f" last message on screen {ms(r['last_on_screen_s'])} after the flood began"
        f" ({ms(r['last_on_screen_after_end_s'])} after it was all handled)"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--size", default="100x30")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--client-root", type=Path, default=ROOT, help="checkout whose client runs")
    p.add_argument("--output", type=Path, default=None, help="append the figures to this file")
    args = p.parse_args()
    cols, rows = (int(x) for x in args.size.split("x"))
    lines = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            server = Server(free_port(), tmp / "server.sqlite3", tmp / "server.log")
            tmux = Tmux()
            try:
                server.start()
                r = flood(tmux, server.port, tmp, args.messages, (cols, rows), args.client_root)
            finally:
                tmux.kill()
                server.stop()
        line = report(r)
        print(line, flush=True)
        lines.append(line)
    if args.output is not None:
        git = ["git", "-C", str(args.client_root), "rev-parse", "--short", "HEAD"]
        commit = subprocess.run(git, capture_output=True, text=True).stdout.strip()
        with open(args.output, "a", encoding="utf-8") as f:
            f.write(f"\n## client at {args.client_root} ({commit or 'not a git checkout'})\n\n")
            for line in lines:
                f.write(f"- {line}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
