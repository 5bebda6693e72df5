"""The live path: a direct 05 to a reader online here (or a group 05 whose
other members are all reading here) is written at once and stored as
delivered, its 07 following that commit.

It may be taken only for a message that cannot repeat a stored one (its
TIMESTAMP past the conversation's latest, which the store must have said),
with nothing of that conversation still on the held path, and to a ready
03 session. What a user notices when it goes wrong: a message twice, out
of order, lost, or a 07 for a message the reader never had (or, for a 15
session, never acknowledged).

The SQLite tests drive the database thread by hand (``ThreadedClock``), so
what is written before and after a commit can be looked at.
"""

from __future__ import annotations

import sqlite3

import pytest
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from chatproto.server import Limits

from .helpers import (
    f_group,
    f_online,
    f_received,
    f_send,
    parse_server,
    s_delivered,
    s_message,
    ts,
)

pytestmark = pytest.mark.usefixtures("no_logged_failures")


def two_online(net):
    a, _ = net.register()
    b, _ = net.register()
    return a, b, net.online(a), net.online(b)


def known_conversation(net):
    """Two users online, with a first message from a to b already delivered:
    the hub has asked the store the conversation's latest TIMESTAMP (1)."""
    a, b, ca, cb = two_online(net)
    ca.send(f_send(a, b, ts(1), b"first"))
    assert cb.take() == [s_message(a, b, ts(1), b"first")]
    assert ca.take() == [s_delivered(b, ts(1))]
    return a, b, ca, cb


def written(conn) -> list[bytes]:
    """What the server has written to ``conn`` so far, without running the
    reactor or the database thread (``take`` runs both)."""
    frames = parse_server(conn.transport.value())
    conn.transport.clear()
    return frames


def stored(path: str, src: bytes, dst: bytes, when: bytes) -> list[tuple[int, int]]:
    """(remaining, inbox rows) of each committed message src → dst at ``when``,
    read from the file by a connection of our own."""
    conn = sqlite3.connect(path)
    try:
        return [
            (remaining, held)
            for remaining, held in conn.execute(
                "SELECT m.remaining, (SELECT count(*) FROM inbox i WHERE i.msg_id = m.id) "
                "FROM messages m WHERE m.src = ? AND m.dst = ? AND m.ts = ?",
                (src.decode(), dst.decode(), int(when)),
            )
        ]
    finally:
        conn.close()


def test_a_live_06_is_written_before_the_commit_and_its_07_after_it(make_net):
    net = make_net("sqlite")
    a, b, ca, cb = known_conversation(net)
    ca.send(f_send(a, b, ts(2), b"live"))
    # Nothing has run on the database thread yet, and the reader has it.
    assert written(cb) == [s_message(a, b, ts(2), b"live")]
    assert stored(net.path, a, b, ts(2)) == [], "not committed yet"
    assert written(ca) == []
    net.reactor.advance(0)  # the transaction goes to the database thread...
    f, args, kwargs = net.reactor.from_threads.get(timeout=10)  # ...and commits
    # Looked at before the reactor sees the commit, asserted after it has (a
    # store left waiting for its answer could not be closed).
    committed, before = stored(net.path, a, b, ts(2)), written(ca)
    f(*args, **kwargs)
    assert committed == [(0, 0)], "stored as delivered: nothing held for b"
    assert before == [], "no 07 before the reactor has seen the commit"
    assert ca.take() == [s_delivered(b, ts(2))]
    assert cb.take() == [], "the 06 was written once"
    cb.lose()
    assert net.online(b).held == [], "a live message is not held for the reader's next login"


@pytest.mark.parametrize("when", ["after its 07", "before its commit"])
def test_a_resend_of_a_live_message_is_not_delivered_again_and_gets_its_07_again(net, when):
    a, b, ca, cb = known_conversation(net)
    frame = f_send(a, b, ts(2), b"live")
    ca.send(frame)
    if when == "after its 07":
        assert cb.take() == [s_message(a, b, ts(2), b"live")]
        assert ca.take() == [s_delivered(b, ts(2))]
        ca.send(frame)
        assert ca.take() == [s_delivered(b, ts(2))]
    else:
        ca.send(frame)  # the client's outbox, before any 07
        assert cb.take() == [s_message(a, b, ts(2), b"live")]
        answers = ca.take()
        assert answers and set(answers) == {s_delivered(b, ts(2))}
    assert cb.take() == []


def test_a_resend_from_a_new_connection_of_the_sender_is_not_delivered_again(net):
    """The new connection knows nothing of the conversation: it asks the store."""
    a, b, ca, cb = known_conversation(net)
    ca.send(f_send(a, b, ts(2), b"two"), f_send(a, b, ts(3), b"three"))
    assert cb.take() == [s_message(a, b, ts(2), b"two"), s_message(a, b, ts(3), b"three")]
    assert ca.take() == [s_delivered(b, ts(2)), s_delivered(b, ts(3))]
    ca.lose()
    ca = net.online(a)
    ca.send(f_send(a, b, ts(1), b"first"))  # the first 05 of this session: the store is asked
    assert ca.take() == [s_delivered(b, ts(1))]
    ca.send(f_send(a, b, ts(3), b"three"), f_send(a, b, ts(2), b"two"))
    assert ca.take() == [s_delivered(b, ts(3)), s_delivered(b, ts(2))]
    assert cb.take() == []


def test_a_new_connection_learns_the_latest_after_what_the_old_one_had_in_flight(make_net):
    """The sender's connection drops while its live messages are being committed;
    the store's latest for its next connection must count them."""
    net = make_net("sqlite")
    a, b, ca, cb = known_conversation(net)
    ca.send(f_send(a, b, ts(2), b"two"), f_send(a, b, ts(3), b"three"))
    assert written(cb) == [s_message(a, b, ts(2), b"two"), s_message(a, b, ts(3), b"three")]
    net.reactor.advance(0)  # their transaction is on the database thread
    ca.lost = True
    ca.proto.connectionLost(Failure(ConnectionDone()))  # no 07 yet: the outbox keeps both
    again = net.connect()
    again.send(f_online(a), f_send(a, b, ts(2), b"two"))  # asks the store for the latest
    net.settle()
    again.send(f_send(a, b, ts(3), b"three"))
    assert set(again.take()) == {b"04" + a, s_delivered(b, ts(2)), s_delivered(b, ts(3))}
    assert cb.take() == [], "b got each once, before the drop"


def test_a_resend_after_a_restart_of_a_message_delivered_live_is_not_delivered_again(make_net):
    """After the restart the conversation's latest comes from the database alone."""
    net = make_net("sqlite")
    a, b, ca, cb = known_conversation(net)
    ca.send(f_send(a, b, ts(2), b"live"))
    assert written(cb) == [s_message(a, b, ts(2), b"live")], "it went the live way"
    assert ca.take() == [s_delivered(b, ts(2))]
    net.restart()
    ca = net.online(a)
    cb = net.online(b)
    ca.send(f_send(a, b, ts(1), b"first"))  # the client resends its oldest first: held, a repeat
    assert ca.take() == [s_delivered(b, ts(1))]
    ca.send(f_send(a, b, ts(2), b"live"))  # the conversation is known now, from the store
    assert ca.take() == [s_delivered(b, ts(2))]
    assert cb.take() == [], "b already had both"
    ca.send(f_send(a, b, ts(3), b"new"))
    assert cb.take() == [s_message(a, b, ts(3), b"new")]
    assert ca.take() == [s_delivered(b, ts(3))]


@pytest.mark.parametrize(
    "when, text", [(2, b"same second, other text"), (1, b"an older timestamp")], ids=["same TS", "older TS"]
)
def test_a_message_not_past_the_latest_reaches_the_reader_once_with_its_07(net, when, text):
    """A client that does not raise its TIMESTAMP still has its message delivered (the held way)."""
    a, b, ca, cb = known_conversation(net)
    ca.send(f_send(a, b, ts(2), b"live"))
    assert cb.take() == [s_message(a, b, ts(2), b"live")]
    assert ca.take() == [s_delivered(b, ts(2))]
    ca.send(f_send(a, b, ts(when), text))
    assert cb.take() == [s_message(a, b, ts(when), text)]
    assert ca.take() == [s_delivered(b, ts(when))]
    cb.lose()
    assert net.online(b).held == [], "and it is not held for b any more"


def test_messages_of_one_conversation_reach_the_reader_in_send_order(make_net):
    """Until the store has said the conversation's latest, the messages wait,
    then go in order; one that must take the held way (its TIMESTAMP not past
    the latest) is not overtaken by later ones that could go live."""
    net = make_net("sqlite")
    a, b, ca, cb = two_online(net)
    ca.send(f_send(a, b, ts(1), b"m1"))
    net.reactor.advance(0)  # the question of the latest goes to the database thread
    ca.send(f_send(a, b, ts(2), b"m2"))
    assert written(cb) == [], "nothing is written before the store has said the latest"
    f, args, kwargs = net.reactor.from_threads.get(timeout=10)
    f(*args, **kwargs)  # the latest is known: the two that waited go, in order
    assert written(cb) == [s_message(a, b, ts(1), b"m1"), s_message(a, b, ts(2), b"m2")]
    ca.send(f_send(a, b, ts(2), b"m2, other text"))  # not past the latest: held
    ca.send(f_send(a, b, ts(3), b"m3"), f_send(a, b, ts(4), b"m4"))  # could go live, must not overtake it
    assert written(cb) == []
    net.settle()
    assert cb.take() == [
        s_message(a, b, ts(2), b"m2, other text"),
        s_message(a, b, ts(3), b"m3"),
        s_message(a, b, ts(4), b"m4"),
    ]
    assert sorted(ca.take()) == sorted([s_delivered(b, ts(i)) for i in (1, 2, 2, 3, 4)])


def test_live_messages_wait_behind_the_readers_flush(make_net):
    """A reader still being sent what was held for it is not ready: what comes
    meanwhile, even on a known conversation, comes after the held messages."""
    net = make_net("sqlite")
    a, b, ca, cb = known_conversation(net)
    cb.lose()
    ca.send(f_send(a, b, ts(2), b"held"))
    net.settle()
    cb = net.connect()
    cb.send(f_online(b))  # its flush asks the store for what is held
    ca.send(f_send(a, b, ts(3), b"during the flush"))
    assert cb.take() == [
        b"04" + b,
        s_message(a, b, ts(2), b"held"),
        s_message(a, b, ts(3), b"during the flush"),
    ]
    assert ca.take() == [s_delivered(b, ts(2)), s_delivered(b, ts(3))]


def test_a_congested_reader_gets_the_rest_held_not_a_drop(net):
    """Once a slow reader is past half its buffer cap, what comes for it waits in
    the store, even on a known conversation, instead of piling up until the
    reader is dropped; when it drains it gets the rest, in order."""
    net.factory.limits = Limits(max_buffer=10 * 256)  # congested past five 06s unread
    a, b, ca, cb = known_conversation(net)
    cb.proto.pauseProducing()  # b's transport: stop, the reader is behind
    ca.send(*[f_send(a, b, ts(i), b"m%d" % i) for i in range(2, 22)])
    assert not cb.closed, "b was dropped instead of having its messages held"
    written_before = cb.take()
    assert written_before == [s_message(a, b, ts(i), b"m%d" % i) for i in range(2, 2 + len(written_before))]
    assert len(written_before) < 10
    assert ca.take() == [s_delivered(b, ts(i)) for i in range(2, 2 + len(written_before))]
    cb.proto.resumeProducing()
    assert cb.take() == [s_message(a, b, ts(i), b"m%d" % i) for i in range(2 + len(written_before), 22)]
    assert sorted(ca.take()) == [s_delivered(b, ts(i)) for i in range(2 + len(written_before), 22)]


def test_a_15_reader_gets_it_held_until_its_16(net):
    """For a 15 session only the 16 is delivery: no 07 on the write alone, and
    unacknowledged it is sent again at the next login."""
    a, _ = net.register()
    b, secret = net.register(with_secret=True)
    ca, cb = net.online(a), net.online(b, secret)
    ca.send(f_send(a, b, ts(1), b"first"))
    assert cb.take() == [s_message(a, b, ts(1), b"first")]
    cb.send(f_received(a, b, ts(1)))
    assert ca.take() == [s_delivered(b, ts(1))]
    ca.send(f_send(a, b, ts(2), b"second"))  # the conversation is known, past its latest
    assert cb.take() == [s_message(a, b, ts(2), b"second")]
    assert ca.take() == [], "no 07 before b acknowledges"
    cb.lose()
    cb = net.online(b, secret)
    assert cb.held == [s_message(a, b, ts(2), b"second")], "still held for b"
    cb.send(f_received(a, b, ts(2)))
    assert ca.take() == [s_delivered(b, ts(2))]


def test_a_resend_after_the_connection_changed_user_is_not_delivered_again(net):
    a, _ = net.register()
    b, _ = net.register()
    c, _ = net.register()
    cc = net.online(c)
    cb = net.online(b)
    cb.send(f_send(b, c, ts(100), b"from b"))
    assert cc.take() == [s_message(b, c, ts(100), b"from b")]
    assert cb.take() == [s_delivered(c, ts(100))]
    cb.lose()
    conn = net.online(a)
    conn.send(f_send(a, c, ts(50), b"from a"))  # a's conversation with c: latest 50
    assert cc.take() == [s_message(a, c, ts(50), b"from a")]
    assert conn.take() == [s_delivered(c, ts(50))]
    conn.send(f_online(b))  # the same connection is b now
    assert conn.take() == [b"04" + b]
    conn.send(f_send(b, c, ts(100), b"from b"))  # b's outbox resends: 100 is past a's 50
    assert conn.take() == [s_delivered(c, ts(100))]
    assert cc.take() == [], "c already has b's message"


def test_a_flood_waiting_for_the_store_is_read_no_further_until_it_answers(make_net):
    """Messages waiting in a conversation for the store's answer count against
    the read throttle, like the store's own backlog: a sender flooding a
    conversation whose latest is not known yet is paused until the store has
    answered and taken them, and nothing is lost or reordered."""
    net = make_net("sqlite")
    a, b, ca, cb = two_online(net)
    count = 4100  # past the server's store backlog limit (4000)
    ca.send(*[f_send(a, b, ts(i), b"m%d" % i) for i in range(1, count + 1)])
    assert written(cb) == []
    assert ca.transport.producerState == "paused", "a sender is read no further while its messages wait"
    net.settle()
    assert ca.transport.producerState == "producing"
    assert cb.take() == [s_message(a, b, ts(i), b"m%d" % i) for i in range(1, count + 1)]
    assert len(ca.take()) == count


# -- groups: live when every other member can take it now ---------------------


def group_online(net, members: int = 3):
    """``members`` users online and a group of all of them made by the first;
    each has had its 11."""
    users = [net.register()[0] for _ in range(members)]
    conns = [net.online(user) for user in users]
    conns[0].send(f_group(users[0], ts(1), users[1:]))
    (added,) = conns[0].take()
    group = added[2:15]
    for conn in conns[1:]:
        assert conn.take() == [added]
    return group, users, conns


def test_a_group_message_to_members_all_reading_is_written_before_its_commit_with_no_holds(make_net):
    net = make_net("sqlite")
    group, (a, b, c), (ca, cb, cc) = group_online(net)
    ca.send(f_send(a, group, ts(5), b"first"))  # the conversation's latest: asked once
    net.settle()
    assert cb.take() == cc.take() == [s_message(a, group, ts(5), b"first")]
    assert ca.take() == [s_delivered(group, ts(5))]
    ca.send(f_send(a, group, ts(6), b"live"))
    assert written(cb) == written(cc) == [s_message(a, group, ts(6), b"live")], "written at once"
    assert stored(net.path, a, group, ts(6)) == [], "not committed yet"
    net.reactor.advance(0)
    f, args, kwargs = net.reactor.from_threads.get(timeout=10)
    committed, before = stored(net.path, a, group, ts(6)), written(ca)
    f(*args, **kwargs)
    assert committed == [(0, 0)], "stored as delivered: nothing held for b or c"
    assert before == [], "no 07 before the commit"
    assert ca.take() == [s_delivered(group, ts(6))]
    assert cb.take() == cc.take() == []


def test_a_resend_of_a_live_group_message_reaches_no_member_twice(net):
    group, (a, b, c), (ca, cb, cc) = group_online(net)
    frame = f_send(a, group, ts(5), b"once")
    ca.send(frame)
    assert cb.take() == cc.take() == [s_message(a, group, ts(5), b"once")]
    assert ca.take() == [s_delivered(group, ts(5))]
    ca.send(frame)
    assert ca.take() == [s_delivered(group, ts(5))], "its 07 again"
    cb.lose()
    assert net.online(b).held == [], "nothing held for the next login either"
    assert cc.take() == []


def test_a_group_goes_live_again_once_a_member_who_was_away_has_caught_up(make_net):
    """m1 took the held way (c away) and reached c at its login; m2, with
    everyone reading again, is written to both at once, after m1."""
    net = make_net("sqlite")
    group, (a, b, c), (ca, cb, cc) = group_online(net)
    cc.lose()
    ca.send(f_send(a, group, ts(5), b"m1"))
    cc = net.online(c)
    assert cc.held == [s_message(a, group, ts(5), b"m1")]
    assert cb.take() == [s_message(a, group, ts(5), b"m1")]
    assert ca.take() == [s_delivered(group, ts(5))]
    ca.send(f_send(a, group, ts(6), b"m2"))
    assert written(cb) == written(cc) == [s_message(a, group, ts(6), b"m2")], "written before any commit"
    net.settle()
    assert ca.take() == [s_delivered(group, ts(6))]


def test_group_messages_during_a_members_flush_come_after_what_was_held(make_net):
    """c is being sent what was held for it: it is not ready, so what comes
    meanwhile takes the held way, and reaches c (and b) in order."""
    net = make_net("sqlite")
    group, (a, b, c), (ca, cb, cc) = group_online(net)
    ca.send(f_send(a, group, ts(5), b"m0"))
    net.settle()
    ca.take(), cb.take(), cc.take()
    cc.lose()
    ca.send(f_send(a, group, ts(6), b"held for c"))
    net.settle()
    cc = net.connect()
    cc.send(f_online(c))  # its flush asks the store; c is not ready yet
    ca.send(f_send(a, group, ts(7), b"m1"), f_send(a, group, ts(8), b"m2"))
    assert cc.take() == [
        b"04" + c,
        s_message(a, group, ts(6), b"held for c"),
        s_message(a, group, ts(7), b"m1"),
        s_message(a, group, ts(8), b"m2"),
    ]
    assert cb.take() == [
        s_message(a, group, ts(6), b"held for c"),
        s_message(a, group, ts(7), b"m1"),
        s_message(a, group, ts(8), b"m2"),
    ]
    assert sorted(ca.take()) == [s_delivered(group, ts(i)) for i in (6, 7, 8)]


def test_a_member_whose_write_fails_gets_the_group_message_held(net):
    """c's connection is closing when the message is written: b has it live,
    c gets it at its next login, and the 07 waits for c."""
    group, (a, b, c), (ca, cb, cc) = group_online(net)
    ca.send(f_send(a, group, ts(5), b"m0"))
    assert cb.take() == cc.take() == [s_message(a, group, ts(5), b"m0")]
    assert ca.take() == [s_delivered(group, ts(5))]
    cc.proto._closing = True  # its transport is shutting: writes are refused
    ca.send(f_send(a, group, ts(6), b"m1"))
    assert cb.take() == [s_message(a, group, ts(6), b"m1")]
    assert ca.take() == [], "no 07 before c has it"
    cc.lose()
    assert net.online(c).held == [s_message(a, group, ts(6), b"m1")]
    assert ca.take() == [s_delivered(group, ts(6))]
    assert cb.take() == []


def test_a_live_group_message_does_not_overtake_a_held_one_in_flight(make_net):
    """m1 takes the held way (c's transport is full for a moment); c can take
    messages again before m1 is committed, so m2 could go live to everyone:
    it waits for m1, and each member gets m1 first."""
    net = make_net("sqlite")
    group, (a, b, c), (ca, cb, cc) = group_online(net)
    ca.send(f_send(a, group, ts(5), b"m0"))
    net.settle()
    ca.take(), cb.take(), cc.take()
    cc.proto.pauseProducing()
    ca.send(f_send(a, group, ts(6), b"m1"))
    cc.proto.resumeProducing()
    ca.send(f_send(a, group, ts(7), b"m2"))
    assert written(cb) == [], "m2 waits for m1's commit"
    net.settle()
    assert cb.take() == cc.take() == [s_message(a, group, ts(6), b"m1"), s_message(a, group, ts(7), b"m2")]
    assert ca.take() == [s_delivered(group, ts(6)), s_delivered(group, ts(7))]
