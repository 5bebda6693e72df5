"""What the SQL stores share: group commit, and the start-up snapshot.

Every operation submitted during one reactor turn (and while the previous
transaction is running) goes into one transaction on a single database
thread, so a burst of messages costs one commit, and each operation's
Deferred fires after that commit, on the reactor thread.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import nullcontext

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from . import DEFAULT_RETENTION, DUPLICATE_PENDING, Keeping, Retention, Snapshot, StoreUnavailable

#: Work per transaction at most (an operation counts one, a run of messages
#: one per message): enough to amortize a commit, few enough that one batch's
#: deliveries to one reader stay well under the server's congestion
#: threshold, and that latency stays in milliseconds.
MAX_BATCH = 2000


def nothing(*_):
    """The operation behind ``barrier``: its commit is the point."""


def load_snapshot(cur):
    """What the server reads at start-up, in SQL both databases run as it is."""
    users = dict(cur.execute("SELECT id, secret_hash FROM users"))
    groups: dict[str, list[str]] = {}
    read_marks: dict[str, dict[str, int]] = {}
    low_marks: dict[str, int] = {}
    for group_id, low in cur.execute("SELECT id, low_mark FROM groups"):
        groups[group_id] = []
        read_marks[group_id] = {}
        low_marks[group_id] = low
    for group_id, user_id, mark in cur.execute(
        "SELECT group_id, user_id, read_mark FROM members ORDER BY group_id, position"
    ):
        groups[group_id].append(user_id)
        if mark:
            read_marks[group_id][user_id] = mark
    held = dict(cur.execute("SELECT user_id, count(*) FROM inbox GROUP BY user_id"))
    return Snapshot(users, groups, read_marks, low_marks, held)


def record_delivered(store, cur, runs):
    """Messages already written to their reader (the hub's live path): stored
    with no hold. One that repeats a stored message adds nothing, and a hold
    it still had for its reader ends here, the reader having it now."""
    ops = store.ops
    items = [(src, dst, ts, text, ()) for src, dst, stamped in runs for ts, text in stamped]
    recorded = ops._record_messages(store, cur, items)
    held = [
        (r.msg_id, [item[1]])
        for r, item in zip(recorded, items, strict=True)
        if r.status == DUPLICATE_PENDING
    ]
    if held:
        ops._mark_reached(store, cur, held)
    return [None] * len(runs)


record_delivered.bulk = True


def _give_way() -> None:
    """Run on the database thread: lower its priority (nice 10), so that on a
    shared core the reactor's thread, woken by a read, takes the core from it
    at once instead of after the scheduler's slice. The database thread
    still gets every moment the reactor leaves, and once enough waits for it
    the server stops reading. Measured at 10,000 msg/s offered one per read,
    server on one core, three interleaved runs each: p50 1.5-2.3 ms instead
    of 5.7-13 ms, p99 17-22 ms instead of 18-64 ms."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass  # not Linux, or not allowed: the same server, with slower answers under load


class BatchingStore:
    """The queue, the database thread and the answers; a subclass runs the transaction.

    An operation is ``fn(cur, *args)``, or, when ``fn.bulk`` is set,
    ``fn(store, cur, [args, ...])`` for a run of consecutive calls, so that
    a burst goes to the database as one statement per table. A run of one
    with ``fn.alone`` set (housekeeping; PostgreSQL's login times) has a
    transaction of its own: whatever befalls it fails no frame's operation,
    and the row locks it takes never interleave with theirs.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        thread_name: str,
        answering=None,
        on_commit=None,
        retention: Retention = DEFAULT_RETENTION,
    ):
        """``answering``: entered around the answers of each commit (the server's
        cork, so that the frames they write go out as one write per connection).
        ``on_commit``: called on the reactor thread after each commit with
        (operations, seconds the transaction took), for the metrics.
        ``retention``: how long what was delivered is kept."""
        self._reactor = reactor
        #: The retention policy and housekeeping's progress, for the database thread.
        self.keeping = Keeping(retention)
        self.answering = answering if answering is not None else nullcontext()
        self.on_commit = on_commit
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=thread_name)
        self._pool.start()
        self._pool.callInThread(_give_way)
        self._queue: list[tuple] = []
        #: The queue's work, counted as MAX_BATCH counts it.
        self._queued = 0
        self._busy = False
        self._scheduled = False
        self._closing: Deferred | None = None
        self._waiting: list[Deferred] = []
        #: Figures for the benchmark and the logs: transactions and operations.
        self.transactions = 0
        self.operations = 0

    def _transaction(self, batch) -> tuple[list[tuple[bool, object]], float]:
        """Run on the database thread: the batch in one transaction, with
        ``_apply``; returns its results and the seconds it took."""
        raise NotImplementedError

    def _release(self) -> None:
        """Let go of the database, once the last transaction is done."""
        raise NotImplementedError

    def _call(self, fn, cur, args) -> tuple[bool, object]:
        """One operation; a subclass catches the errors that fail it alone."""
        return True, fn(cur, *args)

    def _submit(self, fn, *args, answer=None, weight=1) -> Deferred | None:
        """Queue an operation; its result goes to ``answer`` if given (anything
        with ``callback`` and ``errback``), else to the Deferred returned.
        ``weight``: the messages it carries, for the batch's size and the backlog."""
        d = Deferred() if answer is None else answer
        self._queue.append((fn, args, d, weight))
        self._queued += weight
        if not self._busy and not self._scheduled:
            self._scheduled = True
            self._reactor.callLater(0, self._run)
        return d if answer is None else None

    def _run(self):
        self._scheduled = False
        if self._busy or not self._queue:
            return
        queue = self._queue
        taken = cut = 0
        # A batch is a run of ordinary operations, or a run of one ``alone`` one.
        head = queue[0][0]
        lone = getattr(head, "alone", False)
        while cut < len(queue) and (cut == 0 or taken + queue[cut][3] <= MAX_BATCH):
            fn = queue[cut][0]
            if cut and (fn is not head if lone else getattr(fn, "alone", False)):
                break
            taken += queue[cut][3]
            cut += 1
        batch, self._queue = queue[:cut], queue[cut:]
        self._queued -= taken
        self._busy = True
        d = deferToThreadPool(self._reactor, self._pool, self._transaction, batch)
        d.addBoth(self._finished, batch)

    def _apply(self, cur, batch) -> list[tuple[bool, object]]:
        """Every operation of the batch on ``cur``, a run of a bulk one as one call."""
        results = []
        at, end = 0, len(batch)
        while at < end:
            fn, args, _, _ = batch[at]
            if getattr(fn, "bulk", False):
                stop = at + 1
                while stop < end and batch[stop][0] is fn:
                    stop += 1
                results.extend((True, r) for r in fn(self, cur, [op[1] for op in batch[at:stop]]))
                at = stop
                continue
            results.append(self._call(fn, cur, args))
            at += 1
        return results

    def _finished(self, outcome, batch):
        self._busy = False
        if isinstance(outcome, Failure):
            if outcome.check(StoreUnavailable):
                self.log.warn("store unavailable: {error}", error=outcome.value)
            else:
                self.log.failure("store transaction failed", outcome)
            for _, _, d, _ in batch:
                d.errback(outcome)
        else:
            results, seconds = outcome
            self.transactions += 1
            self.operations += len(batch)
            self.log.debug("committed {count} operations in {ms:.2f} ms", count=len(batch), ms=seconds * 1000)
            if self.on_commit is not None:
                self.on_commit(len(batch), seconds)
            with self.answering:
                for (ok, value), (_, _, d, _) in zip(results, batch, strict=True):
                    if ok:
                        d.callback(value)
                    else:
                        d.errback(value)
        if self._waiting and self._queued <= MAX_BATCH:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)
        if self._queue:
            self._scheduled = True
            self._reactor.callLater(0, self._run)
        elif self._closing is not None:
            self._shut()

    # -- IChatStore: each call is an operation of the subclass's module, ``ops``.

    #: The module holding the operations (``_add_user``, ``_record_messages``, ...).
    ops = None

    def load(self):
        return self._submit(self.ops._load)

    def add_user(self, user_id, secret_hash):
        return self._submit(self.ops._add_user, user_id, secret_hash)

    def add_group(self, group_id, ts, members, hold_for):
        return self._submit(self.ops._add_group, group_id, ts, list(members), list(hold_for))

    def set_subject(self, group_id, src, ts, name, online):
        return self._submit(self.ops._set_subject, group_id, src, ts, name, set(online))

    def add_members(self, group_id, ts, added, online):
        return self._submit(self.ops._add_members, group_id, ts, list(added), set(online))

    def leave_group(self, group_id, user_id, ts, online):
        return self._submit(self.ops._leave_group, group_id, user_id, ts, set(online))

    def record_message(self, src, dst, ts, text, recipients, answer=None):
        return self._submit(self.ops._record_messages, src, dst, ts, text, recipients, answer=answer)

    def record_delivered(self, src, dst, stamped, answer=None):
        return self._submit(self.ops._record_delivered, src, dst, stamped, answer=answer, weight=len(stamped))

    def latest_timestamp(self, src, dst):
        return self._submit(self.ops._latest_timestamp, src, dst)

    def mark_delivered(self, user_id, msg_ids):
        return self._submit(self.ops._mark_delivered, user_id, msg_ids)

    def mark_reached(self, msg_id, user_ids, answer=None):
        return self._submit(self.ops._mark_reached, msg_id, user_ids, answer=answer)

    def acknowledge(self, user_id, src, dst, ts):
        return self._submit(self.ops._acknowledge, user_id, src, dst, ts)

    def hold(self, user_id, code, src, dst, ts, text=None):
        return self._submit(self.ops._hold, user_id, code, src, dst, ts, text)

    def seen(self, user_id):
        return self._submit(self.ops._seen, user_id, int(time.time()))

    def sweep(self, now, online):
        return self._submit(self.ops._sweep, self.keeping, int(now), frozenset(online))

    def inbox(self, user_id, after=0, limit=None):
        return self._submit(self.ops._inbox, user_id, after, limit)

    def drop(self, user_id, seqs):
        return self._submit(self.ops._drop, user_id, list(seqs))

    def set_read_mark(self, group_id, user_id, ts):
        return self._submit(self.ops._set_read_mark, group_id, user_id, ts)

    def set_low_mark(self, group_id, ts):
        return self._submit(self.ops._set_low_mark, group_id, ts)

    def group_messages_since(self, group_id, ts):
        return self._submit(self.ops._group_messages_since, group_id, ts)

    @property
    def backlog(self):
        return self._queued

    def barrier(self):
        return self._submit(nothing)

    def caught_up(self):
        d = Deferred()
        if self._queued <= MAX_BATCH:
            d.callback(None)
        else:
            self._waiting.append(d)
        return d

    def close(self):
        if self._closing is None:
            self._closing = Deferred()
            if not self._busy and not self._queue:
                self._shut()
        d = Deferred()
        self._closing.addBoth(lambda r: (d.callback(None), r)[1])
        return d

    def _shut(self):
        self._pool.stop()
        self._release()
        self._closing.callback(None)
