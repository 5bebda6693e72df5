"""Who exists and who is online: users, groups and the sessions of the logged-in.

The other domain modules share one Directory; its dicts are filled in place
(``load``), so a module may keep a reference to them.
"""

from __future__ import annotations

import secrets

from twisted.logger import Logger

from ..store import Snapshot
from ..wire import GROUP_FIRST, USER_FIRST


def new_id(first: bytes, taken) -> bytes:
    while True:
        candidate = first + b"%012d" % secrets.randbelow(10**12)
        if candidate not in taken:
            return candidate


class Directory:
    log = Logger()

    def __init__(self):
        #: user id → secret hash (str), or None for an account made with 01.
        self.users: dict[bytes, str | None] = {}
        #: group id → members, creator first. A change replaces the list (set_members),
        #: never edits it: a message waiting to go out keeps the list it was read with.
        self.groups: dict[bytes, list[bytes]] = {}
        #: user id → the session it is logged in on (here).
        self.sessions: dict = {}
        #: user id → how many groups it is a member of (for --max-groups-per-user).
        self.memberships: dict[bytes, int] = {}

    def load(self, snapshot: Snapshot) -> None:
        self.users.clear()
        self.users.update((u.encode(), h) for u, h in snapshot.users.items())
        self.groups.clear()
        self.groups.update((g.encode(), [m.encode() for m in ms]) for g, ms in snapshot.groups.items())
        self.memberships.clear()
        for members in self.groups.values():
            self._count(members, 1)
        self.log.info(
            "loaded {users} users and {groups} groups", users=len(self.users), groups=len(self.groups)
        )

    def learn(self, users: dict[str, str | None], groups: dict[str, list[str]]) -> None:
        """Users and groups another node made (a cluster's lookup or events)."""
        for user, secret_hash in users.items():
            self.users[user.encode()] = secret_hash
        for group, members in groups.items():
            self.set_members(group.encode(), [m.encode() for m in members])

    def set_members(self, group: bytes, members: list[bytes]) -> None:
        """A group's whole member list: a group made (here or on another node),
        or its members changed (added, left, or a change undone)."""
        old = self.groups.get(group)
        if old is not None:
            self._count(old, -1)
        self.groups[group] = members
        self._count(members, 1)

    def forget_group(self, group: bytes) -> None:
        """A group that was not stored after all."""
        members = self.groups.pop(group, None)
        if members is not None:
            self._count(members, -1)

    def _count(self, members: list[bytes], step: int) -> None:
        counts = self.memberships
        for member in members:
            counts[member] = counts.get(member, 0) + step

    def known(self, ident: bytes) -> bool:
        return ident in self.users or ident in self.groups

    def new_user_id(self) -> bytes:
        return new_id(USER_FIRST, self.users)

    def new_group_id(self) -> bytes:
        return new_id(GROUP_FIRST, self.groups)
