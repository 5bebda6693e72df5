"""Every store failure is answered, and held frames keep their order.

A store that fails on demand (any exception, not only StoreUnavailable),
a real SQLite file locked by a second connection, and one that is full
(``PRAGMA max_page_count``): each frame the failure concerned gets its
``12 XX 11``, nothing unconfirmed is handed out, and once the store works
again the same connections go on.
"""

from __future__ import annotations

import sqlite3

import pytest
from twisted.internet.defer import fail

from chatproto.store.memory import MemoryStore

from .helpers import (
    f_online,
    f_online_secret,
    f_seen,
    f_send,
    s_delivered,
    s_error,
    s_message,
    s_seen_by,
    ts,
)


class FlakyStore(MemoryStore):
    """A MemoryStore whose operations named in ``failing`` fail with ``error``."""

    def __init__(self):
        super().__init__()
        self.failing: set[str] = set()
        self.error: Exception = sqlite3.OperationalError("database is locked")

    def __getattribute__(self, name):
        attr = super().__getattribute__(name)
        if name.startswith("_") or name not in super().__getattribute__("failing"):
            return attr
        error = super().__getattribute__("error")

        def failing(*args, answer=None, **kwargs):
            if answer is not None:
                from twisted.python.failure import Failure

                answer.errback(Failure(error))
                return None
            return fail(error)

        return failing


@pytest.fixture(params=[sqlite3.OperationalError("database is locked"), RuntimeError("a bug")])
def flaky(request, make_net):
    store = FlakyStore()
    store.error = request.param
    return make_net("memory", memory=store), store


def test_a_05_the_store_cannot_take_is_answered_busy_and_goes_through_later(flaky):
    net, store = flaky
    a, _ = net.register()
    b, _ = net.register()
    ca = net.online(a)
    cb = net.online(b)
    cb.lose()  # the held way
    store.failing = {"record_message"}
    ca.send(f_send(a, b, ts(1), b"one"))
    assert ca.take() == [s_error(b"05", b"11")]
    store.failing = set()
    ca.send(f_send(a, b, ts(1), b"one"))  # the outbox sends it again
    assert ca.take() == []
    assert net.online(b).held == [s_message(a, b, ts(1), b"one")]
    assert ca.take() == [s_delivered(b, ts(1))]


def test_a_live_05_the_store_cannot_record_is_answered_busy(flaky):
    net, store = flaky
    a, _ = net.register()
    b, _ = net.register()
    ca, cb = net.online(a), net.online(b)
    ca.send(f_send(a, b, ts(1), b"warm up"))
    assert ca.take() == [s_delivered(b, ts(1))] and len(cb.take()) == 1
    store.failing = {"record_delivered"}
    ca.send(f_send(a, b, ts(2), b"two"))
    assert cb.take() == [s_message(a, b, ts(2), b"two")]
    assert ca.take() == [s_error(b"05", b"11")], "no 07 for what was not stored"


@pytest.mark.parametrize("code", [b"01", b"13"])
def test_an_account_that_was_not_stored_is_not_handed_out(flaky, code):
    net, store = flaky
    store.failing = {"add_user"}
    conn = net.connect()
    conn.send(code)
    assert conn.take() == [s_error(code, b"11")]
    assert net.domain.directory.users == {}, "the id drawn is given back"
    store.failing = set()
    conn.send(code)
    (frame,) = conn.take()
    assert frame[:2] == (b"02" if code == b"01" else b"14")


@pytest.mark.parametrize("with_secret", [False, True])
def test_a_login_whose_flush_fails_is_told_and_closed_and_can_log_in_again(flaky, with_secret):
    net, store = flaky
    a, _ = net.register()
    b, secret = net.register(with_secret=with_secret)
    ca = net.online(a)
    ca.send(f_send(a, b, ts(1), b"held"))
    ca.take()
    store.failing = {"inbox"}
    cb = net.connect()
    cb.send(f_online(b) if secret is None else f_online_secret(b, secret))
    code = b"03" if secret is None else b"15"
    assert cb.take() == [b"04" + b, s_error(code, b"11")]
    assert cb.closed and b not in net.domain.sessions
    cb.lose()
    store.failing = set()
    assert net.online(b, secret).held == [s_message(a, b, ts(1), b"held")]


def test_a_group_the_store_did_not_take_is_refused_and_not_kept(flaky):
    from .helpers import f_group

    net, store = flaky
    a, _ = net.register()
    b, _ = net.register()
    ca = net.online(a)
    store.failing = {"add_group"}
    ca.send(f_group(a, ts(1), [b]))
    assert ca.take() == [s_error(b"10", b"11")]
    assert net.domain.directory.groups == {}


# -- a real SQLite file that is locked, or full --------------------------------


def test_a_locked_database_is_answered_busy_and_service_resumes(make_net, tmp_path):
    net = make_net("sqlite", busy_timeout_ms=50)
    a, _ = net.register()
    b, _ = net.register()
    ca = net.online(a)
    cb = net.online(b)
    cb.lose()
    other = sqlite3.connect(net.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        ca.send(f_send(a, b, ts(1), b"while locked"))
        assert ca.take() == [s_error(b"05", b"11")]
        fresh = net.connect()
        fresh.send(b"01")
        assert fresh.take() == [s_error(b"01", b"11")]
    finally:
        other.execute("ROLLBACK")
        other.close()
    ca.send(f_send(a, b, ts(1), b"while locked"))
    assert ca.take() == []
    assert net.online(b).held == [s_message(a, b, ts(1), b"while locked")]
    assert ca.take() == [s_delivered(b, ts(1))]


def test_a_full_database_is_answered_busy_and_service_resumes(make_net):
    net = make_net("sqlite")
    a, _ = net.register()
    b, _ = net.register()
    ca = net.online(a)
    net.online(b).lose()
    conn = net.store.inner._conn  # the store's own connection: max_page_count is per connection
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    conn.execute(f"PRAGMA max_page_count = {pages}")
    big = b"x" * 218
    answers = []
    for i in range(1, 200):
        ca.send(f_send(a, b, ts(i), big))
        answers += ca.take()
        if answers:
            break
    assert answers == [s_error(b"05", b"11")], "the message that did not fit is refused"
    conn.execute("PRAGMA max_page_count = 1073741823")
    ca.send(f_send(a, b, ts(i), big))
    assert ca.take() == []
    cb = net.online(b)
    assert cb.held[-1] == s_message(a, b, ts(i), big)


# -- held frames in the order they were queued ---------------------------------


def read_then_seen_while_a_is_away(net) -> tuple[bytes, bytes]:
    """A sends to B, offline, and leaves; B logs in, gets the 06 and at once
    sends 08, before the store has recorded the delivery. Returns (a, b)."""
    a, _ = net.register()
    b, _ = net.register()
    ca = net.online(a)
    net.online(b).lose()
    ca.send(f_send(a, b, ts(1), b"hello"))
    assert ca.take() == []
    ca.lose()
    cb = net.connect()
    cb.send(f_online(b))
    net.step()  # the 04 and the inbox page: the 06 is written, its delivery not yet recorded
    cb.send(f_seen(a, ts(1)))
    net.settle()
    assert cb.take() == [b"04" + b, s_message(a, b, ts(1), b"hello")]
    return a, b


def test_a_held_07_comes_before_the_09_that_followed_it(make_net):
    """A, offline, must get the 07 first, then the 09, as queued."""
    net = make_net("sqlite")
    a, b = read_then_seen_while_a_is_away(net)
    assert net.online(a).held == [s_delivered(b, ts(1)), s_seen_by(b, ts(1))]


def test_a_09_for_a_sender_online_waits_for_the_07_before_it(make_net):
    net = make_net("sqlite")
    a, _ = net.register()
    b, _ = net.register()
    ca = net.online(a)
    cb = net.online(b)
    ca.send(f_send(a, b, ts(1), b"hello"))
    assert ca.take() == [s_delivered(b, ts(1))] and len(cb.take()) == 1
    ca.send(f_send(a, b, ts(2), b"again"))  # the live way: written at once, recorded later
    assert cb.transport.value() == s_message(a, b, ts(2), b"again")
    cb.send(f_seen(a, ts(2)))
    assert ca.take() == [s_delivered(b, ts(2)), s_seen_by(b, ts(2))]


@pytest.mark.parametrize("how", ["restart", "crash"])
def test_held_07_and_09_keep_their_order_across_a_restart(make_net, how):
    net = make_net("sqlite")
    a, b = read_then_seen_while_a_is_away(net)
    if how == "restart":
        net.restart()
    else:
        net.crash()
    assert net.online(a).held == [s_delivered(b, ts(1)), s_seen_by(b, ts(1))]
