#!/usr/bin/env python3
"""Soak: many clients, random disconnects, kill -9 of the server, hostile bytes.

    python bench/soak.py                          # 30 clients, 60 s of traffic, 5 kills
    python bench/soak.py --clients 10 --duration 8 --kills 2 --seed 1

One process drives every client over loopback on one ``select`` loop, and owns
the server (``python -m twisted chat`` from the repository root, on a fresh
SQLite file). Each client behaves as the contract asks of a careful client:

- it keeps every message without a 07 in its outbox and sends the whole
  outbox again after each login (04);
- its timestamps are strictly increasing per conversation, so a 07 names
  exactly one message;
- a session opened with 15 acknowledges every 06 with a 16, after keeping it;
- it drops a 06 it already has (client-side de-duplication) and counts it.

Most clients log in with 15 (a secret), the rest with 03 (the seed's clients).
Faults: every client drops its connection at random moments (half of the
drops with an RST), and the server is killed with SIGKILL and restarted
``--kills`` times, evenly spread over the run. Alongside, ``--fuzzers``
connections send hostile input: random bytes, frames of every client code
with random fields, 05s with someone else's SRC, 16s naming other users'
messages, half frames; the server's answers to them must still be frames.

After the traffic phase, faults stop and the run drains: every client
connected, until every outbox is empty (or ``--drain`` seconds pass). Then:

- every message sent reached each of its recipients exactly once after
  de-duplication (``lost`` counts those that never did);
- every 07 names a message the sender sent, and at the moment it arrived
  each 15-session recipient already had that message (a 03 recipient
  "has" it once it was written to its connection, which the contract
  counts as reached; see ``lost (03 in flight)``);
- every 06 a client got was addressed to it (its id, or a group it belongs
  to) and is a message some client really sent: nothing forged, nothing
  misrouted.

The counts are printed, and with ``--json`` written as JSON; the exit status
is 0 only when every check held.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE_TS = 1_700_000_000
TICK = 0.01
DEADLINE = 15.0

#: Length of every server frame, from the contract (11 grows by 13 per member).
SERVER_LEN = {b"02": 15, b"04": 15, b"06": 256, b"07": 25, b"09": 25, b"11": 27, b"12": 6, b"14": 47}
#: Length of every client frame (10 grows by 13 per member).
CLIENT_LEN = {b"01": 2, b"03": 15, b"05": 256, b"08": 25, b"10": 27, b"13": 2, b"15": 47, b"16": 38}
WORDS = ["hello", "soak", "kill", "résumé", "naïve", "ünïcödé", "日本語", "👋", "ok", "again", "x" * 40]


class SoakError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pad(text: bytes) -> bytes:
    return text.ljust(218, b"\0")


def split_frames(buf: bytes) -> tuple[list[bytes], bytes]:
    """Whole server frames at the front of ``buf``; an unknown code is a failure."""
    frames = []
    at = 0
    while len(buf) - at >= 2:
        code = buf[at : at + 2]
        length = SERVER_LEN.get(code)
        if length is None:
            raise SoakError(f"the server sent an unknown code {code!r}: {buf[at : at + 40]!r}")
        if code == b"11":
            if len(buf) - at < 27:
                break
            n = buf[at + 25 : at + 27]
            if not n.isdigit() or not 1 <= int(n) <= 99:
                raise SoakError(f"the server sent an 11 with N={n!r}")
            length += 13 * int(n)
        if len(buf) - at < length:
            break
        frames.append(buf[at : at + length])
        at += length
    return frames, buf[at:]


class Server:
    """``python -m twisted chat`` on a fixed loopback port, its output appended to a log."""

    def __init__(self, db: str, log: str, port: int, extra=()):
        self.db, self.log, self.port, self.extra = db, log, port, list(extra)
        self.proc = None
        self.starts = 0
        self.max_rss_kb = 0

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "twisted", "chat", "--port", f"tcp:{self.port}:interface=127.0.0.1"]
                + ["--db", self.db, *self.extra],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1
        deadline = time.monotonic() + DEADLINE
        while True:
            if self.proc.poll() is not None:
                raise SoakError(f"the server exited with {self.proc.returncode}; see {self.log}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise SoakError(f"the server never listened; see {self.log}") from None
                select.select([], [], [], 0.02)

    def kill(self) -> None:
        self.sample_rss()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=DEADLINE)

    def stop(self) -> int:
        self.sample_rss()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=DEADLINE)

    def sample_rss(self) -> None:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        self.max_rss_kb = max(self.max_rss_kb, int(line.split()[1]))
        except OSError:
            pass


class Conn:
    """A socket and the bytes read from it but not yet framed."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self, reset: bool = False) -> None:
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def blocking_exchange(port: int, frame: bytes, want: bytes, accept=lambda f: True) -> bytes:
    """Open a connection, send ``frame`` and return the first frame coded ``want``
    that ``accept`` takes."""
    conn = Conn(port)
    try:
        conn.send(frame)
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            data = conn.sock.recv(65536)
            if not data:
                break
            frames, conn.buf = split_frames(conn.buf + data)
            for f in frames:
                if f[:2] == want and accept(f):
                    return f
                if f[:2] == b"12":
                    raise SoakError(f"setup: {frame[:2]!r} was refused with {f!r}")
        raise SoakError(f"setup: no {want!r} in answer to {frame[:2]!r}")
    finally:
        conn.close()


class Peer:
    """One client: its identity, its outbox, what it has received."""

    def __init__(self, soak: Soak, index: int, user: bytes, secret: bytes | None):
        self.soak = soak
        self.index = index
        self.user = user
        self.secret = secret
        self.conn: Conn | None = None
        self.ready = False
        self.retry_at = 0.0
        self.last_heard = 0.0
        #: (dst, ts) → text of every message this client made
        self.sent: dict[tuple[bytes, bytes], bytes] = {}
        #: (dst, ts) → text, without a 07 yet: resent after each login
        self.outbox: dict[tuple[bytes, bytes], bytes] = {}
        #: (src, dst, ts, text) of every distinct 06 received
        self.got: set[tuple[bytes, bytes, bytes, bytes]] = set()
        self.last_ts: dict[bytes, int] = {}
        self.seq = 0

    @property
    def kind(self) -> str:
        return "15" if self.secret else "03"

    def login_frame(self) -> bytes:
        return b"15" + self.user + self.secret if self.secret else b"03" + self.user

    def connect(self, now: float) -> None:
        try:
            self.conn = Conn(self.soak.port)
            self.conn.send(self.login_frame())
            self.last_heard = now
        except OSError:
            self.drop(now, counted=False)

    def drop(self, now: float, counted: bool, reset: bool = False) -> None:
        if self.conn is not None and not self.secret:
            # What a 03 client loses when its connection goes: bytes the server
            # wrote (and so counted as delivered) that it has not read yet.
            try:
                unread = struct.unpack("i", fcntl.ioctl(self.conn.sock, termios.FIONREAD, b"\0" * 4))[0]
            except OSError:
                unread = 0
            unread += len(self.conn.buf)
            if unread:
                self.soak.counts["03 drops with unread bytes"] += 1
                self.soak.counts["bytes unread at 03 drops"] += unread
        if self.conn is not None:
            try:
                self.conn.close(reset)
            except OSError:
                pass
        self.conn = None
        self.ready = False
        self.retry_at = now + self.soak.rng.uniform(0.02, 0.3)
        if counted:
            self.soak.counts["disconnects"] += 1

    def new_message(self) -> None:
        soak = self.soak
        rng = soak.rng
        groups = soak.groups_of[self.user]
        if groups and rng.random() < 0.3:
            dst = rng.choice(groups)
        else:
            dst = rng.choice([p.user for p in soak.peers if p is not self])
        ts = max(int(time.time()), self.last_ts.get(dst, 0) + 1)  # the contract's rule
        self.last_ts[dst] = ts
        self.seq += 1
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
        text = f"{self.index}:{self.seq} {words}".encode()[:218]
        text = text.decode("utf-8", "ignore").encode()  # cut on a character boundary
        key = (dst, b"%010d" % ts)
        self.sent[key] = text
        self.outbox[key] = text
        soak.counts["sent"] += 1
        if self.ready:
            self.write(b"05" + self.user + key[0] + key[1] + pad(text))

    def write(self, data: bytes) -> None:
        try:
            self.conn.send(data)
        except OSError:
            self.drop(time.monotonic(), counted=False)

    def on_readable(self, now: float) -> None:
        try:
            data = self.conn.sock.recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            self.drop(now, counted=False)
            return
        self.last_heard = now
        frames, self.conn.buf = split_frames(self.conn.buf + data)
        acks = []
        for frame in frames:
            code = frame[:2]
            self.soak.counts["frames in"] += 1
            if code == b"04":
                if frame[2:] != self.user:
                    self.soak.fail(f"{self.user!r} got a 04 for {frame[2:]!r}")
                self.ready = True
                if self.outbox:
                    self.soak.counts["resent"] += len(self.outbox)
                    self.write(
                        b"".join(
                            b"05" + self.user + dst + ts + pad(text)
                            for (dst, ts), text in sorted(self.outbox.items(), key=lambda kv: kv[0][1])
                        )
                    )
            elif code == b"06":
                ack = self.on_message(frame)
                if ack:
                    acks.append(ack)
            elif code == b"07":
                self.on_delivered(frame[2:15], frame[15:25])
            elif code == b"12":
                self.soak.counts[f"12 {frame[2:4].decode()} {frame[4:6].decode()}"] += 1
                if frame[4:6] == b"09":
                    self.soak.fail(f"{self.user!r} was told it logged in elsewhere")
            elif code == b"11":
                self.soak.counts["11 received"] += 1
            elif code == b"09":
                self.soak.counts["09 received"] += 1
            else:
                self.soak.fail(f"{self.user!r} got an unexpected {frame!r}")
            if self.conn is None:
                return
        if acks and self.secret and self.conn is not None:
            self.write(b"".join(acks))

    def on_message(self, frame: bytes) -> bytes | None:
        soak = self.soak
        src, dst, ts, text = frame[2:15], frame[15:28], frame[28:38], frame[38:].rstrip(b"\0")
        if dst != self.user and self.user not in soak.members.get(dst, ()):
            soak.counts["misrouted"] += 1
            soak.fail(f"{self.user!r} got a 06 addressed to {dst!r}")
        sender = soak.by_user.get(src)
        if sender is None or sender.sent.get((dst, ts)) != text or (dst in soak.members and src == self.user):
            soak.counts["forged"] += 1
            soak.fail(f"{self.user!r} got a 06 no client sent: {frame[:38]!r} {text!r}")
        key = (src, dst, ts, text)
        if key in self.got:
            soak.counts["duplicates dropped"] += 1
        else:
            self.got.add(key)
            soak.counts["delivered"] += 1
        return b"16" + src + dst + ts

    def on_delivered(self, dst: bytes, ts: bytes) -> None:
        soak = self.soak
        text = self.sent.get((dst, ts))
        if text is None:
            soak.counts["07 naming nothing sent"] += 1
            soak.fail(f"{self.user!r} got a 07 for {dst!r} {ts!r}, which it never sent")
            return
        if self.outbox.pop((dst, ts), None) is None:
            soak.counts["07 repeated"] += 1
        else:
            soak.counts["07"] += 1
        key = (self.user, dst, ts, text)
        for r in soak.recipients(self.user, dst):
            if r.secret and key not in r.got:
                soak.counts["07 before a 15 recipient had it"] += 1
                soak.fail(f"a 07 to {self.user!r} for {dst!r} {ts!r}: {r.user!r} never acknowledged it")


class Fuzzer:
    """A connection that sends hostile input and checks the answers are still frames."""

    def __init__(self, soak: Soak, user: bytes, secret: bytes):
        self.soak = soak
        self.user = user
        self.secret = secret
        self.conn: Conn | None = None
        self.retry_at = 0.0

    def step(self, now: float) -> None:
        soak, rng, counts = self.soak, self.soak.rng, self.soak.counts
        if self.conn is None:
            if now < self.retry_at:
                return
            try:
                self.conn = Conn(soak.port)
                if rng.random() < 0.8:
                    self.conn.send(b"15" + self.user + self.secret)
            except OSError:
                self.close(now)
            return
        kind = rng.choice(["bytes", "fields", "spoof", "ack", "group", "half", "seen"])
        others = [p for p in soak.peers]
        victim = rng.choice(others)
        if kind == "bytes":
            data = rng.randbytes(rng.randint(1, 300))
        elif kind == "fields":
            code = rng.choice(list(CLIENT_LEN))
            n = b"%02d" % rng.randint(0, 3) if code == b"10" else b""
            body = rng.randbytes(CLIENT_LEN[code] - 2 - len(n))
            members = rng.randbytes(13 * int(n)) if n else b""
            data = code + body + n + members
        elif kind == "spoof":
            # Someone else's SRC: must be refused, and must reach nobody.
            dst = rng.choice([p.user for p in others])
            data = b"05" + victim.user + dst + b"%010d" % (BASE_TS + rng.randint(0, 10**6)) + pad(b"forged")
        elif kind == "ack":
            # A 16 naming another user's real message: acknowledges nothing.
            if victim.sent:
                (dst, ts) = rng.choice(list(victim.sent))
                data = b"16" + victim.user + dst + ts
            else:
                data = b"16" + victim.user + victim.user + b"0000000001"
        elif kind == "group":
            data = b"10" + self.user + b"%010d" % BASE_TS + b"02" + b"0" * 13 + rng.randbytes(13)
        elif kind == "seen":
            data = (
                b"08" + rng.choice([rng.randbytes(13), b"1" + b"%012d" % rng.randint(0, 10**12)]) + b"1" * 10
            )
        else:
            code = rng.choice(list(CLIENT_LEN))
            data = (code + b"9" * 300)[: rng.randint(1, CLIENT_LEN[code] - 1)]
        counts["fuzz inputs"] += 1
        counts[f"fuzz inputs: {kind}"] += 1
        counts["fuzz bytes"] += len(data)
        try:
            self.conn.send(data)
        except OSError:
            self.close(now)
            return
        if kind == "half" and rng.random() < 0.5:
            self.close(now)

    def on_readable(self, now: float) -> None:
        try:
            data = self.conn.sock.recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            self.soak.counts["fuzz connections closed by the server"] += 1
            self.close(now)
            return
        frames, self.conn.buf = split_frames(self.conn.buf + data)
        for frame in frames:
            if frame[:2] == b"12":
                self.soak.counts[f"fuzz answered 12 reason {frame[4:6].decode()}"] += 1
            elif frame[:2] == b"06":
                self.soak.fail(f"the fuzzer received a 06: {frame[:38]!r}")

    def close(self, now: float) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
        self.conn = None
        self.retry_at = now + 0.05


class Soak:
    def __init__(self, args, workdir: str):
        self.args = args
        self.rng = random.Random(args.seed)
        self.postgres = None
        db = os.path.join(workdir, "soak.sqlite3")
        if args.postgres:
            sys.path.insert(0, str(REPO))
            from tests.postgres import PostgresCluster, find_bin_dir

            self.postgres = PostgresCluster(find_bin_dir())
            self.postgres.init()
            self.postgres.start()
            db = self.postgres.create_database()
        #: One server, or with --postgres the nodes sharing its database.
        self.servers = [
            Server(db, os.path.join(workdir, f"server{i}.log"), free_port(), args.server_arg)
            for i in range(args.nodes)
        ]
        self.counts: Counter = Counter()
        self.failures: list[str] = []
        self.peers: list[Peer] = []
        self.by_user: dict[bytes, Peer] = {}
        self.members: dict[bytes, list[bytes]] = {}
        self.groups_of: dict[bytes, list[bytes]] = {}
        self.fuzzers: list[Fuzzer] = []

    def fail(self, why: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(why)

    def recipients(self, src: bytes, dst: bytes) -> list[Peer]:
        if dst in self.members:
            return [self.by_user[m] for m in self.members[dst] if m != src]
        return [self.by_user[dst]]

    # -- setup ----------------------------------------------------------------

    def setup(self) -> None:
        args, rng = self.args, self.rng
        for i in range(args.clients):
            secret_session = i >= args.clients * args.share_03
            if secret_session:
                f = blocking_exchange(self.port, b"13", b"14")
                peer = Peer(self, i, f[2:15], f[15:47])
            else:
                f = blocking_exchange(self.port, b"01", b"02")
                peer = Peer(self, i, f[2:15], None)
            self.peers.append(peer)
            self.by_user[peer.user] = peer
            self.groups_of[peer.user] = []
        for g in range(args.groups):
            creator = self.peers[g % len(self.peers)]
            size = rng.randint(2, min(8, len(self.peers) - 1))
            listed = rng.sample([p.user for p in self.peers if p is not creator], size)
            when = b"%010d" % (BASE_TS + g)
            frame = b"10" + creator.user + when + b"%02d" % len(listed) + b"".join(listed)
            # Its login first flushes the 11s of groups made while it was offline: skip them.
            f = blocking_exchange(
                self.port,
                creator.login_frame() + frame,
                b"11",
                lambda f, when=when, me=creator.user: f[15:25] == when and f[27:40] == me,
            )
            group = f[2:15]
            self.members[group] = [f[i : i + 13] for i in range(27, len(f), 13)]
            for m in self.members[group]:
                self.groups_of[m].append(group)
        for _ in range(args.fuzzers):
            f = blocking_exchange(self.port, b"13", b"14")
            self.fuzzers.append(Fuzzer(self, f[2:15], f[15:47]))

    # -- the run --------------------------------------------------------------

    def poll(self, now: float) -> None:
        socks = {}
        for p in self.peers:
            if p.conn is not None:
                socks[p.conn.fileno()] = p
        for z in self.fuzzers:
            if z.conn is not None:
                socks[z.conn.fileno()] = z
        ready, _, _ = select.select(list(socks), [], [], TICK)
        for fd in ready:
            who = socks[fd]
            if who.conn is not None and who.conn.fileno() == fd:
                who.on_readable(now)

    @property
    def port(self) -> int:
        """Where a client connects: any node (one that is down refuses, and the client tries later)."""
        return self.rng.choice(self.servers).port

    def run(self) -> None:
        args, rng, counts = self.args, self.rng, self.counts
        for server in self.servers:
            server.start()
        self.setup()
        start = time.monotonic()
        kill_at = [start + args.duration * (k + 1) / (args.kills + 1) for k in range(args.kills)]
        last_rss = last = start
        while True:
            now = time.monotonic()
            dt, last = now - last, now
            if now - start >= args.duration:
                break
            if kill_at and now >= kill_at[0]:
                kill_at.pop(0)
                victim = rng.choice(self.servers)
                victim.kill()
                counts["kills"] += 1
                for p in self.peers:
                    p.drop(now, counted=False)
                for z in self.fuzzers:
                    z.close(now)
                select.select([], [], [], rng.uniform(0, 0.2))  # down for a moment
                victim.start()
                last = time.monotonic()
                continue
            if now - last_rss >= 0.5:
                for server in self.servers:
                    server.sample_rss()
                last_rss = now
            for p in self.peers:
                # Messages are written while offline too: they wait in the outbox.
                if rng.random() < args.rate * dt and len(p.sent) < args.max_per_client:
                    p.new_message()
                if p.conn is None:
                    if now >= p.retry_at:
                        p.connect(now)
                elif rng.random() < dt / args.mean_connected:
                    p.drop(now, counted=True, reset=rng.random() < 0.5)
            for z in self.fuzzers:
                if rng.random() < args.fuzz_rate * dt:
                    z.step(now)
            self.poll(now)
        counts["traffic seconds"] = round(time.monotonic() - start, 1)
        self.drain()

    def done(self) -> bool:
        for p in self.peers:
            if p.outbox:
                return False
            for key, text in p.sent.items():
                for r in self.recipients(p.user, key[0]):
                    if r.secret and (p.user, key[0], key[1], text) not in r.got:
                        return False
        return True

    def drain(self) -> None:
        start = time.monotonic()
        deadline = start + self.args.drain
        checked = start
        for z in self.fuzzers:
            z.close(start)
        while time.monotonic() < deadline:
            now = time.monotonic()
            for p in self.peers:
                if p.conn is None and now >= p.retry_at:
                    p.connect(now)
                elif p.conn is not None and p.outbox and now - p.last_heard > 2.0:
                    # Nothing heard for a while with messages unconfirmed: what a
                    # client does then is reconnect, which resends the outbox.
                    self.counts["drain reconnects"] += 1
                    p.drop(now, counted=False)
            self.poll(now)
            if now - checked >= 0.1:
                checked = now
                if all(p.ready for p in self.peers) and self.done():
                    break
        self.counts["drain seconds"] = round(time.monotonic() - start, 1)

    # -- the verdict ----------------------------------------------------------

    def verdict(self) -> dict:
        counts = self.counts
        expected = lost = lost03 = 0
        for p in self.peers:
            for (dst, ts), text in p.sent.items():
                for r in self.recipients(p.user, dst):
                    expected += 1
                    if (p.user, dst, ts, text) not in r.got:
                        if r.secret:
                            lost += 1
                            self.fail(f"lost: {p.user!r} → {dst!r} {ts!r} never reached {r.user!r}")
                        else:
                            lost03 += 1
        counts["expected deliveries"] = expected
        counts["lost"] = lost
        counts["lost (03 in flight)"] = lost03
        counts["unconfirmed (no 07)"] = sum(len(p.outbox) for p in self.peers)
        if counts["unconfirmed (no 07)"]:
            self.fail(f"{counts['unconfirmed (no 07)']} messages never got their 07")
        counts["clients"] = len(self.peers)
        counts["clients on 03"] = sum(1 for p in self.peers if not p.secret)
        counts["groups"] = len(self.members)
        counts["server starts"] = sum(server.starts for server in self.servers)
        counts["server max RSS (KiB)"] = max(server.max_rss_kb for server in self.servers)
        for server in self.servers:
            tracebacks = Path(server.log).read_text(errors="replace").count("Traceback")
            counts["server tracebacks logged"] += tracebacks
            if tracebacks:
                self.fail(f"a server logged {tracebacks} tracebacks; see {server.log}")
        return {name: counts[name] for name in ORDER} | dict(counts)


ORDER = [
    "clients",
    "clients on 03",
    "groups",
    "traffic seconds",
    "drain seconds",
    "sent",
    "expected deliveries",
    "delivered",
    "duplicates dropped",
    "lost",
    "lost (03 in flight)",
    "03 drops with unread bytes",
    "bytes unread at 03 drops",
    "unconfirmed (no 07)",
    "07",
    "07 repeated",
    "07 naming nothing sent",
    "07 before a 15 recipient had it",
    "misrouted",
    "forged",
    "resent",
    "kills",
    "server starts",
    "disconnects",
    "drain reconnects",
    "fuzz inputs",
    "fuzz bytes",
    "fuzz connections closed by the server",
    "server tracebacks logged",
    "server max RSS (KiB)",
]


def report(counts: dict) -> str:
    lines = [f"{name}: {counts.get(name, 0)}" for name in ORDER]
    lines += [f"{name}: {counts[name]}" for name in sorted(counts) if name not in ORDER]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=30)
    ap.add_argument("--share-03", type=float, default=0.2, help="share of clients that log in with 03")
    ap.add_argument("--groups", type=int, default=6)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of traffic and faults")
    ap.add_argument("--drain", type=float, default=60.0, help="seconds at most to drain afterwards")
    ap.add_argument("--kills", type=int, default=5, help="kill -9 and restarts of the server")
    ap.add_argument("--rate", type=float, default=10.0, help="new messages per second per client")
    ap.add_argument("--max-per-client", type=int, default=5000, help="messages per client at most")
    ap.add_argument("--mean-connected", type=float, default=3.0, help="mean seconds between a client's drops")
    ap.add_argument("--fuzzers", type=int, default=2, help="connections sending hostile input")
    ap.add_argument("--fuzz-rate", type=float, default=50.0, help="hostile inputs per second per fuzzer")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the database and the server log")
    ap.add_argument("--json", help="also write the counts to this file")
    ap.add_argument("--server-arg", action="append", default=[], help="one more argument for twist chat")
    ap.add_argument(
        "--postgres",
        action="store_true",
        help="the servers share a PostgreSQL database (a throwaway cluster made for the run)",
    )
    ap.add_argument("--nodes", type=int, default=1, help="servers (with --postgres); each kill hits one")
    args = ap.parse_args(argv)
    if args.nodes > 1 and not args.postgres:
        ap.error("--nodes needs --postgres: several nodes share a PostgreSQL database")
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    return args


def soak(argv=None) -> tuple[dict, list[str]]:
    """Run a soak; returns its counts and the failures found (none when all held)."""
    args = parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="chatproto-soak-")
    s = Soak(args, workdir)
    try:
        s.run()
    finally:
        now = time.monotonic()
        for p in s.peers:  # the clients leave, then the server stops cleanly
            p.drop(now, counted=False)
        for z in s.fuzzers:
            z.close(now)
        for server in s.servers:
            if server.proc is not None and server.proc.poll() is None:
                server.stop()
        if s.postgres is not None:
            s.postgres.remove()
    counts = s.verdict()
    counts["seed"] = args.seed
    if args.keep or s.failures:
        counts["workdir"] = workdir
    else:
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)
    if args.json:
        Path(args.json).write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")
    return counts, s.failures


def main(argv=None) -> int:
    counts, failures = soak(argv)
    print(report(counts))
    for why in failures:
        print("FAIL:", why)
    print("soak:", "FAILED" if failures else "every check held")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
