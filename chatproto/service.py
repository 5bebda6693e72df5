"""``twist chat``: its options, and the service they wire together."""

from __future__ import annotations

import gc

from twisted.application.service import Service
from twisted.internet.defer import DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from .hub import Hub
from .server import ChatFactory, Limits
from .store.sqlite import SchemaError, SQLiteStore

DEFAULT_PORT = "tcp:7000"
DEFAULT_DB = "chatproto.sqlite3"
GC_THRESHOLD = 100_000


def endpoint_description(value: str) -> str:
    """A bare port number is shorthand for a TCP endpoint on every interface."""
    return f"tcp:{value}" if value.isdigit() else value


class Options(usage.Options):
    synopsis = "[--port ENDPOINT] [--db PATH] [--require-secrets]"
    longdesc = (
        "Run the chatproto server. ENDPOINT is a Twisted endpoint string "
        "(tcp:7000, tcp:7000:interface=127.0.0.1, ssl:7443:privateKey=key.pem:certKey=cert.pem, "
        "unix:/run/chat.sock) or a bare port number, shorthand for tcp:PORT."
    )
    optParameters = [
        ["port", "p", DEFAULT_PORT, "Where to listen: an endpoint string, or a bare port number."],
        [
            "db",
            "d",
            DEFAULT_DB,
            "SQLite database file, created if missing; ':memory:' keeps nothing after exit.",
        ],
        [
            "max-frame-rate",
            None,
            Limits.frame_rate,
            "Frames per second one connection may send (0: no limit).",
            float,
        ],
        ["frame-burst", None, Limits.frame_burst, "Frames one connection may send in a burst.", float],
        ["max-connections", None, Limits.max_connections, "Open connections at most (0: no limit).", int],
        [
            "login-timeout",
            None,
            Limits.login_timeout,
            "Seconds a connection may wait before logging in.",
            float,
        ],
        [
            "max-buffer",
            None,
            Limits.max_buffer,
            "Bytes written to a client that stopped reading before it is dropped.",
            int,
        ],
    ]
    optFlags = [
        [
            "require-secrets",
            "s",
            "Refuse 01 and 03: every account is made with 13 and logs in with 15 and its secret.",
        ],
    ]

    def postOptions(self):
        self["port"] = endpoint_description(self["port"])


class ChatService(Service):
    """Opens the store, loads it into the hub, and only then listens."""

    log = Logger()

    def __init__(self, reactor, endpoint, store, hub, limits):
        self._reactor = reactor
        self._endpoint = endpoint
        self.store = store
        self.hub = hub
        self.factory = ChatFactory(hub, reactor, limits)
        self.port = None

    def startService(self):
        super().startService()
        d = self.store.load()
        d.addCallback(self.hub.load)
        d.addCallback(lambda _: _tune_garbage_collector())
        d.addCallback(lambda _: self._endpoint.listen(self.factory))
        d.addCallback(self._listening)
        d.addErrback(self._failed)
        return d

    def _listening(self, port):
        self.port = port
        self.log.info("chatproto listening on {address}", address=port.getHost())

    def _failed(self, failure):
        self.log.failure("chatproto could not start", failure)
        self._reactor.stop()

    def stopService(self):
        super().stopService()
        closing = [maybeDeferred(self.port.stopListening)] if self.port else []
        for session in list(self.hub.sessions.values()):
            session.transport.loseConnection()
        d = DeferredList(closing)
        d.addCallback(lambda _: self.store.close())
        d.addCallback(lambda _: self.log.info("chatproto stopped; the store is closed"))
        return d


def _tune_garbage_collector():
    """Each message allocates a few short-lived objects (a Deferred, tuples);
    with the default threshold the cyclic collector ran every few hundred
    messages and took most of the server's time (bench/profile.txt). What was
    loaded at start-up lives for good, so it is frozen out of every pass."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 50, 100)


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    try:
        store = SQLiteStore(options["db"], reactor)
    except SchemaError as e:
        # Said in one line, not a traceback: the operator has a decision to make.
        raise SystemExit(f"chatproto: {e}") from None
    hub = Hub(store, require_secrets=bool(options["require-secrets"]))
    endpoint = serverFromString(reactor, options["port"])
    limits = Limits(
        frame_rate=options["max-frame-rate"],
        frame_burst=options["frame-burst"],
        max_connections=options["max-connections"],
        login_timeout=options["login-timeout"],
        max_buffer=options["max-buffer"],
    )
    return ChatService(reactor, endpoint, store, hub, limits)
