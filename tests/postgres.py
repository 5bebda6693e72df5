"""A throwaway PostgreSQL cluster for the tests: made once per session, with
a fresh database per test, so the PostgreSQL store is tested on the real thing.

As root, PostgreSQL refuses to run: initdb and pg_ctl run as the ``postgres``
user, in a directory of its own under /tmp (pytest's are private to root).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from itertools import count
from pathlib import Path

import pytest

#: Settings for a cluster whose data is thrown away: no fsync, nothing to wait for.
_SETTINGS = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{dir}'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
deadlock_timeout = '100ms'
"""


def find_bin_dir() -> str | None:
    """Where initdb is: on PATH, or Debian's /usr/lib/postgresql/VERSION/bin (the newest)."""
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(found)
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    candidates.sort(key=lambda path: int(path.split("/")[4]) if path.split("/")[4].isdigit() else 0)
    return os.path.dirname(candidates[-1]) if candidates else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    """One cluster on 127.0.0.1 at a free port; ``stop``, ``start`` and
    ``restart`` let a test take the database away from a running store."""

    def __init__(self, bin_dir: str):
        self.bin_dir = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="chatproto-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self._names = count(1)
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.dir, "postgres", "postgres")

    def _run(self, tool: str, *args: str) -> None:
        command = [*self._as, os.path.join(self.bin_dir, tool), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}{log}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(_SETTINGS.format(port=self.port, dir=self.dir))

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-m", "fast", "-w", "restart")

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"test{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def postgres_cluster():
    """The session's cluster, as a generator for a fixture; skips when it cannot be had."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install '.[postgres]')")
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed: no initdb on PATH nor in /usr/lib/postgresql/*/bin")
    cluster = PostgresCluster(bin_dir)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.remove()
