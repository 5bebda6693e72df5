"""How the SQLite database grows under steady traffic (issue 19): before and after.

For each ``--run LABEL|REF|SERVER ARGS`` (REF a git ref, exported as run.py
does, or ``worktree``), a fresh ``twist chat`` on a fresh file, and two phases,
each on a fresh database:

- **online**: ten senders and ten readers, all logged in; steady batches of
  1,000 messages (100 per pair) at ``--rate`` messages a second, each batch
  read and confirmed (every 07 in) before the next; the database's size
  after every 100,000.
- **offline, then draining**: the ten readers are offline; the same batches
  are held for them (each batch ends with a live message to an online pacer,
  whose 07 says the batch is committed); then each reader logs in and reads
  its 100,000, and its sender reads the 07s; the size after every 100,000.

The size is the file plus its WAL, and, from ``PRAGMA freelist_count``, how
much of the file is free pages (SQLite reuses them before it grows the file).

    python bench/db_growth.py --run 'main|main|' --run 'retention|retention|' \\
        --run 'retention, 1 min window|retention|--dedup-window 1m' --output bench/db_growth.md
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import login, read_exactly, register  # noqa: E402
from systems import Server, export_tree, free_port  # noqa: E402

PAIRS = 10
BATCH = 1000
BASE_TS = 1_700_000_000
TEXT = 218  # the bench's usual text: a 256-byte frame


def frame_05(src: bytes, dst: bytes, ts: int, i: int) -> bytes:
    head = b"m%010d " % i
    return b"05" + src + dst + b"%010d" % ts + (head + b"x" * (TEXT - len(head)))


def size(db: str) -> dict:
    """The file, its WAL, and the free pages inside the file (bytes)."""
    file = os.path.getsize(db)
    wal = os.path.getsize(db + "-wal") if os.path.exists(db + "-wal") else 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        (page,) = conn.execute("PRAGMA page_size").fetchone()
        (free,) = conn.execute("PRAGMA freelist_count").fetchone()
    finally:
        conn.close()
    return {"file": file, "wal": wal, "free": free * page}


class Run:
    def __init__(self, label, source: Path, server_args: list[str], workdir: Path, messages, step, rate):
        self.label = label
        self.rate = rate
        self.source = source
        self.server_args = server_args
        self.workdir = workdir
        self.messages = messages
        self.step = step

    def pace(self, started: float, sent: int) -> None:
        """Hold the rate: wait until ``sent`` messages are due."""
        ahead = started + sent / self.rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)

    def start(self, name: str):
        db = str(self.workdir / f"{name}.sqlite3")
        port = free_port()
        argv = [sys.executable, "-m", "twisted", "chat", "--port", f"tcp:{port}:interface=127.0.0.1"]
        argv += ["--db", db, "--max-frame-rate", "0", *self.server_args]
        server = Server(argv, port, self.workdir, 0, cwd=self.source, log_name=f"{name}.log")
        server.wait_ready()
        return server, db, port

    def online(self) -> list[tuple]:
        server, db, port = self.start("online")
        rows = []
        try:
            users = register(port, 2 * PAIRS)
            senders = [login(port, u) for u in users[:PAIRS]]
            readers = [login(port, u) for u in users[PAIRS:]]
            started = time.monotonic()
            per = BATCH // PAIRS
            for batch in range(self.messages // BATCH):
                first = batch * BATCH
                for k in range(PAIRS):
                    frames = b"".join(
                        frame_05(users[k], users[PAIRS + k], BASE_TS + first + j, first + j)
                        for j in range(per)
                    )
                    senders[k].sendall(frames)
                for k in range(PAIRS):
                    read_exactly(readers[k], 256 * per)
                    read_exactly(senders[k], 25 * per)
                sent = first + BATCH
                self.pace(started, sent)
                if sent % self.step == 0:
                    rows.append((sent, time.monotonic() - started, size(db)))
                    print(f"  {self.label} online {sent}: {rows[-1][2]}", flush=True)
        finally:
            server.stop()
        return rows

    def offline_then_draining(self) -> tuple[list[tuple], list[tuple]]:
        server, db, port = self.start("offline")
        filled, drained = [], []
        try:
            users = register(port, 2 * PAIRS + 1)
            pacer_id = users[-1]
            senders = [login(port, u) for u in users[:PAIRS]]
            pacer = login(port, pacer_id)
            started = time.monotonic()
            per = BATCH // PAIRS
            batches = self.messages // BATCH
            for batch in range(batches):
                first = batch * BATCH
                for k in range(PAIRS):
                    frames = b"".join(
                        frame_05(users[k], users[PAIRS + k], BASE_TS + first + j, first + j)
                        for j in range(per)
                    )
                    # A live message to the pacer after the batch: its 07 comes after their commit.
                    senders[k].sendall(frames + frame_05(users[k], pacer_id, BASE_TS + batch, -1))
                for k in range(PAIRS):
                    read_exactly(pacer, 256)
                    read_exactly(senders[k], 25)
                sent = first + BATCH
                self.pace(started, sent)
                if sent % self.step == 0:
                    filled.append((sent, time.monotonic() - started, size(db)))
                    print(f"  {self.label} held {sent}: {filled[-1][2]}", flush=True)
            started = time.monotonic()
            held_each = self.messages // PAIRS
            done = 0
            for k in range(PAIRS):
                reader = socket.create_connection(("127.0.0.1", port))
                reader.sendall(b"03" + users[PAIRS + k])
                # Its 04 and its held messages; its sender reads the 07s meanwhile.
                confirms = threading.Thread(target=read_exactly, args=(senders[k], 25 * held_each))
                confirms.start()
                read_exactly(reader, 15 + 256 * held_each)
                confirms.join()
                reader.close()
                done += held_each
                if done % self.step == 0:
                    drained.append((done, time.monotonic() - started, size(db)))
                    print(f"  {self.label} drained {done}: {drained[-1][2]}", flush=True)
        finally:
            server.stop()
        return filled, drained


def mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def table(title: str, runs: list[tuple[str, list[tuple]]]) -> list[str]:
    """One row per step, a column group per run: file + WAL (free inside it), MB."""
    lines = [f"### {title}", ""]
    head = "| messages |" + "".join(f" {label}: file + WAL, MB (free pages) |" for label, _ in runs)
    lines += [head, "|---:|" + "---:|" * len(runs)]
    for at in range(len(runs[0][1])):
        row = f"| {runs[0][1][at][0]:,} |"
        for _, rows in runs:
            _, _, s = rows[at]
            row += f" {mb(s['file'])} + {mb(s['wal'])} ({mb(s['free'])}) |"
        lines.append(row)
    lines.append("")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--run", action="append", required=True, help="LABEL|REF|SERVER ARGS (REF: a git ref or worktree)"
    )
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--step", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=10_000, help="messages a second, sending (default 10000)")
    ap.add_argument("--output", default=None, help="write the tables here (markdown)")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="chatproto-dbgrowth-") as tmp:
        for n, spec in enumerate(args.run):
            label, ref, extra = spec.split("|")
            workdir = Path(tmp) / f"run{n}"
            workdir.mkdir()
            source, described = export_tree(ref, workdir / "src")
            run = Run(label, source, extra.split(), workdir, args.messages, args.step, args.rate)
            print(f"{label}: {described}, server args {extra!r}", flush=True)
            started = time.monotonic()
            online = run.online()
            filled, drained = run.offline_then_draining()
            results.append((label, described, extra, online, filled, drained, time.monotonic() - started))
    load = os.getloadavg()
    lines = [
        f"{args.messages:,} messages at {args.rate:,.0f} msg/s, {PAIRS} sender/reader pairs, batches of "
        f"{BATCH:,} (each read and confirmed before the next); `{' '.join(sys.argv)}`; load average at "
        f"the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 cores shared with other work)",
        "",
    ]
    for label, described, extra, online, _, _, seconds in results:
        rate = args.messages / online[-1][1]
        lines.append(
            f"- **{label}**: {described}, server args `{extra or '(defaults)'}`; online phase "
            f"{online[-1][1]:.1f} s ({rate:,.0f} msg/s), whole run {seconds:.0f} s"
        )
    lines.append("")
    lines += table("Online: every message delivered live", [(r[0], r[3]) for r in results])
    lines += table("Offline: every message held", [(r[0], r[4]) for r in results])
    lines += table("Then draining: the readers log in, one after the other", [(r[0], r[5]) for r in results])
    text = "\n".join(lines)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
