"""Groups: a 10 makes one (11 to every member); a member names it (17 → 18),
adds users (19 → the new 11) or leaves (20 → 21, and the new 11 to the rest).

Membership changes here at once, before the store commits, so that the
frames read after a 19 or 20 see it: a message sent after a 19 goes to the
new member too, and a 05 after a 20 is refused (12 05 07). A change the
store refuses is undone and answered 12 XX 11.
"""

from __future__ import annotations

from twisted.logger import Logger

from .. import wire
from ..store import HELD_ADDED, HELD_LEFT, HELD_SUBJECT, joined
from .answers import busy
from .session import Session


class Groups:
    log = Logger()

    def __init__(self, directory, store, delivery, receipts, routing, max_groups_per_user: int = 0):
        self.directory = directory
        #: Groups one user may be a member of (0: no cap): a 10 or 19 past it for any member gets 12 XX 11.
        self.max_groups_per_user = max_groups_per_user
        self.store = store
        self.delivery = delivery
        self.receipts = receipts
        self.routing = routing

    # -- 10: create --------------------------------------------------------------

    def _members(self, session: Session, listed: list[bytes]) -> list[bytes] | None:
        """The creator first, then the listed once each; None (with the error sent) if refused."""
        members = list(dict.fromkeys([session.user, *listed]))
        if self._refused(session, wire.CREATE_GROUP, 0, members):
            return None
        return members

    def _refused(self, session: Session, code: bytes, size: int, joining: list[bytes]) -> bool:
        """The checks a 10 and a 19 share, in the documented order, on the users
        ``joining`` a group of ``size`` members: past 99 (12 XX 01), a user that
        does not exist (12 XX 04), a user in --max-groups-per-user groups
        already (12 XX 11). True, with the error sent, if one fails."""
        if size + len(joining) > wire.MAX_MEMBERS:
            reason = wire.MALFORMED
        elif any(user not in self.directory.users for user in joining):
            reason = wire.UNKNOWN_USER
        elif self.max_groups_per_user and any(
            self.directory.memberships.get(user, 0) >= self.max_groups_per_user for user in joining
        ):
            reason = wire.BUSY
        else:
            return False
        session.connection.error(code, reason)
        return True

    def create(self, session: Session, ts: bytes, listed: list[bytes]) -> None:
        members = self._members(session, listed)
        if members is None:
            return
        group = self.directory.new_group_id()
        self.directory.set_members(group, members)
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
        text = joined(m.decode() for m in members)
        for member in online:
            self.delivery.notify(member, frame, HELD_ADDED, "", group.decode(), int(ts), text)

    def _not_created(self, failure, session: Session, group: bytes) -> None:
        """A group that was not stored is not handed out."""
        self.directory.forget_group(group)
        busy(failure, session, wire.CREATE_GROUP)

    # -- 17, 19, 20: what a member may do -------------------------------------------

    def _membership(self, session: Session, group: bytes, code: bytes) -> list[bytes] | None:
        """The group's members, if the session's user is one; None (with 12 XX 06 or 07 sent) if not."""
        members = self.directory.groups.get(group)
        if members is None:
            session.connection.error(code, wire.UNKNOWN_DESTINATION)
            return None
        if session.user not in members:
            session.connection.error(code, wire.NOT_A_MEMBER)
            return None
        return members

    def set_subject(self, session: Session, group: bytes, ts: bytes, name: bytes) -> None:
        """17: every member gets the 18, the sender included (held for the offline)."""
        members = self._membership(session, group, wire.SET_SUBJECT)
        if members is None:
            return
        src = session.user
        online = self.routing.writes_to(members)
        d = self.store.set_subject(group.decode(), src.decode(), int(ts), name, [m.decode() for m in online])
        d.addCallbacks(
            self._subject_set, busy, (group, src, ts, name, online), errbackArgs=(session, wire.SET_SUBJECT)
        )

    def _subject_set(
        self, members: list[str], group: bytes, src: bytes, ts: bytes, name: bytes, online
    ) -> None:
        frame = wire.subject(group, src, ts, name)
        committed = set(members)
        for member in online:
            if member.decode() in committed:
                self.delivery.notify(member, frame, HELD_SUBJECT, src.decode(), group.decode(), int(ts), name)

    def add(self, session: Session, group: bytes, ts: bytes, listed: list[bytes]) -> None:
        """19: the listed users not yet members join; every member gets the new 11,
        and each new one the group's 18 after it. Refused whole, or done whole."""
        members = self._membership(session, group, wire.ADD_MEMBERS)
        if members is None:
            return
        new = [user for user in dict.fromkeys(listed) if user not in members]
        if self._refused(session, wire.ADD_MEMBERS, len(members), new):
            return
        if not new:
            # Nothing changes: the sender alone gets the list as it is.
            text = joined(m.decode() for m in members)
            frame = wire.added_to_group(group, ts, members)
            self.delivery.notify(session.user, frame, HELD_ADDED, "", group.decode(), int(ts), text)
            return
        after = members + new
        self.directory.set_members(group, after)
        online = self.routing.writes_to(after)
        self.delivery.count_held(m for m in after if m not in online)  # their 11, held
        adding = self.delivery.adding.setdefault(group, {})
        for user in new:
            adding[user] = adding.get(user, 0) + 1
        d = self.store.add_members(
            group.decode(), int(ts), [u.decode() for u in new], [m.decode() for m in online]
        )
        d.addCallbacks(
            self._added, self._not_added, (group, ts, new, online), errbackArgs=(session, group, new)
        )
        self.log.info(
            "{user} added {count} to group {group}",
            user=session.user.decode(),
            count=len(new),
            group=group.decode(),
        )

    def _added(self, change, group: bytes, ts: bytes, new: list[bytes], online: list[bytes]) -> None:
        """Committed, with the 11 (and the new members' 18) held for the offline: the rest get them now."""
        self._committed(group, new)
        members = [m.encode() for m in change.members]
        self.routing.members_added(group, [m for m in new if m in members], change.read_mark)
        frame = wire.added_to_group(group, ts, members)
        text = joined(change.members)
        subject = change.subject
        if subject is not None:
            named = wire.subject(group, subject.src.encode(), wire.timestamp(subject.ts), subject.name)
        for member in online:
            if member not in members:
                continue
            self.delivery.notify(member, frame, HELD_ADDED, "", group.decode(), int(ts), text)
            if subject is not None and member in new:
                self.delivery.notify(
                    member, named, HELD_SUBJECT, subject.src, group.decode(), subject.ts, subject.name
                )

    def _not_added(self, failure, session: Session, group: bytes, new: list[bytes]) -> None:
        """Not stored: the users it would have added are not members."""
        self._committed(group, new)
        members = self.directory.groups.get(group)
        if members is not None:
            self.directory.set_members(group, [m for m in members if m not in new])
        busy(failure, session, wire.ADD_MEMBERS)

    def _committed(self, group: bytes, new: list[bytes]) -> None:
        """A 19's store operation answered: messages to the users it added may go live again."""
        adding = self.delivery.adding[group]
        for user in new:
            if adding[user] == 1:
                del adding[user]
            else:
                adding[user] -= 1
        if not adding:
            del self.delivery.adding[group]

    def leave(self, session: Session, group: bytes, ts: bytes) -> None:
        """20: the leaver gets 21, the members left the new 11. What was sent to
        the leaver stays theirs; what is sent from now on is not."""
        members = self._membership(session, group, wire.LEAVE_GROUP)
        if members is None:
            return
        user = session.user
        self.directory.set_members(group, [m for m in members if m != user])
        online = self.routing.writes_to(members)
        self.delivery.count_held(m for m in members if m not in online)  # their 11 or 21, held
        d = self.store.leave_group(group.decode(), user.decode(), int(ts), [m.decode() for m in online])
        d.addCallbacks(
            self._left,
            self._not_left,
            (group, user, ts, online),
            errbackArgs=(session, group, user, members.index(user)),
        )
        self.log.info("{user} left group {group}", user=user.decode(), group=group.decode())

    def _left(self, change, group: bytes, user: bytes, ts: bytes, online: list[bytes]) -> None:
        members = [m.encode() for m in change.members]
        if user in online:
            self.delivery.notify(user, wire.left_group(group, ts), HELD_LEFT, "", group.decode(), int(ts))
        frame = wire.added_to_group(group, ts, members)
        text = joined(change.members)
        for member in online:
            if member in members:
                self.delivery.notify(member, frame, HELD_ADDED, "", group.decode(), int(ts), text)
        self.routing.member_left(group, user)

    def _not_left(self, failure, session: Session, group: bytes, user: bytes, at: int) -> None:
        """Not stored: the user is still a member, where it was."""
        members = self.directory.groups.get(group)
        if members is not None and user not in members:
            self.directory.set_members(group, [*members[:at], user, *members[at:]])
        busy(failure, session, wire.LEAVE_GROUP)
