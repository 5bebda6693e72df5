"""The client library against fake transports and a fake clock: no sockets, no sleeping."""

from __future__ import annotations

import os
import sqlite3
import stat

import pytest

from chatproto import wire
from chatproto.client import (
    ADDED,
    CONNECTED,
    DELIVERED,
    FAILED,
    LEFT,
    MEMBER,
    OFFLINE,
    QUEUED,
    READ,
    RECONNECTING,
    SENT,
    SUBJECT,
    TEXT,
    ChatClient,
    FailoverEndpoint,
    Group,
    Identity,
    LocalStore,
    ProfileError,
    cut_name,
    endpoint_description,
    error_sentence,
    load_identity,
    save_identity,
    split_text,
)

from .client_fakes import (
    BOB,
    CAROL,
    DAVE,
    GROUP,
    ME,
    SECRET,
    T0,
    FakeEndpoint,
    b,
    drop,
    make_model,
    online,
    reopen,
)


def frames(transport) -> list[bytes]:
    found, rest, status = wire.split_frames(wire.CLIENT_FRAME_LEN, transport.value())
    assert rest == b"" and status == 0
    transport.clear()
    return found


def incoming(src: str, dst: str, ts: int, text: str) -> bytes:
    return wire.message(b(src), b(dst), wire.timestamp(ts), text.encode())


# -- identity ------------------------------------------------------------------


def test_first_run_registers_saves_a_private_identity_and_logs_in(tmp_path):
    model, clock = make_model(tmp_path, identity=False)
    endpoint = FakeEndpoint()
    ChatClient(clock, endpoint, model).start()
    protocol, transport = endpoint.last
    assert transport.value() == wire.REGISTER_SECRET
    transport.clear()
    protocol.dataReceived(wire.registered_secret(b(ME), b(SECRET)))
    assert transport.value() == wire.online_secret(b(ME), b(SECRET))
    path = model.store.identity_path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_identity(path) == Identity(ME, SECRET)
    protocol.dataReceived(wire.online_ok(b(ME)))
    assert model.status == CONNECTED and model.me.user == ME


def test_a_profile_readable_by_others_is_refused(tmp_path):
    path = str(tmp_path / "identity.json")
    save_identity(path, Identity(ME, SECRET))
    os.chmod(path, 0o644)
    with pytest.raises(ProfileError, match="chmod 600"):
        load_identity(path)


def test_two_clients_cannot_share_a_profile(tmp_path):
    first = LocalStore(str(tmp_path / "p"))
    with pytest.raises(ProfileError, match="already using"):
        LocalStore(str(tmp_path / "p"))
    first.close()
    LocalStore(str(tmp_path / "p")).close()


def test_refused_login_goes_offline_and_stops_retrying(tmp_path):
    model, clock = make_model(tmp_path)
    endpoint = FakeEndpoint()
    ChatClient(clock, endpoint, model, retry_policy=lambda n: 1.0).start()
    protocol, transport = endpoint.last
    protocol.dataReceived(wire.error(wire.ONLINE_SECRET, wire.SECRET_REQUIRED))
    assert transport.disconnecting
    drop(protocol)
    clock.advance(60)
    assert len(endpoint.connections) == 1
    assert model.status == OFFLINE and "secret" in model.status_detail


def test_a_busy_server_at_login_is_retried_not_given_up(tmp_path):
    """12 15 11: the server could not reach its database; the same login works later."""
    model, clock = make_model(tmp_path)
    endpoint = FakeEndpoint()
    ChatClient(clock, endpoint, model, retry_policy=lambda n: 1.0).start()
    protocol, transport = endpoint.last
    protocol.dataReceived(wire.error(wire.ONLINE_SECRET, wire.BUSY))
    assert transport.disconnecting
    drop(protocol)
    assert model.status == RECONNECTING
    clock.advance(1.5)
    protocol, _ = endpoint.last
    assert len(endpoint.connections) == 2
    protocol.dataReceived(wire.online_ok(b(ME)))
    assert model.status == CONNECTED


class _Down:
    """A node that is not there: every connection is refused."""

    def __init__(self):
        self.tries = 0

    def connect(self, factory):
        from twisted.internet.defer import fail
        from twisted.internet.error import ConnectionRefusedError

        self.tries += 1
        return fail(ConnectionRefusedError())


def test_with_several_servers_a_dead_one_is_skipped_and_the_live_one_kept(tmp_path):
    model, clock = make_model(tmp_path)
    dead, live = _Down(), FakeEndpoint()
    client = ChatClient(clock, FailoverEndpoint([dead, live]), model, retry_policy=lambda n: 1.0)
    client.start()
    protocol, _ = live.last
    protocol.dataReceived(wire.online_ok(b(ME)))
    assert model.status == CONNECTED and dead.tries == 1
    drop(protocol)
    clock.advance(1.5)
    # The next attempt starts with the server that worked last.
    assert len(live.connections) == 2 and dead.tries == 1


def test_when_every_server_is_down_the_client_keeps_retrying(tmp_path):
    model, clock = make_model(tmp_path)
    first, second = _Down(), _Down()
    ChatClient(clock, FailoverEndpoint([first, second]), model, retry_policy=lambda n: 1.0).start()
    clock.advance(1.5)
    assert (first.tries, second.tries) == (2, 2)
    assert model.status == RECONNECTING


def test_login_that_never_answers_is_dropped_and_retried(tmp_path):
    model, clock = make_model(tmp_path)
    endpoint = FakeEndpoint()
    ChatClient(clock, endpoint, model, retry_policy=lambda n: 1.0).start()
    protocol, transport = endpoint.last
    clock.advance(31)
    assert transport.disconnecting
    drop(protocol)
    assert model.status == RECONNECTING
    clock.advance(1.5)
    assert len(endpoint.connections) == 2


# -- sending and the outbox ------------------------------------------------------


def test_outbox_is_resent_after_every_login_until_its_07(tmp_path):
    model, clock = make_model(tmp_path)
    endpoint = FakeEndpoint()
    endpoint.down = True
    client = ChatClient(clock, endpoint, model, retry_policy=lambda n: 1.0)
    client.start()
    (m,) = model.send_text(BOB, "hello")
    assert m.state == QUEUED and model.unsent() == [m]

    endpoint.down = False
    clock.advance(1.5)
    protocol, transport = endpoint.last
    transport.clear()
    protocol.dataReceived(wire.online_ok(b(ME)))
    assert frames(transport) == [wire.send(b(ME), b(BOB), wire.timestamp(T0), b"hello")]
    assert m.state == SENT and model.unsent() == []

    drop(protocol)
    assert model.status == RECONNECTING
    clock.advance(1.5)
    protocol, transport = endpoint.last
    transport.clear()
    protocol.dataReceived(wire.online_ok(b(ME)))
    assert frames(transport) == [wire.send(b(ME), b(BOB), wire.timestamp(T0), b"hello")]

    protocol.dataReceived(wire.delivered(b(BOB), wire.timestamp(T0)))
    assert m.state == DELIVERED and model.outbox == []
    drop(protocol)
    clock.advance(1.5)
    protocol, transport = endpoint.last
    transport.clear()
    protocol.dataReceived(wire.online_ok(b(ME)))
    assert frames(transport) == []


def test_a_busy_answer_to_a_message_sends_the_outbox_again_shortly(tmp_path):
    """12 05 11: the server could not store it (its database is away); no reconnection comes."""
    client, endpoint, transport = online(tmp_path)
    model, clock = client.model, client.clock
    protocol, _ = endpoint.last
    (m,) = model.send_text(BOB, "while the database restarts")
    sent = wire.send(b(ME), b(BOB), wire.timestamp(T0), b"while the database restarts")
    assert frames(transport) == [sent]
    transport.clear()
    protocol.dataReceived(wire.error(wire.SEND, wire.BUSY))
    protocol.dataReceived(wire.error(wire.SEND, wire.BUSY))  # one retry for a burst of refusals
    assert m.state == SENT and model.outbox == [m]
    clock.advance(2.9)
    assert frames(transport) == []
    clock.advance(0.2)
    assert frames(transport) == [sent]
    # Busy again: the next try waits longer.
    transport.clear()
    protocol.dataReceived(wire.error(wire.SEND, wire.BUSY))
    clock.advance(5.9)
    assert frames(transport) == []
    clock.advance(0.2)
    assert frames(transport) == [sent]
    protocol.dataReceived(wire.delivered(b(BOB), wire.timestamp(T0)))
    assert m.state == DELIVERED and model.outbox == []


def test_outbox_survives_a_restart_of_the_client(tmp_path):
    model, clock = make_model(tmp_path)
    model.send_text(BOB, "kept")
    model = reopen(model, clock)
    assert [m.text for m in model.outbox] == ["kept"]
    client, endpoint, transport = online(model=model, clock=clock)
    protocol, transport = endpoint.last
    assert frames(transport) == [wire.send(b(ME), b(BOB), wire.timestamp(T0), b"kept")]


def test_timestamps_strictly_increase_per_conversation_even_when_the_clock_does_not(tmp_path):
    model, clock = make_model(tmp_path)
    first = model.send_text(BOB, "a")[0].ts
    second = model.send_text(BOB, "b")[0].ts
    other = model.send_text(CAROL, "c")[0].ts
    clock.advance(5)
    later = model.send_text(BOB, "d")[0].ts
    assert (first, second, other, later) == (T0, T0 + 1, T0, T0 + 5)
    model = reopen(model, clock)
    assert model.send_text(BOB, "e")[0].ts == T0 + 6


def test_long_text_is_split_on_character_boundaries():
    text = "é" * 150 + "€" * 100 + "x"
    parts = split_text(text)
    assert "".join(parts) == text
    assert all(0 < len(p.encode()) <= wire.MSG_LEN for p in parts)
    assert len(parts[0].encode()) == 218 and len(parts) == 3
    assert split_text("  \n\n ") == []
    assert split_text("a\r\nb\0c\n") == ["a\nbc"]


def test_long_text_is_split_at_the_last_space_that_fits():
    words = " ".join(f"word{i:03d}" for i in range(60))  # 479 bytes, as in issue 20
    parts = split_text(words)
    assert [len(p.encode()) <= wire.MSG_LEN for p in parts] == [True] * 3
    assert " ".join(parts) == words
    assert all(p.startswith("word") and p[-3:].isdigit() for p in parts)
    # A word that ends exactly at the limit, and a line end as the place to cut.
    exact = "a" * 218 + " b"
    assert split_text(exact) == ["a" * 218, "b"]
    assert split_text("x" * 200 + "\n" + "y" * 30) == ["x" * 200, "y" * 30]
    # One word longer than the limit still goes, cut between characters.
    assert split_text("ok " + "z" * 300) == ["ok", "z" * 218, "z" * 82]


def test_a_long_message_goes_out_as_several_frames_with_increasing_timestamps(tmp_path):
    client, endpoint, transport = online(tmp_path)
    model = client.model
    sent = model.send_text(BOB, "🙂" * 120)
    out = frames(transport)
    assert len(out) == 3 and all(len(f) == 256 for f in out)
    assert [m.ts for m in sent] == [T0, T0 + 1, T0 + 2]
    assert b"".join(wire.unpad_text(f[38:]) for f in out).decode() == "🙂" * 120


# -- receiving ------------------------------------------------------------------


def test_every_06_is_acknowledged_and_duplicates_are_dropped(tmp_path):
    client, endpoint, transport = online(tmp_path)
    protocol, _ = endpoint.last
    model = client.model
    events = []
    model.listeners.append(lambda event, **data: events.append((event, data.get("notify"))))
    frame = incoming(BOB, ME, T0 - 5, "hi there")
    # Split anywhere: the framer reassembles.
    for at in range(0, len(frame), 7):
        protocol.dataReceived(frame[at : at + 7])
    protocol.dataReceived(frame)
    client.clock.advance(0)
    assert frames(transport) == [wire.received(b(BOB), b(ME), wire.timestamp(T0 - 5))] * 2
    conv = model.conversations[BOB]
    assert [m.text for m in conv.messages] == ["hi there"]
    assert conv.unread == 1 and events == [("incoming", True)]
    model = reopen(model, client.clock)
    assert [m.text for m in model.conversations[BOB].messages] == ["hi there"]
    assert model.conversations[BOB].unread == 1


def test_a_burst_of_06s_is_one_commit_and_its_16s_follow_it(tmp_path):
    client, endpoint, transport = online(tmp_path)
    protocol, _ = endpoint.last
    model = client.model
    model.open(BOB)
    transport.clear()
    protocol.dataReceived(b"".join(incoming(BOB, ME, T0 + i, f"n{i}") for i in range(50)))
    # Nothing acknowledged before the commit at the end of the reactor turn.
    assert frames(transport) == [] and model.store.db.in_transaction
    client.clock.advance(0)
    assert not model.store.db.in_transaction
    acks = [wire.received(b(BOB), b(ME), wire.timestamp(T0 + i)) for i in range(50)]
    # One write for the 16s, then one 08 for the newest, not one for each message.
    assert transport.value() == b"".join(acks) + wire.seen(b(BOB), wire.timestamp(T0 + 49))
    other = sqlite3.connect(str(tmp_path / "profile" / "client.sqlite3"))
    assert other.execute("SELECT count(*) FROM messages").fetchone() == (50,)


def test_opening_a_conversation_sends_08_for_the_newest_message(tmp_path):
    client, endpoint, transport = online(tmp_path)
    protocol, _ = endpoint.last
    model = client.model
    protocol.dataReceived(incoming(BOB, ME, T0 - 9, "one") + incoming(BOB, ME, T0 - 3, "two"))
    client.clock.advance(0)
    transport.clear()
    model.open(BOB)
    assert frames(transport) == [wire.seen(b(BOB), wire.timestamp(T0 - 3))]
    assert model.conversations[BOB].unread == 0
    model.open(BOB)
    assert frames(transport) == []
    # While it is open, a new message is read at once.
    protocol.dataReceived(incoming(BOB, ME, T0, "three"))
    client.clock.advance(0)
    assert frames(transport) == [
        wire.received(b(BOB), b(ME), wire.timestamp(T0)),
        wire.seen(b(BOB), wire.timestamp(T0)),
    ]
    assert model.conversations[BOB].unread == 0


def test_no_read_receipts_when_turned_off(tmp_path):
    client, endpoint, transport = online(tmp_path, read_receipts=False)
    protocol, _ = endpoint.last
    protocol.dataReceived(incoming(BOB, ME, T0, "psst"))
    client.clock.advance(0)
    transport.clear()
    client.model.open(BOB)
    assert frames(transport) == []
    assert client.model.conversations[BOB].unread == 0


def test_a_read_while_offline_is_sent_after_login(tmp_path):
    client, endpoint, transport = online(tmp_path)
    protocol, _ = endpoint.last
    protocol.dataReceived(incoming(BOB, ME, T0, "later"))
    drop(protocol)
    client.model.open(BOB)
    client.clock.advance(1.5)
    protocol, transport = endpoint.last
    transport.clear()
    protocol.dataReceived(wire.online_ok(b(ME)))
    assert frames(transport) == [wire.seen(b(BOB), wire.timestamp(T0))]


def test_ticks_move_on_07_and_09_and_never_back(tmp_path):
    client, endpoint, transport = online(tmp_path)
    protocol, _ = endpoint.last
    model = client.model
    a, bb = model.send_text(BOB, "a") + model.send_text(BOB, "b")
    c = model.send_text(BOB, "c")[0]
    assert (a.state, bb.state, c.state) == (SENT, SENT, SENT)
    protocol.dataReceived(wire.delivered(b(BOB), wire.timestamp(a.ts)))
    assert (a.state, bb.state) == (DELIVERED, SENT)
    protocol.dataReceived(wire.seen_by(b(BOB), wire.timestamp(bb.ts)))
    assert (a.state, bb.state, c.state) == (READ, READ, SENT)
    protocol.dataReceived(wire.delivered(b(BOB), wire.timestamp(bb.ts)))
    assert bb.state == READ
    assert model.outbox == [c]
    model = reopen(model, client.clock)
    assert [m.state for m in model.conversations[BOB].messages] == [READ, READ, SENT]


def test_conversations_are_ordered_by_last_activity_with_unread_counts(tmp_path):
    client, endpoint, transport = online(tmp_path)
    protocol, _ = endpoint.last
    model = client.model
    model.add_contact(BOB, "Bob")
    client.clock.advance(1)
    model.add_contact(CAROL, "Carol")
    assert [c.id for c in model.ordered()] == [CAROL, BOB]
    client.clock.advance(1)
    protocol.dataReceived(incoming(BOB, ME, T0, "x") + incoming(BOB, ME, T0 + 1, "y"))
    assert [(c.id, c.unread) for c in model.ordered()] == [(BOB, 2), (CAROL, 0)]
    stranger = "0999999999999"
    client.clock.advance(1)
    protocol.dataReceived(incoming(stranger, ME, T0, "who am I"))
    assert model.ordered()[0].id == stranger and model.display_name(stranger) == stranger
    assert model.display_name(BOB) == "Bob"
    with pytest.raises(ValueError):
        model.add_contact("12345", "short")


def test_connections_that_end_before_their_login_back_off_like_refused_ones(tmp_path):
    """A TLS certificate the client does not trust fails after TCP connected: ClientService
    calls that a success, and retried every second for ever; now the delay grows."""
    model, clock = make_model(tmp_path)
    endpoint = FakeEndpoint()
    asked = []
    client = ChatClient(clock, endpoint, model, retry_policy=lambda n: asked.append(n) or 1.0)
    client.start()
    for _ in range(3):
        drop(endpoint.last[0])  # closed before any 04
        clock.advance(1.0)
    assert asked == [1, 2, 3] and len(endpoint.connections) == 4
    endpoint.last[0].dataReceived(wire.online_ok(b(ME)))
    drop(endpoint.last[0])  # a login that worked starts the count again
    assert asked[-1] == 1


# -- groups ------------------------------------------------------------------------


def test_group_creation_messages_and_group_ticks(tmp_path):
    client, endpoint, transport = online(tmp_path)
    protocol, _ = endpoint.last
    model = client.model
    model.add_contact(BOB, "Bob")
    model.add_contact(CAROL, "Carol")
    events = []
    model.listeners.append(lambda event, **data: events.append((event, data.get("created_by_me"))))
    model.create_group([BOB, CAROL, BOB], "Friends")
    assert frames(transport) == [wire.create_group(b(ME), wire.timestamp(T0), [b(BOB), b(CAROL)])]
    protocol.dataReceived(wire.added_to_group(b(GROUP), wire.timestamp(T0), [b(ME), b(BOB), b(CAROL)]))
    assert model.groups[GROUP].members == [ME, BOB, CAROL] and ("group", True) in events
    # The subject asked for at creation goes as a 17 right after the 11, and is the name once
    # the server's 18 says so (it is not a nickname of ours).
    assert frames(transport) == [wire.set_subject(b(ME), b(GROUP), wire.timestamp(T0 + 1), b"Friends")]
    assert model.display_name(GROUP) == "group: Bob, Carol"
    protocol.dataReceived(wire.subject(b(GROUP), b(ME), wire.timestamp(T0 + 1), b"Friends"))
    assert model.display_name(GROUP) == "Friends" and GROUP not in model.names

    protocol.dataReceived(incoming(CAROL, GROUP, T0 + 2, "hello all"))
    client.clock.advance(0)
    assert frames(transport) == [wire.received(b(CAROL), b(GROUP), wire.timestamp(T0 + 2))]
    note, got = model.conversations[GROUP].messages
    assert (note.kind, note.src, note.text) == (SUBJECT, ME, "Friends")
    assert (got.src, got.conv) == (CAROL, GROUP) and model.display_name(got.src) == "Carol"

    mine = model.send_text(GROUP, "hi")[0]
    assert frames(transport) == [wire.send(b(ME), b(GROUP), wire.timestamp(mine.ts), b"hi")]
    protocol.dataReceived(wire.delivered(b(GROUP), wire.timestamp(mine.ts)))
    assert mine.state == DELIVERED
    protocol.dataReceived(wire.seen_by(b(GROUP), wire.timestamp(mine.ts - 1)))
    assert mine.state == DELIVERED
    protocol.dataReceived(wire.seen_by(b(GROUP), wire.timestamp(mine.ts)))
    assert mine.state == READ
    model.open(GROUP)
    assert frames(transport) == [wire.seen(b(GROUP), wire.timestamp(T0 + 2))]


def test_a_group_made_by_someone_else_is_named_after_its_members(tmp_path):
    client, endpoint, transport = online(tmp_path)
    protocol, _ = endpoint.last
    client.model.add_contact(BOB, "Bob")
    protocol.dataReceived(wire.added_to_group(b(GROUP), wire.timestamp(T0), [b(BOB), b(ME), b(CAROL)]))
    assert client.model.display_name(GROUP) == f"group: Bob, {CAROL}"
    model = reopen(client.model, client.clock)
    assert model.groups[GROUP].members == [BOB, ME, CAROL] and GROUP in model.conversations


def test_groups_need_a_connection(tmp_path):
    model, clock = make_model(tmp_path)
    with pytest.raises(ValueError, match="connected"):
        model.create_group([BOB])
    model.groups[GROUP] = Group(GROUP, [ME, BOB])
    for change in (
        lambda: model.set_subject(GROUP, "x"),
        lambda: model.add_members(GROUP, [CAROL]),
        lambda: model.leave_group(GROUP),
    ):
        with pytest.raises(ValueError, match="connected"):
            change()


def group_of(protocol, members, ts=T0):
    protocol.dataReceived(wire.added_to_group(b(GROUP), wire.timestamp(ts), [b(m) for m in members]))


def notes(model) -> list[tuple[str, str, str]]:
    return [(m.kind, m.src, m.text) for m in model.conversations[GROUP].messages if m.kind != TEXT]


def test_an_11_for_a_known_group_replaces_its_members_and_notes_who_came_and_went(tmp_path):
    client, endpoint, transport = online(tmp_path)
    protocol, _ = endpoint.last
    model = client.model
    group_of(protocol, [BOB, ME])
    assert notes(model) == []  # a new group: its list is where it starts, not a change
    group_of(protocol, [BOB, ME, CAROL], T0 + 5)
    assert model.groups[GROUP].members == [BOB, ME, CAROL]
    # The 11 does not say who added Carol: nobody is named.
    assert notes(model) == [(ADDED, "", CAROL)]

    model.add_members(GROUP, [CAROL, DAVE, DAVE])  # Carol is in already: only Dave is asked for
    assert frames(transport) == [wire.add_members(b(ME), b(GROUP), wire.timestamp(T0), [b(DAVE)])]
    group_of(protocol, [BOB, ME, CAROL, DAVE], T0)
    assert notes(model)[-1] == (ADDED, ME, DAVE)  # our own 19's 11: we know who added

    group_of(protocol, [ME, CAROL, DAVE], T0 + 9)
    assert notes(model)[-1] == (LEFT, "", BOB)
    group_of(protocol, [ME, CAROL, DAVE], T0 + 9)  # the same list again: no note
    assert len(notes(model)) == 3
    # Notes are neither unread nor read: the 08 names the newest message, never a note's time.
    protocol.dataReceived(incoming(CAROL, GROUP, T0 + 3, "hi"))
    model.open(GROUP)
    client.clock.advance(0)
    assert frames(transport)[-1] == wire.seen(b(GROUP), wire.timestamp(T0 + 3))

    model = reopen(model, client.clock)
    assert model.groups[GROUP].members == [ME, CAROL, DAVE]
    assert notes(model) == [(ADDED, "", CAROL), (ADDED, ME, DAVE), (LEFT, "", BOB)]


def test_a_subject_is_the_groups_name_for_everyone_and_a_nickname_overrides_it_here(tmp_path):
    client, endpoint, transport = online(tmp_path)
    protocol, _ = endpoint.last
    model = client.model
    model.add_contact(BOB, "Bob")
    group_of(protocol, [BOB, ME])
    assert model.display_name(GROUP) == "group: Bob"
    protocol.dataReceived(wire.subject(b(GROUP), b(BOB), wire.timestamp(T0 + 1), "Café ☕".encode()))
    assert model.display_name(GROUP) == "Café ☕"
    assert notes(model) == [(SUBJECT, BOB, "Café ☕")]

    model.set_subject(GROUP, "  Lunch\nclub  ")
    assert frames(transport) == [wire.set_subject(b(ME), b(GROUP), wire.timestamp(T0), b"Lunch club")]
    assert model.display_name(GROUP) == "Café ☕"  # until the server's 18 says so
    protocol.dataReceived(wire.subject(b(GROUP), b(ME), wire.timestamp(T0), b"Lunch club"))
    assert model.display_name(GROUP) == "Lunch club"

    model.set_nickname(GROUP, "Work lunch")
    assert model.display_name(GROUP) == "Work lunch"
    model = reopen(model, client.clock)
    assert model.display_name(GROUP) == "Work lunch" and model.groups[GROUP].subject == "Lunch club"
    model.set_nickname(GROUP, "")
    assert model.display_name(GROUP) == "Lunch club"
    model = reopen(model, client.clock)
    assert model.display_name(GROUP) == "Lunch club"
    client, _, transport = online(model=model, clock=client.clock)
    with pytest.raises(ValueError, match="empty"):
        model.set_subject(GROUP, " \0 ")
    assert transport.value() == b""


def test_a_long_subject_is_cut_between_characters_to_64_bytes():
    assert cut_name("é" * 40) == "é" * 32
    assert cut_name("a" + "é" * 40) == "a" + "é" * 31  # 63 bytes: half an é would not be UTF-8
    assert len(cut_name("x" * 100).encode()) == wire.NAME_LEN


def test_leaving_sends_20_and_after_the_21_the_group_is_readable_but_takes_nothing(tmp_path):
    client, endpoint, transport = online(tmp_path)
    protocol, _ = endpoint.last
    model = client.model
    group_of(protocol, [BOB, ME])
    protocol.dataReceived(incoming(BOB, GROUP, T0 + 1, "before you go"))
    client.clock.advance(0)
    transport.clear()
    model.leave_group(GROUP)
    assert frames(transport) == [wire.leave_group(b(ME), b(GROUP), wire.timestamp(T0))]
    assert not model.has_left(GROUP)  # not before the server says so
    protocol.dataReceived(wire.left_group(b(GROUP), wire.timestamp(T0)))
    assert model.has_left(GROUP) and notes(model) == [(LEFT, "", ME)]
    for refused in (
        lambda: model.send_text(GROUP, "still here?"),
        lambda: model.set_subject(GROUP, "x"),
        lambda: model.add_members(GROUP, [CAROL]),
        lambda: model.leave_group(GROUP),
    ):
        with pytest.raises(ValueError, match="left"):
            refused()
    assert frames(transport) == []
    # A message sent before we left, arriving after the 21, is kept; no 08 goes for it.
    protocol.dataReceived(incoming(BOB, GROUP, T0 + 2, "sent before you left"))
    model.open(GROUP)
    client.clock.advance(0)
    assert frames(transport) == [wire.received(b(BOB), b(GROUP), wire.timestamp(T0 + 2))]
    model = reopen(model, client.clock)
    assert model.has_left(GROUP) and model.conversations[GROUP].messages[0].text == "before you go"
    # Added back later: a member again.
    client, endpoint, transport = online(model=model, clock=client.clock)
    group_of(endpoint.last[0], [BOB, ME], T0 + 50)
    assert client.model.groups[GROUP].state == MEMBER and notes(client.model)[-1] == (ADDED, "", ME)


def test_a_profile_from_before_group_subjects_is_upgraded_in_place(tmp_path):
    directory = tmp_path / "profile"
    directory.mkdir()
    db = sqlite3.connect(directory / "client.sqlite3")
    db.executescript(
        """
        CREATE TABLE groups (id TEXT PRIMARY KEY, members TEXT NOT NULL);
        CREATE TABLE messages (id INTEGER PRIMARY KEY, conv TEXT NOT NULL, src TEXT NOT NULL,
            dst TEXT NOT NULL, ts INTEGER NOT NULL, text TEXT NOT NULL, outgoing INTEGER NOT NULL,
            state TEXT NOT NULL, at REAL NOT NULL, UNIQUE (src, dst, ts, text));
        """
    )
    db.execute("INSERT INTO groups VALUES (?, ?)", (GROUP, f"{BOB} {ME}"))
    db.execute(
        "INSERT INTO messages (conv, src, dst, ts, text, outgoing, state, at)"
        " VALUES (?, ?, ?, ?, ?, 0, ?, ?)",
        (GROUP, BOB, GROUP, T0, "old", DELIVERED, T0),
    )
    db.commit()
    db.close()
    store = LocalStore(str(directory))
    names, groups, convs = store.load()
    assert vars(groups[GROUP]) == vars(Group(GROUP, [BOB, ME]))
    assert [(m.text, m.kind) for m in convs[GROUP].messages] == [("old", TEXT)]
    assert store.db.execute("PRAGMA user_version").fetchone() == (1,)
    store.close()
    assert LocalStore(str(directory)).db.execute("PRAGMA user_version").fetchone() == (1,)


def test_errors_for_17_19_20_are_sentences(tmp_path):
    assert error_sentence(wire.SET_SUBJECT, wire.NOT_A_MEMBER).startswith("The group could not be renamed: ")
    assert error_sentence(wire.ADD_MEMBERS, wire.UNKNOWN_USER).startswith("Nobody was added to the group: ")
    assert error_sentence(wire.LEAVE_GROUP, wire.NOT_A_MEMBER).startswith("Could not leave the group: ")


# -- errors -----------------------------------------------------------------------


def test_errors_become_sentences():
    assert error_sentence(wire.CREATE_GROUP, wire.UNKNOWN_USER) == (
        "The group could not be created: there is no such user."
    )
    assert "12" not in error_sentence(wire.SEND, wire.RATE_LIMITED)


def test_a_message_to_an_unknown_user_fails_instead_of_staying_in_the_outbox(tmp_path):
    client, endpoint, transport = online(tmp_path)
    protocol, _ = endpoint.last
    model = client.model
    protocol.dataReceived(incoming(BOB, ME, T0, "known"))
    errors = []
    model.listeners.append(lambda event, **data: event == "error" and errors.append(data["text"]))
    model.add_contact("0555555555555", "Typo")
    ok = model.send_text(BOB, "to bob")[0]
    bad = model.send_text("0555555555555", "to nobody")[0]
    protocol.dataReceived(wire.error(wire.SEND, wire.UNKNOWN_DESTINATION))
    assert bad.state == FAILED and ok.state == SENT
    assert model.outbox == [ok]
    assert errors == [
        "Your message to Typo could not be sent: there is no such user or group. It will not be retried."
    ]
    drop(protocol)
    client.clock.advance(1.5)
    protocol, transport = endpoint.last
    transport.clear()
    protocol.dataReceived(wire.online_ok(b(ME)))
    assert frames(transport) == [wire.send(b(ME), b(BOB), wire.timestamp(ok.ts), b"to bob")]
    model = reopen(model, client.clock)
    assert [m.state for m in model.conversations["0555555555555"].messages] == [FAILED]


def test_a_group_message_refused_as_not_a_member_is_failed(tmp_path):
    client, endpoint, transport = online(tmp_path)
    protocol, _ = endpoint.last
    model = client.model
    to_bob = model.send_text(BOB, "fine")[0]
    to_group = model.send_text(GROUP, "nope")[0]
    protocol.dataReceived(wire.error(wire.SEND, wire.NOT_A_MEMBER))
    assert (to_bob.state, to_group.state) == (SENT, FAILED)


def test_logged_in_elsewhere_stops_reconnecting(tmp_path):
    client, endpoint, transport = online(tmp_path)
    protocol, _ = endpoint.last
    protocol.dataReceived(wire.error(wire.ONLINE, wire.LOGGED_IN_ELSEWHERE))
    drop(protocol)
    client.clock.advance(60)
    assert len(endpoint.connections) == 1
    assert client.model.status == OFFLINE and "somewhere else" in client.model.status_detail
    client.reconnect_now()
    assert len(endpoint.connections) == 2


def test_endpoint_shorthands():
    assert endpoint_description("example.org:7000") == "tcp:example.org:7000"
    assert endpoint_description("7000") == "tcp:localhost:7000"
    assert endpoint_description("tcp:localhost:7000") == "tcp:localhost:7000"
    assert endpoint_description("tls:host:7443") == "tls:host:7443"
    assert endpoint_description("unix:/run/chat.sock") == "unix:/run/chat.sock"


@pytest.mark.parametrize("logged_in", [False, True])
def test_stopping_closes_the_connection_and_stops_retrying(tmp_path, logged_in):
    model, clock = make_model(tmp_path)
    endpoint = FakeEndpoint()
    client = ChatClient(clock, endpoint, model, retry_policy=lambda n: 1.0)
    client.start()
    protocol, transport = endpoint.last
    if logged_in:
        protocol.dataReceived(wire.online_ok(b(ME)))
    done = []
    client.stop().addCallback(done.append)
    assert transport.disconnecting and not done
    drop(protocol)
    assert done == [None] and not client.service.running
    clock.advance(60)
    assert len(endpoint.connections) == 1 and model.status == OFFLINE


def test_unframeable_bytes_from_the_server_close_the_connection_and_say_so(tmp_path):
    client, endpoint, transport = online(tmp_path)
    protocol, _ = endpoint.last
    errors = []
    client.model.listeners.append(lambda event, **data: event == "error" and errors.append(data["text"]))
    protocol.dataReceived(wire.delivered(b(BOB), wire.timestamp(T0)) + b"99junk")
    assert transport.disconnecting and errors == [
        "The server sent data this client cannot read, so it reconnects."
    ]
    drop(protocol)
    client.clock.advance(1.5)
    assert len(endpoint.connections) == 2
