"""Groups end to end: a real server, a group of 99, half of it offline, a kill -9;
a group named, added to and left, with restarts (SIGTERM and kill -9) between
the steps and members offline at each of them."""

from __future__ import annotations

import signal

from .helpers import (
    f_add,
    f_group,
    f_leave,
    f_seen,
    f_send,
    f_subject,
    s_added,
    s_delivered,
    s_error,
    s_left,
    s_message,
    s_seen_by,
    s_subject,
    ts,
)

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


def committed(srv, conn, sender: bytes, reader_conn, reader: bytes, when: bytes) -> None:
    """Everything the sender's earlier frames did is committed: a direct
    message's 07 comes after the commit that follows them."""
    conn.send(f_send(sender, reader, when, b"sync"))
    assert reader_conn.read(1) == [s_message(sender, reader, when, b"sync")]
    assert conn.read(1) == [s_delivered(reader, when)]


def test_a_group_named_added_to_and_left_across_restarts_with_members_offline(server):
    srv = server()
    setup = srv.client()
    a, b, c, d = (setup.register() for _ in range(4))
    ca, cb = srv.client(), srv.client()
    ca.login(a)
    cb.login(b)

    # Create and name it; C is offline.
    ca.send(f_group(a, ts(1700000500), [b, c]))
    (made,) = ca.read(1)
    group = made[2:15]
    assert made == s_added(group, ts(1700000500), [a, b, c]) and cb.read(1) == [made]
    ca.send(f_subject(a, group, ts(1700000501), "Trio ü".encode()))
    named = s_subject(group, a, ts(1700000501), "Trio ü".encode())
    assert ca.read(1) == [named] and cb.read(1) == [named]

    srv.restart(signal.SIGTERM)

    # Add D (offline, like C), then a message: D is a recipient, C too.
    ca, cb = srv.client(), srv.client()
    ca.login(a)
    cb.login(b)
    ca.send(f_add(a, group, ts(1700000502), [d]))
    four = s_added(group, ts(1700000502), [a, b, c, d])
    assert ca.read(1) == [four] and cb.read(1) == [four]
    ca.send(f_send(a, group, ts(1700000503), b"welcome, d"))
    welcome = s_message(a, group, ts(1700000503), b"welcome, d")
    assert cb.read(1) == [welcome]
    committed(srv, ca, a, cb, b, ts(1700000504))

    srv.restart(signal.SIGKILL)

    # C comes back after the crash: everything, in the order it was queued; then leaves.
    cc = srv.client()
    cc.login(c)
    assert cc.read(4) == [made, named, four, welcome]
    cb = srv.client()
    cb.login(b)  # A stays offline now
    cc.send(f_leave(c, group, ts(1700000505)))
    three = s_added(group, ts(1700000505), [a, b, d])
    assert cc.read(1) == [s_left(group, ts(1700000505))]
    assert cb.read(1) == [three]
    cc.send(f_send(c, group, ts(1700000506), b"still there?"))
    assert cc.read(1) == [s_error(b"05", b"07")]

    srv.restart(signal.SIGTERM)

    # D, added while offline: its 11, the group's 18 right after, only the later message, C's leave.
    cd = srv.client()
    cd.login(d)
    assert cd.read(4) == [four, named, welcome, three]
    # A was offline for the leave: its 11 waited, and its message's 07 with it.
    ca = srv.client()
    ca.login(a)
    assert ca.read(2) == [three, s_delivered(group, ts(1700000503))]
    # The leaver is told nothing more.
    cc = srv.client()
    cc.login(c)
    ca.send(f_subject(a, group, ts(1700000507), b"Trio, now without c"))
    renamed = s_subject(group, a, ts(1700000507), b"Trio, now without c")
    assert ca.read(1) == [renamed] and cd.read(1) == [renamed]
    committed(srv, ca, a, cd, d, ts(1700000508))
    cc.send(f_send(c, d, ts(1700000509), b"psst"))
    assert cd.read(1) == [s_message(c, d, ts(1700000509), b"psst")], "nothing for c came before this"
    assert cc.read(1) == [s_delivered(d, ts(1700000509))]
