"""Read receipts: an 08 becomes a 09 for the sender, or moves a group's low mark."""

from __future__ import annotations

from .. import wire
from ..store import HELD_SEEN, next_low_mark
from .answers import busy, failed
from .session import Session


class Receipts:
    def __init__(self, directory, store, delivery, routing):
        self.directory = directory
        self.store = store
        self.delivery = delivery
        self.routing = routing
        self.read_marks: dict[bytes, dict[bytes, int]] = {}
        self.low_marks: dict[bytes, int] = {}

    def load(self, snapshot) -> None:
        self.read_marks = {
            g.encode(): {u.encode(): ts for u, ts in marks.items()}
            for g, marks in snapshot.read_marks.items()
        }
        self.low_marks = {g.encode(): ts for g, ts in snapshot.low_marks.items()}

    def seen(self, session: Session, peer: bytes, ts: bytes) -> None:
        reader = session.user
        if peer in self.directory.users:
            if self.delivery.full(peer):
                # Its 09 would be held past --max-held: refused, as a 05 would be.
                session.connection.error(wire.SEEN, wire.BUSY)
                return
            self.routing.seen_user(session, peer, ts)
            return
        members = self.directory.groups.get(peer)
        if members is None:
            session.connection.error(wire.SEEN, wire.UNKNOWN_DESTINATION)
            return
        if reader not in members:
            session.connection.error(wire.SEEN, wire.NOT_A_MEMBER)
            return
        self.routing.seen_group(session, peer, ts)

    def notify_seen(self, session: Session, peer: bytes, ts: bytes) -> None:
        """One server: the 09 goes to the sender through delivery's notices."""
        reader = session.user
        self.delivery.notify(peer, wire.seen_by(reader, ts), HELD_SEEN, reader.decode(), "", int(ts))

    def mark_read(self, session: Session, group: bytes, ts: bytes) -> None:
        """One server: raise the reader's mark, then look whether the low mark moves."""
        reader = session.user
        marks = self.read_marks.setdefault(group, {})
        when = int(ts)
        if when <= marks.get(reader, 0):
            return
        marks[reader] = when
        self.store.set_read_mark(group.decode(), reader.decode(), when).addErrback(busy, session, wire.SEEN)
        self.recheck(group)

    def recheck(self, group: bytes) -> None:
        """One server: look whether the group's low mark moves (a mark rose, a member left)."""
        d = self.store.group_messages_since(group.decode(), self.low_marks.get(group, 0))
        d.addCallbacks(self._advance_low_mark, failed, (group,), errbackArgs=("moving a group's low mark",))

    def members_added(self, group: bytes, users: list[bytes], mark: int) -> None:
        """One server: the new members' marks, as the store set them (the group's latest
        message, which they never get), so that they do not hold the low mark back."""
        marks = self.read_marks.setdefault(group, {})
        for user in users:
            marks[user] = mark
        self.recheck(group)

    def member_left(self, group: bytes, user: bytes) -> None:
        """One server: the low mark counts current members only, so it may move now."""
        self.read_marks.get(group, {}).pop(user, None)
        self.recheck(group)

    def _advance_low_mark(self, rows, group: bytes) -> None:
        """Move the group's low mark past every message all its readers have read."""
        members = self.directory.groups[group]
        low = self.low_marks.get(group, 0)
        new_low = next_low_mark(
            low, [(src.encode(), ts) for src, ts in rows], members, self.read_marks.get(group, {})
        )
        if new_low is None:
            return
        self.low_marks[group] = new_low
        self.store.set_low_mark(group.decode(), new_low).addErrback(failed, "storing a group's low mark")
        frame = wire.seen_by(group, wire.timestamp(new_low))
        for member in members:
            self.delivery.notify(member, frame, HELD_SEEN, group.decode(), "", new_low)

    def group_created(self, group: bytes) -> None:
        self.read_marks[group] = {}
        self.low_marks[group] = 0
