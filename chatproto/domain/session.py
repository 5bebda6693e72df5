"""A session: one connection's life as the domain sees it, in named states.

::

    CONNECTED --login--> [CLAIMING] --> FLUSHING --flushed--> LIVE
                                          ^                   |  ^
                                          |   behind          v  | (re-login: FLUSHING)
                                          +---drained---- BEHIND
    any --closed--> CLOSED        any --logout/other user--> CONNECTED

CLAIMING only where several nodes share a database: the user is claimed
cluster-wide before the 04. The connection's own pause (its transport's
buffer is full) is the connection's fact, not a state: a paused LIVE
session still takes frames, buffered, until its connection says it is
``behind`` (past half its buffer), when what is for it waits in the store.
"""

from __future__ import annotations

import enum

from zope.interface import Attribute, Interface


class State(enum.Enum):
    CONNECTED = "connected"
    CLAIMING = "claiming"
    FLUSHING = "flushing"
    LIVE = "live"
    BEHIND = "behind"
    CLOSED = "closed"


#: Each state and the states it may go to.
TRANSITIONS = {
    State.CONNECTED: {State.CONNECTED, State.CLAIMING, State.FLUSHING, State.CLOSED},
    State.CLAIMING: {State.CONNECTED, State.FLUSHING, State.CLOSED},
    State.FLUSHING: {State.CONNECTED, State.FLUSHING, State.LIVE, State.CLOSED},
    State.LIVE: {State.CONNECTED, State.FLUSHING, State.BEHIND, State.CLOSED},
    State.BEHIND: {State.CONNECTED, State.FLUSHING, State.CLOSED},
    State.CLOSED: {State.CLOSED},
}


class IllegalTransition(Exception):
    """A bug: the domain moved a session along an edge the diagram does not have."""


class IConnection(Interface):
    """What a session needs of its connection (the server's ChatProtocol)."""

    paused = Attribute("bool: its transport asked us to stop writing for now")

    def write(frame):
        """Write one frame; False when it was not written (the reader is being dropped)."""

    def write_many(frames, code=None):
        """The frames in one write; ``code``: every frame's, when the caller knows it."""

    def error(ref, reason):
        """Answer a frame with ``12 REF REASON``; the connection stays open."""

    def close_with(frame):
        """Write ``frame``, then close."""

    def stall(d):
        """Handle none of the connection's later frames until ``d`` fires (their order holds)."""


class Flush:
    """Where a flush of held items is: a cursor into the inbox, and the
    frames that must wait until everything held has been sent."""

    __slots__ = ("cursor", "offers", "asked_at", "page_owed", "sent", "frames", "seqs", "live")

    def __init__(self, tracked: bool = False):
        self.cursor = 0
        #: Messages held for the user since the flush began: while this moves,
        #: the inbox may hold more than the last page showed.
        self.offers = 0
        self.asked_at = 0
        #: The next page waits for the connection to drain.
        self.page_owed = False
        self.sent = 0
        #: (frame, notice to hold if the connection is lost, or None)
        self.frames: list[tuple[bytes, tuple | None]] = []
        #: Seqs of the items sent, and items that arrived live meanwhile: for
        #: routing whose live items may also be in a page (several nodes).
        self.seqs: set[int] | None = set() if tracked else None
        self.live: list = []


class Session:
    """One connection's user, state and conversations."""

    __slots__ = ("connection", "state", "user", "acknowledges", "flush", "conversations")

    def __init__(self, connection):
        self.connection = connection
        self.state = State.CONNECTED
        #: The logged-in user, or None.
        self.user: bytes | None = None
        #: Opened with 15: only its 16 counts as delivery.
        self.acknowledges = False
        #: The flush of what was held, while FLUSHING (or CLAIMING, in a cluster).
        self.flush: Flush | None = None
        #: Recipient id → Conversation, for the messages it sends (None until the first).
        self.conversations: dict | None = None

    def to(self, state: State) -> None:
        """The one way a session changes state."""
        if state not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"{self.state.name} -> {state.name}")
        self.state = state
        if state is not State.FLUSHING and state is not State.CLAIMING:
            self.flush = None
        if state is State.CONNECTED or state is State.CLOSED:
            self.user = None
            self.acknowledges = False
            # What its conversations know is the old user's: a new login asks again.
            self.conversations = None

    @property
    def takes_frames(self) -> bool:
        """Whether a frame for this user is written now; else it waits (in the
        flush, or held in the store)."""
        return self.state is State.LIVE

    @property
    def delivers_on_write(self) -> bool:
        """Whether a message written now has reached its reader (the live way):
        a 03 session that takes frames and whose transport is keeping up."""
        return self.state is State.LIVE and not self.acknowledges and not self.connection.paused

    def __repr__(self) -> str:
        user = self.user.decode() if self.user else "-"
        return f"<Session {user} {self.state.name}>"
