"""The real ``twist chat`` as an administrator meets it: a start that cannot
succeed is one line and exit status 1; SIGHUP reopens the log file; --config;
--version; socket activation. Every test runs the real command."""

from __future__ import annotations

import os
import select
import signal
import socket
import stat
import subprocess
import time

import pytest

from chatproto.version import chatproto_version

from . import installed
from .test_e2e_server import DEADLINE, Client, free_port


def twist() -> list[str]:
    """``twist`` of the installed package (tests/installed.py), not the checkout's."""
    return [installed.python(), "-m", "twisted"]


def twist_chat(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    """``twist chat ARGS`` to its end; a start that hangs fails the test by its timeout."""
    return subprocess.run(
        [*twist(), "chat", *args],
        cwd=cwd or installed.outside(),
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def assert_one_line(done: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit status 1, no traceback anywhere, and one line on stderr holding each of ``expected``."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    (line,) = lines
    assert line.startswith("chatproto: "), line
    for text in expected:
        assert text in line, line
    return line


def loopback(port: int) -> str:
    return f"tcp:{port}:interface=127.0.0.1"


@pytest.mark.parametrize(
    "option, value, reason",
    [
        ("--port", "nonsense", "Unknown endpoint type"),
        ("--port", "tcp:seven", "invalid literal"),
        ("--port", "ssl:7443:privateKey=/nonexistent/key.pem", "/nonexistent/key.pem"),
        ("--port", "systemd:domain=INET:index=0", "systemd passed no socket"),
        ("--metrics", "localhost:9100", "Unknown endpoint type"),
        ("--max-held", "lots", "not a whole number"),
        ("--max-frame-rate", "-1", "must not be negative"),
        ("--login-timeout", "soon", "not a number"),
        ("--dedup-window", "a month", "not a duration"),
    ],
)
def test_a_bad_setting_is_one_line_and_status_1(tmp_path, option, value, reason):
    done = twist_chat("--db", str(tmp_path / "chat.sqlite3"), option, value)
    assert_one_line(done, f"{option} {value}", reason)
    assert not (tmp_path / "chat.sqlite3").exists(), "the store opened before the settings were checked"


@pytest.mark.parametrize("option", ["--port", "--metrics"])
def test_an_address_in_use_is_one_line_and_status_1(tmp_path, option):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    db = tmp_path / "chat.sqlite3"
    try:
        args = {"--port": loopback(free_port()), "--metrics": None, option: loopback(busy)}
        argv = [a for name, v in args.items() if v for a in (name, v)]
        started = time.monotonic()
        done = twist_chat("--db", str(db), *argv)
    finally:
        taken.close()
    assert_one_line(done, option, f"127.0.0.1:{busy}", "Address already in use")
    assert time.monotonic() - started < 15
    # The store had opened: it was closed as at any stop (no -wal left behind).
    assert db.exists() and not (tmp_path / "chat.sqlite3-wal").exists()


def test_a_unix_socket_that_cannot_be_made_is_named(tmp_path):
    path = tmp_path / "no-such-dir" / "chat.sock"
    done = twist_chat("--port", f"unix:{path}", "--db", str(tmp_path / "chat.sqlite3"))
    assert_one_line(done, "--port", "No such file or directory", str(path))


def test_a_database_that_cannot_be_opened_is_named(tmp_path):
    path = str(tmp_path / "no-such-dir" / "chat.sqlite3")
    assert_one_line(twist_chat("--port", loopback(free_port()), "--db", path), path, "unable to open")


def test_a_file_that_is_not_a_database_is_named(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a database, " * 100)
    assert_one_line(twist_chat("--port", loopback(free_port()), "--db", str(path)), str(path))


def test_postgresql_that_cannot_be_reached_is_one_line_and_status_1(tmp_path):
    url = f"postgresql://chat@127.0.0.1:{free_port()}/chat"
    assert_one_line(twist_chat("--port", loopback(free_port()), "--db", url), "cannot connect to PostgreSQL")


def test_a_postgresql_database_from_a_newer_chatproto_is_one_line_and_status_1(pg_dsn, tmp_path):
    import psycopg

    from chatproto.store.postgres import SCHEMA_VERSION, ensure_schema

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        ensure_schema(conn)
        conn.execute("UPDATE schema_version SET version = version + 1")
    done = twist_chat("--port", loopback(free_port()), "--db", pg_dsn)
    assert_one_line(
        done, f"schema version {SCHEMA_VERSION + 1}, newer than this chatproto's {SCHEMA_VERSION}"
    )


def test_a_password_on_the_command_line_is_warned_about_and_never_printed(tmp_path):
    url = f"postgresql://chat:hunter2@127.0.0.1:{free_port()}/chat"
    done = twist_chat("--port", loopback(free_port()), "--db", url)
    assert done.returncode == 1
    assert "hunter2" not in done.stdout + done.stderr
    assert "every local user can read" in done.stderr


def test_a_new_database_and_its_wal_and_shm_are_readable_by_their_owner_alone(server, tmp_path):
    old = os.umask(0o022)
    try:
        srv = server()
    finally:
        os.umask(old)
    srv.client().register()
    # While it runs, the WAL and SHM exist: SQLite gives them the database's mode.
    for suffix in ("", "-wal", "-shm"):
        assert stat.S_IMODE(os.stat(srv.db + suffix).st_mode) == 0o600, suffix
    assert srv.stop() in (0, -signal.SIGTERM)
    assert stat.S_IMODE(os.stat(srv.db).st_mode) == 0o600


def test_a_graceful_stop_logs_no_error(server):
    """On Twisted 24.7 each stop logged an unhandled AlreadyQuit (the floor is 24.11 now)."""
    srv = server()
    srv.client().register()
    assert srv.stop() in (0, -signal.SIGTERM)
    text = srv.log.read_text()
    assert "chatproto stopped in" in text
    assert "Traceback" not in text and "log_failure" not in text and "Unhandled" not in text, text


def test_version_names_chatproto_and_twisted():
    import twisted

    done = subprocess.run(
        [*twist(), "chat", "--version"], cwd=installed.outside(), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"chatproto {chatproto_version()} (Twisted {twisted.__version__}, Python ")
    assert chatproto_version() != "unknown"


# -- --config ------------------------------------------------------------------------


def wait_for_port(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + DEADLINE
    while True:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "the server never listened"
            select.select([], [], [], 0.02)


def test_settings_come_from_the_config_file_and_the_command_line_wins(tmp_path):
    from_file, from_cli = free_port(), free_port()
    conf = tmp_path / "chat.toml"
    conf.write_text(
        f'port = "{loopback(from_file)}"\n'
        f'db = "{tmp_path / "from-file.sqlite3"}"\n'
        "require-secrets = true\n"
        "max-held = 5\n"
    )
    proc = subprocess.Popen(
        [*twist(), "chat", "--config", str(conf), "--port", loopback(from_cli)],
        cwd=installed.outside(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(from_cli, proc)
        client = Client(from_cli)
        client.send(b"01")  # refused: require-secrets came from the file
        (answer,) = client.read(1)
        assert answer[:2] == b"12", answer
        assert (tmp_path / "from-file.sqlite3").exists()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", from_file), timeout=1).close()
    finally:
        proc.terminate()
        proc.wait(DEADLINE)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("prot = 7000\n", "unknown setting 'prot'"),
        ("max-held = 'many'\n", "max-held = 'many': not a whole number"),
        ("require-secrets = 1\n", "not true or false"),
        ('port = "nonsense"\n', "port = nonsense: not an endpoint"),
        ("port = [\n", "not valid TOML"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_file(tmp_path, text, reason):
    conf = tmp_path / "chat.toml"
    conf.write_text(text)
    assert_one_line(twist_chat("--config", str(conf), "--db", str(tmp_path / "c.sqlite3")), str(conf), reason)


def test_a_missing_config_file_is_one_line(tmp_path):
    assert_one_line(twist_chat("--config", str(tmp_path / "nope.toml")), "nope.toml", "cannot read")


# -- SIGHUP --------------------------------------------------------------------------


def wait_for_text(path, text: str) -> str:
    deadline = time.monotonic() + DEADLINE
    while True:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        assert time.monotonic() < deadline, f"no {text!r} in {path}:\n{content}"
        select.select([], [], [], 0.02)


def test_sighup_reopens_the_log_file_and_the_server_goes_on(tmp_path):
    """logrotate's habit: move the file away, SIGHUP, and the server writes a new one."""
    log, rotated = tmp_path / "chat.log", tmp_path / "chat.log.1"
    port = free_port()
    proc = subprocess.Popen(
        [*twist(), "--log-format=text", f"--log-file={log}", "chat"]
        + ["--port", loopback(port), "--db", str(tmp_path / "chat.sqlite3")],
        cwd=installed.outside(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port, proc)
        wait_for_text(log, "chatproto listening on")
        log.rename(rotated)
        proc.send_signal(signal.SIGHUP)
        wait_for_text(log, f"SIGHUP: reopened the log file {log}")
        client = Client(port)
        client.send(b"01")
        (made,) = client.read(1)
        assert made[:2] == b"02", made
        client.send(b"03" + made[2:15])
        assert client.read(1) == [b"04" + made[2:15]]
        wait_for_text(log, f"{made[2:15].decode()} online")
        assert proc.poll() is None
        proc.send_signal(signal.SIGHUP)  # twice: the handler stays
        wait_for_text(log, "SIGHUP: reopened")
        client.sock.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(DEADLINE)
    assert code in (0, -signal.SIGTERM), proc.stderr.read()
    assert "chatproto stopped in" in log.read_text()
    assert "online" not in rotated.read_text()
    assert not (tmp_path / "chat.sqlite3-wal").exists()


def test_sighup_without_a_log_file_does_not_stop_the_server(server):
    srv = server()
    srv.proc.send_signal(signal.SIGHUP)
    wait_for_text(srv.log, "SIGHUP: the log goes to standard output")
    srv.client().register()
    assert srv.stop() in (0, -signal.SIGTERM)


def test_sighup_with_the_log_on_stderr_opens_no_file(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [*twist(), "--log-format=text", "--log-file=+", "chat"]
        + ["--port", loopback(port), "--db", str(tmp_path / "chat.sqlite3")],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(port, proc)
        proc.send_signal(signal.SIGHUP)
        Client(port).send(b"01")
        select.select([], [], [], 0.5)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(DEADLINE)
    assert code in (0, -signal.SIGTERM)
    assert "SIGHUP: the log goes to standard output" in proc.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.sqlite3"]


# -- socket activation ----------------------------------------------------------------


def test_socket_activation_through_the_systemd_endpoint(tmp_path):
    """As systemd passes a socket: fd 3, LISTEN_FDS=1, LISTEN_FDNAMES, and LISTEN_PID the server's pid."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES="chatproto.socket")
    # sh sets LISTEN_PID to its own pid, which exec hands on to Python.
    command = " ".join(
        [*twist(), "chat", "--port", "systemd:domain=INET:index=0", "--db", str(tmp_path / "chat.sqlite3")]
    )
    proc = subprocess.Popen(
        ["sh", "-c", f"LISTEN_PID=$$ exec {command}"],
        cwd=installed.outside(),
        env=env,
        pass_fds=(3,),
        preexec_fn=lambda: os.dup2(listener.fileno(), 3),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    listener.close()
    try:
        client = Client(port)
        client.send(b"01")
        (made,) = client.read(1)
        assert made[:2] == b"02", made
        client.sock.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(DEADLINE)
    assert code in (0, -signal.SIGTERM), proc.stderr.read()


# -- in process: the listening service a MultiService can use ---------------------------


class Refusing:
    def listen(self, factory):
        from twisted.internet.defer import fail
        from twisted.internet.error import CannotListenError

        return fail(CannotListenError("127.0.0.1", 7999, OSError(98, "Address already in use")))


def test_a_listening_service_that_cannot_listen_stops_the_reactor_for_status_1(capfd):
    from twisted.internet.protocol import Factory
    from twisted.internet.testing import MemoryReactor

    from chatproto import startup

    reactor = MemoryReactor()
    service = startup.ListeningService(reactor, "--port", Refusing(), Factory())
    service.startService()
    line = "chatproto: --port: cannot listen on 127.0.0.1:7999: Address already in use\n"
    assert capfd.readouterr().err == line
    # The reactor stops as soon as it runs; once it has shut down, the process exits 1.
    assert [f for f, _, _ in reactor.whenRunningHooks] == [reactor.stop]
    assert reactor.triggers["after"]["shutdown"] == [(startup._exit, (1,), {})]
