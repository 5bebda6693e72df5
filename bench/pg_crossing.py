"""One message at a time between two nodes on one PostgreSQL: how long a
crossing takes when nothing else is going on (docs/scaling.md).

A on node 1 sends to B on node 2 and waits for B's 06, then for its own 07,
200 times; prints p50 and p90. ``--durable`` turns fsync and synchronous
commit on (the tests' throwaway cluster runs without them).

    python bench/pg_crossing.py [--durable]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.helpers import f_send, ts  # noqa: E402
from tests.postgres import PostgresCluster, find_bin_dir  # noqa: E402
from tests.test_e2e_server import Server  # noqa: E402


def summary(values: list[float]) -> str:
    return f"p50 {statistics.median(values):.2f} ms, p90 {sorted(values)[int(len(values) * 0.9)]:.2f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--durable", action="store_true", help="fsync and synchronous_commit on")
    durable = ap.parse_args().durable
    cluster = PostgresCluster(find_bin_dir())
    cluster.init()
    if durable:
        with open(cluster.data / "postgresql.conf", "a") as conf:
            conf.write("fsync = on\nsynchronous_commit = on\nfull_page_writes = on\n")
    cluster.start()
    logs = Path(tempfile.mkdtemp(prefix="chatproto-crossing-"))
    try:
        dsn = cluster.create_database()
        node1, node2 = Server(dsn, logs / "node1.log"), Server(dsn, logs / "node2.log")
        setup = node1.client()
        a, b = setup.register(), setup.register()
        ca, cb = node1.client(), node2.client()
        ca.login(a)
        cb.login(b)
        crossed, confirmed = [], []
        for i in range(200):
            started = time.perf_counter()
            ca.send(f_send(a, b, ts(1_700_000_000 + i), b"crossing %d" % i))
            cb.read(1)
            crossed.append((time.perf_counter() - started) * 1000)
            ca.read(1)
            confirmed.append((time.perf_counter() - started) * 1000)
        print(f"PostgreSQL {'durable' if durable else 'without fsync'}, 200 messages one at a time")
        print(f"05 on node 1 to 06 on node 2: {summary(crossed)}")
        print(f"05 on node 1 to its 07:       {summary(confirmed)}")
        node1.stop()
        node2.stop()
    finally:
        cluster.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
