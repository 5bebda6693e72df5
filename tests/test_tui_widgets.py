"""The terminal client's widgets, rendered to canvas text (urwid itself, not a mock)."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

try:
    import chatproto_tui  # noqa: F401
except ImportError:  # running from a checkout without `pip install .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients"))

import urwid
from chatproto_tui.__main__ import parse_args
from chatproto_tui.keys import CONTEXT_TITLES, KEYS, help_lines
from chatproto_tui.theme import REQUIRED_STYLES, THEMES, TICKS
from chatproto_tui.ui import NOTICE_SECONDS, App
from chatproto_tui.widgets import SizedScreen

from chatproto import wire
from chatproto.client import ChatClient

from .client_fakes import BOB, CAROL, DAVE, GROUP, ME, T0, FakeEndpoint, b, drop, make_model, online


def incoming(src, dst, ts, text):
    return wire.message(b(src), b(dst), wire.timestamp(ts), text.encode())


@pytest.fixture
def live(tmp_path):
    """An App over a logged-in client on fake transports: (app, protocol, transport)."""
    client, endpoint, transport = online(tmp_path)
    app = App(client.model, client)
    protocol, _ = endpoint.last
    return app, protocol, transport


def sent_texts(transport) -> list[str]:
    found, _, _ = wire.split_frames(wire.CLIENT_FRAME_LEN, transport.value())
    transport.clear()
    return [wire.unpad_text(f[38:]).decode() for f in found if f[:2] == wire.SEND]


# -- data: key table, themes, glyphs ------------------------------------------------


def test_no_key_is_bound_twice_where_both_would_apply():
    seen: dict[tuple[str, str], str] = {}
    for name, command in KEYS.items():
        contexts = list(CONTEXT_TITLES) if command.context == "global" else [command.context]
        for key in command.keys:
            for context in contexts:
                assert (key, context) not in seen, f"{key!r} is bound to {seen[(key, context)]} and {name}"
                seen[(key, context)] = name


def test_every_theme_defines_every_style_and_every_state_has_a_tick():
    for name, theme in THEMES.items():
        assert set(REQUIRED_STYLES) <= set(theme), name
    assert set(TICKS["unicode"]) == set(TICKS["ascii"])


def test_the_help_screen_lists_every_command(live):
    app, _, _ = live
    app.press("f1")
    screen = app.render_text((150, 60))
    for command in KEYS.values():
        assert command.help in screen
    assert len(help_lines()) == len(KEYS)
    app.press("esc")
    assert "Help" not in app.render_text()


# -- the screen -------------------------------------------------------------------------


def test_status_line_shows_own_id_and_connection_state(live):
    app, protocol, _ = live
    assert f"you: {ME}" in app.render_text().splitlines()[0]
    assert "connected" in app.render_text().splitlines()[0]
    drop(protocol)
    assert "lost the server: the connection closed, retrying in 1 s, F5 now" in app.render_text((100, 24))


def test_status_line_names_the_server_the_reason_and_the_retry_and_never_wraps(tmp_path):
    model, clock = make_model(tmp_path)
    endpoint = FakeEndpoint()
    endpoint.down = True
    client = ChatClient(clock, endpoint, model, retry_policy=lambda attempt: 8.0)
    client.address = "127.0.0.1:7000"
    app = App(model, client)
    client.start()
    wide = app.render_text((120, 24)).splitlines()[0]
    assert "cannot connect to 127.0.0.1:7000: connection refused, retrying in 8 s, F5 now" in wide
    assert f"you: {ME}" in wide and "F1 help" in wide
    clock.advance(3)
    assert "retrying in 5 s" in app.render_text((120, 24)).splitlines()[0]
    narrow = app.render_text((40, 12)).splitlines()
    assert narrow[0].rstrip() == " ● 127.0.0.1:7000 refused, 5 s, F5"
    assert len(narrow[0]) == 40 and "Conversations" not in narrow[1]
    for width in (20, 30, 50, 60, 80):
        lines = app.render_text((width, 12)).splitlines()
        assert len(lines[0]) == width and "●" in lines[0]  # one line, the state always on it
    endpoint.down = False
    clock.advance(5)
    assert "logging in to 127.0.0.1:7000" in app.render_text((120, 24)).splitlines()[0]
    endpoint.last[0].dataReceived(wire.online_ok(b(ME)))
    assert "connected to 127.0.0.1:7000" in app.render_text((120, 24)).splitlines()[0]
    assert app.render_text((40, 12)).splitlines()[0].rstrip() == f" {ME} ● connected"


def test_conversation_list_has_unread_counts_and_newest_first(live):
    app, protocol, _ = live
    app.model.add_contact(BOB, "Bob")
    app.model.add_contact(CAROL, "Carol")
    app.model.clock.advance(5)
    protocol.dataReceived(incoming(BOB, ME, T0, "one") + incoming(BOB, ME, T0 + 1, "two"))
    lines = app.render_text().splitlines()
    assert lines[2].startswith("  Bob") and "(2)" in lines[2]
    assert lines[3].startswith("  Carol")
    app.press("meta down")
    assert app.model.open_id == BOB
    assert "(2)" not in app.render_text().splitlines()[2]


def test_open_conversation_shows_time_sender_and_ticks_moving(live):
    app, protocol, transport = live
    app.model.add_contact(BOB, "Bob")
    app.press("meta down")
    for ch in "hello":
        app.press(ch)
    app.press("enter")
    assert sent_texts(transport) == ["hello"]
    line = [x for x in app.render_text().splitlines() if "me: hello" in x][0]
    assert line.rstrip().endswith("me: hello ✓")
    protocol.dataReceived(wire.delivered(b(BOB), wire.timestamp(T0)))
    assert "me: hello ✓✓" in app.render_text()
    protocol.dataReceived(wire.seen_by(b(BOB), wire.timestamp(T0)))
    assert "me: hello ✔✔" in app.render_text()
    protocol.dataReceived(incoming(BOB, ME, T0 + 60, "hi back"))
    assert "Bob: hi back" in app.render_text()


def test_ascii_ticks_and_queued_while_offline(tmp_path):
    model, clock = make_model(tmp_path)
    app = App(model, None, ascii_only=True)
    model.add_contact(BOB, "Bob")
    app.press("meta down", "y", "o", "enter")
    assert "me: yo (q)" in app.render_text()


def test_group_conversation_shows_each_senders_name(live):
    app, protocol, transport = live
    app.model.add_contact(BOB, "Bob")
    app.model.add_contact(CAROL, "Carol")
    app.press("f3")
    for ch in "Pals":
        app.press(ch)
    app.press("tab", " ", "down", " ", "enter")
    found, _, _ = wire.split_frames(wire.CLIENT_FRAME_LEN, transport.value())
    assert found == [wire.create_group(b(ME), wire.timestamp(T0), [b(BOB), b(CAROL)])]
    transport.clear()
    protocol.dataReceived(wire.added_to_group(b(GROUP), wire.timestamp(T0), [b(ME), b(BOB), b(CAROL)]))
    # The subject goes right after the 11; the name is the server's 18, for every member.
    assert transport.value() == wire.set_subject(b(ME), b(GROUP), wire.timestamp(T0 + 1), b"Pals")
    assert app.model.open_id == GROUP and "group: Bob, Carol" in app.render_text()
    protocol.dataReceived(wire.subject(b(GROUP), b(ME), wire.timestamp(T0 + 1), b"Pals"))
    assert "Pals  (group " in app.render_text()
    protocol.dataReceived(
        incoming(BOB, GROUP, T0 + 1, "from bob") + incoming(CAROL, GROUP, T0 + 2, "from carol")
    )
    screen = app.render_text()
    assert "Bob: from bob" in screen and "Carol: from carol" in screen


def test_enter_sends_newline_keys_and_bracketed_paste_make_one_message(live):
    app, _, transport = live
    app.model.add_contact(BOB, "Bob")
    app.press("meta down", "a", "meta enter", "b", "ctrl n", "c", "enter")
    assert sent_texts(transport) == ["a\nb\nc"]
    app.press("begin paste", "?", "x", "enter", "tab", "y", "enter", "end paste")
    assert sent_texts(transport) == []
    app.press("enter")
    assert sent_texts(transport) == ["?x\n\ty"]


def test_question_mark_types_into_a_message_but_opens_help_on_an_empty_line(live):
    app, _, _ = live
    app.press("w", "h", "y", "?")
    assert app.input.edit_text == "why?" and app.dialog is None
    app.input.set_edit_text("")
    app.press("?")
    assert app.dialog is not None


def test_bell_only_for_a_conversation_that_is_not_open(live, monkeypatch):
    app, protocol, _ = live
    rings = []
    monkeypatch.setattr(app, "ring", lambda: rings.append(1))
    app.model.add_contact(BOB, "Bob")
    app.press("meta down")
    protocol.dataReceived(incoming(BOB, ME, T0, "seen at once"))
    app.clock.advance(1)
    assert rings == []
    # Several at once ring once, when they are drawn.
    protocol.dataReceived(incoming(CAROL, ME, T0, "elsewhere") + incoming(CAROL, ME, T0 + 1, "again"))
    assert rings == []
    app.clock.advance(1)
    assert rings == [1]
    app.bell = False
    protocol.dataReceived(incoming(CAROL, ME, T0 + 2, "quiet"))
    app.clock.advance(1)
    assert rings == [1]


def test_server_errors_show_as_sentences(live):
    app, protocol, _ = live
    protocol.dataReceived(wire.error(wire.CREATE_GROUP, wire.UNKNOWN_USER))
    assert "The group could not be created: there is no such user." in app.render_text()


def test_add_contact_dialog(live):
    app, _, _ = live
    app.press("f2", *"0222", "enter")
    assert "13 digits" not in app.render_text()
    app.press(*"Bobby", "enter")
    assert "An id is 13 digits" in app.render_text()
    app.press("esc", "f2", "0", "tab", "x", "tab", "2")  # Tab goes to the nickname and back
    assert "Id:       02" in app.render_text() and "Nickname: x" in app.render_text()
    app.press("esc", "f2", *BOB, "enter", *"Bobby", "enter")
    assert app.dialog is None and app.model.open_id == BOB
    assert "Bobby" in app.render_text()


def test_quit_asks_only_when_something_is_unsent(tmp_path):
    model, clock = make_model(tmp_path)
    app = App(model, None)
    with pytest.raises(urwid.ExitMainLoop):
        app.press("ctrl q")
    model.add_contact(BOB, "Bob")
    app.press("meta down", "x", "enter")
    app.press("ctrl q")
    assert "1 message has not reached the server yet" in app.render_text()
    app.press("n")
    assert app.dialog is None
    app.press("f10")
    with pytest.raises(urwid.ExitMainLoop):
        app.press("y")


def test_every_dialog_answers_esc_through_urwids_own_dispatch(live):
    app, protocol, _ = live
    app.model.add_contact(BOB, "Bob")
    app.model.add_contact(CAROL, "Carol")
    protocol.dataReceived(wire.added_to_group(b(GROUP), wire.timestamp(T0), [b(BOB), b(ME)]))
    app.open(GROUP)
    app.press("x")
    for opener in ("f1", "f2", "f3", "ctrl f", "f7", "f8", "f9", "meta x", "ctrl q"):
        app.press(opener)
        assert app.dialog is not None, opener
        app.press("esc")
        assert app.dialog is None, opener
    assert app.input.edit_text == "x"
    app.press("ctrl q", "N")
    assert app.dialog is None
    for key in ("enter", "a", "ctrl q", "f10"):
        app.press("ctrl q", key)
        assert app.dialog is not None and "Quit?" in app.render_text(), key
        app.press("esc")
    with pytest.raises(urwid.ExitMainLoop):
        app.press("ctrl q", "Y")


@pytest.mark.parametrize("size", [(80, 24), (40, 12), (200, 60), (20, 6)])
def test_any_size_renders(live, size):
    app, protocol, _ = live
    app.model.add_contact(BOB, "Bob with a rather long nickname indeed")
    app.press("meta down", *"x" * 300, "enter")
    protocol.dataReceived(incoming(BOB, ME, T0, "y" * 218))
    lines = app.render_text(size).splitlines()
    assert len(lines) == size[1]
    app.press("f1")
    assert len(app.render_text(size).splitlines()) == size[1]


def test_options():
    args = parse_args(
        ["--server", "example.org:7000", "--profile", "work", "--no-bell", "--no-read-receipts"]
    )
    assert (args.server, args.profile, args.no_bell, args.no_read_receipts) == (
        ["example.org:7000"],
        "work",
        True,
        True,
    )
    assert parse_args([]).server is None  # main() falls back to tcp:localhost:7000
    assert parse_args(["--server", "h:7000", "--server", "h:7001"]).server == ["h:7000", "h:7001"]


def test_notices_leave_after_a_few_seconds_or_at_the_next_key(live):
    app, _, transport = live
    app.model.add_contact(BOB, "Bob")
    app.press("meta down")
    words = " ".join(f"word{i:03d}" for i in range(60))
    app.input.set_edit_text(words)
    app.press("enter")
    assert sent_texts(transport)[1].startswith("word")
    assert "it went as 3 messages" in app.render_text()
    app.model.clock.advance(NOTICE_SECONDS + 0.1)
    assert "it went as 3 messages" not in app.render_text()
    app.input.set_edit_text(words)
    app.press("enter")
    assert "it went as 3 messages" in app.render_text()
    app.press("x")
    assert "it went as 3 messages" not in app.render_text()
    app.press("f5")
    assert "Reconnecting…" in app.render_text()
    app.model.set_status("connected")
    assert "Reconnecting…" not in app.render_text()


def test_a_long_message_is_shown_as_one_text_in_the_senders_view(live):
    app, _, _ = live
    app.model.add_contact(BOB, "Bob")
    app.press("meta down")
    app.input.set_edit_text(" ".join(f"word{i:03d}" for i in range(60)))
    app.press("enter")
    screen = app.render_text((100, 30))
    # One "me:" for the three parts, every word whole, the last part under the first.
    assert screen.count("me:") == 1
    words = re.findall(r"word\d+", screen)
    assert words == [f"word{i:03d}" for i in range(60)]
    assert screen.index("word059") > screen.index("me: word000")


def test_version_and_help_name_the_quit_key_and_f1(capsys):
    import importlib.metadata

    with pytest.raises(SystemExit):
        parse_args(["--version"])
    assert capsys.readouterr().out.strip() == f"chat-client {importlib.metadata.version('chatproto')}"
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Ctrl-Q quits" in out and "F1 lists every key" in out and "F2 adds a contact" in out


def test_input_history_and_the_readline_keys(live):
    app, _, transport = live
    app.model.add_contact(BOB, "Bob")
    app.press("meta down", *"first", "enter", *"second one", "enter")
    assert sent_texts(transport) == ["first", "second one"]
    app.press(*"draft", "up")
    assert app.input.edit_text == "second one"
    app.press("up", "up")
    assert app.input.edit_text == "first"
    app.press("down", "down")
    assert app.input.edit_text == "draft"
    app.input.set_edit_text("")
    app.press(*"one two three", "ctrl a", "x", "ctrl e", "y")
    assert app.input.edit_text == "xone two threey"
    app.press("meta b", "meta b", "ctrl k")
    assert app.input.edit_text == "xone "
    app.press(*"two three", "ctrl w")
    assert app.input.edit_text == "xone two "
    app.press("meta b", "meta f", "ctrl u")
    assert app.input.edit_text == " "
    # Inside a message of several lines, Up and Down move between its lines.
    app.input.set_edit_text("")
    app.press("a", "meta enter", "b", "up")
    assert app.input.edit_text == "a\nb" and app.input.edit_pos <= 1
    app.press("f1")
    screen = app.render_text((150, 80))
    assert "Ctrl-A" in screen and "Alt-A" in screen and "Ctrl-W" in screen


def test_next_unread_key_opens_conversations_with_unread_messages_in_turn(live):
    app, protocol, _ = live
    app.model.add_contact(BOB, "Bob")
    app.model.add_contact(CAROL, "Carol")
    app.press("meta down")
    dave = "0555555555555"
    protocol.dataReceived(incoming(CAROL, ME, T0, "c1"))
    app.model.clock.advance(1)
    protocol.dataReceived(incoming(dave, ME, T0, "d1"))
    protocol.dataReceived(incoming(BOB, ME, T0 + 1, "read at once"))
    # Dave wrote last, so he is above Carol in the list: his turn first.
    app.press("meta a")
    assert app.model.open_id == dave
    app.press("meta a")
    assert app.model.open_id == CAROL and "Carol: c1" in app.render_text()
    app.press("meta a")
    assert app.model.open_id == CAROL and "No unread messages." in app.render_text()


def test_page_keys_move_a_screenful_and_new_messages_below_are_announced(live):
    app, protocol, _ = live
    app.model.add_contact(BOB, "Bob")
    app.press("meta down")
    protocol.dataReceived(b"".join(incoming(BOB, ME, T0 + i, f"line {i:03d}") for i in range(100)))
    size = (80, 24)
    assert "line 099" in app.render_text(size)
    app.press("page up", size=size)
    screen = app.render_text(size)
    # A screenful (20 rows: 080-099 were on screen), at the first press.
    assert "line 080" not in screen and "line 079" in screen and "line 060" in screen
    protocol.dataReceived(incoming(BOB, ME, T0 + 200, "arrived while away"))
    screen = app.render_text(size)
    assert "▼ 1 new message below" in screen and "arrived while away" not in screen
    app.press("meta end", size=size)
    screen = app.render_text(size)
    assert "arrived while away" in screen and "new message below" not in screen
    app.press("meta home", size=size)
    assert "line 000" in app.render_text(size)
    app.press("page down", size=size)
    assert "line 000" not in app.render_text(size)


def test_opening_a_conversation_marks_where_the_unread_messages_start(live):
    app, protocol, _ = live
    app.model.add_contact(BOB, "Bob")
    app.press("meta down")
    protocol.dataReceived(incoming(BOB, ME, T0, "already read"))
    app.model.add_contact(CAROL, "Carol")
    app.press("meta down")  # now Carol's is open; Bob's messages wait
    protocol.dataReceived(b"".join(incoming(BOB, ME, T0 + i, f"unread {i}") for i in range(1, 4)))
    app.open(BOB)
    lines = app.render_text().splitlines()
    marker = next(i for i, x in enumerate(lines) if "new messages" in x)
    assert "already read" in lines[marker - 1] and "unread 1" in lines[marker + 1]


def test_the_unread_marker_comes_after_the_days_heading(live):
    app, protocol, _ = live
    app.model.add_contact(BOB, "Bob")
    protocol.dataReceived(b"".join(incoming(BOB, ME, T0 + i, f"unread {i}") for i in range(2)))
    app.open(BOB)
    lines = [x[25:].strip() for x in app.render_text().splitlines()]  # right of the list
    marker = lines.index("─── new messages ───")
    assert lines[marker - 1] == f"— {time.strftime('%a %d %b %Y', time.localtime(T0))} —"
    assert "unread 0" in lines[marker + 1]


def test_bidi_and_other_format_characters_are_neutralised(live):
    app, protocol, _ = live
    app.model.add_contact(BOB, "B\u202eob")
    app.press("meta down")
    protocol.dataReceived(incoming(BOB, ME, T0, "abc\u202edef\u2066x\u2069 \u200bz\x1b[31m"))
    screen = app.render_text()
    assert not any(ch in screen for ch in "\u202e\u2066\u2069\u200b\x1b")
    assert "B\ufffdob: abc\ufffddef\ufffdx\ufffd \ufffdz\ufffd[31m" in screen


def test_a_timestamp_a_day_off_is_filed_by_arrival_with_the_senders_time_beside_it(live):
    app, protocol, _ = live
    app.model.add_contact(BOB, "Bob")
    app.press("meta down")
    protocol.dataReceived(
        incoming(BOB, ME, 1_000_000_000, "from 2001") + incoming(BOB, ME, 9_999_999_999, "2286")
    )
    screen = app.render_text((100, 24))
    assert "2001 —" not in screen and "2286 —" not in screen
    assert time.strftime("%a %d %b %Y", time.localtime(T0)) in screen
    assert f"(sent {time.strftime('%Y-%m-%d %H:%M', time.localtime(1_000_000_000))}) Bob: from 2001" in screen
    assert "(sent 2286-" in screen


def test_below_60_columns_the_list_folds_away_and_a_key_brings_it_back(live):
    app, protocol, _ = live
    app.model.add_contact(BOB, "Bob")
    app.press("meta down", size=(40, 12))
    protocol.dataReceived(incoming(BOB, ME, T0, "x" * 30))
    lines = app.render_text((40, 12)).splitlines()
    assert "Conversations" not in "\n".join(lines) and "x" * 30 in "\n".join(lines)
    app.press("f4", size=(40, 12))
    lines = app.render_text((40, 12)).splitlines()
    assert lines[1].startswith("Conversations") and "Bob: x" not in "\n".join(lines)
    app.press("enter", size=(40, 12))  # opens the selected one: the list folds again
    assert "Conversations" not in app.render_text((40, 12))
    assert "Conversations" in app.render_text((100, 24))
    app.press("f4", size=(100, 24))
    assert "Conversations" not in app.render_text((100, 24))
    app.press("f1", size=(40, 12))
    help_lines_ = app.render_text((40, 12)).splitlines()
    assert any("Show this help" in x for x in help_lines_)  # a line of its own, not an 8-column strip


def test_with_the_list_folded_away_the_status_line_counts_what_is_unread(tmp_path):
    """At 40x12 with nothing open, a group created by someone else and its first message
    showed nowhere: the list that would have counted them was folded away."""
    client, endpoint, _ = online(tmp_path)
    client.address = "127.0.0.1:7000"
    app = App(client.model, client)
    protocol, _ = endpoint.last
    size = (40, 12)
    assert app.render_text(size).splitlines()[0].rstrip() == f" {ME} ● connected"
    protocol.dataReceived(wire.added_to_group(b(GROUP), wire.timestamp(T0), [b(BOB), b(ME)]))
    protocol.dataReceived(incoming(BOB, GROUP, T0 + 1, "hi all"))
    app.clock.advance(1)  # drawn as the running loop draws: on the model's events
    lines = app.render_text(size).splitlines()
    assert lines[0].rstrip() == " ● connected · 1 unread, Alt-A" and len(lines[0]) == 40
    assert "Conversations" not in "\n".join(lines)
    protocol.dataReceived(incoming(CAROL, ME, T0 + 2, "and me") + incoming(CAROL, ME, T0 + 3, "again"))
    app.clock.advance(1)
    assert app.render_text(size).splitlines()[0].rstrip() == " ● connected · 3 unread, Alt-A"
    # Wider, the id comes back and then the number of conversations; at 100 the list shows them.
    assert app.render_text((50, 12)).splitlines()[0].rstrip() == (
        " ● connected · 3 unread in 2 conversations, Alt-A"
    )
    assert "unread" not in app.render_text((100, 24)).splitlines()[0]
    # Never wrapped, at any width; the state is always on it.
    for width in (12, 20, 30, 40, 45, 59):
        status = app.render_text((width, 12)).splitlines()[0]
        assert len(status) == width and "●" in status, (width, status)
    assert app.render_text((20, 12)).splitlines()[0].rstrip() == " ● 3 unread"
    # A connection that is down is told in full before the count.
    endpoint.down = True
    drop(protocol)
    assert app.render_text(size).splitlines()[0].rstrip() == " ● 127.0.0.1:7000 closed, 1 s, F5"
    assert app.render_text((50, 12)).splitlines()[0].rstrip() == (
        " ● 127.0.0.1:7000 closed, 1 s, F5 · 3 unread"
    )
    endpoint.down = False
    app.clock.advance(1)
    protocol, _ = endpoint.last
    protocol.dataReceived(wire.online_ok(b(ME)))
    assert app.render_text(size).splitlines()[0].rstrip() == " ● connected · 3 unread, Alt-A"
    # Reading clears it: Alt-A opens Carol's (newest), then the group.
    app.press("meta a", size=size)
    assert app.model.open_id == CAROL
    assert app.render_text(size).splitlines()[0].rstrip() == " ● connected · 1 unread, Alt-A"
    app.press("meta a", size=size)
    assert app.model.open_id == GROUP and "hi all" in app.render_text(size)
    assert app.render_text(size).splitlines()[0].rstrip() == f" {ME} ● connected"
    # A message to the open conversation is read as it arrives: nothing to count.
    protocol.dataReceived(incoming(BOB, GROUP, T0 + 4, "seen"))
    app.clock.advance(1)
    assert app.render_text(size).splitlines()[0].rstrip() == f" {ME} ● connected"


def test_the_unread_count_moves_between_the_list_and_the_status_line_with_the_list_key(live):
    """F4 at an unchanged size in a running loop: the status line is redrawn, not its old canvas."""
    app, protocol, _ = live
    app.model.add_contact(BOB, "Bob")
    protocol.dataReceived(incoming(BOB, ME, T0, "one") + incoming(BOB, ME, T0 + 1, "two"))
    app.clock.advance(1)
    for size in ((40, 12), (100, 30)):
        app.list_mode = "auto"  # 40 columns left it "hidden"
        keeping = _KeepingScreen(size)
        app.loop = urwid.MainLoop(app.top, screen=keeping, handle_mouse=False)
        app.loop.draw_screen()
        folded = size[0] < 60
        assert ("2 unread" in keeping.text().splitlines()[0]) is folded
        app.loop.process_input(["f4"])
        app.loop.draw_screen()
        status, rest = keeping.text().split("\n", 1)
        assert ("2 unread" in status) is not folded and bool(re.search(r"Bob +\(2\)", rest)) is folded
        app.loop.process_input(["meta l"])
        app.loop.draw_screen()
        assert ("2 unread" in keeping.text().splitlines()[0]) is folded
    ascii_app = App(app.model, app.client, ascii_only=True)
    assert ascii_app.render_text((40, 12)).splitlines()[0].rstrip() == " * connected - 2 unread, Alt-A"


def test_search_in_the_conversation_and_across_conversations(live):
    app, protocol, _ = live
    app.model.add_contact(BOB, "Bob")
    app.model.add_contact(CAROL, "Carol")
    app.press("meta down")
    texts = ["apple pie", "banana"] + [f"filler {i}" for i in range(60)] + ["more Apple", "end"]
    protocol.dataReceived(b"".join(incoming(BOB, ME, T0 + i, t) for i, t in enumerate(texts)))
    app.model.clock.advance(60)
    protocol.dataReceived(incoming(CAROL, ME, T0, "carol's apple"))
    app.press("ctrl f", *"apple", "enter")
    screen = app.render_text()
    assert "Match 2 of 2" in screen and "more Apple" in screen
    app.press("f6")
    screen = app.render_text()
    assert "Match 1 of 2" in screen and "apple pie" in screen and "more Apple" not in screen
    # The match is highlighted: drawn in its own style.
    canvas = app.top.render((80, 24), focus=True)
    row = next(r for r in canvas.content() if b"apple pie" in b"".join(t for _, _, t in r))
    assert any("selected" in str(attr) and text == b"apple" for attr, _, text in row), row
    app.press("shift f6")
    assert "Match 2 of 2" in app.render_text()
    app.press("f7", *"apple", "enter")
    screen = app.render_text()
    assert "3 messages with “apple”" in screen and "Carol · Carol: carol's apple" in screen
    app.press("enter")  # the newest: Carol's
    assert app.model.open_id == CAROL and "Match 1 of 1" in app.render_text()


class _KeepingScreen(SizedScreen):
    """What urwid's raw screen does that matters here: it keeps the last canvas it drew,
    so urwid's canvas cache can hand a widget's old canvas back for the same size."""

    canvas = None

    def draw_screen(self, size, canvas) -> None:
        self.canvas = canvas

    def text(self) -> str:
        return "\n".join(line.decode() for line in self.canvas.text)


def test_the_list_key_works_at_an_unchanged_size_in_a_running_loop(live):
    """F4 at 100 columns did nothing in a real terminal: the layout was chosen in render,
    which urwid skips when it still holds a canvas of that size."""
    app, _, _ = live
    keeping = _KeepingScreen((100, 30))
    app.loop = urwid.MainLoop(app.top, screen=keeping, handle_mouse=False)
    app.loop.draw_screen()
    assert keeping.text().splitlines()[1].startswith("Conversations")
    app.loop.process_input(["f4"])
    app.loop.draw_screen()
    assert "Conversations" not in keeping.text()
    app.loop.process_input(["meta l"])
    app.loop.draw_screen()
    assert keeping.text().splitlines()[1].startswith("Conversations")


def client_frames(transport) -> list[bytes]:
    found, _, _ = wire.split_frames(wire.CLIENT_FRAME_LEN, transport.value())
    transport.clear()
    return found


def test_a_group_is_named_by_its_subject_and_its_changes_are_lines_in_it(live):
    app, protocol, transport = live
    for who, nick in ((BOB, "Bob"), (CAROL, "Carol"), (DAVE, "Dave")):
        app.model.add_contact(who, nick)
    protocol.dataReceived(wire.added_to_group(b(GROUP), wire.timestamp(T0), [b(BOB), b(ME)]))
    app.open(GROUP)
    protocol.dataReceived(wire.subject(b(GROUP), b(BOB), wire.timestamp(T0 + 1), b"Trio"))
    protocol.dataReceived(wire.added_to_group(b(GROUP), wire.timestamp(T0 + 2), [b(BOB), b(ME), b(CAROL)]))
    protocol.dataReceived(wire.added_to_group(b(GROUP), wire.timestamp(T0 + 3), [b(ME), b(CAROL)]))
    screen = app.render_text((100, 24))
    assert f" Trio  (group {GROUP})" in screen and "▸ Trio" in screen
    assert "Bob named the group “Trio”" in screen
    lines = [line.strip() for line in screen.splitlines()]
    # The 11 does not say who added Carol, so nobody is named.
    assert any(line.endswith(" Carol was added") for line in lines), screen
    assert any(line.endswith(" Bob left") for line in lines), screen


def test_rename_add_and_leave_keys_send_17_19_20_and_a_left_group_takes_nothing(live):
    app, protocol, transport = live
    for who, nick in ((BOB, "Bob"), (CAROL, "Carol"), (DAVE, "Dave")):
        app.model.add_contact(who, nick)
    protocol.dataReceived(wire.added_to_group(b(GROUP), wire.timestamp(T0), [b(BOB), b(ME), b(CAROL)]))
    protocol.dataReceived(wire.subject(b(GROUP), b(BOB), wire.timestamp(T0 + 1), b"Trio"))
    app.open(GROUP)
    client_frames(transport)

    # Rename: the subject field holds the subject; a new one goes as a 17.
    app.press("f8")
    assert "Rename the group" in app.render_text() and "Subject:  Trio" in app.render_text()
    app.press("ctrl u", *"Quad", "enter", "enter")  # Ctrl-U empties a prefilled field
    assert "Rename the group" not in app.render_text()
    assert client_frames(transport) == [wire.set_subject(b(ME), b(GROUP), wire.timestamp(T0), b"Quad")]
    protocol.dataReceived(wire.subject(b(GROUP), b(ME), wire.timestamp(T0), b"Quad"))
    assert "You named the group “Quad”" in app.render_text() and " Quad  (group" in app.render_text()
    # A nickname only here: no frame, shown instead, with the subject beside it in the header.
    app.press("meta t", "enter", *"Lunch", "enter")
    assert client_frames(transport) == []
    assert f" Lunch  “Quad”  (group {GROUP})" in app.render_text() and "▸ Lunch" in app.render_text()

    # Add: only contacts not in the group are offered.
    app.press("f9")
    screen = app.render_text()
    assert "Add to Lunch" in screen and f"Dave ({DAVE})" in screen and f"Bob ({BOB})" not in screen
    app.press(" ", "enter")
    (frame,) = client_frames(transport)
    assert frame == wire.add_members(b(ME), b(GROUP), frame[28:38], [b(DAVE)])
    protocol.dataReceived(wire.added_to_group(b(GROUP), frame[28:38], [b(BOB), b(ME), b(CAROL), b(DAVE)]))
    assert "Dave was added by you" in app.render_text()

    # Leave: a confirmation that answers n, Esc and y.
    app.press("meta x")
    assert "Leave the group?" in app.render_text() and "y: leave" in app.render_text()
    app.press("n")
    assert "Leave the group?" not in app.render_text()
    app.press("meta x", "esc")
    assert "Leave the group?" not in app.render_text() and client_frames(transport) == []
    app.press("meta x", "y")
    (frame,) = client_frames(transport)
    assert frame[:2] == wire.LEAVE_GROUP and frame[2:28] == b(ME) + b(GROUP)
    protocol.dataReceived(wire.left_group(b(GROUP), frame[28:38]))
    screen = app.render_text()
    assert "You left" in screen and "you left  (group" in screen
    assert "you left the group >" in screen
    app.press(*"anyone?", "enter")
    assert client_frames(transport) == [] and "it stays readable" in app.render_text()
    app.press("f8")
    assert "Rename the group" not in app.render_text()


def test_creating_a_group_asks_for_its_subject(live):
    app, _, transport = live
    app.model.add_contact(BOB, "Bob")
    app.press("f3", "tab", " ", "enter")
    assert "Give the group a subject" in app.render_text() and client_frames(transport) == []
    app.press(*"Duo", "enter")
    assert client_frames(transport)[0][:2] == wire.CREATE_GROUP
