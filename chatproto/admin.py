"""``chatproto-admin``: look after a chatproto database, live or stopped.

It opens the server's SQLite file next to the running server: the database
is in WAL mode, so reading never blocks the server, and each change is one
short transaction that waits (``busy_timeout``) for the server's current
one. The server reads its users only when it starts, so a deleted user or
a reset secret takes effect at the server's next start; every command that
changes something says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sqlite3
import sys
import time
import urllib.request
from datetime import datetime, timezone

from .domain import hash_secret
from .service import DEFAULT_DB
from .store import HELD_MESSAGE, to_group
from .store.sqlite import SCHEMA_VERSION, schema_version
from .version import describe

#: Milliseconds a command waits for the server's transaction to end.
BUSY_TIMEOUT_MS = 5000
USER_ID = re.compile(r"[0-9]{13}")

RESTART_NOTE = (
    "the running server read its users when it started and keeps using what it read: "
    "this takes effect when it restarts"
)

EPILOG = f"""\
The database may be in use by a running server: reading never stops it, and
each change is one short transaction. But the server loads its users when it
starts, so after `user delete` the user can still log in, and after `secret
reset` the old secret still works and the new one does not, until the server
restarts (a restart loses nothing: every message is committed before its 07).
Whether a user is online is not in the database. Exit status: 0 on success, 1
on any error (one line on stderr), 2 on a usage error. Default --db: {DEFAULT_DB}.
"""


class AdminError(Exception):
    """A reason to stop, said in one line, with exit status 1."""


# -- opening the database -------------------------------------------------


def open_db(path: str) -> sqlite3.Connection:
    """Open an existing chatproto database for reading and short writes; never create one."""
    if path == ":memory:":
        raise AdminError("--db :memory: is the server's own memory; there is nothing to open")
    if path.startswith(("postgresql://", "postgres://")):
        raise AdminError(
            "chatproto-admin works on SQLite files; for PostgreSQL use psql and pg_dump (docs/scaling.md)"
        )
    if not os.path.exists(path):
        raise AdminError(f"no database at {path}")
    if os.path.isdir(path):
        raise AdminError(f"{path} is a directory, not a database")
    uri = "file:" + urllib.request.pathname2url(os.path.abspath(path)) + "?mode=rw"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        version = schema_version(conn)
    except sqlite3.DatabaseError as e:
        raise AdminError(f"{path} is not a readable SQLite database ({e})") from e
    if version is None:
        conn.close()
        raise AdminError(f"{path} is not a chatproto database (it has no schema_version table)")
    if version > SCHEMA_VERSION:
        conn.close()
        raise AdminError(
            f"{path} has schema version {version}, newer than this chatproto-admin's {SCHEMA_VERSION}: "
            "use the chatproto-admin of the server that upgraded it"
        )
    return conn


class _Transaction:
    """A short transaction: ``BEGIN`` (a consistent snapshot) or ``BEGIN IMMEDIATE`` (a change)."""

    def __init__(self, conn: sqlite3.Connection, write: bool = False):
        self.conn = conn
        self.begin = "BEGIN IMMEDIATE" if write else "BEGIN"

    def __enter__(self):
        self.conn.execute(self.begin)
        return self.conn

    def __exit__(self, kind, value, tb):
        if kind is None:
            self.conn.execute("COMMIT")
        elif self.conn.in_transaction:
            self.conn.rollback()
        return False


def check_user_id(user: str) -> str:
    if not USER_ID.fullmatch(user):
        raise AdminError(f"{user!r} is not a user id (13 digits)")
    return user


def when(ts: int | None) -> str | None:
    """A Unix time as people read it; the number itself when it is not one."""
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return str(ts)


# -- the commands ---------------------------------------------------------
# Each returns (a dict for --json, the lines for people).


def cmd_stats(conn: sqlite3.Connection, args) -> tuple[dict, list[str]]:
    with _Transaction(conn):
        (users,) = conn.execute("SELECT count(*) FROM users").fetchone()
        (groups,) = conn.execute("SELECT count(*) FROM groups").fetchone()
        queued, notices = conn.execute(
            "SELECT coalesce(sum(code = ?), 0), coalesce(sum(code != ?), 0) FROM inbox",
            (HELD_MESSAGE, HELD_MESSAGE),
        ).fetchone()
        (waiting,) = conn.execute(
            "SELECT count(DISTINCT user_id) FROM inbox WHERE code = ?", (HELD_MESSAGE,)
        ).fetchone()
        oldest = conn.execute(
            "SELECT user_id, src, dst, ts FROM inbox WHERE code = ? ORDER BY seq LIMIT 1", (HELD_MESSAGE,)
        ).fetchone()
        (messages,) = conn.execute("SELECT count(*) FROM messages").fetchone()
        version = schema_version(conn)
    data = {
        "users": users,
        "groups": groups,
        "messages": messages,
        "queued_messages": queued,
        "users_with_queued_messages": waiting,
        "held_notices": notices,
        "oldest_queued": None,
        "schema_version": version,
    }
    lines = [
        f"users:            {users}",
        f"groups:           {groups}",
        f"messages stored:  {messages}",
        f"queued messages:  {queued} (waiting for {waiting} users)",
        f"held notices:     {notices} (07, 09, 11, 18, 21 waiting for their user's next login)",
    ]
    if oldest:
        user, src, dst, ts = oldest
        data["oldest_queued"] = {"user": user, "src": src, "dst": dst, "ts": ts}
        lines.append(f"oldest queued:    for {user}, from {src} to {dst}, sent {when(ts)} (sender's clock)")
    else:
        lines.append("oldest queued:    none")
    lines.append(f"schema version:   {version}")
    return data, lines


def cmd_user_show(conn: sqlite3.Connection, args) -> tuple[dict, list[str]]:
    user = check_user_id(args.id)
    with _Transaction(conn):
        row = conn.execute("SELECT secret_hash, created FROM users WHERE id = ?", (user,)).fetchone()
        if row is None:
            is_group = conn.execute("SELECT 1 FROM groups WHERE id = ?", (user,)).fetchone()
            raise AdminError(f"no user {user}" + (" (it is a group)" if is_group else ""))
        secret_hash, created = row
        queued, notices = conn.execute(
            "SELECT coalesce(sum(code = ?), 0), coalesce(sum(code != ?), 0) FROM inbox WHERE user_id = ?",
            (HELD_MESSAGE, HELD_MESSAGE, user),
        ).fetchone()
        groups = [
            g for (g,) in conn.execute("SELECT group_id FROM members WHERE user_id = ? ORDER BY 1", (user,))
        ]
        (last_sent,) = conn.execute("SELECT max(ts) FROM messages WHERE src = ?", (user,)).fetchone()
    data = {
        "id": user,
        "exists": True,
        "has_secret": secret_hash is not None,
        "created": created,
        "online": None,
        "queued_messages": queued,
        "held_notices": notices,
        "groups": groups,
        "last_message_sent_ts": last_sent,
    }
    lines = [
        f"user:              {user}",
        f"has a secret:      {'yes (logs in with 15)' if secret_hash else 'no (logs in with 03)'}",
        f"created:           {when(created)}",
        "online:            unknown (the database does not know; the server's log says who logged in)",
        f"last message sent: {when(last_sent) + ' (sender clock)' if last_sent else 'never'}",
        f"queued messages:   {queued}",
        f"held notices:      {notices}",
        f"groups:            {', '.join(groups) if groups else 'none'}",
    ]
    return data, lines


def cmd_user_delete(conn: sqlite3.Connection, args) -> tuple[dict, list[str]]:
    """Forget a user: their account, what is held for them, their memberships.

    Messages they sent stay (they are their readers' too). Each message held
    for them no longer waits for them: its count of remaining recipients goes
    down, as a delivery would, but its sender gets no 07, since it never
    arrived. Items held for an id that is no longer a user (sent to it while
    the server still knew it) are removed too, so running this again after
    the restart finishes the job.
    """
    user = check_user_id(args.id)
    with _Transaction(conn, write=True):
        existed = conn.execute("DELETE FROM users WHERE id = ?", (user,)).rowcount
        conn.execute(
            "UPDATE messages SET remaining = remaining - (SELECT count(*) FROM inbox i "
            "WHERE i.msg_id = messages.id AND i.user_id = ?1 AND i.code = ?2) "
            "WHERE id IN (SELECT msg_id FROM inbox WHERE user_id = ?1 AND code = ?2) "
            # Since schema version 5 only a group message counts its members down.
            f"AND ({to_group()} OR ?3 < 5)",
            (user, HELD_MESSAGE, schema_version(conn)),
        )
        held = conn.execute("DELETE FROM inbox WHERE user_id = ?", (user,)).rowcount
        groups = conn.execute("DELETE FROM members WHERE user_id = ?", (user,)).rowcount
        if not existed and not held and not groups:
            raise AdminError(f"no user {user}")
    data = {"id": user, "deleted": bool(existed), "held_items_removed": held, "memberships_removed": groups}
    lines = [
        f"deleted user {user}" if existed else f"{user} was already deleted; removed what was left",
        f"held items removed: {held}",
        f"memberships removed: {groups}",
        f"note: {RESTART_NOTE}; until then {user} can still log in",
    ]
    data["note"] = RESTART_NOTE
    return data, lines


def cmd_secret_reset(conn: sqlite3.Connection, args) -> tuple[dict, list[str]]:
    """A new secret, shown once: only its hash is kept, as the server keeps them."""
    user = check_user_id(args.id)
    secret = secrets.token_hex(16)
    with _Transaction(conn, write=True):
        changed = conn.execute(
            "UPDATE users SET secret_hash = ? WHERE id = ?", (hash_secret(secret.encode()), user)
        ).rowcount
        if not changed:
            raise AdminError(f"no user {user}")
    data = {"id": user, "secret": secret, "note": RESTART_NOTE}
    lines = [
        f"new secret for {user}: {secret}",
        "it is shown only this once; the user logs in with 15 and it (03 is refused from now on)",
        f"note: {RESTART_NOTE}; until then the old secret (or none) still works and this one does not",
    ]
    return data, lines


def cmd_backup(conn: sqlite3.Connection, args) -> tuple[dict, list[str]]:
    """A consistent copy through SQLite's online backup API, in one step.

    One step reads one snapshot while the server keeps writing (WAL); a copy
    in several steps would restart whenever the server commits. It is made
    beside the target and renamed into place, so the target is never half a
    copy, and it is checked before it is kept.
    """
    target = args.path
    if os.path.isdir(target):
        raise AdminError(f"{target} is a directory: give the file to write")
    if os.path.exists(target) and not args.force:
        raise AdminError(f"{target} exists (use --force to replace it)")
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise AdminError(f"no directory {directory}")
    partial = f"{target}.partial-{os.getpid()}"
    started = time.monotonic()
    try:
        # Readable by its owner alone, whatever the umask: it holds every message
        # and every secret's hash (SQLite gives its journal the same mode).
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        os.close(fd)
        copy = sqlite3.connect(partial, isolation_level=None)
        try:
            conn.backup(copy)
            # One self-contained file: no -wal beside it until a server opens it.
            copy.execute("PRAGMA journal_mode = DELETE")
            (verdict,) = copy.execute("PRAGMA quick_check").fetchone()
            version = schema_version(copy)
        finally:
            copy.close()
        if verdict != "ok":
            raise AdminError(f"the copy failed its check ({verdict}); {target} was not written")
        os.replace(partial, target)
        _sync_directory(directory)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    seconds = time.monotonic() - started
    size = os.path.getsize(target)
    data = {"path": target, "bytes": size, "seconds": round(seconds, 3), "schema_version": version}
    lines = [
        f"backed up {args.db} to {target}: {size} bytes in {seconds:.2f} s, schema version {version}",
        "to restore: stop the server, copy it over the database (and delete any -wal and -shm "
        "files beside the database), start the server",
    ]
    return data, lines


def _sync_directory(directory: str) -> None:
    """Make the rename durable, where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def cmd_check(conn: sqlite3.Connection, args) -> tuple[dict, list[str]]:
    """SQLite's integrity check, the schema version, and chatproto's own invariants."""
    try:
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check")]
    except sqlite3.DatabaseError as e:
        # Damage bad enough that the check itself stops: that is its verdict.
        data = {"ok": False, "integrity": [str(e)], "chatproto_schema_version": SCHEMA_VERSION}
        raise CheckFailed(data, ["integrity:        FAILED", f"  {e}"]) from e
    integrity_ok = problems == ["ok"]
    with _Transaction(conn):
        version = schema_version(conn)
        history = []
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_history'").fetchone():
            history = [
                {"version": v, "applied": a, "previous": p, "backup": b}
                for v, a, p, b in conn.execute(
                    "SELECT version, applied, previous, backup FROM schema_history ORDER BY rowid"
                )
            ]
        # A group message's count of remaining members is its number of holds;
        # a direct message has at most one hold (its delivery is the hold's
        # end) and a count of 0 (since schema version 5, 1 before while held).
        (miscounted,) = conn.execute(
            "SELECT count(*) FROM (SELECT dst, remaining, "
            "(SELECT count(*) FROM inbox i WHERE i.msg_id = m.id AND i.code = ?1) AS held FROM messages m) "
            f"WHERE CASE WHEN {to_group()} OR ?2 < 5 THEN remaining != held "
            "ELSE remaining != 0 OR held > 1 END",
            (HELD_MESSAGE, version),
        ).fetchone()
        (orphans,) = conn.execute(
            "SELECT count(*) FROM inbox WHERE user_id NOT IN (SELECT id FROM users)"
        ).fetchone()
    ok = integrity_ok and miscounted == 0
    data = {
        "ok": ok,
        "integrity": problems,
        "schema_version": version,
        "chatproto_schema_version": SCHEMA_VERSION,
        "schema_history": history,
        "miscounted_messages": miscounted,
        "held_for_deleted_users": orphans,
    }
    lines = [f"integrity:        {'ok' if integrity_ok else 'FAILED'}"]
    if not integrity_ok:
        lines += [f"  {p}" for p in problems]
    upgrade = (
        "" if version == SCHEMA_VERSION else f" (the server upgrades it to {SCHEMA_VERSION} when it starts)"
    )
    lines.append(f"schema version:   {version}{upgrade}")
    for h in history:
        how = "made" if h["previous"] is None else f"upgraded from {h['previous']}"
        backup = f", copy before it: {h['backup']}" if h["backup"] else ""
        lines.append(f"  version {h['version']} {how} {when(h['applied'])}{backup}")
    lines.append(
        "held counts:      "
        + (
            "agree"
            if miscounted == 0
            else f"{miscounted} messages' remaining count disagrees with their holds"
        )
    )
    if orphans:
        lines.append(
            f"note:             {orphans} items are held for users that no longer exist "
            "(sent while the server still knew them); `user delete ID` again removes them"
        )
    if not ok:
        raise CheckFailed(data, lines)
    return data, lines


class CheckFailed(AdminError):
    """``check`` found a problem: its report is still printed."""

    def __init__(self, data: dict, lines: list[str]):
        super().__init__("the database failed its check")
        self.data = data
        self.lines = lines


# -- the command line -----------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, not the usage block: the same rule as every other error."""
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    # --db and --json are accepted before or after the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db", default=argparse.SUPPRESS, help=f"the server's SQLite database (default: {DEFAULT_DB})"
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON, for scripts"
    )
    parser = _Parser(
        prog="chatproto-admin",
        description="Look after a chatproto server's database, while the server runs or not.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=describe(), help="print the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = commands.add_parser(
        "stats", parents=[common], help="users, groups, queued messages and held notices, oldest queued"
    )
    p.set_defaults(run=cmd_stats)

    user = commands.add_parser("user", help="show or delete one user")
    user_commands = user.add_subparsers(
        dest="user_command", required=True, metavar="ACTION", parser_class=_Parser
    )
    p = user_commands.add_parser("show", parents=[common], help="what the database knows of a user")
    p.add_argument("id", help="the user's 13-digit id")
    p.set_defaults(run=cmd_user_show)
    p = user_commands.add_parser(
        "delete",
        parents=[common],
        help="remove a user, what is held for them and their memberships (a running server "
        "keeps the user until it restarts)",
    )
    p.add_argument("id", help="the user's 13-digit id")
    p.set_defaults(run=cmd_user_delete)

    secret = commands.add_parser("secret", help="reset a user's secret")
    secret_commands = secret.add_subparsers(
        dest="secret_command", required=True, metavar="ACTION", parser_class=_Parser
    )
    p = secret_commands.add_parser(
        "reset",
        parents=[common],
        help="print a new secret once and keep its hash (a running server uses it once it restarts)",
    )
    p.add_argument("id", help="the user's 13-digit id")
    p.set_defaults(run=cmd_secret_reset)

    p = commands.add_parser(
        "backup", parents=[common], help="a consistent copy of the database, live, with SQLite's backup API"
    )
    p.add_argument("path", help="the file to write")
    p.add_argument("--force", action="store_true", help="replace PATH if it exists")
    p.set_defaults(run=cmd_backup)

    p = commands.add_parser("check", parents=[common], help="integrity check and schema version")
    p.set_defaults(run=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.db = getattr(args, "db", DEFAULT_DB)
    args.json = getattr(args, "json", False)
    try:
        conn = open_db(args.db)
        try:
            data, lines = args.run(conn, args)
        finally:
            conn.close()
    except CheckFailed as e:
        _show(args, e.data, e.lines)
        return _fail(str(e))
    except AdminError as e:
        return _fail(str(e))
    except sqlite3.Error as e:
        return _fail(f"database error on {args.db}: {e}")
    except OSError as e:
        return _fail(str(e))
    _show(args, data, lines)
    return 0


def _show(args, data: dict, lines: list[str]) -> None:
    try:
        if args.json:
            print(json.dumps(data, indent=None, sort_keys=True))
        else:
            print("\n".join(lines))
        sys.stdout.flush()
    except BrokenPipeError:
        # Piped into `head`: the reader has what it wanted. Quiet the exit's own flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _fail(message: str) -> int:
    print(f"chatproto-admin: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
