"""The domain alone: each job driven with fake connections and a MemoryStore, no ChatProtocol.

The MemoryStore answers at once, so every effect of a call is visible when
it returns.
"""

from __future__ import annotations

from functools import partial

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from chatproto import wire
from chatproto.domain import DatabaseRouting, Domain, IConnection, State
from chatproto.domain.session import IllegalTransition, Session
from chatproto.server import ChatProtocol
from chatproto.store import ListenerAway, Reconnected, StoreUnavailable
from chatproto.store.memory import MemoryStore

from .helpers import s_added, s_delivered, s_error, s_message, s_seen_by, ts


@implementer(IConnection)
class FakeConnection:
    """Records frames; ``paused`` as a transport would set it; ``full`` refuses writes."""

    def __init__(self):
        self.paused = False
        self.full = False
        self.frames: list[bytes] = []
        self.closed_with: bytes | None = None
        self.stalls: list = []

    def write(self, frame: bytes) -> bool:
        return self.write_many([frame])

    def write_many(self, frames, code=None) -> bool:
        if self.full or self.closed_with is not None:
            return False
        self.frames.extend(frames)
        return True

    def error(self, ref, reason) -> None:
        self.frames.append(wire.error(ref, reason))

    def close_with(self, frame) -> None:
        self.frames.append(frame)
        self.closed_with = frame

    def stall(self, d) -> None:
        self.stalls.append(d)

    def take(self) -> list[bytes]:
        frames, self.frames = self.frames, []
        return frames


def user(domain) -> bytes:
    session = domain.open(FakeConnection())
    domain.register(session, with_secret=False)
    (frame,) = session.connection.take()
    return wire.decode_registered(frame).user


def online(domain, who: bytes) -> Session:
    session = domain.open(FakeConnection())
    domain.login(session, who, None, wire.ONLINE)
    assert session.connection.frames[0] == wire.online_ok(who)
    del session.connection.frames[0]  # what was held stays for the test to take
    return session


def message(src, dst, when, text):
    return (src, dst, when, text, wire.message(src, dst, when, text))


def test_the_server_connection_provides_what_a_session_needs():
    assert IConnection.implementedBy(ChatProtocol)
    verifyObject(IConnection, FakeConnection())


# -- sessions --------------------------------------------------------------


def test_a_session_goes_through_its_states(domain):
    a = user(domain)
    session = domain.open(FakeConnection())
    assert session.state is State.CONNECTED and not session.takes_frames
    domain.login(session, a, None, wire.ONLINE)
    assert session.state is State.LIVE and session.takes_frames, "nothing held: the flush ends at once"
    domain.behind(session)
    assert session.state is State.BEHIND and not session.takes_frames
    domain.drained(session)
    assert session.state is State.LIVE
    domain.logout(session, closed=True)
    assert session.state is State.CLOSED and session.user is None and a not in domain.sessions


def test_a_session_refuses_an_edge_the_diagram_lacks():
    session = Session(FakeConnection())
    with pytest.raises(IllegalTransition):
        session.to(State.LIVE)
    session.to(State.CLOSED)
    with pytest.raises(IllegalTransition):
        session.to(State.FLUSHING)


def test_a_paused_live_session_takes_frames_but_not_the_live_way(domain):
    a, b = user(domain), user(domain)
    sa, sb = online(domain, a), online(domain, b)
    sb.connection.paused = True
    assert sb.takes_frames and not sb.delivers_on_write
    domain.send_many(sa, [message(a, b, ts(1), b"held way")])
    assert sb.connection.take() == [s_message(a, b, ts(1), b"held way")]
    assert sa.connection.take() == [s_delivered(b, ts(1))]


# -- accounts ----------------------------------------------------------------


def test_register_and_login_with_a_secret(domain):
    session = domain.open(FakeConnection())
    domain.register(session, with_secret=True)
    (frame,) = session.connection.take()
    who, secret = wire.decode_registered(frame)
    assert frame[:2] == wire.REGISTERED_SECRET and wire.is_secret(secret)
    domain.login(session, who, None, wire.ONLINE)
    assert session.connection.take() == [s_error(b"03", b"08")] and session.user is None
    domain.login(session, who, b"0" * 32, wire.ONLINE_SECRET)
    assert session.connection.take() == [s_error(b"15", b"08")]
    domain.login(session, who, secret, wire.ONLINE_SECRET)
    assert session.connection.take() == [wire.online_ok(who)] and session.acknowledges


def test_a_second_login_closes_the_first(domain):
    a = user(domain)
    first = online(domain, a)
    second = online(domain, a)
    assert first.connection.closed_with == s_error(b"03", b"09")
    assert first.state is State.CONNECTED and domain.sessions[a] is second


def test_login_of_an_unknown_user_is_refused(domain):
    session = domain.open(FakeConnection())
    domain.login(session, b"0" * 13, None, wire.ONLINE)
    assert session.connection.take() == [s_error(b"03", b"04")]


# -- delivery ----------------------------------------------------------------


def test_the_live_way_writes_the_06_then_the_07(domain):
    a, b = user(domain), user(domain)
    sa, sb = online(domain, a), online(domain, b)
    domain.send_many(sa, [message(a, b, ts(1), b"one"), message(a, b, ts(2), b"two")])
    assert sb.connection.take() == [s_message(a, b, ts(1), b"one"), s_message(a, b, ts(2), b"two")]
    assert sa.connection.take() == [s_delivered(b, ts(1)), s_delivered(b, ts(2))]


def test_the_held_way_flushes_in_order_at_login_and_confirms_then(domain):
    a, b = user(domain), user(domain)
    sa = online(domain, a)
    domain.send_many(sa, [message(a, b, ts(i), b"m%d" % i) for i in (1, 2, 3)])
    assert sa.connection.take() == []
    sb = online(domain, b)
    assert sb.connection.take() == [s_message(a, b, ts(i), b"m%d" % i) for i in (1, 2, 3)]
    assert sa.connection.take() == [s_delivered(b, ts(i)) for i in (1, 2, 3)]


def test_a_resend_is_not_delivered_twice_and_gets_its_07_again(domain):
    a, b = user(domain), user(domain)
    sa, sb = online(domain, a), online(domain, b)
    domain.send_many(sa, [message(a, b, ts(1), b"once")])
    sb.connection.take(), sa.connection.take()
    domain.send_many(sa, [message(a, b, ts(1), b"once")])
    assert sb.connection.take() == []
    assert sa.connection.take() == [s_delivered(b, ts(1))]


def test_a_reader_behind_gets_what_came_meanwhile_once_it_drains(domain):
    a, b = user(domain), user(domain)
    sa, sb = online(domain, a), online(domain, b)
    domain.behind(sb)
    domain.send_many(sa, [message(a, b, ts(1), b"while behind")])
    assert sb.connection.take() == [] and sa.connection.take() == []
    domain.drained(sb)
    assert sb.state is State.LIVE
    assert sb.connection.take() == [s_message(a, b, ts(1), b"while behind")]
    assert sa.connection.take() == [s_delivered(b, ts(1))]


def test_a_15_session_confirms_only_with_its_16(domain):
    a = user(domain)
    reg = domain.open(FakeConnection())
    domain.register(reg, with_secret=True)
    b, secret = wire.decode_registered(reg.connection.take()[0])
    sa = online(domain, a)
    sb = domain.open(FakeConnection())
    domain.login(sb, b, secret, wire.ONLINE_SECRET)
    sb.connection.take()
    domain.send_many(sa, [message(a, b, ts(1), b"ack me")])
    assert sb.connection.take() == [s_message(a, b, ts(1), b"ack me")]
    assert sa.connection.take() == [], "written is not acknowledged"
    domain.received(sb, a, b, ts(1))
    assert sa.connection.take() == [s_delivered(b, ts(1))]


def test_a_message_to_no_one_is_refused(domain):
    a = user(domain)
    sa = online(domain, a)
    domain.send_many(sa, [message(a, b"1" + b"0" * 12, ts(1), b"nobody")])
    assert sa.connection.take() == [s_error(b"05", b"06")]


# -- receipts and groups ---------------------------------------------------


def test_an_08_becomes_a_09_for_the_sender_held_while_it_is_offline(domain):
    a, b = user(domain), user(domain)
    sb = online(domain, b)
    domain.seen(sb, a, ts(5))
    sa = online(domain, a)
    assert sa.connection.take() == [s_seen_by(b, ts(5))]


def test_a_group_gets_its_11_and_its_low_mark_moves_when_all_have_read(domain):
    a, b, c = user(domain), user(domain), user(domain)
    sa, sb = online(domain, a), online(domain, b)
    domain.create_group(sa, ts(1), [b, c])
    (frame,) = sa.connection.take()
    group = wire.decode_group(frame).ident
    assert frame == s_added(group, ts(1), [a, b, c]) and sb.connection.take() == [frame]
    domain.send_many(sa, [message(a, group, ts(2), b"to all")])
    assert sb.connection.take() == [s_message(a, group, ts(2), b"to all")]
    sc = online(domain, c)
    assert sc.connection.take() == [frame, s_message(a, group, ts(2), b"to all")]
    assert sa.connection.take() == [s_delivered(group, ts(2))]
    domain.seen(sb, group, ts(2))
    assert sa.connection.take() == []
    domain.seen(sc, group, ts(2))
    low = s_seen_by(group, ts(2))
    assert sa.connection.take() == [low] and sb.connection.take() == [low] and sc.connection.take() == [low]
    domain.seen(sb, group, ts(9))
    domain.seen(sb, b"1" + b"0" * 12, ts(9))
    assert sb.connection.take() == [s_error(b"08", b"06")]


# -- several nodes: DatabaseRouting over a store whose listener can drop -------------


class ListeningMemoryStore(MemoryStore):
    """A MemoryStore with a clustered store's listener, whose syncs the test answers."""

    node = "node-a"

    def __init__(self):
        super().__init__()
        self.syncs: list[Deferred] = []
        self.handler = None

    def listen(self, handler):
        self.handler = handler
        return succeed(None)

    def claim_session(self, user, when, wanted):
        return succeed(None)

    def release_session(self, user):
        return succeed(None)

    def sync(self):
        self.syncs.append(Deferred())
        return self.syncs[-1]


def test_a_listener_dropping_during_a_login_flush_keeps_the_login():
    """The flush waits for the listener to come back and goes on, instead of
    closing a login the client would see fail with 12 03 11."""
    store = ListeningMemoryStore()
    domain = Domain(store, partial(DatabaseRouting, clock=Clock()))
    domain.start()
    b = user(domain)
    session = domain.open(FakeConnection())
    domain.login(session, b, None, wire.ONLINE)
    assert session.connection.take() == [wire.online_ok(b)]
    assert session.state is State.FLUSHING and len(store.syncs) == 1
    store.syncs.pop().errback(ListenerAway("the listener lost its connection"))
    assert session.connection.closed_with is None and session.state is State.FLUSHING
    store.handler(Reconnected())  # the catch-up flushes again, and syncs again
    store.syncs.pop().callback(None)
    assert session.state is State.LIVE and session.connection.closed_with is None


def test_a_store_failure_during_a_login_flush_still_closes_the_login():
    store = ListeningMemoryStore()
    domain = Domain(store, partial(DatabaseRouting, clock=Clock()))
    domain.start()
    b = user(domain)
    session = domain.open(FakeConnection())
    domain.login(session, b, None, wire.ONLINE)
    store.syncs.pop().errback(StoreUnavailable("the database is gone"))
    assert session.connection.take() == [wire.online_ok(b), wire.error(wire.ONLINE, wire.BUSY)]
    assert session.connection.closed_with == wire.error(wire.ONLINE, wire.BUSY)
