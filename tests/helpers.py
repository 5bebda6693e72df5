"""Test doubles shared by the server tests: the domain on fake transports, and a
reactor that lets the SQLite store's database thread be driven step by step.

Frames are spelled out here from the contract's table, not taken from
``chatproto.wire``, so that a wrong width in the server is caught rather
than shared.
"""

from __future__ import annotations

import queue
from itertools import count

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from chatproto.cork import Cork
from chatproto.domain import Domain, LocalRouting
from chatproto.server import ChatFactory
from chatproto.store import DEFAULT_RETENTION
from chatproto.store.memory import MemoryStore
from chatproto.store.sqlite import SQLiteStore

#: Length of every server-to-client frame, from the contract (11 grows by 13 per member).
SERVER_FRAME_LEN = {
    b"02": 15,
    b"04": 15,
    b"06": 256,
    b"07": 25,
    b"09": 25,
    b"11": 27,
    b"12": 6,
    b"14": 47,
    b"18": 102,
    b"21": 25,
}
CLIENT_CODES = (b"01", b"03", b"05", b"08", b"10", b"13", b"15", b"16", b"17", b"19", b"20")
SERVER_CODES = tuple(SERVER_FRAME_LEN)


def ts(n: int) -> bytes:
    return b"%010d" % n


def pad(text: bytes) -> bytes:
    assert len(text) <= 218
    return text + b"\0" * (218 - len(text))


# Client frames, byte for byte.


def f_online(user: bytes) -> bytes:
    return b"03" + user


def f_online_secret(user: bytes, secret: bytes) -> bytes:
    return b"15" + user + secret


def f_send(src: bytes, dst: bytes, when: bytes, text: bytes) -> bytes:
    return b"05" + src + dst + when + pad(text)


def f_seen(peer: bytes, when: bytes) -> bytes:
    return b"08" + peer + when


def f_group(src: bytes, when: bytes, members: list[bytes]) -> bytes:
    return b"10" + src + when + b"%02d" % len(members) + b"".join(members)


def f_received(src: bytes, dst: bytes, when: bytes) -> bytes:
    return b"16" + src + dst + when


def name_field(name: bytes) -> bytes:
    """A NAME field: 64 bytes, NUL-padded."""
    assert len(name) <= 64
    return name + b"\0" * (64 - len(name))


def f_subject(src: bytes, group: bytes, when: bytes, name: bytes) -> bytes:
    return b"17" + src + group + when + name_field(name)


def f_add(src: bytes, group: bytes, when: bytes, members: list[bytes]) -> bytes:
    return b"19" + src + group + when + b"%02d" % len(members) + b"".join(members)


def f_leave(src: bytes, group: bytes, when: bytes) -> bytes:
    return b"20" + src + group + when


# Server frames, byte for byte.


def s_message(src: bytes, dst: bytes, when: bytes, text: bytes) -> bytes:
    return b"06" + src + dst + when + pad(text)


def s_delivered(dst: bytes, when: bytes) -> bytes:
    return b"07" + dst + when


def s_seen_by(src: bytes, when: bytes) -> bytes:
    return b"09" + src + when


def s_added(group: bytes, when: bytes, members: list[bytes]) -> bytes:
    return b"11" + group + when + b"%02d" % len(members) + b"".join(members)


def s_error(ref: bytes, reason: bytes) -> bytes:
    return b"12" + ref + reason


def s_subject(group: bytes, src: bytes, when: bytes, name: bytes) -> bytes:
    return b"18" + group + src + when + name_field(name)


def s_left(group: bytes, when: bytes) -> bytes:
    return b"21" + group + when


def parse_server(data: bytes) -> list[bytes]:
    """Split a server's output into frames; anything unframeable fails the test."""
    frames = []
    at = 0
    while at < len(data):
        code = data[at : at + 2]
        assert code in SERVER_FRAME_LEN, f"server wrote an unknown code {code!r} at {at}: {data!r}"
        length = SERVER_FRAME_LEN[code]
        if code == b"11":
            n = data[at + 25 : at + 27]
            assert n.isdigit() and 1 <= int(n) <= 99, f"bad N in an 11: {data[at:]!r}"
            length += 13 * int(n)
        assert at + length <= len(data), f"server wrote half a frame: {data[at:]!r}"
        frames.append(data[at : at + length])
        at += length
    return frames


class ThreadedClock(MemoryReactorClock):
    """A MemoryReactorClock whose ``callFromThread`` hands work to the test.

    The SQLite store runs its transactions on a real database thread; their
    results come back through ``callFromThread``, which here only queues them,
    so the test decides when (and whether) the reactor thread sees them.
    """

    def __init__(self):
        super().__init__()
        self.from_threads: queue.Queue = queue.Queue()

    def callFromThread(self, f, *args, **kwargs):
        self.from_threads.put((f, args, kwargs))


class RecordingStore:
    """Wraps a store to remember every Deferred it hands out.

    Lets a test wait until the store is idle, and fail when a callback chain
    in the domain ends in an error that would otherwise vanish.
    """

    def __init__(self, store):
        self.inner = store
        self.deferreds: list = []

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args, answer=None, **kwargs):
            if answer is None:
                d = attr(*args, **kwargs)
            else:
                # A Deferred is an answer too: the domain's handlers run on it,
                # so an error in them is kept for failures() to report.
                d = Deferred()
                d.addCallbacks(
                    answer.ok, answer.failed, callbackArgs=answer.ok_args, errbackArgs=answer.failed_args
                )
                attr(*args, answer=d, **kwargs)
            self.deferreds.append(d)
            return d

        return call

    def idle(self) -> bool:
        return all(d.called for d in self.deferreds)

    def failures(self) -> list[Failure]:
        found = []
        for d in self.deferreds:
            if d.called and isinstance(d.result, Failure):
                found.append(d.result)
                d.addErrback(lambda _: None)  # reported by the test, not at GC
        return found


class Net:
    """The domain with its store, and connections to it on fake transports.

    ``kind`` is "memory" (the MemoryStore, which fires at once) or "sqlite"
    (a real SQLite file whose thread the test drives through ``settle``).
    """

    def __init__(
        self,
        kind: str = "memory",
        path: str | None = None,
        require_secrets: bool = False,
        max_held: int = 0,
        on_commit=None,
        routing=LocalRouting,
        memory=None,
        busy_timeout_ms: int | None = None,
        retention=DEFAULT_RETENTION,
    ):
        self.kind = kind
        self.retention = retention
        self.busy_timeout_ms = busy_timeout_ms
        self.routing = routing
        self.max_held = max_held
        self.on_commit = on_commit
        self.path = path
        self.require_secrets = require_secrets
        self.reactor = ThreadedClock()
        self._ports = count(40000)
        self.conns: list[Conn] = []
        self._memory = (memory or MemoryStore(retention)) if kind == "memory" else None
        self._old_stores: list[RecordingStore] = []
        self._late: list = []
        self._start()

    def _start(self):
        # The cork goes to the store that runs the answers, as in the server.
        self.cork = Cork()
        if self.kind == "memory":
            inner = self._memory
        else:
            inner = SQLiteStore(
                self.path,
                self.reactor,
                answering=self.cork,
                on_commit=self.on_commit,
                busy_timeout_ms=self.busy_timeout_ms,
                retention=self.retention,
            )
        self.store = RecordingStore(inner)
        self.domain = Domain(
            self.store, self.routing, require_secrets=self.require_secrets, max_held=self.max_held
        )
        self.domain.load(self.result(self.store.load()))
        self.factory = ChatFactory(self.domain, self.cork, self.reactor)

    def settle(self, limit: float = 10.0) -> None:
        """Run the reactor and the database thread until the store has nothing in flight."""
        while True:
            self.reactor.advance(0)
            if self.store.idle() and not self._due():
                return
            try:
                f, args, kwargs = self.reactor.from_threads.get(timeout=limit)
            except queue.Empty:
                raise AssertionError("the store never answered") from None
            f(*args, **kwargs)

    def _due(self) -> bool:
        now = self.reactor.seconds()
        return any(call.getTime() <= now for call in self.reactor.getDelayedCalls())

    def result(self, d):
        box = []
        d.addBoth(box.append)
        while not box:
            self.settle()
        if isinstance(box[0], Failure):
            box[0].raiseException()
        return box[0]

    def step(self) -> None:
        """Run the reactor until the store answers once, and that one answer only."""
        self.reactor.advance(0)
        f, args, kwargs = self.reactor.from_threads.get(timeout=10)
        f(*args, **kwargs)

    def connect(self, host: str = "127.0.0.1") -> Conn:
        conn = Conn(self, host)
        self.conns.append(conn)
        return conn

    def register(self, with_secret: bool = False) -> tuple[bytes, bytes | None]:
        """A new account, as a client sees it: its id (and secret)."""
        conn = self.connect()
        conn.send(b"13" if with_secret else b"01")
        (frame,) = conn.take()
        conn.lose()
        if with_secret:
            assert frame[:2] == b"14", frame
            return frame[2:15], frame[15:47]
        assert frame[:2] == b"02", frame
        return frame[2:15], None

    def online(self, user: bytes, secret: bytes | None = None) -> Conn:
        """A connection logged in as ``user``, with the 04 and the flush already read."""
        conn = self.connect()
        conn.send(f_online(user) if secret is None else f_online_secret(user, secret))
        conn.held = conn.take()
        assert conn.held[:1] == [b"04" + user], conn.held
        conn.held = conn.held[1:]
        return conn

    def restart(self, require_secrets: bool | None = None) -> None:
        """Every connection drops, the store closes, and a new domain loads it again."""
        if require_secrets is not None:
            self.require_secrets = require_secrets
        self.settle()
        for conn in self.conns:
            if not conn.lost:
                conn.lose()
        self.settle()
        self.result(self.store.close())
        self._check(self.store)
        self._start()
        self.conns = []

    def crash(self, after_commit: bool = False) -> None:
        """The process dies now: nothing more reaches the reactor thread or a client.

        With ``after_commit``, it dies just after the database thread finished
        the transaction it was running, before the reactor saw the answer.
        The old store's late answers are kept aside and run against the dead
        domain at shutdown, so its thread can be stopped.
        """
        if after_commit:
            self._late.append(self.reactor.from_threads.get(timeout=10))
        self._orphaned = self.reactor
        self._old_stores.append(self.store)
        for conn in self.conns:
            conn.dead = True
        self.reactor = ThreadedClock()
        self._start()
        self.conns = []

    def _check(self, store) -> None:
        failures = store.failures()
        assert not failures, "a store callback failed:\n" + "\n".join(f.getTraceback() for f in failures)

    def shutdown(self) -> None:
        try:
            self.settle()
            self._check(self.store)
        finally:
            if self.kind == "sqlite":
                for old in self._old_stores:
                    self._close_orphan(old)
                self.result(self.store.inner.close())

    def _close_orphan(self, old) -> None:
        reactor = self._orphaned
        for f, args, kwargs in self._late:
            f(*args, **kwargs)
        done = []
        old.inner.close().addBoth(done.append)
        while not done:
            reactor.advance(0)
            try:
                f, args, kwargs = reactor.from_threads.get(timeout=10)
            except queue.Empty:
                raise AssertionError("the crashed store's thread never finished") from None
            f(*args, **kwargs)


class WritesTransport(StringTransport):
    """A StringTransport that also keeps each ``write`` call's bytes, in ``writes``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class Conn:
    """One client connection on a StringTransport (one that counts its writes)."""

    def __init__(self, net: Net, host: str = "127.0.0.1"):
        self.net = net
        port = next(net._ports)
        self.transport = WritesTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 7000),
            peerAddress=(IPv6Address if ":" in host else IPv4Address)("TCP", host, port),
        )
        self.proto = net.factory.buildProtocol(self.transport.getPeer())
        self.proto.makeConnection(self.transport)
        self.lost = False
        self.dead = False
        self.held: list[bytes] = []

    def send(self, *frames: bytes) -> None:
        assert not self.dead, "this connection belonged to a crashed server"
        self.proto.dataReceived(b"".join(frames))

    def take(self) -> list[bytes]:
        """Everything the server wrote to this connection since the last take."""
        self.net.settle()
        data = self.transport.value()
        self.transport.clear()
        return parse_server(data)

    @property
    def closed(self) -> bool:
        """The server asked to close this connection."""
        return self.transport.disconnecting

    def lose(self) -> None:
        """The connection goes away (the client left, or the server closed it)."""
        self.lost = True
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.net.settle()


def wait(reactor: ThreadedClock, d, limit: float = 10.0):
    """The result of ``d``, running the fake reactor and the database thread until it fires."""
    box = []
    d.addBoth(box.append)
    while not box:
        reactor.advance(0)
        if box:
            break
        try:
            f, args, kwargs = reactor.from_threads.get(timeout=limit)
        except queue.Empty:
            raise AssertionError("the store never answered") from None
        f(*args, **kwargs)
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]
