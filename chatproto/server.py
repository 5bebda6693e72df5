"""One connection: bytes in, frames checked field by field, handed to the hub."""

from __future__ import annotations

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from . import wire
from .hub import Hub

_MEMBER_AT = wire.GROUP_HEADER_LEN


class ChatProtocol(Protocol):
    log = Logger()

    def __init__(self, hub: Hub):
        self.hub = hub
        self.user: bytes | None = None
        self.secret_session = False
        self.ready = False
        self.pending: list | None = None
        self._buffer = b""
        self._closing = False

    # -- what the hub calls ----------------------------------------------

    def emit(self, frame: bytes) -> None:
        self.transport.write(frame)

    def close_with(self, frame: bytes) -> None:
        self.transport.write(frame)
        self._closing = True
        self.transport.loseConnection()

    # -- transport events ------------------------------------------------

    def connectionMade(self):
        self.log.info("connection from {peer}", peer=_describe(self.transport.getPeer()))

    def connectionLost(self, reason):
        self.hub.logout(self)
        self.log.info("connection from {peer} closed", peer=_describe(self.transport.getPeer()))

    def dataReceived(self, data: bytes):
        if self._closing:
            return
        if self._buffer:
            data = self._buffer + data
        frames, self._buffer, status = wire.split_frames(wire.CLIENT_FRAME_LEN, data)
        handlers = self._handlers
        for frame in frames:
            handlers[frame[:2]](self, frame)
            if self._closing:
                return
        if status == -1:
            self._refuse(self._buffer[:2], wire.UNKNOWN_CODE)
        elif status == -2:
            # A 10 whose N is not two digits: its length is unknowable.
            self._refuse(wire.CREATE_GROUP, wire.MALFORMED)

    def _refuse(self, ref: bytes, reason: bytes) -> None:
        """The stream can no longer be framed: say why and close."""
        self.log.info(
            "closing {peer}: cannot frame the stream (code {code!r})",
            peer=_describe(self.transport.getPeer()),
            code=ref,
        )
        self._buffer = b""
        self.close_with(wire.error(ref, reason))

    def error(self, ref: bytes, reason: bytes) -> None:
        self.log.info(
            "error {reason} for a {ref} from {user}",
            reason=reason.decode(),
            ref=ref.decode(),
            user=self.user.decode() if self.user else "a connection not logged in",
        )
        self.transport.write(wire.error(ref, reason))

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

    def _online_secret(self, frame):
        user, secret = frame[2:15], frame[15:47]
        if not (wire.is_id(user) and wire.is_secret(secret)):
            return self.error(wire.ONLINE_SECRET, wire.MALFORMED)
        self.hub.login(self, user, secret, wire.ONLINE_SECRET)

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


class ChatFactory(Factory):
    noisy = False

    def __init__(self, hub: Hub):
        self.hub = hub

    def buildProtocol(self, addr):
        return ChatProtocol(self.hub)


def _describe(address) -> str:
    host = getattr(address, "host", None)
    if host is None:
        return getattr(address, "name", None) or str(address)
    return f"{host}:{address.port}"
