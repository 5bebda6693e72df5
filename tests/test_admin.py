"""``chatproto-admin`` against real databases: one written by the real hub and
store, and one a real ``twist chat`` is writing to while it is backed up."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import subprocess
import threading
import time
from importlib.metadata import entry_points

import pytest

from chatproto.admin import main
from chatproto.domain import hash_secret
from chatproto.store.sqlite import SCHEMA_VERSION, connect, ensure_schema
from chatproto.version import chatproto_version

from . import installed
from .helpers import Net, f_group, f_received, f_send, s_error, ts
from .test_e2e_server import Server
from .test_schema import make_v1


def admin(capsys, *args: str) -> tuple[int, str, str]:
    """Run the command in this process: (exit status, stdout, stderr)."""
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own exits: --help, usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def admin_json(capsys, *args: str) -> dict:
    code, out, err = admin(capsys, *args, "--json")
    assert (code, err) == (0, ""), err
    return json.loads(out)


def run_admin(*args: str) -> subprocess.CompletedProcess:
    """Run the command as its own process, as a cron job would."""
    return subprocess.run(
        [installed.python(), "-m", "chatproto.admin", *args],
        cwd=installed.outside(),
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def chat(tmp_path):
    """A database written by the real hub and store.

    A (online) sent B (offline) two messages and made a group of A, B, C; C
    logged in with its secret, got a message and acknowledged it. So B has
    two messages and an 11 held, and nothing else is.
    """
    path = str(tmp_path / "chat.sqlite3")
    net = Net("sqlite", path)
    a, _ = net.register()
    b, _ = net.register()
    c, secret = net.register(with_secret=True)
    ca = net.online(a)
    cc = net.online(c, secret)
    ca.send(f_send(a, b, ts(1700000001), b"one"), f_send(a, b, ts(1700000002), b"two"))
    ca.send(f_group(a, ts(1700000010), [b, c]))
    ca.send(f_send(a, c, ts(1700000020), b"to c"))
    cc.take()
    cc.send(f_received(a, c, ts(1700000020)))
    net.settle()
    group = ca.take()[0][2:15]
    net.shutdown()
    return {"db": path, "a": a.decode(), "b": b.decode(), "c": c.decode(), "secret": secret, "group": group}


def test_the_console_script_is_chatproto_admin():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "chatproto-admin"]
    assert script.value == "chatproto.admin:main"


def test_stats(chat, capsys):
    data = admin_json(capsys, "--db", chat["db"], "stats")
    assert data == {
        "users": 3,
        "groups": 1,
        "messages": 3,
        "queued_messages": 2,
        "users_with_queued_messages": 1,
        "held_notices": 1,
        "oldest_queued": {"user": chat["b"], "src": chat["a"], "dst": chat["b"], "ts": 1700000001},
        "schema_version": SCHEMA_VERSION,
        # B's two texts wait for B; C has the one to C: its identity alone is kept.
        "texts_held": 2,
        "texts_held_bytes": len(b"one") + len(b"two"),
        "identities": 1,
        "archived": 0,
        "archived_bytes": 0,
        "expire_held": {"after_seconds": 30 * 86400, "messages": 0, "users": 0},
    }
    # As if B had not logged in or out for 40 days: --expire-held 30d would drop its two.
    conn = sqlite3.connect(chat["db"], isolation_level=None)
    conn.execute("UPDATE users SET last_seen = last_seen - 40 * 86400 WHERE id = ?", (chat["b"],))
    conn.close()
    away = admin_json(capsys, "--db", chat["db"], "stats")["expire_held"]
    assert away == {"after_seconds": 30 * 86400, "messages": 2, "users": 1}
    away = admin_json(capsys, "--db", chat["db"], "stats", "--expire-held", "41d")["expire_held"]
    assert away == {"after_seconds": 41 * 86400, "messages": 0, "users": 0}
    code, out, err = admin(capsys, "stats", "--db", chat["db"], "--expire-held", "soon")
    assert code == 2 and "--expire-held: not a duration" in err
    code, out, err = admin(capsys, "stats", "--db", chat["db"])
    assert (code, err) == (0, "")
    assert "queued messages:  2 (waiting for 1 users)" in out
    assert "texts held:       2 (6 bytes), for recipients who do not have them yet" in out
    assert "identities kept:  1 (delivered, text deleted; kept for --dedup-window)" in out
    assert "--expire-held 30d would drop: 2 held messages for 1 users not seen since" in out
    assert (
        f"oldest queued:    for {chat['b']}, from {chat['a']} to {chat['b']}, sent 2023-11-14 22:13:21 UTC"
        in out
    )


def test_user_show(chat, capsys):
    b = admin_json(capsys, "--db", chat["db"], "user", "show", chat["b"])
    assert b["exists"] and not b["has_secret"]
    assert (b["queued_messages"], b["held_notices"], b["groups"]) == (2, 1, [chat["group"].decode()])
    assert b["online"] is None
    assert b["last_message_sent_ts"] is None
    a = admin_json(capsys, "--db", chat["db"], "user", "show", chat["a"])
    assert a["last_message_sent_ts"] == 1700000020
    code, out, _ = admin(capsys, "--db", chat["db"], "user", "show", chat["c"])
    assert code == 0
    assert "has a secret:      yes" in out
    assert "online:            unknown (the database does not know" in out


def test_user_delete_takes_effect_when_the_server_restarts(chat, capsys):
    data = admin_json(capsys, "--db", chat["db"], "user", "delete", chat["b"])
    assert (data["deleted"], data["held_items_removed"], data["memberships_removed"]) == (True, 3, 1)
    assert "restarts" in data["note"]
    # The messages held for B no longer wait for anyone: the counts still agree.
    assert admin_json(capsys, "--db", chat["db"], "check")["miscounted_messages"] == 0
    stats = admin_json(capsys, "--db", chat["db"], "stats")
    assert (stats["users"], stats["groups"], stats["queued_messages"], stats["held_notices"]) == (2, 1, 0, 0)
    assert admin(capsys, "--db", chat["db"], "user", "show", chat["b"])[::2] == (
        1,
        f"chatproto-admin: no user {chat['b']}\n",
    )
    assert admin(capsys, "--db", chat["db"], "user", "delete", chat["b"])[0] == 1
    # A server started now does not know B; the group goes on without B.
    net = Net("sqlite", chat["db"])
    try:
        conn = net.connect()
        conn.send(b"03" + chat["b"].encode())
        assert conn.take() == [s_error(b"03", b"04")]
        assert net.domain.directory.groups[chat["group"]] == [chat["a"].encode(), chat["c"].encode()]
    finally:
        net.shutdown()


def test_secret_reset_prints_the_secret_once_and_keeps_its_hash(chat, capsys):
    code, out, err = admin(capsys, "--db", chat["db"], "secret", "reset", chat["c"])
    assert (code, err) == (0, "")
    (secret,) = re.findall(r"new secret for \d{13}: ([0-9a-f]{32})\n", out)
    assert out.count(secret) == 1
    assert "takes effect when it restarts" in out
    stored = sqlite3.connect(chat["db"]).execute("SELECT secret_hash FROM users WHERE id = ?", (chat["c"],))
    assert stored.fetchone() == (hash_secret(secret.encode()),)
    # B had no secret: from now on it needs one.
    b_secret = admin_json(capsys, "--db", chat["db"], "secret", "reset", chat["b"])["secret"]
    net = Net("sqlite", chat["db"])
    try:
        net.online(chat["c"].encode(), secret.encode())
        net.online(chat["b"].encode(), b_secret.encode())
        conn = net.connect()
        conn.send(b"15" + chat["c"].encode() + chat["secret"])
        assert conn.take() == [s_error(b"15", b"08")]
        conn.send(b"03" + chat["b"].encode())
        assert conn.take() == [s_error(b"03", b"08")]
    finally:
        net.shutdown()


def test_backup_of_a_database_at_rest(chat, capsys, tmp_path):
    target = str(tmp_path / "copy.sqlite3")
    data = admin_json(capsys, "--db", chat["db"], "backup", target)
    assert data["path"] == target and data["bytes"] > 0 and data["schema_version"] == SCHEMA_VERSION
    assert admin_json(capsys, "--db", target, "stats") == admin_json(capsys, "--db", chat["db"], "stats")
    code, _, err = admin(capsys, "--db", chat["db"], "backup", target)
    assert (code, err) == (1, f"chatproto-admin: {target} exists (use --force to replace it)\n")
    assert admin(capsys, "--db", chat["db"], "backup", target, "--force")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.sqlite3", "copy.sqlite3"]


def test_a_backup_is_readable_by_its_owner_alone(chat, tmp_path):
    """Even under a umask of 022: the copy holds every message and every secret's hash."""
    target = tmp_path / "copy.sqlite3"
    done = subprocess.run(
        ["sh", "-c", 'umask 022 && exec "$@"', "sh", installed.python(), "-m", "chatproto.admin"]
        + ["--db", chat["db"], "backup", str(target)],
        cwd=installed.outside(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600


def test_version():
    done = run_admin("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"chatproto {chatproto_version()} (Twisted ")


def test_check(chat, capsys):
    data = admin_json(capsys, "--db", chat["db"], "check")
    assert data["ok"] and data["integrity"] == ["ok"]
    assert data["schema_version"] == data["chatproto_schema_version"] == SCHEMA_VERSION
    assert [(h["version"], h["previous"]) for h in data["schema_history"]] == [(SCHEMA_VERSION, None)]
    code, out, err = admin(capsys, "--db", chat["db"], "check")
    assert (code, err) == (0, "")
    assert out.splitlines()[:2] == ["integrity:        ok", f"schema version:   {SCHEMA_VERSION}"]


def test_check_fails_on_counts_that_disagree(chat, capsys):
    sqlite3.connect(chat["db"], isolation_level=None).execute("UPDATE messages SET remaining = remaining + 1")
    code, out, err = admin(capsys, "--db", chat["db"], "check")
    assert (code, err) == (1, "chatproto-admin: the database failed its check\n")
    assert "held counts:      3 messages' remaining count disagrees with their holds" in out


def damage(chat, tmp_path, index: str, change) -> str:
    """A copy of the database with the first page of ``index`` changed by ``change``."""
    conn = sqlite3.connect(chat["db"])
    (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (index,)).fetchone()
    conn.close()
    data = bytearray(open(chat["db"], "rb").read())
    start = (root - 1) * page_size
    data[start : start + page_size] = change(data[start : start + page_size])
    damaged = tmp_path / "damaged.sqlite3"
    damaged.write_bytes(bytes(data))
    return str(damaged)


def test_check_reports_an_index_that_disagrees_with_its_table(chat, capsys, tmp_path):
    user = chat["b"].encode()  # the only user with something held
    damaged = damage(chat, tmp_path, "inbox_by_user", lambda page: page.replace(user, b"9" * 13))
    code, out, err = admin(capsys, "--db", damaged, "check")
    assert (code, err) == (1, "chatproto-admin: the database failed its check\n")
    assert out.startswith("integrity:        FAILED\n")
    assert "missing from index inbox_by_user" in out


def test_check_reports_a_page_too_damaged_to_check(chat, capsys, tmp_path):
    damaged = damage(chat, tmp_path, "inbox_by_user", lambda page: b"\x0d" + b"\xff" * 11 + page[12:])
    code, out, err = admin(capsys, "--db", damaged, "check", "--json")
    assert (code, err) == (1, "chatproto-admin: the database failed its check\n")
    assert json.loads(out)["integrity"] == ["database disk image is malformed"]


def test_an_older_database_is_read_and_its_upgrade_announced(tmp_path, capsys):
    path = str(tmp_path / "old.sqlite3")
    make_v1(path)
    code, out, _ = admin(capsys, "--db", path, "check")
    assert code == 0
    assert f"schema version:   1 (the server upgrades it to {SCHEMA_VERSION} when it starts)" in out
    assert admin_json(capsys, "--db", path, "stats")["queued_messages"] == 3
    assert admin_json(capsys, "--db", path, "user", "show", "0000000000002")["queued_messages"] == 2


def newer(path) -> str:
    conn = connect(str(path))
    ensure_schema(conn)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.close()
    return str(path)


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "directory",
        "not sqlite",
        "not chatproto",
        "newer",
        "postgresql",
        "bad id",
        "unknown user",
        "group id",
    ],
)
def test_errors_are_one_line_with_exit_status_1(case, chat, capsys, tmp_path):
    db, args = chat["db"], ["stats"]
    if case == "missing":
        db, expected = str(tmp_path / "nope.sqlite3"), f"no database at {tmp_path / 'nope.sqlite3'}"
    elif case == "directory":
        db, expected = str(tmp_path), f"{tmp_path} is a directory, not a database"
    elif case == "not sqlite":
        (tmp_path / "notes.txt").write_text(
            "not a database, really, just some text that is long enough " * 10
        )
        db, expected = str(tmp_path / "notes.txt"), "is not a readable SQLite database"
    elif case == "not chatproto":
        sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)")
        db, expected = str(tmp_path / "other.db"), "is not a chatproto database"
    elif case == "newer":
        db, expected = newer(tmp_path / "new.db"), "has schema version 99, newer than this chatproto-admin's"
    elif case == "postgresql":
        db, expected = "postgresql://chat@127.0.0.1/chat", "works on SQLite files; for PostgreSQL use psql"
    elif case == "bad id":
        args, expected = ["user", "show", "12345"], "'12345' is not a user id (13 digits)"
    elif case == "unknown user":
        args, expected = ["secret", "reset", "0000000000000"], "no user 0000000000000"
    else:
        args, expected = ["user", "show", chat["group"].decode()], "(it is a group)"
    code, out, err = admin(capsys, "--db", db, *args)
    assert (code, out) == (1, "")
    assert len(err.splitlines()) == 1 and err.startswith("chatproto-admin: ") and expected in err, err


def test_usage_errors_are_one_line_with_exit_status_2(capsys):
    for args in (["frob"], [], ["user"], ["user", "show"], ["backup"]):
        code, out, err = admin(capsys, *args)
        assert (code, out) == (2, ""), args
        assert len(err.splitlines()) == 1 and err.endswith("(see --help)\n"), err


def test_a_real_process_exits_1_with_one_line(tmp_path):
    done = run_admin("--db", str(tmp_path / "nope.sqlite3"), "check", "--json")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"chatproto-admin: no database at {tmp_path / 'nope.sqlite3'}\n"


def test_backup_while_a_server_writes(tmp_path):
    """Messages flow through a real server during three backups: each copy
    passes ``check`` and holds every message confirmed (07) before it began."""
    db = str(tmp_path / "chat.sqlite3")
    # The writer sends as fast as its answers come back, far past the default
    # frame rate (2000/s after a burst of 10,000) over the seconds the backups
    # take: without this its frames were refused (12 05 10) in some runs.
    server = Server(db, tmp_path / "server.log", "--max-frame-rate", "0")
    try:
        setup = server.client()
        a, b, c = setup.register(), setup.register(), setup.register()
        ca, cc = server.client(), server.client()
        ca.login(a)
        cc.login(c)
        confirmed = [0]
        stop = threading.Event()
        failed = []

        def talk():
            """A sends C (online) and B (offline) one message each, and waits for C's 07."""
            try:
                i = 0
                while not stop.is_set():
                    i += 1
                    when, text = ts(1700000000 + i), b"message %d" % i
                    ca.send(f_send(a, c, when, text), f_send(a, b, when, text))
                    cc.read(1)
                    assert ca.read(1) == [b"07" + c + when]
                    confirmed[0] = i
            except BaseException as e:  # reported by the test
                failed.append(e)

        talker = threading.Thread(target=talk, daemon=True)
        talker.start()
        for k in range(3):
            while confirmed[0] < 20 * (k + 1) and not failed:
                time.sleep(0.01)
            before = confirmed[0]
            copy = str(tmp_path / f"backup{k}.sqlite3")
            done = run_admin("--db", db, "backup", copy)
            assert done.returncode == 0, done.stderr
            assert confirmed[0] > before, "no message went through during the backup"
            check = run_admin("--db", copy, "check", "--json")
            assert check.returncode == 0, check.stdout + check.stderr
            assert json.loads(check.stdout)["ok"]
            conn = sqlite3.connect(copy)
            (to_c,) = conn.execute("SELECT count(*) FROM messages WHERE dst = ?", (c.decode(),)).fetchone()
            (held_b,) = conn.execute("SELECT count(*) FROM inbox WHERE user_id = ?", (b.decode(),)).fetchone()
            (to_b,) = conn.execute("SELECT count(*) FROM messages WHERE dst = ?", (b.decode(),)).fetchone()
            conn.close()
            assert to_c >= before
            assert held_b == to_b >= before
        stats = run_admin("--db", db, "stats", "--json")
        assert stats.returncode == 0 and json.loads(stats.stdout)["users"] == 3
        stop.set()
        talker.join(10)
        assert not failed, failed
        for client in (setup, ca, cc):
            client.close()
    finally:
        server.stop()
