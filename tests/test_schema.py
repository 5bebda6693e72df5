"""Schema versions: a database made by the first schema is upgraded in place,
after a copy, into exactly what a fresh database is; a newer one is refused,
by the store and by ``twist chat`` at start-up, in one clear line."""

from __future__ import annotations

import sqlite3
import subprocess

import pytest

from chatproto.store.sqlite import (
    _COUNT_DOWN,
    _COUNT_DOWN_BY,
    _DROP_SUBJECTS,
    _END_MESSAGE_HOLDS,
    _END_USER_HOLDS,
    _REPEATS,
    RETURNING,
    SCHEMA_VERSION,
    DatabaseTooNew,
    UpgradeFailed,
    backup_path,
    body_hash,
    connect,
    ensure_schema,
    schema_sql,
    schema_version,
    upgrade_sql,
)

from . import installed
from .helpers import Net, f_add, f_leave, f_subject, s_added, s_left, s_message, s_subject, ts

A, B, C = b"0000000000001", b"0000000000002", b"0000000000003"
GROUP = b"1000000000001"
V1_TABLES = ("users", "groups", "members", "messages", "inbox")


def make_v1(path: str) -> None:
    """A version 1 database holding what a v1 server would have written.

    A and B are offline with things held for them: two messages from C to B
    (one also in the group), the 11 of the group for A and B, and a 07 for C.
    """
    a, b, c, g = A.decode(), B.decode(), C.decode(), GROUP.decode()
    conn = connect(path)
    conn.executescript("BEGIN;" + schema_sql(1) + "COMMIT;")
    with conn:
        conn.execute("BEGIN")
        rows = [(a, None, 1700000000), (b, None, 1700000001), (c, "ab" * 32, 1700000002)]
        conn.executemany("INSERT INTO users VALUES (?, ?, ?)", rows)
        conn.execute("INSERT INTO groups VALUES (?, 1700000100, 1700000100, 0)", (g,))
        conn.executemany("INSERT INTO members VALUES (?, ?, ?, 0)", [(g, c, 0), (g, a, 1), (g, b, 2)])
        rows = [
            (1, c, b, 1700000200, b"hello B", 1),
            (2, c, g, 1700000300, b"hello group", 2),
            (3, a, c, 1700000050, b"delivered", 0),
        ]
        conn.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)", rows)
        rows = [
            (a, 11, None, "", g, 1700000100),
            (b, 11, None, "", g, 1700000100),
            (b, 6, 1, c, b, 1700000200),
            (a, 6, 2, c, g, 1700000300),
            (b, 6, 2, c, g, 1700000300),
            (c, 7, None, "", a, 1700000050),
        ]
        conn.executemany(
            "INSERT INTO inbox (user_id, code, msg_id, src, dst, ts) VALUES (?, ?, ?, ?, ?, ?)", rows
        )
    conn.close()


#: The columns of version 1, which every later version keeps as they were.
V1_COLUMNS = {
    "messages": "id, src, dst, ts, body, remaining",
    "groups": "id, ts, created, low_mark",
    "inbox": "seq, user_id, code, msg_id, src, dst, ts",
}


def dump(path: str, tables=V1_TABLES) -> dict[str, list[tuple]]:
    conn = sqlite3.connect(path)
    try:
        return {
            t: conn.execute(f"SELECT {V1_COLUMNS.get(t, '*')} FROM {t} ORDER BY 1, 2").fetchall()
            for t in tables
        }
    finally:
        conn.close()


def assert_hashed(path: str) -> None:
    """Since version 4 every message's identity key is its body's hash."""
    rows = sqlite3.connect(path).execute("SELECT body, body_hash FROM messages").fetchall()
    assert rows and all(stored == body_hash(body) for body, stored in rows)


def shape(path: str) -> dict:
    """Everything about a schema but its spelling: objects, columns, indexes, table kinds."""
    conn = sqlite3.connect(path)
    try:
        objects = sorted(
            conn.execute("SELECT type, name, tbl_name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
        )
        tables = [name for kind, name, _ in objects if kind == "table"]
        return {
            "objects": objects,
            "columns": {t: conn.execute(f"PRAGMA table_info({t})").fetchall() for t in tables},
            "kinds": {t: conn.execute(f"PRAGMA table_list({t})").fetchall() for t in tables},
            "indexes": {
                t: sorted(
                    (name, unique, origin, partial, conn.execute(f"PRAGMA index_xinfo({name})").fetchall())
                    for _, name, unique, origin, partial in conn.execute(f"PRAGMA index_list({t})")
                    if not name.startswith("sqlite_autoindex")
                )
                for t in tables
            },
            "version": schema_version(conn),
        }
    finally:
        conn.close()


def as_upgraded(before: dict) -> dict:
    """make_v1's data as the upgrade leaves it: since version 5 a direct
    message's hold alone says it is still to be delivered, and its count is
    0 (message 1, held for B, had 1; the group message keeps its 2)."""
    assert [m[5] for m in before["messages"]] == [1, 2, 0]
    return dict(before, messages=[(*m[:5], m[5] if m[2] >= "1" else 0) for m in before["messages"]])


def upgrade_beside_fresh(old: str, fresh: str) -> None:
    """Open the old database as the server does (it is upgraded), and make a new one to compare."""
    conn = connect(old)
    assert ensure_schema(conn) == SCHEMA_VERSION
    conn.close()
    conn = connect(fresh)
    ensure_schema(conn)
    conn.close()


def test_an_upgraded_first_schema_database_is_a_fresh_one_with_its_data(tmp_path):
    old, fresh = str(tmp_path / "old.sqlite3"), str(tmp_path / "fresh.sqlite3")
    make_v1(old)
    before = dump(old)

    upgrade_beside_fresh(old, fresh)

    assert shape(old) == shape(fresh)
    assert shape(old)["version"] == SCHEMA_VERSION
    assert dump(old) == as_upgraded(before)
    assert_hashed(old)
    # The copy taken first is the version 1 database, whole.
    copy = backup_path(old, 1)
    assert shape(copy)["version"] == 1
    assert dump(copy) == before
    history = sqlite3.connect(old).execute("SELECT version, previous, backup FROM schema_history").fetchall()
    assert history == [(SCHEMA_VERSION, 1, copy)]
    fresh_history = sqlite3.connect(fresh).execute("SELECT version, previous, backup FROM schema_history")
    assert fresh_history.fetchall() == [(SCHEMA_VERSION, None, None)]


def test_the_server_upgrades_on_load_and_delivers_what_was_held(tmp_path):
    """The real store and hub on a version 1 file: B gets the 11 and both messages."""
    path = str(tmp_path / "old.sqlite3")
    make_v1(path)
    net = Net("sqlite", path)
    try:
        b = net.online(B)
        assert b.held == [
            s_added(GROUP, ts(1700000100), [C, A, B]),
            s_message(C, B, ts(1700000200), b"hello B"),
            s_message(C, GROUP, ts(1700000300), b"hello group"),
        ]
    finally:
        net.shutdown()
    # C (offline) is owed the 07 of the direct message B just got, whose
    # count the upgrade to 5 took to 0 (its hold said it was pending); the
    # group's message still waits for A.
    conn = sqlite3.connect(path)
    held_for_c = conn.execute("SELECT code, dst, ts FROM inbox WHERE user_id = ? ORDER BY seq", (C.decode(),))
    assert held_for_c.fetchall() == [(7, A.decode(), 1700000050), (7, B.decode(), 1700000200)]
    counts = conn.execute("SELECT id, remaining FROM messages ORDER BY id").fetchall()
    assert counts == [(1, 0), (2, 1), (3, 0)]
    conn.close()
    assert schema_version(sqlite3.connect(path)) == SCHEMA_VERSION
    # Opening it again is no upgrade: one history row, one copy.
    conn = connect(path)
    ensure_schema(conn)
    assert conn.execute("SELECT count(*) FROM schema_history").fetchone() == (1,)
    assert not (tmp_path / f"old.sqlite3.v{SCHEMA_VERSION}.bak").exists()


def test_a_failed_upgrade_leaves_the_database_as_it_was(tmp_path):
    path = str(tmp_path / "old.sqlite3")
    make_v1(path)
    sqlite3.connect(path, isolation_level=None).execute("CREATE TABLE schema_history (x)")
    before = dump(path)
    conn = connect(path)
    with pytest.raises(UpgradeFailed, match="from schema version 1 to .* it was left at version 1"):
        ensure_schema(conn)
    assert not conn.in_transaction
    conn.close()
    assert shape(path)["version"] == 1
    assert dump(path) == before


def make_too_new(path: str) -> None:
    conn = connect(path)
    ensure_schema(conn)
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.close()


def test_a_newer_database_is_refused_and_left_alone(tmp_path):
    path = str(tmp_path / "new.sqlite3")
    make_too_new(path)
    conn = connect(path)
    with pytest.raises(DatabaseTooNew) as refused:
        ensure_schema(conn)
    assert str(refused.value) == (
        f"the database {path} has schema version {SCHEMA_VERSION + 1}, newer than this chatproto's "
        f"{SCHEMA_VERSION}: run a newer chatproto, or restore the copy taken before the upgrade "
        f"({path}.v{SCHEMA_VERSION}.bak, if it exists)"
    )
    assert not conn.in_transaction
    conn.close()
    assert schema_version(sqlite3.connect(path)) == SCHEMA_VERSION + 1


def test_twist_chat_refuses_a_newer_database_in_one_line(tmp_path):
    path = str(tmp_path / "new.sqlite3")
    make_too_new(path)
    done = subprocess.run(
        [installed.python(), "-m", "twisted", "chat", "--port", "tcp:0:interface=127.0.0.1", "--db", path],
        cwd=installed.outside(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.strip().splitlines() == [
        f"chatproto: the database {path} has schema version {SCHEMA_VERSION + 1}, newer than this "
        f"chatproto's {SCHEMA_VERSION}: run a newer chatproto, or restore the copy taken before the "
        f"upgrade ({path}.v{SCHEMA_VERSION}.bak, if it exists)"
    ]


def test_a_second_schema_database_is_upgraded_into_a_fresh_one_with_its_data(tmp_path):
    """Version 3 changed indexes only: the tables and their rows come through as they were,
    and the new indexes answer the lookups they are for."""
    old, fresh = str(tmp_path / "v2.sqlite3"), str(tmp_path / "fresh.sqlite3")
    make_v1(old)
    conn = connect(old)
    conn.executescript("BEGIN;" + upgrade_sql(1) + "UPDATE schema_version SET version = 2; COMMIT;")
    conn.close()
    assert shape(old)["version"] == 2
    before = dump(old)

    upgrade_beside_fresh(old, fresh)

    assert shape(old) == shape(fresh)
    assert dump(old) == as_upgraded(before)
    assert_hashed(old)
    assert shape(backup_path(old, 2))["version"] == 2
    history = sqlite3.connect(old).execute("SELECT version, previous FROM schema_history").fetchall()
    assert history == [(SCHEMA_VERSION, 2)]
    conn = sqlite3.connect(old)
    a, c, g = A.decode(), C.decode(), GROUP.decode()
    assert conn.execute(
        "SELECT id FROM messages WHERE src = ? AND dst = ? AND ts = ?", (c, g, 1700000300)
    ).fetchall() == [(2,)]
    assert conn.execute(
        "SELECT id FROM messages WHERE dst = ? AND dst >= '1' AND ts > 0", (g,)
    ).fetchall() == [(2,)]
    assert conn.execute("SELECT max(ts) FROM messages WHERE src = ?", (a,)).fetchone() == (1700000050,)


def test_the_hot_lookups_use_an_index(tmp_path):
    """No statement the server runs per message (or per group read) scans a table."""
    conn = connect(str(tmp_path / "plan.sqlite3"))
    ensure_schema(conn)
    lookups = [
        (_REPEATS, 4),
        ("SELECT coalesce(max(ts), 0) FROM messages WHERE src = ? AND dst = ?", 2),
        ("SELECT id FROM messages WHERE src = ? AND dst = ? AND ts = ?", 3),
        ("SELECT src, ts FROM messages WHERE dst = ? AND dst >= '1' AND ts > ? ORDER BY ts, id", 2),
        ("DELETE FROM inbox WHERE msg_id = ? AND user_id = ? AND code = 6", 2),
        ("SELECT * FROM inbox WHERE user_id = ? AND seq > ? ORDER BY seq", 2),
        (_DROP_SUBJECTS, 2),
    ]
    if RETURNING:
        # Each item of a JSON list is looked up (the list itself is read whole).
        lookups += [(_END_USER_HOLDS, 2), (_END_MESSAGE_HOLDS, 2), (_COUNT_DOWN, 1), (_COUNT_DOWN_BY, 2)]
    for sql, params in lookups:
        steps = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, ("[]",) * params)]
        plan = " / ".join(step for step in steps if "VIRTUAL TABLE" not in step)
        assert "SCAN" not in plan and "TEMP B-TREE" not in plan, (sql, plan)
        if sql in (_END_USER_HOLDS, _END_MESSAGE_HOLDS):
            # Not a walk through the user's inbox, which may hold 100,000 rows.
            assert "inbox_by_message" in plan, (sql, plan)
        if sql == _DROP_SUBJECTS:
            assert "inbox_subjects" in plan, plan
    conn.close()


def make_v5(path: str) -> None:
    """make_v1's database as version 5 left it (the version before groups were managed)."""
    make_v1(path)
    conn = connect(path)
    steps = "".join(upgrade_sql(step) for step in range(1, 5))
    conn.executescript("BEGIN;" + steps + "UPDATE schema_version SET version = 5; COMMIT;")
    conn.close()


def test_a_fifth_schema_database_is_upgraded_and_its_groups_can_be_managed(tmp_path):
    """Version 6 adds a group's subject and a held item's text: the rows come
    through as they were, the new columns empty; a held 11 of before lists
    the members as they are when it is sent; 17, 19 and 20 work on the old
    group and survive a restart."""
    old, fresh = str(tmp_path / "v5.sqlite3"), str(tmp_path / "fresh.sqlite3")
    make_v5(old)
    assert shape(old)["version"] == 5
    before = dump(old)

    upgrade_beside_fresh(old, fresh)

    assert shape(old) == shape(fresh)
    assert dump(old) == before
    conn = sqlite3.connect(old)
    assert conn.execute("SELECT subject, subject_src, subject_ts FROM groups").fetchall() == [
        (None, None, None)
    ]
    assert conn.execute("SELECT count(*) FROM inbox WHERE body IS NOT NULL").fetchone() == (0,)
    assert conn.execute("SELECT version, previous FROM schema_history").fetchall() == [(SCHEMA_VERSION, 5)]
    conn.close()
    assert shape(backup_path(old, 5))["version"] == 5

    net = Net("sqlite", old)
    try:
        d, _ = net.register()
        ca = net.online(A)
        assert ca.held == [
            s_added(GROUP, ts(1700000100), [C, A, B]),
            s_message(C, GROUP, ts(1700000300), b"hello group"),
        ]
        ca.send(f_subject(A, GROUP, ts(1700000400), b"Old friends"))
        ca.send(f_add(A, GROUP, ts(1700000401), [d]))
        named = s_subject(GROUP, A, ts(1700000400), b"Old friends")
        four = s_added(GROUP, ts(1700000401), [C, A, B, d])
        assert ca.take() == [named, four]
        ca.send(f_leave(A, GROUP, ts(1700000402)))
        assert ca.take() == [s_left(GROUP, ts(1700000402))]
        net.restart()
        cb = net.online(B)
        assert cb.held == [
            # Held by version 5, with no member list: the members when it is sent.
            s_added(GROUP, ts(1700000100), [C, B, d]),
            s_message(C, B, ts(1700000200), b"hello B"),
            s_message(C, GROUP, ts(1700000300), b"hello group"),
            named,
            four,
            s_added(GROUP, ts(1700000402), [C, B, d]),
        ]
        cd = net.online(d)
        assert cd.held == [four, named, s_added(GROUP, ts(1700000402), [C, B, d])]
    finally:
        net.shutdown()
