"""The server's two halves measured apart, with no network: where the ceiling is.

    python bench/floor.py [--messages 50000] [--batch 2000] [--run 10] [--output bench/floor.txt]

1. The protocol alone: 100 sender→receiver pairs logged in to a real
   ChatFactory and Domain over transports that only count bytes, the memory
   store answering at once (its own bookkeeping, a few dict operations a
   message, counts here). Every 05 is parsed, routed, written as an 06,
   stored and answered with a 07, as in the server (each sender's messages
   in one read, the live way), but with no socket, no disk and no thread.
2. The SQLite store alone, through the store's own operations, ``--batch``
   messages per transaction (group commit), on this thread, in a file on
   disk: the live way (runs of ``--run`` messages stored as delivered, one
   operation a run) and the held way (each message recorded with a hold,
   the hold ended in the next transaction).

The server runs both on one core under one GIL, so its throughput cannot pass
1 / (1/protocol + 1/store); run.py's throughput workload shows how close it
gets once sockets and the reactor are added.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from chatproto.cork import Cork  # noqa: E402
from chatproto.domain import Domain  # noqa: E402
from chatproto.server import ChatFactory, Limits  # noqa: E402
from chatproto.store.memory import MemoryStore  # noqa: E402
from chatproto.store.sqlite import SQLiteStore  # noqa: E402

PAIRS = 100
TEXT = (b"x" * 200).ljust(218, b"\0")


class CountingTransport(StringTransport):
    """Keeps the byte count, not the bytes: writing costs next to nothing."""

    def __init__(self):
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
        self.written = 0

    def write(self, data):
        self.written += len(data)

    def value(self):
        raise AssertionError("this transport keeps no bytes")


def _login(factory, clock, transports):
    """A new account, online: 01 then 03 with the id its 02 carried."""
    spy = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
    proto = factory.buildProtocol(spy.getPeer())
    proto.makeConnection(spy)
    proto.dataReceived(b"01")
    clock.advance(0)
    user = spy.value()[2:15]
    proto.dataReceived(b"03" + user)
    clock.advance(0)
    counting = CountingTransport()
    proto.transport = counting  # from here on, only bytes are counted
    transports.append(counting)
    return proto, user


def protocol_alone(messages: int) -> float:
    clock = Clock()
    store = MemoryStore()
    domain = Domain(store)
    domain.load(store.load().result)
    factory = ChatFactory(domain, Cork(), clock, Limits(frame_rate=0))
    senders, receivers = [], []
    for _ in range(PAIRS):
        senders.append(_login(factory, clock, []))
        receivers.append(_login(factory, clock, []))
    each = messages // PAIRS
    reads = [
        (proto, b"".join(b"05" + src + dst + b"%010d" % (1700000000 + k) + TEXT for k in range(each)))
        for (proto, src), (_, dst) in zip(senders, receivers, strict=True)
    ]
    started = time.perf_counter()
    for proto, data in reads:
        proto.dataReceived(data)
    clock.advance(0)
    seconds = time.perf_counter() - started
    delivered = sum(proto.transport.written for proto, _ in receivers) // 256
    confirmed = sum(proto.transport.written for proto, _ in senders) // 25
    if delivered != each * PAIRS or confirmed != each * PAIRS:
        raise SystemExit(f"protocol alone: {delivered} 06 and {confirmed} 07 for {each * PAIRS} messages")
    return each * PAIRS / seconds


class _Still:
    """A reactor that never runs the store's batch: this script runs it."""

    def callLater(self, *args, **kwargs):
        pass

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


def store_alone(messages: int, batch: int, run: int, held: bool) -> tuple[float, float]:
    """Messages a second of the store thread's wall-clock time, and of its CPU
    time (the difference is waiting for the disk, which leaves the core free).

    The live way (the server's when the reader is online): runs of ``run``
    messages, each run one ``record_delivered``. The held way (a reader
    offline or behind): each message recorded with a hold, and the hold
    ended in the next transaction, as when the 06 is written after the commit.
    """
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(str(Path(tmp) / "floor.sqlite3"), _Still())
        users = [f"{n:013d}" for n in range(2 * PAIRS)]
        for user in users:
            store.add_user(user, None)
        _run(store)
        wall = cpu = 0.0
        reached: list = []
        text = TEXT.rstrip(b"\0")
        for first in range(0, messages, batch):
            last = min(first + batch, messages)
            if held:
                for msg_id, dst in reached:
                    store.mark_reached(msg_id, [dst])
                recorded = []
                for n in range(first, last):
                    src, dst = users[2 * (n % PAIRS)], users[2 * (n % PAIRS) + 1]
                    d = store.record_message(src, dst, 1700000000 + n, text, [dst])
                    d.addCallback(lambda result, dst, into: into.append((result.msg_id, dst)), dst, recorded)
                reached = recorded
            else:
                for start in range(first, last, run):
                    pair = (start // run) % PAIRS
                    src, dst = users[2 * pair], users[2 * pair + 1]
                    stamped = [(1700000000 + n, text) for n in range(start, min(start + run, last))]
                    store.record_delivered(src, dst, stamped)
            spent = _run(store)
            wall, cpu = wall + spent[0], cpu + spent[1]
        store._release()
        store._pool.stop()
    return messages / wall, messages / cpu


def _run(store) -> tuple[float, float]:
    """One transaction of everything queued, as the store's thread runs it: its
    wall-clock and CPU seconds. The answers (on the reactor in the server) are
    given after, untimed."""
    batch, store._queue, store._queued = store._queue, [], 0
    cpu = time.thread_time()
    results, wall = store._transaction(batch)
    cpu = time.thread_time() - cpu
    for (ok, value), (_, _, d, _) in zip(results, batch, strict=True):
        if not ok:
            raise SystemExit(f"store alone: an operation failed: {value}")
        d.callback(value)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=50000)
    parser.add_argument("--batch", type=int, default=2000, help="messages a commit (the store's most)")
    parser.add_argument("--run", type=int, default=10, help="messages a live run (one read's, to one reader)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(BENCH / "floor.txt"))
    args = parser.parse_args()

    def median(values):
        return sorted(values)[args.repeats // 2]

    protocol = median([protocol_alone(args.messages) for _ in range(args.repeats)])
    live = [store_alone(args.messages, args.batch, args.run, held=False) for _ in range(args.repeats)]
    held = [store_alone(args.messages, args.batch, args.run, held=True) for _ in range(args.repeats)]
    live_wall, live_cpu = median([w for w, _ in live]), median([c for _, c in live])
    held_wall, held_cpu = median([w for w, _ in held]), median([c for _, c in held])
    both = 1 / (1 / protocol + 1 / live_cpu)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=BENCH, capture_output=True, text=True
    ).stdout.strip()
    report = (
        f"$ python bench/floor.py --messages {args.messages} --batch {args.batch} --run {args.run}"
        f"   # commit {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
        f"medians of {args.repeats}, {PAIRS} pairs, {args.messages:,} messages of 218 bytes\n"
        f"protocol alone (memory store, no sockets): {protocol:,.0f} msg/s\n"
        f"SQLite store alone, live ({args.batch} a commit, runs of {args.run}):"
        f" {live_wall:,.0f} msg/s of its wall-clock time, {live_cpu:,.0f} msg/s of its CPU time\n"
        f"SQLite store alone, held ({args.batch} recorded and {args.batch} reached a commit):"
        f" {held_wall:,.0f} msg/s of its wall-clock time, {held_cpu:,.0f} msg/s of its CPU time\n"
        f"both on one core, live, at best (CPU times): {both:,.0f} msg/s\n"
    )
    print(report, end="")
    Path(args.output).write_text(report)


if __name__ == "__main__":
    main()
