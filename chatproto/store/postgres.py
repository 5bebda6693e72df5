"""The clustered store: PostgreSQL, shared by several nodes.

Group commit as in SQLite (``batching``). On top of it, every inbox row,
user, group and session change is announced with NOTIFY in the transaction
that makes it, so each node's listener sees every change, in commit order,
and only once it is durable.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import sys
import time
from collections import Counter
from importlib import resources
from itertools import count

import psycopg
from psycopg import errors
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from . import (
    DEFAULT_RETENTION,
    DUPLICATE_DELIVERED,
    DUPLICATE_PENDING,
    HELD_ADDED,
    HELD_DELIVERED,
    HELD_MESSAGE,
    HELD_SEEN,
    HELD_SUBJECT,
    NEW,
    SUPERSEDED,
    Completed,
    DatabaseTooNew,
    GroupAdded,
    GroupChange,
    Held,
    IClusterStore,
    InboxItem,
    ListenerAway,
    Reconnected,
    Recorded,
    Released,
    Retention,
    StoreUnavailable,
    Subject,
    Swept,
    Takeover,
    UpgradeFailed,
    UserAdded,
    added_notices,
    is_group,
    joined,
    left_notices,
    next_low_mark,
    to_group,
)
from .batching import BatchingStore, load_snapshot, record_delivered

#: The schema this code writes. A fresh database is made from ``NNN.sql`` of
#: this version; an older one is upgraded in place by ``upgrade_NNN_to_MMM.sql``.
SCHEMA_VERSION = 3

#: The one NOTIFY channel every node listens on.
CHANNEL = "chatproto"

#: Seconds to wait for a connection: an unreachable database fails a batch
#: quickly (the server answers "busy") instead of stalling every client.
CONNECT_TIMEOUT = 2

#: Transactions tried per batch when PostgreSQL breaks a deadlock between
#: nodes (or a serialization conflict) by aborting ours.
ATTEMPTS = 4

#: The listener's reconnection delays: doubled from the first up to the last.
RECONNECT_FIRST = 0.5
RECONNECT_MAX = 5.0

# Advisory lock keys. Single bigint keys: the schema lock, and each node's
# liveness lock (hashtextextended of its id); two-int keys, a separate key
# space: one class for claims of a user's session.
_SCHEMA_LOCK = 0x636861747072  # "chatpr"
_CLAIM_LOCKS = 0x63686174  # "chat"


def connect(dsn: str, autocommit: bool = True) -> psycopg.Connection:
    """Open ``dsn`` with the settings every connection of the store needs.

    Keepalives notice a database that vanished without closing the
    connection (a partition), so the listener reconnects instead of waiting.
    """
    return psycopg.connect(
        dsn,
        autocommit=autocommit,
        connect_timeout=CONNECT_TIMEOUT,
        keepalives=1,
        keepalives_idle=10,
        keepalives_interval=5,
        keepalives_count=3,
    )


def schema_sql(version: int) -> str:
    """The whole schema at ``version``: what a fresh database is made from."""
    return resources.files(__package__).joinpath(f"schema/postgres/{version:03d}.sql").read_text()


def upgrade_sql(version: int) -> str:
    """The step from ``version`` to the next one."""
    name = f"schema/postgres/upgrade_{version:03d}_to_{version + 1:03d}.sql"
    return resources.files(__package__).joinpath(name).read_text()


def schema_version(conn: psycopg.Connection) -> int | None:
    """The version the database records, or None for an empty database."""
    (table,) = conn.execute("SELECT to_regclass('schema_version')").fetchone()
    if table is None:
        return None
    (version,) = conn.execute("SELECT version FROM schema_version").fetchone()
    return version


def ensure_schema(conn: psycopg.Connection) -> int:
    """Make the schema in an empty database, upgrade an older one, refuse a newer one.

    Under a transaction-level advisory lock, so that nodes starting together
    make or upgrade it once; the DDL commits with the version, or not at
    all. No copy is taken first: PostgreSQL is backed up with its own tools
    (docs/scaling.md), before starting a newer chatproto; stop the older
    nodes first (from 2 to 3 an older node would write no digest).
    """
    where = f"{conn.info.dbname} on {conn.info.host}:{conn.info.port}"
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        version = schema_version(conn)
        if version is None:
            conn.execute(schema_sql(SCHEMA_VERSION))
            conn.execute(
                "INSERT INTO schema_history (version, applied) VALUES (%s, %s)",
                (SCHEMA_VERSION, int(time.time())),
            )
        elif version > SCHEMA_VERSION:
            raise DatabaseTooNew(
                f"the database {where} has schema version {version}, newer than this "
                f"chatproto's {SCHEMA_VERSION}: run a newer chatproto"
            )
        elif version < SCHEMA_VERSION:
            try:
                with conn.transaction():  # a savepoint: a failed step is rolled back, then said
                    for step in range(version, SCHEMA_VERSION):
                        conn.execute(upgrade_sql(step))
                    conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION,))
                    conn.execute(
                        "INSERT INTO schema_history (version, applied, previous) VALUES (%s, %s, %s)",
                        (SCHEMA_VERSION, int(time.time()), version),
                    )
            except psycopg.DatabaseError as e:
                raise UpgradeFailed(
                    f"upgrading the database {where} from schema version {version} to {SCHEMA_VERSION} "
                    f"failed ({e}); it was left at version {version}"
                ) from e
            _schema_log.info(
                "upgraded {where} from schema version {old} to {new}",
                where=where,
                old=version,
                new=SCHEMA_VERSION,
            )
    return SCHEMA_VERSION


_schema_log = Logger(namespace="chatproto.store.postgres")


# Notification payloads: compact JSON arrays, a kind letter first; message
# text in base64 (it is bytes, and a payload must be text under 8000 bytes).


def _dumps(*fields) -> str:
    return json.dumps(fields, separators=(",", ":"))


def _held(user, seq, code, src, dst, ts, msg_id, text):
    """``text``: a message's, an 11's members or an 18's name, base64."""
    body = None if text is None else base64.b64decode(text)
    return Held(user, InboxItem(seq, code, src, dst, ts, body, msg_id))


_EVENTS = {
    "h": _held,
    "u": UserAdded,
    "g": GroupAdded,
    "t": Takeover,
    "r": Released,
}


@implementer(IClusterStore)
class PostgresStore(BatchingStore):
    """``PostgresStore(dsn, reactor, node=None)``: a node's store; ``node`` names it to the others.

    Connects (and makes the schema) at once, raising StoreUnavailable if the
    database cannot be reached. Later, a lost connection fails the batch it
    broke with StoreUnavailable and is made again for the next one.
    """

    log = Logger()
    ops = sys.modules[__name__]
    clustered = True

    def __init__(
        self,
        dsn: str,
        reactor,
        node: str | None = None,
        answering=None,
        on_commit=None,
        retention: Retention = DEFAULT_RETENTION,
    ):
        self.dsn = dsn
        self.node = node or secrets.token_hex(4)
        self._conn: psycopg.Connection | None = None
        try:
            ensure_schema(self._connection())
        except BaseException:
            self._disconnect()
            raise
        #: Payloads to NOTIFY at the end of the running transaction.
        self._notes: list[str] = []
        self._syncs: dict[int, Deferred] = {}
        self._sync_ids = count(1)
        self._handler = None
        self._listener: _Listener | None = None
        super().__init__(reactor, "chatproto-postgres", answering, on_commit, retention)

    # -- the connection and the transaction ----------------------------------

    def _connection(self) -> psycopg.Connection:
        if self._conn is None:
            try:
                self._conn = connect(self.dsn)
            except psycopg.OperationalError as e:
                raise StoreUnavailable(f"cannot connect to PostgreSQL: {e}") from e
        return self._conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _transaction(self, batch):
        """The batch in one transaction, then its notifications in one statement.

        A deadlock is retried; a connection that died while idle (the database
        restarted) is made again once. A failure on a fresh connection, or
        during the commit (whose outcome is then unknown), fails the batch
        with StoreUnavailable.
        """
        attempt = 0
        while True:
            attempt += 1
            fresh = self._conn is None
            conn = self._connection()
            started = time.perf_counter()
            self._notes = []
            committing = False
            try:
                with conn.transaction():
                    with conn.cursor() as cur:
                        results = self._apply(cur, batch)
                        if self._notes:
                            cur.execute(
                                "SELECT pg_notify(%s, p) FROM unnest(%b::text[]) AS p", (CHANNEL, self._notes)
                            )
                    committing = True
            except errors.TransactionRollback:
                if attempt == ATTEMPTS:
                    raise
                self.log.info("the database aborted a transaction (deadlock), trying again ({n})", n=attempt)
                continue
            except (psycopg.OperationalError, psycopg.InterfaceError) as e:
                self._disconnect()
                if committing:
                    raise StoreUnavailable(f"the connection to PostgreSQL failed during a commit: {e}") from e
                if fresh or attempt == ATTEMPTS:
                    raise StoreUnavailable(f"the connection to PostgreSQL failed: {e}") from e
                continue
            return results, time.perf_counter() - started

    def _call(self, fn, cur, args):
        """Every operation takes the store too; one that may be refused gets a
        savepoint, so that it fails alone, announcing nothing."""
        if not getattr(fn, "may_conflict", False):
            return True, fn(self, cur, *args)
        notes = len(self._notes)
        try:
            with cur.connection.transaction():
                return True, fn(self, cur, *args)
        except psycopg.IntegrityError as e:
            del self._notes[notes:]
            return False, e

    def _release(self):
        self._stop_listening()
        self._disconnect()

    # -- operations --------------------------------------------------------

    def lookup(self, ids):
        return self._submit(_lookup, list(ids))

    def read_group(self, group_id, user_id, ts):
        return self._submit(_read_group, group_id, user_id, ts)

    def claim_session(self, user_id, since=None, wanted=None):
        return self._submit(_claim_session, user_id, time.time() if since is None else since, wanted)

    def release_session(self, user_id):
        return self._submit(_release_session, user_id)

    # -- the listener ------------------------------------------------------

    def listen(self, handler):
        """Start the listener: ``handler(event)`` is called on the reactor thread
        for every event, in commit order, from this node's changes and every
        other node's. If the listener's connection is lost it is made again
        (after 0.5 s, doubling to 5 s between tries) and ``handler(Reconnected())``
        says that events may have been missed meanwhile.

        The listener's connection holds this node's liveness lock, so other
        nodes see this one alive exactly while it listens.
        """
        self._handler = handler
        self._listener = _Listener(self)
        return self._listener.start()

    def sync(self):
        """Publish a token through the store; fires when the listener receives it.

        Notifications arrive in commit order, so by then every event committed
        before this call has been handed to the handler. Fails with
        StoreUnavailable if the token cannot be committed, or if the listener
        is not connected (or loses its connection meanwhile): it could be lost.
        """
        if self._listener is None:
            return fail(RuntimeError("sync() needs listen() first"))
        if self._listener.conn is None:
            return fail(ListenerAway("the listener is not connected"))
        n = next(self._sync_ids)
        d = self._syncs[n] = Deferred()

        def unpublished(failure):
            if self._syncs.pop(n, None) is not None:
                d.errback(failure)

        self._submit(_note, _dumps("s", self.node, n)).addErrback(unpublished)
        return d

    def _notified(self, payload: str) -> None:
        """One notification, on the reactor thread: a sync token, or an event for the handler."""
        kind, *fields = json.loads(payload)
        if kind == "s":
            node, n = fields
            d = self._syncs.pop(n, None) if node == self.node else None
            if d is not None:
                d.callback(None)
            return
        make = _EVENTS.get(kind)
        if make is None:
            self.log.warn("ignored a notification of an unknown kind: {payload}", payload=payload)
            return
        self._event(make(*fields))

    def _event(self, event) -> None:
        """A failing handler is logged, not allowed to stop the listener."""
        try:
            self._handler(event)
        except Exception:
            self.log.failure("the listener's handler failed on {event}", event=event)

    def _listener_lost(self) -> None:
        """Tokens in flight may be gone with the connection: their syncs fail."""
        syncs, self._syncs = self._syncs, {}
        for d in syncs.values():
            d.errback(ListenerAway("the listener lost its connection"))

    def _stop_listening(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
            self._listener_lost()


_TRY_LOCK = "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))"
_LOCK = "SELECT pg_advisory_lock(hashtextextended(%s, 0))"
#: A bigint advisory key is in pg_locks as classid (high half), objid (low half), objsubid 1.
_END_HOLDER = """
SELECT pg_terminate_backend(pid) FROM pg_locks
WHERE locktype = 'advisory' AND granted AND objsubid = 1 AND pid <> pg_backend_pid()
  AND (classid::text::bigint << 32 | objid::text::bigint) = hashtextextended(%s, 0)
"""


@implementer(IReadDescriptor)
class _Listener:
    """The node's LISTEN connection, read by the reactor when its socket is readable.

    Connecting runs on a thread of its own (a connection may take up to
    CONNECT_TIMEOUT); everything else runs on the reactor thread, through
    libpq's non-blocking calls.
    """

    def __init__(self, store: PostgresStore):
        self.store = store
        self.reactor = store._reactor
        self.conn: psycopg.Connection | None = None
        #: A duplicate of the socket's descriptor, which the reactor watches:
        #: libpq closes its own when the connection is lost, and the reactor
        #: still has to stop watching it then.
        self.fd = -1
        self.delay = RECONNECT_FIRST
        self.retry = None
        self.stopped = False
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="chatproto-postgres-listener")
        self.pool.start()

    def start(self) -> Deferred:
        return deferToThreadPool(self.reactor, self.pool, self._connect).addCallback(self._listening)

    def _connect(self, again=False):
        """On the listener's thread: connect, take the liveness lock, LISTEN.

        Connecting ``again``, a lock still held is this node's own lost
        connection, which the database has not noticed yet (a partition): it
        is ended, else the node could not listen until the database's TCP
        keepalive gives up (hours). At the first connection, it is another
        process given the same node id, and is refused.

        Notifications that psycopg reads before the reactor watches the socket
        are kept to be handled first.
        """
        conn = connect(self.store.dsn)
        early = []
        conn.add_notify_handler(early.append)
        try:
            (locked,) = conn.execute(_TRY_LOCK, (self.store.node,)).fetchone()
            if not locked and again:
                conn.execute(_END_HOLDER, (self.store.node,))
                conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{CONNECT_TIMEOUT}s",))
                conn.execute(_LOCK, (self.store.node,))
                conn.execute("RESET lock_timeout")
            elif not locked:
                raise StoreUnavailable(f"node {self.store.node}'s lock is held by another connection")
            conn.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            conn.close()
            raise
        return conn, early

    def _listening(self, connected, reconnected=False) -> None:
        conn, early = connected
        if self.stopped:
            conn.close()
            return
        self.conn = conn
        self.fd = os.dup(conn.pgconn.socket)
        self.reactor.addReader(self)
        if reconnected:
            self.store.log.info("the listener is connected again")
            self.store._event(Reconnected())
        for notify in early:
            self.store._notified(notify.payload)
        why = self.doRead()  # libpq may hold data already read from the socket
        if why is not None:
            self.reactor.removeReader(self)
            self.connectionLost(why)

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "chatproto-postgres-listener"

    def doRead(self):
        pgconn = self.conn.pgconn
        try:
            pgconn.consume_input()
        except psycopg.OperationalError as e:
            return ConnectionLost(str(e))
        while (notify := pgconn.notifies()) is not None:
            self.store._notified(notify.extra.decode())
            if self.conn is None:  # the handler closed the store
                return None
        if pgconn.status != psycopg.pq.ConnStatus.OK:
            return ConnectionLost("the listener's connection is closed")
        return None

    def connectionLost(self, reason) -> None:
        self._close()
        if self.stopped:
            return
        self.store.log.warn("the listener lost its connection: {reason}", reason=reason.getErrorMessage())
        self.store._listener_lost()
        self._schedule()

    def _schedule(self) -> None:
        self.retry = self.reactor.callLater(self.delay, self._reconnect)
        self.delay = min(self.delay * 2, RECONNECT_MAX)

    def _reconnect(self) -> None:
        self.retry = None
        d = deferToThreadPool(self.reactor, self.pool, self._connect, again=True)
        d.addCallbacks(self._reconnected, self._still_down)

    def _reconnected(self, connected) -> None:
        self.delay = RECONNECT_FIRST
        self._listening(connected, reconnected=True)

    def _still_down(self, failure) -> None:
        if self.stopped:
            return
        self.store.log.warn("the listener cannot connect: {error}", error=failure.getErrorMessage())
        self._schedule()

    def _close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
            os.close(self.fd)
            self.fd = -1

    def stop(self) -> None:
        """Stop listening and release the liveness lock: other nodes now see this one gone."""
        self.stopped = True
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        if self.conn is not None:
            self.reactor.removeReader(self)
            self._close()
        self.pool.stop()


# Each operation runs on the database thread inside the batch's transaction,
# as ``fn(store, cur, *args)``, or ``fn(store, cur, [args, ...])`` when bulk.


def _note(store, cur, payload):
    store._notes.append(payload)


def _columns(rows) -> list[list]:
    """Rows as one list per column, for ``unnest``: a run of inserts in one statement."""
    return [list(column) for column in zip(*rows, strict=True)]


def _insert_holds(store, cur, rows, texts=None) -> None:
    """Insert inbox rows (user, code, src, dst, ts, msg_id) in one statement, and announce each.

    ``texts`` gives the text of held messages by id, for the announcement.
    """
    _insert_notices(store, cur, [(*row, None) for row in rows], texts)


def _insert_notices(store, cur, rows, texts=None) -> None:
    """``_insert_holds`` with each row's body last (an 11's members, an 18's name, or None)."""
    if not rows:
        return
    cur.execute(
        "INSERT INTO inbox (user_id, code, src, dst, ts, msg_id, body) "
        "SELECT * FROM unnest(%b::text[], %b::smallint[], %b::text[], %b::text[], %b::bigint[], "
        "%b::bigint[], %b::bytea[]) "
        "RETURNING seq, user_id, code, src, dst, ts, msg_id, body",
        _columns(rows),
    )
    for seq, user, code, src, dst, ts, msg_id, body in sorted(cur.fetchall()):
        text = texts.get(msg_id) if texts and code == HELD_MESSAGE else body
        encoded = None if text is None else base64.b64encode(text).decode()
        store._notes.append(_dumps("h", user, seq, code, src, dst, ts, msg_id, encoded))


def _load(store, cur):
    return load_snapshot(cur)


def _add_user(store, cur, user_id, secret_hash):
    now = int(time.time())
    cur.execute(
        "INSERT INTO users (id, secret_hash, created, last_seen) VALUES (%s, %s, %s, %s)",
        (user_id, secret_hash, now, now),
    )
    store._notes.append(_dumps("u", user_id, secret_hash))


def _seen(store, cur, items):
    """A run of logins and logouts, in a transaction of their own (``alone``),
    the users' rows locked in id order: several nodes noting the same users
    wait for each other instead of deadlocking, and no frame's transaction
    holds one of these locks while it waits for another."""
    latest: dict[str, int] = {}
    for user_id, now in items:
        latest[user_id] = max(now, latest.get(user_id, 0))
    users = sorted(latest)
    cur.execute("SELECT id FROM users WHERE id = ANY(%b::text[]) ORDER BY id FOR UPDATE", (users,))
    cur.execute(
        "UPDATE users u SET last_seen = greatest(u.last_seen, t.at) "
        "FROM unnest(%b::text[], %b::bigint[]) AS t(id, at) WHERE u.id = t.id",
        (users, [latest[user] for user in users]),
    )
    return [None] * len(items)


_seen.bulk = True
_seen.alone = True


def _add_group(store, cur, group_id, ts, members, hold_for):
    cur.execute(
        "INSERT INTO groups (id, ts, created, low_mark) VALUES (%s, %s, %s, 0)",
        (group_id, ts, int(time.time())),
    )
    cur.execute(
        "INSERT INTO members (group_id, user_id, position, read_mark) "
        "SELECT %s, user_id, position - 1, 0 FROM unnest(%b::text[]) WITH ORDINALITY AS m(user_id, position)",
        (group_id, members),
    )
    store._notes.append(_dumps("g", group_id, members))
    body = joined(members)
    _insert_notices(store, cur, [(user_id, HELD_ADDED, "", group_id, ts, None, body) for user_id in hold_for])


_add_user.may_conflict = True
_add_group.may_conflict = True


def _locked_members(cur, group_id) -> list[str]:
    """The group's members, its row locked first: two nodes changing one
    group's members (or moving its low mark) do so one after the other."""
    cur.execute("SELECT 1 FROM groups WHERE id = %s FOR UPDATE", (group_id,))
    return [
        user_id
        for (user_id,) in cur.execute(
            "SELECT user_id FROM members WHERE group_id = %s ORDER BY position", (group_id,)
        ).fetchall()
    ]


def _with_body(rows) -> list[tuple]:
    """``added_notices`` rows (user, code, src, dst, ts, text) as inbox rows with no msg_id."""
    return [(user_id, code, src, dst, ts, None, text) for user_id, code, src, dst, ts, text in rows]


def _set_subject(store, cur, group_id, src, ts, name, online):
    members = _locked_members(cur, group_id)
    cur.execute(
        "UPDATE groups SET subject = %s, subject_src = %s, subject_ts = %s WHERE id = %s",
        (name, src, ts, group_id),
    )
    offline = [user_id for user_id in members if user_id not in online]
    # The 18 still held for them says nothing the new one does not (inbox_subjects).
    cur.execute(
        "DELETE FROM inbox WHERE user_id = ANY(%b::text[]) AND dst = %s AND code = %s",
        (offline, group_id, HELD_SUBJECT),
    )
    _insert_notices(
        store, cur, [(user_id, HELD_SUBJECT, src, group_id, ts, None, name) for user_id in offline]
    )
    return members


def _add_members(store, cur, group_id, ts, added, online):
    before = _locked_members(cur, group_id)
    new = [user_id for user_id in dict.fromkeys(added) if user_id not in before]
    (mark,) = cur.execute("SELECT coalesce(max(ts), 0) FROM messages WHERE dst = %s", (group_id,)).fetchone()
    cur.execute(
        "INSERT INTO members (group_id, user_id, position, read_mark) "
        "SELECT %s, user_id, %s + position - 1, %s "
        "FROM unnest(%b::text[]) WITH ORDINALITY AS m(user_id, position)",
        (group_id, _next_position(cur, group_id), mark, new),
    )
    members = before + new
    row = cur.execute(
        "SELECT subject_src, subject_ts, subject FROM groups WHERE id = %s", (group_id,)
    ).fetchone()
    subject = None if row is None or row[2] is None else Subject(row[0], row[1], bytes(row[2]))
    store._notes.append(_dumps("g", group_id, members))
    _insert_notices(store, cur, _with_body(added_notices(group_id, ts, members, new, subject, online)))
    return GroupChange(members, subject, mark)


def _next_position(cur, group_id) -> int:
    (position,) = cur.execute(
        "SELECT coalesce(max(position), -1) + 1 FROM members WHERE group_id = %s", (group_id,)
    ).fetchone()
    return position


def _leave_group(store, cur, group_id, user_id, ts, online):
    """The member goes; the group's low mark may move, counting those who remain."""
    _locked_members(cur, group_id)
    cur.execute("DELETE FROM members WHERE group_id = %s AND user_id = %s", (group_id, user_id))
    marks = cur.execute(
        "SELECT user_id, read_mark FROM members WHERE group_id = %s ORDER BY position", (group_id,)
    ).fetchall()
    members = [member for member, _ in marks]
    store._notes.append(_dumps("g", group_id, members))
    _insert_notices(store, cur, _with_body(left_notices(group_id, user_id, ts, members, online)))
    _move_low_mark(store, cur, group_id, marks)
    return GroupChange(members)


def _record_messages(store, cur, items):
    """Record a run of messages: one INSERT for all, per-item work only for resends.

    A message that completes here (no recipient, or a resend of a delivered
    one) holds its sender's 07 in the same transaction. The text is written
    only if a recipient still waits for it (or for an archive).
    """
    archive = store.keeping.archive
    digests = [hashlib.sha256(text).digest() for _, _, _, text, _ in items]
    cur.execute(
        "INSERT INTO messages (src, dst, ts, body, remaining, digest) "
        "SELECT * FROM unnest(%b::text[], %b::text[], %b::bigint[], %b::bytea[], %b::integer[], %b::bytea[]) "
        "ON CONFLICT (src, dst, ts, digest) DO NOTHING RETURNING id, src, dst, ts, digest",
        _columns(
            (src, dst, ts, text if held or archive else None, len(held), digest)
            for (src, dst, ts, text, held), digest in zip(items, digests, strict=True)
        ),
    )
    made = {(src, dst, ts, bytes(digest)): msg_id for msg_id, src, dst, ts, digest in cur.fetchall()}
    results = []
    rows = []
    texts = {}
    for (src, dst, ts, text, held), digest in zip(items, digests, strict=True):
        msg_id = made.pop((src, dst, ts, digest), None)
        if msg_id is None:
            known_id, remaining = cur.execute(
                "SELECT id, remaining FROM messages WHERE src = %s AND dst = %s AND ts = %s AND digest = %s",
                (src, dst, ts, digest),
            ).fetchone()
            status = DUPLICATE_DELIVERED if remaining == 0 else DUPLICATE_PENDING
            results.append(Recorded(known_id, status, remaining == 0))
            if remaining == 0:
                rows.append((src, HELD_DELIVERED, "", dst, ts, None))
            continue
        texts[msg_id] = text
        rows.extend((user_id, HELD_MESSAGE, src, dst, ts, msg_id) for user_id in held)
        if not held:
            rows.append((src, HELD_DELIVERED, "", dst, ts, None))
        results.append(Recorded(msg_id, NEW, not held))
    _insert_holds(store, cur, rows, texts)
    return results


_record_messages.bulk = True

#: Ends holds and counts each message's remaining recipients down by the rows
#: actually deleted: the UPDATE waits for another node's on the same message
#: and counts from its result, so a message completes once across nodes. A
#: message completed loses its text in the same statement (unless an archive
#: still keeps it: its id is past the text cutoff).
_END_HOLDS = """
WITH gone AS (
    DELETE FROM inbox i USING unnest(%b::bigint[], %b::text[]) AS t(msg_id, user_id)
    WHERE i.code = 6 AND i.msg_id = t.msg_id AND i.user_id = t.user_id
    RETURNING i.msg_id
)
UPDATE messages m SET remaining = m.remaining - g.n,
    body = CASE WHEN m.remaining = g.n AND m.id <= %s THEN NULL ELSE m.body END
FROM (SELECT msg_id, count(*) AS n FROM gone GROUP BY msg_id) AS g
WHERE m.id = g.msg_id
RETURNING m.id, m.src, m.dst, m.ts, m.remaining
"""


def _end_holds(store, cur, ops):
    """End the holds named by each op's (msg_id, user_id) pairs: one statement for all.

    A completed message is owed to the last op naming it, as in SQLite, and
    its sender's 07 is held at once. The messages are locked first, in id
    order, so that two nodes ending holds of the same messages wait for each
    other instead of deadlocking.
    """
    pairs = [pair for op in ops for pair in op]
    results: list[list[Completed]] = [[] for _ in ops]
    if not pairs:
        return results
    cur.execute(
        "SELECT id FROM messages WHERE id = ANY(%b::bigint[]) ORDER BY id FOR UPDATE",
        (sorted({msg_id for msg_id, _ in pairs}),),
    )
    cur.execute(
        _END_HOLDS,
        ([msg_id for msg_id, _ in pairs], [user_id for _, user_id in pairs], store.keeping.text_cutoff),
    )
    completed = {msg_id: Completed(src, dst, ts) for msg_id, src, dst, ts, n in cur.fetchall() if n == 0}
    owner = {msg_id: at for at, op in enumerate(ops) for msg_id, _ in op}
    rows = []
    for at, op in enumerate(ops):
        for msg_id, _ in op:
            done = completed.get(msg_id) if owner[msg_id] == at else None
            if done is not None:
                del completed[msg_id]
                results[at].append(done)
                rows.append((done.src, HELD_DELIVERED, "", done.dst, done.ts, None))
    _insert_holds(store, cur, rows)
    return results


def _mark_delivered(store, cur, items):
    return _end_holds(store, cur, [[(msg_id, user_id) for msg_id in msg_ids] for user_id, msg_ids in items])


def _mark_reached(store, cur, items):
    return _end_holds(store, cur, [[(msg_id, user_id) for user_id in user_ids] for msg_id, user_ids in items])


_mark_delivered.bulk = True
_mark_reached.bulk = True


def _acknowledge(store, cur, user_id, src, dst, ts):
    """A 16 ends one hold: the oldest pending for user_id with that name."""
    ids = [
        msg_id
        for (msg_id,) in cur.execute(
            "SELECT msg_id FROM inbox WHERE user_id = %s AND code = %s AND src = %s AND dst = %s "
            "AND ts = %s ORDER BY seq LIMIT 1",
            (user_id, HELD_MESSAGE, src, dst, ts),
        ).fetchall()
    ]
    return _end_holds(store, cur, [[(msg_id, user_id) for msg_id in ids]])[0]


def _hold(store, cur, items):
    _insert_notices(
        store, cur, [(user_id, code, src, dst, ts, None, text) for user_id, code, src, dst, ts, text in items]
    )
    return [None] * len(items)


_hold.bulk = True


def _inbox(store, cur, user_id, after, limit):
    return [
        InboxItem(*row)
        for row in cur.execute(
            "SELECT i.seq, i.code, i.src, i.dst, i.ts, coalesce(m.body, i.body), i.msg_id FROM inbox i "
            "LEFT JOIN messages m ON m.id = i.msg_id WHERE i.user_id = %s AND i.seq > %s "
            "ORDER BY i.seq LIMIT %s",
            (user_id, after, limit),
        ).fetchall()
    ]


def _drop(store, cur, items):
    """Every 07/09/11 sent in this batch, to every user, in one DELETE: in a
    cluster each 07 is a held row, so this runs once per message."""
    pairs = [(user_id, seq) for user_id, seqs in items for seq in seqs]
    if pairs:
        cur.execute(
            "DELETE FROM inbox i USING unnest(%b::text[], %b::bigint[]) AS t(user_id, seq) "
            "WHERE i.seq = t.seq AND i.user_id = t.user_id AND i.code <> 6",
            _columns(pairs),
        )
    return [None] * len(items)


_drop.bulk = True


def _set_read_mark(store, cur, group_id, user_id, ts):
    cur.execute(
        "UPDATE members SET read_mark = %s WHERE group_id = %s AND user_id = %s", (ts, group_id, user_id)
    )


def _set_low_mark(store, cur, group_id, ts):
    cur.execute("UPDATE groups SET low_mark = %s WHERE id = %s", (ts, group_id))


#: Not used by a cluster's hub (its senders' messages may come through other
#: nodes), kept so that the store is whole: the shared, slower version.
_record_delivered = record_delivered


def _latest_timestamp(store, cur, src, dst):
    (latest,) = cur.execute(
        "SELECT coalesce(max(ts), 0) FROM messages WHERE src = %s AND dst = %s", (src, dst)
    ).fetchone()
    return latest


def _group_messages_since(store, cur, group_id, ts):
    return cur.execute(
        "SELECT src, ts FROM messages WHERE dst = %s AND ts > %s ORDER BY ts, id", (group_id, ts)
    ).fetchall()


def _lookup(store, cur, ids):
    found = cur.execute("SELECT id, secret_hash FROM users WHERE id = ANY(%b::text[])", (ids,))
    users = dict(found.fetchall())
    # A group everyone left is still a group (its frames get 12 XX 07, not 06).
    groups = dict(
        cur.execute(
            "SELECT g.id, coalesce(array_agg(m.user_id ORDER BY m.position) "
            "FILTER (WHERE m.user_id IS NOT NULL), '{}') "
            "FROM groups g LEFT JOIN members m ON m.group_id = g.id "
            "WHERE g.id = ANY(%b::text[]) GROUP BY g.id",
            (ids,),
        ).fetchall()
    )
    return users, groups


def _read_group(store, cur, group_id, user_id, ts):
    """Raise a read mark and move the low mark, under the group's row lock so
    that two nodes' readers of one group move it one after the other."""
    row = cur.execute("SELECT low_mark FROM groups WHERE id = %s FOR UPDATE", (group_id,)).fetchone()
    if row is None:
        return None
    (low,) = row
    cur.execute(
        "UPDATE members SET read_mark = greatest(read_mark, %s) WHERE group_id = %s AND user_id = %s",
        (ts, group_id, user_id),
    )
    members = cur.execute(
        "SELECT user_id, read_mark FROM members WHERE group_id = %s ORDER BY position", (group_id,)
    ).fetchall()
    return _move_low_mark(store, cur, group_id, members, low)


def _move_low_mark(store, cur, group_id, members, low=None):
    """Move the group's low mark over ``members`` (user, read mark), its row
    locked; a 09 held for each of them if it moved. The new mark, or None."""
    if low is None:
        (low,) = cur.execute("SELECT low_mark FROM groups WHERE id = %s", (group_id,)).fetchone()
    rows = _group_messages_since(store, cur, group_id, low)
    new_low = next_low_mark(low, rows, [user for user, _ in members], dict(members))
    if new_low is None:
        return None
    cur.execute("UPDATE groups SET low_mark = %s WHERE id = %s", (new_low, group_id))
    _insert_holds(store, cur, [(user, HELD_SEEN, group_id, "", new_low, None) for user, _ in members])
    return new_low


def _claim_session(store, cur, user_id, since, wanted):
    """Take the user's session; the previous node, if another and alive, is told to let go.

    Claims of one user are serialized by a transaction lock, so each sees
    the owner the previous one left. A node is alive while its listener
    holds its lock: taking that lock (and giving it back at once) succeeds
    only for a dead node. The later login wins, whichever commits last: a
    client that dropped its connection to one node and logged in on another
    must not be closed by the first node's claim committing late.
    """
    if wanted is not None and not wanted():
        return None
    since_ms = int(since * 1000)
    cur.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_CLAIM_LOCKS, user_id))
    row = cur.execute("SELECT node, since FROM sessions WHERE user_id = %s", (user_id,)).fetchone()
    previous, held_since = row if row else (None, None)
    other = previous is not None and previous != store.node
    alive = other and _alive(cur, previous)
    if alive and held_since > since_ms:
        return SUPERSEDED
    cur.execute(
        "INSERT INTO sessions (user_id, node, since) VALUES (%s, %s, %s) "
        "ON CONFLICT (user_id) DO UPDATE SET node = excluded.node, since = excluded.since",
        (user_id, store.node, since_ms),
    )
    if not alive:
        return None
    store._notes.append(_dumps("t", user_id, previous, store.node))
    return previous


def _alive(cur, node: str) -> bool:
    """Whether the node's listener holds its lock (taking it, and giving it back at once, fails)."""
    (alive,) = cur.execute(
        "SELECT CASE WHEN pg_try_advisory_lock(k) THEN NOT pg_advisory_unlock(k) ELSE true END "
        "FROM (SELECT hashtextextended(%s, 0) AS k) AS node",
        (node,),
    ).fetchone()
    return alive


def _release_session(store, cur, user_id):
    cur.execute("DELETE FROM sessions WHERE user_id = %s AND node = %s", (user_id, store.node))
    store._notes.append(_dumps("r", user_id, store.node))


# -- housekeeping: SQLite's passes (store/sqlite.py), in PostgreSQL's SQL ----
# Every node runs its own passes; two deleting the same rows wait for each
# other and the second deletes nothing.

#: As SQLite's.
SWEEP_BATCH = 500

#: (id, has its text, every recipient has it, read by every member). A
#: message counts its recipients down here, direct ones too.
_SCAN = f"""
SELECT m.id, m.body IS NOT NULL, m.remaining = 0,
    CASE WHEN {to_group("m.dst")}
    THEN m.ts <= coalesce((SELECT low_mark FROM groups g WHERE g.id = m.dst), m.ts) ELSE true END
FROM messages m WHERE m.id > %s AND m.id <= %s ORDER BY m.id LIMIT %s
"""


def _sweep(store, cur, keeping, now, online):
    """One housekeeping pass (``IChatStore.sweep``), each kind of work a batch of SWEEP_BATCH."""
    retention = keeping.retention
    _mark(cur, now, retention)
    texts, more_texts = 0, False
    if keeping.archive:
        keeping.text_cutoff = _id_at(cur, now - retention.keep_delivered)
        rows = cur.execute(_SCAN, (keeping.text_cursor, keeping.text_cutoff, SWEEP_BATCH)).fetchall()
        more_texts = len(rows) == SWEEP_BATCH
        keeping.text_cursor = rows[-1][0] if more_texts else max(keeping.text_cursor, keeping.text_cutoff)
        gone = [msg_id for msg_id, has_text, delivered, _ in rows if has_text and delivered]
        cur.execute("UPDATE messages SET body = NULL WHERE id = ANY(%b::bigint[])", (gone,))
        texts = len(gone)
    cutoff = _id_at(cur, now - retention.dedup_window)
    rows = cur.execute(_SCAN, (keeping.identity_cursor, cutoff, SWEEP_BATCH)).fetchall()
    keeping.identity_cursor = rows[-1][0] if len(rows) == SWEEP_BATCH else 0
    gone = [msg_id for msg_id, _, delivered, read in rows if delivered and read]
    cur.execute("DELETE FROM messages WHERE id = ANY(%b::bigint[]) AND remaining = 0", (gone,))
    more = bool(gone) and keeping.identity_cursor != 0
    held = _expire_held(cur, now - retention.expire_held, online) if retention.expire_held else {}
    return Swept(len(gone), texts, held, more or more_texts or sum(held.values()) >= SWEEP_BATCH)


_sweep.alone = True


def _mark(cur, now, retention):
    longest = max(retention.dedup_window, retention.keep_delivered)
    (last,) = cur.execute("SELECT max(at) FROM retention_marks").fetchone()
    if last is None or now - last >= retention.mark_every:
        cur.execute(
            "INSERT INTO retention_marks (at, last_id) SELECT %s, coalesce(max(id), 0) FROM messages "
            "ON CONFLICT (at) DO NOTHING",
            (now,),
        )
    cur.execute(
        "DELETE FROM retention_marks WHERE at < (SELECT max(at) FROM retention_marks WHERE at <= %s)",
        (now - longest,),
    )


def _id_at(cur, when) -> int:
    (last_id,) = cur.execute(
        "SELECT coalesce(max(last_id), 0) FROM retention_marks WHERE at <= %s", (when,)
    ).fetchone()
    return last_id


def _expire_held(cur, before, online) -> dict[str, int]:
    """SQLite's ``_expire_held``; a user logged in on any node (a sessions row) keeps everything."""
    rows = cur.execute(
        "SELECT i.seq, i.user_id, i.msg_id, i.dst FROM users u JOIN inbox i ON i.user_id = u.id "
        "WHERE u.last_seen < %s AND u.id <> ALL(%b::text[]) AND i.code = 6 "
        "AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.user_id = u.id) LIMIT %s",
        (before, sorted(online), SWEEP_BATCH),
    ).fetchall()
    if not rows:
        return {}
    cur.execute("DELETE FROM inbox WHERE seq = ANY(%b::bigint[])", ([row[0] for row in rows],))
    direct = [row[2] for row in rows if not is_group(row[3])]
    cur.execute("DELETE FROM messages WHERE id = ANY(%b::bigint[])", (direct,))
    counts = Counter(row[2] for row in rows if is_group(row[3]))
    if counts:
        cur.execute(
            "UPDATE messages m SET remaining = m.remaining - t.n, "
            "body = CASE WHEN m.remaining = t.n THEN NULL ELSE m.body END "
            "FROM unnest(%b::bigint[], %b::integer[]) AS t(id, n) WHERE m.id = t.id",
            (list(counts), list(counts.values())),
        )
    return dict(Counter(row[1] for row in rows))
