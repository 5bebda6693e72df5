"""One connection: bytes in, frames checked field by field, handed to the domain."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper
from zope.interface import implementer

from . import keepalive, wire
from .admission import CONNECTIONS_REFUSED, ERRORS, FRAMES_REFUSED, QUOTAS, Admission, Peer
from .cork import Cork
from .domain import Domain, IConnection

_NO_FRAME = b"00"  # REF of an error that answers no frame (a refused connection)
#: Store operations waiting past which clients are read no further for now.
_STORE_BACKLOG = 4000
#: Store operations waiting past which a new connection is answered 12 00 11.
_ACCEPT_BACKLOG = 2 * _STORE_BACKLOG
#: Frames a connection may have handed to the store before the first of them
#: is committed: past it, its next frames wait for that commit. Checked as each
#: frame is taken, so one read of 64 KiB of 01s queues no more than this. At
#: 1000, the bench's 100 pairs fell from about 300,000 msg/s to 140,000 (each
#: sender waited on commits); at 5000 they are within the noise of without.
_WINDOW = 5000
_LOGINS = (wire.ONLINE, wire.ONLINE_SECRET)
#: Refusals of a login that count as failed: no such user, or the wrong secret.
_LOGIN_FAILURES = (wire.UNKNOWN_USER, wire.SECRET_REQUIRED)
#: Bytes a stalled connection may send before it is read no further for now.
_STALL_BUFFER = 64 * 1024
#: Seconds between two looks at the connections a shutdown waits to close.
LINGER_POLL = 0.01


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


class Stats:
    """What the server counts for its metrics, as plain ints in dicts.

    Each frame costs one dict increment here; turning these into Prometheus
    samples happens at scrape time (chatproto.metrics), not per frame.
    Every known code and reason starts at 0, so a series exists before its
    first event and an increment never needs a default.
    """

    __slots__ = ("received", "sent", "errors")

    def __init__(self):
        #: Frames read from clients, by code (including those refused by the rate limit).
        self.received: dict[bytes, int] = dict.fromkeys(wire.CLIENT_FRAME_LEN, 0)
        #: Frames handed to a transport, by code: each frame of a flush page counts.
        self.sent: dict[bytes, int] = dict.fromkeys(wire.SERVER_FRAME_LEN, 0)
        #: 12 frames sent, by reason.
        self.errors: dict[bytes, int] = dict.fromkeys(wire.REASON_TEXT, 0)

    def error(self, reason: bytes) -> None:
        self.errors[reason] += 1
        self.sent[wire.ERROR] += 1


@implementer(IPushProducer, IHalfCloseableProtocol, IConnection)
class ChatProtocol(Protocol):
    """One connection: bytes, framing and its own limits. It registers itself
    with its transport as a producer, so the transport tells it when the
    reader falls behind; everything about its user is its domain session's."""

    log = Logger()

    def __init__(
        self,
        domain: Domain,
        cork: Cork,
        clock,
        limits: Limits,
        stats: Stats | None = None,
        admission: Admission | None = None,
    ):
        self.domain = domain
        self.cork = cork
        self.clock = clock
        self.limits = limits
        self.stats = stats if stats is not None else Stats()
        self.admission = admission if admission is not None else Admission(clock)
        #: The address this connection counts against, once admitted (at
        #: connectionMade; behind a PROXY header, with its first bytes).
        self.peer: Peer | None = None
        #: The peer, when it is not trusted: per-address limits apply.
        self._limited: Peer | None = None
        self._received = self.stats.received
        self._sent = self.stats.sent
        self.session = domain.open(self)
        #: The 05s of the frames being read, for the domain in one call.
        self._sends: list[tuple] = []
        #: Frames waiting for the cork to be taken out (see _write).
        self._unwritten: list[bytes] | None = None
        self._buffer = b""
        self._closing = False
        self._refused = False
        #: The transport asked us to stop writing for now (IConnection.paused).
        self.paused = False
        self._throttled = False
        #: Stalls not yet over (see stall): frames wait while any is.
        self._stalled = 0
        #: Frames taken since the last window's barrier, and that barrier.
        self._taken = 0
        self._window: Deferred | None = None
        self._backlog = 0
        self._tokens = limits.frame_burst
        self._refilled = 0.0
        self._login_timer = None

    # -- IConnection: what the domain calls ------------------------------

    def write(self, frame: bytes) -> bool:
        if self._closing:
            return False
        if self.paused and self._overflowed(len(frame)):
            return False
        self._sent[frame[:2]] += 1
        self._write(frame)
        return True

    def write_many(self, frames: list[bytes], code: bytes | None = None) -> bool:
        """Several frames in one write (a flush page); each counts by its code."""
        if self._closing:
            return False
        data = b"".join(frames)
        if self.paused and self._overflowed(len(data)):
            return False
        sent = self._sent
        if code is not None:
            sent[code] += len(frames)
        else:
            for frame in frames:
                sent[frame[:2]] += 1
        self._write(data)
        return True

    def _write(self, data: bytes) -> None:
        """Every frame to this client goes through here, so they stay in order.

        While the cork is in (a read's frames, a commit's answers), they
        wait in a list and go out as one write per connection when it
        ends: a read of a few hundred 05s costs the reader one write, not a
        few hundred.
        """
        cork = self.cork
        if cork.depth:
            if self._unwritten is None:
                self._unwritten = [data]
                cork.waiting.append(self)
            else:
                self._unwritten.append(data)
        else:
            self.transport.write(data)

    def uncork(self) -> None:
        """Write what waited for the cork (see _write)."""
        unwritten, self._unwritten = self._unwritten, None
        if unwritten:
            _write_now(self.transport, b"".join(unwritten))

    def _overflowed(self, size: int) -> bool:
        """The reader is behind by ``size`` more bytes: past half the cap, hold
        what is for it in the store; past the cap, drop it (True)."""
        self._backlog += size
        cap = self.limits.max_buffer
        if cap > 0 and self._backlog > cap // 2:
            if self._backlog > cap:
                self.log.warn("dropping {user}: {bytes} bytes unread", user=self._who(), bytes=self._backlog)
                self._closing = True
                self.transport.abortConnection()
                self.domain.logout(self.session, closed=True)
                return True
            self.domain.behind(self.session)
        return False

    def close_with(self, frame: bytes) -> None:
        if frame[:2] == wire.ERROR:
            self.stats.errors[wire.decode_error(frame).reason] += 1
        self._sent[frame[:2]] += 1
        self._write(frame)
        self.uncork()
        self._closing = True
        self.transport.loseConnection()

    def stop_reading(self) -> None:
        """The server is stopping: read nothing more, answer what was read."""
        self._refused = True
        self._cancel_login_timer()
        self.transport.pauseProducing()

    def stall(self, d) -> None:
        """Frames after this one wait for ``d``. Reading goes on (up to
        _STALL_BUFFER bytes), so a close is noticed meanwhile: a login whose
        client has gone must not go on to take the user from its new one."""
        if d.called:
            return
        self._stalled += 1
        d.addBoth(self._unstall)

    def _unstall(self, result):
        self._stalled -= 1
        if self._stalled:
            return result
        if self.session.user is not None:
            self._cancel_login_timer()
        if not self._closing and not self._refused:
            self._resume_reading()
            if self._buffer and not self.paused:
                self.dataReceived(b"")
        return result

    def finish(self) -> None:
        """Close once everything written is sent.

        Closing a socket with unread input makes the kernel send a reset,
        which throws away what it still had to send: our last frames. So
        shut only our side, read and drop what the client still sends, and
        let the client's close (or the shutdown's deadline) end it.
        """
        self.uncork()
        self._closing = True
        self._refused = True
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is None:
            self.transport.loseConnection()
            return
        self.transport.resumeProducing()
        half_close()

    def writeConnectionLost(self):
        """Our side is shut (``finish``): what we wrote is with the kernel now."""
        if self.factory is not None:
            self.factory.linger(self)
        else:
            self.transport.loseConnection()

    def readConnectionLost(self):
        """The client shut its side: close ours once what we wrote is sent."""
        self._closing = True
        self.transport.loseConnection()

    @property
    def unread(self) -> int:
        """Bytes written since the transport said its reader fell behind."""
        return self._backlog

    # -- transport events ------------------------------------------------

    def connectionMade(self):
        if not _awaits_proxy_header(self.transport) and not self._admit():
            return  # refused: nothing more is spent on it
        keepalive.enable(self.transport)  # a peer whose path died is dropped within 2 minutes
        self.transport.registerProducer(self, True)
        self._refilled = self.clock.seconds()
        if self.limits.login_timeout > 0:
            self._login_timer = self.clock.callLater(self.limits.login_timeout, self._login_expired)

    def _admit(self) -> bool:
        """Count this connection against its address; refuse it (12 00 10 or
        12 00 11, then close) if the address is over its share."""
        address = self.transport.getPeer()
        peer, refusal = self.admission.admit(getattr(address, "host", None))
        if refusal is not None:
            self._refused = True
            self.close_with(wire.error(_NO_FRAME, refusal))
            return False
        self.peer = peer
        self._limited = None if peer.trusted else peer
        self.log.debug("connection from {peer}", peer=_describe(address))
        return True

    def connectionLost(self, reason):
        if self.factory is not None:
            self.factory.lost(self)
        if self.peer is not None:
            self.admission.closed(self.peer)
        self._closing = True
        self._cancel_login_timer()
        self.domain.logout(self.session, closed=True)
        self.log.debug("connection from {peer} closed", peer=_describe(self.transport.getPeer()))

    def _cancel_login_timer(self):
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        self._login_timer = None

    def _login_expired(self):
        self._login_timer = None
        if self.session.user is None:
            self.log.info("closing {peer}: no login", peer=_describe(self.transport.getPeer()))
            self._closing = True
            self.transport.loseConnection()

    # IPushProducer: the transport says when its reader falls behind. A short
    # pause costs nothing; past half the cap of unread bytes, what is for
    # this reader waits in the store; past the cap, the reader is dropped.

    def pauseProducing(self):
        """What we write waits: read nothing more from this client until it
        reads, so that its own answers cannot pile up here."""
        self.paused = True
        if not (self._closing or self._refused):
            self.transport.pauseProducing()

    def resumeProducing(self):
        self.paused = False
        self._backlog = 0
        self.domain.drained(self.session)
        if not (self._closing or self._refused):
            self._resume_reading()
            if self._buffer and not self._stalled:
                self.dataReceived(b"")

    def stopProducing(self):
        pass

    def dataReceived(self, data: bytes):
        with self.cork:
            self._read(data)

    def _read(self, data: bytes):
        if self._closing or self._refused:
            return
        if self.peer is None and not self._admit():
            return  # behind a PROXY header, the address is known only now
        if self._stalled:
            self._buffer += data
            if len(self._buffer) > _STALL_BUFFER:
                self.transport.pauseProducing()
            return
        if self._buffer:
            data = self._buffer + data
        now = self.clock.seconds()
        peer = self._limited
        admission = self.admission
        # An address over its budget: frame only what it may send now, so that
        # the rest of a large buffer is not cut into frames at every pause.
        limit = None if peer is None else admission.frames_now(peer, now)
        frames, self._buffer, status = wire.split_frames(wire.CLIENT_FRAME_LEN, data, limit)
        handlers = self._handlers
        limited = self.limits.frame_rate > 0
        if limited:
            self._tokens = min(
                self.limits.frame_burst, self._tokens + (now - self._refilled) * self.limits.frame_rate
            )
            self._refilled = now
        received = self._received
        sends = self._sends
        send = wire.SEND
        for at, frame in enumerate(frames):
            code = frame[:2]
            if peer is not None and code in _LOGINS:
                wait = admission.login_wait(peer)
                if wait > 0:
                    # After failed logins from this address, a login waits its turn.
                    self._wait_then_read(wait, frames[at:])
                    return
            received[code] += 1
            if limited:
                if self._tokens < 1:
                    admission.count(self.peer, FRAMES_REFUSED)
                    self.error(code, wire.RATE_LIMITED)
                    continue
                self._tokens -= 1
            if peer is not None:
                if not admission.frame_allowed(peer, now):
                    # Refused, and the address's connection is read no further
                    # until its budget refills: the frames after this one wait
                    # (not refused), so a flood costs a refusal per pause, not
                    # one per frame it can push.
                    self.error(code, wire.RATE_LIMITED)
                    self._wait_then_read(admission.refill_wait(peer), frames[at + 1 :])
                    return
                quota = QUOTAS.get(code)
                if quota is not None and not admission.spend(quota, peer, self.session.user):
                    self.error(code, wire.RATE_LIMITED)
                    continue
            if code != send and sends:
                # The 05s before this frame are handled before it.
                self._send_collected()
                if self._stalled:
                    self._keep(frames[at:])
                    return
            handlers[code](self, frame)
            if self._closing:
                return
            self._taken += 1
            if self._taken >= _WINDOW:
                self._next_window()
            if self._stalled:
                self._keep(frames[at + 1 :])
                return
        if sends:
            self._send_collected()
        if peer is not None and status == 0 and self._buffer and len(frames) == limit:
            # Framed up to its budget and not stopped: the rest on the next turn.
            self.clock.callLater(0, self.dataReceived, b"")
        if self.domain.backlog > _STORE_BACKLOG and not self._throttled:
            # The store is behind: stop reading from this client until it
            # catches up, rather than queue its frames without bound.
            self._throttled = True
            self.transport.pauseProducing()
            self.domain.store.caught_up().addCallback(self._unthrottle)
        if status == -1:
            self._refuse(self._buffer[:2], wire.UNKNOWN_CODE)
        elif status == -2:
            # A 10 or 19 whose N is not two digits: its length is unknowable.
            self._refuse(self._buffer[:2], wire.MALFORMED)

    def _next_window(self) -> None:
        """_WINDOW frames taken: a barrier marks their commit. The frames of
        the window before must be committed before more are taken, so a
        connection has at most two windows of work queued in the store."""
        if self._sends:
            self._send_collected()
        self._taken = 0
        previous, self._window = self._window, self.domain.store.barrier()
        if previous is not None:
            self.stall(previous)

    def _wait_then_read(self, seconds: float, frames: list[bytes]) -> None:
        """Frames from a login on wait ``seconds`` (stalled, as behind a commit)."""
        if self._sends:
            self._send_collected()
        self.stall(deferLater(self.clock, seconds, lambda: None))
        self._keep(frames)

    def _keep(self, frames: list[bytes]) -> None:
        """The rest of a read waits, unframed again, for the stall to end;
        past _STALL_BUFFER bytes, the client is read no further meanwhile."""
        self._buffer = b"".join(frames) + self._buffer
        if len(self._buffer) > _STALL_BUFFER:
            self.transport.pauseProducing()

    def _unthrottle(self, _):
        if self.domain.backlog > _STORE_BACKLOG:
            # Messages waiting in conversations go on as the store answers:
            # wait for its next commit, and look again.
            self.domain.store.barrier().addCallback(self._unthrottle)
            return
        self._throttled = False
        self._resume_reading()

    def _resume_reading(self) -> None:
        """Read again, unless something else still holds reading back: a stall,
        the store's backlog, a reader that is not reading what we write."""
        if not (self._closing or self._refused or self._stalled or self._throttled or self.paused):
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
        self.domain.store.barrier().addCallback(lambda _: self.close_with(wire.error(ref, reason)))

    def error(self, ref: bytes, reason: bytes) -> None:
        """A 12 for ``ref``. Not logged one by one (a flood of bad frames must
        not flood the log): counted by reason for /metrics, and per address in
        its summary (``admission``)."""
        if self._sends:
            # The 05s read before the refused frame are answered before it.
            self._send_collected()
        self.stats.error(reason)
        if self.peer is not None:
            if ref in _LOGINS and reason in _LOGIN_FAILURES:
                self.admission.login_failed(self.peer)
            elif reason != wire.RATE_LIMITED:
                self.admission.count(self.peer, ERRORS)
        frame = wire.error(ref, reason)
        if self.paused and self._overflowed(len(frame)):
            return
        self._write(frame)

    def _who(self) -> str:
        user = self.session.user
        return user.decode() if user else _describe(self.transport.getPeer())

    # -- frames: each checked field by field, then handed to the domain ----

    def _register(self, frame):
        self.domain.register(self.session, with_secret=False)

    def _register_secret(self, frame):
        self.domain.register(self.session, with_secret=True)

    def _online(self, frame):
        user = wire.decode_online(frame).user
        if not wire.is_id(user):
            return self.error(wire.ONLINE, wire.MALFORMED)
        self.domain.login(self.session, user, None, wire.ONLINE)
        if self.session.user is not None:
            self._cancel_login_timer()

    def _online_secret(self, frame):
        user, secret = wire.decode_online(frame)
        if not (wire.is_id(user) and wire.is_secret(secret)):
            return self.error(wire.ONLINE_SECRET, wire.MALFORMED)
        self.domain.login(self.session, user, secret, wire.ONLINE_SECRET)
        if self.session.user is not None:
            self._cancel_login_timer()

    def _send(self, frame):
        src, dst, ts, field = wire.decode_send(frame)
        text = wire.unpad_text(field)
        if text is None or not (src.isdigit() and dst.isdigit() and ts.isdigit()):
            return self.error(wire.SEND, wire.MALFORMED)
        user = self.session.user
        if user is None:
            return self.error(wire.SEND, wire.NOT_ONLINE)
        if src != user:
            return self.error(wire.SEND, wire.WRONG_SRC)
        # Collected, to go to the domain with the read's other 05s.
        self._sends.append((src, dst, ts, text, wire.MESSAGE + frame[2:]))

    def _send_collected(self) -> None:
        sends = self._sends[:]
        self._sends.clear()
        self.domain.send_many(self.session, sends)

    def _seen(self, frame):
        peer, ts = wire.decode_seen(frame)
        if not (peer.isdigit() and ts.isdigit()):
            return self.error(wire.SEEN, wire.MALFORMED)
        if self.session.user is None:
            return self.error(wire.SEEN, wire.NOT_ONLINE)
        self.domain.seen(self.session, peer, ts)

    def _create_group(self, frame):
        src, ts, count, members = wire.decode_group(frame)
        if not (_listed(count, members) and wire.is_id(src) and wire.is_timestamp(ts)):
            return self.error(wire.CREATE_GROUP, wire.MALFORMED)
        user = self.session.user
        if user is None:
            return self.error(wire.CREATE_GROUP, wire.NOT_ONLINE)
        if src != user:
            return self.error(wire.CREATE_GROUP, wire.WRONG_SRC)
        self.domain.create_group(self.session, ts, members)

    def _received(self, frame):
        src, dst, ts = wire.decode_received(frame)
        if not (src.isdigit() and dst.isdigit() and ts.isdigit()):
            return self.error(wire.RECEIVED, wire.MALFORMED)
        if self.session.user is not None:
            self.domain.received(self.session, src, dst, ts)

    def _member_frame(self, code: bytes, src: bytes, group: bytes, ts: bytes) -> bool:
        """The checks a 17, 19 and 20 share after their own: well-formed ids and
        timestamp, online, SRC the connection's user (the error sent if not)."""
        if not (wire.is_id(src) and wire.is_id(group) and wire.is_timestamp(ts)):
            self.error(code, wire.MALFORMED)
            return False
        user = self.session.user
        if user is None:
            self.error(code, wire.NOT_ONLINE)
            return False
        if src != user:
            self.error(code, wire.WRONG_SRC)
            return False
        return True

    def _set_subject(self, frame):
        group, src, ts, field = wire.decode_set_subject(frame)
        name = wire.unpad_name(field)
        if name is None:
            return self.error(wire.SET_SUBJECT, wire.MALFORMED)
        if self._member_frame(wire.SET_SUBJECT, src, group, ts):
            self.domain.set_subject(self.session, group, ts, name)

    def _add_members(self, frame):
        src, group, ts, count, members = wire.decode_add_members(frame)
        if not _listed(count, members):
            return self.error(wire.ADD_MEMBERS, wire.MALFORMED)
        if self._member_frame(wire.ADD_MEMBERS, src, group, ts):
            self.domain.add_members(self.session, group, ts, members)

    def _leave_group(self, frame):
        src, group, ts = wire.decode_leave(frame)
        if self._member_frame(wire.LEAVE_GROUP, src, group, ts):
            self.domain.leave_group(self.session, group, ts)

    _handlers = {
        wire.REGISTER: _register,
        wire.ONLINE: _online,
        wire.SEND: _send,
        wire.SEEN: _seen,
        wire.CREATE_GROUP: _create_group,
        wire.REGISTER_SECRET: _register_secret,
        wire.ONLINE_SECRET: _online_secret,
        wire.RECEIVED: _received,
        wire.SET_SUBJECT: _set_subject,
        wire.ADD_MEMBERS: _add_members,
        wire.LEAVE_GROUP: _leave_group,
    }


class _Refused(Protocol):
    """Answers a connection over the cap, or one that comes while the store is
    far behind, with 12 00 11 and hangs up."""

    def __init__(self, stats: Stats):
        self.stats = stats

    def connectionMade(self):
        self.stats.error(wire.BUSY)
        self.transport.write(wire.error(_NO_FRAME, wire.BUSY))
        self.transport.loseConnection()


class ChatFactory(Factory):
    noisy = False
    log = Logger()

    def __init__(
        self,
        domain: Domain,
        cork: Cork,
        clock,
        limits: Limits | None = None,
        admission: Admission | None = None,
    ):
        self.domain = domain
        self.cork = cork
        self.clock = clock
        self.limits = limits or Limits()
        self.admission = admission if admission is not None else Admission(clock)
        self.connections = 0
        self.stats = Stats()
        #: Connections refused since the last summary: over the cap, or the store behind.
        self._refused = 0
        #: Every open ChatProtocol, logged in or not: what a shutdown must close.
        self.protocols: set[ChatProtocol] = set()
        self._all_lost: list[Deferred] = []
        self._lingering: set[ChatProtocol] = set()
        self._linger_loop = LoopingCall(self._linger_tick)
        self._linger_loop.clock = clock

    def buildProtocol(self, addr):
        if 0 < self.limits.max_connections <= self.connections or self.domain.backlog > _ACCEPT_BACKLOG:
            self._refused += 1
            self.admission.events[CONNECTIONS_REFUSED] += 1
            return _Refused(self.stats)
        self.connections += 1
        protocol = ChatProtocol(self.domain, self.cork, self.clock, self.limits, self.stats, self.admission)
        protocol.factory = self
        self.protocols.add(protocol)
        return protocol

    def tick(self) -> None:
        """The periodic summaries: each address's, and the connections refused
        for want of a slot (one line, however many)."""
        if self._refused:
            self.log.warn(
                "refused {count:,} connections in the last {seconds:g} s: {open} open "
                "(--max-connections {cap}), {backlog} store operations queued",
                count=self._refused,
                seconds=self.admission.policy.summary_interval,
                open=self.connections,
                cap=self.limits.max_connections,
                backlog=self.domain.backlog,
            )
            self._refused = 0
        self.admission.tick()

    def lost(self, protocol: ChatProtocol) -> None:
        self.connections -= 1
        self.protocols.discard(protocol)
        self._lingering.discard(protocol)
        if not self.protocols and self._all_lost:
            waiting, self._all_lost = self._all_lost, []
            for d in waiting:
                d.callback(None)

    # -- shutdown ----------------------------------------------------------

    def stop_reading(self) -> None:
        for protocol in list(self.protocols):
            protocol.stop_reading()

    def close_all(self) -> Deferred:
        """Close every connection once what was written to it is sent; the
        Deferred fires when the last one is gone."""
        d = Deferred()
        if not self.protocols:
            d.callback(None)
            return d
        self._all_lost.append(d)
        for protocol in list(self.protocols):
            protocol.finish()
        return d

    def linger(self, protocol: ChatProtocol) -> None:
        """Close ``protocol`` once the kernel has sent all we wrote to it.

        Past that, closing with unread input (the kernel then resets the
        connection) costs the client nothing: its kernel holds our frames.
        """
        self._lingering.add(protocol)
        if not self._linger_loop.running:
            self._linger_loop.start(LINGER_POLL, now=True)

    def _linger_tick(self) -> None:
        for protocol in list(self._lingering):
            if _unsent(protocol.transport) == 0:
                self._lingering.discard(protocol)
                protocol.transport.loseConnection()
        if not self._lingering and self._linger_loop.running:
            self._linger_loop.stop()

    def abort_all(self) -> int:
        """Drop every connection now, written or not; how many there were."""
        remaining = list(self.protocols)
        for protocol in remaining:
            protocol._closing = True
            protocol.transport.abortConnection()
        return len(remaining)


def _write_now(transport, data: bytes) -> None:
    """Write to the socket now when nothing waits before ``data``, else as Twisted does.

    Twisted's write only buffers: the socket is written on the reactor's
    next turn, after registering for writability and before unregistering,
    two epoll_ctl calls and a turn for every write. A chat server writes a
    few frames per read, so for a plain TCP connection with nothing
    buffered it sends at once and leaves only what the socket did not take
    to the transport.
    """
    # The attributes are FileDescriptor's; should a Twisted rename one, the
    # defaults turn this path off rather than break the server.
    if (
        type(transport) is tcp.Server
        and transport.connected
        and not transport.disconnecting
        and not getattr(transport, "_writeDisconnecting", True)
        and not getattr(transport, "dataBuffer", True)
        and not getattr(transport, "_tempDataLen", True)
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            data = data[sent:]
    if data:
        transport.write(data)


def _unsent(transport) -> int:
    """Bytes the kernel has yet to get acknowledged by the peer (SIOCOUTQ);
    0 where that cannot be asked, so the connection is closed at once."""
    try:
        import fcntl
        import termios

        fd = transport.getHandle().fileno()
        return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (ImportError, AttributeError, OSError, ValueError):
        return 0


def _describe(address) -> str:
    host = getattr(address, "host", None)
    if host is None:
        return getattr(address, "name", None) or str(address)
    return f"{host}:{address.port}"


def _listed(count: bytes, members: list[bytes]) -> bool:
    """A 10's or 19's N and MEMBERs are well-formed. The framer read the frame's
    length from N (two digits, or the connection was refused), so only N=00
    and the ids are left to check."""
    return count != b"00" and all(map(wire.is_id, members))


def _awaits_proxy_header(transport) -> bool:
    """Behind ``haproxy:`` the client's address comes in the PROXY header,
    which the wrapper reads before handing us any byte: until then the
    transport names the load balancer, so admission waits for the first data."""
    return isinstance(transport, HAProxyProtocolWrapper) and transport._proxyInfo is None
