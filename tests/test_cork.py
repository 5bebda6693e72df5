"""The cork: what a client gets during one read of another client (or its
own), or during the answers of one store commit, goes to its transport as
one write, in the order it was written; a frame written at any other time
goes out at once.

Each fake transport keeps its ``write`` calls (``WritesTransport``), so a
test can count them, not only read the bytes.
"""

from __future__ import annotations

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address

from chatproto.cork import Cork
from chatproto.domain import Domain
from chatproto.server import ChatFactory, Limits
from chatproto.store.memory import MemoryStore

from .helpers import (
    WritesTransport,
    f_send,
    parse_server,
    s_delivered,
    s_error,
    s_message,
    ts,
)

pytestmark = pytest.mark.usefixtures("no_logged_failures")

N = 50


def online(net, user):
    """Logged in, with the writes of the login forgotten."""
    conn = net.online(user)
    conn.transport.writes.clear()
    return conn


def two_online(net):
    a, _ = net.register()
    b, _ = net.register()
    return a, b, online(net, a), online(net, b)


def writes(conn) -> list[list[bytes]]:
    """The frames of each write call to ``conn`` since the last look, once the store is idle."""
    conn.net.settle()
    calls = [parse_server(data) for data in conn.transport.writes]
    conn.transport.writes.clear()
    conn.transport.clear()
    return calls


@pytest.mark.parametrize(
    "kind, first_contact",
    [("memory", True), ("sqlite", False), ("sqlite", True)],
    ids=["memory", "sqlite, written live in the read", "sqlite, written in the commit's answers"],
)
def test_many_05s_in_one_read_reach_the_reader_in_one_write(make_net, kind, first_contact):
    """On SQLite the 06s go out during the sender's read once the conversation
    is known (the live path), or with the answers of the commit that stored
    them the first time: one write either way, and the 07s in one more."""
    net = make_net(kind)
    a, b, ca, cb = two_online(net)
    start = 1
    if not first_contact:
        ca.send(f_send(a, b, ts(1), b"hello"))
        assert writes(cb) == [[s_message(a, b, ts(1), b"hello")]]
        assert writes(ca) == [[s_delivered(b, ts(1))]]
        start = 2
    stamps = range(start, start + N)
    ca.send(*[f_send(a, b, ts(i), b"m%d" % i) for i in stamps])
    assert writes(cb) == [[s_message(a, b, ts(i), b"m%d" % i) for i in stamps]]
    assert writes(ca) == [[s_delivered(b, ts(i)) for i in stamps]]


def test_one_commits_answers_to_one_reader_from_two_senders_are_one_write(make_net):
    net = make_net("sqlite")
    a, b, ca, cb = two_online(net)
    c, _ = net.register()
    cc = online(net, c)
    ca.send(*[f_send(a, b, ts(i), b"from a %d" % i) for i in range(1, 6)])
    cc.send(*[f_send(c, b, ts(i), b"from c %d" % i) for i in range(1, 6)])
    # Both reads came in one reactor turn: their messages share a commit.
    assert writes(cb) == [
        [s_message(a, b, ts(i), b"from a %d" % i) for i in range(1, 6)]
        + [s_message(c, b, ts(i), b"from c %d" % i) for i in range(1, 6)]
    ]


def test_errors_answered_in_the_middle_of_a_read_keep_their_place(net):
    """A 12 for a frame of the read goes out between what the frames before and
    after it brought to that connection, not ahead of them."""
    a, _ = net.register()
    ca = online(net, a)
    ca.send(f_send(a, a, ts(1), b"to myself"))  # the conversation is known from here on
    assert writes(ca) != []
    malformed = b"05" + a + a + ts(3) + b"\xff".ljust(218, b"\0")
    ca.send(
        f_send(a, a, ts(2), b"two"),
        malformed,
        f_send(a, b"0999999999999", ts(4), b"to nobody"),
        f_send(a, a, ts(5), b"five"),
    )
    if net.kind == "memory":
        # The store answers at once: each 07 comes within the read, after its 06.
        expected = [
            [
                s_message(a, a, ts(2), b"two"),
                s_delivered(a, ts(2)),
                s_error(b"05", b"01"),
                s_error(b"05", b"06"),
                s_message(a, a, ts(5), b"five"),
                s_delivered(a, ts(5)),
            ]
        ]
    else:
        # The 06s are written live during the read, the 07s with the commit after it.
        expected = [
            [
                s_message(a, a, ts(2), b"two"),
                s_error(b"05", b"01"),
                s_error(b"05", b"06"),
                s_message(a, a, ts(5), b"five"),
            ],
            [s_delivered(a, ts(2)), s_delivered(a, ts(5))],
        ]
    assert writes(ca) == expected


def test_a_rate_limit_error_comes_after_what_the_frames_before_it_brought(make_net):
    net = make_net("memory")
    net.factory.limits = Limits(frame_rate=1, frame_burst=4)  # the 03 takes one token
    a, _ = net.register()
    ca = online(net, a)
    ca.send(*[f_send(a, a, ts(i), b"m%d" % i) for i in range(1, 6)])
    # The three let through are one run: its 06s, then (the memory store
    # answers at once) its 07s, then the two refusals.
    assert writes(ca) == [
        [s_message(a, a, ts(i), b"m%d" % i) for i in range(1, 4)]
        + [s_delivered(a, ts(i)) for i in range(1, 4)]
        + [s_error(b"05", b"10")] * 2
    ]


class SlowStore(MemoryStore):
    """A MemoryStore whose accounts are committed a second later, on the clock:
    their answer comes from a timer, outside any read or commit."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock

    def add_user(self, user_id, secret_hash):
        super().add_user(user_id, secret_hash)
        return task.deferLater(self.clock, 1.0, lambda: None)


def test_a_frame_written_outside_any_read_or_commit_goes_out_at_once():
    clock = task.Clock()
    cork = Cork()
    factory = ChatFactory(Domain(SlowStore(clock)), cork, clock)
    transport = WritesTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 7000), peerAddress=IPv4Address("TCP", "127.0.0.1", 40000)
    )
    proto = factory.buildProtocol(transport.getPeer())
    proto.makeConnection(transport)
    proto.dataReceived(b"01" + b"13")
    assert transport.writes == [], "the accounts are not committed yet"
    clock.advance(1)
    assert cork.depth == 0 and cork.waiting == []
    assert [[f[:2] for f in parse_server(data)] for data in transport.writes] == [[b"02"], [b"14"]], (
        "each written when its answer came, not held for a later read"
    )
    transport.writes.clear()
    user = parse_server(transport.value())[0][2:15]
    proto.dataReceived(b"03" + user)
    assert [parse_server(data) for data in transport.writes] == [[b"04" + user]]


class _NoReactor:
    """Enough of a reactor for a tcp.Server that is never run."""

    def addReader(self, reader):
        pass

    def removeReader(self, reader):
        pass

    def addWriter(self, writer):
        self.writing = True

    def removeWriter(self, writer):
        pass


def test_with_nothing_buffered_a_tcp_write_reaches_the_socket_without_a_reactor_turn():
    """_write_now's fast path is taken with this Twisted (it reads private
    attributes of its transport; were one renamed, this fails instead of the
    server silently going back to a reactor turn per write)."""
    import socket

    from twisted.internet import tcp
    from twisted.internet.protocol import Protocol

    from chatproto.server import _write_now

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    reactor = _NoReactor()
    transport = tcp.Server(ours, Protocol(), ("127.0.0.1", 1), None, 1, reactor)
    try:
        _write_now(transport, b"04" + b"1" * 13)
        theirs.settimeout(1)
        assert theirs.recv(100) == b"04" + b"1" * 13
        assert not getattr(reactor, "writing", False), "written at once, not handed to the reactor"
        assert not transport.dataBuffer and not transport._tempDataBuffer
    finally:
        ours.close()
        theirs.close()
