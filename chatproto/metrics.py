"""``--metrics``: the server's figures in Prometheus text format at ``/metrics``.

The hot path only bumps plain ints (``server.Stats``); everything here runs at
scrape time, on a thread of the reactor's pool (prometheus_client's
MetricsResource is a WSGI app), so it reads the reactor thread's state only
through single, atomic copies (``dict(...)``, ``list(...)``). docs/metrics.md
says what each figure counts.
"""

from __future__ import annotations

import platform
import sqlite3
import threading
import time

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.web.resource import Resource
from twisted.web.server import Site

from . import wire
from .version import chatproto_version, twisted_version

#: Label values for the reasons of a 12 frame: the wire constant's name.
REASON_NAME = {
    getattr(wire, name): name.lower()
    for name in (
        "MALFORMED",
        "UNKNOWN_CODE",
        "NOT_ONLINE",
        "UNKNOWN_USER",
        "WRONG_SRC",
        "UNKNOWN_DESTINATION",
        "NOT_A_MEMBER",
        "SECRET_REQUIRED",
        "LOGGED_IN_ELSEWHERE",
        "RATE_LIMITED",
        "BUSY",
    )
}

TRANSACTION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)

#: Seconds a count of the queued messages is served before it is taken again.
QUEUED_REFRESH = 5.0


class QueuedMessages:
    """How many messages wait in the inbox for their recipients, counted on
    a read-only connection of its own (never the writer's), at most once
    every ``refresh`` seconds however often the endpoint is scraped."""

    QUERY = "SELECT count(*) FROM inbox WHERE msg_id IS NOT NULL"

    def __init__(self, path: str, refresh: float = QUEUED_REFRESH, clock=time.monotonic):
        self.path = path
        self.refresh = refresh
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._value: int | None = None
        self._taken = float("-inf")

    def value(self) -> int | None:
        with self._lock:
            now = self._clock()
            if now - self._taken >= self.refresh:
                self._taken = now
                self._value = self._count()
            return self._value

    def _count(self) -> int | None:
        try:
            if self._conn is None:
                # The index on msg_id holds only held messages' rows (07, 09
                # and 11 notices have none), so this counts an index, not the table.
                uri = f"file:{self.path}?mode=ro"
                self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
                self._conn.execute("PRAGMA busy_timeout = 1000")
            (count,) = self._conn.execute(self.QUERY).fetchone()
            return count
        except sqlite3.Error:
            return None  # no sample this time, rather than a scrape error

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class ChatCollector:
    """Turns the server's plain counters and state into metric families."""

    def __init__(self, factory, domain, store, queued: QueuedMessages | None):
        self.factory = factory
        self.domain = domain
        self.store = store
        self.queued = queued

    def describe(self):
        """The names alone: the registry asks at registration, and that must
        not take (and cache) a count of the queued messages."""
        for name in (
            "chatproto_connections_open",
            "chatproto_users_online",
            "chatproto_slow_reader_backlog_bytes",
            "chatproto_store_queue_operations",
            "chatproto_messages_queued",
            "chatproto_build_info",
        ):
            yield GaugeMetricFamily(name, "")
        for name in (
            "chatproto_frames_received",
            "chatproto_frames_sent",
            "chatproto_errors",
            "chatproto_admission_events",
        ):
            yield CounterMetricFamily(name, "")

    def collect(self):
        yield self.build_info()
        stats = self.factory.stats
        yield GaugeMetricFamily(
            "chatproto_connections_open", "Client connections open.", value=self.factory.connections
        )
        yield GaugeMetricFamily(
            "chatproto_users_online", "Users logged in (03 or 15).", value=len(self.domain.sessions)
        )
        yield _by_label(
            CounterMetricFamily(
                "chatproto_frames_received",
                "Frames read from clients, by code (rate-limited ones included).",
                labels=["code"],
            ),
            stats.received,
            bytes.decode,
        )
        yield _by_label(
            CounterMetricFamily(
                "chatproto_frames_sent",
                "Frames written to clients, by code; each frame of a batched write counts.",
                labels=["code"],
            ),
            stats.sent,
            bytes.decode,
        )
        yield _by_label(
            CounterMetricFamily(
                "chatproto_errors", "12 frames sent to clients, by reason.", labels=["reason"]
            ),
            stats.errors,
            lambda reason: REASON_NAME.get(reason, reason.decode("latin-1")),
        )
        yield _by_label(
            CounterMetricFamily(
                "chatproto_admission_events",
                "What clients did and were refused, counted per address in the log's summaries, in all.",
                labels=["event"],
            ),
            self.factory.admission.events,
            lambda event: event.replace(" ", "_"),
        )
        backlog = sum(protocol.unread for protocol in list(self.factory.protocols))
        yield GaugeMetricFamily(
            "chatproto_slow_reader_backlog_bytes",
            "Bytes written to connections since their reader fell behind (what --max-buffer caps).",
            value=backlog,
        )
        yield GaugeMetricFamily(
            "chatproto_store_queue_operations",
            "Store operations submitted and not yet committed (a run of messages counts one per message).",
            value=self.store.backlog,
        )
        if self.queued is not None:
            count = self.queued.value()
            if count is not None:
                yield GaugeMetricFamily(
                    "chatproto_messages_queued",
                    f"Messages held for recipients who have not got them yet (counted every "
                    f"{self.queued.refresh:g} s at most).",
                    value=count,
                )

    def build_info(self) -> GaugeMetricFamily:
        """Always 1; what is running is in its labels, so that a dashboard can tell
        which version (and store) each server runs, and when that changed."""
        family = GaugeMetricFamily(
            "chatproto_build_info",
            "The chatproto running: its version, Python's, Twisted's, and its store (always 1).",
            labels=["version", "python", "twisted", "store"],
        )
        family.add_metric(
            [chatproto_version(), platform.python_version(), twisted_version(), self.store_kind], 1
        )
        return family

    @property
    def store_kind(self) -> str:
        store = getattr(self.store, "inner", self.store)  # a test's recording wrapper
        name = type(store).__name__.lower()
        for kind in ("sqlite", "postgres", "memory"):
            if kind in name:
                return kind
        return name


def _by_label(family, counts, label):
    for key, value in dict(counts).items():  # one atomic copy of the reactor thread's dict
        family.add_metric([label(key)], value)
    return family


class StoreFigures:
    """The store's histograms, made before the store so that it is built
    with ``committed`` as its ``on_commit``."""

    def __init__(self):
        self.transaction_seconds = Histogram(
            "chatproto_store_transaction_seconds",
            "Time one group-commit transaction took on the database thread.",
            buckets=TRANSACTION_BUCKETS,
            registry=None,
        )
        self.batch_operations = Histogram(
            "chatproto_store_batch_operations",
            "Operations committed together in one transaction (group commit batch size).",
            buckets=BATCH_BUCKETS,
            registry=None,
        )

    def committed(self, operations: int, seconds: float) -> None:
        """Once per transaction, not per frame: a locked observe is cheap enough."""
        self.transaction_seconds.observe(seconds)
        self.batch_operations.observe(operations)


class Metrics:
    """The registry of one server: its collector, the store's histograms and
    the process's own figures (CPU, memory, file descriptors)."""

    def __init__(self, factory, domain, store, figures: StoreFigures):
        self.registry = CollectorRegistry(auto_describe=True)
        path = getattr(store, "path", ":memory:")
        self.queued = QueuedMessages(path) if path != ":memory:" else None
        self.registry.register(ChatCollector(factory, domain, store, self.queued))
        ProcessCollector(registry=self.registry)
        self.registry.register(figures.transaction_seconds)
        self.registry.register(figures.batch_operations)

    def site(self) -> Site:
        # Imported here: it imports the global reactor, which must not be
        # installed by merely importing this module (twist installs its own).
        from prometheus_client.twisted import MetricsResource

        root = Resource()
        root.putChild(b"metrics", MetricsResource(self.registry))
        return MetricsSite(root)

    def close(self) -> None:
        if self.queued is not None:
            self.queued.close()


class MetricsSite(Site):
    """A scrape every few seconds would drown the chat's log in access lines."""

    noisy = False

    def log(self, request):
        pass
