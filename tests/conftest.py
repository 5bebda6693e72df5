"""Fixtures: a hub on fake transports over each store, and a guard against
errors that Twisted would only log."""

from __future__ import annotations

import gc
import signal

import pytest
from twisted.logger import globalLogPublisher

from chatproto.domain import Domain
from chatproto.store.memory import MemoryStore

from .helpers import Net
from .postgres import postgres_cluster
from .test_e2e_server import Server


@pytest.fixture
def domain():
    """The domain alone over a MemoryStore (tests/test_domain*.py)."""
    store = MemoryStore()
    d = Domain(store)
    d.load(store.load().result)
    return d


@pytest.fixture
def no_logged_failures():
    """An exception the server only logs is still a bug: fail the test that caused it."""
    failures = []

    def observer(event):
        if "log_failure" in event:
            failures.append(event["log_failure"])

    globalLogPublisher.addObserver(observer)
    try:
        yield
        gc.collect()  # unhandled errors in Deferreds are logged when collected
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not failures, "logged failures:\n" + "\n".join(f.getTraceback() for f in failures)


@pytest.fixture
def server(tmp_path):
    """Start real servers on demand, ``server(*options, db=PATH)``; each still
    running at the end is killed (its log stays in tmp_path)."""
    started = []

    def start(*extra, db=None):
        s = Server(db or str(tmp_path / "chat.sqlite3"), tmp_path / f"server{len(started)}.log", *extra)
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.stop(signal.SIGKILL)


@pytest.fixture(params=["memory", "sqlite"])
def net(request, tmp_path):
    """The server's hub over each store: MemoryStore, and SQLite with its thread driven by the test."""
    n = Net(request.param, str(tmp_path / "chat.sqlite3"))
    yield n
    n.shutdown()


@pytest.fixture
def make_net(tmp_path):
    """Build a Net with options (require_secrets, a store kind); shut down after the test."""
    made = []

    def make(kind="memory", **kwargs):
        n = Net(kind, str(tmp_path / f"chat{len(made)}.sqlite3"), **kwargs)
        made.append(n)
        return n

    yield make
    for n in made:
        n.shutdown()


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster for the session (tests/postgres.py); skips without PostgreSQL."""
    yield from postgres_cluster()


@pytest.fixture
def pg_dsn(postgres):
    """A fresh empty database on the session's cluster, as a postgresql:// URL."""
    return postgres.create_database()
