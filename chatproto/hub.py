"""The domain: who is online, where each frame goes, and what must be held.

The hub does no I/O of its own. It writes frames through the sessions it is
given (the server's protocols) and keeps everything durable through the
store, answering only after the store's Deferred has fired: a 02 after the
account is committed, a 07 after the delivery is.

Ids and timestamps stay the raw ``bytes`` of the frames here; they become
``str`` and ``int`` only at the store's boundary.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Protocol

from twisted.logger import Logger

from . import wire
from .store import (
    DUPLICATE_DELIVERED,
    DUPLICATE_PENDING,
    HELD_ADDED,
    HELD_DELIVERED,
    HELD_MESSAGE,
    HELD_SEEN,
    Completed,
    Snapshot,
    StoreUnavailable,
    next_low_mark,
)

#: Held items sent per store round trip when a user comes online.
FLUSH_PAGE = 1000


class _Flush:
    """Where a user's flush of held items is: a cursor into their inbox, and
    the live frames that must wait until everything held has been sent."""

    __slots__ = ("cursor", "offers", "asked_at", "waiting", "sent", "frames", "seqs", "live")

    def __init__(self, tracked: bool = False):
        self.cursor = 0
        #: Messages held for the user since the flush began: while this moves,
        #: the inbox may hold more than the last page showed.
        self.offers = 0
        self.asked_at = 0
        #: Paused by the transport between two pages.
        self.waiting = False
        self.sent = 0
        #: (frame, notice to hold if the connection is lost, or None)
        self.frames: list[tuple[bytes, tuple | None]] = []
        #: Seqs of the items sent, and items that arrived live meanwhile: for
        #: a hub whose live items may also be in a page (several nodes).
        self.seqs: set[int] | None = set() if tracked else None
        self.live: list = []


class Session(Protocol):
    """One connection, as the hub sees it."""

    #: The logged-in user, or None.
    user: bytes | None
    #: Opened with 15: only a 16 counts as delivery.
    secret_session: bool
    #: Logged in and done flushing what was held.
    ready: bool
    #: Its reader is slow: new frames for it stay in the store until it drains.
    congested: bool
    #: The flush of what was held, while it runs.
    flush: _Flush | None
    #: Its transport asked us to stop writing for now.
    paused: bool
    #: Recipient id → _Conversation, for the messages it sends (None until the first).
    conversations: dict | None

    def emit(self, frame: bytes) -> bool:
        """Write a frame; False when it was not written (the reader was dropped)."""

    def emit_many(self, frames: list[bytes], code: bytes | None = None) -> bool:
        """The frames in one write: a flush page is one syscall, not a thousand.

        ``code``: every frame's, when the caller knows it (counted once, not per frame).
        """

    def stall(self, d) -> None:
        """Handle none of the connection's frames until ``d`` fires: they must stay in order.

        The frames resume in a callback added here, so add the one that
        finishes the stalled frame to ``d`` before stalling.
        """

    def error(self, ref: bytes, reason: bytes) -> None: ...

    def close_with(self, frame: bytes) -> None: ...

    def uncork(self) -> None:
        """Write the frames held back while the hub's ``cork`` was in."""


def hash_secret(secret: bytes) -> str:
    """A secret is 128 random bits, so one SHA-256 is as good as a slow KDF."""
    return hashlib.sha256(secret).hexdigest()


def _new_id(first: bytes, taken) -> bytes:
    while True:
        candidate = first + b"%012d" % secrets.randbelow(10**12)
        if candidate not in taken:
            return candidate


class _Conversation:
    """What the hub knows of one session's messages to one user or group, for the live path.

    ``latest`` is at least the TIMESTAMP of every stored or submitted
    message of the pair, so a 05 past it cannot repeat a stored message
    (the contract's clients raise their TIMESTAMP per conversation).
    ``known`` turns true once the store has said its own latest.
    ``pending`` counts messages on the held way not yet offered: a live
    message must not overtake them, so while the store has not answered
    one or the other, messages a reader could take now wait in
    ``waiting`` (not written, not stored: a sender that goes meanwhile
    sends them again), in order.
    """

    __slots__ = ("session", "latest", "known", "pending", "waiting")

    def __init__(self, session):
        self.session = session
        self.latest = 0
        self.known = False
        self.pending = 0
        self.waiting: list[tuple] | None = None


#: A latest no TIMESTAMP is past: the conversation takes the held way.
_NEVER = 1 << 62


class Cork:
    """Holds the sessions' writes during a burst of work (a read, a commit's
    answers), then has each session write what it got in one go."""

    __slots__ = ("depth", "waiting")

    def __init__(self):
        self.depth = 0
        #: Sessions holding frames back, each once.
        self.waiting: list[Session] = []

    def __enter__(self):
        self.depth += 1

    def __exit__(self, *exc_info):
        self.depth -= 1
        if not self.depth and self.waiting:
            waiting, self.waiting = self.waiting, []
            for session in waiting:
                session.uncork()


class _Answer:
    """Where the store sends a hot operation's result: a method and its
    arguments for success, another for failure, and no Deferred."""

    __slots__ = ("ok", "ok_args", "failed", "failed_args")

    def __init__(self, ok, ok_args: tuple, failed, failed_args: tuple):
        self.ok, self.ok_args, self.failed, self.failed_args = ok, ok_args, failed, failed_args

    def callback(self, value) -> None:
        # A bug here must not stop the store from answering the rest of its batch.
        try:
            self.ok(value, *self.ok_args)
        except Exception:
            Hub.log.failure("handling a stored result failed")

    def errback(self, failure) -> None:
        try:
            self.failed(failure, *self.failed_args)
        except Exception:
            Hub.log.failure("store operation failed", failure)


class Hub:
    log = Logger()
    #: Whether a flush remembers the seqs it sent (see _Flush).
    track_flushes = False
    #: Whether a message to readers online here (a user, or every other member
    #: of a group) may be written before its commit (``_send_live``): only
    #: where this hub sees every message of its senders, i.e. one server.
    live_path = True

    def __init__(self, store, require_secrets: bool = False, max_held: int = 0):
        self.store = store
        self.cork = Cork()
        #: The writes of a commit's answers go out together, as a read's do.
        store.answering = self.cork
        self.require_secrets = require_secrets
        #: Messages that may wait for one offline user (0: no cap).
        self.max_held = max_held
        #: user id → messages held for them while offline (an estimate: it
        #: starts from the store's count and counts what arrives meanwhile).
        self.held_offline: dict[bytes, int] = {}
        #: user id → secret hash (str) or None for an account made with 01.
        self.users: dict[bytes, str | None] = {}
        #: group id → members, creator first.
        self.groups: dict[bytes, list[bytes]] = {}
        self.read_marks: dict[bytes, dict[bytes, int]] = {}
        self.low_marks: dict[bytes, int] = {}
        self.sessions: dict[bytes, Session] = {}
        #: Messages waiting in conversations for the store's answer (``_Conversation``).
        self.waiting = 0

    def load(self, snapshot: Snapshot) -> None:
        self.users = {u.encode(): h for u, h in snapshot.users.items()}
        self.groups = {g.encode(): [m.encode() for m in ms] for g, ms in snapshot.groups.items()}
        self.read_marks = {
            g.encode(): {u.encode(): ts for u, ts in marks.items()}
            for g, marks in snapshot.read_marks.items()
        }
        self.low_marks = {g.encode(): ts for g, ts in snapshot.low_marks.items()}
        self.held_offline = {u.encode(): count for u, count in snapshot.held.items()}
        self.log.info(
            "loaded {users} users and {groups} groups", users=len(self.users), groups=len(self.groups)
        )

    # -- accounts and sessions -------------------------------------------

    def register(self, session: Session, with_secret: bool) -> None:
        code = wire.REGISTER_SECRET if with_secret else wire.REGISTER
        if self.require_secrets and not with_secret:
            session.error(code, wire.SECRET_REQUIRED)
            return
        user = _new_id(b"0", self.users)
        secret = secrets.token_hex(16).encode() if with_secret else None
        secret_hash = hash_secret(secret) if secret else None
        self.users[user] = secret_hash
        d = self.store.add_user(user.decode(), secret_hash)
        if secret:
            d.addCallback(lambda _: session.emit(wire.registered_secret(user, secret)))
        else:
            d.addCallback(lambda _: session.emit(wire.registered(user)))
        d.addErrback(self._not_registered, session, code, user)
        self.log.info("registered {user}", user=user.decode())

    def login(self, session: Session, user: bytes, secret: bytes | None, code: bytes) -> None:
        if secret is None and self.require_secrets:
            session.error(code, wire.SECRET_REQUIRED)
            return
        if user not in self.users:
            session.error(code, wire.UNKNOWN_USER)
            return
        stored = self.users[user]
        if secret is None:
            refused = stored is not None
        else:
            refused = stored is None or not hmac.compare_digest(hash_secret(secret), stored)
        if refused:
            self.log.info("refused login of {user}", user=user.decode())
            session.error(code, wire.SECRET_REQUIRED)
            return
        if session.user is not None and session.user != user:
            self.logout(session)
        old = self.sessions.get(user)
        if old is session:
            # Logged in again on the same connection: resend what is still held.
            session.emit(wire.online_ok(user))
            if session.ready:
                self._start_flush(session, user)
            return
        if old is not None:
            self.log.info("{user} logged in elsewhere: closing the old connection", user=user.decode())
            self._abandon(old)
            old.close_with(wire.error(wire.ONLINE, wire.LOGGED_IN_ELSEWHERE))
        session.user = user
        session.secret_session = secret is not None
        self.sessions[user] = session
        self.held_offline.pop(user, None)
        self._came_online(session, user)

    def _came_online(self, session: Session, user: bytes) -> None:
        session.emit(wire.online_ok(user))
        self.log.info("{user} online", user=user.decode())
        self._start_flush(session, user)

    def _start_flush(self, session: Session, user: bytes) -> None:
        """Send everything held, a page at a time; live frames wait behind it."""
        session.ready = False
        session.flush = _Flush(self.track_flushes)
        self._next_page(session, user)

    def _next_page(self, session: Session, user: bytes) -> None:
        flush = session.flush
        flush.asked_at = flush.offers
        d = self.store.inbox(user.decode(), flush.cursor, FLUSH_PAGE)
        d.addCallback(self._flush_page, session, user, flush)
        d.addErrback(self._flush_failed, session, user, flush)

    def _send_items(self, session: Session, user: bytes, items) -> bool:
        """Write held items; a 03 session's holds end here, a 15's on its 16s.

        False when the reader was dropped as too slow: all of it stays held.
        """
        frames = []
        reached = []
        notices = []
        for item in items:
            if item.code == HELD_MESSAGE:
                frames.append(
                    wire.message(item.src.encode(), item.dst.encode(), wire.timestamp(item.ts), item.text)
                )
                reached.append(item.msg_id)
            else:
                frames.append(self._notice_frame(item.code, item.src, item.dst, item.ts))
                notices.append(item.seq)
        if not session.emit_many(frames, None if notices else wire.MESSAGE):
            return False
        if notices:
            self.store.drop(user.decode(), notices)
        if reached and not session.secret_session:
            self.store.mark_delivered(user.decode(), reached).addCallbacks(self._completed, self._kept)
        return True

    def _flush_page(self, items, session: Session, user: bytes, flush: _Flush) -> None:
        if session.flush is not flush or self.sessions.get(user) is not session:
            return
        if items:
            flush.cursor = items[-1].seq
            flush.sent += len(items)
            if flush.seqs is not None:
                flush.seqs.update(item.seq for item in items)
            if not self._send_items(session, user, items):
                return
        if len(items) == FLUSH_PAGE or flush.offers != flush.asked_at:
            # More may be held (a full page, or a message held since we asked).
            if session.paused:
                flush.waiting = True
            else:
                self._next_page(session, user)
            return
        self._flushed(session, user, flush)

    def _flushed(self, session: Session, user: bytes, flush: _Flush) -> None:
        """Everything held was sent: live frames go straight out from now on."""
        session.flush = None
        session.ready = True
        if flush.frames and not session.emit_many([frame for frame, _ in flush.frames]):
            self._hold_notices(user, flush.frames)
        if flush.sent:
            self.log.info("flushed {count} held frames to {user}", count=flush.sent, user=user.decode())

    def _flush_failed(self, failure, session: Session, user: bytes, flush: _Flush) -> None:
        """The store could not be read: the user is told to come back (everything stays held)."""
        failure.trap(StoreUnavailable)
        if session.flush is flush and self.sessions.get(user) is session:
            self.log.warn("could not flush to {user}: the store is unavailable", user=user.decode())
            session.close_with(wire.error(wire.ONLINE, wire.BUSY))

    def _busy(self, failure, session: Session, code: bytes) -> None:
        """A change the store could not commit: the client is told to try again."""
        failure.trap(StoreUnavailable)
        session.error(code, wire.BUSY)

    def _kept(self, failure) -> None:
        """A hold that could not be ended stays: the item is sent again, never lost."""
        failure.trap(StoreUnavailable)
        self.log.warn("the store is unavailable: a delivery stays held and will be sent again")

    def _not_registered(self, failure, session: Session, code: bytes, user: bytes) -> None:
        failure.trap(StoreUnavailable)
        self.users.pop(user, None)
        session.error(code, wire.BUSY)

    def congested(self, session: Session) -> None:
        """The session's reader fell behind: hold what is for it in the store."""
        session.congested = True

    def drained(self, session: Session) -> None:
        """The reader caught up: go on with its flush, or send what was held meanwhile."""
        user = session.user
        if user is None or self.sessions.get(user) is not session:
            return
        flush = session.flush
        if flush is not None:
            session.congested = False
            if flush.waiting:
                flush.waiting = False
                self._next_page(session, user)
        elif session.congested:
            session.congested = False
            self._start_flush(session, user)

    def _notice_frame(self, code: int, src: str, dst: str, ts: int) -> bytes:
        when = wire.timestamp(ts)
        if code == HELD_DELIVERED:
            return wire.delivered(dst.encode(), when)
        if code == HELD_SEEN:
            return wire.seen_by(src.encode(), when)
        group = dst.encode()
        return wire.added_to_group(group, when, self.groups.get(group, []))

    def logout(self, session: Session) -> None:
        """The session's connection is gone (or is changing user)."""
        user = session.user
        if user is not None and self.sessions.get(user) is session:
            self._abandon(session)
            self.log.info("{user} offline", user=user.decode())
        session.user = None
        session.ready = False
        # What its conversations know is the old user's: a new login asks again.
        session.conversations = None

    def _abandon(self, session: Session) -> None:
        """Hold the notices a session was waiting to be sent: they must not be lost."""
        flush, session.flush = session.flush, None
        session.ready = False
        if session.user is not None and self.sessions.get(session.user) is session:
            del self.sessions[session.user]
        if flush is not None:
            self._hold_notices(session.user, flush.frames)

    def _hold_notices(self, user: bytes, frames) -> None:
        for _, notice in frames:
            if notice is not None:
                self.store.hold(user.decode(), *notice)

    def _notify(self, user: bytes, frame: bytes, code: int, src: str, dst: str, ts: int) -> None:
        """A 07, 09 or 11 for ``user``: now if online, else at their next login."""
        session = self.sessions.get(user)
        if session is None:
            self.store.hold(user.decode(), code, src, dst, ts)
        elif session.flush is not None:
            session.flush.frames.append((frame, (code, src, dst, ts)))
        elif session.congested or not session.emit(frame):
            self.store.hold(user.decode(), code, src, dst, ts)

    # -- messages --------------------------------------------------------

    def send_many(self, session: Session, items: list[tuple]) -> None:
        """A read's 05s from ``session``, in order: (src, dst, ts, text, 06 frame) each.

        A run of messages to one user, or to a group the sender is in, goes
        through its conversation (``_converse``): to readers who can take it
        now, it is one write of 06s each, one store operation and one write
        of 07s. Only for a hub with ``live_path``: this one never stalls a
        connection.
        """
        users = self.users
        groups = self.groups
        at, end = 0, len(items)
        while at < end:
            src, dst = items[at][0], items[at][1]
            stop = at + 1
            while stop < end and items[stop][1] == dst:
                stop += 1
            if dst in users or src in groups.get(dst, ()):
                self._converse(self._conversation(session, src, dst), items[at:stop])
            else:
                for item in items[at:stop]:
                    self.send(session, *item)  # refused there: no such group, or not a member
            at = stop

    @property
    def backlog(self) -> int:
        """Messages read and not yet committed: the store's backlog and what waits for it."""
        return self.store.backlog + self.waiting

    def _reader(self, user: bytes) -> Session | None:
        """``user``'s session if a message written to it now has reached them
        (a ready 03 session whose transport is taking what it is given); else None."""
        reader = self.sessions.get(user)
        if (
            reader is None
            or reader.flush is not None
            or reader.paused
            or reader.congested
            or reader.secret_session
        ):
            return None
        return reader

    def _live_readers(self, src: bytes, dst: bytes) -> list[Session] | None:
        """Who a message from ``src`` to ``dst`` goes to live: its reader, or
        every other member of the group; None unless each can take it now."""
        members = self.groups.get(dst)
        if members is None:
            reader = self._reader(dst)
            return None if reader is None else [reader]
        readers = []
        for member in members:
            if member != src:
                reader = self._reader(member)
                if reader is None:
                    return None
                readers.append(reader)
        return readers

    def _converse(self, conversation: _Conversation, items: list[tuple]) -> None:
        """Send ``items`` (one sender, one user or group) in order: live where they can go live.

        A message goes live when its readers (the user, or every other
        member of the group) can take it now and it cannot repeat a stored
        message (its TIMESTAMP is past the conversation's latest): it is
        written at once and stored as delivered, with no hold, in the next
        commit; the 07 follows that commit. A group with a member offline,
        flushing or behind takes the held way, as before. A crash before the
        commit leaves the 06 written and nothing stored: the sender, without
        a 07, sends it again and the reader's client drops the repeat. Any
        other message takes the held way; while one is in flight, or the
        store has not said the conversation's latest, the messages behind
        it wait (``_Conversation``).
        """
        session = conversation.session
        at, end = 0, len(items)
        while at < end:
            if conversation.waiting is not None:
                conversation.waiting.extend(items[at:])
                self.waiting += end - at
                return
            readers = self._live_readers(items[at][0], items[at][1])
            if readers is not None:
                if not conversation.known or conversation.pending:
                    conversation.waiting = items[at:]
                    self.waiting += end - at
                    return
                at = self._send_live(conversation, readers, items, at)
                if at == end:
                    return
            self.send(session, *items[at])
            at += 1

    def _send_live(
        self, conversation: _Conversation, readers: list[Session], items: list[tuple], at: int
    ) -> int:
        """Write the messages from ``items[at]`` on that cannot be repeats, and
        store them as delivered; where they end.

        A reader whose write fails is being dropped: for a user, the run
        takes the held way instead; in a group, the run is held for that
        member alone (the others have it).
        """
        latest = conversation.latest
        stamped = []
        live, end = at, len(items)
        while live < end:
            when = int(items[live][2])
            if when <= latest:
                break
            latest = when
            stamped.append((when, items[live][3]))
            live += 1
        if live == at:
            return at
        run = items[at:live]
        frames = [item[4] for item in run]
        missed = [reader.user for reader in readers if not reader.emit_many(frames, wire.MESSAGE)]
        src, dst = run[0][0], run[0][1]
        if missed:
            if dst in self.users:
                return at
            for item in run:
                self._hold_message(conversation.session, conversation, item, missed)
            return live
        conversation.latest = latest
        answer = _Answer(self._delivered_live, (src, dst, run), self._busy, (conversation.session, wire.SEND))
        self.store.record_delivered(src.decode(), dst.decode(), stamped, answer=answer)
        return live

    def _resume(self, conversation: _Conversation) -> None:
        """The store answered: the messages that waited go on, in order."""
        if conversation.waiting is not None and conversation.known and not conversation.pending:
            waiting, conversation.waiting = conversation.waiting, None
            self.waiting -= len(waiting)
            self._converse(conversation, waiting)

    def _conversation(self, session: Session, src: bytes, dst: bytes) -> _Conversation:
        """The session's state for messages to ``dst``; the first time, the store is asked its latest."""
        conversations = session.conversations
        if conversations is None:
            conversations = session.conversations = {}
        conversation = conversations.get(dst)
        if conversation is None:
            conversation = conversations[dst] = _Conversation(session)
            self.store.latest_timestamp(src.decode(), dst.decode()).addCallbacks(
                self._learned_latest, self._latest_unknown, (conversation,), errbackArgs=(conversation,)
            )
        return conversation

    def _learned_latest(self, latest: int, conversation: _Conversation) -> None:
        if latest > conversation.latest:
            conversation.latest = latest
        conversation.known = True
        self._resume(conversation)

    def _latest_unknown(self, failure, conversation: _Conversation) -> None:
        """The store could not say: the conversation takes the held way from now on."""
        failure.trap(StoreUnavailable)
        conversation.latest = _NEVER
        conversation.known = True
        self._resume(conversation)

    def _delivered_live(self, _, src: bytes, dst: bytes, run: list[tuple]) -> None:
        """Stored as delivered: the sender gets the run's 07s."""
        frames = [wire.delivered(dst, ts) for _, _, ts, _, _ in run]
        self._confirm(src, frames, ((dst.decode(), int(ts)) for _, _, ts, _, _ in run))

    def _confirm(self, user: bytes, frames: list[bytes], done) -> None:
        """07s for ``user``: in one write if it is reading now, else each
        through ``_notify``, which holds them as needed. ``done``: each
        frame's (dst, ts), read only then."""
        session = self.sessions.get(user)
        if (
            session is not None
            and session.flush is None
            and not session.congested
            and session.emit_many(frames, wire.DELIVERED)
        ):
            return
        for frame, (dst, ts) in zip(frames, done, strict=True):
            self._notify(user, frame, HELD_DELIVERED, "", dst, ts)

    def send(self, session: Session, src: bytes, dst: bytes, ts: bytes, text: bytes, frame: bytes) -> None:
        """A 05 from the logged-in ``src`` the held way; ``frame`` is the 06 to deliver."""
        if dst in self.users:
            recipients = [dst]
        else:
            members = self.groups.get(dst)
            if members is None:
                session.error(wire.SEND, wire.UNKNOWN_DESTINATION)
                return
            if src not in members:
                session.error(wire.SEND, wire.NOT_A_MEMBER)
                return
            recipients = [m for m in members if m != src]
        if self.max_held:
            recipients = self._within_cap(session, dst, recipients)
            if not recipients and dst in self.users:
                return
        conversation = self._conversation(session, src, dst) if self.live_path else None
        self._hold_message(session, conversation, (src, dst, ts, text, frame), recipients)

    def _hold_message(
        self, session: Session, conversation: _Conversation | None, item: tuple, recipients: list[bytes]
    ) -> None:
        """Store a message held for ``recipients``; each gets it once it is
        committed, if it can take it then (``_recorded``)."""
        src, dst, ts, text, frame = item
        when = int(ts)
        if conversation is not None:
            conversation.pending += 1
            conversation.latest = max(conversation.latest, when)
        self.store.record_message(
            src.decode(),
            dst.decode(),
            when,
            text,
            [user.decode() for user in recipients],
            answer=_Answer(
                self._recorded,
                (src, dst, ts, frame, recipients, conversation),
                self._not_recorded,
                (session, conversation),
            ),
        )

    def _not_recorded(self, failure, session: Session, conversation: _Conversation | None) -> None:
        try:
            self._busy(failure, session, wire.SEND)
        finally:
            self._settled(conversation)

    def _settled(self, conversation: _Conversation | None) -> None:
        """A held message of the conversation is answered: the ones waiting behind it may go."""
        if conversation is not None:
            conversation.pending -= 1
            self._resume(conversation)

    def _within_cap(self, session: Session, dst: bytes, recipients: list[bytes]) -> list[bytes]:
        """Count what waits for offline recipients; refuse what would pass the cap.

        A direct message to a full inbox gets 12 05 11 (the sender's outbox
        tries again later); a group message goes to the other members.
        """
        held = self.held_offline
        sessions = self.sessions
        kept = []
        for user in recipients:
            if user not in sessions:
                count = held.get(user, 0)
                if count >= self.max_held:
                    self.log.warn("held data cap reached for {user}", user=user.decode())
                    if dst == user:
                        session.error(wire.SEND, wire.BUSY)
                    continue
                held[user] = count + 1
            kept.append(user)
        return kept

    def _recorded(self, recorded, src, dst, ts, frame, recipients, conversation=None) -> None:
        """Committed: offer it to each recipient; each hold ends once it is written."""
        try:
            self._offer_recorded(recorded, src, dst, ts, frame, recipients)
        finally:
            self._settled(conversation)

    def _offer_recorded(self, recorded, src, dst, ts, frame, recipients) -> None:
        if recorded.status == DUPLICATE_PENDING:
            return
        if recorded.complete:
            # Delivered before (a resend), or a group with no one else in it.
            self._notify(src, wire.delivered(dst, ts), HELD_DELIVERED, "", dst.decode(), int(ts))
            if recorded.status == DUPLICATE_DELIVERED:
                return
        reached = [user.decode() for user in recipients if self._offer(user, frame)]
        if reached:
            answer = _Answer(self._completed, (), self._kept, ())
            self.store.mark_reached(recorded.msg_id, reached, answer=answer)

    def _offer(self, user: bytes, frame: bytes) -> bool:
        """A held message, committed: send it now if its recipient can take it.

        True when it was written to a 03 session, whose hold ends there (the
        07 follows that commit); a 15 session's ends when the 16 comes.
        """
        session = self.sessions.get(user)
        if session is None:
            return False
        if session.flush is not None:
            session.flush.offers += 1  # its flush will fetch it from the store
            return False
        if session.congested:
            return False
        return session.emit(frame) and not session.secret_session

    def _completed(self, completed: list[Completed]) -> None:
        """Messages whose last recipient got them: 07s, each sender's in one write."""
        by_sender: dict[str, list[tuple[str, int]]] = {}
        for src, dst, ts in completed:
            by_sender.setdefault(src, []).append((dst, ts))
        for src, done in by_sender.items():
            frames = [wire.delivered(dst.encode(), wire.timestamp(ts)) for dst, ts in done]
            self._confirm(src.encode(), frames, done)

    def received(self, session: Session, src: bytes, dst: bytes, ts: bytes) -> None:
        """A 16: only a session opened with 15 acknowledges; others got theirs on write."""
        if not session.secret_session:
            return
        d = self.store.acknowledge(session.user.decode(), src.decode(), dst.decode(), int(ts))
        d.addCallbacks(self._completed, self._kept)

    # -- receipts --------------------------------------------------------

    def seen(self, session: Session, peer: bytes, ts: bytes) -> None:
        reader = session.user
        if peer in self.users:
            self._notify(peer, wire.seen_by(reader, ts), HELD_SEEN, reader.decode(), "", int(ts))
            return
        members = self.groups.get(peer)
        if members is None:
            session.error(wire.SEEN, wire.UNKNOWN_DESTINATION)
            return
        if reader not in members:
            session.error(wire.SEEN, wire.NOT_A_MEMBER)
            return
        marks = self.read_marks.setdefault(peer, {})
        when = int(ts)
        if when <= marks.get(reader, 0):
            return
        marks[reader] = when
        self.store.set_read_mark(peer.decode(), reader.decode(), when)
        low = self.low_marks.get(peer, 0)
        d = self.store.group_messages_since(peer.decode(), low)
        d.addCallback(self._advance_low_mark, peer)

    def _advance_low_mark(self, rows, group: bytes) -> None:
        """Move the group's low mark past every message all its readers have read."""
        low = self.low_marks.get(group, 0)
        new_low = next_low_mark(
            low, [(src.encode(), ts) for src, ts in rows], self.groups[group], self.read_marks.get(group, {})
        )
        if new_low is None:
            return
        self.low_marks[group] = new_low
        self.store.set_low_mark(group.decode(), new_low)
        frame = wire.seen_by(group, wire.timestamp(new_low))
        for member in self.groups[group]:
            self._notify(member, frame, HELD_SEEN, group.decode(), "", new_low)

    # -- groups ----------------------------------------------------------

    def _group_members(self, session: Session, listed: list[bytes]) -> list[bytes] | None:
        """The creator first, then the listed once each; None (with the error sent) if refused."""
        members = [session.user]
        for member in listed:
            if member not in members:
                members.append(member)
        if len(members) > wire.MAX_MEMBERS:
            session.error(wire.CREATE_GROUP, wire.MALFORMED)
            return None
        if any(member not in self.users for member in members):
            session.error(wire.CREATE_GROUP, wire.UNKNOWN_USER)
            return None
        return members

    def create_group(self, session: Session, ts: bytes, listed: list[bytes]) -> None:
        members = self._group_members(session, listed)
        if members is None:
            return
        creator = session.user
        group = _new_id(b"1", self.groups)
        self.groups[group] = members
        self.read_marks[group] = {}
        self.low_marks[group] = 0
        offline = [m for m in members if m not in self.sessions]
        online = [m for m in members if m in self.sessions]
        d = self.store.add_group(
            group.decode(), int(ts), [m.decode() for m in members], [m.decode() for m in offline]
        )
        frame = wire.added_to_group(group, ts, members)

        def announce(_):
            for member in online:
                self._notify(member, frame, HELD_ADDED, "", group.decode(), int(ts))

        d.addCallback(announce)
        self.log.info(
            "{user} created group {group} of {count}",
            user=creator.decode(),
            group=group.decode(),
            count=len(members),
        )
