"""One set of store cases, run against every backend (MemoryStore, SQLiteStore,
PostgresStore on a throwaway cluster).

The SQL stores run on their real database thread; a fake reactor hands their
answers back to the test, so no real reactor and no sleeping is needed.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
import time

import pytest
from zope.interface.verify import verifyObject

from chatproto.store import (
    DAY,
    DEFAULT_RETENTION,
    DUPLICATE_DELIVERED,
    DUPLICATE_PENDING,
    HELD_ADDED,
    HELD_DELIVERED,
    HELD_LEFT,
    HELD_MESSAGE,
    HELD_SEEN,
    HELD_SUBJECT,
    NEW,
    Completed,
    GroupChange,
    IChatStore,
    Retention,
    Subject,
)
from chatproto.store import sqlite as sqlite_store
from chatproto.store.memory import MemoryStore
from chatproto.store.sqlite import DatabaseTooNew, SQLiteStore

from .helpers import ThreadedClock, wait

pytestmark = pytest.mark.usefixtures("no_logged_failures")

A, B, C = "0000000000001", "0000000000002", "0000000000003"
G = "1000000000001"


class Backend:
    """A store and a way to get its answers; ``reopen`` is a restart for a file
    (or a database: ``path`` is then its URL)."""

    def __init__(self, kind, path, retention=DEFAULT_RETENTION):
        self.kind = kind
        self.path = path
        self.retention = retention
        self.reactor = ThreadedClock()
        self.store = self._open()

    def _open(self):
        if self.kind == "memory":
            return MemoryStore(self.retention)
        if self.kind == "postgres":
            from chatproto.store.postgres import PostgresStore

            return PostgresStore(self.path, self.reactor, retention=self.retention)
        return SQLiteStore(self.path, self.reactor, retention=self.retention)

    def texts(self) -> list[bytes | None]:
        """Every stored message's text (None: its identity alone), by id."""
        if self.kind == "memory":
            return [m.text for _, m in sorted(self.store.messages.items())]
        if self.kind == "postgres":
            import psycopg

            with psycopg.connect(self.path) as conn:
                rows = conn.execute("SELECT body FROM messages ORDER BY id")
                return [None if body is None else bytes(body) for (body,) in rows]
        conn = sqlite3.connect(self.path)
        try:
            sql = "SELECT t.body FROM messages m LEFT JOIN texts t ON t.msg_id = m.id ORDER BY m.id"
            return [body for (body,) in conn.execute(sql)]
        finally:
            conn.close()

    def run(self, d):
        return wait(self.reactor, d)

    def __getattr__(self, name):
        """``backend.inbox(B)`` calls the store and waits for the answer."""
        method = getattr(self.store, name)
        return lambda *args: self.run(method(*args))

    def reopen(self):
        self.close()
        self.store = self._open()

    def close(self):
        if self.store is not None:
            self.run(self.store.close())
            self.store = None


def _location(request, tmp_path):
    """Where a backend's data goes: a file for SQLite, a fresh database for PostgreSQL."""
    if request.param == "postgres":
        return request.getfixturevalue("pg_dsn")
    return str(tmp_path / "store.sqlite3")


@pytest.fixture(params=["memory", "sqlite", "sqlite-trigger", "postgres"])
def backend(request, tmp_path):
    if request.param == "sqlite-trigger":
        # SQLite before 3.35 (no RETURNING) ends holds through triggers: the same cases.
        request.getfixturevalue("monkeypatch").setattr(sqlite_store, "RETURNING", False)
    b = Backend(request.param, _location(request, tmp_path))
    yield b
    b.close()


@pytest.fixture(params=["sqlite", "postgres"])
def sql_backend(request, tmp_path):
    """A store that outlives its process: ``reopen`` opens the same file or database."""
    b = Backend(request.param, _location(request, tmp_path))
    yield b
    b.close()


@pytest.fixture(params=["memory", "sqlite", "sqlite-trigger", "postgres"])
def make_backend(request, tmp_path):
    """``make_backend(**retention)``: a backend of each kind with a retention policy."""
    if request.param == "sqlite-trigger":
        request.getfixturevalue("monkeypatch").setattr(sqlite_store, "RETURNING", False)
    made = []

    def make(**retention):
        made.append(
            Backend(
                request.param.removesuffix("-trigger"), _location(request, tmp_path), Retention(**retention)
            )
        )
        return made[-1]

    yield make
    for b in made:
        b.close()


@pytest.fixture
def sqlite_backend(tmp_path):
    b = Backend("sqlite", str(tmp_path / "store.sqlite3"))
    yield b
    b.close()


def test_backend_provides_the_interface(backend):
    assert verifyObject(IChatStore, backend.store)


def test_users_are_loaded_with_their_secret_hash(backend):
    backend.add_user(A, None)
    backend.add_user(B, "ab" * 32)
    assert backend.load().users == {A: None, B: "ab" * 32}


def test_a_message_is_held_for_its_recipient_until_delivered(backend):
    recorded = backend.record_message(A, B, 100, "héllo".encode(), [B])
    assert recorded.status == NEW and not recorded.complete
    (item,) = backend.inbox(B)
    assert (item.code, item.src, item.dst, item.ts, item.text) == (HELD_MESSAGE, A, B, 100, "héllo".encode())
    assert item.msg_id == recorded.msg_id
    assert backend.inbox(A) == []
    assert backend.mark_delivered(B, [recorded.msg_id]) == [Completed(A, B, 100)]
    assert backend.inbox(B) == []


def test_the_last_recipient_completes_a_message_once(backend):
    recorded = backend.record_message(A, G, 100, b"all", [B, C])
    assert backend.mark_delivered(B, [recorded.msg_id]) == []
    assert backend.mark_delivered(C, [recorded.msg_id]) == [Completed(A, G, 100)]
    assert backend.mark_delivered(C, [recorded.msg_id]) == [], "a second mark owes no second 07"
    assert backend.mark_delivered(B, [recorded.msg_id]) == []


def test_a_repeat_is_recognised_while_pending_and_once_delivered(backend):
    first = backend.record_message(A, B, 100, b"hi", [B])
    again = backend.record_message(A, B, 100, b"hi", [B])
    assert (again.msg_id, again.status, again.complete) == (first.msg_id, DUPLICATE_PENDING, False)
    assert len(backend.inbox(B)) == 1, "a repeat is not queued twice"
    backend.mark_delivered(B, [first.msg_id])
    late = backend.record_message(A, B, 100, b"hi", [B])
    assert (late.status, late.complete) == (DUPLICATE_DELIVERED, True)
    assert backend.inbox(B) == []


def test_same_timestamp_with_other_text_is_a_new_message(backend):
    first = backend.record_message(A, B, 100, b"one", [B])
    second = backend.record_message(A, B, 100, b"two", [B])
    assert second.status == NEW and second.msg_id != first.msg_id
    assert [i.text for i in backend.inbox(B)] == [b"one", b"two"]


def test_a_message_with_no_one_to_reach_is_complete_at_once(backend):
    recorded = backend.record_message(A, G, 100, b"alone", [])
    assert recorded.status == NEW and recorded.complete


def test_acknowledge_names_the_message_by_src_dst_and_timestamp(backend):
    backend.record_message(A, B, 100, b"one", [B])
    backend.record_message(A, B, 200, b"two", [B])
    assert backend.acknowledge(B, A, B, 300) == []
    assert backend.acknowledge(C, A, B, 100) == [], "only the recipient can acknowledge"
    assert backend.acknowledge(B, A, B, 100) == [Completed(A, B, 100)]
    assert [i.ts for i in backend.inbox(B)] == [200]


def test_a_16_acknowledges_one_message_the_oldest_pending_with_that_name(backend):
    """Two messages may share SRC, DST and TIMESTAMP (their texts differ): each
    16 ends one hold, the oldest first, so no 07 goes out for a message the
    recipient never acknowledged."""
    backend.record_message(A, B, 100, b"first", [B])
    backend.record_message(A, B, 100, b"second", [B])
    assert backend.acknowledge(B, A, B, 100) == [Completed(A, B, 100)]
    assert [i.text for i in backend.inbox(B)] == [b"second"]
    assert backend.acknowledge(B, A, B, 100) == [Completed(A, B, 100)]
    assert backend.inbox(B) == []
    assert backend.acknowledge(B, A, B, 100) == [], "nothing left to acknowledge"


def test_the_snapshot_counts_everything_held_for_a_user_notices_too(backend):
    backend.record_message(A, B, 100, b"m1", [B])
    backend.hold(B, HELD_DELIVERED, "", C, 90)
    backend.hold(B, HELD_SEEN, C, "", 95)
    backend.add_group(G, 110, [A, B], [B])
    assert backend.load().held == {B: 4}


def test_the_inbox_keeps_the_order_things_were_queued_in(backend):
    backend.record_message(A, B, 100, b"m1", [B])
    backend.hold(B, HELD_DELIVERED, "", C, 90)
    backend.hold(B, HELD_SEEN, C, "", 95)
    backend.add_group(G, 110, [A, B], [B])
    backend.record_message(A, B, 120, b"m2", [B])
    items = backend.inbox(B)
    assert [i.code for i in items] == [HELD_MESSAGE, HELD_DELIVERED, HELD_SEEN, HELD_ADDED, HELD_MESSAGE]
    assert [(i.src, i.dst, i.ts) for i in items] == [
        (A, B, 100),
        ("", C, 90),
        (C, "", 95),
        ("", G, 110),
        (A, B, 120),
    ]
    assert [i.seq for i in items] == sorted(i.seq for i in items)


def test_drop_forgets_sent_notices_but_never_a_message(backend):
    backend.record_message(A, B, 100, b"m1", [B])
    backend.hold(B, HELD_DELIVERED, "", C, 90)
    backend.hold(B, HELD_SEEN, C, "", 95)
    backend.drop(B, [i.seq for i in backend.inbox(B)])
    assert [i.code for i in backend.inbox(B)] == [HELD_MESSAGE]


def test_drop_only_touches_its_own_users_inbox(backend):
    backend.hold(B, HELD_SEEN, C, "", 95)
    backend.hold(C, HELD_SEEN, B, "", 96)
    backend.drop(C, [i.seq for i in backend.inbox(B)])
    assert len(backend.inbox(B)) == 1


def test_holds_belong_to_one_user(backend):
    backend.record_message(A, B, 100, b"for b", [B])
    backend.hold(C, HELD_SEEN, A, "", 5)
    assert [i.text for i in backend.inbox(B)] == [b"for b"]
    assert [i.code for i in backend.inbox(C)] == [HELD_SEEN]
    assert backend.inbox(A) == []


def test_groups_read_marks_and_low_marks_are_loaded(backend):
    backend.add_group(G, 110, [C, A, B], [])
    backend.set_read_mark(G, A, 300)
    backend.set_read_mark(G, B, 200)
    backend.set_low_mark(G, 150)
    snapshot = backend.load()
    assert snapshot.groups == {G: [C, A, B]}, "members keep their order, creator first"
    assert snapshot.read_marks[G] == {A: 300, B: 200}
    assert snapshot.low_marks == {G: 150}


def test_group_messages_since_lists_later_messages_by_time(backend):
    backend.add_group(G, 1, [A, B, C], [])
    backend.record_message(B, G, 300, b"late", [A, C])
    backend.record_message(A, G, 100, b"early", [B, C])
    backend.record_message(C, G, 200, b"middle", [A, B])
    backend.record_message(A, B, 250, b"not the group", [B])
    assert backend.group_messages_since(G, 100) == [(C, 200), (B, 300)]
    assert [tuple(r) for r in backend.group_messages_since(G, 0)] == [(A, 100), (C, 200), (B, 300)]


def test_text_is_kept_byte_for_byte(backend):
    text = ("é" * 108 + "ab").encode()
    assert len(text) == 218
    backend.record_message(A, B, 1, text, [B])
    assert backend.inbox(B)[0].text == text


def test_deliveries_submitted_together_each_answer_for_their_own_messages(backend):
    """Group commit may batch calls, but each Deferred names only its own completions."""
    m1 = backend.record_message(A, B, 1, b"to b", [B]).msg_id
    m2 = backend.record_message(A, C, 2, b"to c", [C]).msg_id
    first = backend.store.mark_delivered(B, [m1])
    second = backend.store.mark_delivered(C, [m2])
    assert backend.run(first) == [Completed(A, B, 1)]
    assert backend.run(second) == [Completed(A, C, 2)]


def test_reaches_submitted_together_each_answer_for_their_own_messages(backend):
    """Messages written after their commit, marked reached one reader at a time
    in one batch (SQLite ends each reader's in one statement): every message
    completes exactly once, the group's when its second member is marked,
    and each op answers only for a message it named."""
    m1 = backend.record_message(A, B, 1, b"one", [B]).msg_id
    m2 = backend.record_message(A, B, 2, b"two", [B]).msg_id
    m3 = backend.record_message(A, C, 3, b"three", [C]).msg_id
    g = backend.record_message(A, G, 4, b"group", [B, C]).msg_id
    done = {m1: Completed(A, B, 1), m2: Completed(A, B, 2), m3: Completed(A, C, 3), g: Completed(A, G, 4)}
    ops = [(m1, B), (m2, B), (g, B), (m3, C), (m1, B), (g, C)]
    answers = [backend.run(d) for d in [backend.store.mark_reached(msg_id, [user]) for msg_id, user in ops]]
    assert all(answer in ([], [done[msg_id]]) for answer, (msg_id, _) in zip(answers, ops, strict=True))
    assert sorted(c for answer in answers for c in answer) == sorted(done.values())
    assert answers[2] == [], "the group's message waits for its second member"
    assert backend.inbox(B) == backend.inbox(C) == []


def test_operations_submitted_together_all_commit(backend):
    ds = [backend.store.record_message(A, B, ts, b"burst", [B]) for ts in range(1, 51)]
    ids = [backend.run(d).msg_id for d in ds]
    assert len(set(ids)) == 50
    assert [i.ts for i in backend.inbox(B)] == list(range(1, 51))


# -- SQL stores: a restart is a close and a reopen of the same file or database ---------


def test_restart_keeps_users_messages_notices_and_groups(sql_backend):
    s = sql_backend
    s.add_user(A, None)
    s.add_user(B, "cd" * 32)
    s.add_user(C, None)
    pending = s.record_message(A, B, 100, b"queued", [B])
    done = s.record_message(A, C, 101, b"delivered", [C])
    s.mark_delivered(C, [done.msg_id])
    if not getattr(s.store, "clustered", False):  # a clustered store holds the 07 itself
        s.hold(A, HELD_DELIVERED, "", C, 101)
    s.add_group(G, 110, [A, B, C], [B])
    s.set_read_mark(G, C, 100)
    s.set_low_mark(G, 50)
    s.reopen()
    snapshot = s.load()
    assert snapshot.users == {A: None, B: "cd" * 32, C: None}
    assert snapshot.groups == {G: [A, B, C]}
    assert snapshot.read_marks[G] == {C: 100}
    assert snapshot.low_marks == {G: 50}
    assert [(i.code, i.ts, i.text) for i in s.inbox(B)] == [
        (HELD_MESSAGE, 100, b"queued"),
        (HELD_ADDED, 110, (A + B + C).encode()),
    ]
    assert [(i.code, i.dst, i.ts) for i in s.inbox(A)] == [(HELD_DELIVERED, C, 101)]
    assert s.record_message(A, C, 101, b"delivered", [C]).status == DUPLICATE_DELIVERED
    assert s.record_message(A, B, 100, b"queued", [B]).status == DUPLICATE_PENDING
    newer = s.record_message(A, B, 102, b"after the restart", [B])
    assert newer.status == NEW and newer.msg_id != pending.msg_id
    assert s.mark_delivered(B, [pending.msg_id]) == [Completed(A, B, 100)]
    assert [i.text for i in s.inbox(B) if i.code == HELD_MESSAGE] == [b"after the restart"]


def test_a_database_from_a_newer_server_is_refused(sqlite_backend):
    s = sqlite_backend
    s.add_user(A, None)
    s.close()
    with sqlite3.connect(s.path) as conn:
        conn.execute("UPDATE schema_version SET version = version + 1")
    conn.close()
    with pytest.raises(DatabaseTooNew):
        SQLiteStore(s.path, ThreadedClock())


def test_the_database_is_in_wal_mode(sqlite_backend):
    """WAL with synchronous=NORMAL is what survives a kill -9 without an fsync per commit."""
    sqlite_backend.add_user(A, None)
    with sqlite3.connect(sqlite_backend.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


def test_group_messages_since_answers_for_any_destination(backend):
    """Group ids start with 1 (the SQLite store's index of destinations holds only those);
    any other destination is still answered."""
    backend.record_message(A, B, 100, b"one", [B])
    backend.record_message(C, B, 200, b"two", [B])
    backend.record_message(A, G, 150, b"group", [B, C])
    assert [tuple(r) for r in backend.group_messages_since(B, 0)] == [(A, 100), (C, 200)]
    assert [tuple(r) for r in backend.group_messages_since(G, 0)] == [(A, 150)]


def test_a_message_marked_twice_in_one_batch_completes_once(backend):
    m = backend.record_message(A, G, 1, b"to both", [B, C]).msg_id
    first = backend.store.mark_reached(m, [B])
    again = backend.store.mark_reached(m, [B])
    last = backend.store.mark_reached(m, [C])
    twice = backend.store.mark_reached(m, [C])
    answers = [backend.run(d) for d in (first, again, last, twice)]
    assert answers[:2] == [[], []], "not complete before its last recipient"
    assert sum(answers, []) == [Completed(A, G, 1)]


def test_two_texts_whose_hashes_collide_are_two_messages(sqlite_backend, monkeypatch):
    """The identity index keys on the text's CRC-32: a different text
    with the same hash (made here by a constant hash) is still a new message,
    and a repeat of either one is still recognised."""
    monkeypatch.setattr(sqlite_store, "body_hash", lambda body: 7)
    s = sqlite_backend
    first = s.record_message(A, B, 100, b"one", [B])
    second = s.record_message(A, B, 100, b"two", [B])
    assert (first.status, second.status) == (NEW, NEW)
    assert [i.text for i in s.inbox(B)] == [b"one", b"two"]
    again = [s.record_message(A, B, 100, text, [B]) for text in (b"two", b"one")]
    assert [(r.msg_id, r.status) for r in again] == [
        (second.msg_id, DUPLICATE_PENDING),
        (first.msg_id, DUPLICATE_PENDING),
    ]
    assert len(s.inbox(B)) == 2


def test_latest_timestamp_is_the_highest_of_that_pair_alone(backend):
    """What the live path trusts: a 05 past this cannot repeat a stored message of the pair."""
    assert backend.latest_timestamp(A, B) == 0, "nothing stored yet"
    backend.record_message(A, B, 200, b"held", [B])
    backend.record_message(A, B, 300, b"stored as delivered", [])
    backend.record_message(A, B, 100, b"an older one, sent late", [B])
    backend.record_message(A, B, 300, b"same second, other text", [B])
    backend.record_message(B, A, 900, b"the other way", [A])
    backend.record_message(A, C, 500, b"to someone else", [C])
    backend.record_message(C, B, 700, b"from someone else", [B])
    backend.record_message(A, G, 800, b"to a group", [B, C])
    assert backend.latest_timestamp(A, B) == 300
    assert backend.latest_timestamp(B, A) == 900
    assert backend.latest_timestamp(A, C) == 500
    assert backend.latest_timestamp(C, B) == 700
    assert backend.latest_timestamp(A, G) == 800
    assert backend.latest_timestamp(C, A) == 0
    assert backend.latest_timestamp(B, C) == 0


def test_latest_timestamp_counts_delivered_messages_and_a_resend_changes_nothing(backend):
    m = backend.record_message(A, B, 400, b"hi", [B]).msg_id
    backend.mark_delivered(B, [m])
    assert backend.latest_timestamp(A, B) == 400, "a delivered message is still stored"
    backend.record_message(A, B, 400, b"hi", [B])
    assert backend.latest_timestamp(A, B) == 400


def test_latest_timestamp_answers_in_order_with_what_was_submitted_before_it(backend):
    """Asked in the same commit as a message, it sees the message submitted before it."""
    recorded = backend.store.record_message(A, B, 600, b"just before", [B])
    latest = backend.store.latest_timestamp(A, B)
    assert backend.run(latest) == 600
    assert backend.run(recorded).status == NEW


def test_latest_timestamp_survives_a_restart(sql_backend):
    sql_backend.record_message(A, B, 1700000000, b"before the restart", [])
    sql_backend.reopen()
    assert sql_backend.latest_timestamp(A, B) == 1700000000
    assert sql_backend.latest_timestamp(B, A) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own priority is Linux's")
def test_the_database_thread_gives_way_to_the_reactor(sqlite_backend):
    """On a shared core the reactor, woken by a read, must not wait behind a commit."""
    store = sqlite_backend.store

    def priority(cur):
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    assert sqlite_backend.run(store._submit(priority)) == 10


# -- groups people manage: subject, adding, leaving ----------------------------------

D, E = "0000000000004", "0000000000005"


def notices(backend, user):
    """What is held for ``user`` but messages: (code, src, dst, ts, text)."""
    return [(i.code, i.src, i.dst, i.ts, i.text) for i in backend.inbox(user) if i.code != HELD_MESSAGE]


def test_a_subject_is_held_for_the_members_not_online(backend):
    backend.add_group(G, 110, [A, B, C], [])
    assert backend.set_subject(G, A, 120, "Trio ü".encode(), {A, C}) == [A, B, C]
    assert notices(backend, B) == [(HELD_SUBJECT, A, G, 120, "Trio ü".encode())]
    assert notices(backend, A) == notices(backend, C) == []


def test_a_newer_subject_replaces_the_one_still_held_for_the_same_group(backend):
    other = "1000000000002"
    backend.add_group(G, 110, [A, B], [])
    backend.add_group(other, 111, [A, B], [])
    backend.set_subject(G, A, 120, b"first", {A})
    backend.set_subject(other, A, 121, b"elsewhere", {A})
    backend.record_message(A, G, 125, b"between", [B])
    backend.set_subject(G, A, 130, b"second", {A})
    assert [(i.code, i.dst, i.text) for i in backend.inbox(B)] == [
        (HELD_SUBJECT, other, b"elsewhere"),
        (HELD_MESSAGE, G, b"between"),
        (HELD_SUBJECT, G, b"second"),
    ]


def test_added_members_come_last_get_the_11_then_the_subject_and_start_at_the_latest_message(backend):
    backend.add_group(G, 110, [A, B], [])
    backend.set_subject(G, B, 115, b"Duo", {A, B})
    backend.record_message(A, G, 130, b"before", [B])
    backend.record_message(B, G, 120, b"older", [A])
    change = backend.add_members(G, 140, [D, B, C, D], {A})
    assert change == GroupChange([A, B, D, C], Subject(B, 115, b"Duo"), 130)
    listed = (A + B + D + C).encode()
    assert notices(backend, D) == [(HELD_ADDED, "", G, 140, listed), (HELD_SUBJECT, B, G, 115, b"Duo")]
    assert notices(backend, B) == [(HELD_ADDED, "", G, 140, listed)], "an old member gets no 18 again"
    assert notices(backend, A) == []
    snapshot = backend.load()
    assert snapshot.groups[G] == [A, B, D, C]
    assert snapshot.read_marks[G] == {D: 130, C: 130}
    assert [i.text for i in backend.inbox(D) if i.code == HELD_MESSAGE] == [], "no message from before"


def test_a_group_without_a_subject_holds_no_18(backend):
    backend.add_group(G, 110, [A], [])
    assert backend.add_members(G, 120, [B], set()) == GroupChange([A, B], None, 0)
    assert [code for code, *_ in notices(backend, B)] == [HELD_ADDED]


def test_leaving_holds_the_21_for_the_leaver_and_the_11_for_the_rest_and_keeps_what_was_held(backend):
    backend.add_group(G, 110, [A, B, C], [])
    sent = backend.record_message(A, G, 120, b"to all", [B, C])
    backend.set_read_mark(G, B, 120)
    assert backend.leave_group(G, B, 130, {C}).members == [A, C]
    assert notices(backend, B) == [(HELD_LEFT, "", G, 130, None)]
    assert [i.text for i in backend.inbox(B) if i.code == HELD_MESSAGE] == [b"to all"], "not taken back"
    assert notices(backend, A)[:1] == [(HELD_ADDED, "", G, 130, (A + C).encode())]
    assert notices(backend, C) == []
    snapshot = backend.load()
    assert snapshot.groups[G] == [A, C]
    assert B not in snapshot.read_marks.get(G, {})
    # The message still waits for B, who was a recipient when it was sent.
    assert backend.mark_reached(sent.msg_id, [C]) == []
    assert backend.mark_reached(sent.msg_id, [B]) == [Completed(A, G, 120)]


def test_the_last_member_leaving_leaves_an_empty_group(backend):
    backend.add_group(G, 110, [A], [])
    assert backend.leave_group(G, A, 120, {A}) == GroupChange([])
    assert backend.load().groups[G] == []
    assert notices(backend, A) == []


def test_a_member_who_left_can_be_added_again_last(backend):
    backend.add_group(G, 110, [A, B, C], [])
    backend.leave_group(G, A, 120, {A, B, C})
    assert backend.add_members(G, 130, [A], {A, B, C}).members == [B, C, A]
    assert backend.load().groups[G] == [B, C, A]


def test_group_changes_survive_a_restart_with_what_they_held(sql_backend):
    s = sql_backend
    s.add_group(G, 110, [A, B], [])
    s.set_subject(G, A, 111, b"Named", set())
    s.add_members(G, 112, [C], set())
    s.leave_group(G, B, 113, set())
    s.reopen()
    assert s.load().groups == {G: [A, C]}
    assert notices(s, C) == [
        (HELD_ADDED, "", G, 112, (A + B + C).encode()),
        (HELD_SUBJECT, A, G, 111, b"Named"),
        (HELD_ADDED, "", G, 113, (A + C).encode()),
    ]
    assert [code for code, *_ in notices(s, B)][-1] == HELD_LEFT
    assert s.add_members(G, 114, [D], set()).subject == Subject(A, 111, b"Named")


# -- what is kept, and for how long (issue 19) -----------------------------------


def test_a_text_goes_when_its_last_recipient_has_it_and_its_identity_stays(make_backend):
    backend = make_backend()
    direct = backend.record_message(A, B, 100, b"held", [B])
    group = backend.record_message(A, G, 100, b"to all", [B, C])
    backend.record_message(A, C, 100, b"acked", [C])
    backend.record_delivered(A, B, [(101, b"live")])
    assert backend.texts() == [b"held", b"to all", b"acked", None], "a live message's text is never written"
    backend.mark_delivered(B, [direct.msg_id, group.msg_id])
    assert backend.texts() == [None, b"to all", b"acked", None], "C still waits for the group's"
    backend.mark_reached(group.msg_id, [C])
    backend.acknowledge(C, A, C, 100)
    assert backend.texts() == [None, None, None, None]
    for dst, ts, text in [(B, 100, b"held"), (G, 100, b"to all"), (C, 100, b"acked"), (B, 101, b"live")]:
        again = backend.record_message(A, dst, ts, text, [dst])
        assert (again.status, again.complete) == (DUPLICATE_DELIVERED, True), (dst, ts)
    assert backend.inbox(B) == [] or all(item.code != HELD_MESSAGE for item in backend.inbox(B))
    assert backend.latest_timestamp(A, B) == 101


def test_an_identity_outlives_its_text_for_the_window_only(make_backend):
    backend = make_backend(dedup_window=DAY)
    first = backend.record_message(A, B, 100, b"once", [B])
    backend.mark_delivered(B, [first.msg_id])
    held = backend.record_message(A, C, 100, b"waits", [C])
    start = 1_800_000_000
    assert backend.sweep(start, []).identities == 0
    assert backend.sweep(start + DAY - 1, []).identities == 0
    swept = backend.sweep(start + DAY, [])
    assert swept.identities == 1 and not swept.more
    assert backend.texts() == [b"waits"], "what is held is never swept"
    again = backend.record_message(A, B, 100, b"once", [B])
    assert again.status == NEW, "after the window a resend is a new message"
    assert [item.msg_id for item in backend.inbox(C)] == [held.msg_id]


def test_an_archive_keeps_delivered_texts_for_its_time(make_backend):
    backend = make_backend(dedup_window=7 * DAY, keep_delivered=DAY)
    early = backend.record_message(A, B, 100, b"early", [B])
    backend.mark_delivered(B, [early.msg_id])
    backend.record_delivered(A, B, [(101, b"live")])
    assert backend.texts() == [b"early", b"live"]
    start = 1_800_000_000
    backend.sweep(start, [])
    late = backend.record_message(A, C, 100, b"late", [C])
    assert backend.sweep(start + DAY, []).texts == 2
    assert backend.texts() == [None, None, b"late"]
    backend.mark_delivered(C, [late.msg_id])
    assert backend.texts() == [None, None, b"late"], "delivered less than a day after it was stored"
    assert backend.sweep(start + 2 * DAY, []).texts == 1
    assert backend.sweep(start + 7 * DAY, []).identities == 2
    assert backend.texts() == [None], "the late one's window runs a day longer"


def test_expire_held_drops_what_waits_for_users_away_too_long(make_backend):
    backend = make_backend(expire_held=7 * DAY)
    for user in (A, B, C):
        backend.add_user(user, None)
    backend.record_message(A, B, 100, b"for b", [B])
    backend.record_message(A, G, 100, b"for the group", [B, C])
    backend.record_message(A, C, 100, b"for c", [C])
    now = time.time()
    assert backend.sweep(now + 6 * DAY, []).held == {}
    swept = backend.sweep(now + 8 * DAY, [C])
    assert swept.held == {B: 2}, "C is online: nothing of its goes"
    assert [item.text for item in backend.inbox(C)] == [b"for the group", b"for c"]
    assert backend.inbox(B) == []
    assert backend.texts() == [b"for the group", b"for c"], "b's message is gone whole"
    assert backend.mark_delivered(C, [item.msg_id for item in backend.inbox(C)]) == [
        Completed(A, G, 100),
        Completed(A, C, 100),
    ]


def test_a_housekeeping_pass_has_a_transaction_of_its_own(sql_backend):
    """Whatever befalls a pass fails no frame's operation committed beside it."""
    store = sql_backend.store
    sql_backend.run(store.barrier())
    before = store.transactions
    ds = [
        store.record_message(A, B, 100, b"one", [B]),
        store.sweep(1_800_000_000, []),
        store.record_message(A, B, 101, b"two", [B]),
        store.hold(A, HELD_SEEN, B, "", 100),
    ]
    for d in ds:
        sql_backend.run(d)
    assert store.transactions - before == 3, "the two around the pass are not in its transaction"


def test_postgresql_notes_logins_in_transactions_of_their_own(sql_backend):
    """Its users' rows locked in id order, apart from the frames' row locks:
    two nodes noting the same users cannot deadlock (the PostgreSQL soak did,
    once the notes shared the frames' transactions). SQLite has one writer:
    they go with the frames."""
    store = sql_backend.store
    for user in (A, B):
        sql_backend.run(store.add_user(user, None))
    before = store.transactions
    ds = [
        store.record_message(A, B, 100, b"one", [B]),
        store.seen(B),
        store.seen(A),
        store.record_message(A, B, 101, b"two", [B]),
    ]
    for d in ds:
        sql_backend.run(d)
    assert store.transactions - before == (3 if sql_backend.kind == "postgres" else 1)
