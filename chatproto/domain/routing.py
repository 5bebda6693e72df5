"""How a message, a notice or a login reaches its session: the two routings.

``LocalRouting``: one server sees every session, so a committed message
is offered to its online readers at once, 07s are decided here, and a
message may take the live way.

``DatabaseRouting``: several nodes share a PostgreSQL database. Nothing
goes from one session to another directly: every delivery, 07, 09 and 11
is an inbox row, committed, and the store's listener brings each new row
to every node, in commit order; the node holding the user's session
writes it and ends the hold as a single server would. A user has one
session in the whole cluster: a login claims the user in the database;
the node that had them closes its connection (12 03 09), commits what it
was doing and says so (Released), and only then does the new node read
what is held, so nothing is written to both.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, TimeoutError
from twisted.logger import Logger

from .. import wire
from ..store import (
    HELD_SEEN,
    SUPERSEDED,
    GroupAdded,
    Held,
    ListenerAway,
    Reconnected,
    Released,
    Takeover,
    UserAdded,
)
from .answers import busy, failed, kept
from .session import Flush, Session, State

#: Seconds a login waits for the node that had the user to let go; past it
#: (a node that hangs), the login goes on: a hold ends only once, so the
#: worst case is an item written to both connections.
HANDOVER_TIMEOUT = 3.0


class LocalRouting:
    """One server: every session is here."""

    log = Logger()
    #: A message to readers online here may be written before its commit.
    live_way = True

    def __init__(self, domain):
        self.domain = domain
        self.store = domain.store

    def start(self) -> Deferred:
        d = self.store.load()
        d.addCallback(self.domain.load)
        return d

    def new_flush(self) -> Flush:
        return Flush()

    def resolve(self, session: Session, ids: list[bytes], code: bytes, then) -> None:
        """Every id is known here already: an unknown one is refused by ``then``."""
        then()

    def send_many(self, session: Session, items: list[tuple]) -> None:
        self.domain.delivery.send_many(session, items)

    def come_online(self, session: Session) -> None:
        session.connection.write(wire.online_ok(session.user))
        self.log.info("{user} online", user=session.user.decode())
        self.domain.delivery.start_flush(session)

    def flushed(self, session: Session, flush: Flush) -> None:
        self.domain.delivery.flushed(session, flush)

    def went_offline(self, user: bytes) -> None:
        """The directory's sessions are the only claim on a user here: nothing to release."""

    def recorded(self, recorded, src, dst, ts, frame, recipients) -> None:
        self.domain.delivery.offer_recorded(recorded, src, dst, ts, frame, recipients)

    def completed(self, completed) -> None:
        self.domain.delivery.confirm_completed(completed)

    def notify(self, user: bytes, frame: bytes, code: int, src: str, dst: str, ts: int, text=None) -> None:
        self.domain.delivery.write_or_hold(user, frame, code, src, dst, ts, text)

    def seen_user(self, session: Session, peer: bytes, ts: bytes) -> None:
        self.domain.receipts.notify_seen(session, peer, ts)

    def seen_group(self, session: Session, group: bytes, ts: bytes) -> None:
        self.domain.receipts.mark_read(session, group, ts)

    def writes_to(self, members: list[bytes]) -> list[bytes]:
        """The members a group's notice is written to after its commit; the store
        holds it for the others in the same commit: here, those online."""
        sessions = self.domain.directory.sessions
        return [m for m in members if m in sessions]

    def members_added(self, group: bytes, users: list[bytes], mark: int) -> None:
        self.domain.receipts.members_added(group, users, mark)

    def member_left(self, group: bytes, user: bytes) -> None:
        self.domain.receipts.member_left(group, user)

    def add_group(self, group: bytes, ts: bytes, members: list[bytes]) -> Deferred:
        """Deferred[the members online now]: the offline ones' 11 is held in the same commit."""
        sessions = self.domain.directory.sessions
        offline = [m.decode() for m in members if m not in sessions]
        online = [m for m in members if m in sessions]
        self.domain.delivery.count_held(m for m in members if m not in sessions)
        d = self.store.add_group(group.decode(), int(ts), [m.decode() for m in members], offline)
        d.addCallback(lambda _: online)
        return d


class DatabaseRouting:
    """Several nodes sharing a database: every delivery is an inbox row its listener brings."""

    log = Logger()
    #: A sender's messages may come through other nodes: every one takes the held way.
    live_way = False

    def __init__(self, domain, clock, handover_timeout: float = HANDOVER_TIMEOUT):
        self.domain = domain
        self.store = domain.store
        self.clock = clock
        self.handover_timeout = handover_timeout
        #: (user, node) → the login waiting for that node to release the user.
        self._handovers: dict[tuple[bytes, str], Deferred] = {}
        #: Events that came before the snapshot was loaded.
        self._early: list | None = []
        #: user → held items that came live this reactor turn, written together.
        self._arrived: dict[bytes, list] = {}

    def start(self) -> Deferred:
        """Listen first, then load: an event committed meanwhile is in one or the other."""
        d = self.store.listen(self.event)
        d.addCallback(lambda _: self.store.load())
        d.addCallback(self._loaded)
        return d

    def _loaded(self, snapshot) -> None:
        self.domain.load(snapshot)
        early, self._early = self._early, None
        for event in early:
            self.event(event)

    def new_flush(self) -> Flush:
        return Flush(tracked=True)

    # -- events from the store's listener ------------------------------------

    def event(self, event) -> None:
        if self._early is not None:
            self._early.append(event)
            return
        kind = type(event)
        directory = self.domain.directory
        if kind is Held:
            self._held(event.user.encode(), event.item)
        elif kind is UserAdded:
            directory.learn({event.user: event.secret_hash}, {})
        elif kind is GroupAdded:
            directory.learn({}, {event.group: event.members})
        elif kind is Takeover:
            if event.node == self.store.node:
                self._give_up(event.user.encode(), event.by)
        elif kind is Released:
            waiting = self._handovers.pop((event.user.encode(), event.node), None)
            if waiting is not None:
                waiting.callback(None)
        elif kind is Reconnected:
            self._catch_up()

    def _held(self, user: bytes, item) -> None:
        session = self.domain.directory.sessions.get(user)
        if session is None:
            return
        if session.flush is not None:
            session.flush.live.append(item)
            return
        # One listener read brings many items: each user's go out in one
        # write, and end their holds in one store operation.
        if not self._arrived:
            self.clock.callLater(0, self._write_arrived)
        self._arrived.setdefault(user, []).append(item)

    def _write_arrived(self) -> None:
        arrived, self._arrived = self._arrived, {}
        sessions = self.domain.directory.sessions
        for user, items in arrived.items():
            session = sessions.get(user)
            if session is None:
                continue
            if session.flush is not None:
                session.flush.live.extend(items)
            elif session.takes_frames:
                # One BEHIND leaves them held: its flush after draining sends them.
                self.domain.delivery.send_items(session, items)

    def _give_up(self, user: bytes, by: str) -> None:
        """Another node has the user now: close ours, then say so once our changes are in."""
        session = self.domain.directory.sessions.get(user)
        if session is not None:
            self.log.info(
                "{user} logged in on node {node}: closing the connection here", user=user.decode(), node=by
            )
            self._close_elsewhere(session)
        # Queued after the closed session's last changes: committed with or after them.
        self.store.release_session(user.decode()).addErrback(kept)

    def _close_elsewhere(self, session: Session) -> None:
        """The user's session is on another node: end this one (12 03 09)."""
        self.domain.delivery.abandon(session)
        session.connection.close_with(wire.error(wire.ONLINE, wire.LOGGED_IN_ELSEWHERE))

    def _catch_up(self) -> None:
        """Events were missed while the listener was away: send each session what is held again."""
        sessions = self.domain.directory.sessions
        self.log.info("listener back: flushing again to {count} sessions", count=len(sessions))
        for session in list(sessions.values()):
            if session.state in (State.LIVE, State.FLUSHING, State.BEHIND):
                self.domain.delivery.start_flush(session)

    # -- ids this node has not heard of yet ------------------------------------

    def resolve(self, session: Session, ids: list[bytes], code: bytes, then) -> None:
        """Go on with ``then`` once every id is known here, asking the database
        for any that another node made a moment ago; the session's later frames
        wait, so their order holds."""
        directory = self.domain.directory
        missing = [i.decode() for i in ids if not directory.known(i)]
        if not missing:
            then()
            return
        d = self.store.lookup(missing)
        d.addCallback(lambda found: directory.learn(*found))
        d.addCallbacks(lambda _: then(), busy, errbackArgs=(session, code))
        session.connection.stall(d)

    def send_many(self, session: Session, items: list[tuple]) -> None:
        """A read's 05s, each the held way, once every destination is known."""
        delivery = self.domain.delivery

        def send_all():
            for item in items:
                delivery.send(session, *item)

        self.resolve(session, [item[1] for item in items], wire.SEND, send_all)

    # -- sessions ------------------------------------------------------------

    def come_online(self, session: Session) -> None:
        """Claim the user cluster-wide before the 04; live items wait in the flush meanwhile."""
        user = session.user
        session.to(State.CLAIMING)
        flush = session.flush = self.new_flush()
        sessions = self.domain.directory.sessions

        def wanted() -> bool:
            """Asked on the store's thread: a connection already gone (its client
            reconnected, maybe to another node) must not take the user."""
            return sessions.get(user) is session

        d = self.store.claim_session(user.decode(), self.clock.seconds(), wanted)
        d.addCallbacks(
            self._claimed, self._claim_failed, (session, user, flush), errbackArgs=(session, flush)
        )
        session.connection.stall(d)

    def _claimed(self, previous, session: Session, user: bytes, flush: Flush):
        if session.flush is not flush or self.domain.directory.sessions.get(user) is not session:
            return None
        if previous is SUPERSEDED:
            # A later login holds the user on another node: this one is the
            # older (its client has usually reconnected there already).
            self.log.info("{user} logged in again on another node: this login is dropped", user=user.decode())
            self._close_elsewhere(session)
            return None
        session.connection.write(wire.online_ok(user))
        delivery = self.domain.delivery
        if previous is None:
            self.log.info("{user} online", user=user.decode())
            delivery.start_flush(session, flush)
            return None
        self.log.info("{user} online, taken over from node {node}", user=user.decode(), node=previous)
        key = (user, previous)
        waiting = self._handovers[key] = Deferred()
        waiting.addTimeout(self.handover_timeout, self.clock)
        waiting.addErrback(self._handover_late, key, previous)
        waiting.addCallback(
            lambda _: delivery.start_flush(session, flush) if session.flush is flush else None
        )
        return None

    def _handover_late(self, failure, key, node: str) -> None:
        failure.trap(TimeoutError)
        self._handovers.pop(key, None)
        self.log.warn("node {node} did not release {user} in time: going on", node=node, user=key[0].decode())

    def _claim_failed(self, failure, session: Session, flush: Flush) -> None:
        user = session.user
        if session.flush is flush and self.domain.directory.sessions.get(user) is session:
            code = wire.ONLINE_SECRET if session.acknowledges else wire.ONLINE
            self.domain.delivery.abandon(session)
            busy(failure, session, code)
        else:
            failed(failure, "claiming a session")

    def flushed(self, session: Session, flush: Flush) -> None:
        """The pages are sent; wait until every item committed before them has come
        live too, then send the live ones the pages did not have."""
        d = self.store.sync()
        d.addCallbacks(self._synced, self._sync_failed, (session, flush), errbackArgs=(session, flush))

    def _sync_failed(self, failure, session: Session, flush: Flush) -> None:
        if failure.check(ListenerAway):
            # The listener dropped (a database restart, a cut connection). The
            # session stays FLUSHING, its live items waiting in the flush, and
            # the Reconnected event's catch-up flushes it again from the store.
            # Closing the login instead sent 12 03 11 for a blip.
            self.log.info(
                "the listener is away: {user}'s flush goes on once it is back",
                user=session.user.decode() if session.user else "a closed session",
            )
            return
        self.domain.delivery.flush_failed(failure, session, flush)

    def _synced(self, _, session: Session, flush: Flush) -> None:
        if session.flush is not flush or self.domain.directory.sessions.get(session.user) is not session:
            return
        fresh = [item for item in flush.live if item.seq not in flush.seqs]
        self.domain.delivery.flushed(session, flush, fresh)

    def went_offline(self, user: bytes) -> None:
        self.store.release_session(user.decode()).addErrback(kept)

    # -- what clients send ---------------------------------------------------

    def recorded(self, recorded, src, dst, ts, frame, recipients) -> None:
        """Committed, with a hold per recipient (and the 07, if already due): the listener brings them."""

    def completed(self, completed) -> None:
        """The store held each 07 in the transaction that completed its message: the listener brings it."""

    def notify(self, user: bytes, frame: bytes, code: int, src: str, dst: str, ts: int, text=None) -> None:
        """Every notice is an inbox row, on whichever node its user is."""
        self.store.hold(user.decode(), code, src, dst, ts, text).addErrback(kept)

    def seen_user(self, session: Session, peer: bytes, ts: bytes) -> None:
        d = self.store.hold(peer.decode(), HELD_SEEN, session.user.decode(), "", int(ts))
        d.addErrback(busy, session, wire.SEEN)

    def seen_group(self, session: Session, group: bytes, ts: bytes) -> None:
        # The low mark needs every member's mark, which only the database has.
        d = self.store.read_group(group.decode(), session.user.decode(), int(ts))
        d.addErrback(busy, session, wire.SEEN)

    def writes_to(self, members: list[bytes]) -> list[bytes]:
        """None: every member's notice is a held row the listener brings."""
        return []

    def members_added(self, group: bytes, users: list[bytes], mark: int) -> None:
        """The store set their read marks in the database, where the low mark is kept."""

    def member_left(self, group: bytes, user: bytes) -> None:
        """The store moved the low mark in the transaction that removed the member."""

    def add_group(self, group: bytes, ts: bytes, members: list[bytes]) -> Deferred:
        """Every member's 11, online or not, is a held row the listener brings."""
        names = [m.decode() for m in members]
        d = self.store.add_group(group.decode(), int(ts), names, names)
        d.addCallback(lambda _: [])
        return d
