"""The systems under test: how to start each one, and how its clients log in and talk.

Every system offers the same workloads through the same methods, so the run
can treat them alike:

- ``pairs(P)``: P (sender, receiver, make) logged in, where ``make(i)`` is the
  i-th pre-built message from sender to receiver;
- ``idle(C)``: C idle logged-in clients;
- ``group(K)``: one sender and K-1 other members of a group;
- ``offline(N)``: N messages held for a user who is offline, then its login.

``rx`` is what one delivered message costs the receiver: a byte count, or
``LINES`` for IRC (one line per message, counted by newline). ``ack`` is what
one message brings back to its sender (our 07), to drain and check.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from loadgen import BenchError, close_all, dial, exchange, open_clients, send_all

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
TEXT_LEN = 218
LINES = "lines"
BASE_TS = 1_700_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def text(i: int) -> bytes:
    """The i-th message text: 218 ASCII bytes, different for every i."""
    head = b"m%010d " % i
    return head + b"x" * (TEXT_LEN - len(head))


class Server:
    """A server process pinned to ``core`` with taskset, its output in a log file."""

    def __init__(self, argv, port, workdir: Path, core: int, env=None, cwd=REPO, log_name="server.log"):
        self.port = port
        self.log_path = workdir / log_name
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["taskset", "-c", str(core), *argv],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
        )
        self.pid = self.proc.pid

    def wait_ready(self, timeout=20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"server exited with {self.proc.returncode}: {self.tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise BenchError(f"server not listening after {timeout}s: {self.tail()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise BenchError("no VmRSS")

    def tail(self, n=1500) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


class System:
    name = "?"
    label = "?"
    rx: int | str = 256
    ack = 0
    #: Distinct frames per sender block (repeated); None: every message its own frame.
    distinct: int | None = 512
    #: The workloads this system is measured on (None: all of them).
    workloads: tuple[str, ...] | None = None
    #: Accounts are made before the connections that use them, outside the memory figure.
    offline_ok = True
    #: Clients dialled at once: at most the server's listen backlog, or SYNs are dropped.
    batch = 50

    def __init__(self, workdir: Path, core: int):
        self.workdir = workdir
        self.core = core
        self.server: Server | None = None
        self.port = 0
        self._socks: list[socket.socket] = []

    def start(self) -> Server:
        self.port = free_port()
        self.server = self._launch()
        self.server.wait_ready()
        return self.server

    @classmethod
    def supports(cls, kind: str) -> bool:
        return cls.workloads is None or kind in cls.workloads

    def servers(self) -> list[Server]:
        """Every server process of the system (checked after each run, stopped by stop())."""
        return [self.server] if self.server is not None else []

    def problems(self) -> str | None:
        """Errors logged by a process outside servers() (a database), if any."""
        return None

    def extra_pids(self) -> list[int]:
        """Processes of the system that are not children of the run (a database's daemon)."""
        return []

    def stop(self) -> None:
        close_all(self._socks)
        self._socks = []
        for server in self.servers():
            server.stop()
        self.server = None

    def _keep(self, socks):
        self._socks += socks
        return socks

    def _launch(self) -> Server:
        raise NotImplementedError


# -- ours ------------------------------------------------------------------


def export_tree(ref: str, into: Path) -> tuple[Path, str]:
    """The server's code at git ``ref``, exported to ``into``: what we measure stays put.

    Other people edit the working tree while a run goes on; a half-written file
    must not become a figure. ``ref`` "worktree" measures the working tree as is.
    Returns (source root, description).
    """
    if ref == "worktree":
        return REPO, "the working tree"
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", ref], capture_output=True, text=True, check=True
    ).stdout.strip()
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "chatproto", "twisted"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into, f"commit {commit}"


class Chat(System):
    name = "chatproto"
    label = "chatproto (SQLite)"
    rx = 256
    ack = 25
    #: The contract drops a repeated (SRC, DST, TIMESTAMP, MSG): a distinct frame per message.
    distinct = None
    #: Where the server's code is run from (see export_tree); set by run.py.
    source = REPO

    def __init__(self, workdir, core, python=sys.executable, extra_env=None):
        super().__init__(workdir, core)
        self.python = python
        self.extra_env = extra_env or {}
        self.prefix: list[str] = []

    def _db(self, fresh: bool) -> str:
        """The --db argument: a SQLite file in the run's directory (emptied when fresh)."""
        db = self.workdir / "chat.sqlite3"
        for suffix in ("", "-wal", "-shm"):
            if fresh:
                Path(str(db) + suffix).unlink(missing_ok=True)
        return str(db)

    def _launch(self, fresh=True, port=None, log_name="server.log"):
        db = self._db(fresh)
        port = port or self.port
        env = dict(os.environ, **self.extra_env)
        argv = [
            *self.prefix,
            self.python,
            "-m",
            "twisted",
            "chat",
            "--port",
            f"tcp:{port}:interface=127.0.0.1",
            "--db",
            db,
            # Flood protection off, as for ngircd: the generator floods on purpose.
            "--max-frame-rate",
            "0",
        ]
        return Server(argv, port, self.workdir, self.core, env=env, cwd=self.source, log_name=log_name)

    @property
    def receiver_port(self) -> int:
        """Where pairs() logs its receivers in (its senders: self.port)."""
        return self.port

    def register(self, n: int) -> list[bytes]:
        """n accounts over one connection (pipelined 01s), closed afterwards."""
        (s,) = dial(self.port, 1)
        try:
            (got,) = exchange([s], b"01" * n, 15 * n, timeout=120)
        finally:
            s.close()
        ids = [bytes(got[i : i + 15]) for i in range(0, 15 * n, 15)]
        if any(f[:2] != b"02" for f in ids):
            raise BenchError(f"registration failed: {bytes(got[:60])!r}")
        return [f[2:] for f in ids]

    def login(self, ids: list[bytes], port: int | None = None) -> list[socket.socket]:
        socks, got = open_clients(port or self.port, len(ids), lambda i: b"03" + ids[i], 15, batch=self.batch)
        for g, user in zip(got, ids, strict=True):
            if bytes(g[:15]) != b"04" + user:
                raise BenchError(f"login failed: {bytes(g[:40])!r}")
        return self._keep(socks)

    @staticmethod
    def frame(src: bytes, dst: bytes, i: int) -> bytes:
        return b"05" + src + dst + b"%010d" % (BASE_TS + i) + text(i)

    @staticmethod
    def stamped(src: bytes, dst: bytes):
        head = b"05" + src + dst

        def make(i, now_ns):
            t = b"T%019d#%010d " % (now_ns, i)
            return head + b"%010d" % (BASE_TS + i) + t + b"x" * (TEXT_LEN - len(t))

        return make

    def pairs(self, p):
        ids = self.register(2 * p)
        senders, receivers = self.login(ids[:p]), self.login(ids[p:], self.receiver_port)
        return [
            (s, r, lambda i, a=ids[k], b=ids[p + k]: self.frame(a, b, i), self.stamped(ids[k], ids[p + k]))
            for k, (s, r) in enumerate(zip(senders, receivers, strict=True))
        ]

    def idle_prepare(self, c):
        """Make the accounts, then restart the server on that database.

        The new process loads the accounts at start, so the memory baseline
        holds them but none of the garbage their registration left behind
        (which the connections would otherwise reuse, hiding their cost).
        """
        ids = self.register(c)
        self.server.stop()
        self.server = self._launch(fresh=False)
        self.server.wait_ready()
        return ids

    def idle(self, c, prepared):
        return self.login(prepared)

    def group(self, k):
        ids = self.register(k)
        socks = self.login(ids)
        creator = ids[0]
        create = b"10" + creator + b"%010d" % BASE_TS + b"%02d" % (k - 1) + b"".join(ids[1:])
        send_all(socks[0], create, time.monotonic() + 10)
        got = exchange(socks, b"", 27 + 13 * k, timeout=60)
        if bytes(got[0][:2]) != b"11":
            raise BenchError(f"group not created: {bytes(got[0][:40])!r}")
        gid = bytes(got[0][2:15])
        return socks[0], socks[1:], lambda i: self.frame(creator, gid, i)

    def offline(self, n):
        """Queue n messages for an offline user; return (login, expected bytes, sender)."""
        src, dst, marker = self.register(3)
        s, m = self.login([src, marker])
        block = b"".join(self.frame(src, dst, i) for i in range(n))
        deadline = time.monotonic() + 600
        send_all(s, block, deadline)
        # The store commits in order: once a later message reaches the marker,
        # all n before it are committed and held.
        send_all(s, self.frame(src, marker, n), deadline)
        exchange([m], b"", 256, timeout=600)
        (r,) = dial(self.port, 1)
        self._keep([r])
        return r, b"03" + dst, 15 + 256 * n, s


# -- ours on PostgreSQL -------------------------------------------------------

#: Appended to postgresql.conf after the tests' settings (tests/postgres.py, made for
#: throwaway data: fsync and synchronous_commit off), so these win. Durability as
#: PostgreSQL ships it: the server promises a 07 only after a commit, and a commit
#: here is on disk (WAL flushed with fdatasync) before PostgreSQL reports it.
PG_SETTINGS = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_buffers": "256MB",
    # No checkpoint forced by WAL volume within a run (the default is 1GB).
    "max_wal_size": "4GB",
    "max_connections": "200",
}


def _pg_machinery():
    """tests/postgres.py, imported from the repository root."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests import postgres

    return postgres


def pg_cluster(core: int):
    """A fresh PostgreSQL cluster pinned to ``core``, started; the tests' machinery.

    tests/postgres.py runs initdb and pg_ctl as the ``postgres`` user (we run as
    root) in a directory of its own under /tmp, on a free loopback port. taskset
    before them pins the postmaster, and every backend it forks, to ``core``.
    """
    machinery = _pg_machinery()
    bin_dir = machinery.find_bin_dir()
    if bin_dir is None:
        raise BenchError("PostgreSQL is not installed: no initdb on PATH nor in /usr/lib/postgresql/*/bin")
    cluster = machinery.PostgresCluster(bin_dir)
    cluster._as = ["taskset", "-c", str(core), *cluster._as]
    try:
        cluster.init()
        with open(cluster.data / "postgresql.conf", "a") as conf:
            conf.write("# chatproto benchmark\n")
            conf.writelines(f"{k} = {v}\n" for k, v in PG_SETTINGS.items())
        cluster.start()
    except BaseException:
        cluster.remove()
        raise
    return cluster


def pg_version() -> str:
    """The PostgreSQL server the benchmark would start (postgres --version), or "?"."""
    try:
        bin_dir = _pg_machinery().find_bin_dir() or ""
        done = subprocess.run(
            [os.path.join(bin_dir, "postgres"), "--version"], capture_output=True, text=True
        )
        found = re.search(r"\d+(\.\d+)+", done.stdout)
        return found.group(0) if found else "?"
    except (ImportError, OSError):
        return "?"


class ChatPostgres(Chat):
    """One node on a fresh PostgreSQL cluster, started for the run."""

    name = "chatproto-pg"
    label = "chatproto (PostgreSQL, 1 node)"
    workloads = ("throughput", "latency")

    def __init__(self, workdir, core, **kw):
        super().__init__(workdir, core, **kw)
        self.cluster = None
        self.url = ""

    def start(self) -> Server:
        self.cluster = pg_cluster(self.core)
        self.url = self.cluster.create_database()
        return super().start()

    def _db(self, fresh: bool) -> str:
        return self.url

    def extra_pids(self) -> list[int]:
        pidfile = self.cluster.data / "postmaster.pid" if self.cluster else None
        try:
            return [int(pidfile.read_text().split()[0])] if pidfile else []
        except (OSError, ValueError, IndexError):
            return []

    def problems(self) -> str | None:
        """The first ERROR, FATAL or PANIC in PostgreSQL's log, with what follows it."""
        if self.cluster is None or not self.cluster.log.exists():
            return None
        text = self.cluster.log.read_text(errors="replace")
        for bad in ("ERROR:", "FATAL:", "PANIC:"):
            if bad in text:
                i = text.index(bad)
                return text[max(0, i - 100) : i + 600]
        return None

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            if self.cluster is not None:
                self.cluster.remove()
                self.cluster = None


class ChatPostgres2(ChatPostgres):
    """Two nodes on one database: senders on node 1, receivers on node 2.

    Every message crosses nodes: node 1 commits it as an inbox row, and
    PostgreSQL's NOTIFY brings it to node 2, which writes it to the receiver.
    """

    name = "chatproto-pg2"
    label = "chatproto (PostgreSQL, 2 nodes)"

    def __init__(self, workdir, core, **kw):
        super().__init__(workdir, core, **kw)
        self.node2: Server | None = None

    def start(self) -> Server:
        server = super().start()
        # After node 1 is listening: it has made the schema.
        self.node2 = self._launch(port=free_port(), log_name="node2.log")
        self.node2.wait_ready()
        return server

    @property
    def receiver_port(self) -> int:
        return self.node2.port

    def servers(self) -> list[Server]:
        return [s for s in (self.server, self.node2) if s is not None]

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.node2 = None


# -- the plain Twisted relay ---------------------------------------------------


class TwistedRelay(System):
    name = "relay"
    label = "plain Twisted relay"
    rx = 256

    def _launch(self):
        argv = [sys.executable, str(BENCH / "relay.py"), str(self.port)]
        return Server(argv, self.port, self.workdir, self.core)

    def _open(self, heads):
        socks, _ = open_clients(self.port, len(heads), lambda i: heads[i], 1, batch=self.batch)
        return self._keep(socks)

    def pairs(self, p):
        receivers = self._open([b"R%015d" % k for k in range(p)])
        senders = self._open([b"S%015d" % k for k in range(p)])
        frame = Chat.frame
        return [
            (
                s,
                r,
                lambda i, k=k: frame(b"%013d" % k, b"%013d" % (k + 1), i),
                Chat.stamped(b"%013d" % k, b"%013d" % (k + 1)),
            )
            for k, (s, r) in enumerate(zip(senders, receivers, strict=True))
        ]

    def idle_prepare(self, c):
        return None

    def idle(self, c, prepared):
        return self._open([b"R%015d" % (10**6 + k) for k in range(c)])

    def group(self, k):
        members = self._open([b"R%015d" % 777] * (k - 1))
        (sender,) = self._open([b"S%015d" % 777])
        return sender, members, lambda i: Chat.frame(b"0" * 13, b"1" * 13, i)

    def offline(self, n):
        (s,) = self._open([b"S%015d" % 999])
        send_all(s, b"".join(Chat.frame(b"0" * 13, b"2" * 13, i) for i in range(n)), time.monotonic() + 600)
        # No store to ask: wait until the relay has read every byte we sent.
        deadline = time.monotonic() + 60
        while _unsent(s) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        (r,) = dial(self.port, 1)
        self._keep([r])
        return r, b"R%015d" % 999, 1 + 256 * n, s


def _unsent(sock) -> int:
    import fcntl
    import struct
    import termios

    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


# -- mosquitto (MQTT 3.1.1, QoS 0) -----------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt_str(s: bytes) -> bytes:
    return len(s).to_bytes(2, "big") + s


def mqtt_connect(client_id: bytes, clean=True) -> bytes:
    body = _mqtt_str(b"MQTT") + bytes([4, 0x02 if clean else 0x00]) + (0).to_bytes(2, "big")
    body += _mqtt_str(client_id)
    return b"\x10" + _varint(len(body)) + body


def mqtt_subscribe(topic: bytes, packet_id=1) -> bytes:
    body = packet_id.to_bytes(2, "big") + _mqtt_str(topic) + b"\x00"
    return b"\x82" + _varint(len(body)) + body


def mqtt_publish(topic: bytes, payload: bytes) -> bytes:
    body = _mqtt_str(topic) + payload
    return b"\x30" + _varint(len(body)) + body


MQTT_DISCONNECT = b"\xe0\x00"


class Mosquitto(System):
    name = "mosquitto"
    label = "mosquitto (MQTT QoS 0)"

    def _launch(self):
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_connections -1\n"
            "max_queued_messages 0\n"
            "max_queued_bytes 0\n"
            "queue_qos0_messages true\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n"
        )
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        return Server([exe, "-c", str(conf)], self.port, self.workdir, self.core)

    def _subscribers(self, names: list[bytes], topics: list[bytes], clean=True):
        hello = [mqtt_connect(n, clean) + mqtt_subscribe(t) for n, t in zip(names, topics, strict=True)]
        socks, got = open_clients(self.port, len(names), lambda i: hello[i], 9, batch=self.batch)
        return self._keep(socks)

    def _publishers(self, names):
        socks, _ = open_clients(self.port, len(names), lambda i: mqtt_connect(names[i]), 4, batch=self.batch)
        return self._keep(socks)

    @staticmethod
    def _stamped(topic):
        def make(i, now_ns):
            t = b"T%019d#%010d " % (now_ns, i)
            return mqtt_publish(topic, t + b"x" * (TEXT_LEN - len(t)))

        return make

    def pairs(self, p):
        topics = [b"u/%08d" % k for k in range(p)]
        receivers = self._subscribers([b"r%08d" % k for k in range(p)], topics)
        senders = self._publishers([b"s%08d" % k for k in range(p)])
        self.rx = len(mqtt_publish(topics[0], text(0)))
        return [
            (s, r, lambda i, t=topics[k]: mqtt_publish(t, text(i)), self._stamped(topics[k]))
            for k, (s, r) in enumerate(zip(senders, receivers, strict=True))
        ]

    def idle_prepare(self, c):
        return None

    def idle(self, c, prepared):
        return self._subscribers([b"c%08d" % k for k in range(c)], [b"u/%08d" % k for k in range(c)])

    def group(self, k):
        topic = b"g/00000001"
        members = self._subscribers([b"m%08d" % j for j in range(k - 1)], [topic] * (k - 1))
        (sender,) = self._publishers([b"gsender"])
        self.rx = len(mqtt_publish(topic, text(0)))
        return sender, members, lambda i: mqtt_publish(topic, text(i))

    def offline(self, n):
        topic, marker = b"u/offline", b"u/marker"
        (r,) = self._subscribers([b"offline"], [topic], clean=False)
        send_all(r, MQTT_DISCONNECT, time.monotonic() + 5)
        r.close()
        self._socks.remove(r)
        time.sleep(0.2)
        (m,) = self._subscribers([b"marker"], [marker])
        (s,) = self._publishers([b"osender"])
        block = b"".join(mqtt_publish(topic, text(i)) for i in range(n))
        deadline = time.monotonic() + 600
        send_all(s, block + mqtt_publish(marker, text(n)), deadline)
        exchange([m], b"", len(mqtt_publish(marker, text(n))), timeout=600)
        (r,) = dial(self.port, 1)
        self._keep([r])
        self.rx = len(mqtt_publish(topic, text(0)))
        return r, mqtt_connect(b"offline", clean=False), 4 + self.rx * n, s


# -- ngircd (IRC PRIVMSG) ---------------------------------------------------------


class Ngircd(System):
    name = "ngircd"
    label = "ngircd (IRC)"
    rx = LINES
    offline_ok = False
    batch = 10  # ngircd listens with a backlog of 10

    def _launch(self):
        conf = self.workdir / "ngircd.conf"
        conf.write_text(
            "[Global]\n"
            "Name = bench.invalid\n"
            "Info = chatproto benchmark\n"
            f"Ports = {self.port}\n"
            "Listen = 127.0.0.1\n"
            "MotdPhrase = bench\n"
            f"PidFile = {self.workdir / 'ngircd.pid'}\n"
            "[Limits]\n"
            "MaxConnections = 0\n"
            "MaxConnectionsIP = 0\n"
            "MaxJoins = 0\n"
            "MaxPenaltyTime = 0\n"
            "PingTimeout = 3600\n"
            "PongTimeout = 3600\n"
            "[Options]\n"
            "DNS = no\n"
            "Ident = no\n"
            "PAM = no\n"
        )
        exe = shutil.which("ngircd") or "/usr/sbin/ngircd"
        return Server([exe, "-n", "-f", str(conf)], self.port, self.workdir, self.core)

    def _users(self, nicks: list[bytes]):
        def hello(i):
            n = nicks[i]
            return b"NICK " + n + b"\r\nUSER " + n + b" 0 * :bench\r\nPING :sync\r\n"

        socks, got = open_clients(self.port, len(nicks), hello, b"sync\r\n", batch=self.batch)
        return self._keep(socks)

    @staticmethod
    def _stamped(nick):
        def make(i, now_ns):
            t = b"T%019d#%010d " % (now_ns, i)
            return b"PRIVMSG " + nick + b" :" + t + b"x" * (TEXT_LEN - len(t)) + b"\r\n"

        return make

    def pairs(self, p):
        nicks = [b"r%05d" % k for k in range(p)]
        receivers = self._users(nicks)
        senders = self._users([b"s%05d" % k for k in range(p)])
        return [
            (s, r, lambda i, n=nicks[k]: b"PRIVMSG " + n + b" :" + text(i) + b"\r\n", self._stamped(nicks[k]))
            for k, (s, r) in enumerate(zip(senders, receivers, strict=True))
        ]

    def idle_prepare(self, c):
        return None

    def idle(self, c, prepared):
        return self._users([b"c%05d" % k for k in range(c)])

    def group(self, k):
        socks = self._users([b"g%05d" % j for j in range(k)])
        exchange(socks, b"JOIN #g\r\n", b" 366 ", timeout=60)
        # Later joins were announced to earlier members: read up to a fresh
        # PONG so that each stream holds nothing but the messages to come.
        exchange(socks, b"PING :sync2\r\n", b"sync2\r\n", timeout=60)
        return socks[0], socks[1:], lambda i: b"PRIVMSG #g :" + text(i) + b"\r\n"


SYSTEMS = {
    "chatproto": Chat,
    "chatproto-pg": ChatPostgres,
    "chatproto-pg2": ChatPostgres2,
    "mosquitto": Mosquitto,
    "ngircd": Ngircd,
    "relay": TwistedRelay,
}
