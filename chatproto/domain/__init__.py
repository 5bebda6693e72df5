"""The domain: who is online, where each frame goes, and what must be held.

It does no I/O of its own: it writes through each session's connection
(``session.IConnection``) and keeps everything durable through the store,
answering only after the store has committed (a 02 after the account is
stored, a 07 after the delivery is). One module per job:

- ``session``: a connection's life in named states;
- ``directory``: users, groups and who is online;
- ``accounts``: 01/13 and 03/15;
- ``delivery``: 05 → 06 and 07, the live and held ways, the flush, 16;
- ``receipts``: 08 → 09 and a group's low mark;
- ``groups``: 10 → 11, and a member's 17 → 18, 19 → 11, 20 → 21;
- ``routing``: one server (``LocalRouting``) or several sharing a database
  (``DatabaseRouting``).

Ids and timestamps stay the raw ``bytes`` of the frames here; they become
``str`` and ``int`` only at the store's boundary.
"""

from __future__ import annotations

from .. import wire
from .accounts import Accounts, hash_secret
from .delivery import FLUSH_PAGE, Delivery
from .directory import Directory
from .groups import Groups
from .receipts import Receipts
from .routing import DatabaseRouting, LocalRouting
from .session import IConnection, Session, State

__all__ = [
    "Domain",
    "DatabaseRouting",
    "LocalRouting",
    "IConnection",
    "Session",
    "State",
    "FLUSH_PAGE",
    "hash_secret",
]


class Domain:
    """Every job wired together; what a connection calls, one method per frame.

    ``routing`` is built here with the domain, so that its strategy can
    reach the jobs it routes for (``routing(domain)``, or a partial of
    ``DatabaseRouting`` with its clock).
    """

    #: Groups one user may be a member of, by default: a classroom's many
    #: project groups, far short of what fills a disk with 11s.
    MAX_GROUPS_PER_USER = 500

    def __init__(
        self,
        store,
        routing=LocalRouting,
        require_secrets: bool = False,
        max_held: int = 0,
        max_groups_per_user: int = 0,
    ):
        self.store = store
        self.directory = Directory()
        self.routing = routing(self)
        self.delivery = Delivery(self.directory, store, self.routing, max_held=max_held)
        self.accounts = Accounts(self.directory, store, self.delivery, self.routing, require_secrets)
        self.receipts = Receipts(self.directory, store, self.delivery, self.routing)
        self.groups = Groups(
            self.directory, store, self.delivery, self.receipts, self.routing, max_groups_per_user
        )

    def start(self):
        """Deferred: the store's snapshot loaded (and, for a cluster, the listener started)."""
        return self.routing.start()

    def load(self, snapshot) -> None:
        self.directory.load(snapshot)
        self.delivery.load(snapshot)
        self.receipts.load(snapshot)

    @property
    def sessions(self) -> dict:
        return self.directory.sessions

    @property
    def backlog(self) -> int:
        """Messages read and not yet committed, for backpressure."""
        return self.delivery.backlog

    # -- what a connection calls ---------------------------------------------

    def open(self, connection) -> Session:
        return Session(connection)

    def register(self, session: Session, with_secret: bool) -> None:
        self.accounts.register(session, with_secret)

    def login(self, session: Session, user: bytes, secret: bytes | None, code: bytes) -> None:
        self.routing.resolve(session, [user], code, lambda: self.accounts.login(session, user, secret, code))

    def send_many(self, session: Session, items: list[tuple]) -> None:
        """A read's 05s, in order: (src, dst, ts, text, 06 frame) each."""
        self.routing.send_many(session, items)

    def seen(self, session: Session, peer: bytes, ts: bytes) -> None:
        self.routing.resolve(session, [peer], wire.SEEN, lambda: self.receipts.seen(session, peer, ts))

    def received(self, session: Session, src: bytes, dst: bytes, ts: bytes) -> None:
        self.delivery.received(session, src, dst, ts)

    def create_group(self, session: Session, ts: bytes, listed: list[bytes]) -> None:
        self.routing.resolve(
            session, listed, wire.CREATE_GROUP, lambda: self.groups.create(session, ts, listed)
        )

    def set_subject(self, session: Session, group: bytes, ts: bytes, name: bytes) -> None:
        self.routing.resolve(
            session, [group], wire.SET_SUBJECT, lambda: self.groups.set_subject(session, group, ts, name)
        )

    def add_members(self, session: Session, group: bytes, ts: bytes, listed: list[bytes]) -> None:
        self.routing.resolve(
            session, [group, *listed], wire.ADD_MEMBERS, lambda: self.groups.add(session, group, ts, listed)
        )

    def leave_group(self, session: Session, group: bytes, ts: bytes) -> None:
        self.routing.resolve(
            session, [group], wire.LEAVE_GROUP, lambda: self.groups.leave(session, group, ts)
        )

    def behind(self, session: Session) -> None:
        self.delivery.behind(session)

    def drained(self, session: Session) -> None:
        self.delivery.drained(session)

    def logout(self, session: Session, closed: bool = False) -> None:
        self.accounts.logout(session, closed)
