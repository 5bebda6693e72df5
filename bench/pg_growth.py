"""How the PostgreSQL tables grow: the figures behind docs/scaling.md's path past one database.

Starts a throwaway PostgreSQL cluster and one ``twist chat`` node on it, then
sends direct messages to online users (delivered: their holds end) and to
offline users (held), and group messages; prints rows and bytes (table and
indexes, after VACUUM) per table, and per message.

    python bench/pg_growth.py [--messages 50000]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from loadgen import login, read_exactly, register  # noqa: E402

from tests.postgres import PostgresCluster, find_bin_dir, free_port  # noqa: E402


def frame_05(src: bytes, dst: bytes, ts: int, text: bytes) -> bytes:
    return b"05" + src + dst + b"%010d" % ts + text.ljust(256 - 38, b"\0")


def send_all(sock: socket.socket, data: bytes) -> threading.Thread:
    """Send from a thread: the server stops reading a sender that leaves its 07s unread."""
    t = threading.Thread(target=sock.sendall, args=(data,))
    t.start()
    return t


def drain(sock: socket.socket, size: int) -> None:
    got = 0
    while got < size:
        chunk = sock.recv(min(1 << 20, size - got))
        if not chunk:
            raise RuntimeError("the server closed the connection")
        got += len(chunk)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=50_000, help="messages of each kind (default 50000)")
    n = ap.parse_args().messages
    import psycopg

    cluster = PostgresCluster(find_bin_dir())
    cluster.init()
    cluster.start()
    node = None
    try:
        dsn = cluster.create_database()
        port = free_port()
        node = subprocess.Popen(
            [sys.executable, "-m", "twisted", "chat", "--port", f"tcp:{port}:interface=127.0.0.1"]
            + ["--db", dsn, "--max-frame-rate", "0"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.05)
        alice, bob, carol = register(port, 3)
        members = register(port, 9)
        sa, sb = login(port, alice), login(port, bob)
        started = time.monotonic()
        # Online: alice → bob, each one delivered (bob's hold ends) and confirmed (alice's 07).
        sending = send_all(
            sa, b"".join(frame_05(alice, bob, 1_700_000_000 + i, b"online %d" % i) for i in range(n))
        )
        reading = threading.Thread(target=drain, args=(sb, 256 * n))
        reading.start()
        drain(sa, 25 * n)
        sending.join()
        reading.join()
        # Offline: alice → carol, held.
        sa.sendall(b"".join(frame_05(alice, carol, 1_700_000_000 + i, b"held %d" % i) for i in range(n)))
        # A group of ten (alice and nine offline members): every message held nine times.
        sa.sendall(b"10" + alice + b"%010d" % 1_700_000_000 + b"09" + b"".join(members))
        header = read_exactly(sa, 27 + 13 * 10)
        group = header[2:15]
        sa.sendall(
            b"".join(frame_05(alice, group, 1_700_000_000 + i, b"group %d" % i) for i in range(n // 10))
        )
        sa.sendall(frame_05(alice, bob, 1_800_000_000, b"marker"))
        drain(sb, 256)
        seconds = time.monotonic() - started
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
            sizes = conn.execute(
                "SELECT c.relname, pg_relation_size(c.oid), pg_indexes_size(c.oid) "
                "FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace "
                "WHERE s.nspname = 'public' AND c.relkind = 'r' ORDER BY pg_total_relation_size(c.oid) DESC"
            ).fetchall()
            rows = [
                (name, conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0], table, indexes)
                for name, table, indexes in sizes
            ]
        messages = 2 * n + n // 10 + 1
        print(
            f"{messages} messages in {seconds:.1f} s ({n} delivered online, {n} held for one offline user, "
        )
        print(f"{n // 10} to a group of ten held for nine offline members)\n")
        print("| table | rows | table bytes | index bytes | bytes per row (all) |")
        print("|---|---:|---:|---:|---:|")
        for name, count, table, indexes in rows:
            per = f"{(table + indexes) / count:.0f}" if count > 0 else "-"
            print(f"| {name} | {count:,} | {table:,} | {indexes:,} | {per} |")
    finally:
        if node is not None:
            node.terminate()
            node.wait(timeout=30)
        cluster.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
