"""Groups people manage (17-21), the domain alone: fake connections, a MemoryStore.

Each rule of the contract's 17, 19 and 20, and the choices docs/protocol.md
makes where it is silent. The MemoryStore answers at once, so every effect
of a call is visible when it returns.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, fail

from chatproto import wire
from chatproto.domain import Domain
from chatproto.store import StoreUnavailable
from chatproto.store.memory import MemoryStore

from .helpers import s_added, s_delivered, s_error, s_left, s_message, s_seen_by, s_subject, ts
from .test_domain import FakeConnection, message, online, user

pytestmark = pytest.mark.usefixtures("no_logged_failures")


def group_of(domain, creator_session, others: list[bytes], when=b"0000000001") -> bytes:
    """A new group of the session's user and ``others``; its 11 taken from the creator."""
    domain.create_group(creator_session, when, others)
    (frame,) = creator_session.connection.take()
    return wire.decode_group(frame).ident


def secret_user(domain) -> tuple[bytes, bytes]:
    reg = domain.open(FakeConnection())
    domain.register(reg, with_secret=True)
    return wire.decode_registered(reg.connection.take()[0])


# -- 17 → 18 ---------------------------------------------------------------------


def test_a_subject_reaches_every_member_the_sender_included_and_the_offline_at_login(domain):
    a, b, c = user(domain), user(domain), user(domain)
    sa, sb = online(domain, a), online(domain, b)
    group = group_of(domain, sa, [b, c])
    sb.connection.take()
    domain.set_subject(sa, group, ts(5), "Trio ü".encode())
    named = s_subject(group, a, ts(5), "Trio ü".encode())
    assert sa.connection.take() == [named] and sb.connection.take() == [named]
    sc = online(domain, c)
    assert sc.connection.take() == [s_added(group, ts(1), [a, b, c]), named]


def test_a_subject_from_a_non_member_or_for_no_group_is_refused(domain):
    a, b, c = user(domain), user(domain), user(domain)
    sa, sc = online(domain, a), online(domain, c)
    group = group_of(domain, sa, [b])
    domain.set_subject(sc, group, ts(5), b"mine")
    assert sc.connection.take() == [s_error(b"17", b"07")]
    domain.set_subject(sc, b"1" + b"0" * 12, ts(5), b"none")
    domain.set_subject(sc, a, ts(5), b"a user")
    assert sc.connection.take() == [s_error(b"17", b"06")] * 2
    assert sa.connection.take() == []


def test_each_17_is_an_18_and_a_held_one_is_replaced_by_the_next(domain):
    a, b = user(domain), user(domain)
    sa = online(domain, a)
    group = group_of(domain, sa, [b])
    domain.set_subject(sa, group, ts(5), b"one")
    domain.send_many(sa, [message(a, group, ts(6), b"between")])
    domain.set_subject(sa, group, ts(7), b"two")
    assert sa.connection.take() == [s_subject(group, a, ts(5), b"one"), s_subject(group, a, ts(7), b"two")]
    sb = online(domain, b)
    assert sb.connection.take() == [
        s_added(group, ts(1), [a, b]),
        s_message(a, group, ts(6), b"between"),
        s_subject(group, a, ts(7), b"two"),
    ]


# -- 19 → 11 ---------------------------------------------------------------------


def test_an_added_member_gets_the_new_11_then_the_current_18_and_only_later_messages(domain):
    a, b, c, d = user(domain), user(domain), user(domain), user(domain)
    sa, sb, sd = online(domain, a), online(domain, b), online(domain, d)
    group = group_of(domain, sa, [b, c])
    domain.set_subject(sb, group, ts(2), b"Trio")
    domain.send_many(sa, [message(a, group, ts(3), b"before d")])
    sa.connection.take(), sb.connection.take()
    domain.add_members(sb, group, ts(4), [d])
    after = s_added(group, ts(4), [a, b, c, d])
    assert sd.connection.take() == [after, s_subject(group, b, ts(2), b"Trio")]
    assert sa.connection.take() == [after] and sb.connection.take() == [after]
    domain.send_many(sa, [message(a, group, ts(5), b"after d")])
    assert sd.connection.take() == [s_message(a, group, ts(5), b"after d")]
    # C was offline throughout: the 11 of the group's making, the 18, the first
    # message, the 11 of the addition, the second message, in the order they came.
    sc = online(domain, c)
    assert sc.connection.take() == [
        s_added(group, ts(1), [a, b, c]),
        s_subject(group, b, ts(2), b"Trio"),
        s_message(a, group, ts(3), b"before d"),
        after,
        s_message(a, group, ts(5), b"after d"),
    ]


def test_an_offline_added_member_gets_its_11_and_the_18_at_login_and_nothing_from_before(domain):
    a, b, d = user(domain), user(domain), user(domain)
    sa = online(domain, a)
    group = group_of(domain, sa, [b])
    domain.set_subject(sa, group, ts(2), b"Named")
    domain.send_many(sa, [message(a, group, ts(3), b"old news")])
    domain.add_members(sa, group, ts(4), [d])
    sd = online(domain, d)
    assert sd.connection.take() == [s_added(group, ts(4), [a, b, d]), s_subject(group, a, ts(2), b"Named")]


def test_adding_only_members_changes_nothing_and_answers_the_sender_alone(domain):
    a, b = user(domain), user(domain)
    sa, sb = online(domain, a), online(domain, b)
    group = group_of(domain, sa, [b])
    sb.connection.take()
    domain.add_members(sa, group, ts(7), [b, a, b])
    assert sa.connection.take() == [s_added(group, ts(7), [a, b])]
    assert sb.connection.take() == []


def test_a_refused_19_adds_no_one(domain):
    a, b, c = user(domain), user(domain), user(domain)
    sa, sc = online(domain, a), online(domain, c)
    group = group_of(domain, sa, [b])
    domain.add_members(sa, group, ts(2), [c, b"0999999999999"])
    assert sa.connection.take() == [s_error(b"19", b"04")]
    domain.add_members(sc, group, ts(2), [c])
    assert sc.connection.take() == [s_error(b"19", b"07")]
    domain.add_members(sa, b"1" + b"0" * 12, ts(2), [c])
    assert sa.connection.take() == [s_error(b"19", b"06")]
    assert domain.directory.groups[group] == [a, b]
    assert sc.connection.take() == []


def test_a_group_may_not_pass_99_members(domain):
    a = user(domain)
    others = [user(domain) for _ in range(98)]
    sa = online(domain, a)
    group = group_of(domain, sa, others[:90])
    domain.add_members(sa, group, ts(2), others[90:])  # 91 + 8 = 99
    assert sa.connection.take() == [s_added(group, ts(2), [a, *others])]
    extra = user(domain)
    domain.add_members(sa, group, ts(3), [extra, others[0]])
    assert sa.connection.take() == [s_error(b"19", b"01")]
    assert extra not in domain.directory.groups[group]


# -- 20 → 21 ---------------------------------------------------------------------


def test_the_leaver_gets_21_and_the_rest_the_new_11_with_the_20s_timestamp(domain):
    a, b, c = user(domain), user(domain), user(domain)
    sa, sb = online(domain, a), online(domain, b)
    group = group_of(domain, sa, [b, c])
    sb.connection.take()
    domain.leave_group(sb, group, ts(9))
    assert sb.connection.take() == [s_left(group, ts(9))]
    assert sa.connection.take() == [s_added(group, ts(9), [a, c])]
    sc = online(domain, c)
    assert sc.connection.take() == [s_added(group, ts(1), [a, b, c]), s_added(group, ts(9), [a, c])]


def test_after_leaving_every_frame_for_the_group_is_not_a_members(domain):
    a, b = user(domain), user(domain)
    sa, sb = online(domain, a), online(domain, b)
    group = group_of(domain, sa, [b])
    domain.send_many(sb, [message(b, group, ts(2), b"while in")])
    domain.leave_group(sb, group, ts(3))
    sb.connection.take(), sa.connection.take()
    domain.send_many(sb, [message(b, group, ts(2), b"while in")])  # a resend of one sent as a member
    domain.send_many(sb, [message(b, group, ts(4), b"after")])
    domain.seen(sb, group, ts(4))
    domain.set_subject(sb, group, ts(4), b"x")
    domain.add_members(sb, group, ts(4), [b])
    domain.leave_group(sb, group, ts(4))
    assert sb.connection.take() == [
        s_error(code, b"07") for code in (b"05", b"05", b"08", b"17", b"19", b"20")
    ]
    assert sa.connection.take() == []


def test_leaving_does_not_take_back_what_was_sent_and_its_07_waits_for_the_leaver(domain):
    a = user(domain)
    b, secret = secret_user(domain)
    sa = online(domain, a)
    group = group_of(domain, sa, [b])
    domain.send_many(sa, [message(a, group, ts(2), b"for both")])
    sb = domain.open(FakeConnection())
    domain.login(sb, b, secret, wire.ONLINE_SECRET)
    sb.connection.take()
    domain.leave_group(sb, group, ts(3))
    # No 07: B has not acknowledged. The low mark counts current members
    # only, and no one but its sender is left to read it.
    assert sa.connection.take() == [s_added(group, ts(3), [a]), s_seen_by(group, ts(2))]
    domain.received(sb, a, group, ts(2))
    assert sa.connection.take() == [s_delivered(group, ts(2))]


def test_messages_after_a_leave_are_not_for_the_leaver(domain):
    a, b, c = user(domain), user(domain), user(domain)
    sa, sb, sc = online(domain, a), online(domain, b), online(domain, c)
    group = group_of(domain, sa, [b, c])
    domain.leave_group(sb, group, ts(2))
    sb.connection.take(), sc.connection.take(), sa.connection.take()
    domain.send_many(sa, [message(a, group, ts(3), b"without b")])
    assert sb.connection.take() == []
    assert sc.connection.take() == [s_message(a, group, ts(3), b"without b")]
    assert sa.connection.take() == [s_delivered(group, ts(3))], "c alone was a recipient"


def test_a_group_whose_last_member_left_takes_no_more_frames(domain):
    a = user(domain)
    sa = online(domain, a)
    group = group_of(domain, sa, [])
    domain.leave_group(sa, group, ts(2))
    assert sa.connection.take() == [s_left(group, ts(2))]
    domain.send_many(sa, [message(a, group, ts(3), b"anyone?")])
    domain.add_members(sa, group, ts(3), [a])
    assert sa.connection.take() == [s_error(b"05", b"07"), s_error(b"19", b"07")]


def test_a_member_who_left_can_be_added_again_and_gets_only_later_messages(domain):
    a, b = user(domain), user(domain)
    sa, sb = online(domain, a), online(domain, b)
    group = group_of(domain, sa, [b])
    domain.leave_group(sb, group, ts(2))
    domain.send_many(sa, [message(a, group, ts(3), b"while b was out")])
    domain.add_members(sa, group, ts(4), [b])
    sb.connection.take()
    domain.send_many(sa, [message(a, group, ts(5), b"b is back")])
    assert sb.connection.take() == [s_message(a, group, ts(5), b"b is back")]


class SlowLatestStore(MemoryStore):
    """Answers ``latest_timestamp`` when the test says, as SQLite answers after a commit."""

    def __init__(self):
        super().__init__()
        self.asked: list = []

    def latest_timestamp(self, src, dst):
        d = Deferred()
        self.asked.append((d, super().latest_timestamp(src, dst).result))
        return d


def test_a_message_sent_before_leaving_is_not_refused_when_it_goes_out_after():
    """A 05 read while a member, waiting for its conversation's latest, then a
    20: the message was sent while a member, and goes to the others."""
    store = SlowLatestStore()
    domain = Domain(store)
    domain.load(store.load().result)
    a, b, c = user(domain), user(domain), user(domain)
    sa, sb, sc = online(domain, a), online(domain, b), online(domain, c)
    group = group_of(domain, sa, [b, c])
    domain.send_many(sa, [message(a, group, ts(2), b"my last words")])
    domain.leave_group(sa, group, ts(3))
    domain.logout(sc, closed=True)  # C cannot take it now: it goes the held way
    sb.connection.take()
    for d, latest in store.asked:
        d.callback(latest)
    assert s_error(b"05", b"07") not in sa.connection.take()
    assert sb.connection.take() == [s_message(a, group, ts(2), b"my last words")]
    sc = online(domain, c)
    assert s_message(a, group, ts(2), b"my last words") in sc.connection.take()


def test_a_message_waiting_in_its_conversation_goes_to_the_members_of_when_it_was_read():
    """The recipients are the members at the moment it was sent: a 05 read,
    then a 19 and a 20 while it waits for its conversation's latest; the
    member added after it does not get it, the one who left after it does."""
    store = SlowLatestStore()
    domain = Domain(store)
    domain.load(store.load().result)
    a, b, c, d = user(domain), user(domain), user(domain), user(domain)
    sa, sb, sc, sd = online(domain, a), online(domain, b), online(domain, c), online(domain, d)
    group = group_of(domain, sa, [b, c])
    domain.send_many(sa, [message(a, group, ts(2), b"before")])
    domain.add_members(sa, group, ts(3), [d])
    domain.leave_group(sb, group, ts(4))
    for conn in (sa, sb, sc, sd):
        conn.connection.take()
    for deferred, latest in store.asked:
        deferred.callback(latest)
    assert sb.connection.take() == [s_message(a, group, ts(2), b"before")], "a member when it was sent"
    assert sc.connection.take() == [s_message(a, group, ts(2), b"before")]
    assert sd.connection.take() == [], "added after it was sent"
    assert sa.connection.take() == [s_delivered(group, ts(2))]


class InOrderStore(MemoryStore):
    """Answers as a SQL store does: nothing at once, every answer after a
    commit (``commit``), in the order the operations were submitted."""

    def __init__(self):
        super().__init__()
        self.queued: list = []

    def commit(self) -> None:
        while self.queued:
            fire = self.queued.pop(0)
            fire()

    def _later(self, value):
        d = Deferred()
        self.queued.append(lambda: d.callback(value))
        return d

    def latest_timestamp(self, src, dst):
        return self._later(super().latest_timestamp(src, dst).result)

    def add_members(self, group_id, ts, added, online):
        return self._later(super().add_members(group_id, ts, added, online).result)

    def record_message(self, src, dst, ts, text, recipients, answer=None):
        value = self._record(src, dst, ts, text, recipients)
        self.queued.append(lambda: answer.callback(value))


def test_while_a_19_is_uncommitted_only_messages_that_reach_its_users_wait_for_it():
    """The 11 goes after the commit; no 06 may reach the added member before it.
    A message read before the 19, which does not reach him, is not held back
    behind it even when it goes out after the 19 was read."""
    store = InOrderStore()
    domain = Domain(store)
    domain.load(store.load().result)
    a, b, c, d = user(domain), user(domain), user(domain), user(domain)
    sa, sb, sc, sd = (online(domain, u) for u in (a, b, c, d))
    group = group_of(domain, sa, [b, c])
    sb.connection.take(), sc.connection.take()
    domain.send_many(sb, [message(b, group, ts(2), b"b's first")])
    store.commit()  # b's conversation is known now
    for session in (sa, sb, sc):
        session.connection.take()
    domain.send_many(sc, [message(c, group, ts(3), b"c's first")])  # waits for its conversation's latest
    domain.add_members(sa, group, ts(4), [d])
    domain.send_many(sb, [message(b, group, ts(5), b"after")])  # would reach d: waits for the 19
    assert sd.connection.take() == [] and sb.connection.take() == []
    store.commit()
    added = s_added(group, ts(4), [a, b, c, d])
    assert sb.connection.take() == [
        s_message(c, group, ts(3), b"c's first"),  # not held back behind the 19
        added,
        s_delivered(group, ts(5)),
    ]
    assert sd.connection.take() == [added, s_message(b, group, ts(5), b"after")], "his 11 first"
    assert domain.delivery.adding == {}


# -- the low mark: current members, never back -----------------------------------------


def test_a_leaver_who_had_not_read_lets_the_low_mark_move_for_the_rest(domain):
    a, b, c = user(domain), user(domain), user(domain)
    sa, sb, sc = online(domain, a), online(domain, b), online(domain, c)
    group = group_of(domain, sa, [b, c])
    domain.send_many(sa, [message(a, group, ts(2), b"read me")])
    domain.seen(sb, group, ts(2))
    for s in (sa, sb, sc):
        s.connection.take()
    domain.leave_group(sc, group, ts(3))
    low = s_seen_by(group, ts(2))
    assert sa.connection.take() == [s_added(group, ts(3), [a, b]), low]
    assert sb.connection.take() == [s_added(group, ts(3), [a, b]), low]
    assert sc.connection.take() == [s_left(group, ts(3))], "the leaver is no longer told"


def test_an_added_member_does_not_hold_back_the_low_mark_for_what_it_never_got(domain):
    a, b, d = user(domain), user(domain), user(domain)
    sa, sb, sd = online(domain, a), online(domain, b), online(domain, d)
    group = group_of(domain, sa, [b])
    domain.send_many(sa, [message(a, group, ts(2), b"before d")])
    domain.add_members(sa, group, ts(3), [d])
    for s in (sa, sb, sd):
        s.connection.take()
    domain.seen(sb, group, ts(2))
    assert sa.connection.take() == [s_seen_by(group, ts(2))]
    domain.send_many(sa, [message(a, group, ts(4), b"after d")])
    assert sa.connection.take() == [s_delivered(group, ts(4))]
    domain.seen(sb, group, ts(4))
    assert sa.connection.take() == [], "d has not read the message it got"
    domain.seen(sd, group, ts(4))
    assert sa.connection.take() == [s_seen_by(group, ts(4))]
    assert domain.receipts.low_marks[group] == 4


# -- the store refuses -------------------------------------------------------------


class RefusingStore(MemoryStore):
    """Fails the group changes it is told to, as a database that is away would."""

    refused: tuple[str, ...] = ()

    def _refuse(self, name, *args):
        if name in self.refused:
            return fail(StoreUnavailable("the database is away"))
        return getattr(super(), name)(*args)

    def set_subject(self, *args):
        return self._refuse("set_subject", *args)

    def add_members(self, *args):
        return self._refuse("add_members", *args)

    def leave_group(self, *args):
        return self._refuse("leave_group", *args)


def test_a_change_the_store_refuses_is_answered_busy_and_undone():
    store = RefusingStore()
    domain = Domain(store)
    domain.load(store.load().result)
    a, b, c = user(domain), user(domain), user(domain)
    sa, sb = online(domain, a), online(domain, b)
    group = group_of(domain, sa, [b])
    sb.connection.take()
    store.refused = ("set_subject", "add_members", "leave_group")
    domain.set_subject(sa, group, ts(2), b"no")
    domain.add_members(sa, group, ts(2), [c])
    domain.leave_group(sb, group, ts(2))
    assert sa.connection.take() == [s_error(b"17", b"11"), s_error(b"19", b"11")]
    assert sb.connection.take() == [s_error(b"20", b"11")]
    assert domain.directory.groups[group] == [a, b]
    store.refused = ()
    domain.send_many(sb, [message(b, group, ts(3), b"still in")])
    assert sa.connection.take() == [s_message(b, group, ts(3), b"still in")]
