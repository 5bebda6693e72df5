"""``--metrics``: the collector on a fake transport, and the endpoint of a real server.

The end-to-end test scrapes ``/metrics`` over HTTP before and after two
clients talk and checks each counter moved by exactly what they did.
"""

from __future__ import annotations

import select
import signal
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from chatproto.metrics import Metrics, QueuedMessages, StoreFigures
from chatproto.version import chatproto_version

from .helpers import f_online, f_send, s_delivered, s_error, s_message, ts
from .test_e2e_server import DEADLINE, free_port

# -- the collector, in process ---------------------------------------------


def sample(metrics: Metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_build_info_names_the_versions_and_the_store(make_net):
    import platform

    import twisted
    from chatproto.version import chatproto_version

    net = make_net("sqlite")
    metrics = Metrics(net.factory, net.domain, net.store.inner, StoreFigures())
    labels = {
        "version": chatproto_version(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "store": "sqlite",
    }
    assert sample(metrics, "chatproto_build_info", **labels) == 1
    assert chatproto_version() != "unknown"


def test_the_collector_reports_the_counters_and_state(make_net):
    figures = StoreFigures()
    net = make_net("sqlite", on_commit=figures.committed)
    store = net.store.inner
    metrics = Metrics(net.factory, net.domain, store, figures)
    transactions = operations = 0  # the store is built with the hook: the load counts too
    a, _ = net.register()
    b, _ = net.register()
    ca = net.online(a)
    assert sample(metrics, "chatproto_connections_open") == 1
    assert sample(metrics, "chatproto_users_online") == 1
    # Three messages for b while b is offline, then b logs in: the flush
    # writes them as one buffer, and each frame counts.
    ca.send(*(f_send(a, b, ts(100 + i), b"m%d" % i) for i in range(3)))
    ca.take()
    assert metrics.queued is not None and metrics.queued.value() == 3
    cb = net.online(b)
    assert cb.held == [s_message(a, b, ts(100 + i), b"m%d" % i) for i in range(3)]
    assert ca.take() == [s_delivered(b, ts(100 + i)) for i in range(3)]
    ca.send(f_send(b, a, ts(1), b"spoof"), f_online(b"x" * 13))
    assert ca.take() == [s_error(b"05", b"05"), s_error(b"03", b"01")]

    assert sample(metrics, "chatproto_frames_received_total", code="01") == 2
    assert sample(metrics, "chatproto_frames_received_total", code="03") == 3
    assert sample(metrics, "chatproto_frames_received_total", code="05") == 4
    assert sample(metrics, "chatproto_frames_sent_total", code="02") == 2
    assert sample(metrics, "chatproto_frames_sent_total", code="04") == 2
    assert sample(metrics, "chatproto_frames_sent_total", code="06") == 3
    assert sample(metrics, "chatproto_frames_sent_total", code="07") == 3
    assert sample(metrics, "chatproto_frames_sent_total", code="12") == 2
    assert sample(metrics, "chatproto_errors_total", reason="wrong_src") == 1
    assert sample(metrics, "chatproto_errors_total", reason="malformed") == 1
    assert sample(metrics, "chatproto_errors_total", reason="busy") == 0
    assert sample(metrics, "chatproto_connections_open") == 2
    assert sample(metrics, "chatproto_users_online") == 2
    assert sample(metrics, "chatproto_slow_reader_backlog_bytes") == 0
    assert sample(metrics, "chatproto_store_queue_operations") == 0
    # Every commit went through the store's hook.
    committed = sample(metrics, "chatproto_store_transaction_seconds_count")
    assert committed == store.transactions - transactions > 0
    assert sample(metrics, "chatproto_store_batch_operations_sum") == store.operations - operations
    metrics.close()


def test_a_paused_reader_counts_as_backlog(make_net):
    net = make_net()
    metrics = Metrics(net.factory, net.domain, net.store.inner, StoreFigures())
    a, _ = net.register()
    ca = net.online(a)
    ca.proto.pauseProducing()
    ca.send(f_send(a, a, ts(1), b"to myself"))
    net.settle()
    assert sample(metrics, "chatproto_slow_reader_backlog_bytes") == 256 + 25
    assert metrics.queued is None, "a MemoryStore has no file to count in"
    assert sample(metrics, "chatproto_messages_queued") is None


def test_queued_messages_are_counted_at_most_once_per_refresh(make_net):
    net = make_net("sqlite")
    now = [0.0]
    queued = QueuedMessages(net.path, refresh=5.0, clock=lambda: now[0])
    a, _ = net.register()
    b, _ = net.register()
    assert queued.value() == 0
    ca = net.online(a)
    ca.send(f_send(a, b, ts(1), b"one"), f_send(a, b, ts(2), b"two"))
    ca.take()
    now[0] = 4.9
    assert queued.value() == 0, "served from the cache"
    now[0] = 5.0
    assert queued.value() == 2
    net.online(b)
    now[0] = 10.0
    assert queued.value() == 0
    queued.close()


def test_a_missing_database_gives_no_sample_rather_than_an_error(tmp_path):
    queued = QueuedMessages(str(tmp_path / "nothing-here.sqlite3"))
    assert queued.value() is None
    queued.close()


# -- a real server ---------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample at /metrics, keyed by (name, sorted labels)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=DEADLINE) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain")
                text = r.read().decode()
            break
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def wait_for(port: int, name: str, expected: float, **labels) -> dict:
    """Gauges follow events the server sees a little after the client acts (a close)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        samples = scrape(port)
        if value(samples, name, **labels) == expected or time.monotonic() > deadline:
            assert value(samples, name, **labels) == expected, name
            return samples
        select.select([], [], [], 0.02)


def test_the_endpoint_moves_with_two_clients_chatting(server):  # noqa: F811 - the fixture
    mport = free_port()
    srv = server("--metrics", f"tcp:{mport}:interface=127.0.0.1")
    setup = srv.client()
    a, b = setup.register(), setup.register()
    setup.close()
    before = wait_for(mport, "chatproto_connections_open", 0)
    assert value(before, "chatproto_users_online") == 0
    (build,) = [labels for name, labels in before if name == "chatproto_build_info"]
    assert dict(build)["store"] == "sqlite" and dict(build)["version"] == chatproto_version()
    assert value(before, "chatproto_frames_received_total", code="01") == 2
    assert value(before, "chatproto_frames_sent_total", code="02") == 2

    ca, cb = srv.client(), srv.client()
    ca.login(a)
    cb.login(b)
    n_ab, n_ba = 5, 3
    ca.send(*(f_send(a, b, ts(1700000100 + i), b"a to b %d" % i) for i in range(n_ab)))
    assert cb.read(n_ab) == [s_message(a, b, ts(1700000100 + i), b"a to b %d" % i) for i in range(n_ab)]
    assert ca.read(n_ab) == [s_delivered(b, ts(1700000100 + i)) for i in range(n_ab)]
    cb.send(*(f_send(b, a, ts(1700000200 + i), b"b to a %d" % i) for i in range(n_ba)))
    assert ca.read(n_ba) == [s_message(b, a, ts(1700000200 + i), b"b to a %d" % i) for i in range(n_ba)]
    assert cb.read(n_ba) == [s_delivered(a, ts(1700000200 + i)) for i in range(n_ba)]
    during = scrape(mport)
    assert value(during, "chatproto_connections_open") == 2
    assert value(during, "chatproto_users_online") == 2

    # Bad frames: a 05 from someone else, a 03 with letters for an id.
    ca.send(f_send(b, a, ts(1), b"spoof"), f_online(b"not-a-number!"))
    assert ca.read(2) == [s_error(b"05", b"05"), s_error(b"03", b"01")]
    cb.close()
    after = wait_for(mport, "chatproto_users_online", 1)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("chatproto_frames_received_total", code="03") == 3
    assert moved("chatproto_frames_received_total", code="05") == n_ab + n_ba + 1
    assert moved("chatproto_frames_received_total", code="01") == 0
    assert moved("chatproto_frames_sent_total", code="04") == 2
    assert moved("chatproto_frames_sent_total", code="06") == n_ab + n_ba
    assert moved("chatproto_frames_sent_total", code="07") == n_ab + n_ba
    assert moved("chatproto_frames_sent_total", code="12") == 2
    assert moved("chatproto_errors_total", reason="wrong_src") == 1
    assert moved("chatproto_errors_total", reason="malformed") == 1
    assert moved("chatproto_errors_total", reason="unknown_user") == 0
    assert value(after, "chatproto_connections_open") == 1
    # Each direction's messages are recorded (a read's run to an online
    # reader in one operation), in however many transactions.
    assert moved("chatproto_store_batch_operations_sum") >= 2
    assert moved("chatproto_store_transaction_seconds_count") >= 1
    assert value(after, "chatproto_messages_queued") == 0
    assert value(after, "process_resident_memory_bytes") > 0


def test_the_endpoint_counts_messages_queued_for_an_offline_user(server):  # noqa: F811
    mport = free_port()
    srv = server("--metrics", str(mport))  # a bare port: every interface
    conn = srv.client()
    a, b = conn.register(), conn.register()
    conn.login(a)
    conn.send(*(f_send(a, b, ts(1700000300 + i), b"later %d" % i) for i in range(4)))
    conn.send(f_send(a, a, ts(1700000400), b"sync"))  # answered after the four are committed
    assert conn.read(2) == [s_message(a, a, ts(1700000400), b"sync"), s_delivered(a, ts(1700000400))]
    assert value(scrape(mport), "chatproto_messages_queued") == 4


def test_metrics_are_off_unless_asked_for(server):  # noqa: F811
    srv = server()
    srv.client().register()
    assert srv.stop() in (0, -signal.SIGTERM)
    assert b"metrics at" not in srv.log.read_bytes()
