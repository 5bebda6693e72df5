"""Delivery: a 05 from bytes to its 06s and its 07.

A message takes one of two ways. **Live**: its readers (the user, or every
other member of the group) are 03 sessions keeping up here, so it is
written to them at once and stored as delivered, with no hold; its 07
follows that commit. **Held**: it is stored with a hold per recipient;
once committed each recipient that takes frames gets it, and its hold
ends there (a 15 session's on its 16). What a recipient cannot take now
stays held and goes out in the **flush** of its next login, a page at a
time, before anything live.

Every 07 goes through ``confirm``. Notices (07, 09, 11, 18, 21) for a
user go through ``notify``, which keeps them in the order they were
decided: a 09, 11, 18 or 21 for a sender waits behind the 07s being
decided for it.
"""

from __future__ import annotations

from twisted.logger import Logger

from .. import wire
from ..store import (
    DUPLICATE_DELIVERED,
    DUPLICATE_PENDING,
    HELD_ADDED,
    HELD_DELIVERED,
    HELD_LEFT,
    HELD_MESSAGE,
    HELD_SEEN,
    HELD_SUBJECT,
    Completed,
    split_members,
)
from .answers import Answer, busy, failed, kept
from .session import Flush, Session, State

#: Held items sent per store round trip when a user comes online.
FLUSH_PAGE = 1000

#: A latest no TIMESTAMP is past: the conversation takes the held way.
_NEVER = 1 << 62


class Conversation:
    """What the domain knows of one session's messages to one user or group, for the live way.

    ``latest`` is at least the TIMESTAMP of every stored or submitted
    message of the pair, so a 05 past it cannot repeat a stored message
    (the contract's clients raise their TIMESTAMP per conversation).
    ``known`` turns true once the store has said its own latest.
    ``pending`` counts messages on the held way not yet offered: a live
    message must not overtake them, so while the store has not answered
    one or the other, messages a reader could take now wait in
    ``waiting`` (not written, not stored: a sender that goes meanwhile
    sends them again), in order, in runs of (items, the group's members
    when they were read): a 19 or 20 handled meanwhile does not change
    whom they go to.
    """

    __slots__ = ("session", "latest", "known", "pending", "waiting")

    def __init__(self, session: Session):
        self.session = session
        self.latest = 0
        self.known = False
        self.pending = 0
        self.waiting: list[tuple[list[tuple], list[bytes] | None]] | None = None


class Delivery:
    log = Logger()

    def __init__(self, directory, store, routing, max_held: int = 0):
        self.store = store
        self.routing = routing
        self.users = directory.users
        self.groups = directory.groups
        self.sessions = directory.sessions
        #: Items (messages and notices) that may wait for one offline user (0: no cap).
        self.max_held = max_held
        #: user id → what is held for them while offline, messages and
        #: notices (07, 09, 11, 21) alike (an estimate: it starts from the store's
        #: count and counts what is held meanwhile).
        self.held_offline: dict[bytes, int] = {}
        #: Offline users whose full inbox has been logged: once until they log in,
        #: not at each refused 05.
        self.full_logged: set[bytes] = set()
        #: Messages waiting in conversations for the store's answer.
        self.waiting = 0
        #: sender → store operations in flight that may complete its messages
        #: (and so decide 07s); while any is, its other notices wait (``notify``).
        self.deciding: dict[bytes, int] = {}
        #: group → the users its 19s not committed yet add (with how many of
        #: those 19s add each). A message to the group that would reach one of
        #: them takes the held way, whose record commits after the addition:
        #: an added member gets its 11 before any 06 of the group.
        self.adding: dict[bytes, dict[bytes, int]] = {}
        #: sender → notices waiting for those 07s, in order.
        self.behind_07s: dict[bytes, list[tuple]] = {}

    def load(self, snapshot) -> None:
        self.held_offline = {u.encode(): count for u, count in snapshot.held.items()}

    @property
    def backlog(self) -> int:
        """Messages read and not yet committed: the store's backlog and what waits for it."""
        return self.store.backlog + self.waiting

    # -- logging in and the flush ------------------------------------------

    def came_online(self, user: bytes) -> None:
        self.held_offline.pop(user, None)
        self.full_logged.discard(user)

    def expired(self, dropped: dict[str, int]) -> None:
        """--expire-held dropped messages held for these users (id → count): they count no more."""
        for user, count in dropped.items():
            key = user.encode()
            if key in self.held_offline:
                self.held_offline[key] = max(0, self.held_offline[key] - count)

    def start_flush(self, session: Session, flush: Flush | None = None) -> None:
        """Send everything held, a page at a time; frames decided meanwhile wait behind it."""
        session.to(State.FLUSHING)
        session.flush = flush if flush is not None else self.routing.new_flush()
        self.next_page(session)

    def next_page(self, session: Session) -> None:
        flush = session.flush
        flush.asked_at = flush.offers
        d = self.store.inbox(session.user.decode(), flush.cursor, FLUSH_PAGE)
        d.addCallbacks(self._flush_page, self.flush_failed, (session, flush), errbackArgs=(session, flush))

    def _current(self, session: Session, flush: Flush) -> bool:
        """Whether ``flush`` is still the session's, and the session its user's."""
        return session.flush is flush and self.sessions.get(session.user) is session

    def _flush_page(self, items, session: Session, flush: Flush) -> None:
        if not self._current(session, flush):
            return
        if items:
            flush.cursor = items[-1].seq
            flush.sent += len(items)
            if flush.seqs is not None:
                flush.seqs.update(item.seq for item in items)
            if not self.send_items(session, items):
                return
        if len(items) == FLUSH_PAGE or flush.offers != flush.asked_at:
            # More may be held (a full page, or a message held since we asked).
            if session.connection.paused:
                flush.page_owed = True
            else:
                self.next_page(session)
            return
        self.routing.flushed(session, flush)

    def flushed(self, session: Session, flush: Flush, fresh=()) -> None:
        """Everything held was sent: frames go straight out from now on.

        ``fresh``: held items that came live during the flush and were not in its pages.
        """
        session.to(State.LIVE)
        if fresh:
            self.send_items(session, fresh)
        if flush.frames and not session.connection.write_many([frame for frame, _ in flush.frames]):
            self._hold_notices(session.user, flush.frames)
        if flush.sent:
            self.log.info(
                "flushed {count} held frames to {user}", count=flush.sent, user=session.user.decode()
            )

    def flush_failed(self, failure, session: Session, flush: Flush) -> None:
        """The store could not be read: the login is refused, and closed so that
        its client logs in again (everything stays held)."""
        failed(failure, f"flushing to {session.user.decode() if session.user else 'a closed session'}")
        if self._current(session, flush):
            code = wire.ONLINE_SECRET if session.acknowledges else wire.ONLINE
            self.abandon(session)
            session.connection.close_with(wire.error(code, wire.BUSY))

    def send_items(self, session: Session, items) -> bool:
        """Write held items; a 03 session's holds end here, a 15's on its 16s.

        False when the reader was dropped as too slow: all of it stays held.
        """
        frames = []
        reached = []
        senders: dict[bytes, int] = {}
        notices = []
        for item in items:
            if item.code == HELD_MESSAGE:
                src = item.src.encode()
                frames.append(wire.message(src, item.dst.encode(), wire.timestamp(item.ts), item.text))
                reached.append(item.msg_id)
                senders[src] = senders.get(src, 0) + 1
            else:
                frames.append(self.notice_frame(item.code, item.src, item.dst, item.ts, item.text))
                notices.append(item.seq)
        if not session.connection.write_many(frames, None if notices else wire.MESSAGE):
            return False
        user = session.user.decode()
        if notices:
            self.store.drop(user, notices).addErrback(kept)
        if reached and not session.acknowledges:
            self._deciding(senders)
            d = self.store.mark_delivered(user, reached)
            d.addCallbacks(self._completed, self._not_completed, (senders,), errbackArgs=(senders,))
        return True

    def notice_frame(self, code: int, src: str, dst: str, ts: int, text: bytes | None = None) -> bytes:
        """A held notice's frame; an 11 lists the members of its moment (``text``),
        or, held before schema version 6, the members now."""
        when = wire.timestamp(ts)
        if code == HELD_DELIVERED:
            return wire.delivered(dst.encode(), when)
        if code == HELD_SEEN:
            return wire.seen_by(src.encode(), when)
        group = dst.encode()
        if code == HELD_ADDED:
            members = split_members(text) if text is not None else self.groups.get(group, [])
            return wire.added_to_group(group, when, members)
        if code == HELD_SUBJECT:
            return wire.subject(group, src.encode(), when, text)
        if code == HELD_LEFT:
            return wire.left_group(group, when)
        raise ValueError(f"no frame for a held item of code {code}")

    # -- the connection's pace ---------------------------------------------

    def behind(self, session: Session) -> None:
        """The reader fell behind: what is for it waits in the store until it drains."""
        if session.state is State.LIVE:
            session.to(State.BEHIND)

    def drained(self, session: Session) -> None:
        """The reader caught up: go on with its flush, or send what was held meanwhile."""
        if session.user is None or self.sessions.get(session.user) is not session:
            return
        if session.state is State.FLUSHING:
            if session.flush.page_owed:
                session.flush.page_owed = False
                self.next_page(session)
        elif session.state is State.BEHIND:
            self.start_flush(session)

    def abandon(self, session: Session) -> None:
        """The session is no longer its user's: hold the notices it was waiting to be sent."""
        user = session.user
        flush = session.flush
        if user is not None and self.sessions.get(user) is session:
            del self.sessions[user]
        if flush is not None:
            self._hold_notices(user, flush.frames)
        if session.state is not State.CLOSED:
            session.to(State.CONNECTED)

    def _hold_notices(self, user: bytes, frames) -> None:
        for _, notice in frames:
            if notice is not None:
                self.store.hold(user.decode(), *notice).addErrback(kept)

    # -- notices and 07s -----------------------------------------------------

    def notify(
        self, user: bytes, frame: bytes, code: int, src: str, dst: str, ts: int, text: bytes | None = None
    ) -> None:
        """A 09, 11, 18 or 21 for ``user``: after the 07s being decided for it, in order.
        ``text``: what the held row keeps of it (an 11's members, an 18's name)."""
        behind = self.behind_07s.get(user)
        if behind is not None:
            behind.append((frame, code, src, dst, ts, text))
        elif self.deciding.get(user):
            self.behind_07s[user] = [(frame, code, src, dst, ts, text)]
        else:
            self.routing.notify(user, frame, code, src, dst, ts, text)

    def write_or_hold(
        self, user: bytes, frame: bytes, code: int, src: str, dst: str, ts: int, text: bytes | None = None
    ) -> None:
        """A notice for ``user``: now if it takes frames, behind its flush, else at its next login."""
        session = self.sessions.get(user)
        if session is not None:
            if session.state is State.FLUSHING:
                session.flush.frames.append((frame, (code, src, dst, ts, text)))
                return
            if session.takes_frames and session.connection.write(frame):
                return
        else:
            self.count_held([user])
        self.store.hold(user.decode(), code, src, dst, ts, text).addErrback(kept)

    def count_held(self, users) -> None:
        """Notices held for these offline users count against --max-held too."""
        if self.max_held:
            held = self.held_offline
            for user in users:
                held[user] = held.get(user, 0) + 1

    def full(self, user: bytes) -> bool:
        """Whether ``user`` is offline with --max-held items waiting: what would
        be held for it next is refused (12 XX 11) rather than stored."""
        return (
            bool(self.max_held)
            and user not in self.sessions
            and self.held_offline.get(user, 0) >= self.max_held
        )

    def _deciding(self, senders: dict[bytes, int]) -> None:
        deciding = self.deciding
        for src, count in senders.items():
            deciding[src] = deciding.get(src, 0) + count

    def _decided(self, senders: dict[bytes, int]) -> None:
        """Operations that could complete these senders' messages have answered:
        the notices that waited behind their 07s go now."""
        deciding = self.deciding
        for src, count in senders.items():
            left = deciding[src] - count
            if left:
                deciding[src] = left
                continue
            del deciding[src]
            behind = self.behind_07s.pop(src, None)
            if behind:
                for notice in behind:
                    self.routing.notify(src, *notice)

    def confirm(self, user: bytes, frames: list[bytes], done) -> None:
        """The one place a 07 goes out: ``frames`` for ``user``, in one write if it
        takes frames now, else each held (or queued behind its flush).
        ``done``: each frame's (dst, ts), read only then."""
        session = self.sessions.get(user)
        if (
            session is not None
            and session.takes_frames
            and session.connection.write_many(frames, wire.DELIVERED)
        ):
            return
        for frame, (dst, ts) in zip(frames, done, strict=True):
            self.write_or_hold(user, frame, HELD_DELIVERED, "", dst, ts)

    def _completed(self, completed: list[Completed], senders: dict[bytes, int]) -> None:
        """Messages whose last recipient got them: 07s, each sender's in one write."""
        try:
            self.routing.completed(completed)
        finally:
            self._decided(senders)

    def _not_completed(self, failure, senders: dict[bytes, int]) -> None:
        try:
            kept(failure)
        finally:
            self._decided(senders)

    def confirm_completed(self, completed: list[Completed]) -> None:
        by_sender: dict[str, list[tuple[str, int]]] = {}
        for src, dst, ts in completed:
            by_sender.setdefault(src, []).append((dst, ts))
        for src, done in by_sender.items():
            frames = [wire.delivered(dst.encode(), wire.timestamp(ts)) for dst, ts in done]
            self.confirm(src.encode(), frames, done)

    def received(self, session: Session, src: bytes, dst: bytes, ts: bytes) -> None:
        """A 16: only a session opened with 15 acknowledges; others got theirs on write."""
        if not session.acknowledges:
            return
        senders = {src: 1}
        self._deciding(senders)
        d = self.store.acknowledge(session.user.decode(), src.decode(), dst.decode(), int(ts))
        d.addCallbacks(self._completed, self._not_completed, (senders,), errbackArgs=(senders,))

    # -- messages ------------------------------------------------------------

    def send_many(self, session: Session, items: list[tuple]) -> None:
        """A read's 05s from ``session``, in order: (src, dst, ts, text, 06 frame) each.

        A run of messages to one user, or to a group the sender is in, goes
        through its conversation (``_converse``): to readers who can take it
        now, it is one write of 06s each, one store operation and one write
        of 07s. ``LocalRouting``'s way; ``DatabaseRouting`` sends each with ``send``.
        """
        users = self.users
        groups = self.groups
        at, end = 0, len(items)
        while at < end:
            src, dst = items[at][0], items[at][1]
            stop = at + 1
            while stop < end and items[stop][1] == dst:
                stop += 1
            members = None if dst in users else groups.get(dst, ())
            if members is None or src in members:
                self._converse(self._conversation(session, src, dst), items[at:stop], members)
            else:
                for item in items[at:stop]:
                    self.send(session, *item)  # refused there: no such group, or not a member
            at = stop

    def _live_readers(self, src: bytes, dst: bytes, members: list[bytes] | None) -> list[Session] | None:
        """Who a message from ``src`` to ``dst`` goes to live: its reader, or
        every other of the group's ``members``; None unless each can take it now."""
        sessions = self.sessions
        if members is None:
            reader = sessions.get(dst)
            return [reader] if reader is not None and reader.delivers_on_write else None
        pending = self.adding.get(dst)
        if pending is not None and any(member in pending for member in members):
            return None
        readers = []
        for member in members:
            if member != src:
                reader = sessions.get(member)
                if reader is None or not reader.delivers_on_write:
                    return None
                readers.append(reader)
        return readers

    def _converse(self, conversation: Conversation, items: list[tuple], members: list[bytes] | None) -> None:
        """Send ``items`` (one sender, one user, or one group of ``members`` as
        they were when the items were read) in order: live where they can go live.

        A message goes live when its readers can take it now and it cannot
        repeat a stored message (its TIMESTAMP is past the conversation's
        latest). A crash before the commit leaves the 06 written and nothing
        stored: the sender, without a 07, sends it again and the reader's
        client drops the repeat. Any other message takes the held way; while
        one is in flight, or the store has not said the conversation's
        latest, the messages behind it wait.
        """
        session = conversation.session
        at, end = 0, len(items)
        while at < end:
            if conversation.waiting is not None:
                conversation.waiting.append((items[at:], members))
                self.waiting += end - at
                return
            readers = self._live_readers(items[at][0], items[at][1], members)
            if readers is not None:
                if not conversation.known or conversation.pending:
                    conversation.waiting = [(items[at:], members)]
                    self.waiting += end - at
                    return
                at = self._send_live(conversation, readers, items, at)
                if at == end:
                    return
            self._send_accepted(session, *items[at], members)
            at += 1

    def _send_live(
        self, conversation: Conversation, readers: list[Session], items: list[tuple], at: int
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
        missed = [reader.user for reader in readers if not reader.connection.write_many(frames, wire.MESSAGE)]
        src, dst = run[0][0], run[0][1]
        if missed:
            if dst in self.users:
                return at
            for item in run:
                self._hold_message(conversation.session, conversation, item, missed)
            return live
        conversation.latest = latest
        senders = {src: len(run)}
        self._deciding(senders)
        answer = Answer(
            self._delivered_live, (src, dst, run, senders), self._not_live, (conversation.session, senders)
        )
        self.store.record_delivered(src.decode(), dst.decode(), stamped, answer=answer)
        return live

    def _delivered_live(self, _, src: bytes, dst: bytes, run: list[tuple], senders) -> None:
        """Stored as delivered: the sender gets the run's 07s."""
        try:
            frames = [wire.delivered(dst, ts) for _, _, ts, _, _ in run]
            self.confirm(src, frames, [(dst.decode(), int(ts)) for _, _, ts, _, _ in run])
        finally:
            self._decided(senders)

    def _not_live(self, failure, session: Session, senders) -> None:
        try:
            busy(failure, session, wire.SEND)
        finally:
            self._decided(senders)

    def _resume(self, conversation: Conversation) -> None:
        """The store answered: the messages that waited go on, in order."""
        if conversation.waiting is not None and conversation.known and not conversation.pending:
            waiting, conversation.waiting = conversation.waiting, None
            for items, members in waiting:
                self.waiting -= len(items)
                self._converse(conversation, items, members)

    def _conversation(self, session: Session, src: bytes, dst: bytes) -> Conversation:
        """The session's state for messages to ``dst``; the first time, the store is asked its latest."""
        conversations = session.conversations
        if conversations is None:
            conversations = session.conversations = {}
        conversation = conversations.get(dst)
        if conversation is None:
            conversation = conversations[dst] = Conversation(session)
            self.store.latest_timestamp(src.decode(), dst.decode()).addCallbacks(
                self._learned_latest, self._latest_unknown, (conversation,), errbackArgs=(conversation,)
            )
        return conversation

    def _learned_latest(self, latest: int, conversation: Conversation) -> None:
        if latest > conversation.latest:
            conversation.latest = latest
        conversation.known = True
        self._resume(conversation)

    def _latest_unknown(self, failure, conversation: Conversation) -> None:
        """The store could not say: the conversation takes the held way from now on."""
        failed(failure, "asking a conversation's latest message")
        conversation.latest = _NEVER
        conversation.known = True
        self._resume(conversation)

    def send(self, session: Session, src: bytes, dst: bytes, ts: bytes, text: bytes, frame: bytes) -> None:
        """A 05 from the logged-in ``src`` the held way; ``frame`` is the 06 to deliver."""
        members = None
        if dst not in self.users:
            members = self.groups.get(dst)
            if members is None:
                session.connection.error(wire.SEND, wire.UNKNOWN_DESTINATION)
                return
            if src not in members:
                session.connection.error(wire.SEND, wire.NOT_A_MEMBER)
                return
        self._send_accepted(session, src, dst, ts, text, frame, members)

    def _send_accepted(
        self,
        session: Session,
        src: bytes,
        dst: bytes,
        ts: bytes,
        text: bytes,
        frame: bytes,
        members: list[bytes] | None,
    ) -> None:
        """A 05 whose sender could send to ``dst`` when it was read, the held way:
        to the user, or to every other of the group's ``members`` when it was
        read (the contract's recipients: a message that waited in its
        conversation is neither refused nor sent to others by a 19 or 20
        handled meanwhile)."""
        if members is None:
            recipients = [dst]
        else:
            recipients = [m for m in members if m != src]
        if self.max_held:
            recipients = self._within_cap(session, dst, recipients)
            if not recipients and dst in self.users:
                return
        conversation = self._conversation(session, src, dst) if self.routing.live_way else None
        self._hold_message(session, conversation, (src, dst, ts, text, frame), recipients)

    def _hold_message(
        self, session: Session, conversation: Conversation | None, item: tuple, recipients: list[bytes]
    ) -> None:
        """Store a message held for ``recipients``; each gets it once it is
        committed, if it can take it then (``routing.recorded``)."""
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
            answer=Answer(
                self._recorded,
                (src, dst, ts, frame, recipients, conversation),
                self._not_recorded,
                (session, conversation),
            ),
        )

    def _not_recorded(self, failure, session: Session, conversation: Conversation | None) -> None:
        try:
            busy(failure, session, wire.SEND)
        finally:
            self._settled(conversation)

    def _settled(self, conversation: Conversation | None) -> None:
        """A held message of the conversation is answered: the ones waiting behind it may go."""
        if conversation is not None:
            conversation.pending -= 1
            self._resume(conversation)

    def _within_cap(self, session: Session, dst: bytes, recipients: list[bytes]) -> list[bytes]:
        """Count what waits for offline recipients; refuse what would pass the cap.

        A direct message to a full inbox gets 12 05 11 (the sender's outbox
        tries again later); a group message goes to the other members.
        """
        kept_for = []
        for user in recipients:
            if self.full(user):
                if user not in self.full_logged:
                    self.full_logged.add(user)
                    self.log.warn("held data cap reached for {user}", user=user.decode())
                if dst == user:
                    session.connection.error(wire.SEND, wire.BUSY)
                continue
            kept_for.append(user)
        sessions = self.sessions
        self.count_held([user for user in kept_for if user not in sessions])
        return kept_for

    def _recorded(self, recorded, src, dst, ts, frame, recipients, conversation=None) -> None:
        """Committed: the routing offers it to its recipients."""
        try:
            self.routing.recorded(recorded, src, dst, ts, frame, recipients)
        finally:
            self._settled(conversation)

    def offer_recorded(self, recorded, src, dst, ts, frame, recipients) -> None:
        """A held message, committed: each recipient that takes frames gets it now."""
        if recorded.status == DUPLICATE_PENDING:
            return
        if recorded.complete:
            # Delivered before (a resend), or a group with no one else in it.
            self.confirm(src, [wire.delivered(dst, ts)], [(dst.decode(), int(ts))])
            if recorded.status == DUPLICATE_DELIVERED:
                return
        reached = [user.decode() for user in recipients if self._offer(user, frame)]
        if reached:
            senders = {src: 1}
            self._deciding(senders)
            answer = Answer(self._completed, (senders,), self._not_completed, (senders,))
            self.store.mark_reached(recorded.msg_id, reached, answer=answer)

    def _offer(self, user: bytes, frame: bytes) -> bool:
        """True when the message was written to a 03 session, whose hold ends
        there (the 07 follows that commit); a 15 session's ends when the 16 comes."""
        session = self.sessions.get(user)
        if session is None:
            return False
        if session.state is State.FLUSHING:
            session.flush.offers += 1  # its flush will fetch it from the store
            return False
        if not session.takes_frames:
            return False
        return session.connection.write(frame) and not session.acknowledges
