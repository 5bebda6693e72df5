"""Groups: a 10 makes one, and every member gets its 11."""

from __future__ import annotations

from twisted.logger import Logger

from .. import wire
from ..store import HELD_ADDED
from .answers import busy
from .session import Session


class Groups:
    log = Logger()

    def __init__(self, directory, store, delivery, receipts, routing, max_groups_per_user: int = 0):
        self.directory = directory
        #: Groups one user may be a member of (0: no cap): a 10 past it for any member gets 12 10 11.
        self.max_groups_per_user = max_groups_per_user
        self.store = store
        self.delivery = delivery
        self.receipts = receipts
        self.routing = routing

    def _members(self, session: Session, listed: list[bytes]) -> list[bytes] | None:
        """The creator first, then the listed once each; None (with the error sent) if refused."""
        members = [session.user]
        for member in listed:
            if member not in members:
                members.append(member)
        if len(members) > wire.MAX_MEMBERS:
            session.connection.error(wire.CREATE_GROUP, wire.MALFORMED)
            return None
        users = self.directory.users
        if any(member not in users for member in members):
            session.connection.error(wire.CREATE_GROUP, wire.UNKNOWN_USER)
            return None
        cap = self.max_groups_per_user
        if cap and any(self.directory.memberships.get(member, 0) >= cap for member in members):
            session.connection.error(wire.CREATE_GROUP, wire.BUSY)
            return None
        return members

    def create(self, session: Session, ts: bytes, listed: list[bytes]) -> None:
        members = self._members(session, listed)
        if members is None:
            return
        group = self.directory.new_group_id()
        self.directory.joined(group, members)
        self.receipts.group_created(group)
        d = self.routing.add_group(group, ts, members)
        d.addCallbacks(self._created, self._not_created, (group, ts, members), errbackArgs=(session, group))
        self.log.info(
            "{user} created group {group} of {count}",
            user=session.user.decode(),
            group=group.decode(),
            count=len(members),
        )

    def _created(self, online: list[bytes], group: bytes, ts: bytes, members: list[bytes]) -> None:
        """Committed, with the 11 held for the members who were offline: the rest get it now."""
        frame = wire.added_to_group(group, ts, members)
        for member in online:
            self.delivery.notify(member, frame, HELD_ADDED, "", group.decode(), int(ts))

    def _not_created(self, failure, session: Session, group: bytes) -> None:
        """A group that was not stored is not handed out."""
        self.directory.forget_group(group)
        busy(failure, session, wire.CREATE_GROUP)
