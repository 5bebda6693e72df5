"""The store: everything the server must not forget, behind one interface.

Every method returns a Deferred that fires once the change is committed, so
the server can promise nothing (a 02, a 07) before it is durable. Ids are
13-character ``str``, timestamps ``int`` and message text ``bytes`` (without
padding); the store knows nothing of frames.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import groupby
from operator import itemgetter
from typing import NamedTuple, TypeVar

from zope.interface import Attribute, Interface

from ..wire import GROUP_FIRST, ID_LEN

_GROUP_FIRST = GROUP_FIRST.decode()


def to_group(column: str = "dst") -> str:
    """The group-id rule (wire.GROUP_FIRST) as SQL, for a destination column.

    Written as a range rather than a prefix test so that the partial index on
    group destinations (``WHERE dst >= '1'``, in the schema files) is usable.
    """
    return f"{column} >= '{_GROUP_FIRST}'"


def is_group(dst: str) -> bool:
    """``to_group`` for an id already read from the database."""
    return dst >= _GROUP_FIRST


def to_user(column: str = "dst") -> str:
    """The complement of ``to_group``: a direct message's destination."""
    return f"{column} < '{_GROUP_FIRST}'"


# What record_message found.
NEW = "new"
DUPLICATE_PENDING = "duplicate-pending"
DUPLICATE_DELIVERED = "duplicate-delivered"

# Codes of inbox items: what is held for a user until their next login.
HELD_MESSAGE = 6
HELD_DELIVERED = 7
HELD_SEEN = 9
HELD_ADDED = 11
HELD_SUBJECT = 18
HELD_LEFT = 21


class InboxItem(NamedTuple):
    """One thing held for a user, in the order it was queued.

    For a message (code 6): src, dst, ts, text and msg_id. For a 07: dst and
    ts; for a 09: src and ts; for an 11: dst (the group), ts, and as text
    the members then, their ids joined (None in a row held before schema
    version 6: the group's members now); for an 18: src (who set it), dst
    (the group), ts and as text the name; for a 21: dst (the group) and ts.
    """

    seq: int
    code: int
    src: str
    dst: str
    ts: int
    text: bytes | None
    msg_id: int | None


class Recorded(NamedTuple):
    msg_id: int
    status: str
    #: True when no recipient is left to deliver to: the sender's 07 is due.
    complete: bool


class Subject(NamedTuple):
    """A group's subject: who set it, the 17's TIMESTAMP, the name (unpadded)."""

    src: str
    ts: int
    name: bytes


class GroupChange(NamedTuple):
    """What a committed change of a group's members left."""

    #: The members after the change, in their order (the 11's list).
    members: list[str]
    #: The group's subject, for the 18 an added member gets after its 11; None if it has none.
    subject: Subject | None = None
    #: The read mark the added members start with: the group's latest message,
    #: which they never get, so they do not hold its low mark back.
    read_mark: int = 0


def joined(members: Iterable[str]) -> bytes:
    """A held 11's text: its members' ids, one after the other (13 bytes each)."""
    return "".join(members).encode()


def split_members(text: bytes) -> list[bytes]:
    """``joined`` read back, as the 11's MEMBER fields."""
    return [text[i : i + ID_LEN] for i in range(0, len(text), ID_LEN)]


def added_notices(group_id, ts, members, new, subject, online) -> list[tuple]:
    """What a 19 holds, as (user, code, src, dst, ts, text) rows: the new 11
    for every member not ``online``, and right after it, for each one just
    added (``new``), the group's 18 if it has a subject."""
    body = joined(members)
    rows = []
    for user_id in members:
        if user_id in online:
            continue
        rows.append((user_id, HELD_ADDED, "", group_id, ts, body))
        if subject is not None and user_id in new:
            rows.append((user_id, HELD_SUBJECT, subject.src, group_id, subject.ts, subject.name))
    return rows


def left_notices(group_id, user_id, ts, members, online) -> list[tuple]:
    """What a 20 holds, rows as ``added_notices``: the leaver's 21, and the 11
    of the ``members`` who remain, for those not ``online``."""
    body = joined(members)
    rows = [(user_id, HELD_LEFT, "", group_id, ts, None)] if user_id not in online else []
    rows += [(member, HELD_ADDED, "", group_id, ts, body) for member in members if member not in online]
    return rows


class Completed(NamedTuple):
    """A message whose last recipient just got it: its sender's 07 is due."""

    src: str
    dst: str
    ts: int


DAY = 86400


class Retention(NamedTuple):
    """How long the server keeps what it no longer needs for delivery, in seconds.

    The defaults keep no text a recipient already has, a delivered message's
    identity long enough for a phone that was off for a month to resend it,
    and every undelivered message until its recipient comes for it.
    """

    #: A delivered message's identity (sender, destination, TIMESTAMP, a
    #: hash of its text): a resend within it gets its 07 again and is not
    #: delivered twice; after it a resend is a new message.
    dedup_window: int = 30 * DAY
    #: A delivered message's text (0: deleted the moment its last recipient has it).
    keep_delivered: int = 0
    #: Messages held for a user who has not logged in or out for this long
    #: are dropped (0: never).
    expire_held: int = 0

    @property
    def mark_every(self) -> int:
        """Seconds between two retention marks, the precision of every age: a
        minute, or a tenth of the shortest age kept if that is shorter."""
        ages = [self.dedup_window] + ([self.keep_delivered] if self.keep_delivered else [])
        return max(1, min([60, *(age // 10 for age in ages)]))


#: The defaults, for a store made without a policy (the tests').
DEFAULT_RETENTION = Retention()

#: ``Keeping.text_cutoff`` without an archive: every delivered text goes.
EVERY_ID = 1 << 62


class Keeping:
    """A store's retention policy and housekeeping progress, used on its database thread.

    ``text_cutoff``: a message with an id up to it loses its text the moment
    its last recipient has it (every id without ``--keep-delivered``; with it,
    the ids stored that long ago, moved on by each housekeeping pass). The
    cursors are where the next pass goes on (ids, oldest first).
    """

    __slots__ = ("retention", "text_cutoff", "identity_cursor", "text_cursor")

    def __init__(self, retention: Retention = DEFAULT_RETENTION):
        self.retention = retention
        self.text_cutoff = 0 if retention.keep_delivered else EVERY_ID
        self.identity_cursor = 0
        self.text_cursor = 0

    @property
    def archive(self) -> bool:
        """Whether a delivered message keeps its text for a while (``--keep-delivered``)."""
        return self.retention.keep_delivered > 0


class Swept(NamedTuple):
    """What one housekeeping pass removed."""

    #: Delivered messages whose identity outlived the window (and their archived text).
    identities: int = 0
    #: Archived texts past --keep-delivered (the identity stays for its window).
    texts: int = 0
    #: user id → messages held for them that --expire-held dropped.
    held: dict[str, int] = {}
    #: A batch was full: another pass should follow soon.
    more: bool = False


class Snapshot(NamedTuple):
    """What the server keeps in memory, read once at start-up."""

    users: dict[str, str | None]
    groups: dict[str, list[str]]
    read_marks: dict[str, dict[str, int]]
    low_marks: dict[str, int]
    #: user id → items held for them, messages and notices (for --max-held).
    held: dict[str, int] = {}


class _Superseded:
    """claim_session's answer when a later login holds the user on another node."""

    def __repr__(self) -> str:
        return "SUPERSEDED"


SUPERSEDED = _Superseded()


class StoreUnavailable(Exception):
    """The database cannot be reached now: the server answers 12 XX 11 (busy)."""


class ListenerAway(StoreUnavailable):
    """A clustered store's listener is not connected, so a sync cannot be
    answered now; a ``Reconnected`` event follows once it is back."""


class SchemaError(Exception):
    """The database's schema cannot be used: ``twist chat`` says why and exits."""


class DatabaseTooNew(SchemaError):
    """The database was written by a newer chatproto than this one."""


class UpgradeFailed(SchemaError):
    """Upgrading an older database failed; it was left as it was."""


Id = TypeVar("Id")


def next_low_mark(
    low: int, rows: Iterable[tuple[Id, int]], members: Iterable[Id], marks: Mapping[Id, int]
) -> int | None:
    """The group's new low mark, or None if it stays at ``low``.

    ``rows`` are the group's (sender, ts) after ``low``, by ts; ``marks`` the
    members' read marks. A message counts as read when every member but its
    sender has a read mark at or past it; messages sharing a timestamp move
    the mark together. Written once, for the hub and the clustered store.
    """
    members = list(members)
    new_low = low
    for when, same_time in groupby(rows, key=itemgetter(1)):
        if when <= low:
            continue
        senders = {src for src, _ in same_time}
        if not all(marks.get(m, 0) >= when for sender in senders for m in members if m != sender):
            break
        new_low = when
    return new_low if new_low > low else None


# What a clustered store's listener hands the hub, one event per notification.


class Held(NamedTuple):
    """``item`` was committed to ``user``'s inbox (on any node)."""

    user: str
    item: InboxItem


class UserAdded(NamedTuple):
    user: str
    secret_hash: str | None


class GroupAdded(NamedTuple):
    group: str
    members: list[str]


class Takeover(NamedTuple):
    """``node`` must close its session of ``user``: it logged in on ``by``."""

    user: str
    node: str
    by: str


class Released(NamedTuple):
    """``node`` no longer writes to ``user``, and what it did is committed."""

    user: str
    node: str


class Reconnected(NamedTuple):
    """The listener lost its connection and has it back: events may be missing."""


class IChatStore(Interface):
    backlog = Attribute(
        "int: work submitted and not yet committed (an operation counts one, a run of messages "
        "one per message), for backpressure."
    )

    def load():
        """Deferred[Snapshot]: users (id → secret hash or None), groups and read marks."""

    def add_user(user_id, secret_hash):
        """Deferred[None]: a new account; secret_hash is None for one made with 01."""

    def add_group(group_id, ts, members, hold_for):
        """Deferred[None]: a new group, with an 11 held for each of ``hold_for``."""

    def record_message(src, dst, ts, text, recipients, answer=None):
        """Deferred[Recorded]: store a message, held for each recipient, unless stored already.

        With ``answer`` (anything with ``callback`` and ``errback``), the
        result goes there and nothing is returned: the server's hot path
        makes no Deferred per message (Deferreds were about a tenth of the
        server's time under load, bench/profile.txt).

        A message that repeats a stored one (same src, dst, ts and text)
        changes nothing. A recipient's hold ends with mark_delivered or
        acknowledge, so a message written to a connection just before a
        crash is still held after it.
        """

    def record_delivered(src, dst, stamped, answer=None):
        """Deferred[None]: messages from src already written to dst, a user or
        every other member of a group (a list of (ts, text)).

        Each is stored as delivered, with no hold; one that repeats a stored
        message changes nothing but ends the hold it still had for a user
        dst. The caller owes the 07s. ``answer`` as for record_message.
        """

    def latest_timestamp(src, dst):
        """Deferred[int]: the highest TIMESTAMP stored for a message from src to dst, 0 if none."""

    def mark_delivered(user_id, msg_ids):
        """Deferred[list[Completed]]: these messages reached user_id.

        Each message's sender is owed a 07 once, when its last recipient is
        marked; marking a message twice completes nothing.
        """

    def mark_reached(msg_id, user_ids, answer=None):
        """Deferred[list[Completed]]: one message reached these users (a group's fan-out in one go).

        ``answer`` as for record_message.
        """

    def acknowledge(user_id, src, dst, ts):
        """Deferred[list[Completed]]: user_id acknowledged (16) the message src→dst at ts."""

    def hold(user_id, code, src, dst, ts, text=None):
        """Deferred[None]: keep a 07, 09, 11, 18 or 21 for user_id's next login
        (``text``: an 11's members, ``joined``, or an 18's name)."""

    def seen(user_id):
        """Deferred[None]: user_id logged in or out now (what --expire-held measures from)."""

    def sweep(now, online):
        """Deferred[Swept]: one housekeeping pass, a small batch of each kind.

        ``now`` is Unix seconds; ``online`` the user ids with a session here,
        whose held messages --expire-held never drops. Delivered messages
        stored longer ago than the dedup window lose their identity (a group
        message only once every member has read it, as its 09 needs it);
        with an archive, delivered texts older than it lose their text.
        """

    def inbox(user_id, after=0, limit=None):
        """Deferred[list[InboxItem]]: what is held for user_id after seq ``after``, oldest first."""

    def drop(user_id, seqs):
        """Deferred[None]: forget held 07/09/11/18/21 items once they were sent."""

    def set_subject(group_id, src, ts, name, online):
        """Deferred[list[str]]: the group's subject is ``name``, set by src at ts; its members.

        An 18 is held for every member not in ``online`` (the ones the
        caller writes to itself once this is committed), replacing the
        group's 18 still held for them, if any: it said nothing more.
        """

    def add_members(group_id, ts, added, online):
        """Deferred[GroupChange]: the users of ``added`` not yet members join the group, last.

        Their read mark starts at the group's latest message. Every member
        after the change not in ``online`` has the new 11 held (its text the
        members, ``joined``), and each added one not in ``online`` the
        group's 18 right after it, if the group has a subject.
        """

    def leave_group(group_id, user_id, ts, online):
        """Deferred[GroupChange]: user_id is no longer a member; the members left.

        What was held for user_id stays held. A 21 is held for user_id and
        the new 11 for each remaining member, unless in ``online``. A
        clustered store also moves the group's low mark, as ``read_group``.
        """

    def set_read_mark(group_id, user_id, ts):
        """Deferred[None]: user_id has read group_id up to ts."""

    def set_low_mark(group_id, ts):
        """Deferred[None]: every member has read group_id up to ts."""

    def group_messages_since(group_id, ts):
        """Deferred[list[tuple[str, int]]]: (src, ts) of the group's messages after ts, by ts."""

    def barrier():
        """Deferred[None]: fires once everything submitted before it is committed."""

    def caught_up():
        """Deferred[None]: fires once the backlog is down to one transaction's worth."""

    def close():
        """Deferred[None]: finish what was submitted, then release the database."""


class IClusterStore(IChatStore):
    """A store several nodes share: every inbox row, user and group it commits
    is announced to every node's listener, in commit order.

    A message that completes (its last hold ends, a resend of a delivered
    one, a group with no one else) gets its sender's 07 held in the same
    transaction, so a 07 is never lost between two transactions.
    """

    node = Attribute("str: this node's id, unique per process")

    def listen(handler):
        """Deferred[None]: start the listener; ``handler(event)`` runs on the reactor for each event."""

    def sync():
        """Deferred[None]: fires once the listener has seen every event committed before this call."""

    def lookup(ids):
        """Deferred[tuple[dict[str, str | None], dict[str, list[str]]]]: the users and groups among ids."""

    def read_group(group_id, user_id, ts):
        """Deferred[int | None]: raise user_id's read mark; the group's new low mark if it moved.

        A moved low mark holds a 09 (src = the group, ts = the low mark) for every member.
        """

    def claim_session(user_id, since=None, wanted=None):
        """Deferred[str | None]: make this node the user's; the live node that must release first.

        That node is sent a Takeover in the same transaction. ``since`` is
        when the login arrived (Unix seconds; now if None): if another live
        node holds the user for a later login, the claim changes nothing and
        answers SUPERSEDED, since the connection it is for is the older one
        (typically already closed by a client that reconnected elsewhere).
        ``wanted``, if given, is asked on the store's thread just before: a
        claim no longer wanted (its connection is gone) changes nothing and
        answers None.
        """

    def release_session(user_id):
        """Deferred[None]: this node gave up the user's session; announces Released."""
