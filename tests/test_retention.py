"""What the server keeps of a message, and for how long (issue 19).

A message's text stays only while a recipient still waits for it; its
identity stays for the dedup window (a resend within it gets its 07 again and
is not delivered twice; after it, a resend is a new message); nothing
undelivered goes unless --expire-held says so; --keep-delivered archives.
Each test runs on the MemoryStore and on SQLite, through the protocol.
"""

from __future__ import annotations

import sqlite3
import time

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from chatproto.housekeeping import SWEEP_INTERVAL, Housekeeping
from chatproto.service import Options, makeService
from chatproto.store import DAY, Retention
from chatproto.store.sqlite import SWEEP_BATCH

from .helpers import (
    Net,
    f_group,
    f_online_secret,
    f_received,
    f_seen,
    f_send,
    s_added,
    s_delivered,
    s_message,
    ts,
)

KINDS = ["memory", "sqlite"]
WEEK = 7 * DAY


@pytest.fixture
def make(tmp_path):
    made = []

    def build(kind, **retention):
        net = Net(kind, str(tmp_path / f"chat{len(made)}.sqlite3"), retention=Retention(**retention))
        made.append(net)
        return net

    yield build
    for net in made:
        net.shutdown()


def stored(net) -> list[tuple]:
    """Every message the store keeps: (src, dst, ts, text or None), by id."""
    net.settle()
    if net.kind == "memory":
        return [(m.src, m.dst, m.ts, m.text) for _, m in sorted(net._memory.messages.items())]
    conn = sqlite3.connect(net.path)
    try:
        return conn.execute(
            "SELECT m.src, m.dst, m.ts, t.body FROM messages m "
            "LEFT JOIN texts t ON t.msg_id = m.id ORDER BY m.id"
        ).fetchall()
    finally:
        conn.close()


def sweep(net, now, online=()):
    return net.result(net.store.sweep(now, list(online)))


def pair(net):
    a, _ = net.register()
    b, _ = net.register()
    return a, b


def row(src, dst, when, text):
    return (src.decode(), dst.decode(), when, text)


@pytest.mark.parametrize("kind", KINDS)
def test_a_live_message_is_stored_without_its_text_and_a_resend_is_not_delivered_twice(make, kind):
    net = make(kind)
    a, b = pair(net)
    ca, cb = net.online(a), net.online(b)
    ca.send(f_send(a, b, ts(100), b"hello"))
    assert cb.take() == [s_message(a, b, ts(100), b"hello")]
    assert ca.take() == [s_delivered(b, ts(100))]
    assert stored(net) == [row(a, b, 100, None)]
    ca.send(f_send(a, b, ts(100), b"hello"))
    assert ca.take() == [s_delivered(b, ts(100))]
    assert cb.take() == []
    # Another text at the same TIMESTAMP is another message.
    ca.send(f_send(a, b, ts(100), b"hello again"))
    assert cb.take() == [s_message(a, b, ts(100), b"hello again")]
    assert ca.take() == [s_delivered(b, ts(100))]


@pytest.mark.parametrize("kind", KINDS)
def test_a_held_text_is_kept_until_its_reader_has_it_then_only_its_identity(make, kind):
    net = make(kind)
    a, b = pair(net)
    ca = net.online(a)
    ca.send(f_send(a, b, ts(100), b"while you were out"))
    assert ca.take() == []
    assert stored(net) == [row(a, b, 100, b"while you were out")]
    cb = net.online(b)
    assert cb.held == [s_message(a, b, ts(100), b"while you were out")]
    assert ca.take() == [s_delivered(b, ts(100))]
    assert stored(net) == [row(a, b, 100, None)]
    ca.send(f_send(a, b, ts(100), b"while you were out"))
    assert ca.take() == [s_delivered(b, ts(100))]
    assert cb.take() == []


@pytest.mark.parametrize("kind", KINDS)
def test_a_15_session_s_message_keeps_its_text_until_its_16(make, kind):
    net = make(kind)
    a, _ = net.register()
    b, secret = net.register(with_secret=True)
    ca = net.online(a)
    cb = net.connect()
    cb.send(f_online_secret(b, secret))
    cb.take()
    ca.send(f_send(a, b, ts(100), b"ack me"))
    assert cb.take() == [s_message(a, b, ts(100), b"ack me")]
    assert stored(net) == [row(a, b, 100, b"ack me")]
    cb.send(f_received(a, b, ts(100)))
    assert ca.take() == [s_delivered(b, ts(100))]
    assert stored(net) == [row(a, b, 100, None)]


@pytest.mark.parametrize("kind", KINDS)
def test_a_group_message_keeps_its_text_until_the_last_member_has_it(make, kind):
    net = make(kind)
    a, b = pair(net)
    c, _ = net.register()
    ca, cb = net.online(a), net.online(b)
    ca.send(f_group(a, ts(10), [b, c]))
    (added,) = ca.take()
    group = added[2:15]
    cb.take()
    ca.send(f_send(a, group, ts(11), b"to all"))
    assert cb.take() == [s_message(a, group, ts(11), b"to all")]
    assert ca.take() == []
    assert stored(net) == [row(a, group, 11, b"to all")]
    cc = net.online(c)
    assert cc.held == [s_added(group, ts(10), [a, b, c]), s_message(a, group, ts(11), b"to all")]
    assert ca.take() == [s_delivered(group, ts(11))]
    assert stored(net) == [row(a, group, 11, None)]


@pytest.mark.parametrize("kind", KINDS)
def test_after_the_window_the_identity_goes_and_a_resend_is_a_new_message(make, kind):
    net = make(kind, dedup_window=WEEK)
    a, b = pair(net)
    ca, cb = net.online(a), net.online(b)
    ca.send(f_send(a, b, ts(100), b"once"))
    cb.take()
    ca.take()
    start = 1_800_000_000
    assert sweep(net, start).identities == 0  # the mark: every id so far was stored by now
    assert sweep(net, start + WEEK - 1).identities == 0
    ca.send(f_send(a, b, ts(100), b"once"))
    assert ca.take() == [s_delivered(b, ts(100))]
    assert cb.take() == [], "within the window a resend is not delivered again"
    assert sweep(net, start + WEEK).identities == 1
    assert stored(net) == []
    ca.send(f_send(a, b, ts(100), b"once"))
    assert cb.take() == [s_message(a, b, ts(100), b"once")], "after it, a resend is a new message"
    assert ca.take() == [s_delivered(b, ts(100))]


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_undelivered_is_pruned_by_default(make, kind):
    net = make(kind)
    a, b = pair(net)
    ca = net.online(a)
    ca.send(f_send(a, b, ts(100), b"wait for it"))
    start = int(time.time())
    for later in (0, 40 * DAY, 400 * DAY):
        swept = sweep(net, start + later)
        assert (swept.identities, swept.texts, swept.held) == (0, 0, {})
    assert net.online(b).held == [s_message(a, b, ts(100), b"wait for it")]
    assert ca.take() == [s_delivered(b, ts(100))]


@pytest.mark.parametrize("kind", KINDS)
def test_a_group_message_s_identity_stays_until_every_member_has_read_it(make, kind):
    """The group's 09 is computed from the messages past its low mark."""
    net = make(kind, dedup_window=DAY)
    a, b = pair(net)
    ca, cb = net.online(a), net.online(b)
    ca.send(f_group(a, ts(10), [b]))
    (added,) = ca.take()
    group = added[2:15]
    cb.take()
    ca.send(f_send(a, group, ts(11), b"read me"))
    cb.take()
    ca.take()
    start = 1_800_000_000
    sweep(net, start)
    assert sweep(net, start + 2 * DAY).identities == 0
    assert stored(net) == [row(a, group, 11, None)]
    cb.send(f_seen(group, ts(11)))
    net.settle()
    assert sweep(net, start + 2 * DAY).identities == 1
    assert stored(net) == []


@pytest.mark.parametrize("kind", KINDS)
def test_an_archive_keeps_delivered_texts_for_its_time_then_only_the_identity(make, kind):
    net = make(kind, dedup_window=WEEK, keep_delivered=DAY)
    a, b = pair(net)
    ca, cb = net.online(a), net.online(b)
    ca.send(f_send(a, b, ts(100), b"archived"))
    cb.take()
    ca.take()
    start = 1_800_000_000
    sweep(net, start)
    assert stored(net) == [row(a, b, 100, b"archived")]
    assert sweep(net, start + DAY).texts == 1
    assert stored(net) == [row(a, b, 100, None)]
    assert sweep(net, start + WEEK).identities == 1
    assert stored(net) == []


@pytest.mark.parametrize("kind", KINDS)
def test_an_archived_message_delivered_after_its_time_loses_its_text_at_delivery(make, kind):
    net = make(kind, keep_delivered=DAY)
    a, b = pair(net)
    ca = net.online(a)
    ca.send(f_send(a, b, ts(100), b"late"))
    start = 1_800_000_000
    sweep(net, start)
    sweep(net, start + 2 * DAY)
    assert stored(net) == [row(a, b, 100, b"late")], "held: kept"
    assert net.online(b).held == [s_message(a, b, ts(100), b"late")]
    assert stored(net) == [row(a, b, 100, None)]


@pytest.mark.parametrize("kind", KINDS)
def test_expire_held_drops_what_waits_for_users_long_gone_and_no_07_follows(make, kind):
    net = make(kind, expire_held=WEEK)
    net.max_held = 0
    a, b = pair(net)
    c, _ = net.register()
    ca = net.online(a)
    ca.send(f_send(a, b, ts(100), b"for b"), f_send(a, c, ts(100), b"for c"))
    net.domain.delivery.held_offline[b] = 1
    now = int(time.time())
    swept = sweep(net, now + WEEK - 60)
    assert swept.held == {}
    swept = sweep(net, now + WEEK + 60, online=[c.decode()])
    assert swept.held == {b.decode(): 1}, "c is online here: nothing of its goes"
    assert stored(net) == [row(a, c, 100, b"for c")]
    cb = net.online(b)
    assert cb.held == []
    assert ca.take() == [], "no 07: it was not delivered"
    cb.lose()
    # A resend is a new message, held again.
    ca.send(f_send(a, b, ts(100), b"for b"))
    assert stored(net)[-1] == row(a, b, 100, b"for b")


def long_gone(net, user: bytes) -> None:
    """As if ``user`` last logged in or out a year ago."""
    net.settle()
    if net.kind == "memory":
        net._memory.last_seen[user.decode()] = int(time.time()) - 365 * DAY
        return
    conn = sqlite3.connect(net.path, isolation_level=None)
    conn.execute("UPDATE users SET last_seen = last_seen - ? WHERE id = ?", (365 * DAY, user.decode()))
    conn.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_login_or_logout_restarts_the_expire_held_clock(make, kind):
    net = make(kind, expire_held=WEEK)
    a, b = pair(net)
    long_gone(net, b)
    ca = net.online(a)
    cb = net.online(b)
    cb.lose()
    ca.send(f_send(a, b, ts(101), b"again"))
    now = int(time.time())
    assert sweep(net, now + 60).held == {}
    long_gone(net, b)
    assert sweep(net, now + 60).held == {b.decode(): 1}


def test_housekeeping_passes_go_on_while_a_batch_is_full(make):
    """A backlog bigger than one batch is worked off in one round, pass after
    pass (each its own small transaction), and the domain's count of what is
    held for an offline user follows what --expire-held dropped."""
    net = make("sqlite", dedup_window=DAY)
    a, b = pair(net)
    ca, cb = net.online(a), net.online(b)
    total = SWEEP_BATCH * 2 + 7
    for i in range(0, total, 100):
        ca.send(*[f_send(a, b, ts(1000 + j), b"m%d" % j) for j in range(i, min(i + 100, total))])
        net.settle()
    cb.take()
    ca.take()
    clock = Clock()
    clock.advance(1_800_000_000)
    keeper = Housekeeping(clock, net.domain, interval=60)
    keeper.startService()
    net.settle()
    assert keeper.identities == 0
    clock.advance(DAY)
    net.settle()
    assert keeper.identities == total
    assert stored(net) == []
    stopped = keeper.stopService()
    net.settle()
    assert stopped.called


def test_a_stop_ends_the_round_after_the_pass_in_flight(make):
    net = make("sqlite", dedup_window=DAY)
    a, b = pair(net)
    ca = net.online(a)
    net.online(b)
    total = SWEEP_BATCH * 3
    for i in range(0, total, 100):
        ca.send(*[f_send(a, b, ts(1000 + j), b"m%d" % j) for j in range(i, i + 100)])
        net.settle()
    clock = Clock()
    clock.advance(1_800_000_000)
    keeper = Housekeeping(clock, net.domain, interval=DAY)
    keeper.startService()
    net.settle()
    clock.advance(DAY)  # the round starts: its first pass is in flight
    stopped = keeper.stopService()
    assert not stopped.called, "it waits for the pass in flight"
    net.settle()
    assert stopped.called and keeper.identities == SWEEP_BATCH, "and starts no other"


def test_expired_holds_lower_the_domain_s_count_of_what_is_held(make):
    net = make("memory", expire_held=WEEK)
    delivery = net.domain.delivery
    delivery.held_offline[b"0000000000009"] = 5
    delivery.expired({"0000000000009": 3, "0000000000008": 2})
    assert delivery.held_offline == {b"0000000000009": 2}


def test_the_options_default_to_30_days_no_archive_no_expiry_and_take_durations():
    options = Options()
    options.parseOptions([])
    assert (options["dedup-window"], options["keep-delivered"], options["expire-held"]) == (30 * DAY, 0, 0)
    options = Options()
    options.parseOptions(["--dedup-window", "12h", "--keep-delivered", "2w", "--expire-held", "90"])
    assert (options["dedup-window"], options["keep-delivered"], options["expire-held"]) == (
        12 * 3600,
        2 * WEEK,
        90,
    )
    with pytest.raises(SystemExit, match="--expire-held soon: not a duration"):
        Options().parseOptions(["--expire-held", "soon"])


def test_make_service_gives_the_store_its_policy_and_runs_housekeeping(tmp_path):
    options = Options()
    options.parseOptions(
        ["--db", str(tmp_path / "chat.sqlite3"), "--dedup-window", "1d", "--keep-delivered", "1h"]
    )
    service = makeService(options, reactor=MemoryReactorClock())
    try:
        assert service.store.keeping.retention == Retention(DAY, 3600, 0)
        (keeper,) = [child for child in service if isinstance(child, Housekeeping)]
        assert keeper.domain is service.domain and keeper.step == SWEEP_INTERVAL
    finally:
        service.store.close()


def test_ages_are_a_minute_precise_or_a_tenth_of_a_short_window():
    assert Retention().mark_every == 60
    assert Retention(dedup_window=100).mark_every == 10
    assert Retention(dedup_window=DAY, keep_delivered=30).mark_every == 3
    assert Retention(dedup_window=0).mark_every == 1
