"""The hub of one node among several that share a database.

Nothing goes from one session to another directly here: every delivery,
07, 09 and 11 is an inbox row, committed, and the store's listener brings
each new row to every node, in commit order; the node holding the user's
session writes it and ends the hold as a single server would. So a
message between two users on two nodes takes the same path as one
between two users on one, and a node that dies loses nothing: what it
had not written is still held.

A user has one session in the whole cluster. A login claims the user in
the database; the node that had them closes its connection (12 03 09),
commits what it was doing and says so (Released), and only then does
the new node read what is held, so nothing is written to both.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, TimeoutError
from twisted.logger import Logger

from . import wire
from .hub import Hub, Session, _Flush, _new_id
from .store import (
    HELD_SEEN,
    SUPERSEDED,
    GroupAdded,
    Held,
    Reconnected,
    Released,
    StoreUnavailable,
    Takeover,
    UserAdded,
)

#: Seconds a login waits for the node that had the user to let go; past it
#: (a node that hangs), the login goes on: a hold ends only once, so the
#: worst case is an item written to both connections.
HANDOVER_TIMEOUT = 3.0


class ClusterHub(Hub):
    log = Logger()
    track_flushes = True
    #: A sender's messages may come through other nodes: every one takes the held way.
    live_path = False

    def __init__(
        self, store, clock, require_secrets: bool = False, handover_timeout: float = HANDOVER_TIMEOUT
    ):
        super().__init__(store, require_secrets=require_secrets, max_held=0)
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
        d.addCallback(self.load)
        return d

    def load(self, snapshot) -> None:
        super().load(snapshot)
        early, self._early = self._early, None
        for event in early:
            self.event(event)

    # -- events from the store's listener ------------------------------------

    def event(self, event) -> None:
        if self._early is not None:
            self._early.append(event)
            return
        kind = type(event)
        if kind is Held:
            self._held(event.user.encode(), event.item)
        elif kind is UserAdded:
            self.users[event.user.encode()] = event.secret_hash
        elif kind is GroupAdded:
            self.groups[event.group.encode()] = [m.encode() for m in event.members]
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
        session = self.sessions.get(user)
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
        for user, items in arrived.items():
            session = self.sessions.get(user)
            if session is None:
                continue
            if session.flush is not None:
                session.flush.live.extend(items)
            elif not session.congested:
                # A congested session leaves them held: its flush after draining sends them.
                self._send_items(session, user, items)

    def _give_up(self, user: bytes, by: str) -> None:
        """Another node has the user now: close ours, then say so once our changes are in."""
        session = self.sessions.get(user)
        if session is not None:
            self.log.info(
                "{user} logged in on node {node}: closing the connection here", user=user.decode(), node=by
            )
            self._close_elsewhere(session)
        # Queued after the closed session's last changes: committed with or after them.
        self.store.release_session(user.decode()).addErrback(self._kept)

    def _close_elsewhere(self, session: Session) -> None:
        """The user's session is on another node: end this one (12 03 09)."""
        self._abandon(session)
        session.close_with(wire.error(wire.ONLINE, wire.LOGGED_IN_ELSEWHERE))
        session.user = None

    def _catch_up(self) -> None:
        """Events were missed while the listener was away: send each session what is held again."""
        self.log.info("listener back: flushing again to {count} sessions", count=len(self.sessions))
        for user, session in list(self.sessions.items()):
            if session.ready or session.flush is not None:
                self._start_flush(session, user)

    # -- sessions ------------------------------------------------------------

    def login(self, session: Session, user: bytes, secret: bytes | None, code: bytes) -> None:
        self._resolve(session, [user], code, lambda: Hub.login(self, session, user, secret, code))

    def _came_online(self, session: Session, user: bytes) -> None:
        """Claim the user cluster-wide before the 04; live items wait in the flush meanwhile."""
        session.ready = False
        flush = session.flush = _Flush(tracked=True)

        def wanted() -> bool:
            """Asked on the store's thread: a connection already gone (its client
            reconnected, maybe to another node) must not take the user."""
            return self.sessions.get(user) is session

        d = self.store.claim_session(user.decode(), self.clock.seconds(), wanted)
        d.addCallback(self._claimed, session, user, flush)
        d.addErrback(self._claim_failed, session, user, flush)
        session.stall(d)

    def _claimed(self, previous, session: Session, user: bytes, flush: _Flush):
        if session.flush is not flush or self.sessions.get(user) is not session:
            return None
        if previous is SUPERSEDED:
            # A later login holds the user on another node: this one is the
            # older (its client has usually reconnected there already).
            self.log.info("{user} logged in again on another node: this login is dropped", user=user.decode())
            self._close_elsewhere(session)
            return None
        session.emit(wire.online_ok(user))
        if previous is None:
            self.log.info("{user} online", user=user.decode())
            self._next_page(session, user)
            return None
        self.log.info("{user} online, taken over from node {node}", user=user.decode(), node=previous)
        key = (user, previous)
        waiting = self._handovers[key] = Deferred()
        waiting.addTimeout(self.handover_timeout, self.clock)
        waiting.addErrback(self._handover_late, key, previous)
        waiting.addCallback(lambda _: self._next_page(session, user) if session.flush is flush else None)
        return None

    def _handover_late(self, failure, key, node: str) -> None:
        failure.trap(TimeoutError)
        self._handovers.pop(key, None)
        self.log.warn("node {node} did not release {user} in time: going on", node=node, user=key[0].decode())

    def _claim_failed(self, failure, session: Session, user: bytes, flush: _Flush) -> None:
        failure.trap(StoreUnavailable)
        if session.flush is flush and self.sessions.get(user) is session:
            del self.sessions[user]
            session.flush = None
            session.user = None
            session.error(wire.ONLINE_SECRET if session.secret_session else wire.ONLINE, wire.BUSY)

    def _flushed(self, session: Session, user: bytes, flush: _Flush) -> None:
        """The pages are sent; wait until every item committed before them has come
        live too, then send the live ones the pages did not have."""
        d = self.store.sync()
        d.addCallback(self._synced, session, user, flush)
        d.addErrback(self._flush_failed, session, user, flush)

    def _synced(self, _, session: Session, user: bytes, flush: _Flush) -> None:
        if session.flush is not flush or self.sessions.get(user) is not session:
            return
        session.flush = None
        session.ready = True
        fresh = [item for item in flush.live if item.seq not in flush.seqs]
        if fresh:
            self._send_items(session, user, fresh)
        if flush.sent:
            self.log.info("flushed {count} held frames to {user}", count=flush.sent, user=user.decode())

    def logout(self, session: Session) -> None:
        user = session.user
        owner = user is not None and self.sessions.get(user) is session
        super().logout(session)
        if owner:
            self.store.release_session(user.decode()).addErrback(self._kept)

    # -- what clients send ---------------------------------------------------

    def send(self, session: Session, src: bytes, dst: bytes, ts: bytes, text: bytes, frame: bytes) -> None:
        self._resolve(session, [dst], wire.SEND, lambda: Hub.send(self, session, src, dst, ts, text, frame))

    def _recorded(self, recorded, src, dst, ts, frame, recipients, conversation=None) -> None:
        """Committed, with a hold per recipient (and the 07, if already due): the listener brings them."""

    def _completed(self, completed) -> None:
        """The store held each 07 in the transaction that completed its message."""

    def _notify(self, user: bytes, frame: bytes, code: int, src: str, dst: str, ts: int) -> None:
        self.store.hold(user.decode(), code, src, dst, ts).addErrback(self._kept)

    def seen(self, session: Session, peer: bytes, ts: bytes) -> None:
        self._resolve(session, [peer], wire.SEEN, lambda: self._seen(session, peer, ts))

    def _seen(self, session: Session, peer: bytes, ts: bytes) -> None:
        reader = session.user
        if peer in self.users:
            d = self.store.hold(peer.decode(), HELD_SEEN, reader.decode(), "", int(ts))
        else:
            members = self.groups.get(peer)
            if members is None:
                return session.error(wire.SEEN, wire.UNKNOWN_DESTINATION)
            if reader not in members:
                return session.error(wire.SEEN, wire.NOT_A_MEMBER)
            # The low mark needs every member's mark, which only the database has.
            d = self.store.read_group(peer.decode(), reader.decode(), int(ts))
        d.addErrback(self._busy, session, wire.SEEN)
        return None

    def create_group(self, session: Session, ts: bytes, listed: list[bytes]) -> None:
        self._resolve(session, listed, wire.CREATE_GROUP, lambda: self._create_group(session, ts, listed))

    def _create_group(self, session: Session, ts: bytes, listed: list[bytes]) -> None:
        members = self._group_members(session, listed)
        if members is None:
            return None
        creator = session.user
        group = _new_id(b"1", self.groups)
        self.groups[group] = members
        names = [m.decode() for m in members]
        # Every member's 11, online or not, is a held row the listener brings.
        d = self.store.add_group(group.decode(), int(ts), names, names)
        d.addErrback(self._group_failed, session, group)
        self.log.info(
            "{user} created group {group} of {count}",
            user=creator.decode(),
            group=group.decode(),
            count=len(members),
        )
        return None

    def _group_failed(self, failure, session: Session, group: bytes) -> None:
        failure.trap(StoreUnavailable)
        self.groups.pop(group, None)
        session.error(wire.CREATE_GROUP, wire.BUSY)

    # -- ids this node has not heard of yet ------------------------------------

    def _resolve(self, session: Session, ids: list[bytes], code: bytes, then) -> None:
        """Go on with ``then`` once every id is known here, asking the database
        for any that another node made a moment ago; the session's later frames
        wait, so their order holds."""
        missing = [i for i in ids if i not in self.users and i not in self.groups]
        if not missing:
            then()
            return
        d = self.store.lookup([i.decode() for i in missing])
        d.addCallback(self._learned)
        d.addCallbacks(lambda _: then(), self._busy, errbackArgs=(session, code))
        session.stall(d)

    def _learned(self, found) -> None:
        users, groups = found
        for user, secret_hash in users.items():
            self.users[user.encode()] = secret_hash
        for group, members in groups.items():
            self.groups[group.encode()] = [m.encode() for m in members]
