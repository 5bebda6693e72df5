"""Per-address admission and the per-user quotas, on fake transports and a fake clock.

An attacker here is a connection from 127.0.0.2 (or an IPv6 address); the
machine itself (127.0.0.1, ::1) is trusted and limited by nothing of this.
Every rate is driven by the test's clock (``net.reactor.advance``).
"""

from __future__ import annotations

import pytest
from twisted.logger import LogLevel, globalLogPublisher

from chatproto import admission as adm
from chatproto import service
from chatproto.admission import Admission, Policy, address_key
from chatproto.server import _WINDOW, Limits

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
    s_error,
    ts,
)

ATTACKER = "127.0.0.2"


def policy(net, **kwargs) -> Admission:
    """The net's factory with this policy, for the connections made from now on."""
    net.factory.admission = Admission(net.reactor, Policy(**kwargs))
    return net.factory.admission


def register_from(net, host: str, code: bytes = b"01") -> bytes:
    conn = net.connect(host)
    conn.send(code)
    (frame,) = conn.take()
    conn.lose()
    return frame


# -- what an address is -------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("198.51.100.7", "198.51.100.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        ("::ffff:198.51.100.7", "198.51.100.7"),
        ("fe80::1%eth0", "fe80::/64"),
    ],
)
def test_an_ipv6_client_counts_by_its_64_and_a_mapped_ipv4_as_itself(host, key):
    assert address_key(host) == key


def test_the_machine_itself_is_trusted_by_default_and_the_rest_of_loopback_is_not():
    admission = Admission(None)
    assert admission.is_trusted("127.0.0.1")
    assert admission.is_trusted("::1")
    assert admission.is_trusted("::ffff:127.0.0.1")
    assert admission.is_trusted(None), "a UNIX socket is someone on this machine"
    assert not admission.is_trusted("127.0.0.2")
    assert not admission.is_trusted("10.0.0.1")
    assert Admission(None, Policy(trusted=("10.0.0.0/8",))).is_trusted("10.2.3.4")


# -- connections ---------------------------------------------------------------------


def test_connections_at_once_per_address_past_the_share_get_12_00_11(net):
    policy(net, connections=2)
    first, second = net.connect(ATTACKER), net.connect(ATTACKER)
    third = net.connect(ATTACKER)
    assert third.take() == [s_error(b"00", b"11")]
    assert third.closed
    assert not first.closed and not second.closed
    # Another address, and the trusted machine, are not counted with it.
    other = net.connect("127.0.0.3")
    assert other.take() == [] and not other.closed
    locals_ = [net.connect() for _ in range(5)]
    assert not any(c.closed for c in locals_)
    # A place freed is the address's again.
    third.lose()
    first.lose()
    net.reactor.advance(1.0)  # and its connection rate's token
    again = net.connect(ATTACKER)
    assert again.take() == [] and not again.closed


def test_new_connections_a_second_per_address_past_the_rate_get_12_00_10(net):
    policy(net, connections=3, connect_rate=1.0)
    for _ in range(3):  # a burst of --max-address-connections
        conn = net.connect(ATTACKER)
        assert not conn.closed
        conn.lose()
    refused = net.connect(ATTACKER)
    assert refused.take() == [s_error(b"00", b"10")]
    assert refused.closed
    net.reactor.advance(1.0)
    assert not net.connect(ATTACKER).closed


def test_an_ipv6_64_shares_one_count(net):
    policy(net, connections=1)
    assert not net.connect("2001:db8::1").closed
    assert net.connect("2001:db8::2").closed, "the same /64"
    assert not net.connect("2001:db8:0:1::1").closed, "another /64"


# -- frames ----------------------------------------------------------------------------


def test_frames_a_second_are_counted_per_address_so_reconnecting_buys_no_new_burst(net):
    policy(net, frame_rate=5.0, frame_burst=10.0)
    first = net.connect(ATTACKER)
    first.send(*[f_received(b"0" * 13, b"0" * 13, ts(i)) for i in range(10)])  # ignored before login
    assert first.take() == []
    first.lose()
    second = net.connect(ATTACKER)
    late = f_send(b"0" * 13, b"0" * 13, ts(1), b"x")  # answered 12 05 03 when it is read
    second.send(f_received(b"0" * 13, b"0" * 13, ts(99)), late, late)
    assert second.take() == [s_error(b"16", b"10")], "the frames after it wait, unrefused"
    net.reactor.advance(0.19)
    assert second.take() == []
    net.reactor.advance(0.3)  # two tokens back: both are read now
    assert second.take() == [s_error(b"05", b"03")] * 2
    net.reactor.advance(1.0)  # 5 tokens back
    second.send(*[f_received(b"0" * 13, b"0" * 13, ts(i)) for i in range(6)])
    assert second.take() == [s_error(b"16", b"10")]
    # The trusted machine is never refused.
    local = net.connect()
    local.send(*[f_received(b"0" * 13, b"0" * 13, ts(i)) for i in range(50)])
    assert local.take() == []
    assert net.factory.admission.events[adm.FRAMES_REFUSED] == 2


def test_registrations_per_address_per_hour(net):
    policy(net, registrations=3)
    assert [register_from(net, ATTACKER)[:2] for _ in range(3)] == [b"02"] * 3
    assert register_from(net, ATTACKER) == s_error(b"01", b"10")
    assert register_from(net, ATTACKER, b"13") == s_error(b"13", b"10")
    assert register_from(net, "127.0.0.3")[:2] == b"02", "another address has its own"
    assert register_from(net, "127.0.0.1")[:2] == b"02", "the machine itself is not limited"
    net.reactor.advance(3600 / 3)
    assert register_from(net, ATTACKER)[:2] == b"02", "one more after a third of an hour"
    assert register_from(net, ATTACKER) == s_error(b"01", b"10")


def test_group_changes_per_user_per_hour(net):
    policy(net, group_changes=2)
    a, _ = net.register()
    b, _ = net.register()
    conn = net.connect(ATTACKER)
    conn.send(f_online(a))
    assert conn.take()[0] == b"04" + a
    conn.send(*[f_group(a, ts(i), [b]) for i in range(3)])
    frames = conn.take()
    assert sorted(f[:2] for f in frames) == [b"11", b"11", b"12"]
    assert s_error(b"10", b"10") in frames
    other = net.connect(ATTACKER)
    other.send(f_online(b))
    other.take()
    other.send(f_group(b, ts(5), [a]))
    assert other.take()[0][:2] == b"11", "another user has its own"
    net.reactor.advance(1800)
    conn.send(f_group(a, ts(10), [b]))
    assert conn.take()[0][:2] == b"11"


def test_subjects_and_additions_spend_the_same_group_changes(net):
    policy(net, group_changes=3)
    a, _ = net.register()
    b, _ = net.register()
    c, _ = net.register()
    conn = net.connect(ATTACKER)
    conn.send(f_online(a))
    conn.take()
    conn.send(f_group(a, ts(1), [b]))
    (added,) = conn.take()
    group = added[2:15]
    conn.send(f_subject(a, group, ts(2), b"one"), f_add(a, group, ts(3), [c]))
    assert sorted(f[:2] for f in conn.take()) == [b"11", b"18"], "the third change goes through"
    conn.send(f_subject(a, group, ts(4), b"two"), f_add(a, group, ts(5), [c]))
    assert conn.take() == [s_error(b"17", b"10"), s_error(b"19", b"10")]
    conn.send(f_leave(a, group, ts(6)))
    assert [f[:2] for f in conn.take()] == [b"21"], "leaving costs nothing"


def test_an_addition_past_a_members_group_cap_gets_12_19_11(make_net):
    net = make_net("memory")
    net.domain.groups.max_groups_per_user = 1
    a, _ = net.register()
    b, _ = net.register()
    c, _ = net.register()
    conn = net.online(a)
    conn.send(f_group(a, ts(1), [b]))
    (added,) = conn.take()
    other = net.online(c)
    other.send(f_group(c, ts(2), [c]))
    (own,) = other.take()
    conn.send(f_add(a, added[2:15], ts(3), [c]))
    assert conn.take() == [s_error(b"19", b"11")], "c is in a group already"
    other.send(f_leave(c, own[2:15], ts(4)))
    other.take()
    conn.send(f_add(a, added[2:15], ts(5), [c]))
    assert [f[:2] for f in conn.take()] == [b"11"], "leaving made room"


# -- failed logins ---------------------------------------------------------------------


def test_failed_logins_from_an_address_make_its_next_login_wait_longer_each_time(net):
    policy(net, free_failures=2, failure_delay=1.0, max_failure_delay=4.0)
    user, secret = net.register(with_secret=True)
    wrong = f_online_secret(user, b"0" * 32)
    conn = net.connect(ATTACKER)
    conn.send(wrong, wrong)
    assert conn.take() == [s_error(b"15", b"08")] * 2, "the free ones are answered at once"
    conn.send(wrong)  # the third failure: the next login waits 1 s
    assert conn.take() == [s_error(b"15", b"08")]
    conn.send(wrong)
    assert conn.take() == []
    net.reactor.advance(0.99)
    assert conn.take() == []
    net.reactor.advance(0.01)
    assert conn.take() == [s_error(b"15", b"08")]
    # The fourth failure doubles it; another connection from the address waits as well.
    other = net.connect(ATTACKER)
    other.send(f_online_secret(user, secret))
    net.reactor.advance(1.99)
    assert other.take() == []
    net.reactor.advance(0.01)
    assert other.take()[0] == b"04" + user
    # Up to the cap, not past it.
    for _ in range(4):
        conn.send(wrong)
        net.reactor.advance(4.0)
        assert conn.take() == [s_error(b"15", b"08")]
    # The machine itself never waits.
    local = net.connect()
    local.send(wrong, wrong, wrong, wrong, f_online(b"0" * 13))
    assert local.take() == [s_error(b"15", b"08")] * 4 + [s_error(b"03", b"04")]


def test_failures_are_forgiven_with_time(net):
    admission = policy(net, free_failures=1, failure_delay=1.0)
    conn = net.connect(ATTACKER)
    conn.send(f_online(b"0" * 13), f_online(b"0" * 13))
    net.reactor.advance(1.0)
    assert conn.take() == [s_error(b"03", b"04")] * 2
    net.reactor.advance(2 * adm.FAILURE_DECAY)
    conn = net.connect(ATTACKER)  # the first one was closed by the login timeout meanwhile
    conn.send(f_online(b"0" * 13))
    assert conn.take() == [s_error(b"03", b"04")]
    assert admission.events[adm.FAILED_LOGINS] == 3
    assert admission.events[adm.LOGINS_DELAYED] == 0, "the wait was over, and forgiven"


# -- summaries -------------------------------------------------------------------------


def test_refusals_are_logged_as_one_summary_line_per_address(net):
    admission = policy(net, frame_rate=1.0, frame_burst=1.0)
    lines = []
    observer = lines.append
    globalLogPublisher.addObserver(observer)
    try:
        for _ in range(3):
            conn = net.connect(ATTACKER)
            conn.send(*[f_received(b"0" * 13, b"0" * 13, ts(i)) for i in range(1000)])
            conn.send(f_send(b"0" * 13, b"0" * 13, ts(1), b"x"))
            conn.lose()
        before_tick = [
            e
            for e in lines
            if e.get("log_namespace", "").startswith("chatproto") and e["log_level"] >= LogLevel.info
        ]
        net.factory.tick()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert before_tick == [], "nothing logged per refused frame"
    summaries = [e for e in lines if e.get("address") == ATTACKER]
    assert len(summaries) == 1
    assert "3 frames refused" in summaries[0]["said"], "one each: the rest waited unread"
    assert "3 connections" in summaries[0]["said"]
    assert admission.events[adm.FRAMES_REFUSED] == 3
    # A quiet address is forgotten at the next look.
    net.reactor.advance(3600)
    net.factory.tick()
    assert ATTACKER not in admission.peers


# -- memory: what one connection may queue ----------------------------------------------


def test_a_connection_stops_being_read_while_its_work_for_the_store_is_over_the_window(make_net):
    """One read of 01s past two windows, the store not answering: at most two windows are
    handed to the store; the rest waits unframed, and is answered once the
    store catches up. The machine itself is bounded the same way."""
    net = make_net("sqlite")
    net.factory.limits = Limits(frame_rate=0)
    conn = net.connect()
    count = 2 * _WINDOW + 40_000  # the 40,000 left are 80 KB: more than a stall keeps unread
    conn.send(b"01" * count)
    net.reactor.advance(0)
    submitted = len(net.store.deferreds)
    assert submitted <= 2 * _WINDOW + 4, submitted  # and the two windows' barriers
    assert conn.transport.producerState == "paused", "a client is read no further meanwhile"
    frames = conn.take()
    assert [f[:2] for f in frames] == [b"02"] * count


def test_past_the_backlog_bound_a_newcomer_gets_12_00_11(make_net):
    net = make_net("memory")
    net.store.inner.backlog = 100_000
    conn = net.connect()
    assert conn.transport.value() == s_error(b"00", b"11")
    net.store.inner.backlog = 0
    assert not net.connect().closed


def test_a_client_that_does_not_read_is_read_no_further(net):
    conn = net.connect(ATTACKER)
    conn.proto.pauseProducing()  # the transport's buffer is full: the client is not reading
    assert conn.transport.producerState == "paused"
    conn.proto.resumeProducing()
    assert conn.transport.producerState == "producing"


def test_refusals_to_a_client_that_does_not_read_are_bounded_by_max_buffer(net):
    net.factory.limits = Limits(max_buffer=600, frame_rate=1.0, frame_burst=1.0)
    conn = net.connect()  # trusted: only its connection's own budget, refused frame by frame
    conn.proto.pauseProducing()
    conn.send(*[f_received(b"0" * 13, b"0" * 13, ts(i)) for i in range(500)])
    assert conn.transport.disconnecting, "dropped once past --max-buffer"
    assert len(conn.transport.value()) <= 600 + 6


# -- disk: what is held for a user, and groups --------------------------------------------


def test_held_notices_count_against_max_held_and_an_08_past_it_gets_12_08_11(make_net):
    net = make_net("memory", max_held=3)
    victim, _ = net.register()
    a, _ = net.register()
    conn = net.online(a)
    conn.send(f_seen(victim, ts(1)), f_seen(victim, ts(2)), f_seen(victim, ts(3)))
    assert conn.take() == []
    conn.send(f_seen(victim, ts(4)), f_send(a, victim, ts(5), b"x"))
    assert conn.take() == [s_error(b"08", b"11"), s_error(b"05", b"11")]
    assert len(net.result(net.store.inbox(victim.decode()))) == 3


def test_a_full_inbox_is_logged_once_even_when_notices_took_it_past_the_cap(make_net):
    """Held 11s are counted but never refused, so they may take a count past
    --max-held without meeting it: the warning must not depend on meeting it."""
    net = make_net("memory", max_held=2)
    victim, _ = net.register()
    a, _ = net.register()
    conn = net.online(a)
    conn.send(*[f_group(a, ts(i), [victim]) for i in range(1, 4)])  # three 11s held: 3 > 2
    assert [f[:2] for f in conn.take()] == [b"11"] * 3
    lines = []
    globalLogPublisher.addObserver(lines.append)
    try:
        conn.send(f_send(a, victim, ts(5), b"x"), f_send(a, victim, ts(6), b"y"))
        assert conn.take() == [s_error(b"05", b"11")] * 2
    finally:
        globalLogPublisher.removeObserver(lines.append)
    warned = [e for e in lines if e.get("log_format", "").startswith("held data cap reached")]
    assert [e["user"] for e in warned] == [victim.decode()], "once for the user, not per 05"


def test_a_group_past_a_members_group_cap_gets_12_10_11(make_net):
    net = make_net("memory")
    net.domain.groups.max_groups_per_user = 2
    a, _ = net.register()
    b, _ = net.register()
    c, _ = net.register()
    conn = net.online(a)
    conn.send(f_group(a, ts(1), [b]), f_group(a, ts(2), [b, c]))
    assert [f[:2] for f in conn.take()] == [b"11", b"11"]
    conn.send(f_group(a, ts(3), [c]))
    assert conn.take() == [s_error(b"10", b"11")], "a is in two groups already"
    other = net.online(c)
    other.send(f_group(c, ts(4), [c]))
    assert [f[:2] for f in other.take()] == [b"11"], "c is in one"


# -- descriptors ------------------------------------------------------------------------------


class FakeResource:
    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft, hard, grant=True):
        self.limits = (soft, hard)
        self.grant = grant

    def getrlimit(self, which):
        return self.limits

    def setrlimit(self, which, limits):
        if not self.grant:
            raise ValueError("not allowed")
        self.limits = limits


def test_the_soft_descriptor_limit_is_raised_and_a_cap_that_does_not_fit_is_lowered(monkeypatch):
    import sys

    fake = FakeResource(1024, 4096)
    monkeypatch.setitem(sys.modules, "resource", fake)
    assert service.fit_connections(2000) == 2000
    assert fake.limits == (4096, 4096)
    assert service.fit_connections(20000) == 4096 - service.RESERVED_DESCRIPTORS
    monkeypatch.setitem(sys.modules, "resource", FakeResource(1024, 4096, grant=False))
    assert service.fit_connections(20000) == 1024 - service.RESERVED_DESCRIPTORS
