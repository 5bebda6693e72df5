"""Groups people manage (17-21) over the wire: ChatProtocol on fake transports,
the SQLite store on its own thread (and the MemoryStore), byte for byte.

The field checks are the server's (12 XX 01/03/05, a 19 whose N cannot be
read); a restart in between shows every change and every held 11, 18 and
21 coming back from the database.
"""

from __future__ import annotations

import pytest

from .helpers import (
    f_add,
    f_group,
    f_leave,
    f_online,
    f_send,
    f_subject,
    name_field,
    s_added,
    s_error,
    s_left,
    s_message,
    s_subject,
    ts,
)

pytestmark = pytest.mark.usefixtures("no_logged_failures")

NOWHERE = b"1000000000000"


def made_group(net, creator_conn, creator: bytes, others: list[bytes], when=b"0000000001") -> bytes:
    creator_conn.send(f_group(creator, when, others))
    (frame,) = creator_conn.take()
    assert frame[:2] == b"11"
    return frame[2:15]


@pytest.mark.parametrize(
    "frame_for",
    [
        # NAME: empty, a NUL inside, invalid UTF-8
        lambda a, g: b"17" + a + g + ts(5) + b"\0" * 64,
        lambda a, g: b"17" + a + g + ts(5) + name_field(b"a\0b"),
        lambda a, g: b"17" + a + g + ts(5) + name_field(b"\xc3("),
        # ids and timestamps that are not digits
        lambda a, g: b"17" + a[:-1] + b"x" + g + ts(5) + name_field(b"ok"),
        lambda a, g: b"17" + a + g + b"17000000x0" + name_field(b"ok"),
    ],
)
def test_a_malformed_17_gets_12_17_01(net, frame_for):
    a, _ = net.register()
    conn = net.online(a)
    group = made_group(net, conn, a, [a])
    conn.send(frame_for(a, group))
    assert conn.take() == [s_error(b"17", b"01")]
    assert not conn.closed


def test_a_malformed_19_or_20_gets_its_01_and_the_connection_goes_on(net):
    a, _ = net.register()
    conn = net.online(a)
    group = made_group(net, conn, a, [a])
    conn.send(f_add(a, group, ts(2), []))  # N=00: 40 bytes, skippable
    conn.send(f_add(a, group, ts(2), [b"0x00000000001"]))
    conn.send(f_leave(a, group[:-1] + b"?", ts(2)))
    assert conn.take() == [s_error(b"19", b"01"), s_error(b"19", b"01"), s_error(b"20", b"01")]
    conn.send(f_leave(a, group, ts(3)))
    assert conn.take() == [s_left(group, ts(3))]


def test_a_19_whose_n_is_not_digits_gets_12_19_01_and_a_close(net):
    a, _ = net.register()
    conn = net.online(a)
    group = made_group(net, conn, a, [a])
    conn.send(b"19" + a + group + ts(2) + b"x1" + a)
    assert conn.take() == [s_error(b"19", b"01")]
    assert conn.closed


def test_before_login_and_with_another_src(net):
    a, _ = net.register()
    b, _ = net.register()
    conn = net.connect()
    conn.send(f_subject(a, NOWHERE, ts(1), b"x"), f_add(a, NOWHERE, ts(1), [b]), f_leave(a, NOWHERE, ts(1)))
    assert conn.take() == [s_error(code, b"03") for code in (b"17", b"19", b"20")]
    conn.send(f_online(a))
    assert conn.take() == [b"04" + a]
    conn.send(f_subject(b, NOWHERE, ts(1), b"x"), f_add(b, NOWHERE, ts(1), [a]), f_leave(b, NOWHERE, ts(1)))
    assert conn.take() == [s_error(code, b"05") for code in (b"17", b"19", b"20")]
    conn.send(f_subject(a, NOWHERE, ts(1), b"x"), f_add(a, NOWHERE, ts(1), [b]), f_leave(a, NOWHERE, ts(1)))
    assert conn.take() == [s_error(code, b"06") for code in (b"17", b"19", b"20")]
    conn.send(f_subject(a, b, ts(1), b"x"))
    assert conn.take() == [s_error(b"17", b"06")], "a user's id is no group"


def test_a_full_session_byte_for_byte(net):
    """Create, name, add, leave; the frames each member gets, in order."""
    a, _ = net.register()
    b, _ = net.register()
    c, _ = net.register()
    ca, cb, cc = net.online(a), net.online(b), net.online(c)
    group = made_group(net, ca, a, [b])
    cb.take()
    ca.send(f_subject(a, group, ts(2), "Café ☕".encode()))
    named = s_subject(group, a, ts(2), "Café ☕".encode())
    assert ca.take() == [named] and cb.take() == [named]
    cb.send(f_add(b, group, ts(3), [c, a]))
    three = s_added(group, ts(3), [a, b, c])
    assert cc.take() == [three, named]
    assert ca.take() == [three] and cb.take() == [three]
    ca.send(f_send(a, group, ts(4), b"hello both"))
    assert cb.take() == [s_message(a, group, ts(4), b"hello both")]
    assert cc.take() == [s_message(a, group, ts(4), b"hello both")]
    assert ca.take() == [b"07" + group + ts(4)]
    cc.send(f_leave(c, group, ts(5)))
    assert cc.take() == [s_left(group, ts(5))]
    assert ca.take() == [s_added(group, ts(5), [a, b])] and cb.take() == [s_added(group, ts(5), [a, b])]
    cc.send(f_send(c, group, ts(6), b"still here?"))
    assert cc.take() == [s_error(b"05", b"07")]


def test_an_added_member_gets_its_11_before_a_message_sent_right_after_the_19(net):
    """A conversation that goes live (b's first message is committed) writes an
    06 at once, but the 11 waits for the addition's commit: meanwhile the
    group's messages take the held way, recorded after the addition."""
    a, _ = net.register()
    b, _ = net.register()
    c, _ = net.register()
    ca, cb, cc = net.online(a), net.online(b), net.online(c)
    group = made_group(net, ca, a, [b])
    cb.take()
    cb.send(f_send(b, group, ts(2), b"first"))
    assert ca.take() == [s_message(b, group, ts(2), b"first")]
    cb.take()
    cb.send(f_add(b, group, ts(3), [c]), f_send(b, group, ts(4), b"hi c"))
    three = s_added(group, ts(3), [a, b, c])
    assert cc.take() == [three, s_message(b, group, ts(4), b"hi c")]
    assert ca.take() == [three, s_message(b, group, ts(4), b"hi c")]
    assert cb.take() == [three, b"07" + group + ts(4)]
    cb.send(f_send(b, group, ts(5), b"live again"))
    assert cc.take() == [s_message(b, group, ts(5), b"live again")]


def test_changes_and_what_they_held_survive_a_restart(make_net):
    """Offline members at each step; a restart between each step and the logins."""
    net = make_net("sqlite")
    a, _ = net.register()
    b, _ = net.register()
    c, _ = net.register()
    d, _ = net.register()
    ca = net.online(a)
    group = made_group(net, ca, a, [b, c])
    ca.send(f_subject(a, group, ts(2), b"Before"))
    ca.send(f_send(a, group, ts(3), b"to b and c"))
    ca.send(f_add(a, group, ts(4), [d]))
    assert ca.take() == [s_subject(group, a, ts(2), b"Before"), s_added(group, ts(4), [a, b, c, d])]
    net.restart()
    cc = net.online(c)
    assert cc.held == [
        s_added(group, ts(1), [a, b, c]),
        s_subject(group, a, ts(2), b"Before"),
        s_message(a, group, ts(3), b"to b and c"),
        s_added(group, ts(4), [a, b, c, d]),
    ]
    cc.send(f_leave(c, group, ts(5)))
    assert cc.take() == [s_left(group, ts(5))]
    net.restart()
    cd = net.online(d)
    assert cd.held == [
        s_added(group, ts(4), [a, b, c, d]),
        s_subject(group, a, ts(2), b"Before"),
        s_added(group, ts(5), [a, b, d]),
    ]
    cb = net.online(b)
    assert cb.held == [
        s_added(group, ts(1), [a, b, c]),
        s_subject(group, a, ts(2), b"Before"),
        s_message(a, group, ts(3), b"to b and c"),
        s_added(group, ts(4), [a, b, c, d]),
        s_added(group, ts(5), [a, b, d]),
    ]
    ca = net.online(a)
    assert ca.held == [s_added(group, ts(5), [a, b, d]), b"07" + group + ts(3)]
    cc = net.online(c)
    assert cc.held == []
    cc.send(f_subject(c, group, ts(6), b"mine now"))
    assert cc.take() == [s_error(b"17", b"07")], "membership came back from the database"
