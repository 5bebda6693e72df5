"""Framing: how bytes become frames, whatever TCP does to them.

Property tests (hypothesis) for the framer on its own and inside the
server's protocol, plus the widths of the encoders both sides share.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatproto import wire

from .helpers import SERVER_FRAME_LEN, Net, f_online, parse_server

pytestmark = pytest.mark.usefixtures("no_logged_failures")

PROPERTY = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

#: Every client frame's length, from the contract (10: 27 + 13·N, 19: 40 + 13·N).
CLIENT_LEN = {
    b"01": 2,
    b"03": 15,
    b"05": 256,
    b"08": 25,
    b"13": 2,
    b"15": 47,
    b"16": 38,
    b"17": 102,
    b"20": 38,
}
#: The variable frames' length before their members (N is its last two bytes).
HEADER_LEN = {b"10": 27, b"19": 40}


@st.composite
def any_client_frame(draw):
    """A frame of any client code with arbitrary field bytes: framing looks only at COD and N."""
    code = draw(st.sampled_from([*CLIENT_LEN, *HEADER_LEN]))
    if code in HEADER_LEN:
        n = draw(st.integers(0, 12))
        fixed = HEADER_LEN[code] - 4
        return (
            code
            + draw(st.binary(min_size=fixed, max_size=fixed))
            + b"%02d" % n
            + draw(st.binary(min_size=13 * n, max_size=13 * n))
        )
    return code + draw(st.binary(min_size=CLIENT_LEN[code] - 2, max_size=CLIENT_LEN[code] - 2))


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


@PROPERTY
@given(st.lists(any_client_frame(), max_size=12), st.lists(st.integers(0, 10_000), max_size=20))
def test_any_split_of_a_client_stream_decodes_to_the_same_frames(no_logged_failures, frames, cuts):
    data = b"".join(frames)
    got = []
    rest = b""
    for chunk in chunked(data, cuts):
        more, rest, status = wire.split_frames(wire.CLIENT_FRAME_LEN, rest + chunk)
        assert status == 0
        got.extend(more)
    assert got == frames and rest == b""


# -- through the server's protocol ----------------------------------------------------

A = b"0100000000001"
B = b"0200000000002"
NO_GROUP = b"1000000000009"


def session_net() -> Net:
    """A hub whose store already knows A and B, so their ids are fixed across runs."""
    net = Net("memory")
    net._memory.users.update({A.decode(): None, B.decode(): None})
    net.domain.load(net.result(net.store.load()))
    return net


texts = st.one_of(
    st.text(min_size=1, max_size=60).map(lambda t: t.encode()[:218]).filter(lambda t: b"\0" not in t),
    st.binary(max_size=218),
)
timestamps = st.integers(0, 99).map(lambda n: b"%010d" % (1_700_000_000 + n))
valid_ish = st.one_of(
    st.builds(lambda t, x: b"05" + A + B + t + x.ljust(218, b"\0"), timestamps, texts),
    st.builds(lambda t: b"08" + B + t, timestamps),
    st.builds(lambda t: b"16" + B + A + t, timestamps),
    st.builds(
        lambda t, ms: b"10" + A + t + b"%02d" % len(ms) + b"".join(ms),
        timestamps,
        st.lists(st.sampled_from([A, B, b"0999999999999"]), max_size=4),
    ),
    st.just(f_online(A)),
    st.just(b"15" + A + b"0" * 32),
    # 17, 19 and 20 for a group no one made: answered 12 XX 06 (or 01, 05), never framed wrong.
    st.builds(lambda t, x: b"17" + A + NO_GROUP + t + x[:64].ljust(64, b"\0"), timestamps, texts),
    st.builds(
        lambda t, ms: b"19" + A + NO_GROUP + t + b"%02d" % len(ms) + b"".join(ms),
        timestamps,
        st.lists(st.sampled_from([A, B, b"0999999999999"]), max_size=4),
    ),
    st.builds(lambda t: b"20" + B + NO_GROUP + t, timestamps),
)


def normalise(frames: list[bytes]) -> list[bytes]:
    """Group ids are random: name them by order of first appearance."""
    names: dict[bytes, bytes] = {}
    out = []
    for frame in frames:
        if frame[:2] == b"11":
            group = names.setdefault(frame[2:15], b"G%012d" % len(names))
            frame = frame[:2] + group + frame[15:]
        out.append(frame)
    return out


def run_session(chunks: list[bytes]) -> tuple[list[bytes], bool]:
    net = session_net()
    try:
        conn = net.connect()
        for chunk in chunks:
            conn.send(chunk)
        return normalise(conn.take()), conn.closed
    finally:
        net.shutdown()


@PROPERTY
@given(st.lists(valid_ish, max_size=10), st.lists(st.integers(0, 10_000), max_size=20))
def test_the_server_answers_a_split_stream_as_it_answers_the_whole(no_logged_failures, frames, cuts):
    """Frames split or merged in any way arrive as the same frames: the answers show it."""
    data = f_online(A) + b"".join(frames)
    assert run_session(chunked(data, cuts)) == run_session([data])


@PROPERTY
@given(
    st.lists(st.one_of(st.binary(max_size=30), valid_ish), max_size=8),
    st.lists(st.integers(0, 10_000), max_size=10),
    st.booleans(),
)
def test_random_bytes_end_in_frames_errors_or_a_close(no_logged_failures, pieces, cuts, logged_in):
    """Garbage never raises out of dataReceived; the answer is always well-framed."""
    net = session_net()
    try:
        conn = net.connect()
        if logged_in:
            conn.send(f_online(A))
        for chunk in chunked(b"".join(pieces), cuts):
            conn.send(chunk)
        frames = conn.take()
        unframeable = [f for f in frames if f[:2] == b"12" and (f[4:] == b"02" or f == b"121001")]
        if conn.closed:
            assert frames and frames[-1] in unframeable
        else:
            assert not [f for f in frames if f[:2] == b"12" and f[4:] == b"02"]
        was_closed = conn.closed
        conn.send(b"01")
        after = conn.take()
        if was_closed:
            assert after == [], "nothing after the close may be answered"
    finally:
        net.shutdown()


# -- encoders: the widths the contract fixes ------------------------------------------


def test_server_encoders_have_the_contracts_widths():
    user, group, when, secret = b"0" * 13, b"1" * 13, b"1" * 10, b"a" * 32
    frames = [
        wire.registered(user),
        wire.online_ok(user),
        wire.message(user, user, when, b"x"),
        wire.delivered(user, when),
        wire.seen_by(user, when),
        wire.added_to_group(group, when, [user, user]),
        wire.error(b"05", b"01"),
        wire.registered_secret(user, secret),
        wire.subject(group, user, when, "Trio ü".encode()),
        wire.left_group(group, when),
    ]
    assert parse_server(b"".join(frames)) == frames
    assert {f[:2] for f in frames} == set(SERVER_FRAME_LEN) == set(wire.SERVER_FRAME_LEN)
    assert wire.split_frames(wire.SERVER_FRAME_LEN, b"".join(frames)) == (frames, b"", 0)


def test_client_encoders_have_the_contracts_widths():
    user, group, when, secret = b"0" * 13, b"1" * 13, b"1" * 10, b"a" * 32
    frames = [
        wire.register(),
        wire.online(user),
        wire.send(user, user, when, "ü".encode()),
        wire.seen(user, when),
        wire.create_group(user, when, [user, user]),
        wire.register_secret(),
        wire.online_secret(user, secret),
        wire.received(user, user, when),
        wire.set_subject(user, group, when, b"Trio"),
        wire.add_members(user, group, when, [user, user, user]),
        wire.leave_group(user, group, when),
    ]
    for frame in frames:
        code = frame[:2]
        if code in HEADER_LEN:
            header = HEADER_LEN[code]
            expected = header + 13 * int(frame[header - 2 : header])
        else:
            expected = CLIENT_LEN[code]
        assert len(frame) == expected, code
    assert {f[:2] for f in frames} == set(wire.CLIENT_FRAME_LEN)
    assert wire.split_frames(wire.CLIENT_FRAME_LEN, b"".join(frames)) == (frames, b"", 0)


# -- the group-management frames' decoders: each field where the contract puts it --

ALICE, BOB, CAROL = b"0418273645091", b"0736251849203", b"0590817263544"
TRIO = b"1273849506172"
WHEN = b"1700000300"


def test_set_subject_and_subject_decode_to_the_same_fields():
    sent = wire.set_subject(ALICE, TRIO, WHEN, "Trio ü".encode())
    assert sent == b"17" + ALICE + TRIO + WHEN + "Trio ü".encode() + b"\0" * 57
    got = wire.decode_set_subject(sent)
    assert got == wire.Subject(group=TRIO, src=ALICE, ts=WHEN, name=got.name)
    assert wire.unpad_name(got.name) == "Trio ü".encode()
    echoed = wire.subject(got.group, got.src, got.ts, got.name)
    assert echoed == b"18" + TRIO + ALICE + WHEN + "Trio ü".encode() + b"\0" * 57
    assert wire.decode_subject(echoed) == got


def test_add_members_decodes_its_members_and_n():
    frame = wire.add_members(ALICE, TRIO, WHEN, [BOB, CAROL])
    assert len(frame) == 40 + 26
    assert wire.decode_add_members(frame) == wire.AddMembers(ALICE, TRIO, WHEN, b"02", [BOB, CAROL])
    # A frame cut short (the framer never makes one: it reads the length from N) keeps only whole ids.
    assert wire.decode_add_members(frame[:-5]).members == [BOB]


def test_leave_and_left_decode():
    assert wire.decode_leave(wire.leave_group(BOB, TRIO, WHEN)) == wire.Leave(BOB, TRIO, WHEN)
    assert wire.leave_group(BOB, TRIO, WHEN) == b"20" + BOB + TRIO + WHEN
    assert wire.decode_left(wire.left_group(TRIO, WHEN)) == wire.Left(TRIO, WHEN)
    assert wire.left_group(TRIO, WHEN) == b"21" + TRIO + WHEN


def test_a_19_is_framed_by_its_own_n():
    """19's N sits at bytes 38-39, not where a 10's does: the framer must read it there."""
    frame = wire.add_members(ALICE, TRIO, WHEN, [BOB] * 3)
    assert wire.frame_length(wire.CLIENT_FRAME_LEN, frame, 0) == 40 + 39
    assert wire.frame_length(wire.CLIENT_FRAME_LEN, frame[:39], 0) == 0
    assert wire.frame_length(wire.CLIENT_FRAME_LEN, frame[:38] + b"x3", 0) == -2


@pytest.mark.parametrize(
    "field, name",
    [
        (b"Trio".ljust(64, b"\0"), b"Trio"),
        ("ü".encode() * 32, "ü".encode() * 32),
        (b"\0" * 64, None),
        (b"a\0b".ljust(64, b"\0"), None),
        (b"\xc3".ljust(64, b"\0"), None),
    ],
)
def test_name_is_unpadded_or_called_malformed(field, name):
    assert wire.unpad_name(field) == name


@pytest.mark.parametrize(
    "field, text",
    [
        (b"hi".ljust(218, b"\0"), b"hi"),
        ("ÿ€".encode().ljust(218, b"\0"), "ÿ€".encode()),
        (b"\0" * 218, None),
        (b"a\0b".ljust(218, b"\0"), None),
        (b"\xe2\x82".ljust(218, b"\0"), None),
    ],
)
def test_text_is_unpadded_or_called_malformed(field, text):
    assert wire.unpad_text(field) == text


def test_split_frames_stops_at_its_limit_and_leaves_the_rest_unframed():
    stream = b"01" * 5 + b"03" + b"0" * 13
    frames, rest, status = wire.split_frames(wire.CLIENT_FRAME_LEN, stream, 3)
    assert frames == [b"01"] * 3 and status == 0
    assert rest == b"01" * 2 + b"03" + b"0" * 13
    assert wire.split_frames(wire.CLIENT_FRAME_LEN, stream, 0) == ([], stream, 0)
    assert wire.split_frames(wire.CLIENT_FRAME_LEN, stream)[0] == [b"01"] * 5 + [b"03" + b"0" * 13]
