"""The default store: SQLite in WAL mode, with group commit (``batching``)."""

from __future__ import annotations

import json
import os
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
    DEFAULT_RETENTION,
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
    Retention,
    SchemaError,
    StoreUnavailable,
    Subject,
    Swept,
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
SCHEMA_VERSION = 7

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
    # A deleted text's bytes are zeroed in the page that held it (FAST: no
    # write more than the delete makes anyway), not left in the file's free space.
    conn.execute("PRAGMA secure_delete = FAST")
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
            # Readable by its owner alone, whatever the umask, as the database
            # is: the copy holds every text the upgrade removes.
            fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)
            os.close(fd)
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

    def __init__(
        self,
        path: str,
        reactor,
        answering=None,
        on_commit=None,
        busy_timeout_ms=None,
        retention: Retention = DEFAULT_RETENTION,
    ):
        self.path = path
        self._conn = connect(path, busy_timeout_ms)
        ensure_schema(self._conn)
        _connection_setup(self._conn)
        (last,) = self._conn.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()
        self._next_msg_id = last + 1
        super().__init__(reactor, "chatproto-sqlite", answering, on_commit, retention)

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
    now = int(time.time())
    cur.execute(
        "INSERT INTO users (id, secret_hash, created, last_seen) VALUES (?, ?, ?, ?)",
        (user_id, secret_hash, now, now),
    )


def _seen(cur, user_id, now):
    cur.execute("UPDATE users SET last_seen = ? WHERE id = ?", (now, user_id))


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
    "INSERT OR IGNORE INTO messages (id, src, dst, ts, remaining, body_hash)\nVALUES (?, ?, ?, ?, ?, ?)"
)
#: A message's text, kept while a recipient waits for it (or for the archive).
_INSERT_TEXTS = "INSERT INTO texts (msg_id, body) VALUES (?, ?)"
_INSERT_HOLDS = "INSERT INTO inbox (user_id, code, msg_id, src, dst, ts) VALUES (?, ?, ?, ?, ?, ?)"


def _remaining(dst: str, held) -> int:
    """The count a message starts with: a group's members it is held for; 0
    for a direct message, whose one hold says whether it was delivered."""
    return len(held) if is_group(dst) else 0


def _record_messages(store, cur, items):
    """Record a run of messages: one INSERT for all, per-item work only for resends.

    Ids come from the store's counter, so the new rows need no read-back; a
    row the unique index refuses is a resend (or, rarely, a different text
    with the same hash), looked up on its own. A text is written only for a
    message someone waits for (or for the archive).
    """
    first = store._next_msg_id
    store._next_msg_id += len(items)
    archive = store.keeping.archive
    cur.executemany(
        _INSERT_MESSAGES,
        [
            (first + i, src, dst, ts, _remaining(dst, held), body_hash(text))
            for i, (src, dst, ts, text, held) in enumerate(items)
        ],
    )
    all_new = cur.rowcount == len(items)
    results = []
    inbox = []
    texts = []
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
            if held or archive:
                cur.execute(_INSERT_TEXTS, (msg_id, text))
        else:
            inbox += holds
            if held or archive:
                texts.append((msg_id, text))
        results.append(Recorded(msg_id, NEW, not held))
    if inbox:
        cur.executemany(_INSERT_HOLDS, inbox)
    if texts:
        cur.executemany(_INSERT_TEXTS, texts)
    return results


_record_messages.bulk = True


def _record_delivered(store, cur, runs):
    """``batching.record_delivered`` in one INSERT for every run, nothing per
    message unless one was stored before (a resend: looked up on its own).
    The shared version, through ``_record_messages``, costs the store about
    a quarter more CPU a message (Recorded objects): bench/floor.py.
    The text is not written at all unless there is an archive: every
    recipient has it already."""
    ids = count(store._next_msg_id)
    archive = store.keeping.archive
    rows = [
        (next(ids), src, dst, ts, 0, body_hash(text)) for src, dst, stamped in runs for ts, text in stamped
    ]
    store._next_msg_id += len(rows)
    cur.executemany(_INSERT_MESSAGES, rows)
    if cur.rowcount != len(rows):
        held = []
        texts = (text for _, _, stamped in runs for _, text in stamped)
        for (msg_id, src, dst, ts, _, hashed), text in zip(rows, texts, strict=True):
            known = _stored_as(cur, msg_id, src, dst, ts, text, (), hashed)
            if known is None and archive:
                cur.execute(_INSERT_TEXTS, (msg_id, text))
            elif known is not None and known[1] > 0:
                held.append((known[0], [dst]))
        if held:
            _mark_reached(store, cur, held)
    elif archive:
        texts = (text for _, _, stamped in runs for _, text in stamped)
        cur.executemany(_INSERT_TEXTS, [(row[0], text) for row, text in zip(rows, texts, strict=True)])
    return [None] * len(runs)


_record_delivered.bulk = True


#: Stored messages a new one may repeat: (id, recipients still to get it, text, hash).
#: A direct message's recipient is still to get it while it holds it.
_REPEATS = (
    f"SELECT m.id, CASE WHEN {to_group('m.dst')} THEN m.remaining ELSE "
    "(SELECT count(*) FROM inbox WHERE msg_id = m.id AND code = 6) END, t.body, m.body_hash "
    "FROM messages m LEFT JOIN texts t ON t.msg_id = m.id "
    "WHERE m.src = ? AND m.dst = ? AND m.ts = ? AND (m.body_hash = ? OR m.body_hash IS NULL)"
)


def _stored_as(cur, msg_id, src, dst, ts, text, held, hashed=None):
    """(id, remaining) of the stored message this one repeats, or None once it is stored as ``msg_id``.

    The identity index compares hashes: a row with the same hash and another
    text is a collision, and the message is stored beside it with a NULL
    hash. A delivered message has no text left to compare: the hash alone
    says it is the same (two texts of one sender, destination and TIMESTAMP
    sharing a CRC-32 are taken as one, a chance of one in four billion).
    """
    hashed = body_hash(text) if hashed is None else hashed
    rows = cur.execute(_REPEATS, (src, dst, ts, hashed)).fetchall()
    for known_id, remaining, body, known_hash in rows:
        if known_id == msg_id:
            return None
        if body == text or (body is None and known_hash == hashed):
            return known_id, remaining
    cur.execute(
        "INSERT INTO messages (id, src, dst, ts, remaining, body_hash) VALUES (?, ?, ?, ?, ?, NULL)",
        (msg_id, src, dst, ts, _remaining(dst, held)),
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


def _ended(cur, keeping, statement: str, args: tuple) -> list[Completed]:
    """End holds with one of the DELETEs above; answer the messages completed, in record order."""
    return [Completed(src, dst, ts) for _, src, dst, ts in _ended_rows(cur, keeping, statement, args)]


def _ended_rows(cur, keeping, statement: str, args: tuple) -> list[tuple[int, str, str, int]]:
    """``_ended``'s work: (msg_id, src, dst, ts) of each message completed.

    A direct message is completed by its hold's end. A group message is
    counted down by the rows actually deleted, so one marked twice is
    completed once: by the op whose UPDATE takes it to zero. A completed
    message's text goes in the same transaction (``_forget_texts``).

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
    _forget_texts(cur, keeping, [row[0] for row in done])
    return done


#: The texts of a JSON list of messages, every recipient having them.
_FORGET_TEXTS = "DELETE FROM texts WHERE msg_id IN (SELECT value FROM json_each(?))"


def _forget_texts(cur, keeping, msg_ids) -> None:
    """Every recipient has these messages: their texts go, but for an archive's recent ones."""
    cutoff = keeping.text_cutoff
    gone = [msg_id for msg_id in msg_ids if msg_id <= cutoff]
    if not gone:
        return
    if gone[-1] - gone[0] + 1 == len(gone):
        # A run of ids (a flush's page, a burst of one conversation): one range.
        cur.execute("DELETE FROM texts WHERE msg_id BETWEEN ? AND ?", (gone[0], gone[-1]))
    elif RETURNING:
        cur.execute(_FORGET_TEXTS, (json.dumps(gone),))
    else:
        cur.executemany("DELETE FROM texts WHERE msg_id = ?", [(msg_id,) for msg_id in gone])


def _end_holds_by_trigger(cur, keeping, ops):
    """Ending holds before SQLite 3.35 (no RETURNING): each op's (msg_id,
    user_id) pairs in one DELETE for all, the triggers of ``_connection_setup``
    counting down and noting what completes, for the last op naming it."""
    cur.executemany("DELETE FROM inbox WHERE msg_id = ? AND user_id = ? AND code = 6", chain(*ops))
    owner = {msg_id: at for at, pairs in enumerate(ops) for msg_id, _ in pairs}
    results: list[list[Completed]] = [[] for _ in ops]
    done = cur.execute(_TAKE_COMPLETED).fetchall()
    for msg_id, src, dst, ts in done:
        results[owner[msg_id]].append(Completed(src, dst, ts))
    cur.execute("DELETE FROM temp.completed")
    _forget_texts(cur, keeping, [row[0] for row in done])
    return results


def _mark_delivered(store, cur, items):
    if not RETURNING:
        return _end_holds_by_trigger(
            cur, store.keeping, [[(msg_id, user_id) for msg_id in ids] for user_id, ids in items]
        )
    keeping = store.keeping
    return [_ended(cur, keeping, _END_USER_HOLDS, (json.dumps(ids), user_id)) for user_id, ids in items]


def _mark_reached(store, cur, items):
    """A batch's ops that each name one reader (a message held the slow way,
    written after its commit) end that reader's holds in one DELETE a
    reader, not one an op; a completion is owed to the last op naming it."""
    if not RETURNING:
        return _end_holds_by_trigger(
            cur, store.keeping, [[(msg_id, user_id) for user_id in ids] for msg_id, ids in items]
        )
    results: list[list[Completed]] = [[] for _ in items]
    alone: dict[str, dict[int, int]] = {}
    for at, (msg_id, user_ids) in enumerate(items):
        if len(user_ids) == 1:
            alone.setdefault(user_ids[0], {})[msg_id] = at
        else:
            results[at] = _ended(cur, store.keeping, _END_MESSAGE_HOLDS, (msg_id, json.dumps(user_ids)))
    for user_id, owner in alone.items():
        ended = _ended_rows(cur, store.keeping, _END_USER_HOLDS, (json.dumps(list(owner)), user_id))
        for msg_id, src, dst, ts in ended:
            results[owner[msg_id]].append(Completed(src, dst, ts))
    return results


_mark_delivered.bulk = True
_mark_reached.bulk = True

_TAKE_COMPLETED = "SELECT msg_id, src, dst, ts FROM temp.completed ORDER BY rowid"


def _acknowledge(store, cur, items):
    """A 16 ends one hold: the oldest pending for user_id with that name."""
    results = []
    for user_id, src, dst, ts in items:
        found = cur.execute(
            "SELECT msg_id FROM inbox WHERE user_id = ? AND code = ? AND src = ? AND dst = ? AND ts = ? "
            "ORDER BY seq LIMIT 1",
            (user_id, HELD_MESSAGE, src, dst, ts),
        )
        results += _mark_delivered(store, cur, [(user_id, [msg_id for (msg_id,) in found.fetchall()])])
    return results


_acknowledge.bulk = True


def _hold(cur, user_id, code, src, dst, ts, text):
    cur.execute(_INSERT_NOTICE, (user_id, code, src, dst, ts, text))


def _inbox(cur, user_id, after, limit):
    rows = cur.execute(
        "SELECT i.seq, i.code, i.src, i.dst, i.ts, coalesce(t.body, i.body), i.msg_id FROM inbox i "
        "LEFT JOIN texts t ON t.msg_id = i.msg_id WHERE i.user_id = ? AND i.seq > ? "
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


# -- housekeeping: one small pass at a time, in the batch's transaction ------

#: Messages a housekeeping pass looks at per kind of work, and held
#: messages --expire-held drops per pass: a transaction of a millisecond or
#: two, between the frames' transactions.
SWEEP_BATCH = 500

#: A stored message's id, ts, whether it has its text, whether every
#: recipient has it, and whether it is read by all (a group's 09 needs its
#: identity until then; a direct message counts as read).
_SCAN = (
    "SELECT id, EXISTS (SELECT 1 FROM texts WHERE msg_id = messages.id), "
    f"CASE WHEN {to_group()} THEN remaining = 0 "
    "ELSE NOT EXISTS (SELECT 1 FROM inbox WHERE msg_id = messages.id AND code = 6) END, "
    f"CASE WHEN {to_group()} THEN ts <= coalesce((SELECT low_mark FROM groups WHERE id = dst), ts) "
    "ELSE 1 END "
    "FROM messages WHERE id > ? AND id <= ? ORDER BY id LIMIT ?"
)


def _sweep(cur, keeping, now, online):
    """One housekeeping pass (``IChatStore.sweep``), each kind of work a batch of SWEEP_BATCH."""
    retention = keeping.retention
    _mark(cur, now, retention)
    texts = 0
    if keeping.archive:
        keeping.text_cutoff = _id_at(cur, now - retention.keep_delivered)
        texts, more_texts = _sweep_texts(cur, keeping)
    else:
        more_texts = False
    identities, more = _sweep_identities(cur, keeping, _id_at(cur, now - retention.dedup_window))
    held = _expire_held(cur, now - retention.expire_held, online) if retention.expire_held else {}
    return Swept(identities, texts, held, more or more_texts or sum(held.values()) >= SWEEP_BATCH)


_sweep.alone = True


def _mark(cur, now, retention):
    """Note the highest id now (a mark a ``retention.mark_every`` at most); forget marks no age needs."""
    longest = max(retention.dedup_window, retention.keep_delivered)
    (last,) = cur.execute("SELECT max(at) FROM retention_marks").fetchone()
    if last is None or now - last >= retention.mark_every:
        cur.execute(
            "INSERT OR REPLACE INTO retention_marks (at, last_id) "
            "SELECT ?, coalesce(max(id), 0) FROM messages",
            (now,),
        )
    # The newest mark at least ``longest`` old still answers _id_at; older ones never will.
    cur.execute(
        "DELETE FROM retention_marks WHERE at < (SELECT max(at) FROM retention_marks WHERE at <= ?)",
        (now - longest,),
    )


def _id_at(cur, when) -> int:
    """The highest message id stored at or before ``when`` (0: none known to be that old)."""
    (last_id,) = cur.execute(
        "SELECT coalesce(max(last_id), 0) FROM retention_marks WHERE at <= ?", (when,)
    ).fetchone()
    return last_id


def _scan(cur, cursor: int, cutoff: int):
    """The next SWEEP_BATCH messages after ``cursor`` up to ``cutoff``, and where to go on from."""
    rows = cur.execute(_SCAN, (cursor, cutoff, SWEEP_BATCH)).fetchall()
    return rows, (rows[-1][0] if len(rows) == SWEEP_BATCH else 0)


def _sweep_identities(cur, keeping, cutoff):
    """Delete delivered (and read) messages stored before the window, oldest first.

    The cursor goes back to the start once it reaches the cutoff, so a
    message skipped while held is looked at again in the next round.
    """
    rows, keeping.identity_cursor = _scan(cur, keeping.identity_cursor, cutoff)
    gone = [(msg_id,) for msg_id, _, delivered, read in rows if delivered and read]
    cur.executemany("DELETE FROM messages WHERE id = ?", gone)
    cur.executemany("DELETE FROM texts WHERE msg_id = ?", gone)  # an archive's, if it is still there
    return len(gone), bool(gone) and keeping.identity_cursor != 0


def _sweep_texts(cur, keeping):
    """With an archive: drop the texts of delivered messages older than it.

    The cursor only goes forward: a message delivered after it passed loses
    its text at delivery (``_forget_texts``, its id being under the cutoff).
    """
    cutoff = keeping.text_cutoff
    rows = cur.execute(_SCAN, (keeping.text_cursor, cutoff, SWEEP_BATCH)).fetchall()
    keeping.text_cursor = rows[-1][0] if len(rows) == SWEEP_BATCH else max(keeping.text_cursor, cutoff)
    gone = [(msg_id,) for msg_id, has_text, delivered, _ in rows if has_text and delivered]
    cur.executemany("DELETE FROM texts WHERE msg_id = ?", gone)
    return len(gone), len(rows) == SWEEP_BATCH


#: Messages held for users not seen since a time, but for the users online.
_STALE_HOLDS = (
    "SELECT i.seq, i.user_id, i.msg_id, i.dst FROM users u JOIN inbox i ON i.user_id = u.id "
    "WHERE u.last_seen < ? AND u.id NOT IN (SELECT value FROM json_each(?)) AND i.code = 6 LIMIT ?"
)


def _expire_held(cur, before, online) -> dict[str, int]:
    """Drop up to SWEEP_BATCH messages held for users not seen since ``before``.

    A direct message goes whole (it reached no one: a resend is a new
    message); a group message is counted down, and its text goes once no
    member waits for it. No 07 is owed for either: they were not delivered.
    """
    if RETURNING:  # json_each: the users online are left out by the query
        rows = cur.execute(_STALE_HOLDS, (before, json.dumps(sorted(online)), SWEEP_BATCH)).fetchall()
    else:
        rows = cur.execute(_STALE_HOLDS.replace("(SELECT value FROM json_each(?))", "()"), (before, -1))
        rows = [row for row in rows if row[1] not in online][:SWEEP_BATCH]
    cur.executemany("DELETE FROM inbox WHERE seq = ?", [(row[0],) for row in rows])
    direct = [(row[2],) for row in rows if not is_group(row[3])]
    cur.executemany("DELETE FROM messages WHERE id = ?", direct)
    cur.executemany("DELETE FROM texts WHERE msg_id = ?", direct)
    counts = Counter(row[2] for row in rows if is_group(row[3]))
    if RETURNING:
        cur.executemany(
            "UPDATE messages SET remaining = remaining - ? WHERE id = ?", [(n, m) for m, n in counts.items()]
        )
    else:
        # The triggers of _connection_setup counted the group messages down
        # and took the deletes for deliveries: they were not, no 07 is owed.
        cur.execute("DELETE FROM temp.completed")
    cur.executemany(
        "DELETE FROM texts WHERE msg_id = ? AND (SELECT remaining FROM messages WHERE id = ?) = 0",
        [(m, m) for m in counts],
    )
    return dict(Counter(row[1] for row in rows))
