"""A client any front end can drive: the connection, a local model and its store.

The model knows nothing of sockets or screens: frames come in through
:class:`ChatClientProtocol`, which it answers through the connection it was
given at login, and front ends watch it through listeners. Everything a user
would miss after a restart (identity, contacts, groups, history, the outbox)
lives in one SQLite file per profile, written before the server is told
anything that depends on it (a 16 only after the 06 is committed locally).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from . import keepalive, wire

QUEUED = "queued"
SENT = "sent"
DELIVERED = "delivered"
READ = "read"
FAILED = "failed"
#: Seconds before the outbox goes again after the server said it is busy (12 05 11).
BUSY_RETRY = 3.0
BUSY_RETRY_MAX = 60.0
#: A state only ever moves up this ranking (a late 07 never undoes a 09).
_RANK = {QUEUED: 0, SENT: 1, FAILED: 1, DELIVERED: 2, READ: 3}

#: What a line of a conversation is: a message someone wrote, or a note of a change in a group
#: (the frame's TIMESTAMP; ``src`` who did it when known, ``text`` the ids concerned or the subject).
TEXT = "text"
ADDED = "added"
LEFT = "left"
SUBJECT = "subject"

#: Where this profile stands in a group (Group.state): a member, or a former one (its 21
#: came; the history stays). FORMER's value is the note's LEFT, as stored since schema step 1.
MEMBER = "member"
FORMER = "left"

CONNECTED = "connected"
RECONNECTING = "reconnecting"
OFFLINE = "offline"

LOGIN_TIMEOUT = 30.0
_ENDPOINT_TYPES = frozenset({"tcp", "tcp6", "tls", "ssl", "unix", "tor", "onion", "systemd", "host"})


class ProfileError(Exception):
    """A profile that cannot be used safely; the message is a sentence for the user."""


# -- profile: where it lives, who we are ---------------------------------


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "chatproto")


def endpoint_description(value: str) -> str:
    """A bare ``host:port`` or port is shorthand for TCP; anything else is a Twisted endpoint string."""
    if value.isdigit():
        return f"tcp:localhost:{value}"
    head, sep, port = value.rpartition(":")
    if sep and port.isdigit() and ":" not in head and head.lower() not in _ENDPOINT_TYPES:
        return f"tcp:{head}:{port}"
    return value


def endpoint_address(description: str) -> str:
    """What to call a server on screen: ``host:port`` of a TCP or TLS endpoint, a socket's path."""
    kind, _, rest = endpoint_description(description).partition(":")
    args = [a for a in rest.split(":") if "=" not in a]
    if not args:
        return description
    return args[0] if kind == "unix" else ":".join(args[:2])


def failure_reason(failure) -> tuple[str, str]:
    """Why a connection failed or was lost: a phrase for the status line, and a shorter one."""
    from twisted.internet import error

    value = failure.value
    text = str(value)
    if "certificate verify failed" in text or type(value).__name__ in ("VerificationError",):
        return "certificate not trusted: see --server tls:…:trustRoots=", "certificate not trusted"
    if failure.check(error.ConnectionRefusedError):
        return "connection refused", "refused"
    if failure.check(error.DNSLookupError):
        return "no such host", "no such host"
    if failure.check(error.TimeoutError, error.TCPTimedOutError):
        return "timed out", "timed out"
    if failure.check(error.NoRouteError):
        return "no route to host", "no route"
    if failure.check(error.ConnectionDone, error.ConnectionLost):
        return "the connection closed", "closed"
    if type(value).__module__.startswith("OpenSSL"):
        return f"TLS failed ({text[:60]})", "TLS failed"
    return failure.getErrorMessage()[:80], "error"


@dataclass(frozen=True)
class Identity:
    user: str
    secret: str


def load_identity(path: str) -> Identity | None:
    """The saved id and secret, or None on a first run.

    A file that others can read is refused, not used: its secret is the whole account.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    if mode & 0o077:
        raise ProfileError(
            f"{path} can be read by other users, so its secret may be known. "
            f"Run 'chmod 600 {path}' if you trust it, and start again."
        )
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    user, secret = data.get("id", ""), data.get("secret", "")
    if not (wire.is_user_id(user.encode()) and wire.is_secret(secret.encode())):
        raise ProfileError(f"{path} does not hold a valid id and secret.")
    return Identity(user, secret)


def save_identity(path: str, identity: Identity) -> None:
    """Written beside the target with mode 0600 and renamed over it, so it is never half there."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, json.dumps({"id": identity.user, "secret": identity.secret}).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def split_text(text: str, limit: int = wire.MSG_LEN) -> list[str]:
    """The pieces to send: each at most ``limit`` UTF-8 bytes, cut at the last space (or line
    end) that fits, which the cut takes; between characters only when one word is too long.

    NULs cannot travel (the field is NUL-padded), line ends become ``\\n`` and
    trailing blanks are dropped; nothing but blanks means nothing to send.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\0", "")
    text = text.encode("utf-8", "replace").decode("utf-8").rstrip().lstrip("\n")
    if not text:
        return []
    parts: list[str] = []
    while len(text.encode("utf-8")) > limit:
        size = 0
        cut = 0
        for ch in text:
            size += len(ch.encode("utf-8"))
            if size > limit:
                break
            cut += 1
        # A space just past the limit ends a word that fits exactly.
        space = max(text.rfind(" ", 0, cut + 1), text.rfind("\n", 0, cut + 1))
        if space > 0 and text[:space].strip():
            parts.append(text[:space])
            text = text[space + 1 :]
        else:
            parts.append(text[:cut])
            text = text[cut:]
    if text.strip():
        parts.append(text)
    return parts


# -- the model's data ----------------------------------------------------


@dataclass(eq=False)
class Message:
    conv: str
    src: str
    dst: str
    ts: int
    text: str
    outgoing: bool
    state: str
    #: Local wall-clock time it was written or received.
    at: float
    id: int | None = None
    #: TEXT, or a note of a group change (ADDED, LEFT, SUBJECT): never counted as unread or read.
    kind: str = TEXT

    @property
    def incoming(self) -> bool:
        """Written by someone else: what counts as unread and is reported read (not a note)."""
        return not self.outgoing and self.kind == TEXT


@dataclass(eq=False)
class Group:
    """A group as the server last described it: members (11), subject (18), and whether we left (21)."""

    id: str
    members: list[str]
    subject: str = ""
    subject_by: str = ""
    subject_ts: int = 0
    state: str = MEMBER


@dataclass(eq=False)
class Conversation:
    id: str
    messages: list[Message] = field(default_factory=list)
    unread: int = 0
    last_activity: float = 0.0
    #: Newest incoming timestamp the user has had on screen.
    read_upto: int = 0
    #: Newest timestamp named in an 08 written to a logged-in connection.
    read_sent: int = 0
    #: Last timestamp we used here: the next must be larger.
    last_out_ts: int = 0

    @property
    def is_group(self) -> bool:
        return self.id.startswith("1")

    def newest_incoming(self) -> int:
        return max((m.ts for m in self.messages if m.incoming), default=0)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS names (id TEXT PRIMARY KEY, nickname TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS groups (id TEXT PRIMARY KEY, members TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    unread INTEGER NOT NULL DEFAULT 0,
    last_activity REAL NOT NULL DEFAULT 0,
    read_upto INTEGER NOT NULL DEFAULT 0,
    read_sent INTEGER NOT NULL DEFAULT 0,
    last_out_ts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conv TEXT NOT NULL,
    src TEXT NOT NULL,
    dst TEXT NOT NULL,
    ts INTEGER NOT NULL,
    text TEXT NOT NULL,
    outgoing INTEGER NOT NULL,
    state TEXT NOT NULL,
    at REAL NOT NULL,
    UNIQUE (src, dst, ts, text)
);
CREATE INDEX IF NOT EXISTS messages_by_conv ON messages (conv, id);
"""

#: Steps from each PRAGMA user_version to the next, run in order on open: a profile made by
#: an older client keeps its history. 0 -> 1: group subjects, leaving, notes of group changes.
_STEPS = [
    """
    ALTER TABLE groups ADD COLUMN subject TEXT NOT NULL DEFAULT '';
    ALTER TABLE groups ADD COLUMN subject_by TEXT NOT NULL DEFAULT '';
    ALTER TABLE groups ADD COLUMN subject_ts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE groups ADD COLUMN state TEXT NOT NULL DEFAULT 'member';
    ALTER TABLE messages ADD COLUMN kind TEXT NOT NULL DEFAULT 'text';
    """,
]


def cut_name(name: str) -> str:
    """A group subject as it may travel: one line, no NULs, at most NAME_LEN bytes of UTF-8,
    cut between characters (the contract's rule for a longer name)."""
    name = " ".join(name.replace("\0", "").split())
    data = name.encode("utf-8", "replace")[: wire.NAME_LEN]
    return data.decode("utf-8", "ignore").rstrip()


class LocalStore:
    """One profile's SQLite file, plus a lock so two clients never share a profile.

    Writes are small and autocommitted (WAL, synchronous=NORMAL): each call
    returns once its row is durable against a crash of this process, which is
    what the 16 after a 06 needs. Between :meth:`begin` and :meth:`commit` they
    are one transaction instead: a burst of frames costs one commit, not one a row.
    """

    def __init__(self, directory: str):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.directory = directory
        self.identity_path = os.path.join(directory, "identity.json")
        self._lock = open(os.path.join(directory, "lock"), "w")  # noqa: SIM115 - held for the store's life
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise ProfileError(f"Another chat client is already using the profile in {directory}.") from None
        self.db = sqlite3.connect(os.path.join(directory, "client.sqlite3"), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        self._upgrade()

    def _upgrade(self) -> None:
        (version,) = self.db.execute("PRAGMA user_version").fetchone()
        for number, step in enumerate(_STEPS[version:], start=version + 1):
            self.db.executescript(f"BEGIN; {step} PRAGMA user_version = {number}; COMMIT;")

    def close(self) -> None:
        self.commit()
        self.db.close()
        self._lock.close()

    def begin(self) -> None:
        if not self.db.in_transaction:
            self.db.execute("BEGIN")

    def commit(self) -> None:
        if self.db.in_transaction:
            self.db.execute("COMMIT")

    def load(self):
        names = dict(self.db.execute("SELECT id, nickname FROM names"))
        groups = {
            row[0]: Group(row[0], row[1].split(), *row[2:])
            for row in self.db.execute(
                "SELECT id, members, subject, subject_by, subject_ts, state FROM groups"
            )
        }
        convs = {}
        for row in self.db.execute(
            "SELECT id, unread, last_activity, read_upto, read_sent, last_out_ts FROM conversations"
        ):
            convs[row[0]] = Conversation(row[0], [], *row[1:])
        for row in self.db.execute(
            "SELECT conv, src, dst, ts, text, outgoing, state, at, id, kind FROM messages ORDER BY id"
        ):
            conv = convs.get(row[0])
            if conv is None:
                conv = convs[row[0]] = Conversation(row[0])
            conv.messages.append(Message(*row[:5], bool(row[5]), *row[6:]))
        return names, groups, convs

    def add_message(self, m: Message) -> bool:
        """False when the message is already stored (a duplicate 06)."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO messages (conv, src, dst, ts, text, outgoing, state, at, kind)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (m.conv, m.src, m.dst, m.ts, m.text, int(m.outgoing), m.state, m.at, m.kind),
        )
        if cur.rowcount == 0:
            return False
        m.id = cur.lastrowid
        return True

    def set_states(self, messages: list[Message]) -> None:
        if messages:
            self.db.executemany(
                "UPDATE messages SET state = ? WHERE id = ?", [(m.state, m.id) for m in messages]
            )

    def save_conversation(self, c: Conversation) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO conversations"
            " (id, unread, last_activity, read_upto, read_sent, last_out_ts) VALUES (?, ?, ?, ?, ?, ?)",
            (c.id, c.unread, c.last_activity, c.read_upto, c.read_sent, c.last_out_ts),
        )

    def set_name(self, who: str, nickname: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO names (id, nickname) VALUES (?, ?)", (who, nickname))

    def forget_name(self, who: str) -> None:
        self.db.execute("DELETE FROM names WHERE id = ?", (who,))

    def set_group(self, g: Group) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO groups (id, members, subject, subject_by, subject_ts, state)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (g.id, " ".join(g.members), g.subject, g.subject_by, g.subject_ts, g.state),
        )


# -- the model -------------------------------------------------------------

_ACTION = {
    wire.SEND: "A message could not be sent",
    wire.SEEN: "A read receipt could not be sent",
    wire.CREATE_GROUP: "The group could not be created",
    wire.SET_SUBJECT: "The group could not be renamed",
    wire.ADD_MEMBERS: "Nobody was added to the group",
    wire.LEAVE_GROUP: "Could not leave the group",
    wire.ONLINE: "Could not log in",
    wire.ONLINE_SECRET: "Could not log in",
    wire.REGISTER: "Could not register",
    wire.REGISTER_SECRET: "Could not register",
    wire.RECEIVED: "A delivery receipt was refused",
}


def error_sentence(ref: bytes, reason: bytes) -> str:
    """A 12 as a sentence a person can act on, never a code."""
    action = _ACTION.get(ref, "The server refused a request")
    why = wire.REASON_TEXT.get(reason, "the server gave a reason this client does not know")
    return f"{action}: {why}."


class ClientModel:
    """Contacts, conversations, ticks and the outbox, answering frames and user actions.

    Listeners are called as ``listener(event, **data)`` after every change a
    front end may want to draw; ``incoming`` carries ``notify=True`` when a new
    message arrived in a conversation that is not open.
    """

    log = Logger()

    def __init__(self, store: LocalStore, clock, read_receipts: bool = True):
        self.store = store
        self.clock = clock
        self.read_receipts = read_receipts
        self.me: Identity | None = load_identity(store.identity_path)
        self.names, self.groups, self.conversations = store.load()
        self.connection: ChatClientProtocol | None = None
        self.status = OFFLINE
        self.status_detail = ""
        #: A shorter status_detail for a narrow screen, and when the next try is (reactor time).
        self.status_short = ""
        self.retry_at: float | None = None
        self.open_id: str | None = None
        #: False while the front end covers the open conversation (a dialog): nothing is read then.
        self.visible = True
        self.listeners: list[Callable[..., None]] = []
        #: Every outgoing message without its 07, oldest first: resent after each login.
        self.outbox = [
            m
            for c in self.conversations.values()
            for m in c.messages
            if m.outgoing and m.state in (QUEUED, SENT)
        ]
        self.outbox.sort(key=lambda m: m.id)
        self._outgoing = {
            (c.id, m.ts): m for c in self.conversations.values() for m in c.messages if m.outgoing
        }
        #: 05s written on this connection whose fate is unknown: a 12 05 names one of them.
        self._in_flight: list[Message] = []
        #: The outbox's next try after the server said it is busy, and the wait before it.
        self._retry = None
        self._busy_delay = BUSY_RETRY
        #: Destinations the server has shown to exist (they wrote, confirmed, or share a group).
        self._known: set[str] = set(self.groups)
        for g in self.groups.values():
            self._known.update(g.members)
        self._known.update(c.id for c in self.conversations.values() if c.newest_incoming())
        #: Our 10s by TIMESTAMP, with the subject to send once their 11 comes; our 19s likewise,
        #: so that the 11 one of them causes can say who added (the frame does not).
        self._pending_groups: dict[int, str] = {}
        self._pending_adds: dict[int, str] = {}
        self._last_group_ts = 0
        #: Frames from the server are stored in one transaction per reactor turn (see flush):
        #: their 16s wait here for its commit, and the open conversation's 08 goes once a batch.
        self._flush_call = None
        self._acks: list[tuple[ChatClientProtocol, bytes]] = []
        self._batch_convs: dict[str, Conversation] = {}
        self._batch_reads: set[str] = set()

    # -- reading ---------------------------------------------------------

    def now(self) -> float:
        return self.clock.seconds()

    def display_name(self, who: str) -> str:
        if self.me is not None and who == self.me.user:
            return "me"
        if who in self.names:
            return self.names[who]
        if who.startswith("1"):
            g = self.groups.get(who)
            if g is not None and g.subject:
                return g.subject
            members = g.members if g is not None else []
            others = [self.display_name(m) for m in members if self.me is None or m != self.me.user]
            return "group: " + ", ".join(others) if others else f"group {who}"
        return who

    def has_left(self, cid: str) -> bool:
        g = self.groups.get(cid)
        return g is not None and g.state == FORMER

    def ordered(self) -> list[Conversation]:
        """Conversations, the most recently active first."""
        return sorted(self.conversations.values(), key=lambda c: (-c.last_activity, c.id))

    def contacts(self) -> list[tuple[str, str]]:
        """(id, nickname) of every named user, by nickname."""
        return sorted(
            ((i, n) for i, n in self.names.items() if i.startswith("0")), key=lambda x: x[1].lower()
        )

    def unsent(self) -> list[Message]:
        """Messages that have not reached the server yet (they stay in the outbox across restarts)."""
        return [m for m in self.outbox if m.state == QUEUED]

    def _emit(self, event: str, **data) -> None:
        for listener in list(self.listeners):
            listener(event, **data)

    # -- batching the frame path -------------------------------------------

    def _batch(self) -> None:
        """Writes from now on are one transaction, committed by flush() at the end of this reactor turn."""
        if self._flush_call is None:
            self.store.begin()
            self._flush_call = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Commit the batch, then send its 16s (never before the commit) and its 08s."""
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        for conv in self._batch_convs.values():
            self.store.save_conversation(conv)
        self._batch_convs.clear()
        self.store.commit()
        acks, self._acks = self._acks, []
        by_connection: dict[ChatClientProtocol, list[bytes]] = {}
        for connection, frame in acks:
            by_connection.setdefault(connection, []).append(frame)
        for connection, frames in by_connection.items():
            connection.write(b"".join(frames))
        reads, self._batch_reads = self._batch_reads, set()
        for cid in sorted(reads):
            if cid in self.conversations:
                self._send_read(self.conversations[cid])

    # -- user actions ----------------------------------------------------

    def conversation(self, cid: str) -> Conversation:
        conv = self.conversations.get(cid)
        if conv is None:
            conv = self.conversations[cid] = Conversation(cid, last_activity=self.now())
            self.store.save_conversation(conv)
        return conv

    def add_contact(self, who: str, nickname: str) -> Conversation:
        """Name a user (or a group) and give it a conversation; raises ValueError for a bad id."""
        self.flush()
        who = who.strip()
        nickname = nickname.strip() or who
        if not wire.is_id(who.encode()):
            raise ValueError("An id is 13 digits, starting with 0 for a person or 1 for a group.")
        if self.me is not None and who == self.me.user:
            raise ValueError("That is your own id.")
        self.names[who] = nickname
        self.store.set_name(who, nickname)
        conv = self.conversation(who)
        self._emit("conversations")
        return conv

    def set_nickname(self, who: str, nickname: str) -> None:
        """A name only this profile sees (a group's is shown instead of its subject); empty removes it."""
        self.flush()
        nickname = nickname.strip()
        if nickname:
            self.names[who] = nickname
            self.store.set_name(who, nickname)
        elif who in self.names:
            del self.names[who]
            self.store.forget_name(who)
        self._emit("conversations")

    def send_text(self, cid: str, text: str) -> list[Message]:
        """Split, stamp, keep in the outbox, and write now if online."""
        if self.me is None:
            raise ValueError("This profile has no id yet: it gets one the first time it reaches the server.")
        if self.has_left(cid):
            raise ValueError("You left this group: it stays readable, but nothing can be sent to it.")
        self.flush()
        conv = self.conversation(cid)
        sent = []
        for part in split_text(text):
            ts = max(int(self.now()), conv.last_out_ts + 1)
            conv.last_out_ts = ts
            m = Message(cid, self.me.user, cid, ts, part, True, QUEUED, self.now())
            self.store.add_message(m)
            conv.messages.append(m)
            self.outbox.append(m)
            self._outgoing[(cid, ts)] = m
            sent.append(m)
        if not sent:
            return sent
        conv.last_activity = self.now()
        self.store.save_conversation(conv)
        if self.connection is not None:
            self._write_messages(self.connection, sent)
        self._emit("messages", conv=conv)
        return sent

    def open(self, cid: str | None) -> None:
        """The front end shows ``cid`` now: its unread count goes and its readers learn it was read."""
        self.flush()
        self.open_id = cid
        if cid is None or cid not in self.conversations:
            return
        conv = self.conversations[cid]
        conv.unread = 0
        conv.read_upto = max(conv.read_upto, conv.newest_incoming())
        self.store.save_conversation(conv)
        self._send_read(conv)
        self._emit("conversations")

    def create_group(self, members: list[str], name: str = "") -> None:
        """Ask the server for a group of ``members`` and us; its 11 makes the conversation."""
        if self.connection is None or self.me is None:
            raise ValueError("Groups can be created only while connected.")
        self.flush()
        listed = [m for m in dict.fromkeys(members) if m != self.me.user]
        if not listed or len(listed) + 1 > wire.MAX_MEMBERS:
            raise ValueError(f"A group needs 1 to {wire.MAX_MEMBERS - 1} other members.")
        ts = self._group_ts()
        self._pending_groups[ts] = cut_name(name)
        self.connection.write(
            wire.create_group(self.me.user.encode(), wire.timestamp(ts), [m.encode() for m in listed])
        )

    def _group_ts(self) -> int:
        ts = max(int(self.now()), self._last_group_ts + 1)
        self._last_group_ts = ts
        return ts

    def _member_of(self, group: str) -> Group:
        """The group, if we can change it now; else a ValueError that says why."""
        if self.connection is None or self.me is None:
            raise ValueError("Groups can be changed only while connected.")
        g = self.groups.get(group)
        if g is None:
            raise ValueError("That is not a group this profile knows.")
        if g.state == FORMER:
            raise ValueError("You left this group.")
        self.flush()
        return g

    def set_subject(self, group: str, name: str) -> None:
        """Ask the server to name the group for every member (17); its 18 changes the name here."""
        g = self._member_of(group)
        name = cut_name(name)
        if not name:
            raise ValueError("A group's subject cannot be empty.")
        ts = self._group_ts()
        self.connection.write(
            wire.set_subject(self.me.user.encode(), g.id.encode(), wire.timestamp(ts), name.encode())
        )

    def add_members(self, group: str, members: list[str]) -> None:
        """Ask the server to add ``members`` (19); the 11 it sends every member changes the list."""
        g = self._member_of(group)
        new = [m for m in dict.fromkeys(members) if m not in g.members]
        if not new:
            raise ValueError("Choose someone who is not in the group yet.")
        if len(g.members) + len(new) > wire.MAX_MEMBERS:
            raise ValueError(f"A group has at most {wire.MAX_MEMBERS} members.")
        ts = self._group_ts()
        self._pending_adds[ts] = g.id
        self.connection.write(
            wire.add_members(
                self.me.user.encode(), g.id.encode(), wire.timestamp(ts), [m.encode() for m in new]
            )
        )

    def leave_group(self, group: str) -> None:
        """Ask the server to take us out (20); its 21 marks the group left here."""
        g = self._member_of(group)
        self.connection.write(
            wire.leave_group(self.me.user.encode(), g.id.encode(), wire.timestamp(self._group_ts()))
        )

    # -- connection events -------------------------------------------------

    def registered(self, user: str, secret: str) -> None:
        self.me = Identity(user, secret)
        save_identity(self.store.identity_path, self.me)
        self.log.info("registered as {user}", user=user)
        self._emit("identity")

    def set_status(self, status: str, detail: str = "", short: str = "") -> None:
        self.status, self.status_detail, self.status_short = status, detail, short
        self.retry_at = None
        self._emit("status")

    def logged_in(self, connection: ChatClientProtocol) -> None:
        """Resend the whole outbox, then every read receipt the server has not had."""
        self.flush()
        self.connection = connection
        self._in_flight = []
        self.set_status(CONNECTED)
        if self.outbox:
            self._write_messages(connection, list(self.outbox))
            self.log.info("resent {count} messages from the outbox", count=len(self.outbox))
        for conv in self.conversations.values():
            self._send_read(conv)
        self._emit("messages", conv=None)

    def _resend_outbox(self) -> None:
        """After a 12 05 11: the server may have kept none of what was in flight; it drops repeats."""
        self._retry = None
        if self.connection is not None and self.outbox:
            self._in_flight = [m for m in self._in_flight if m not in self.outbox]
            self._write_messages(self.connection, list(self.outbox))

    def disconnected(self, connection: ChatClientProtocol) -> None:
        self.flush()
        if self.connection is connection:
            self.connection = None
            self._in_flight = []

    def _write_messages(self, connection: ChatClientProtocol, messages: list[Message]) -> None:
        me = self.me.user.encode()
        connection.write(
            b"".join(
                wire.send(me, m.dst.encode(), wire.timestamp(m.ts), m.text.encode("utf-8")) for m in messages
            )
        )
        self._in_flight.extend(messages)
        moved = [m for m in messages if m.state == QUEUED]
        for m in moved:
            m.state = SENT
        self.store.set_states(moved)

    def _send_read(self, conv: Conversation) -> None:
        if not self.read_receipts or self.connection is None or conv.read_upto <= conv.read_sent:
            return
        if self.has_left(conv.id):
            return  # the server would refuse it (12 08 07): its readers are no longer ours to tell
        self.connection.write(wire.seen(conv.id.encode(), wire.timestamp(conv.read_upto)))
        conv.read_sent = conv.read_upto
        self.store.save_conversation(conv)

    # -- frames from the server --------------------------------------------

    def on_message(self, connection: ChatClientProtocol, src: str, dst: str, ts: int, text: str) -> None:
        """Keep it (unless it is a duplicate), then acknowledge it with 16: never the other way round."""
        cid = dst if dst.startswith("1") else src
        m = Message(cid, src, dst, ts, text, False, DELIVERED, self.now())
        self._batch()
        is_new = self.store.add_message(m)
        self._acks.append((connection, wire.received(src.encode(), dst.encode(), wire.timestamp(ts))))
        if not is_new:
            self.log.debug("dropped a duplicate message from {src}", src=src)
            return
        self._known.add(src)
        conv = self.conversation(cid)
        conv.messages.append(m)
        conv.last_activity = self.now()
        is_open = cid == self.open_id and self.visible
        if is_open:
            conv.read_upto = max(conv.read_upto, ts)
            self._batch_reads.add(cid)
        else:
            conv.unread += 1
        self._batch_convs[cid] = conv
        self._emit("incoming", conv=conv, message=m, notify=not is_open)

    def on_delivered(self, dst: str, ts: int) -> None:
        self._batch()
        self._busy_delay = BUSY_RETRY
        self._known.add(dst)
        m = self._outgoing.get((dst, ts))
        if m is None:
            self.log.info("a 07 for a message this client does not have: {dst} {ts}", dst=dst, ts=ts)
            return
        self._advance([m], DELIVERED)

    def on_seen(self, reader: str, ts: int) -> None:
        """``reader`` (a user, or a group's low mark) has read our messages up to ``ts``."""
        self._batch()
        self._known.add(reader)
        conv = self.conversations.get(reader)
        if conv is None:
            return
        self._advance([m for m in conv.messages if m.outgoing and m.ts <= ts and m.state != QUEUED], READ)

    def _advance(self, messages: list[Message], state: str) -> None:
        moved = [m for m in messages if _RANK[m.state] < _RANK[state]]
        if not moved:
            return
        for m in moved:
            m.state = state
        gone = set(map(id, moved))
        self.outbox = [m for m in self.outbox if id(m) not in gone]
        self._in_flight = [m for m in self._in_flight if id(m) not in gone]
        self.store.set_states(moved)
        self._emit("ticks", messages=moved)

    def on_group(self, group: str, ts: int, members: list[str]) -> None:
        """An 11: a new group, or the whole new list of one we know (someone was added or left)."""
        self._batch()
        me = self.me.user if self.me is not None else None
        g = self.groups.get(group)
        known = g is not None and bool(g.members)
        if g is None:
            g = self.groups[group] = Group(group, members)
        old, g.members = g.members, members
        if me in members:
            g.state = MEMBER  # added (back) to it
        self.store.set_group(g)
        self._known.add(group)
        self._known.update(members)
        conv = self.conversation(group)
        conv.last_activity = self.now()
        self._batch_convs[group] = conv
        mine = not known and me is not None and bool(members) and members[0] == me
        if known:
            added = [m for m in members if m not in old]
            gone = [m for m in old if m not in members]
            by = me if self._pending_adds.pop(ts, None) == group else ""
            if added:
                self._note(conv, ADDED, by, ts, added)
            if gone:
                self._note(conv, LEFT, "", ts, gone)
        name = self._pending_groups.pop(ts, "") if mine else ""
        if name and self.connection is not None:
            self.set_subject(group, name)  # the subject we were asked for, now that the group exists
        self._emit("group", conv=conv, created_by_me=mine)

    def on_subject(self, group: str, src: str, ts: int, name: str) -> None:
        """An 18: the group's subject for every member, and who set it."""
        self._batch()
        g = self.groups.get(group)
        if g is None:
            g = self.groups[group] = Group(group, [])
        if (g.subject, g.subject_by, g.subject_ts) == (name, src, ts):
            return  # the same 18 again
        g.subject, g.subject_by, g.subject_ts = name, src, ts
        self.store.set_group(g)
        self._known.add(group)
        conv = self.conversation(group)
        self._batch_convs[group] = conv
        self._note(conv, SUBJECT, src, ts, name)
        self._emit("group", conv=conv, created_by_me=False)

    def on_left(self, group: str, ts: int) -> None:
        """A 21: we are out of the group; its conversation stays, and says so."""
        self._batch()
        g = self.groups.get(group)
        if g is None:
            g = self.groups[group] = Group(group, [])
        if g.state == FORMER:
            return
        g.state = FORMER
        if self.me is not None:
            g.members = [m for m in g.members if m != self.me.user]
        self.store.set_group(g)
        conv = self.conversation(group)
        self._batch_convs[group] = conv
        self._note(conv, LEFT, "", ts, [self.me.user] if self.me is not None else [])
        self._emit("group", conv=conv, created_by_me=False)

    def _note(self, conv: Conversation, kind: str, src: str, ts: int, what) -> None:
        """A line in the conversation for a change in the group, kept with its messages."""
        text = what if isinstance(what, str) else " ".join(what)
        m = Message(conv.id, src, conv.id, ts, text, False, DELIVERED, self.now(), kind=kind)
        if self.store.add_message(m):
            conv.messages.append(m)

    def on_error(self, ref: bytes, reason: bytes) -> None:
        self._batch()
        sentence = error_sentence(ref, reason)
        if ref == wire.SEND and reason == wire.BUSY:
            # The server could not take it now (its database is away, or the
            # recipient has too much waiting): the outbox goes again on this
            # connection, later each time until a 07 shows the way is clear.
            if self._retry is None or not self._retry.active():
                self._retry = self.clock.callLater(self._busy_delay, self._resend_outbox)
                self._busy_delay = min(self._busy_delay * 2, BUSY_RETRY_MAX)
            sentence = "The server is busy: your messages wait and are sent again in a few seconds."
        elif ref == wire.SEND and reason in (wire.UNKNOWN_DESTINATION, wire.NOT_A_MEMBER):
            m = self._blame(reason)
            if m is not None:
                m.state = FAILED
                self.outbox = [o for o in self.outbox if o is not m]
                self._in_flight = [o for o in self._in_flight if o is not m]
                self.store.set_states([m])
                sentence = (
                    f"Your message to {self.display_name(m.dst)} could not be sent: "
                    f"{wire.REASON_TEXT[reason]}. It will not be retried."
                )
                self._emit("ticks", messages=[m])
        self.log.info("server error {ref} {reason}", ref=ref, reason=reason)
        self._emit("error", text=sentence)

    def _blame(self, reason: bytes) -> Message | None:
        """Which in-flight 05 a 12 05 06/07 is about: the frame does not say.

        The reason is a property of the destination, so prefer the oldest
        message to a destination the server has never shown to exist (06) or
        to a group (07); a 07 arriving later for a failed message still wins.
        """
        flight = self._in_flight
        if reason == wire.NOT_A_MEMBER:
            candidates = [m for m in flight if m.dst.startswith("1")]
        else:
            candidates = [m for m in flight if m.dst not in self._known]
        candidates = candidates or flight
        return candidates[0] if candidates else None


# -- the connection ------------------------------------------------------------


class ChatClientProtocol(Protocol):
    """One connection: frames the server's bytes, logs in, hands frames to the model."""

    log = Logger()

    def __init__(
        self,
        model: ClientModel,
        clock,
        on_refused: Callable[[str], None] | None = None,
        on_lost: Callable[[ChatClientProtocol], None] | None = None,
    ):
        self.model = model
        self.clock = clock
        self.on_refused = on_refused
        self.on_lost = on_lost
        self.phase = "new"
        self._buffer = b""
        self._login: Deferred | None = None
        self._timeout = None

    def connectionMade(self) -> None:
        keepalive.enable(self.transport)  # a dead server is noticed, and reconnected to, within 2 minutes

    def write(self, frame: bytes) -> None:
        if self.transport is not None:
            self.transport.write(frame)

    def login(self) -> Deferred:
        """Register first if the profile has no id; fires with self once logged in, None if the line dies."""
        self._login = Deferred()
        self._timeout = self.clock.callLater(LOGIN_TIMEOUT, self._too_slow)
        if self.model.me is None:
            self.phase = "register"
            self.write(wire.register_secret())
        else:
            self._send_login()
        return self._login

    def _send_login(self) -> None:
        self.phase = "login"
        me = self.model.me
        self.write(wire.online_secret(me.user.encode(), me.secret.encode()))

    def _too_slow(self) -> None:
        self._timeout = None
        self.log.info("no answer to the login: dropping the connection")
        self.transport.loseConnection()

    def _finish_login(self, result) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        d, self._login = self._login, None
        if d is not None:
            d.callback(result)

    def dataReceived(self, data: bytes) -> None:
        frames, self._buffer, status = wire.split_frames(wire.SERVER_FRAME_LEN, self._buffer + data)
        for frame in frames:
            if self.phase == "closed":
                return
            self._dispatch(frame)
        if status < 0 and self.phase != "closed":
            self.log.warn("unframeable bytes from the server: {head!r}", head=self._buffer[:8])
            self.model._emit("error", text="The server sent data this client cannot read, so it reconnects.")
            self.close()

    def close(self) -> None:
        self.phase = "closed"
        self.transport.loseConnection()

    def _dispatch(self, frame: bytes) -> None:
        code = frame[:2]
        if code == wire.REGISTERED_SECRET and self.phase == "register":
            user, secret = wire.decode_registered(frame)
            self.model.registered(user.decode(), secret.decode())
            self._send_login()
        elif code == wire.ONLINE_OK and self.phase == "login":
            self.phase = "ready"
            self._finish_login(self)
        elif code == wire.ERROR:
            self._error(*wire.decode_error(frame))
        elif self.phase != "ready":
            self.log.info("ignored a {code!r} before login", code=code)
        elif code == wire.MESSAGE:
            src, dst, ts, field = wire.decode_send(frame)
            text = wire.unpad_text(field)
            if text is None or not (wire.is_id(src) and wire.is_id(dst) and wire.is_timestamp(ts)):
                self.log.warn("a malformed 06 from the server, acknowledged and dropped")
                self.write(wire.received(src, dst, ts))
                return
            self.model.on_message(self, src.decode(), dst.decode(), int(ts), text.decode("utf-8"))
        elif code == wire.DELIVERED:
            dst, ts = wire.decode_delivered(frame)
            self.model.on_delivered(dst.decode(), int(ts))
        elif code == wire.SEEN_BY:
            peer, ts = wire.decode_seen(frame)
            self.model.on_seen(peer.decode(), int(ts))
        elif code == wire.ADDED_TO_GROUP:
            group, ts, _, members = wire.decode_group(frame)
            self.model.on_group(group.decode(), int(ts), [m.decode() for m in members])
        elif code == wire.SUBJECT:
            group, src, ts, field = wire.decode_subject(frame)
            name = wire.unpad_name(field)
            if name is None or not (wire.is_id(group) and wire.is_id(src) and wire.is_timestamp(ts)):
                self.log.warn("a malformed 18 from the server, dropped")
                return
            self.model.on_subject(group.decode(), src.decode(), int(ts), name.decode("utf-8"))
        elif code == wire.LEFT_GROUP:
            group, ts = wire.decode_left(frame)
            self.model.on_left(group.decode(), int(ts))

    def _error(self, ref: bytes, reason: bytes) -> None:
        if reason == wire.BUSY and self.phase in ("register", "login"):
            # The server cannot reach its database now: come back after the backoff.
            self.log.info("server busy during {phase}: reconnecting later", phase=self.phase)
            self.close()
        elif ref in (wire.REGISTER_SECRET, wire.ONLINE_SECRET) and self.phase in ("register", "login"):
            self._refused(error_sentence(ref, reason))
        elif reason == wire.LOGGED_IN_ELSEWHERE:
            self._refused("This profile logged in from somewhere else, so this client went offline.")
        else:
            self.model.on_error(ref, reason)

    def _refused(self, sentence: str) -> None:
        """Trying again would not help (or would fight another client): stop and say why."""
        self.log.info("login refused: {why}", why=sentence)
        if self.on_refused is not None:
            self.on_refused(sentence)
        self.close()

    def connectionLost(self, reason) -> None:
        self.lost_reason = reason
        self.phase = "closed"
        self.model.disconnected(self)
        # Fire the login with None rather than failing it, and before telling the client:
        # ClientService treats a failed prepareConnection as a failed attempt but keeps the
        # connection, and the loss of that connection then reaches its state machine in a
        # state with no transition for it (automat's NoTransition, logged by the reactor).
        self._finish_login(None)
        if self.on_lost is not None:
            self.on_lost(self)


class _Factory(Factory):
    noisy = False

    def __init__(self, client: ChatClient):
        self.client = client

    def buildProtocol(self, addr):
        protocol = ChatClientProtocol(
            self.client.model, self.client.clock, self.client.refused, self.client.lost
        )
        self.client.protocol = protocol
        return protocol


@implementer(IStreamClientEndpoint)
class _ReportingEndpoint:
    """An endpoint that tells the client which server it tries, and why a try failed."""

    def __init__(self, endpoint, address: str | None, client: ChatClient):
        self._endpoint, self.address, self._client = endpoint, address, client

    def connect(self, factory) -> Deferred:
        if self.address is not None:
            self._client.address = self.address
        d = self._endpoint.connect(factory)
        d.addErrback(self._failed)
        return d

    def _failed(self, failure):
        self._client.attempt_failed(self._client.address, failure)
        return failure


@implementer(IStreamClientEndpoint)
class FailoverEndpoint:
    """Several servers (nodes of one cluster): each connection tries them in
    turn, starting with the one that worked last, so a node that died is skipped."""

    def __init__(self, endpoints: list):
        self._endpoints = endpoints
        self._first = 0

    def connect(self, factory) -> Deferred:
        return self._try(factory, self._first, len(self._endpoints))

    def _try(self, factory, at: int, left: int) -> Deferred:
        d = self._endpoints[at].connect(factory)

        def connected(protocol):
            self._first = at
            return protocol

        def next_one(failure):
            if left == 1:
                return failure
            return self._try(factory, (at + 1) % len(self._endpoints), left - 1)

        d.addCallbacks(connected, next_one)
        return d


class ChatClient:
    """Keeps one logged-in connection alive: ClientService with backoff, login and resend on each.

    Stopping goes through the connection when there is one (close it, then stop
    the service from its connectionLost), because ClientService cannot stop
    cleanly while a prepareConnection is pending.
    """

    log = Logger()

    def __init__(self, reactor, server: str | list[str] | object, model: ClientModel, retry_policy=None):
        self.clock = reactor
        self.model = model
        #: The server being tried or used, as shown on screen.
        self.address = "the server"
        if isinstance(server, str):
            server = [server]
        if isinstance(server, list):
            endpoints = [
                _ReportingEndpoint(
                    clientFromString(reactor, endpoint_description(s)), endpoint_address(s), self
                )
                for s in server
            ]
            self.address = endpoints[0].address
            server = endpoints[0] if len(endpoints) == 1 else FailoverEndpoint(endpoints)
        else:
            server = _ReportingEndpoint(server, None, self)
        self._policy = retry_policy or backoffPolicy(initialDelay=0.5, maxDelay=15.0)
        self.service = ClientService(
            server,
            _Factory(self),
            retryPolicy=self._retry_policy,
            clock=reactor,
            prepareConnection=self._prepare,
        )
        self.protocol: ChatClientProtocol | None = None
        #: Connections in a row that ended before their login did (a certificate refused in the
        #: handshake, a server that closes at once). ClientService counts each as a success, so
        #: without this its backoff would start again from the first delay every time.
        self._unanswered = 0
        self._stopped = True
        self._stopping: list[Deferred] = []

    def start(self) -> None:
        self._stopped = False
        self.model.set_status(RECONNECTING, f"connecting to {self.address}", "connecting")
        self.service.startService()

    def _retry_policy(self, attempt: int) -> float:
        """The backoff's delay, which the status line counts down."""
        delay = self._policy(max(attempt, self._unanswered))
        if not self._stopped:
            self.model.retry_at = self.clock.seconds() + delay
            self.model._emit("status")
        return delay

    def attempt_failed(self, address: str, failure) -> None:
        if self._stopped:
            return
        why, short = failure_reason(failure)
        self.log.info("cannot connect to {address}: {why}", address=address, why=why)
        self.model.set_status(RECONNECTING, f"cannot connect to {address}: {why}", f"{address} {short}")

    def stop(self) -> Deferred:
        """Close the connection (if any) and stop reconnecting; fires once both are done."""
        self._stopped = True
        if self.protocol is not None:
            d = Deferred()
            self._stopping.append(d)
            self.protocol.close()
            return d
        return self._stop_service()

    def _stop_service(self) -> Deferred:
        if not self.service.running:
            return succeed(None)
        return self.service.stopService()

    def reconnect_now(self) -> Deferred:
        """Skip the backoff (or undo a refusal): stop, then start at once."""
        d = self.stop()
        d.addCallback(lambda _: self.start())
        return d

    def refused(self, sentence: str) -> None:
        """Called just before the protocol closes: its connectionLost will stop the service."""
        self._stopped = True
        self.model.set_status(OFFLINE, sentence)
        self.model._emit("error", text=sentence)

    def _prepare(self, protocol) -> Deferred:
        self.model.set_status(RECONNECTING, f"logging in to {self.address}", "logging in")
        self._unanswered += 1
        d = protocol.login()
        d.addCallback(self._logged_in)
        return d

    def _logged_in(self, protocol) -> None:
        if protocol is not None:
            self._unanswered = 0
            self.model.logged_in(protocol)

    def lost(self, protocol: ChatClientProtocol) -> None:
        if self.protocol is protocol:
            self.protocol = None
        if not self._stopped:
            reason = getattr(protocol, "lost_reason", None)
            why, short = failure_reason(reason) if reason is not None else ("the connection closed", "closed")
            self.log.info("lost {address}: {why}", address=self.address, why=why)
            if why.startswith("certificate"):
                self.model.set_status(RECONNECTING, why, short)
            else:
                self.model.set_status(RECONNECTING, f"lost {self.address}: {why}", f"{self.address} {short}")
            return
        if self.model.status != OFFLINE:
            self.model.set_status(OFFLINE)
        d = self._stop_service()
        waiting, self._stopping = self._stopping, []
        for w in waiting:
            d.addBoth(lambda result, w=w: w.callback(None))


__all__ = [
    "CONNECTED",
    "DELIVERED",
    "FAILED",
    "OFFLINE",
    "QUEUED",
    "READ",
    "RECONNECTING",
    "SENT",
    "SUBJECT",
    "TEXT",
    "ADDED",
    "ChatClient",
    "ChatClientProtocol",
    "ClientModel",
    "Conversation",
    "FailoverEndpoint",
    "FORMER",
    "Group",
    "Identity",
    "LEFT",
    "LocalStore",
    "MEMBER",
    "Message",
    "ProfileError",
    "default_data_dir",
    "endpoint_address",
    "endpoint_description",
    "failure_reason",
    "error_sentence",
    "load_identity",
    "save_identity",
    "split_text",
]
