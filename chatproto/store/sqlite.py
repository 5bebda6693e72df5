"""The default store: SQLite in WAL mode, with group commit (``batching``)."""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from collections import Counter
from importlib import resources
from itertools import chain, count
from zlib import crc32

from twisted.logger import Logger
from zope.interface import implementer

from . import (
    DUPLICATE_DELIVERED,
    DUPLICATE_PENDING,
    HELD_ADDED,
    HELD_MESSAGE,
    HELD_SUBJECT,
    NEW,
    Completed,
    DatabaseTooNew,
    GroupChange,
    IChatStore,
    InboxItem,
    Recorded,
    SchemaError,
    StoreUnavailable,
    Subject,
    UpgradeFailed,
    added_notices,
    is_group,
    joined,
    left_notices,
    to_group,
    to_user,
)
from .batching import BatchingStore, load_snapshot

#: The schema this code writes. A fresh database is made from ``NNN.sql`` of
#: this version; an older one is upgraded in place by ``upgrade_NNN_to_MMM.sql``.
SCHEMA_VERSION = 6

# The schema errors are shared with the PostgreSQL store now; the service still imports them from here.
__all__ = ["SchemaError", "DatabaseTooNew", "UpgradeFailed", "SQLiteStore"]

_schema_log = Logger(namespace="chatproto.store.sqlite")


def _returning() -> bool:
    """Whether this SQLite has RETURNING (3.35) and json_each, for ``_ended``."""
    if sqlite3.sqlite_version_info < (3, 35, 0):
        return False
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("SELECT value FROM json_each('[1]')").fetchall()
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()
    return True


#: SQLite from 3.35 ends holds in two statements with RETURNING
#: (``_ended``); an older one counts down in a trigger (``_end_holds_by_trigger``).
RETURNING = _returning()


def _connection_setup(conn: sqlite3.Connection) -> None:
    """Before SQLite 3.35 (no RETURNING) the server's own connection ends
    holds through triggers: a direct message's hold notes it at once, with
    what its 07 needs; a group message is counted down and noted by the
    update that takes it to zero."""
    if RETURNING:
        return
    conn.executescript(
        f"""
        CREATE TEMP TABLE completed (
            msg_id INTEGER NOT NULL, src TEXT NOT NULL, dst TEXT NOT NULL, ts INTEGER NOT NULL
        );
        CREATE TEMP TRIGGER delivered AFTER DELETE ON main.inbox
            WHEN old.code = 6 AND {to_group("old.dst")}
        BEGIN
            UPDATE messages SET remaining = remaining - 1 WHERE id = old.msg_id;
        END;
        CREATE TEMP TRIGGER delivered_direct AFTER DELETE ON main.inbox
            WHEN old.code = 6 AND {to_user("old.dst")}
        BEGIN
            INSERT INTO completed (msg_id, src, dst, ts) VALUES (old.msg_id, old.src, old.dst, old.ts);
        END;
        CREATE TEMP TRIGGER completing AFTER UPDATE OF remaining ON main.messages
            WHEN new.remaining = 0
        BEGIN
            INSERT INTO completed (msg_id, src, dst, ts) VALUES (new.id, new.src, new.dst, new.ts);
        END;
        """
    )


def body_hash(body: bytes) -> int:
    """The identity index's key for a message's text: its CRC-32.

    Only messages with the same sender, destination and TIMESTAMP are told
    apart by it, and a collision is settled by comparing the texts
    (``_stored_as``), so a short, fast hash is enough.
    """
    return crc32(body)


#: Milliseconds a transaction waits for a lock another process holds (a
#: backup, chatproto-admin) before its batch is answered 12 XX 11.
BUSY_TIMEOUT_MS = 5000


def connect(path: str, busy_timeout_ms: int | None = None) -> sqlite3.Connection:
    """Open ``path`` with the settings every user of the database needs."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.create_function("chatproto_body_hash", 1, body_hash, deterministic=True)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms or BUSY_TIMEOUT_MS)}")
    if path != ":memory:":
        conn.execute("PRAGMA journal_mode = WAL")
    # NORMAL in WAL mode survives a crash of the process (kill -9); FULL
    # would also survive a power cut, at an fsync per commit.
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def schema_sql(version: int) -> str:
    """The whole schema at ``version``: what a fresh database is made from."""
    return resources.files(__package__).joinpath(f"schema/sqlite/{version:03d}.sql").read_text()


def upgrade_sql(version: int) -> str:
    """The step from ``version`` to the next one."""
    name = f"schema/sqlite/upgrade_{version:03d}_to_{version + 1:03d}.sql"
    return resources.files(__package__).joinpath(name).read_text()


def database_path(conn: sqlite3.Connection) -> str:
    """The file behind ``conn``'s main database; empty for ``:memory:``."""
    for _, name, file in conn.execute("PRAGMA database_list"):
        if name == "main":
            return file or ""
    return ""


def backup_path(path: str, version: int) -> str:
    """Where the copy taken before upgrading a database at ``version`` goes."""
    return f"{path}.v{version}.bak"


def schema_version(conn: sqlite3.Connection) -> int | None:
    """The version the database records, or None for an empty database."""
    has_table = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'"
    ).fetchone()
    if not has_table:
        return None
    (version,) = conn.execute("SELECT version FROM schema_version").fetchone()
    return version


def too_new(conn: sqlite3.Connection, version: int) -> DatabaseTooNew:
    """The refusal, naming where the copy taken before the newer chatproto's upgrade would be."""
    path = database_path(conn)
    return DatabaseTooNew(
        f"the database {path} has schema version {version}, newer than this chatproto's "
        f"{SCHEMA_VERSION}: run a newer chatproto, or restore the copy taken before the upgrade "
        f"({backup_path(path, SCHEMA_VERSION)}, if it exists)"
    )


def ensure_schema(conn: sqlite3.Connection) -> int:
    """Make the schema in an empty database, upgrade an older one, refuse a newer one.

    An upgrade first copies the database to ``PATH.vN.bak`` with SQLite's
    backup API, then runs every step and the version change in one
    transaction, so a failure leaves the database as it was. The write lock
    is held from the version check to the commit: two processes starting
    at once upgrade once.
    """
    version = schema_version(conn)
    if version == SCHEMA_VERSION:
        return version
    if version is not None and version > SCHEMA_VERSION:
        raise too_new(conn, version)
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = schema_version(conn)
        if version is None:
            for statement in _statements(schema_sql(SCHEMA_VERSION)):
                conn.execute(statement)
            _record(conn, SCHEMA_VERSION, None, None)
        elif version > SCHEMA_VERSION:
            raise too_new(conn, version)
        elif version < SCHEMA_VERSION:
            _upgrade(conn, version)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise
    return SCHEMA_VERSION


def _upgrade(conn: sqlite3.Connection, version: int) -> None:
    """Run on the write transaction ``ensure_schema`` opened."""
    path = database_path(conn)
    backup = None
    try:
        if path:
            # From a connection of its own: SQLite cannot back up through the
            # connection holding the write lock, and a reader sees exactly the
            # last commit, which that lock keeps the latest until we are done.
            backup = backup_path(path, version)
            source = sqlite3.connect(path)
            copy = sqlite3.connect(backup)
            try:
                source.backup(copy)
            finally:
                copy.close()
                source.close()
        for step in range(version, SCHEMA_VERSION):
            for statement in _statements(upgrade_sql(step)):
                conn.execute(statement)
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
        _record(conn, SCHEMA_VERSION, version, backup)
    except (sqlite3.Error, OSError) as e:
        raise UpgradeFailed(
            f"upgrading the database from schema version {version} to {SCHEMA_VERSION} failed "
            f"({e}); it was left at version {version}"
        ) from e
    _schema_log.info(
        "upgraded {path} from schema version {old} to {new}; the copy taken before is {backup}",
        path=path or ":memory:",
        old=version,
        new=SCHEMA_VERSION,
        backup=backup,
    )


def _statements(script: str) -> list[str]:
    """Split a schema script into statements, to run them inside a transaction
    (``executescript`` would commit the one in flight)."""
    statements, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending)
            pending = ""
    leftover = [line for line in pending.splitlines() if line.strip() and not line.lstrip().startswith("--")]
    if leftover:
        raise ValueError(f"an incomplete statement at the end of a schema script: {pending!r}")
    return statements


def _record(conn: sqlite3.Connection, version: int, previous: int | None, backup: str | None) -> None:
    conn.execute(
        "INSERT INTO schema_history (version, applied, previous, backup) VALUES (?, ?, ?, ?)",
        (version, int(time.time()), previous, backup),
    )


@implementer(IChatStore)
class SQLiteStore(BatchingStore):
    ops = sys.modules[__name__]

    def __init__(self, path: str, reactor, answering=None, on_commit=None, busy_timeout_ms=None):
        self.path = path
        self._conn = connect(path, busy_timeout_ms)
        ensure_schema(self._conn)
        _connection_setup(self._conn)
        (last,) = self._conn.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()
        self._next_msg_id = last + 1
        super().__init__(reactor, "chatproto-sqlite", answering, on_commit)

    def _transaction(self, batch):
        started = time.perf_counter()
        cur = self._conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
            results = self._apply(cur, batch)
            cur.execute("COMMIT")
        except BaseException as e:
            if self._conn.in_transaction:
                try:
                    self._conn.rollback()
                except sqlite3.Error:
                    pass  # SQLite rolls a failed transaction back itself
            if isinstance(e, sqlite3.DatabaseError):
                # Locked past the busy timeout, a full disk, an I/O error: the
                # batch is answered 12 XX 11 and the next one tries again.
                raise StoreUnavailable(f"{self.path}: {e}") from e
            raise
        return results, time.perf_counter() - started

    def _call(self, fn, cur, args):
        try:
            return True, fn(cur, *args)
        except sqlite3.IntegrityError as e:
            return False, e

    # -- operations --------------------------------------------------------

    def _release(self):
        if self.path != ":memory:":
            # Leave a compact database behind: the WAL folded in and emptied.
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()


# Each operation runs on the database thread inside the batch's transaction.

_load = load_snapshot


def _add_user(cur, user_id, secret_hash):
    cur.execute(
        "INSERT INTO users (id, secret_hash, created) VALUES (?, ?, ?)",
        (user_id, secret_hash, int(time.time())),
    )


def _add_group(cur, group_id, ts, members, hold_for):
    cur.execute(
        "INSERT INTO groups (id, ts, created, low_mark) VALUES (?, ?, ?, 0)",
        (group_id, ts, int(time.time())),
    )
    cur.executemany(
        "INSERT INTO members (group_id, user_id, position, read_mark) VALUES (?, ?, ?, 0)",
        [(group_id, user_id, i) for i, user_id in enumerate(members)],
    )
    body = joined(members)
    cur.executemany(_INSERT_NOTICE, [(user_id, HELD_ADDED, "", group_id, ts, body) for user_id in hold_for])


#: A held 07, 09, 11, 18 or 21 (``body``: an 11's members, an 18's name).
_INSERT_NOTICE = "INSERT INTO inbox (user_id, code, src, dst, ts, body) VALUES (?, ?, ?, ?, ?, ?)"


def _members(cur, group_id) -> list[str]:
    return [
        user_id
        for (user_id,) in cur.execute(
            "SELECT user_id FROM members WHERE group_id = ? ORDER BY position", (group_id,)
        )
    ]


def _set_subject(cur, group_id, src, ts, name, online):
    cur.execute(
        "UPDATE groups SET subject = ?, subject_src = ?, subject_ts = ? WHERE id = ?",
        (name, src, ts, group_id),
    )
    members = _members(cur, group_id)
    offline = [user_id for user_id in members if user_id not in online]
    cur.executemany(_DROP_SUBJECTS, [(user_id, group_id) for user_id in offline])
    cur.executemany(_INSERT_NOTICE, [(user_id, HELD_SUBJECT, src, group_id, ts, name) for user_id in offline])
    return members


#: The 18 of a group still held for a user, replaced by a newer one (inbox_subjects).
_DROP_SUBJECTS = f"DELETE FROM inbox WHERE user_id = ? AND dst = ? AND code = {HELD_SUBJECT}"


def _add_members(cur, group_id, ts, added, online):
    (mark,) = cur.execute(
        f"SELECT coalesce(max(ts), 0) FROM messages WHERE dst = ? AND {to_group()}", (group_id,)
    ).fetchone()
    before = _members(cur, group_id)
    new = [user_id for user_id in dict.fromkeys(added) if user_id not in before]
    (after,) = cur.execute(
        "SELECT coalesce(max(position), -1) + 1 FROM members WHERE group_id = ?", (group_id,)
    ).fetchone()
    cur.executemany(
        "INSERT INTO members (group_id, user_id, position, read_mark) VALUES (?, ?, ?, ?)",
        [(group_id, user_id, after + i, mark) for i, user_id in enumerate(new)],
    )
    members = before + new
    subject = _subject(cur, group_id)
    cur.executemany(_INSERT_NOTICE, added_notices(group_id, ts, members, new, subject, online))
    return GroupChange(members, subject, mark)


def _subject(cur, group_id) -> Subject | None:
    row = cur.execute(
        "SELECT subject_src, subject_ts, subject FROM groups WHERE id = ?", (group_id,)
    ).fetchone()
    if row is None or row[2] is None:
        return None
    return Subject(row[0], row[1], bytes(row[2]))


def _leave_group(cur, group_id, user_id, ts, online):
    cur.execute("DELETE FROM members WHERE group_id = ? AND user_id = ?", (group_id, user_id))
    members = _members(cur, group_id)
    cur.executemany(_INSERT_NOTICE, left_notices(group_id, user_id, ts, members, online))
    return GroupChange(members)


#: A new message, or nothing when the identity index already has it.
_INSERT_MESSAGES = (
    "INSERT OR IGNORE INTO messages (id, src, dst, ts, body, remaining, body_hash)\n"
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_HOLDS = "INSERT INTO inbox (user_id, code, msg_id, src, dst, ts) VALUES (?, ?, ?, ?, ?, ?)"


def _remaining(dst: str, held) -> int:
    """The count a message starts with: a group's members it is held for; 0
    for a direct message, whose one hold says whether it was delivered."""
    return len(held) if is_group(dst) else 0


def _record_messages(store, cur, items):
    """Record a run of messages: one INSERT for all, per-item work only for resends.

    Ids come from the store's counter, so the new rows need no read-back; a
    row the unique index refuses is a resend (or, rarely, a different text
    with the same hash), looked up on its own.
    """
    first = store._next_msg_id
    store._next_msg_id += len(items)
    cur.executemany(
        _INSERT_MESSAGES,
        [
            (first + i, src, dst, ts, text, _remaining(dst, held), body_hash(text))
            for i, (src, dst, ts, text, held) in enumerate(items)
        ],
    )
    all_new = cur.rowcount == len(items)
    results = []
    inbox = []
    for i, (src, dst, ts, text, held) in enumerate(items):
        msg_id = first + i
        holds = [(user_id, HELD_MESSAGE, msg_id, src, dst, ts) for user_id in held]
        if not all_new:
            known = _stored_as(cur, msg_id, src, dst, ts, text, held)
            if known is not None:
                known_id, remaining = known
                status = DUPLICATE_DELIVERED if remaining == 0 else DUPLICATE_PENDING
                results.append(Recorded(known_id, status, remaining == 0))
                continue
            # A repeat further on in this run is told pending by these holds.
            cur.executemany(_INSERT_HOLDS, holds)
        else:
            inbox += holds
        results.append(Recorded(msg_id, NEW, not held))
    if inbox:
        cur.executemany(_INSERT_HOLDS, inbox)
    return results


_record_messages.bulk = True


def _record_delivered(store, cur, runs):
    """``batching.record_delivered`` in one INSERT for every run, nothing per
    message unless one was stored before (a resend: looked up on its own).
    The shared version, through ``_record_messages``, costs the store about
    a quarter more CPU a message (Recorded objects): bench/floor.py."""
    ids = count(store._next_msg_id)
    rows = [
        (next(ids), src, dst, ts, text, 0, body_hash(text))
        for src, dst, stamped in runs
        for ts, text in stamped
    ]
    store._next_msg_id += len(rows)
    cur.executemany(_INSERT_MESSAGES, rows)
    if cur.rowcount != len(rows):
        held = []
        for msg_id, src, dst, ts, text, _, _ in rows:
            known = _stored_as(cur, msg_id, src, dst, ts, text, ())
            if known is not None and known[1] > 0:
                held.append((known[0], [dst]))
        if held:
            _mark_reached(store, cur, held)
    return [None] * len(runs)


_record_delivered.bulk = True


#: Stored messages a new one may repeat: (id, recipients still to get it, body).
#: A direct message's recipient is still to get it while it holds it.
_REPEATS = (
    f"SELECT id, CASE WHEN {to_group()} THEN remaining ELSE "
    "(SELECT count(*) FROM inbox WHERE msg_id = messages.id AND code = 6) END, body "
    "FROM messages WHERE src = ? AND dst = ? AND ts = ? AND (body_hash = ? OR body_hash IS NULL)"
)


def _stored_as(cur, msg_id, src, dst, ts, text, held):
    """(id, remaining) of the stored message this one repeats, or None once it is stored as ``msg_id``.

    The identity index compares hashes: a row with the same hash and another
    text is a collision, and the message is stored beside it with a NULL hash.
    """
    rows = cur.execute(_REPEATS, (src, dst, ts, body_hash(text))).fetchall()
    for known_id, remaining, body in rows:
        if known_id == msg_id:
            return None
        if body == text:
            return known_id, remaining
    cur.execute(
        "INSERT INTO messages (id, src, dst, ts, body, remaining, body_hash) VALUES (?, ?, ?, ?, ?, ?, NULL)",
        (msg_id, src, dst, ts, text, _remaining(dst, held)),
    )
    return None


def _latest_timestamp(cur, src, dst):
    # The identity index (src, dst, ts, body_hash) answers this from its edge.
    (latest,) = cur.execute(
        "SELECT coalesce(max(ts), 0) FROM messages WHERE src = ? AND dst = ?", (src, dst)
    ).fetchone()
    return latest


#: One user's holds of the messages in a JSON list end, each row answering
#: its message. ``+user_id`` keeps SQLite on the message index: a user's own
#: inbox may be long, and each message has a hold or two.
_END_USER_HOLDS = (
    "DELETE FROM inbox WHERE msg_id IN (SELECT value FROM json_each(?)) AND +user_id = ? AND code = 6 "
    "RETURNING msg_id, src, dst, ts"
)
#: The holds of one message for the users in a JSON list end.
_END_MESSAGE_HOLDS = (
    "DELETE FROM inbox WHERE msg_id = ? AND +user_id IN (SELECT value FROM json_each(?)) AND code = 6 "
    "RETURNING msg_id, src, dst, ts"
)
#: Each group message of a JSON list, named once, counted down by one.
_COUNT_DOWN = (
    "UPDATE messages SET remaining = remaining - 1 WHERE id IN (SELECT value FROM json_each(?)) "
    "RETURNING id, src, dst, ts, remaining"
)
#: One group message counted down by several.
_COUNT_DOWN_BY = (
    "UPDATE messages SET remaining = remaining - ? WHERE id = ? RETURNING id, src, dst, ts, remaining"
)


def _ended(cur, statement: str, args: tuple) -> list[Completed]:
    """End holds with one of the DELETEs above; answer the messages completed, in record order."""
    return [Completed(src, dst, ts) for _, src, dst, ts in _ended_rows(cur, statement, args)]


def _ended_rows(cur, statement: str, args: tuple) -> list[tuple[int, str, str, int]]:
    """``_ended``'s work: (msg_id, src, dst, ts) of each message completed.

    A direct message is completed by its hold's end. A group message is
    counted down by the rows actually deleted, so one marked twice is
    completed once: by the op whose UPDATE takes it to zero.

    Measured on a drain of 100,000 held messages: 2.5 µs a message for the
    DELETE alone, against 11 for the statement of JSON (msg_id, user_id)
    pairs and the count-down of every message that this replaced.
    """
    rows = cur.execute(statement, args).fetchall()
    if not rows:
        return []
    done = [row for row in rows if not is_group(row[2])]
    if len(done) < len(rows):
        counts = Counter(row[0] for row in rows if is_group(row[2]))
        if max(counts.values()) == 1:
            counted = cur.execute(_COUNT_DOWN, (json.dumps(list(counts)),)).fetchall()
        else:
            counted = [cur.execute(_COUNT_DOWN_BY, (n, msg_id)).fetchone() for msg_id, n in counts.items()]
        done += [row[:4] for row in counted if row[4] == 0]
    done.sort()
    return done


def _end_holds_by_trigger(cur, ops):
    """Ending holds before SQLite 3.35 (no RETURNING): each op's (msg_id,
    user_id) pairs in one DELETE for all, the triggers of ``_connection_setup``
    counting down and noting what completes, for the last op naming it."""
    cur.executemany("DELETE FROM inbox WHERE msg_id = ? AND user_id = ? AND code = 6", chain(*ops))
    owner = {msg_id: at for at, pairs in enumerate(ops) for msg_id, _ in pairs}
    results: list[list[Completed]] = [[] for _ in ops]
    for msg_id, src, dst, ts in cur.execute(_TAKE_COMPLETED):
        results[owner[msg_id]].append(Completed(src, dst, ts))
    cur.execute("DELETE FROM temp.completed")
    return results


def _mark_delivered(store, cur, items):
    if not RETURNING:
        return _end_holds_by_trigger(cur, [[(msg_id, user_id) for msg_id in ids] for user_id, ids in items])
    return [_ended(cur, _END_USER_HOLDS, (json.dumps(msg_ids), user_id)) for user_id, msg_ids in items]


def _mark_reached(store, cur, items):
    """A batch's ops that each name one reader (a message held the slow way,
    written after its commit) end that reader's holds in one DELETE a
    reader, not one an op; a completion is owed to the last op naming it."""
    if not RETURNING:
        return _end_holds_by_trigger(cur, [[(msg_id, user_id) for user_id in ids] for msg_id, ids in items])
    results: list[list[Completed]] = [[] for _ in items]
    alone: dict[str, dict[int, int]] = {}
    for at, (msg_id, user_ids) in enumerate(items):
        if len(user_ids) == 1:
            alone.setdefault(user_ids[0], {})[msg_id] = at
        else:
            results[at] = _ended(cur, _END_MESSAGE_HOLDS, (msg_id, json.dumps(user_ids)))
    for user_id, owner in alone.items():
        for msg_id, src, dst, ts in _ended_rows(cur, _END_USER_HOLDS, (json.dumps(list(owner)), user_id)):
            results[owner[msg_id]].append(Completed(src, dst, ts))
    return results


_mark_delivered.bulk = True
_mark_reached.bulk = True

_TAKE_COMPLETED = "SELECT msg_id, src, dst, ts FROM temp.completed ORDER BY rowid"


def _acknowledge(cur, user_id, src, dst, ts):
    """A 16 ends one hold: the oldest pending for user_id with that name."""
    ids = [
        msg_id
        for (msg_id,) in cur.execute(
            "SELECT msg_id FROM inbox WHERE user_id = ? AND code = ? AND src = ? AND dst = ? AND ts = ? "
            "ORDER BY seq LIMIT 1",
            (user_id, HELD_MESSAGE, src, dst, ts),
        ).fetchall()
    ]
    return _mark_delivered(None, cur, [(user_id, ids)])[0]


def _hold(cur, user_id, code, src, dst, ts, text):
    cur.execute(_INSERT_NOTICE, (user_id, code, src, dst, ts, text))


def _inbox(cur, user_id, after, limit):
    rows = cur.execute(
        "SELECT i.seq, i.code, i.src, i.dst, i.ts, coalesce(m.body, i.body), i.msg_id FROM inbox i "
        "LEFT JOIN messages m ON m.id = i.msg_id WHERE i.user_id = ? AND i.seq > ? "
        "ORDER BY i.seq LIMIT ?",
        (user_id, after, -1 if limit is None else limit),
    )
    return list(map(InboxItem._make, rows))


def _drop(cur, user_id, seqs):
    cur.executemany(
        "DELETE FROM inbox WHERE seq = ? AND user_id = ? AND code != ?",
        [(seq, user_id, HELD_MESSAGE) for seq in seqs],
    )


def _set_read_mark(cur, group_id, user_id, ts):
    cur.execute(
        "UPDATE members SET read_mark = ? WHERE group_id = ? AND user_id = ?",
        (ts, group_id, user_id),
    )


def _set_low_mark(cur, group_id, ts):
    cur.execute("UPDATE groups SET low_mark = ? WHERE id = ?", (ts, group_id))


def _group_messages_since(cur, group_id, ts):
    # messages_by_dst holds only destinations from '1' on, every group id (the
    # protocol's): the query says so, for SQLite to use it. Any other id is
    # still answered, by a scan.
    where = f"dst = ? AND {to_group()}" if is_group(group_id) else "dst = ?"
    return cur.execute(
        f"SELECT src, ts FROM messages WHERE {where} AND ts > ? ORDER BY ts, id", (group_id, ts)
    ).fetchall()
