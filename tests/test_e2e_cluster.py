"""End to end: two or three real ``twist chat`` nodes on one real PostgreSQL.

Every client here speaks raw frames to one node; what it gets must be what
one server would have sent.
"""

from __future__ import annotations

import select
import signal
import subprocess
import time

import pytest

from . import installed
from .helpers import (
    f_add,
    f_group,
    f_leave,
    f_online,
    f_online_secret,
    f_received,
    f_seen,
    f_send,
    f_subject,
    parse_server,
    s_added,
    s_delivered,
    s_error,
    s_left,
    s_message,
    s_seen_by,
    s_subject,
    ts,
)
from .test_e2e_server import free_port


@pytest.fixture(autouse=True)
def no_tracebacks(tmp_path):
    """Whatever a test does to the nodes or the database, no node may log a traceback."""
    yield
    for log in tmp_path.glob("server*.log"):
        text = log.read_text(errors="replace")
        assert "Traceback" not in text and "Unhandled" not in text, f"{log.name}:\n{text[-4000:]}"


def nodes(server, pg_dsn, count=2):
    return [server(db=pg_dsn) for _ in range(count)]


def test_users_on_two_nodes_talk_with_07_and_09(server, pg_dsn):
    a_node, b_node = nodes(server, pg_dsn)
    # Made on one node, used at once on the other: it asks the database.
    a = a_node.client().register()
    b = b_node.client().register()
    ca, cb = a_node.client(), b_node.client()
    ca.login(a)
    cb.login(b)
    ca.send(f_send(a, b, ts(1700000001), b"hi bob, from node A"))
    assert cb.read(1) == [s_message(a, b, ts(1700000001), b"hi bob, from node A")]
    assert ca.read(1) == [s_delivered(b, ts(1700000001))]
    cb.send(f_seen(a, ts(1700000001)))
    assert ca.read(1) == [s_seen_by(b, ts(1700000001))]
    cb.send(f_send(b, a, ts(1700000002), b"hi alice, from node B"))
    assert ca.read(1) == [s_message(b, a, ts(1700000002), b"hi alice, from node B")]
    assert cb.read(1) == [s_delivered(a, ts(1700000002))]


def test_many_messages_across_nodes_arrive_once_and_in_order(server, pg_dsn):
    a_node, b_node = nodes(server, pg_dsn)
    a, b = a_node.client().register(), a_node.client().register()
    ca, cb = a_node.client(), b_node.client()
    ca.login(a)
    cb.login(b)
    sent = [f_send(a, b, ts(1700000100 + i), b"number %d" % i) for i in range(300)]
    ca.send(*sent)
    assert cb.read(300) == [s_message(a, b, ts(1700000100 + i), b"number %d" % i) for i in range(300)]
    assert sorted(ca.read(300)) == sorted(s_delivered(b, ts(1700000100 + i)) for i in range(300))
    cb.send(f_send(b, a, ts(1700000999), b"sync"))
    assert ca.read(1) == [s_message(b, a, ts(1700000999), b"sync")]
    assert cb.buf == b""


def test_held_for_an_offline_user_comes_at_login_on_another_node(server, pg_dsn):
    a_node, b_node = nodes(server, pg_dsn)
    a, b = a_node.client().register(), a_node.client().register()
    ca = a_node.client()
    ca.login(a)
    ca.send(*[f_send(a, b, ts(1700000200 + i), b"while away %d" % i) for i in range(3)])
    cb = b_node.client()
    cb.login(b)
    assert cb.read(3) == [s_message(a, b, ts(1700000200 + i), b"while away %d" % i) for i in range(3)]
    assert ca.read(3) == [s_delivered(b, ts(1700000200 + i)) for i in range(3)]


def test_a_group_across_three_nodes(server, pg_dsn):
    n1, n2, n3 = nodes(server, pg_dsn, 3)
    setup = n1.client()
    a, b, c = setup.register(), setup.register(), setup.register()
    ca, cb, cc = n1.client(), n2.client(), n3.client()
    ca.login(a)
    cb.login(b)
    cc.login(c)
    ca.send(f_group(a, ts(1700000300), [b, c]))
    (added,) = ca.read(1)
    group = added[2:15]
    assert added == s_added(group, ts(1700000300), [a, b, c])
    assert cb.read(1) == [added] and cc.read(1) == [added]
    cb.send(f_send(b, group, ts(1700000301), b"hello group, from node 2"))
    frame = s_message(b, group, ts(1700000301), b"hello group, from node 2")
    assert ca.read(1) == [frame] and cc.read(1) == [frame]
    assert cb.read(1) == [s_delivered(group, ts(1700000301))]
    # Read by both others, on two nodes: one 09 for the group, to everyone.
    ca.send(f_seen(group, ts(1700000301)))
    cc.send(f_seen(group, ts(1700000301)))
    low = s_seen_by(group, ts(1700000301))
    assert ca.read(1) == [low] and cb.read(1) == [low] and cc.read(1) == [low]


def test_a_group_managed_across_three_nodes(server, pg_dsn):
    """A subject set on one node reaches members on the others; a member added
    on a second node, logged in on a third, gets the 11 then the 18; a leave
    on the third reaches the rest; an offline member gets it all on any node."""
    n1, n2, n3 = nodes(server, pg_dsn, 3)
    setup = n1.client()
    a, b, c, d, e = (setup.register() for _ in range(5))
    ca, cb, cc, cd = n1.client(), n2.client(), n3.client(), n3.client()
    for conn, who in ((ca, a), (cb, b), (cc, c), (cd, d)):
        conn.login(who)
    ca.send(f_group(a, ts(1700000300), [b, c, e]))
    (made,) = ca.read(1)
    group = made[2:15]
    assert cb.read(1) == [made] and cc.read(1) == [made]
    ca.send(f_subject(a, group, ts(1700000301), "Trois nœuds".encode()))
    named = s_subject(group, a, ts(1700000301), "Trois nœuds".encode())
    assert ca.read(1) == [named] and cb.read(1) == [named] and cc.read(1) == [named]
    cb.send(f_add(b, group, ts(1700000302), [d]))
    five = s_added(group, ts(1700000302), [a, b, c, e, d])
    assert cd.read(2) == [five, named]
    assert ca.read(1) == [five] and cb.read(1) == [five] and cc.read(1) == [five]
    cc.send(f_leave(c, group, ts(1700000303)))
    four = s_added(group, ts(1700000303), [a, b, e, d])
    assert cc.read(1) == [s_left(group, ts(1700000303))]
    assert ca.read(1) == [four] and cb.read(1) == [four] and cd.read(1) == [four]
    cd.send(f_send(d, group, ts(1700000304), b"hello from the newcomer"))
    hello = s_message(d, group, ts(1700000304), b"hello from the newcomer")
    assert ca.read(1) == [hello] and cb.read(1) == [hello]
    cc.send(f_send(c, group, ts(1700000305), b"am I still in?"))
    assert cc.read(1) == [s_error(b"05", b"07")]
    ce = n2.client()
    ce.login(e)
    assert ce.read(5) == [made, named, five, four, hello]
    assert cd.read(1) == [s_delivered(group, ts(1700000304))]


def test_a_login_on_another_node_replaces_the_first_and_loses_nothing(server, pg_dsn):
    a_node, b_node = nodes(server, pg_dsn)
    setup = a_node.client()
    setup.send(b"13", b"13")
    frames = setup.read(2)
    (a, a_secret), (b, b_secret) = [(f[2:15], f[15:47]) for f in frames]
    ca = a_node.client()
    ca.send(f_online_secret(a, a_secret))
    assert ca.read(1) == [b"04" + a]
    old = b_node.client()
    old.send(f_online_secret(b, b_secret))
    assert old.read(1) == [b"04" + b]
    ca.send(*[f_send(a, b, ts(1700000400 + i), b"before %d" % i) for i in range(5)])
    got_old = old.read(5)
    old.send(*[f_received(a, b, ts(1700000400 + i)) for i in range(3)])  # acknowledges three of five
    # A message after the 16s: once it has arrived, the 16s were handled.
    old.send(f_send(b, a, ts(1700000405), b"acked three"))
    assert ca.read(4) == [s_delivered(b, ts(1700000400 + i)) for i in range(3)] + [
        s_message(b, a, ts(1700000405), b"acked three")
    ]
    new = a_node.client()
    new.send(f_online_secret(b, b_secret))
    assert new.read(1) == [b"04" + b]
    # The old connection is told and closed ...
    assert until_closed(old)[-1] == s_error(b"03", b"09")
    # ... and the new one gets what was not acknowledged there, then what comes after, once each.
    ca.send(*[f_send(a, b, ts(1700000410 + i), b"after %d" % i) for i in range(5)])
    unacked = [s_message(a, b, ts(1700000400 + i), b"before %d" % i) for i in (3, 4)]
    after = [s_message(a, b, ts(1700000410 + i), b"after %d" % i) for i in range(5)]
    assert got_old == [s_message(a, b, ts(1700000400 + i), b"before %d" % i) for i in range(5)]
    assert new.read(7) == unacked + after
    new.send(*[f_received(a, b, ts(1700000400 + i)) for i in (3, 4)])
    new.send(*[f_received(a, b, ts(1700000410 + i)) for i in range(5)])
    delivered = ca.read(7)
    assert sorted(delivered) == sorted(
        [s_delivered(b, ts(1700000400 + i)) for i in (3, 4)]
        + [s_delivered(b, ts(1700000410 + i)) for i in range(5)]
    )
    assert ca.buf == b""


def test_a_late_claim_for_a_dropped_connection_does_not_close_the_new_one(server, pg_dsn):
    """A client dropped its connection to node 1 right after its 03 and logged in
    on node 2. Node 1's claim for the dropped connection commits after node 2's
    (its database connection is held up): the later login keeps the user, and is
    not told it logged in elsewhere."""
    import psycopg

    n1, n2 = nodes(server, pg_dsn)
    setup = n1.client()
    a, z = setup.register(), setup.register()
    cz = n1.client()
    cz.login(z)
    with psycopg.connect(pg_dsn) as blocker:
        # Node 1's next transaction waits on the inbox; node 2's claim does not touch it.
        blocker.execute("LOCK TABLE inbox IN EXCLUSIVE MODE")
        cz.send(f_send(z, a, ts(1700000700), b"held up"))
        dropped = n1.client()
        dropped.send(f_online(a))  # read before the close: its claim queues behind
        dropped.close()
        new = n2.client()
        new.login(a)
    # The inbox is free: node 1 commits the message, then its claim, then the next message.
    assert new.read(1) == [s_message(z, a, ts(1700000700), b"held up")]
    cz.send(f_send(z, a, ts(1700000701), b"after the late claim"))
    assert new.read(1) == [s_message(z, a, ts(1700000701), b"after the late claim")]
    assert cz.read(2) == [s_delivered(a, ts(1700000700)), s_delivered(a, ts(1700000701))]
    assert new.buf == b""


def test_a_node_killed_mid_conversation_loses_nothing(server, pg_dsn):
    a_node, b_node = nodes(server, pg_dsn)
    setup = a_node.client()
    a = setup.register()
    setup.send(b"13")
    (made,) = setup.read(1)
    b, secret = made[2:15], made[15:47]
    ca, cb = a_node.client(), b_node.client()
    ca.login(a)
    cb.send(f_online_secret(b, secret))
    assert cb.read(1) == [b"04" + b]
    first = [f_send(a, b, ts(1700000500 + i), b"first %d" % i) for i in range(50)]
    ca.send(*first)
    cb.read(10)
    cb.send(*[f_received(a, b, ts(1700000500 + i)) for i in range(10)])
    b_node.stop(signal.SIGKILL)
    cb.close()
    # b's node died with up to 40 messages on the way and unacknowledged:
    # they stay held, so b gets them on the node still up, with what follows.
    ca.send(*[f_send(a, b, ts(1700000600 + i), b"second %d" % i) for i in range(50)])
    back = a_node.client()
    back.send(f_online_secret(b, secret))
    assert back.read(1) == [b"04" + b]
    expected = {s_message(a, b, ts(1700000500 + i), b"first %d" % i) for i in range(10, 50)} | {
        s_message(a, b, ts(1700000600 + i), b"second %d" % i) for i in range(50)
    }
    frames = []
    while not expected <= set(frames):
        frames += back.read(1)
    second = [f for f in frames if b"second" in f]
    assert second == [s_message(a, b, ts(1700000600 + i), b"second %d" % i) for i in range(50)]
    # Every message gets its one 07 once acknowledged.
    back.send(*[f_received(a, b, ts(1700000500 + i)) for i in range(50)])
    back.send(*[f_received(a, b, ts(1700000600 + i)) for i in range(50)])
    want = {s_delivered(b, ts(1700000500 + i)) for i in range(50)} | {
        s_delivered(b, ts(1700000600 + i)) for i in range(50)
    }
    got = set()
    while len(got) < len(want):
        (frame,) = ca.read(1)
        if frame[:2] == b"07":
            assert frame not in got
            got.add(frame)
    assert got == want


def until_closed(client) -> list[bytes]:
    """Every frame the server sent before closing the connection."""
    deadline = time.monotonic() + 10
    while not client.eof:
        client._fill(deadline)
    return parse_server(client.buf)


def test_while_the_database_restarts_nodes_answer_busy_then_recover_by_themselves(server, postgres, pg_dsn):
    a_node, b_node = nodes(server, pg_dsn)
    setup = a_node.client()
    a, b = setup.register(), setup.register()
    ca, cb = a_node.client(), b_node.client()
    ca.login(a)
    cb.login(b)
    # Both logins are done (flushes included) before the database goes: a
    # login whose flush meets the outage is told to come back (12 03 11),
    # and b would then be offline for the rest, with no 07 for a.
    ca.send(f_send(a, b, ts(1700000700), b"before"))
    assert cb.read(1) == [s_message(a, b, ts(1700000700), b"before")]
    assert ca.read(1) == [s_delivered(b, ts(1700000700))]
    postgres.stop()
    try:
        ca.send(f_send(a, b, ts(1700000800), b"while the database is down"))
        assert ca.read(1) == [s_error(b"05", b"11")]
    finally:
        postgres.start()
    # The sender's outbox tries again until it is taken; no node was restarted.
    deadline = time.monotonic() + 20
    attempt = 0
    while True:
        attempt += 1
        ca.send(f_send(a, b, ts(1700000800 + attempt), b"again"))
        (answer,) = ca.read(1)
        if answer[:2] == b"07":
            break
        assert answer == s_error(b"05", b"11")
        assert time.monotonic() < deadline, "the node never recovered"
        select.select([], [], [], 0.2)
    assert answer == s_delivered(b, ts(1700000800 + attempt))
    assert cb.read(1) == [s_message(a, b, ts(1700000800 + attempt), b"again")]
    # Across nodes again, once the listeners are back.
    cb.send(f_send(b, a, ts(1700000900), b"and back"))
    assert ca.read(1, timeout=20) == [s_message(b, a, ts(1700000900), b"and back")]


def test_a_database_that_cannot_be_reached_is_one_line_at_start(tmp_path):
    done = subprocess.run(
        [installed.python(), "-m", "twisted", "chat", "--port", "tcp:0:interface=127.0.0.1"]
        + ["--db", f"postgresql://postgres@127.0.0.1:{free_port()}/chat"],
        cwd=installed.outside(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "chatproto: cannot connect to PostgreSQL" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr + done.stdout


def test_frames_behind_a_lookup_keep_their_order(server, pg_dsn):
    """An id made on node A a moment ago, used on node B in one burst of frames:
    B asks the database, and the frames after it wait instead of overtaking."""
    a_node, b_node = nodes(server, pg_dsn)
    a, b = a_node.client().register(), a_node.client().register()
    cb = b_node.client()
    cb.login(b)
    ca = b_node.client()
    ca.send(
        b"03" + a,
        f_send(a, b, ts(1700001000), b"one"),
        f_send(a, b, ts(1700001001), b"two"),
    )
    assert ca.read(3) == [b"04" + a, s_delivered(b, ts(1700001000)), s_delivered(b, ts(1700001001))]
    assert cb.read(2) == [
        s_message(a, b, ts(1700001000), b"one"),
        s_message(a, b, ts(1700001001), b"two"),
    ]


def test_notifications_missed_while_a_listener_was_away_are_caught_up(server, pg_dsn):
    """Both nodes' listening connections are cut; a message committed before they
    are back is announced to nobody, and still arrives, with its 07."""
    import psycopg

    a_node, b_node = nodes(server, pg_dsn)
    setup = a_node.client()
    a, b = setup.register(), setup.register()
    ca, cb = a_node.client(), b_node.client()
    ca.login(a)
    cb.login(b)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        cut = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query LIKE 'LISTEN %'"
        ).fetchone()[0]
    assert cut == 2
    ca.send(f_send(a, b, ts(1700001100), b"while nobody listens"))
    assert cb.read(1) == [s_message(a, b, ts(1700001100), b"while nobody listens")]
    assert ca.read(1) == [s_delivered(b, ts(1700001100))]
    assert cb.buf == b"" and ca.buf == b""
