"""The PostgreSQL store as a cluster sees it: events through the listener,
several nodes on one database, sessions, low marks, the schema, a restart.

Each test runs a real reactor of its own (a SelectReactor, iterated until
what it waits for happens), since the listener is a socket the reactor
watches; stores of several "nodes" share it and one fresh database.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest
from twisted.internet.selectreactor import SelectReactor
from twisted.python.failure import Failure

from chatproto.store import (
    DUPLICATE_DELIVERED,
    HELD_ADDED,
    HELD_DELIVERED,
    HELD_LEFT,
    HELD_MESSAGE,
    HELD_SEEN,
    HELD_SUBJECT,
    SUPERSEDED,
    Completed,
    DatabaseTooNew,
    GroupAdded,
    Held,
    Reconnected,
    Released,
    StoreUnavailable,
    Takeover,
    UserAdded,
)

psycopg = pytest.importorskip("psycopg")
from chatproto.store.postgres import SCHEMA_VERSION, PostgresStore, schema_sql  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_logged_failures")

A, B, C, D = "0000000000001", "0000000000002", "0000000000003", "0000000000004"
G = "1000000000001"


class Cluster:
    """Nodes on one database and one real reactor, and ways to wait on them."""

    def __init__(self, dsn):
        self.dsn = dsn
        self.reactor = SelectReactor()
        self.nodes: list[Node] = []

    def node(self, name=None, listen=True) -> Node:
        node = Node(self, PostgresStore(self.dsn, self.reactor, node=name))
        self.nodes.append(node)
        if listen:
            self.run(node.store.listen(node.events.append))
        return node

    def until(self, done, limit=15.0, what="the condition"):
        """Iterate the reactor until ``done()``; no sleeping past what the reactor waits for."""
        deadline = time.monotonic() + limit
        while True:
            self.reactor.runUntilCurrent()
            if done():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            due = self.reactor.timeout()
            self.reactor.doIteration(min(left, 1.0 if due is None else due))

    def outcome(self, d):
        box = []
        d.addBoth(box.append)
        self.until(lambda: box, what="a Deferred")
        return box[0]

    def run(self, d):
        result = self.outcome(d)
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def close(self):
        for node in self.nodes:
            self.run(node.store.close())
        self.reactor.waker.connectionLost(None)


class Node:
    def __init__(self, cluster: Cluster, store: PostgresStore):
        self.cluster = cluster
        self.store = store
        self.events: list = []

    def __getattr__(self, name):
        """``node.inbox(B)`` calls the store and waits for the answer."""
        method = getattr(self.store, name)
        return lambda *args: self.cluster.run(method(*args))

    def synced(self) -> list:
        """Every event committed so far, as this node's listener got them."""
        self.sync()
        return self.events


@pytest.fixture
def cluster(pg_dsn):
    c = Cluster(pg_dsn)
    yield c
    c.close()


def held(user, code, src, dst, ts, text=None, msg_id=None):
    """A Held event without its seq, to compare (seqs are checked against the inbox)."""
    return (user, code, src, dst, ts, text, msg_id)


def without_seq(events):
    return [
        held(e.user, e.item.code, e.item.src, e.item.dst, e.item.ts, e.item.text, e.item.msg_id)
        if isinstance(e, Held)
        else e
        for e in events
    ]


def test_events_arrive_in_commit_order_with_their_fields(cluster):
    n = cluster.node()
    n.add_user(A, None)
    n.add_user(B, "ab" * 32)
    recorded = n.record_message(A, B, 100, "héllo".encode(), [B])
    assert n.mark_delivered(B, [recorded.msg_id]) == [Completed(A, B, 100)]
    n.add_group(G, 110, [A, B, C], [B, C])
    assert without_seq(n.synced()) == [
        UserAdded(A, None),
        UserAdded(B, "ab" * 32),
        held(B, HELD_MESSAGE, A, B, 100, "héllo".encode(), recorded.msg_id),
        held(A, HELD_DELIVERED, "", B, 100),
        GroupAdded(G, [A, B, C]),
        held(B, HELD_ADDED, "", G, 110, (A + B + C).encode()),
        held(C, HELD_ADDED, "", G, 110, (A + B + C).encode()),
    ]
    (delivered,) = n.inbox(A)
    assert n.events[3].item == delivered, "the event carries the committed row, seq and all"
    assert [e.item for e in n.events if isinstance(e, Held) and e.user == C] == n.inbox(C)


def test_every_node_hears_every_change_and_sync_covers_the_others(cluster):
    n1, n2 = cluster.node(), cluster.node()
    n2.add_user(A, None)
    n2.hold(A, HELD_SEEN, B, "", 5)
    assert without_seq(n1.synced()) == [UserAdded(A, None), held(A, HELD_SEEN, B, "", 5)]
    assert n1.events == n2.synced()


def test_a_message_that_completes_when_recorded_holds_the_senders_07(cluster):
    n = cluster.node()
    alone = n.record_message(A, G, 100, b"alone", [])
    assert alone.complete
    pending = n.record_message(A, B, 200, b"hi", [B])
    n.mark_delivered(B, [pending.msg_id])
    late = n.record_message(A, B, 200, b"hi", [B])
    assert (late.status, late.complete) == (DUPLICATE_DELIVERED, True)
    assert [(i.code, i.dst, i.ts) for i in n.inbox(A)] == [
        (HELD_DELIVERED, G, 100),
        (HELD_DELIVERED, B, 200),
        (HELD_DELIVERED, B, 200),
    ], "a resend of a delivered message is owed its 07 again"
    assert [e.item for e in n.synced() if e.user == A] == n.inbox(A)


def test_long_text_fits_a_notification(cluster):
    n = cluster.node()
    text = ("é" * 108 + "ab").encode()
    n.record_message(A, B, 1, text, [B])
    (event,) = n.synced()
    assert event.item.text == text


def test_two_nodes_ending_holds_together_complete_each_message_once(cluster):
    """Both nodes end holds of the same messages at once, in opposite orders:
    each message's remaining count is right, whichever commits first."""
    n1, n2 = cluster.node(listen=False), cluster.node(listen=False)
    ids = [n1.record_message(A, G, ts, b"to the group", [B, C, D]).msg_id for ts in range(1, 41)]
    first = [n1.store.mark_reached(msg_id, [B]) for msg_id in ids]
    second = [n2.store.mark_reached(msg_id, [C, D]) for msg_id in reversed(ids)]
    again = [n2.store.mark_delivered(B, ids)]
    completed = [done for d in first + second + again for done in cluster.run(d)]
    assert sorted(completed) == sorted(Completed(A, G, ts) for ts in range(1, 41))
    assert sorted(i.ts for i in n1.inbox(A)) == list(range(1, 41)), "one 07 each"
    assert n1.inbox(B) == n1.inbox(C) == n1.inbox(D) == []


def test_the_same_hold_ended_on_two_nodes_completes_once(cluster):
    n1, n2 = cluster.node(listen=False), cluster.node(listen=False)
    msg_id = n1.record_message(A, B, 1, b"twice", [B]).msg_id
    both = [n1.store.mark_delivered(B, [msg_id]), n2.store.acknowledge(B, A, B, 1)]
    assert [c for d in both for c in cluster.run(d)] == [Completed(A, B, 1)]


def test_a_session_claimed_on_another_live_node_is_taken_over(cluster):
    n1, n2 = cluster.node(), cluster.node()
    assert n1.claim_session(A) is None
    assert n1.claim_session(A) is None, "a node does not take over from itself"
    assert n2.claim_session(A) == n1.store.node
    assert n1.synced()[-1] == Takeover(A, n1.store.node, n2.store.node)
    n1.release_session(A)
    assert n2.synced()[-1] == Released(A, n1.store.node)
    assert n2.claim_session(A) is None, "the release left n2's claim in place"
    n2.release_session(A)
    assert n1.claim_session(A) is None


def test_a_claim_for_an_earlier_login_leaves_a_later_one_in_place(cluster):
    """Node 1's claim commits last but is for the older login: it is superseded."""
    n1, n2 = cluster.node(), cluster.node()
    assert n2.claim_session(A, 2000.5) is None
    assert n1.claim_session(A, 2000.4) is SUPERSEDED
    assert not [e for e in n2.synced() if isinstance(e, Takeover)]
    assert n2.claim_session(A, 2001.0) is None, "n2 still holds the user"
    assert n1.claim_session(A, 2002.0) == n2.store.node, "a later login on n1 takes over"


def test_a_claim_no_longer_wanted_changes_nothing(cluster):
    n1, n2 = cluster.node(), cluster.node()
    assert n2.claim_session(A) is None
    assert n1.claim_session(A, None, lambda: False) is None
    assert not [e for e in n2.synced() if isinstance(e, Takeover)]
    assert n2.claim_session(A) is None, "n2 still holds the user"


def test_a_dead_nodes_session_is_taken_without_a_takeover(cluster):
    n1, gone, never = cluster.node(), cluster.node(), cluster.node(listen=False)
    gone.claim_session(A)
    never.claim_session(B)
    cluster.run(gone.store.close())
    cluster.nodes.remove(gone)
    assert n1.claim_session(A) is None, "a closed node's listener no longer holds its lock"
    assert n1.claim_session(B) is None, "a node that never listened is not alive"
    assert not [e for e in n1.synced() if isinstance(e, Takeover)]
    with psycopg.connect(cluster.dsn) as conn:
        query = "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))"
        assert conn.execute(query, (gone.store.node,)).fetchone() == (True,), "checking left it free"


#: A node in a process of its own: it listens, claims two sessions, says so, and runs.
_NODE = """
import sys
from twisted.internet import reactor
from chatproto.store.postgres import PostgresStore
store = PostgresStore(sys.argv[1], reactor, node="killed")
d = store.listen(lambda event: None)
d.addCallback(lambda _: store.claim_session(sys.argv[2]))
d.addCallback(lambda _: store.claim_session(sys.argv[3]))
d.addCallback(lambda _: print("ready", flush=True))
reactor.run()
"""


def test_a_node_killed_with_sigkill_is_seen_dead(cluster):
    """Its liveness lock goes with its connection, however the process ends."""
    n1 = cluster.node()
    args = [sys.executable, "-c", _NODE, cluster.dsn, A, B]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        assert n1.claim_session(A) == "killed", "alive while it runs"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    with psycopg.connect(cluster.dsn) as conn:
        # Returns once the database has seen the connection go (at once, usually).
        conn.execute("SET lock_timeout = '10s'")
        conn.execute("SELECT pg_advisory_lock(hashtextextended('killed', 0))")
        # Let go here: a close is processed by the database after it returns,
        # and the claim below would race it.
        conn.execute("SELECT pg_advisory_unlock(hashtextextended('killed', 0))")
    assert n1.claim_session(B) is None, "a killed node's session is taken without a takeover"
    assert [e for e in n1.synced() if isinstance(e, Takeover)] == [Takeover(A, "killed", n1.store.node)]


def test_read_group_moves_the_low_mark_and_holds_a_09_for_every_member(cluster):
    n = cluster.node()
    n.add_group(G, 1, [A, B, C], [])
    n.record_message(A, G, 100, b"one", [B, C])
    n.record_message(B, G, 200, b"two", [A, C])
    n.record_message(C, G, 200, b"same time", [A, B])
    assert n.read_group(G, B, 150) is None, "C has not read 100 yet"
    assert n.read_group(G, C, 250) == 100
    assert n.read_group(G, A, 300) is None, "B has not read C's 200"
    assert n.read_group(G, A, 50) is None
    assert n.read_group(G, B, 200) == 200
    snapshot = n.load()
    assert snapshot.low_marks == {G: 200}
    assert snapshot.read_marks[G] == {A: 300, B: 200, C: 250}, "a read mark never goes back"
    seen = without_seq(e for e in n.synced() if isinstance(e, Held) and e.item.code == HELD_SEEN)
    assert seen == [held(m, HELD_SEEN, G, "", ts) for ts in (100, 200) for m in (A, B, C)]
    assert n.read_group("1999999999999", A, 5) is None, "an unknown group"


def test_lookup_finds_users_and_groups_among_ids(cluster):
    n = cluster.node(listen=False)
    n.add_user(A, None)
    n.add_user(B, "cd" * 32)
    n.add_group(G, 1, [B, A], [])
    assert n.lookup([A, B, G, C]) == ({A: None, B: "cd" * 32}, {G: [B, A]})
    assert n.lookup([]) == ({}, {})


def test_a_refused_row_fails_its_operation_alone(cluster):
    n = cluster.node()
    n.add_user(A, None)
    ds = [n.store.add_user(A, "ab" * 32), n.store.add_user(B, None), n.store.add_group(G, 1, [A, B], [B])]
    twice, fine, group = (cluster.outcome(d) for d in ds)
    assert isinstance(twice, Failure) and twice.check(psycopg.IntegrityError)
    assert (fine, group) == (None, None)
    assert n.load().users == {A: None, B: None}
    assert [type(e) for e in n.synced()] == [UserAdded, UserAdded, GroupAdded, Held], (
        "no event of the refused"
    )


def test_the_schema_is_made_once_by_nodes_starting_together(cluster):
    errors = []

    def start():
        try:
            PostgresStore(cluster.dsn, cluster.reactor).close()
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with psycopg.connect(cluster.dsn) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert conn.execute("SELECT version, previous FROM schema_history").fetchall() == [
            (SCHEMA_VERSION, None)
        ]


def test_a_database_from_a_newer_chatproto_is_refused(cluster):
    cluster.node(listen=False)
    with psycopg.connect(cluster.dsn) as conn:
        conn.execute("UPDATE schema_version SET version = version + 1")
    with pytest.raises(DatabaseTooNew, match=f"version {SCHEMA_VERSION + 1}, newer than .* {SCHEMA_VERSION}"):
        PostgresStore(cluster.dsn, cluster.reactor)


def test_a_database_restart_is_survived(cluster, postgres):
    n = cluster.node()
    n.add_user(A, None)
    n.synced()
    postgres.stop()
    try:
        down = cluster.outcome(n.store.add_user(B, None))
        assert isinstance(down, Failure) and down.check(StoreUnavailable)
    finally:
        postgres.start()
    n.add_user(B, None)
    cluster.until(lambda: Reconnected() in n.events, what="the listener to reconnect")
    n.add_user(C, None)
    after = n.synced()[n.events.index(Reconnected()) :]
    assert after[-1] == UserAdded(C, None)
    assert set(n.load().users) == {A, B, C}


def test_a_restart_between_batches_costs_nothing_but_the_listeners_events(cluster, postgres):
    """A connection that died while idle is made again for the batch that finds it dead;
    the listener comes back on its own, and a sync fails while it is away."""
    n = cluster.node()
    n.add_user(A, None)
    n.synced()
    postgres.restart()
    n.add_user(B, None)
    cluster.until(lambda: n.store._listener.conn is None, what="the listener to notice")
    away = cluster.outcome(n.store.sync())
    assert isinstance(away, Failure) and away.check(StoreUnavailable)
    cluster.until(lambda: Reconnected() in n.events, what="the listener to reconnect")
    n.add_user(C, None)
    assert n.synced()[-1] == UserAdded(C, None)


def test_a_listener_reconnecting_ends_its_own_lost_connection(cluster):
    """A lost connection the database has not noticed still holds the node's lock:
    coming back, the listener ends it instead of waiting for the database to notice."""
    n = cluster.node()
    lock = "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
    with psycopg.connect(cluster.dsn, autocommit=True) as admin:
        (listener,) = admin.execute(lock).fetchone()
        stale = psycopg.connect(cluster.dsn, autocommit=True)  # stands for the lost connection
        admin.execute("SELECT pg_terminate_backend(%s)", (listener,))
        # The node's lock passes to the stand-in while the listener is away (it waits 0.5 s).
        stale.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (n.store.node,))
        cluster.until(lambda: Reconnected() in n.events, what="the listener to reconnect")
        with pytest.raises(psycopg.OperationalError, match="terminating connection"):
            stale.execute("SELECT 1")
        stale.close()
    n.add_user(A, None)
    assert n.synced()[-1] == UserAdded(A, None)


def test_a_store_needs_its_database_to_start(cluster, postgres):
    with pytest.raises(StoreUnavailable, match="no_such_database"):
        PostgresStore(postgres.dsn("no_such_database"), cluster.reactor)


# -- groups people manage, across nodes ------------------------------------------------


def test_group_changes_are_events_every_node_hears_with_what_they_held(cluster):
    one, two = cluster.node("one"), cluster.node("two")
    one.add_group(G, 110, [A, B], [])
    one.set_subject(G, A, 120, "Trio ü".encode(), [])
    change = one.add_members(G, 130, [C], [])
    assert change.members == [A, B, C] and change.subject.name == "Trio ü".encode()
    two.leave_group(G, B, 140, [])
    events = without_seq(one.synced())
    assert events[0] == GroupAdded(G, [A, B])
    assert events[1:3] == [held(u, HELD_SUBJECT, A, G, 120, "Trio ü".encode()) for u in (A, B)]
    abc = (A + B + C).encode()
    assert events[3:8] == [
        GroupAdded(G, [A, B, C]),
        held(A, HELD_ADDED, "", G, 130, abc),
        held(B, HELD_ADDED, "", G, 130, abc),
        held(C, HELD_ADDED, "", G, 130, abc),
        held(C, HELD_SUBJECT, A, G, 120, "Trio ü".encode()),
    ]
    assert events[8:] == [
        GroupAdded(G, [A, C]),
        held(B, HELD_LEFT, "", G, 140),
        held(A, HELD_ADDED, "", G, 140, (A + C).encode()),
        held(C, HELD_ADDED, "", G, 140, (A + C).encode()),
    ]
    assert without_seq(two.synced()) == events
    # A node that never saw the group finds it, and a group everyone left is still one.
    two.leave_group(G, A, 150, [])
    two.leave_group(G, C, 151, [])
    assert cluster.node("three").lookup([G]) == ({}, {G: []})


def test_a_leaver_who_had_not_read_moves_the_low_mark_for_the_rest(cluster):
    n = cluster.node()
    n.add_group(G, 1, [A, B, C], [])
    n.record_message(A, G, 100, b"read me", [B, C])
    assert n.read_group(G, B, 100) is None
    n.leave_group(G, C, 110, [])
    assert n.load().low_marks == {G: 100}
    nines = [e for e in without_seq(n.synced()) if isinstance(e, tuple) and e[1:2] == (HELD_SEEN,)]
    assert nines == [held(A, HELD_SEEN, G, "", 100), held(B, HELD_SEEN, G, "", 100)]


def test_an_added_member_starts_at_the_latest_message(cluster):
    n = cluster.node()
    n.add_group(G, 1, [A, B], [])
    n.record_message(A, G, 100, b"before", [B])
    assert n.add_members(G, 110, [C], []).read_mark == 100
    assert n.read_group(G, B, 100) == 100, "C does not hold the low mark back"


def test_a_first_schema_database_is_upgraded_with_its_data(cluster):
    with psycopg.connect(cluster.dsn) as conn:
        conn.execute(schema_sql(1))
        conn.execute("INSERT INTO schema_history (version, applied) VALUES (1, 1700000000)")
        conn.execute("INSERT INTO users VALUES (%s, NULL, 1), (%s, NULL, 1), (%s, NULL, 1)", (A, B, C))
        conn.execute("INSERT INTO groups VALUES (%s, 110, 110, 0)", (G,))
        conn.execute("INSERT INTO members VALUES (%s, %s, 0, 0), (%s, %s, 1, 0)", (G, A, G, B))
        conn.execute("INSERT INTO inbox (user_id, code, src, dst, ts) VALUES (%s, 11, '', %s, 110)", (B, G))
    n = cluster.node()
    with psycopg.connect(cluster.dsn) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        history = conn.execute("SELECT version, previous FROM schema_history ORDER BY applied").fetchall()
        assert history == [(1, None), (SCHEMA_VERSION, 1)]
    assert n.load().groups == {G: [A, B]}
    assert [(i.code, i.dst, i.ts, i.text) for i in n.inbox(B)] == [(HELD_ADDED, G, 110, None)]
    n.set_subject(G, A, 120, b"Upgraded", [A])
    n.add_members(G, 130, [C], [A])
    assert [(i.code, i.text) for i in n.inbox(C)] == [
        (HELD_ADDED, (A + B + C).encode()),
        (HELD_SUBJECT, b"Upgraded"),
    ]
    # Opening it again is no upgrade.
    cluster.node(listen=False)
    with psycopg.connect(cluster.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM schema_history").fetchone() == (2,)
