"""One connection: bytes in, frames checked field by field, handed to the hub."""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from . import wire
from .hub import Hub

_MEMBER_AT = wire.GROUP_HEADER_LEN
_NO_FRAME = b"00"
#: Store operations waiting past which clients are read no further for now.
_STORE_BACKLOG = 4000  # REF of an error that answers no frame (a refused connection)


@dataclass
class Limits:
    """What one connection may cost the server; 0 turns a limit off."""

    #: Frames per second a connection may send, sustained.
    frame_rate: float = 2000.0
    #: Frames a connection may send in a burst above the rate.
    frame_burst: float = 10000.0
    #: Open connections; one more is told 12 00 11 and closed.
    max_connections: int = 20000
    #: Seconds a connection may stay without logging in (03 or 15).
    login_timeout: float = 60.0
    #: Unread bytes past which a reader is dropped; past half of it, what is
    #: for that reader waits in the store instead of in memory.
    max_buffer: int = 4 << 20


@implementer(IPushProducer)
class ChatProtocol(Protocol):
    """One connection. It registers itself with its transport as a producer,
    so the transport tells it when the reader falls behind."""

    log = Logger()

    def __init__(self, hub: Hub, clock, limits: Limits):
        self.hub = hub
        self.clock = clock
        self.limits = limits
        self.user: bytes | None = None
        self.secret_session = False
        self.ready = False
        self.congested = False
        self.flush = None
        self._buffer = b""
        self._closing = False
        self._refused = False
        self.paused = False
        self._throttled = False
        self._refused_frames = 0
        self._limit_logged = 0.0
        self._backlog = 0
        self._tokens = limits.frame_burst
        self._refilled = 0.0
        self._login_timer = None

    # -- what the hub calls ----------------------------------------------

    def emit(self, frame: bytes) -> None:
        if self._closing:
            return
        if self.paused:
            self._backlog += len(frame)
            cap = self.limits.max_buffer
            if cap > 0 and self._backlog > cap // 2:
                if self._backlog > cap:
                    self.log.warn(
                        "dropping {user}: {bytes} bytes unread", user=self._who(), bytes=self._backlog
                    )
                    self._closing = True
                    self.transport.abortConnection()
                    self.hub.logout(self)
                    return
                if not self.congested:
                    self.hub.congested(self)
        self.transport.write(frame)

    def close_with(self, frame: bytes) -> None:
        self.transport.write(frame)
        self._closing = True
        self.transport.loseConnection()

    # -- transport events ------------------------------------------------

    def connectionMade(self):
        self.log.info("connection from {peer}", peer=_describe(self.transport.getPeer()))
        self.transport.registerProducer(self, True)
        self._refilled = self.clock.seconds()
        if self.limits.login_timeout > 0:
            self._login_timer = self.clock.callLater(self.limits.login_timeout, self._login_expired)

    def connectionLost(self, reason):
        if self.factory is not None:
            self.factory.connections -= 1
        self._closing = True
        self._cancel_login_timer()
        self.hub.logout(self)
        self.log.info("connection from {peer} closed", peer=_describe(self.transport.getPeer()))

    def _cancel_login_timer(self):
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        self._login_timer = None

    def _login_expired(self):
        self._login_timer = None
        if self.user is None:
            self.log.info("closing {peer}: no login", peer=_describe(self.transport.getPeer()))
            self._closing = True
            self.transport.loseConnection()

    # IPushProducer: the transport says when its reader falls behind. A short
    # pause costs nothing; past half the cap of unread bytes, what is for
    # this reader waits in the store; past the cap, the reader is dropped.

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        self._throttled = False
        self._backlog = 0
        self.hub.drained(self)

    def stopProducing(self):
        pass

    def dataReceived(self, data: bytes):
        if self._closing or self._refused:
            return
        if self._buffer:
            data = self._buffer + data
        frames, self._buffer, status = wire.split_frames(wire.CLIENT_FRAME_LEN, data)
        handlers = self._handlers
        limited = self.limits.frame_rate > 0
        if limited:
            now = self.clock.seconds()
            self._tokens = min(
                self.limits.frame_burst, self._tokens + (now - self._refilled) * self.limits.frame_rate
            )
            self._refilled = now
        for frame in frames:
            if limited:
                if self._tokens < 1:
                    self._refused_frames += 1
                    self.transport.write(wire.error(frame[:2], wire.RATE_LIMITED))
                    continue
                self._tokens -= 1
            handlers[frame[:2]](self, frame)
            if self._closing:
                return
        if self._refused_frames and self.clock.seconds() - self._limit_logged >= 1:
            # One line a second at most: a flood must not become a log flood.
            self.log.info(
                "rate limit: refused {count} frames from {user}", count=self._refused_frames, user=self._who()
            )
            self._refused_frames = 0
            self._limit_logged = self.clock.seconds()
        if self.hub.store.backlog > _STORE_BACKLOG and not self._throttled:
            # The store is behind: stop reading from this client until it
            # catches up, rather than queue its frames without bound.
            self._throttled = True
            self.transport.pauseProducing()
            self.hub.store.caught_up().addCallback(self._unthrottle)
        if status == -1:
            self._refuse(self._buffer[:2], wire.UNKNOWN_CODE)
        elif status == -2:
            # A 10 whose N is not two digits: its length is unknowable.
            self._refuse(wire.CREATE_GROUP, wire.MALFORMED)

    def _unthrottle(self, _):
        self._throttled = False
        if not self._closing:
            self.transport.resumeProducing()

    def _refuse(self, ref: bytes, reason: bytes) -> None:
        """The stream can no longer be framed: say why and close."""
        self.log.info(
            "closing {peer}: cannot frame the stream (code {code!r})",
            peer=_describe(self.transport.getPeer()),
            code=ref,
        )
        self._buffer = b""
        self._refused = True
        # Answers to the frames before this one (a 02 waits for its commit)
        # go out first: everything submitted before the barrier is committed
        # when it fires.
        self.hub.store.barrier().addCallback(lambda _: self.close_with(wire.error(ref, reason)))

    def error(self, ref: bytes, reason: bytes) -> None:
        self.log.info(
            "error {reason} for a {ref} from {user}",
            reason=reason.decode(),
            ref=ref.decode("latin-1"),
            user=self._who(),
        )
        self.transport.write(wire.error(ref, reason))

    def _who(self) -> str:
        return self.user.decode() if self.user else _describe(self.transport.getPeer())

    # -- frames ----------------------------------------------------------

    def _register(self, frame):
        self.hub.register(self, with_secret=False)

    def _register_secret(self, frame):
        self.hub.register(self, with_secret=True)

    def _online(self, frame):
        user = frame[2:15]
        if not wire.is_id(user):
            return self.error(wire.ONLINE, wire.MALFORMED)
        self.hub.login(self, user, None, wire.ONLINE)
        if self.user is not None:
            self._cancel_login_timer()

    def _online_secret(self, frame):
        user, secret = frame[2:15], frame[15:47]
        if not (wire.is_id(user) and wire.is_secret(secret)):
            return self.error(wire.ONLINE_SECRET, wire.MALFORMED)
        self.hub.login(self, user, secret, wire.ONLINE_SECRET)
        if self.user is not None:
            self._cancel_login_timer()

    def _send(self, frame):
        src, dst, ts = frame[2:15], frame[15:28], frame[28:38]
        text = wire.unpad_text(frame[38:])
        if text is None or not (src.isdigit() and dst.isdigit() and ts.isdigit()):
            return self.error(wire.SEND, wire.MALFORMED)
        if self.user is None:
            return self.error(wire.SEND, wire.NOT_ONLINE)
        if src != self.user:
            return self.error(wire.SEND, wire.WRONG_SRC)
        self.hub.send(self, src, dst, ts, text, wire.MESSAGE + frame[2:])

    def _seen(self, frame):
        peer, ts = frame[2:15], frame[15:25]
        if not (peer.isdigit() and ts.isdigit()):
            return self.error(wire.SEEN, wire.MALFORMED)
        if self.user is None:
            return self.error(wire.SEEN, wire.NOT_ONLINE)
        self.hub.seen(self, peer, ts)

    def _create_group(self, frame):
        src, ts, count = frame[2:15], frame[15:25], int(frame[25:27])
        if count == 0 or len(frame) != _MEMBER_AT + wire.ID_LEN * count:
            return self.error(wire.CREATE_GROUP, wire.MALFORMED)
        members = [frame[at : at + wire.ID_LEN] for at in range(_MEMBER_AT, len(frame), wire.ID_LEN)]
        if not (wire.is_id(src) and wire.is_timestamp(ts) and all(map(wire.is_id, members))):
            return self.error(wire.CREATE_GROUP, wire.MALFORMED)
        if self.user is None:
            return self.error(wire.CREATE_GROUP, wire.NOT_ONLINE)
        if src != self.user:
            return self.error(wire.CREATE_GROUP, wire.WRONG_SRC)
        self.hub.create_group(self, ts, members)

    def _received(self, frame):
        src, dst, ts = frame[2:15], frame[15:28], frame[28:38]
        if not (src.isdigit() and dst.isdigit() and ts.isdigit()):
            return self.error(wire.RECEIVED, wire.MALFORMED)
        if self.user is not None:
            self.hub.received(self, src, dst, ts)

    _handlers = {
        wire.REGISTER: _register,
        wire.ONLINE: _online,
        wire.SEND: _send,
        wire.SEEN: _seen,
        wire.CREATE_GROUP: _create_group,
        wire.REGISTER_SECRET: _register_secret,
        wire.ONLINE_SECRET: _online_secret,
        wire.RECEIVED: _received,
    }


class _Refused(Protocol):
    """Answers a connection over the cap with 12 00 11 and hangs up."""

    def connectionMade(self):
        self.transport.write(wire.error(_NO_FRAME, wire.BUSY))
        self.transport.loseConnection()


class ChatFactory(Factory):
    noisy = False
    log = Logger()

    def __init__(self, hub: Hub, clock, limits: Limits | None = None):
        self.hub = hub
        self.clock = clock
        self.limits = limits or Limits()
        self.connections = 0

    def buildProtocol(self, addr):
        if 0 < self.limits.max_connections <= self.connections:
            self.log.warn(
                "refusing {peer}: {count} connections open", peer=_describe(addr), count=self.connections
            )
            return _Refused()
        self.connections += 1
        protocol = ChatProtocol(self.hub, self.clock, self.limits)
        protocol.factory = self
        return protocol


def _describe(address) -> str:
    host = getattr(address, "host", None)
    if host is None:
        return getattr(address, "name", None) or str(address)
    return f"{host}:{address.port}"
