"""The server's side of the wire contract, driven through fake transports.

Most tests run twice (the ``net`` fixture): on the MemoryStore, which fires
at once, and on a real SQLite file whose database thread the test drives,
so group commit and "nothing before commit" are exercised too. No sockets,
no sleeps.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatproto.service import Options

from .helpers import (
    Net,
    f_group,
    f_online,
    f_online_secret,
    f_received,
    f_seen,
    f_send,
    s_added,
    s_delivered,
    s_error,
    s_message,
    s_seen_by,
    ts,
)

pytestmark = pytest.mark.usefixtures("no_logged_failures")

# -- accounts and login ------------------------------------------------------


def test_register_gives_a_new_user_id_and_no_login(net):
    """01 → 02 with a 13-digit id starting with 0; the connection is not online yet."""
    conn = net.connect()
    conn.send(b"01")
    (frame,) = conn.take()
    assert frame[:2] == b"02" and frame[2:].isdigit() and frame[2:3] == b"0"
    conn.send(b"01")
    (again,) = conn.take()
    assert again != frame
    conn.send(f_send(frame[2:], frame[2:], ts(1), b"hi"))
    assert conn.take() == [s_error(b"05", b"03")]


def test_register_with_secret_gives_id_and_lowercase_hex_secret(net):
    conn = net.connect()
    conn.send(b"13")
    (frame,) = conn.take()
    assert frame[:2] == b"14" and frame[2:15].isdigit() and frame[2:3] == b"0"
    secret = frame[15:]
    assert len(secret) == 32 and set(secret) <= set(b"0123456789abcdef")


def test_online_confirms_with_04(net):
    user, _ = net.register()
    conn = net.connect()
    conn.send(f_online(user))
    assert conn.take() == [b"04" + user]


def test_online_with_secret_confirms_with_04(net):
    user, secret = net.register(with_secret=True)
    conn = net.connect()
    conn.send(f_online_secret(user, secret))
    assert conn.take() == [b"04" + user]


@pytest.mark.parametrize("code", [b"03", b"15"])
def test_online_as_unknown_user_is_refused_with_04(net, code):
    conn = net.connect()
    frame = f_online(b"0123456789012") if code == b"03" else f_online_secret(b"0123456789012", b"a" * 32)
    conn.send(frame)
    assert conn.take() == [s_error(code, b"04")]
    assert not conn.closed


def test_online_without_secret_for_a_secret_account_is_refused(net):
    """An account made with 13 cannot come online with 03."""
    user, _ = net.register(with_secret=True)
    conn = net.connect()
    conn.send(f_online(user))
    assert conn.take() == [s_error(b"03", b"08")]
    conn.send(f_send(user, user, ts(1), b"x"))
    assert conn.take() == [s_error(b"05", b"03")], "a refused login must leave the connection offline"


def test_online_with_a_wrong_secret_is_refused(net):
    user, secret = net.register(with_secret=True)
    wrong = bytes(reversed(secret)) if secret != secret[::-1] else b"0" * 32
    conn = net.connect()
    conn.send(f_online_secret(user, wrong))
    assert conn.take() == [s_error(b"15", b"08")]
    conn.send(f_seen(user, ts(1)))
    assert conn.take() == [s_error(b"08", b"03")]


def test_online_with_secret_for_an_account_made_without_one_is_refused(net):
    user, _ = net.register()
    conn = net.connect()
    conn.send(f_online_secret(user, b"0" * 32))
    assert conn.take() == [s_error(b"15", b"08")]


def test_require_secrets_refuses_01_and_03(make_net):
    net = make_net(require_secrets=True)
    conn = net.connect()
    conn.send(b"01")
    assert conn.take() == [s_error(b"01", b"08")]
    user, secret = net.register(with_secret=True)
    conn.send(f_online(user))
    assert conn.take() == [s_error(b"03", b"08")]
    conn.send(f_online_secret(user, secret))
    assert conn.take() == [b"04" + user]


def test_require_secrets_refuses_03_for_any_id(make_net):
    """With secrets required, 03 is refused altogether: even an unknown id gets 08, not 04."""
    net = make_net(require_secrets=True)
    conn = net.connect()
    conn.send(f_online(b"0555555555555"))
    assert conn.take() == [s_error(b"03", b"08")]


def test_require_secrets_refuses_03_for_an_old_account_made_with_01(net):
    """Turning the option on later locks out 03 logins to accounts from before."""
    user, _ = net.register()
    net.restart(require_secrets=True)
    conn = net.connect()
    conn.send(f_online(user))
    assert conn.take() == [s_error(b"03", b"08")]


def test_second_login_replaces_the_first(net):
    """The old connection gets 12 03 09 and is closed; traffic goes to the new one."""
    a, _ = net.register()
    b, _ = net.register()
    old = net.online(b)
    new = net.connect()
    new.send(f_online(b))
    assert new.take() == [b"04" + b]
    assert old.take() == [s_error(b"03", b"09")]
    assert old.closed
    old.lose()
    ca = net.online(a)
    ca.send(f_send(a, b, ts(5), b"to the new one"))
    assert new.take() == [s_message(a, b, ts(5), b"to the new one")]
    assert ca.take() == [s_delivered(b, ts(5))]


def test_second_login_with_secret_sends_12_03_09_too(net):
    """REF is always 03, even when the new login is a 15."""
    b, secret = net.register(with_secret=True)
    old = net.online(b, secret)
    net.online(b, secret)
    assert old.take() == [s_error(b"03", b"09")]
    assert old.closed


def test_a_frame_after_replacement_on_the_old_connection_is_not_acted_on(net):
    """Once replaced, the old connection can no longer speak for the user."""
    a, _ = net.register()
    b, _ = net.register()
    old = net.online(a)
    net.online(a)
    old.take()
    cb = net.online(b)
    old.send(f_send(a, b, ts(9), b"ghost"))
    assert cb.take() == []


# -- malformed frames --------------------------------------------------------

U1 = b"0111111111111"
U2 = b"0222222222222"
TEXT_CASES = {
    "empty text": b"\0" * 218,
    "NUL inside": b"a\0b".ljust(218, b"\0"),
    "invalid UTF-8": b"\xff\xfe".ljust(218, b"\0"),
    "cut UTF-8": b"\xc3".ljust(218, b"\0"),
}
MALFORMED = {
    "05 non-digit SRC": b"05" + b"01111111111x1" + U2 + ts(1) + b"hi".ljust(218, b"\0"),
    "05 non-digit DST": b"05" + U1 + b"02222222222 2" + ts(1) + b"hi".ljust(218, b"\0"),
    "05 non-digit TS": b"05" + U1 + U2 + b"17000000x0" + b"hi".ljust(218, b"\0"),
    **{f"05 {name}": b"05" + U1 + U2 + ts(1) + text for name, text in TEXT_CASES.items()},
    "03 non-digit id": b"03" + b"abcdefghijklm",
    "08 non-digit peer": b"08" + b"0-22222222222" + ts(1),
    "08 non-digit TS": b"08" + U2 + b"          ",
    "10 non-digit SRC": b"10" + b"x111111111111" + ts(1) + b"01" + U2,
    "10 non-digit TS": b"10" + U1 + b"abcdefghij" + b"01" + U2,
    "10 non-digit member": b"10" + U1 + ts(1) + b"02" + U2 + b"0333333333 33",
    "10 N=00": b"10" + U1 + ts(1) + b"00",
    "15 non-digit id": b"15" + b"0111111111 11" + b"a" * 32,
    "15 uppercase hex": b"15" + U1 + b"A" * 32,
    "15 non-hex secret": b"15" + U1 + b"g" * 32,
    "16 non-digit SRC": b"16" + b"0x11111111111" + U2 + ts(1),
    "16 non-digit TS": b"16" + U1 + U2 + b"1.00000000",
}


@pytest.mark.parametrize("frame", list(MALFORMED.values()), ids=list(MALFORMED))
@pytest.mark.parametrize("logged_in", [False, True], ids=["before login", "logged in"])
def test_malformed_frame_gets_12_ref_01_and_the_connection_goes_on(make_net, frame, logged_in):
    """Malformed wins over not-online, and the stream stays usable after the error."""
    net = make_net()
    user, _ = net.register()
    conn = net.online(user) if logged_in else net.connect()
    conn.send(frame)
    assert conn.take() == [s_error(frame[:2], b"01")]
    assert not conn.closed
    conn.send(b"01")
    assert [f[:2] for f in conn.take()] == [b"02"]


def test_malformed_frames_split_across_reads_are_still_one_error(net):
    frame = MALFORMED["05 invalid UTF-8"]
    conn = net.connect()
    for i in range(0, len(frame), 7):
        conn.send(frame[i : i + 7])
    assert conn.take() == [s_error(b"05", b"01")]


# -- not online --------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [f_send(U1, U2, ts(1), b"hi"), f_seen(U2, ts(1)), f_group(U1, ts(1), [U2])],
    ids=["05", "08", "10"],
)
def test_frames_before_login_get_12_ref_03(net, frame):
    conn = net.connect()
    conn.send(frame)
    assert conn.take() == [s_error(frame[:2], b"03")]
    assert not conn.closed


def test_16_before_login_is_ignored_silently(net):
    conn = net.connect()
    conn.send(f_received(U1, U2, ts(1)))
    assert conn.take() == []
    assert not conn.closed


# -- unknown codes: unframeable streams ---------------------------------------

CLIENT = {b"01", b"03", b"05", b"08", b"10", b"13", b"15", b"16", b"17", b"19", b"20"}
UNKNOWN_CODES = [b"%02d" % i for i in range(100) if b"%02d" % i not in CLIENT] + [
    b"\xff\x00",
    b"ab",
    b"\x00\x00",
    b" 1",
    b"1\n",
]


@pytest.mark.parametrize("code", UNKNOWN_CODES, ids=repr)
def test_unknown_code_gets_12_code_02_and_a_close(make_net, code):
    """Server-to-client codes and garbage alike: the stream cannot be framed any more."""
    net = make_net()
    user, _ = net.register()
    conn = net.online(user)
    conn.send(code + b"0" * 40)
    assert conn.take() == [s_error(code, b"02")]
    assert conn.closed
    conn.send(b"01")
    assert conn.take() == [], "nothing after the close may be answered"


def test_frames_before_an_unknown_code_are_answered_first(net):
    conn = net.connect()
    conn.send(f_seen(U1, ts(1)) + b"99")
    assert conn.take() == [s_error(b"08", b"03"), s_error(b"99", b"02")]
    assert conn.closed


def test_a_register_before_an_unknown_code_still_gets_its_02(net):
    """The 02 waits for its commit; the close waits for the 02, so the id is not lost."""
    conn = net.connect()
    conn.send(b"01" + b"99")
    answers = conn.take()
    assert [a[:2] for a in answers] == [b"02", b"12"]
    assert len(answers[0]) == 15 and answers[1] == s_error(b"99", b"02")
    assert conn.closed


def test_unknown_code_split_in_two_reads(net):
    conn = net.connect()
    conn.send(b"0")
    assert conn.take() == [] and not conn.closed
    conn.send(b"9")
    assert conn.take() == [s_error(b"09", b"02")]
    assert conn.closed


@pytest.mark.parametrize("n", [b"x1", b"1 ", b"-1", b"\x00\x00"])
def test_group_frame_with_a_non_digit_n_cannot_be_framed(net, n):
    """A 10 whose N is not two digits has no knowable length: 12 10 01 and close."""
    user, _ = net.register()
    conn = net.online(user)
    conn.send(b"10" + user + ts(1) + n + U2)
    assert conn.take() == [s_error(b"10", b"01")]
    assert conn.closed


def test_other_connections_do_not_notice_a_bad_stream(net):
    a, _ = net.register()
    b, _ = net.register()
    ca = net.online(a)
    cb = net.online(b)
    cb.send(b"\xde\xad\xbe\xef" * 10)
    assert cb.take() == [s_error(b"\xde\xad", b"02")]
    cb.lose()
    ca.send(f_send(a, a, ts(3), b"still here"))
    assert ca.take() == [s_message(a, a, ts(3), b"still here"), s_delivered(a, ts(3))]


# -- messages ------------------------------------------------------------------


def two_online(net):
    a, _ = net.register()
    b, _ = net.register()
    return a, b, net.online(a), net.online(b)


def test_message_between_online_users_gives_06_and_07(net):
    a, b, ca, cb = two_online(net)
    text = "héllo wörld ✓".encode()
    ca.send(f_send(a, b, ts(1700000000), text))
    assert cb.take() == [s_message(a, b, ts(1700000000), text)]
    assert ca.take() == [s_delivered(b, ts(1700000000))]


def test_full_width_text_arrives_intact(net):
    a, b, ca, cb = two_online(net)
    text = ("é" * 109).encode()  # 218 bytes exactly
    ca.send(f_send(a, b, ts(2), text))
    assert cb.take() == [b"06" + a + b + ts(2) + text]


def test_frames_split_and_merged_arrive_as_the_same_frames(net):
    a, b, ca, cb = two_online(net)
    stream = b"".join(f_send(a, b, ts(i), b"m%d" % i) for i in range(1, 6))
    for i in range(0, len(stream), 97):
        ca.send(stream[i : i + 97])
    assert cb.take() == [s_message(a, b, ts(i), b"m%d" % i) for i in range(1, 6)]
    assert ca.take() == [s_delivered(b, ts(i)) for i in range(1, 6)]


def test_spoofed_src_is_refused_with_05(net):
    a, b, ca, cb = two_online(net)
    ca.send(f_send(b, a, ts(1), b"I am b"))
    assert ca.take() == [s_error(b"05", b"05")]
    ca.send(f_send(b, b, ts(1), b"I am b"))
    assert ca.take() == [s_error(b"05", b"05")]
    assert cb.take() == []


@pytest.mark.parametrize("dst", [b"0999999999999", b"1999999999999"], ids=["user", "group"])
def test_message_to_unknown_destination_gets_06(net, dst):
    a, _ = net.register()
    ca = net.online(a)
    ca.send(f_send(a, dst, ts(1), b"anyone?"))
    assert ca.take() == [s_error(b"05", b"06")]


def test_message_to_offline_user_waits_for_login_and_07_follows(net):
    a, b, ca, cb = two_online(net)
    cb.lose()
    ca.send(f_send(a, b, ts(1), b"one"), f_send(a, b, ts(2), b"two"))
    assert ca.take() == [], "no 07 before the recipient has it"
    cb = net.online(b)
    assert cb.held == [s_message(a, b, ts(1), b"one"), s_message(a, b, ts(2), b"two")]
    assert ca.take() == [s_delivered(b, ts(1)), s_delivered(b, ts(2))]
    cb.lose()
    assert net.online(b).held == [], "a delivered message is not sent again"


def test_07_for_an_offline_sender_waits_for_its_login(net):
    a, b, ca, cb = two_online(net)
    cb.lose()
    ca.send(f_send(a, b, ts(1), b"hi"))
    ca.take()
    ca.lose()
    cb = net.online(b)
    assert cb.held == [s_message(a, b, ts(1), b"hi")]
    ca = net.online(a)
    assert ca.held == [s_delivered(b, ts(1))]
    ca.lose()
    assert net.online(a).held == [], "a held 07 is sent once"


def test_16_from_a_03_session_is_ignored(net):
    a, b, ca, cb = two_online(net)
    ca.send(f_send(a, b, ts(1), b"hi"))
    cb.take()
    ca.take()
    cb.send(f_received(a, b, ts(1)))
    assert cb.take() == [] and ca.take() == []
    assert not cb.closed


# -- sessions opened with 15: delivery is the acknowledgment -----------------


def secret_pair(net):
    a, _ = net.register()
    b, secret = net.register(with_secret=True)
    return a, b, secret, net.online(a), net.online(b, secret)


def test_15_session_message_is_delivered_only_when_acknowledged(net):
    a, b, secret, ca, cb = secret_pair(net)
    ca.send(f_send(a, b, ts(1), b"hi"))
    assert cb.take() == [s_message(a, b, ts(1), b"hi")]
    assert ca.take() == [], "written is not delivered for a 15 session"
    cb.send(f_received(a, b, ts(1)))
    assert cb.take() == []
    assert ca.take() == [s_delivered(b, ts(1))]
    cb.send(f_received(a, b, ts(1)))
    assert ca.take() == [], "a second 16 for the same message changes nothing"


def test_unacknowledged_06_is_sent_again_after_the_next_login(net):
    a, b, secret, ca, cb = secret_pair(net)
    ca.send(f_send(a, b, ts(1), b"one"), f_send(a, b, ts(2), b"two"))
    assert len(cb.take()) == 2
    cb.send(f_received(a, b, ts(1)))
    cb.lose()
    assert ca.take() == [s_delivered(b, ts(1))]
    cb = net.online(b, secret)
    assert cb.held == [s_message(a, b, ts(2), b"two")]
    cb.send(f_received(a, b, ts(2)))
    assert ca.take() == [s_delivered(b, ts(2))]
    cb.lose()
    assert net.online(b, secret).held == []


def test_16_naming_no_pending_message_is_ignored(net):
    a, b, secret, ca, cb = secret_pair(net)
    cb.send(f_received(a, b, ts(77)))
    assert cb.take() == [] and ca.take() == []
    assert not cb.closed


def test_16_cannot_acknowledge_someone_elses_message(net):
    """B acknowledging A→C must not give A a 07 while C has not acknowledged."""
    a, c, secret, ca, cc = secret_pair(net)
    b, _ = net.register()
    cb = net.online(b)
    ca.send(f_send(a, c, ts(1), b"for c"))
    assert len(cc.take()) == 1
    cb.send(f_received(a, c, ts(1)))
    assert ca.take() == []
    cc.send(f_received(a, c, ts(1)))
    assert ca.take() == [s_delivered(c, ts(1))]


def test_second_login_resends_unacknowledged_messages_to_the_new_session(net):
    a, b, secret, ca, cb = secret_pair(net)
    ca.send(f_send(a, b, ts(1), b"hi"))
    assert len(cb.take()) == 1
    new = net.online(b, secret)
    assert new.held == [s_message(a, b, ts(1), b"hi")]
    assert cb.take() == [s_error(b"03", b"09")]


# -- resends -------------------------------------------------------------------


def test_resending_a_delivered_message_gives_07_again_and_no_second_06(net):
    a, b, ca, cb = two_online(net)
    frame = f_send(a, b, ts(1), b"hi")
    ca.send(frame)
    cb.take()
    assert ca.take() == [s_delivered(b, ts(1))]
    ca.send(frame)
    assert ca.take() == [s_delivered(b, ts(1))]
    assert cb.take() == []


def test_resending_a_pending_message_delivers_it_once(net):
    a, b, ca, cb = two_online(net)
    cb.lose()
    frame = f_send(a, b, ts(1), b"hi")
    ca.send(frame)
    ca.send(frame)
    assert ca.take() == []
    ca.lose()
    ca = net.online(a)
    ca.send(frame)
    cb = net.online(b)
    assert cb.held == [s_message(a, b, ts(1), b"hi")]
    assert ca.take() == [s_delivered(b, ts(1))]


def test_resending_to_a_15_session_that_has_not_acknowledged_sends_nothing(net):
    a, b, secret, ca, cb = secret_pair(net)
    frame = f_send(a, b, ts(1), b"hi")
    ca.send(frame)
    cb.take()
    ca.send(frame)
    assert cb.take() == [] and ca.take() == []


def test_same_timestamp_different_text_is_a_different_message(net):
    """Identity is (SRC, DST, TIMESTAMP, MSG): only a true repeat is dropped."""
    a, b, ca, cb = two_online(net)
    ca.send(f_send(a, b, ts(1), b"one"), f_send(a, b, ts(1), b"two"))
    assert cb.take() == [s_message(a, b, ts(1), b"one"), s_message(a, b, ts(1), b"two")]


def test_resend_after_a_restart_is_still_recognised(net):
    a, b, ca, cb = two_online(net)
    frame = f_send(a, b, ts(1), b"hi")
    ca.send(frame)
    cb.take()
    ca.take()
    net.restart()
    ca = net.online(a)
    cb = net.online(b)
    ca.send(frame)
    assert ca.take() == [s_delivered(b, ts(1))]
    assert cb.take() == []


# -- what is held, and the order of the flush -----------------------------------


def test_flush_after_04_keeps_the_order_things_were_queued_in(net):
    """06, 07, 09 and 11 held for one user come after 04 in the order they were queued."""
    a, _ = net.register()
    b, _ = net.register()
    c, _ = net.register()
    ca = net.online(a)
    cb = net.online(b)
    cb.send(f_send(b, c, ts(10), b"for c"))
    assert cb.take() == []
    cb.lose()
    ca.send(f_send(a, b, ts(11), b"m1"))
    cc = net.online(c)
    assert cc.held == [s_message(b, c, ts(10), b"for c")]
    cc.send(f_seen(b, ts(10)))
    ca.send(f_group(a, ts(12), [b]))
    (added,) = ca.take()
    group = added[2:15]
    assert added == s_added(group, ts(12), [a, b])
    ca.send(f_send(a, b, ts(13), b"m2"))
    assert ca.take() == []
    cb = net.online(b)
    assert cb.held == [
        s_message(a, b, ts(11), b"m1"),
        s_delivered(c, ts(10)),
        s_seen_by(c, ts(10)),
        s_added(group, ts(12), [a, b]),
        s_message(a, b, ts(13), b"m2"),
    ]
    assert ca.take() == [s_delivered(b, ts(11)), s_delivered(b, ts(13))]
    cb.lose()
    assert net.online(b).held == [], "what was flushed is not held any more"


def test_messages_arriving_during_the_flush_come_after_the_held_ones(make_net):
    """On SQLite the flush waits for a read: a live message must not overtake it."""
    net = make_net("sqlite")
    a, b, ca, cb = two_online(net)
    cb.lose()
    ca.send(f_send(a, b, ts(1), b"held"))
    net.settle()
    cb = net.connect()
    cb.send(f_online(b))
    ca.send(f_send(a, b, ts(2), b"live"))
    assert cb.take() == [b"04" + b, s_message(a, b, ts(1), b"held"), s_message(a, b, ts(2), b"live")]
    assert ca.take() == [s_delivered(b, ts(1)), s_delivered(b, ts(2))]


# -- 08 → 09 ---------------------------------------------------------------------


def test_seen_reaches_the_sender_as_09(net):
    a, b, ca, cb = two_online(net)
    ca.send(f_send(a, b, ts(5), b"hi"))
    cb.take()
    ca.take()
    cb.send(f_seen(a, ts(5)))
    assert ca.take() == [s_seen_by(b, ts(5))]
    assert cb.take() == []


def test_seen_for_an_offline_sender_is_held(net):
    a, b, ca, cb = two_online(net)
    ca.lose()
    cb.send(f_seen(a, ts(5)))
    assert net.online(a).held == [s_seen_by(b, ts(5))]


@pytest.mark.parametrize("peer", [b"0999999999999", b"1999999999999"], ids=["user", "group"])
def test_seen_naming_an_unknown_user_or_group_gets_06(net, peer):
    a, _ = net.register()
    ca = net.online(a)
    ca.send(f_seen(peer, ts(1)))
    assert ca.take() == [s_error(b"08", b"06")]


# -- groups ----------------------------------------------------------------------


def three(net):
    users = [net.register()[0] for _ in range(3)]
    return users, [net.online(u) for u in users]


def make_group(conn, creator, when, listed):
    conn.send(f_group(creator, when, listed))
    (added,) = [f for f in conn.take() if f[:2] == b"11"]
    return added[2:15]


def test_group_creation_tells_every_member_with_11(net):
    (a, b, c), (ca, cb, cc) = three(net)
    ca.send(f_group(a, ts(50), [b, c]))
    (added,) = ca.take()
    group = added[2:15]
    assert group.isdigit() and group[:1] == b"1"
    assert added == s_added(group, ts(50), [a, b, c])
    assert cb.take() == [added]
    assert cc.take() == [added]


def test_group_members_creator_first_then_listed_without_duplicates(net):
    (a, b, c), (ca, cb, cc) = three(net)
    ca.send(f_group(a, ts(50), [c, a, b, c, b]))
    (added,) = ca.take()
    assert added == s_added(added[2:15], ts(50), [a, c, b])


def test_group_ids_are_distinct(net):
    (a, b, c), (ca, cb, cc) = three(net)
    g1 = make_group(ca, a, ts(1), [b])
    g2 = make_group(ca, a, ts(1), [b])
    assert g1 != g2


def test_offline_member_gets_11_at_next_login(net):
    (a, b, c), (ca, cb, cc) = three(net)
    cc.lose()
    group = make_group(ca, a, ts(50), [b, c])
    assert net.online(c).held == [s_added(group, ts(50), [a, b, c])]


@pytest.mark.parametrize("stranger", [b"0999999999999", b"1999999999999"], ids=["user", "group id"])
def test_group_with_an_unknown_member_is_refused_with_04(net, stranger):
    (a, b, c), (ca, cb, cc) = three(net)
    ca.send(f_group(a, ts(50), [b, stranger]))
    assert ca.take() == [s_error(b"10", b"04")]
    assert cb.take() == []


def test_group_with_spoofed_src_is_refused_with_05(net):
    (a, b, c), (ca, cb, cc) = three(net)
    ca.send(f_group(b, ts(50), [c]))
    assert ca.take() == [s_error(b"10", b"05")]
    assert cb.take() == [] and cc.take() == []


def test_group_of_99_members_is_allowed_and_100_is_not(make_net):
    net = make_net()
    users = [net.register()[0] for _ in range(100)]
    creator, others = users[0], users[1:]
    conn = net.online(creator)
    conn.send(f_group(creator, ts(1), others))
    assert conn.take() == [s_error(b"10", b"01")], "99 listed plus the creator is 100"
    assert not conn.closed
    conn.send(f_group(creator, ts(1), others[:98]))
    (added,) = conn.take()
    assert added == s_added(added[2:15], ts(1), [creator] + others[:98])
    conn.send(f_group(creator, ts(1), [creator] + others[:98]))
    (again,) = conn.take()
    assert again[25:27] == b"99", "a listed creator is not counted twice"


def test_group_message_fans_out_and_07_comes_once_everyone_has_it(net):
    (a, b, c), (ca, cb, cc) = three(net)
    group = make_group(ca, a, ts(1), [b, c])
    cb.take()
    assert cc.take() == [s_added(group, ts(1), [a, b, c])]
    cc.lose()
    ca.send(f_send(a, group, ts(2), b"hello all"))
    assert cb.take() == [s_message(a, group, ts(2), b"hello all")]
    assert ca.take() == [], "no 07 while one member is missing it"
    cc = net.online(c)
    assert cc.held == [s_message(a, group, ts(2), b"hello all")]
    assert ca.take() == [s_delivered(group, ts(2))]


def test_group_message_with_everyone_online_gets_07_at_once(net):
    (a, b, c), (ca, cb, cc) = three(net)
    group = make_group(ca, a, ts(1), [b, c])
    cb.take(), cc.take()
    cb.send(f_send(b, group, ts(2), b"from b"))
    assert ca.take() == [s_message(b, group, ts(2), b"from b")]
    assert cc.take() == [s_message(b, group, ts(2), b"from b")]
    assert cb.take() == [s_delivered(group, ts(2))]


def test_group_message_from_a_non_member_is_refused_with_07(net):
    (a, b, c), (ca, cb, cc) = three(net)
    group = make_group(ca, a, ts(1), [b])
    cb.take()
    cc.send(f_send(c, group, ts(2), b"let me in"))
    assert cc.take() == [s_error(b"05", b"07")]
    assert ca.take() == [] and cb.take() == []


def test_seen_for_a_group_one_is_not_in_gets_07(net):
    (a, b, c), (ca, cb, cc) = three(net)
    group = make_group(ca, a, ts(1), [b])
    cc.send(f_seen(group, ts(1)))
    assert cc.take() == [s_error(b"08", b"07")]


def test_group_07_with_a_15_session_member_waits_for_the_acknowledgment(net):
    a, b = net.register()[0], net.register()[0]
    c, secret = net.register(with_secret=True)
    ca, cb, cc = net.online(a), net.online(b), net.online(c, secret)
    group = make_group(ca, a, ts(1), [b, c])
    cb.take(), cc.take()
    ca.send(f_send(a, group, ts(2), b"ack please"))
    assert cc.take() == [s_message(a, group, ts(2), b"ack please")]
    assert cb.take() == [s_message(a, group, ts(2), b"ack please")]
    assert ca.take() == []
    cc.send(f_received(a, group, ts(2)))
    assert ca.take() == [s_delivered(group, ts(2))]


def test_group_read_marks_give_09_when_every_reader_is_past(net):
    """09 GROUP TS goes to every member once all but the sender have read the message."""
    (a, b, c), (ca, cb, cc) = three(net)
    group = make_group(ca, a, ts(1), [b, c])
    cb.take(), cc.take()
    ca.send(f_send(a, group, ts(100), b"read me"))
    cb.take(), cc.take(), ca.take()
    cb.send(f_seen(group, ts(100)))
    assert ca.take() == [] and cb.take() == [] and cc.take() == []
    cc.send(f_seen(group, ts(100)))
    for conn in (ca, cb, cc):
        assert conn.take() == [s_seen_by(group, ts(100))]


def test_group_low_mark_counts_each_message_without_its_sender(net):
    (a, b, c), (ca, cb, cc) = three(net)
    group = make_group(ca, a, ts(1), [b, c])
    cb.take(), cc.take()
    ca.send(f_send(a, group, ts(100), b"from a"))
    cb.send(f_send(b, group, ts(200), b"from b"))
    for conn in (ca, cb, cc):
        conn.take()
    cc.send(f_seen(group, ts(200)))
    assert ca.take() == [], "b has not read a's message yet"
    cb.send(f_seen(group, ts(100)))
    for conn in (ca, cb, cc):
        assert conn.take() == [s_seen_by(group, ts(100))]
    ca.send(f_seen(group, ts(200)))
    for conn in (ca, cb, cc):
        assert conn.take() == [s_seen_by(group, ts(200))]


def test_group_09_for_an_offline_member_is_held(net):
    (a, b, c), (ca, cb, cc) = three(net)
    group = make_group(ca, a, ts(1), [b, c])
    cb.take(), cc.take()
    ca.send(f_send(a, group, ts(100), b"read me"))
    cb.take(), cc.take(), ca.take()
    ca.lose()
    cb.send(f_seen(group, ts(100)))
    cc.send(f_seen(group, ts(100)))
    assert net.online(a).held == [s_seen_by(group, ts(100))]


def test_group_read_mark_does_not_move_back(net):
    (a, b, c), (ca, cb, cc) = three(net)
    group = make_group(ca, a, ts(1), [b])
    cb.take()
    ca.send(f_send(a, group, ts(100), b"one"))
    cb.take(), ca.take()
    cb.send(f_seen(group, ts(100)))
    assert ca.take() == [s_seen_by(group, ts(100))]
    assert cb.take() == [s_seen_by(group, ts(100))]
    cb.send(f_seen(group, ts(50)), f_seen(group, ts(100)))
    assert ca.take() == [] and cb.take() == []


# -- isolation ---------------------------------------------------------------------


def test_a_bystander_sees_nothing_of_other_peoples_traffic(net):
    """No frame reaches a user it was not addressed to."""
    (a, b, c), (ca, cb, cc) = three(net)
    group = make_group(ca, a, ts(1), [b])
    cb.take()
    ca.send(f_send(a, b, ts(2), b"private"))
    cb.send(f_seen(a, ts(2)))
    ca.send(f_send(a, group, ts(3), b"group only"))
    cb.send(f_seen(group, ts(3)))
    ca.send(f_send(a, b, ts(2), b"private"))  # a resend
    ca.send(f_send(b, c, ts(4), b"spoof"))
    cb.send(b"\x00\x01garbage")
    ca.send(f_seen(b, ts(2)))
    assert cc.take() == []
    cc.lose()
    assert net.online(c).held == []


# -- durability across a restart -------------------------------------------------


def test_restart_keeps_users_secrets_and_queued_messages(net):
    a, _ = net.register()
    b, secret = net.register(with_secret=True)
    ca = net.online(a)
    ca.send(f_send(a, b, ts(1), b"one"), f_send(a, b, ts(2), b"two"))
    ca.take()
    net.restart()
    wrong = net.connect()
    wrong.send(f_online_secret(b, b"f" * 32 if secret != b"f" * 32 else b"e" * 32))
    assert wrong.take() == [s_error(b"15", b"08")]
    ca = net.online(a)
    cb = net.online(b, secret)
    assert cb.held == [s_message(a, b, ts(1), b"one"), s_message(a, b, ts(2), b"two")]
    cb.send(f_received(a, b, ts(1)), f_received(a, b, ts(2)))
    assert ca.take() == [s_delivered(b, ts(1)), s_delivered(b, ts(2))]


def test_restart_keeps_held_notices(net):
    a, b, ca, cb = two_online(net)
    cb.lose()
    ca.send(f_send(a, b, ts(1), b"hi"))
    ca.lose()
    cb = net.online(b)
    assert cb.held == [s_message(a, b, ts(1), b"hi")]
    cb.send(f_seen(a, ts(1)))
    net.restart()
    assert net.online(a).held == [s_delivered(b, ts(1)), s_seen_by(b, ts(1))]


def test_restart_keeps_groups_and_read_marks(net):
    (a, b, c), (ca, cb, cc) = three(net)
    group = make_group(ca, a, ts(1), [b, c])
    ca.send(f_send(a, group, ts(100), b"before"))
    cb.send(f_seen(group, ts(100)))
    net.restart()
    ca, cb, cc = net.online(a), net.online(b), net.online(c)
    cc.send(f_seen(group, ts(100)))
    for conn in (ca, cb, cc):
        assert conn.take() == [s_seen_by(group, ts(100))]
    cc.send(f_send(c, group, ts(101), b"after"))
    assert ca.take() == [s_message(c, group, ts(101), b"after")]
    assert cb.take() == [s_message(c, group, ts(101), b"after")]
    assert cc.take() == [s_delivered(group, ts(101))]
    stranger, _ = net.register()
    cs = net.online(stranger)
    cs.send(f_send(stranger, group, ts(5), b"in?"))
    assert cs.take() == [s_error(b"05", b"07")]


# -- SQLite: nothing is promised before it is committed ----------------------------


def test_02_is_sent_only_after_the_account_is_committed(make_net):
    net = make_net("sqlite")
    conn = net.connect()
    conn.send(b"01")
    net.reactor.advance(0)  # the transaction is handed to the database thread...
    assert conn.transport.value() == b"", "...but 02 must wait for its commit"
    (frame,) = conn.take()
    assert frame[:2] == b"02"


def test_06_and_07_wait_for_the_commit(make_net):
    net = make_net("sqlite")
    a, b, ca, cb = two_online(net)
    ca.send(f_send(a, b, ts(1), b"hi"))
    net.reactor.advance(0)
    assert ca.transport.value() == b"" and cb.transport.value() == b""
    assert cb.take() == [s_message(a, b, ts(1), b"hi")]
    assert ca.take() == [s_delivered(b, ts(1))]


def test_recipient_leaving_before_the_commit_gets_the_message_next_time(make_net):
    """Counted as online when the 05 came in, gone when it committed: it must be held."""
    net = make_net("sqlite")
    a, b, ca, cb = two_online(net)
    ca.send(f_send(a, b, ts(1), b"racing"))
    cb.lose()
    assert ca.take() == [], "b never got it: no 07"
    cb = net.online(b)
    assert cb.held == [s_message(a, b, ts(1), b"racing")]
    assert ca.take() == [s_delivered(b, ts(1))]


def test_recipient_arriving_before_the_commit_gets_the_message_once(make_net):
    net = make_net("sqlite")
    a, b, ca, cb = two_online(net)
    cb.lose()
    ca.send(f_send(a, b, ts(1), b"racing"))
    cb = net.connect()
    cb.send(f_online(b))
    assert cb.take() == [b"04" + b, s_message(a, b, ts(1), b"racing")]
    assert ca.take() == [s_delivered(b, ts(1))]


def test_crash_after_commit_before_the_06_is_written_loses_nothing(make_net):
    """kill -9 may land between the commit and the write to an online 03 recipient.

    After the restart the recipient must still get the message, and a resend
    must not earn the sender a 07 for a message nobody received.
    """
    net = make_net("sqlite")
    a, b, ca, cb = two_online(net)
    ca.send(f_send(a, b, ts(1), b"in flight"))
    net.reactor.advance(0)  # the transaction goes to the database thread
    net.crash(after_commit=True)
    ca = net.online(a)
    ca.send(f_send(a, b, ts(1), b"in flight"))  # the client's outbox resends: no 07 yet
    assert ca.take() == [], "a 07 for a message b never received"
    cb = net.online(b)
    assert cb.held == [s_message(a, b, ts(1), b"in flight")]


def test_secrets_are_not_stored_in_the_clear(make_net, tmp_path):
    net = make_net("sqlite")
    user, secret = net.register(with_secret=True)
    net.restart()
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("chat0.sqlite3"))
    assert user in stored, "the account is in the database"
    assert secret not in stored and secret.upper() not in stored


# -- limits a user can run into -------------------------------------------------------


def test_a_connection_that_never_logs_in_is_closed_after_the_login_timeout(net):
    idle = net.connect()
    user, _ = net.register()
    active = net.online(user)
    net.reactor.advance(59)
    assert not idle.closed
    net.reactor.advance(2)
    assert idle.closed
    assert not active.closed


# -- command-line options ---------------------------------------------------------------


@pytest.mark.parametrize(
    "given, endpoint",
    [
        ("7000", "tcp:7000"),
        ("tcp:7001:interface=127.0.0.1", "tcp:7001:interface=127.0.0.1"),
        ("unix:/tmp/chat.sock", "unix:/tmp/chat.sock"),
    ],
)
def test_port_option_takes_a_bare_number_or_an_endpoint(given, endpoint):
    options = Options()
    options.parseOptions(["--port", given])
    assert options["port"] == endpoint


def test_default_options_listen_on_7000_with_a_file_database():
    options = Options()
    options.parseOptions([])
    assert options["port"] == "tcp:7000"
    assert options["db"] not in ("", ":memory:")
    assert not options["require-secrets"]


# -- random traffic: nothing misaddressed, nothing lost, one 07 each --------------------

_action = st.one_of(
    st.tuples(st.just("online"), st.integers(0, 3)),
    st.tuples(st.just("offline"), st.integers(0, 3)),
    st.tuples(st.just("send"), st.integers(0, 3), st.integers(0, 5)),
    st.tuples(st.just("send"), st.integers(0, 3), st.integers(0, 5)),
    st.tuples(st.just("seen"), st.integers(0, 3), st.integers(0, 4)),
    st.tuples(st.just("ack"), st.integers(0, 7)),
    st.tuples(st.just("group"), st.integers(0, 3), st.lists(st.integers(0, 3), max_size=3)),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_action, max_size=25))
def test_random_traffic_reaches_only_its_addressees_and_is_confirmed_once(no_logged_failures, actions):
    """Users 0-2 use 03, user 3 uses 15; after everyone finally logs in, all is delivered."""
    net = Net("memory")
    try:
        users = [net.register()[0] for _ in range(3)]
        d, secret = net.register(with_secret=True)
        users.append(d)
        conns: dict[int, object] = {}
        got: dict[bytes, list[bytes]] = {u: [] for u in users}
        groups: dict[bytes, list[bytes]] = {}
        sent = []  # (src, dst, ts, text)
        seen_sent = set()  # (reader, peer, ts)
        clock = iter(range(1, 10_000))

        def collect():
            for i, conn in list(conns.items()):
                got[users[i]].extend(conn.take())

        def login(i):
            if i in conns:
                collect()
            conn = net.online(users[i], secret if i == 3 else None)
            got[users[i]].extend([b"04" + users[i]] + conn.held)
            conns[i] = conn

        first = net.online(users[0])
        first.send(f_group(users[0], ts(next(clock)), [users[1], d]))
        (added,) = first.take()
        groups[added[2:15]] = [users[0], users[1], d]
        first.lose()
        for i in range(4):
            login(i)

        for action in actions:
            kind, i = action[0], action[1]
            if kind == "online":
                login(i)
            elif kind == "offline" and i in conns:
                collect()
                conns.pop(i).lose()
            elif kind == "send" and i in conns:
                targets = users + list(groups)
                dst = targets[action[2] % len(targets)]
                msg = (users[i], dst, ts(next(clock)), b"m%d" % len(sent))
                conns[i].send(f_send(*msg))
                if dst in users or users[i] in groups[dst]:
                    sent.append(msg)
            elif kind == "seen" and i in conns:
                peer = users[action[2] % 4]
                when = ts(next(clock))
                conns[i].send(f_seen(peer, when))
                seen_sent.add((users[i], peer, when))
            elif kind == "ack" and 3 in conns:
                mine = [f for f in got[d] if f[:2] == b"06"]
                if mine:
                    f = mine[i % len(mine)]
                    conns[3].send(f_received(f[2:15], f[15:28], f[28:38]))
            elif kind == "group" and i in conns:
                conns[i].send(f_group(users[i], ts(next(clock)), [users[m] for m in action[2]]))
                answer = conns[i].take()
                got[users[i]].extend(answer)
                for added in [f for f in answer if f[:2] == b"11"]:
                    groups[added[2:15]] = [added[27 + 13 * k : 40 + 13 * k] for k in range(int(added[25:27]))]
            collect()
        for i in range(4):
            if i not in conns:
                login(i)
        for f in [f for f in got[d] if f[:2] == b"06"]:
            conns[3].send(f_received(f[2:15], f[15:28], f[28:38]))
        collect()

        texts = {(s, t, w, x): (s, t) for s, t, w, x in sent}
        for user, frames in got.items():
            for f in frames:
                code = f[:2]
                if code == b"06":
                    src, dst, when, text = f[2:15], f[15:28], f[28:38], f[38:].rstrip(b"\0")
                    assert (src, dst, when, text) in texts, f"{user} got a message nobody sent"
                    assert dst == user or (user in groups.get(dst, ()) and src != user)
                elif code == b"07":
                    assert any(s == user and t == f[2:15] and w == f[15:25] for s, t, w, _ in sent)
                elif code == b"09":
                    who, when = f[2:15], f[15:25]
                    assert (who, user, when) in seen_sent or user in groups.get(who, ())
                elif code == b"11":
                    assert user in groups[f[2:15]]
                else:
                    assert code in (b"04", b"12"), f
        for src, dst, when, text in sent:
            recipients = [dst] if dst in users else [m for m in groups[dst] if m != src]
            for r in recipients:
                copies = got[r].count(s_message(src, dst, when, text))
                assert copies >= 1, "a message was lost"
                if r != d:
                    assert copies == 1, "a 03 session got a message twice"
            assert got[src].count(s_delivered(dst, when)) == 1, "one 07 per message, once all have it"
    finally:
        net.shutdown()


def test_a_reader_dropped_for_its_backlog_earns_its_sender_no_07(net):
    """Past --max-buffer the 06 is not written, so it stays held and no 07 lies about it."""
    from chatproto.server import Limits

    net.factory.limits = Limits(max_buffer=200)  # less than one 06
    a, b, ca, cb = two_online(net)
    cb.proto.pauseProducing()  # b's transport says: stop, the reader is behind
    ca.send(f_send(a, b, ts(1), b"one"), f_send(a, b, ts(2), b"two"))
    assert ca.take() == [], "b was dropped instead of being written to"
    assert cb.closed
    assert cb.take() == []
    cb.lose()
    cb = net.online(b)
    assert cb.held == [s_message(a, b, ts(1), b"one"), s_message(a, b, ts(2), b"two")]
    assert ca.take() == [s_delivered(b, ts(1)), s_delivered(b, ts(2))]


def test_held_data_for_an_offline_user_is_capped(net):
    """Past the cap a direct message is refused as busy, a group message skips that member."""
    net.domain.delivery.max_held = 2
    a, b, ca, cb = two_online(net)
    c, _ = net.register()
    cc = net.online(c)
    group = make_group(ca, a, ts(1), [b, c])
    cb.take(), cc.take()
    cb.lose()
    ca.send(f_send(a, b, ts(2), b"one"), f_send(a, b, ts(3), b"two"))
    assert ca.take() == []
    ca.send(f_send(a, b, ts(4), b"three"))
    assert ca.take() == [s_error(b"05", b"11")]
    ca.send(f_send(a, group, ts(5), b"to the group"))
    assert cc.take() == [s_message(a, group, ts(5), b"to the group")]
    assert ca.take() == [s_delivered(group, ts(5))], "c had it; b's inbox was full"
    cb = net.online(b)
    assert cb.held == [s_message(a, b, ts(2), b"one"), s_message(a, b, ts(3), b"two")]
    ca.send(f_send(a, b, ts(4), b"three"))  # the outbox tries again: b is back
    assert cb.take() == [s_message(a, b, ts(4), b"three")]


def test_the_held_data_cap_counts_what_was_held_before_a_restart(net):
    a, b, ca, cb = two_online(net)
    cb.lose()
    ca.send(f_send(a, b, ts(2), b"one"), f_send(a, b, ts(3), b"two"))
    ca.take()
    net.restart()
    net.domain.delivery.max_held = 2
    ca = net.online(a)
    ca.send(f_send(a, b, ts(4), b"three"))
    assert ca.take() == [s_error(b"05", b"11")]


def test_a_07_not_written_to_a_dropped_sender_waits_for_its_next_login(net):
    from chatproto.server import Limits

    net.factory.limits = Limits(max_buffer=20)  # less than one 07
    a, b, ca, cb = two_online(net)
    ca.proto.pauseProducing()
    ca.send(f_send(a, b, ts(1), b"one"))
    assert cb.take() == [s_message(a, b, ts(1), b"one")]
    assert ca.take() == [] and ca.closed
    ca.lose()
    assert net.online(a).held == [s_delivered(b, ts(1))]


def test_a_stalled_connection_handles_its_later_frames_in_order_once_the_stall_ends(make_net):
    """What a cluster's routing does while it asks the database about an id: the
    frames behind it, in the same read or in later ones, wait their turn."""
    from twisted.internet.defer import Deferred

    from chatproto.domain import LocalRouting

    lookup = Deferred()
    handed = []

    class Asking(LocalRouting):
        """Holds the first read's 05s until ``lookup`` fires, as a lookup would."""

        def send_many(self, session, items):
            handed.append([item[3] for item in items])
            if lookup.called:
                return super().send_many(session, items)
            # The continuation first, then the stall: the later frames follow it.
            lookup.addCallback(lambda _: LocalRouting.send_many(self, session, items))
            session.connection.stall(lookup)
            return None

    net = make_net("memory", routing=Asking)
    a, _ = net.register()
    b, _ = net.register()
    cb = net.connect()
    cb.send(f_online(b))
    conn = net.connect()
    conn.send(f_online(a))
    assert conn.take() == [b"04" + a] and cb.take() == [b"04" + b]
    conn.send(f_send(a, b, ts(1700000001), b"first"), f_send(a, b, ts(1700000002), b"second"))
    conn.send(f_send(a, b, ts(1700000003), b"third"))
    assert handed == [[b"first", b"second"]] and cb.take() == []
    # Still read (a close would be seen), until what waits passes 64 KiB.
    assert conn.transport.producerState == "producing"
    flood = [f_send(a, b, ts(1700000004 + i), b"more %d" % i) for i in range(300)]
    conn.send(*flood)
    assert len(handed) == 1 and conn.transport.producerState == "paused"
    lookup.callback(None)
    texts = [b"first", b"second", b"third"] + [b"more %d" % i for i in range(300)]
    assert [t for read in handed for t in read] == texts
    assert conn.transport.producerState == "producing"
    assert cb.take() == [s_message(a, b, ts(1700000001 + i), t) for i, t in enumerate(texts)]
