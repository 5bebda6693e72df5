"""Floods of issue 17 against a real server, with an honest pair chatting meanwhile.

    python bench/flood.py                      # every flood, 20 s each; writes bench/flood.md
    python bench/flood.py --floods groups,brute --duration 10

Loopback only. The server listens on 127.0.0.1 with its default options; the
attackers bind their sockets to 127.0.0.2 and up (limited by address), the
honest pair comes from 127.0.0.1 (the trusted machine itself). For each flood
a fresh server and database; during it, a sends b a message every 50 ms (20
msg/s) and each one's time to b's 06 is taken; then, the attack still going,
a new user registers (01) and logs in (03) from an untrusted address never
seen, and the server gets SIGTERM. Reported per flood: the server's peak RSS
(VmHWM), the growth of its database (with WAL) and of its log, the honest
pair's p50/p99 and losses, the new user's register+login time, and how long
SIGTERM took. The attackers run in a child process (threads, blocking
sockets), so they do not share a GIL with the honest pair's clock.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import SoakError, free_port, pad, split_frames  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 30.0
VICTIMS = 98


def connect(port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def exchange(sock: socket.socket, frame: bytes, want: bytes, buf: list) -> bytes:
    """Send ``frame``; the first frame coded ``want`` (a 12 first is an error)."""
    sock.sendall(frame)
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        frames, buf[0] = split_frames(buf[0])
        for f in frames:
            if f[:2] == want:
                return f
            raise SoakError(f"{frame[:2]!r} answered {f!r}")
        data = sock.recv(65536)
        if not data:
            raise SoakError(f"closed after {frame[:2]!r}")
        buf[0] += data
    raise SoakError(f"no {want!r} for {frame[:2]!r}")


def register(port: int, source: str = "127.0.0.1", secret: bool = False):
    sock = connect(port, source)
    try:
        frame = exchange(sock, b"13" if secret else b"01", b"14" if secret else b"02", [b""])
    finally:
        sock.close()
    return (frame[2:15], frame[15:47]) if secret else frame[2:15]


# -- the attacks (run in the child process) -------------------------------------------------


def _drain(sock: socket.socket) -> bool:
    """Read what is there without waiting; False once the server closed."""
    while True:
        ready, _, _ = select.select([sock], [], [], 0)
        if not ready:
            return True
        try:
            if not sock.recv(1 << 20):
                return False
        except OSError:
            return False


def _worker(port, source, until, login, chunk, reconnect, counts, lock):
    """One attacking connection: log in if asked, then send ``chunk()`` again and
    again (reading what comes back), reconnecting when closed or when asked to."""
    while time.monotonic() < until:
        try:
            sock = connect(port, source, timeout=2.0)
        except OSError:
            with lock:
                counts["connect failed"] += 1
            time.sleep(0.05)
            continue
        with lock:
            counts["connections"] += 1
        try:
            if login:
                sock.sendall(login)
            while time.monotonic() < until:
                sock.sendall(chunk())
                with lock:
                    counts["chunks"] += 1
                if not _drain(sock) or reconnect:
                    break
        except OSError:
            pass
        finally:
            sock.close()


def attack(args) -> None:
    """The child: ``args.attack`` until ``args.until`` (a monotonic time)."""
    spec = json.loads(args.spec)
    port, until = args.port, args.until
    counts = {"connections": 0, "chunks": 0, "connect failed": 0}
    lock = threading.Lock()
    threads = []
    for source, login, kind in spec["workers"]:
        login = bytes.fromhex(login) if login else b""
        tick = iter(range(1, 1 << 40))
        if kind == "register":
            chunk, reconnect = (lambda: b"01" * 10_000), True
        elif kind == "register-steady":
            chunk, reconnect = (lambda: b"01" * 100), False
        elif kind == "groups":
            me, victims = login[2:15], b"".join(bytes.fromhex(v) for v in spec["victims"])

            def chunk(me=me, victims=victims, tick=tick):
                return b"".join(b"10" + me + b"%010d" % next(tick) + b"98" + victims for _ in range(10))

            reconnect = False
        elif kind == "seen":
            victim = bytes.fromhex(spec["victims"][0])

            def chunk(victim=victim, tick=tick):
                return b"".join(b"08" + victim + b"%010d" % next(tick) for _ in range(1000))

            reconnect = False
        elif kind == "brute":
            user = bytes.fromhex(spec["victims"][0])

            def chunk(user=user, tick=tick):
                return b"".join(b"15" + user + b"%032x" % next(tick) for _ in range(100))

            reconnect = False
        elif kind == "slots":
            threads.append(threading.Thread(target=_hold_slots, args=(port, source, until, counts, lock)))
            continue
        else:
            raise SystemExit(f"unknown attack {kind}")
        work = (port, source, until, login, chunk, reconnect, counts, lock)
        threads.append(threading.Thread(target=_worker, args=work))
    for t in threads:
        t.daemon = True
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(counts))


def _hold_slots(port, source, until, counts, lock):
    """Open as many connections as the server lets this address hold, and keep them."""
    held = []
    while time.monotonic() < until and len(held) < 2000:
        try:
            sock = connect(port, source, timeout=2.0)
        except OSError:
            with lock:
                counts["connect failed"] += 1
            time.sleep(0.01)
            continue
        held.append(sock)
        with lock:
            counts["connections"] += 1
    while time.monotonic() < until:
        time.sleep(0.1)
    for sock in held:
        sock.close()


# -- one flood --------------------------------------------------------------------------------


class Server:
    def __init__(self, workdir: Path, extra=()):
        self.port = free_port()
        self.db = workdir / "chat.sqlite3"
        self.log = workdir / "server.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "twisted", "--log-file", str(self.log), "chat"]
            + ["--port", f"tcp:{self.port}:interface=127.0.0.1", "--db", str(self.db), *extra],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + DEADLINE
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SoakError(f"the server did not start; see {self.log}") from None
                time.sleep(0.05)

    def status(self, field: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise SoakError(f"no {field}")

    def disk(self) -> int:
        return sum(p.stat().st_size for p in self.db.parent.glob(self.db.name + "*"))

    def counts(self, db=None) -> dict:
        """Accounts, groups and held items in the database (a stopped server's, or a copy)."""
        import sqlite3

        conn = sqlite3.connect(db or self.db)
        try:
            return {
                table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("users", "groups", "inbox")
            }
        finally:
            conn.close()

    def disk_folded(self) -> int:
        """The database's size as if its WAL were folded in: a copy, checkpointed."""
        import shutil
        import sqlite3

        copy = self.db.parent / "before"
        copy.mkdir()
        for p in self.db.parent.glob(self.db.name + "*"):
            shutil.copy(p, copy / p.name)
        conn = sqlite3.connect(copy / self.db.name)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        self.before = self.counts(copy / self.db.name)
        size = sum(p.stat().st_size for p in copy.iterdir())
        shutil.rmtree(copy)
        return size


def honest_pair(port: int, a: bytes, b: bytes, seconds: float, rate: float = 20.0):
    """a sends b ``rate`` messages a second for ``seconds``; each 06's latency (s), and the losses."""
    ca, cb = connect(port), connect(port)
    bufs = {ca: [b""], cb: [b""]}
    assert exchange(ca, b"03" + a, b"04", bufs[ca]) == b"04" + a
    assert exchange(cb, b"03" + b, b"04", bufs[cb]) == b"04" + b
    ca.setblocking(False)
    cb.setblocking(False)
    sent_at: dict[bytes, float] = {}
    latencies = []
    confirmed = 0
    start = time.monotonic()
    n = 0
    end = start + seconds
    while True:
        now = time.monotonic()
        if now < end and now >= start + n / rate:
            n += 1
            when = b"%010d" % n
            sent_at[when] = now
            ca.sendall(b"05" + a + b + when + pad(b"honest %d" % n))
        elif now >= end and (len(latencies) == n and confirmed == n or now > end + 10):
            break
        ready, _, _ = select.select([ca, cb], [], [], 0.005)
        for sock in ready:
            data = sock.recv(1 << 20)
            if not data:
                raise SoakError("the honest pair was closed")
            frames, bufs[sock][0] = split_frames(bufs[sock][0] + data)
            got = time.monotonic()
            for f in frames:
                if f[:2] == b"06" and sock is cb:
                    latencies.append(got - sent_at[f[28:38]])
                elif f[:2] == b"07" and sock is ca:
                    confirmed += 1
                elif f[:2] == b"12":
                    raise SoakError(f"the honest pair got {f!r}")
    ca.close()
    cb.close()
    return sorted(latencies), n - len(latencies), n - confirmed


def newcomer(port: int) -> float:
    """Seconds for a never-seen untrusted address to register and log in."""
    started = time.monotonic()
    user = register(port, "127.0.9.9")
    sock = connect(port, "127.0.9.9")
    try:
        assert exchange(sock, b"03" + user, b"04", [b""]) == b"04" + user
    finally:
        sock.close()
    return time.monotonic() - started


FLOODS = {
    # name: (what the issue saw, workers builder)
    "register-burst": "100 connections each sending 01 ten thousand times and closing, again and again",
    "register-sustained": "8 connections from 8 addresses sending 01s as fast as they are read",
    "groups": "a logged-in user creating 99-member groups of offline users, 10 per write",
    "held-09": "8 logged-in connections sending 08s that name one offline victim",
    "slots": "50 addresses each opening as many connections as they are let (2,000 each at most)",
    "brute": "8 connections sending 15s with wrong secrets for one user",
}


def workers(name: str, port: int) -> dict:
    """Set-up from the trusted address (accounts the attack uses), then the attack's workers."""
    victims = [register(port) for _ in range(VICTIMS)]
    spec = {"victims": [v.hex() for v in victims], "workers": []}
    if name == "register-burst":
        spec["workers"] = [("127.0.0.2", "", "register")] * 100
    elif name == "register-sustained":
        spec["workers"] = [(f"127.0.0.{2 + i}", "", "register-steady") for i in range(8)]
    elif name == "groups":
        me = register(port)
        spec["workers"] = [("127.0.0.2", (b"03" + me).hex(), "groups")]
    elif name == "held-09":
        spec["workers"] = [("127.0.0.2", (b"03" + register(port)).hex(), "seen") for _ in range(8)]
    elif name == "slots":
        spec["workers"] = [(f"127.0.{1 + i // 200}.{2 + i % 200}", "", "slots") for i in range(50)]
    elif name == "brute":
        user, _ = register(port, secret=True)
        spec["victims"] = [user.hex()]
        spec["workers"] = [("127.0.0.2", "", "brute")] * 8
    return spec


def flood(name: str, seconds: float, workdir: Path) -> dict:
    server = Server(workdir)
    try:
        a, b = register(server.port), register(server.port)
        spec = workers(name, server.port)
        time.sleep(0.5)
        disk0, log0, rss0 = server.disk_folded(), server.log.stat().st_size, server.status("VmRSS")
        until = time.monotonic() + seconds + 60  # it goes on through the newcomer and the stop
        child = subprocess.Popen(
            [sys.executable, __file__, "--attack", name, "--port", str(server.port)]
            + ["--until", str(until), "--spec", json.dumps(spec)],
            stdout=subprocess.PIPE,
        )
        time.sleep(1.0)  # the attack under way
        latencies, lost, unconfirmed = honest_pair(server.port, a, b, seconds)
        try:
            joined = newcomer(server.port)
        except (SoakError, OSError) as e:
            joined = f"failed: {e}"
        log1 = server.log.stat().st_size
        rss_peak = server.status("VmHWM")
        stopping = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
            stopped = time.monotonic() - stopping
        except subprocess.TimeoutExpired:
            stopped = None
        disk1 = server.disk()  # once stopped: the WAL folded into the database and emptied
        after = server.counts()
        got = {k: after[k] - server.before[k] for k in after}
        got["users"] -= isinstance(joined, float)  # the newcomer's account is not the attack's
        text = server.log.read_text(errors="replace")
        failed = re.findall(r"([\d,]+) failed logins", text)  # the per-address summaries
        got["failed logins"] = sum(int(n.replace(",", "")) for n in failed)
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=30)
        n = len(latencies)
        return {
            "flood": name,
            "what": FLOODS[name],
            "rss_start_mb": rss0 / 1024,
            "rss_peak_mb": rss_peak / 1024,
            "db_growth_mb": (disk1 - disk0) / 1e6,
            "log_growth_kb": (log1 - log0) / 1e3,
            "p50_ms": latencies[n // 2] * 1000 if n else None,
            "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000 if n else None,
            "sent": n + lost,
            "lost": lost,
            "unconfirmed": unconfirmed,
            "newcomer_s": joined,
            "sigterm_s": stopped,
            "got": got,
        }
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def table(results: list[dict], seconds: float) -> str:
    lines = [
        f"Each flood {seconds:g} s against a fresh `twist chat` with its default options (attackers on "
        "127.0.0.2 and up, the honest pair on 127.0.0.1 at 20 msg/s); `python bench/flood.py`.",
        "",
        "| flood | what the attack got | peak RSS | DB growth | log growth | honest p50 / p99 | lost "
        "| new user 01+03 | SIGTERM |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        joined = r["newcomer_s"]
        joined = f"{joined * 1000:.0f} ms" if isinstance(joined, float) else joined
        stop = "did not stop in 30 s" if r["sigterm_s"] is None else f"{r['sigterm_s']:.2f} s"
        got = r["got"]
        gains = (
            f"+{got['users']:,} accounts, +{got['groups']:,} groups, +{got['inbox']:,} held items, "
            f"{got['failed logins']:,} failed logins"
        )
        lines.append(
            f"| {r['flood']}: {r['what']} | {gains} | {r['rss_peak_mb']:.0f} MB | {r['db_growth_mb']:.2f} MB "
            f"| {r['log_growth_kb']:.1f} kB | {r['p50_ms']:.1f} / {r['p99_ms']:.1f} ms "
            f"| {r['lost']} of {r['sent']} ({r['unconfirmed']} without 07) | {joined} | {stop} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--floods", default=",".join(FLOODS))
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--output", default=str(REPO / "bench" / "flood.md"))
    parser.add_argument("--attack")
    parser.add_argument("--port", type=int)
    parser.add_argument("--until", type=float)
    parser.add_argument("--spec")
    args = parser.parse_args()
    if args.attack:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        attack(args)
        return
    results = []
    for name in args.floods.split(","):
        with tempfile.TemporaryDirectory(prefix=f"flood-{name}-") as workdir:
            r = flood(name, args.duration, Path(workdir))
        print(json.dumps(r), flush=True)
        results.append(r)
    text = table(results, args.duration)
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
