"""Groups end to end: a real server, a group of 99, half of it offline, a kill -9."""

from __future__ import annotations

import signal

from .helpers import f_group, f_seen, f_send, s_added, s_delivered, s_message, s_seen_by, ts

MEMBERS = 99


def read_until(conn, wanted: bytes, resendable: set[bytes]) -> None:
    """Read up to ``wanted``. A 06 written just before the kill, whose delivery
    was not yet committed, comes again (the client drops it): nothing else may."""
    for _ in range(len(resendable) + 1):
        (frame,) = conn.read(1)
        if frame == wanted:
            return
        assert frame in resendable, frame
    raise AssertionError(f"never got {wanted!r}")


def test_a_group_of_99_with_half_offline_survives_kill_9(server):
    srv = server()
    setup = srv.client()
    users = [setup.register() for _ in range(MEMBERS)]
    creator, others = users[0], users[1:]
    online, offline = others[:49], others[49:]
    conns = {}
    for user in [creator, *online]:
        conns[user] = srv.client()
        conns[user].login(user)

    conns[creator].send(f_group(creator, ts(1700000100), others))
    (added,) = conns[creator].read(1)
    group = added[2:15]
    assert group[:1] == b"1" and added == s_added(group, ts(1700000100), users)
    for user in online:
        assert conns[user].read(1) == [added]

    conns[creator].send(f_send(creator, group, ts(1700000101), b"before the crash"))
    for user in online:
        assert conns[user].read(1) == [s_message(creator, group, ts(1700000101), b"before the crash")]
    # A member who is not the creator writes too; the creator is a recipient like the rest.
    conns[online[0]].send(f_send(online[0], group, ts(1700000102), b"me too"))
    for user in [creator, *online[1:]]:
        assert conns[user].read(1) == [s_message(online[0], group, ts(1700000102), b"me too")]
    # Deliveries are committed in order: once this later message's 07 is
    # back, the online members' copies above are recorded as delivered.
    conns[creator].send(f_send(creator, online[1], ts(1700000103), b"sync"))
    assert conns[online[1]].read(1) == [s_message(creator, online[1], ts(1700000103), b"sync")]
    assert conns[creator].read(1) == [s_delivered(online[1], ts(1700000103))]

    srv.restart(signal.SIGKILL)

    # The offline half comes back after the crash: the 11 and both messages, in order.
    for user in offline:
        conn = srv.client()
        conn.login(user)
        assert conn.read(3) == [
            added,
            s_message(creator, group, ts(1700000101), b"before the crash"),
            s_message(online[0], group, ts(1700000102), b"me too"),
        ]
        conns[user] = conn
    # Everyone has both messages now: their senders get their 07 on login.
    seen_before = {
        s_message(creator, group, ts(1700000101), b"before the crash"),
        s_message(online[0], group, ts(1700000102), b"me too"),
    }
    creator_conn = srv.client()
    creator_conn.login(creator)
    read_until(creator_conn, s_delivered(group, ts(1700000101)), seen_before)
    sender = srv.client()
    sender.login(online[0])
    read_until(sender, s_delivered(group, ts(1700000102)), seen_before)

    # Read receipts: the low mark moves once every member but each sender has read.
    readers = [u for u in users if u != creator]
    for user in readers[:-1]:
        conn = conns[user] if user in offline else (sender if user == online[0] else None)
        if conn is None:
            conn = conns[user] = srv.client()
            conn.login(user)
        conn.send(f_seen(group, ts(1700000102)))
    last = conns[readers[-1]]
    last.send(f_seen(group, ts(1700000101)))
    # Message 101 is read by all but its sender; 102 still lacks the creator's mark.
    assert creator_conn.read(1) == [s_seen_by(group, ts(1700000101))]
    creator_conn.send(f_seen(group, ts(1700000102)))
    last.send(f_seen(group, ts(1700000102)))
    assert creator_conn.read(1) == [s_seen_by(group, ts(1700000102))]
