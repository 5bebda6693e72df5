"""The screen: a conversation list, the open conversation, an input line, a status line.

Widgets only display what the model holds (unread counts, ticks, order). A
model event only notes what changed; the screen is brought up to date at most
once a reactor turn (and at most every ``DRAW_INTERVAL``), and then only the
changed parts: new messages are appended to the open conversation, ticks
re-drawn on their own line, and only the list rows whose text changed are set
again. A flood of frames therefore costs a little per frame and one draw per
read, and the keyboard is answered between reads.
"""

from __future__ import annotations

import math
import time

import urwid
from twisted.logger import Logger

from chatproto import wire
from chatproto.client import (
    ADDED,
    CONNECTED,
    FAILED,
    LEFT,
    OFFLINE,
    READ,
    SUBJECT,
    TEXT,
    ChatClient,
    ClientModel,
    Message,
)

from .keys import KEYS, commands_for, help_lines, key_name
from .theme import DOT, SEPARATOR, TICK_MEANING, TICKS, palette
from .widgets import Dialog, Field, MessageList, Row, SizedScreen, StatusLine, safe

SIDEBAR_WIDTH = 24
#: Below this width the conversation list folds away (a key brings it back).
NARROW = 60
#: How many of a conversation's newest messages are drawn when it opens (Alt-Home draws all).
SHOWN_MESSAGES = 500
#: The open conversation keeps at most this many more before its oldest lines are dropped.
TRIM_AFTER = 200
#: Seconds between two draws at most as often: a flood costs one draw per read, not per frame.
DRAW_INTERVAL = 0.01
NOTICE_SECONDS = 5.0
ERROR_SECONDS = 10.0
IDLE_NOTICE = ("notice", "F1 or ? lists every key.")
#: A sender's clock this far from ours is not believed: the message is filed by its arrival.
SKEW_LIMIT = 24 * 3600
#: Split parts of one long message arrive with consecutive timestamps within this many seconds.
PART_GAP = 1.0


def is_part(prev: Message | None, m: Message) -> bool:
    """``m`` is the next part of the long message ``prev`` began (split_text cut there):
    sent together, and the next word would not have fitted."""
    if prev is None or not (m.outgoing and prev.outgoing and m.ts == prev.ts + 1):
        return False
    if abs(m.at - prev.at) > PART_GAP:
        return False
    word = m.text.split(" ", 1)[0].split("\n", 1)[0]
    return len(prev.text.encode()) + 1 + len(word.encode()) > wire.MSG_LEN


def filed_time(m: Message) -> float:
    """When a message is filed: its timestamp, unless that is more than a day from its arrival."""
    return m.ts if abs(m.ts - m.at) <= SKEW_LIMIT else m.at


PROMPT = ("input", "> ")
#: The input line of a group this profile left: it says so, and Enter sends nothing.
LEFT_PROMPT = ("failed", "you left the group > ")


class InputLine(urwid.Edit):
    """Multi-line edit whose Enter is left to the key table, so SEND and NEWLINE are data."""

    def __init__(self):
        super().__init__(PROMPT, multiline=True)

    def keypress(self, size, key):
        if key == "enter":
            return key
        return super().keypress(size, key)


class Body(urwid.WidgetPlaceholder):
    """The list and the conversation side by side, or, below NARROW columns, one of them."""

    def __init__(self, app: App, columns, sidebar, main):
        self.app = app
        self.columns, self.sidebar, self.main = columns, sidebar, main
        self.maxcol = 80
        super().__init__(columns)

    def layout(self, maxcol: int) -> str:
        mode = self.app.list_mode
        if maxcol >= NARROW:
            return "main" if mode == "hidden" else "both"
        return "list" if mode == "shown" else "main"

    def _arrange(self, size) -> None:
        """Show what the width and the list mode ask for. Called when the mode changes too, not
        only from render: urwid reuses a canvas of the same size without calling render again."""
        self.maxcol = size[0]
        want = {"both": self.columns, "list": self.sidebar, "main": self.main}[self.layout(size[0])]
        if self.original_widget is not want:
            self.original_widget = want

    def render(self, size, focus=False):
        self._arrange(size)
        return super().render(size, focus)

    def keypress(self, size, key):
        self._arrange(size)
        return super().keypress(size, key)


class App:
    """The terminal client. ``loop`` is None in tests: widgets are rendered straight to a canvas."""

    log = Logger()

    def __init__(
        self,
        model: ClientModel,
        client: ChatClient | None,
        bell: bool = True,
        ascii_only: bool = False,
        theme: str = "dark",
    ):
        self.model = model
        self.client = client
        self.clock = model.clock
        self.bell = bell
        self.glyphs = "ascii" if ascii_only else "unicode"
        self.marker = "?" if ascii_only else "\ufffd"
        self.theme = theme
        self.loop: urwid.MainLoop | None = None
        self.pasting = False
        self.notice: tuple[str, str] = IDLE_NOTICE
        self._notice_call = None
        self.dialog: Dialog | None = None
        #: "auto" (the list shows when there is room), "shown" or "hidden" (the list key).
        self.list_mode = "auto"
        #: What was sent, oldest first (Up/Down recall it), where Up has got to, and the line it left.
        self.history: list[str] = []
        self._history_at: int | None = None
        self._draft = ""
        #: What the open conversation is searched for (lower case), and the match on screen.
        self.search = ""
        self._match: Message | None = None

        # What changed since the last draw, noted by model events.
        self._draw_call = None
        self._last_draw = -math.inf
        self._all_rows = True
        self._dirty_rows: set[str] = set()
        self._dirty_ticks: list[Message] = []
        self._tick_all = False
        self._rebuild = True
        self._retitle = False
        self._ring = False
        self._tick_call = None

        # The open conversation as drawn: which one, how many of its messages, and each line.
        self._view_cid: str | None = None
        self._view_n = 0
        self._view_day: str | None = None
        self._view_last: Message | None = None
        self._lines: dict[int, tuple[urwid.Text, bool]] = {}
        self._unread_from: dict[str, int] = {}
        self._below = 0
        self._show_all = False

        # The conversation list as drawn: a row per conversation, in order.
        self._rows: dict[str, urwid.AttrMap] = {}
        self._row_markup: dict[str, list] = {}
        self._row_order: list[str] = []

        self.status = StatusLine(list_hidden=self._list_hidden)
        self.conv_walker = urwid.SimpleFocusListWalker([])
        self.conv_list = urwid.ListBox(self.conv_walker)
        self.title = urwid.Text("", wrap="clip")
        self.msg_walker = urwid.SimpleFocusListWalker([])
        self.msg_list = MessageList(self.msg_walker)
        self.hint = urwid.AttrMap(urwid.Text("", wrap="clip"), "unread")
        self.input = InputLine()
        self.notice_text = urwid.Text("")
        sidebar = urwid.Frame(
            urwid.AttrMap(self.conv_list, "sidebar"),
            header=urwid.AttrMap(urwid.Text("Conversations", wrap="clip"), "title"),
        )
        self.main = urwid.Frame(
            urwid.AttrMap(self.msg_list, "text"), header=urwid.AttrMap(self.title, "title")
        )
        self.columns = urwid.Columns([("given", SIDEBAR_WIDTH, sidebar), self.main], dividechars=1)
        self.body = Body(self, self.columns, sidebar, self.main)
        self.frame = urwid.Frame(
            self.body,
            header=urwid.AttrMap(self.status, "header"),
            footer=urwid.Pile(
                [urwid.AttrMap(self.input, "input"), urwid.AttrMap(self.notice_text, "notice")]
            ),
            focus_part="footer",
        )
        self.root = urwid.WidgetPlaceholder(self.frame)
        self.top = _KeyRoot(self)
        model.listeners.append(self._on_model_event)
        self.apply()

    # -- running -----------------------------------------------------------------

    def run(self, reactor) -> None:
        screen = urwid.display.raw.Screen(bracketed_paste_mode=True)
        # Ctrl-C, Ctrl-Q and Ctrl-S reach the key table instead of becoming signals or flow control.
        screen.tty_signal_keys(intr="undefined", start="undefined", stop="undefined")
        self.loop = urwid.MainLoop(
            self.top,
            palette(self.theme),
            screen=screen,
            handle_mouse=False,
            event_loop=urwid.TwistedEventLoop(reactor=reactor),
        )
        if self.client is not None:
            reactor.callWhenRunning(self.client.start)
        self.loop.run()

    def press(self, *keys: str, size=(80, 24)) -> None:
        """Feed keys through urwid's own dispatch, as the running loop does (tests use it)."""
        loop = urwid.MainLoop(self.top, screen=SizedScreen(size), handle_mouse=False)
        loop.process_input(list(keys))

    def redraw(self) -> None:
        if self.loop is not None and self.loop.screen.started:
            self.loop.draw_screen()

    def render_text(self, size=(80, 24)) -> str:
        """What the screen shows at ``size``, as plain text (for tests and screenshots)."""
        self.apply()
        canvas = self.top.render(size, focus=True)
        return "\n".join(line.decode("utf-8") for line in canvas.text)

    # -- model events: note what changed, draw later ---------------------------------

    def _on_model_event(self, event: str, **data) -> None:
        """Called from the network: never let an exception reach the reactor."""
        try:
            if event == "error":
                self.say(data["text"], error=True)
            elif event == "incoming":
                self._dirty_rows.add(data["conv"].id)
                if data.get("notify") and self.bell:
                    self._ring = True
            elif event == "ticks":
                self._dirty_ticks.extend(data["messages"])
            elif event == "messages":
                conv = data.get("conv")
                if conv is None:
                    self._tick_all = True
                    self._all_rows = True
                else:
                    self._dirty_rows.add(conv.id)
            elif event == "group":
                self._dirty_rows.add(data["conv"].id)
                if data.get("created_by_me"):
                    self.open(data["conv"].id)
                    self.say("Group created.")
                elif data["conv"].id == self.model.open_id:
                    self._retitle = True
            elif event == "status":
                if self.model.status == CONNECTED and self.notice[1] == "Reconnecting…":
                    self.clear_notice()
            else:  # conversations, identity: names or order may have changed anywhere
                self._all_rows = True
                if self.model.open_id is None:
                    self._rebuild = True
            self.schedule_draw()
        except Exception:
            self.log.failure("noting a {event} event", event=event)

    def schedule_draw(self) -> None:
        """One draw for everything that happens in this reactor turn (and the next few ms)."""
        if self._draw_call is not None and self._draw_call.active():
            return
        delay = max(0.0, self._last_draw + DRAW_INTERVAL - self.clock.seconds())
        self._draw_call = self.clock.callLater(delay, self._draw_now)

    def _draw_now(self) -> None:
        self._draw_call = None
        self._last_draw = self.clock.seconds()
        try:
            self.apply()
            if self._ring:
                self._ring = False
                self.ring()
            self.redraw()
        except Exception:
            self.log.failure("drawing the screen")

    def ring(self) -> None:
        if self.loop is not None and self.loop.screen.started:
            self.loop.screen.write("\a")
            self.loop.screen.flush()

    # -- notices -------------------------------------------------------------------

    def say(self, text: str, error: bool = False, seconds: float | None = None) -> None:
        """A line under the input; it goes after a few seconds, or at the next key."""
        self.notice = ("error" if error else "notice", safe(text, self.marker))
        self.notice_text.set_text(self.notice)
        if self._notice_call is not None and self._notice_call.active():
            self._notice_call.cancel()
        wait = seconds if seconds is not None else (ERROR_SECONDS if error else NOTICE_SECONDS)
        self._notice_call = self.clock.callLater(wait, self._notice_expired)

    def _notice_expired(self) -> None:
        self._notice_call = None
        self.clear_notice()
        self.schedule_draw()

    def clear_notice(self) -> None:
        if self._notice_call is not None and self._notice_call.active():
            self._notice_call.cancel()
        self._notice_call = None
        self.notice = IDLE_NOTICE
        self.notice_text.set_text(self.notice)

    # -- drawing -------------------------------------------------------------------

    def apply(self) -> None:
        """Bring the widgets up to date with the model: only what changed."""
        self._draw_status()
        if self._all_rows or self._dirty_rows:
            self._draw_conversations()
        if self._rebuild or self._view_cid != self.model.open_id:
            self._rebuild_messages()
        else:
            self._append_messages()
            self._update_ticks()
            if self._retitle:
                self._draw_title()
        self._draw_hint()
        self.notice_text.set_text(self.notice)

    # status line

    def _address(self) -> str:
        return getattr(self.client, "address", None) or "the server"

    def _draw_status(self) -> None:
        model = self.model
        me = model.me.user if model.me else "(registering…)"
        dot = DOT[self.glyphs]
        good = model.status == CONNECTED
        style = "status_ok" if good else "status_bad"
        detail = model.status_detail
        short = getattr(model, "status_short", "") or detail
        retry_at = getattr(model, "retry_at", None)
        wait = None
        if not good and retry_at is not None:
            wait = max(0, math.ceil(retry_at - self.clock.seconds()))
        if good:
            long, brief = f"{dot} connected to {self._address()}", f"{dot} connected"
        elif model.status == OFFLINE:
            why = detail or "not connected"
            long, brief = f"{dot} offline: {why} F5 reconnects", f"{dot} offline, F5"
        else:
            why = detail or f"reconnecting to {self._address()}"
            if wait:
                long = f"{dot} {why}, retrying in {wait} s, F5 now"
                brief = f"{dot} {short}, {wait} s, F5"
            else:
                long, brief = f"{dot} {why}", f"{dot} {short or 'reconnecting'}"
        header = "header"
        self.status.set_variants(
            [
                [(header, f" you: {me}  "), (style, long), (header, "   F1 help")],
                [(header, f" you: {me}  "), (style, long)],
                [(header, f" {me} "), (style, long)],
                [(header, f" {me} "), (style, brief)],
                [(style, f" {brief}")],
            ],
            self._unread_variants(me, good, long, brief),
        )
        # A countdown on screen is kept true once a second, only while there is one.
        if wait and (self._tick_call is None or not self._tick_call.active()):
            self._tick_call = self.clock.callLater(1.0, self._status_tick)

    def _unread_variants(self, me: str, good: bool, long: str, brief: str) -> list[list] | None:
        """The status line while the conversation list is folded away: the list's unread counts
        move up to it, so a small terminal still shows that something arrived (the same count
        the list shows and the bell rings for: messages in conversations that are not open).
        Longest first; the own id goes first, then the number of conversations, then the key,
        then the word "connected" (the dot's colour still says it). A connection that is down
        is told in full instead: nothing new arrives meanwhile, and what it does matters more."""
        counts = [c.unread for c in self.model.conversations.values() if c.unread]
        if not counts:
            return None
        n, convs = sum(counts), len(counts)
        key = key_name("NEXT_UNREAD")
        where = f" in {convs} conversation{'s' if convs > 1 else ''}"
        full = f"{n} unread message{'s' if n > 1 else ''}{where}, {key} opens"
        mid = f"{n} unread{where}, {key}" if convs > 1 else f"{n} unread, {key}"
        short, tiny = f"{n} unread, {key}", f"{n} unread"
        style = "status_ok" if good else "status_bad"
        header, unread, sep = "header", "status_unread", (style, SEPARATOR[self.glyphs])
        dot = DOT[self.glyphs]
        return [
            [(header, f" you: {me}  "), (style, long), sep, (unread, full), (header, "   F1 help")],
            [(header, f" you: {me}  "), (style, long), sep, (unread, full)],
            [(header, f" {me} "), (style, brief), sep, (unread, mid)],
            [(style, f" {brief}"), sep, (unread, mid)],
            [(style, f" {brief}"), sep, (unread, short)],
            [(style, f" {brief}"), sep, (unread, tiny)],
            [(style, f" {dot} "), (unread, tiny)] if good else [(style, f" {brief}")],
        ]

    def _list_hidden(self, maxcol: int) -> bool:
        return self.body.layout(maxcol) == "main"

    def _status_tick(self) -> None:
        self._tick_call = None
        self.schedule_draw()

    # conversation list

    def _name(self, who: str) -> str:
        return safe(self.model.display_name(who), self.marker).replace("\n", " ")

    def _row(self, conv) -> list:
        name = self._name(conv.id)
        is_open = conv.id == self.model.open_id
        style = "open" if is_open else "sidebar"
        markup = [(style, ("▸ " if self.glyphs == "unicode" else "> ") if is_open else "  ")]
        count = f" ({conv.unread})" if conv.unread else ""
        room = SIDEBAR_WIDTH - 2 - len(count)
        markup.append((style, name[:room].ljust(room)))
        if count:
            markup.append(("unread", count))
        return markup

    def _draw_conversations(self) -> None:
        ordered = self.model.ordered()
        changed = None if self._all_rows else self._dirty_rows
        self._all_rows, self._dirty_rows = False, set()
        for conv in ordered:
            if changed is not None and conv.id in self._rows and conv.id not in changed:
                continue
            markup = self._row(conv)
            row = self._rows.get(conv.id)
            if row is None:
                row = urwid.AttrMap(Row(markup, wrap="clip"), None, focus_map="selected")
                row.conv_id = conv.id
                self._rows[conv.id] = row
                self._row_markup[conv.id] = markup
            elif self._row_markup.get(conv.id) != markup:
                row.original_widget.set_text(markup)
                self._row_markup[conv.id] = markup
        order = [c.id for c in ordered]
        if order != self._row_order:
            focused = self._selected_id() or self.model.open_id
            self._row_order = order
            self.conv_walker[:] = [self._rows[cid] for cid in order]
            if focused in self._rows:
                self.conv_walker.set_focus(order.index(focused))

    def _selected_id(self) -> str | None:
        if not self.conv_walker:
            return None
        widget, _ = self.conv_walker.get_focus()
        return getattr(widget, "conv_id", None)

    # the open conversation

    def _welcome(self) -> None:
        self.title.set_text(" No conversation open")
        me = self.model.me.user if self.model.me else "(not yet known: it comes with the first connection)"
        self.msg_walker[:] = [
            urwid.Text(line)
            for line in (
                "",
                f" Your id is {me}.",
                " Give it to the people who want to write to you.",
                "",
                " F2 adds a contact by id; Alt-Up/Down or Tab and Enter open a conversation;",
                " F3 makes a group; F1 lists every key; Ctrl-Q quits.",
            )
        ]
        self.msg_list.to_start()  # a short screen shows the id first

    def _rebuild_messages(self) -> None:
        model = self.model
        self._rebuild = False
        self._view_cid = cid = model.open_id
        self._view_n, self._view_day, self._view_last = 0, None, None
        self._lines = {}
        self._below = 0
        self._draw_title()
        if cid is None or cid not in model.conversations:
            self._welcome()
            return
        conv = model.conversations[cid]
        start = 0 if self._show_all else max(0, len(conv.messages) - SHOWN_MESSAGES)
        marker_at = self._unread_from.get(cid)
        items: list[urwid.Widget] = []
        marker = None
        for i in range(start, len(conv.messages)):
            lines = self._lines_for(conv.messages[i])
            if i == marker_at:
                # After the day's heading, if one comes here: the marker sits on the message.
                rule = "───" if self.glyphs == "unicode" else "---"
                marker = urwid.Text(("unread", f"{rule} new messages {rule}"), align="center")
                lines.insert(len(lines) - 1, marker)
            items.extend(lines)
        self._view_n = len(conv.messages)
        self.msg_walker[:] = items
        if marker is not None:
            self.msg_list.set_focus(items.index(marker))
            self.msg_list.set_focus_valign("top")
        else:
            self.msg_list.to_end()

    def _draw_title(self) -> None:
        """The open conversation's name, and for a group its subject when a nickname hides it,
        and whether we left it; the input line says so too."""
        self._retitle = False
        cid = self.model.open_id
        left = cid is not None and self.model.has_left(cid)
        self.input.set_caption(LEFT_PROMPT if left else PROMPT)
        if cid is None:
            return
        words = [f" {self._name(cid)}"]
        group = self.model.groups.get(cid)
        if group is not None and group.subject and cid in self.model.names:
            words.append(f"“{safe(group.subject, self.marker)}”")
        if left:
            words.append("you left")
        words.append(f"({'group' if cid.startswith('1') else 'id'} {cid})")
        self.title.set_text("  ".join(words))

    def _lines_for(self, m: Message) -> list[urwid.Widget]:
        """A day heading when the day changes, then the message's line."""
        out = []
        filed = time.localtime(filed_time(m))
        day = time.strftime("%Y-%m-%d", filed)
        if day != self._view_day:
            self._view_day = day
            out.append(urwid.Text(("time", f"— {time.strftime('%a %d %b %Y', filed)} —"), align="center"))
            self._view_last = None
        part = is_part(self._view_last, m)
        line = urwid.Text(self._markup(m, part))
        line.message = m
        self._lines[id(m)] = (line, part)
        self._view_last = m
        out.append(line)
        return out

    def _note_text(self, m: Message) -> str:
        """A group change as a sentence: "Carol was added by Alice", "Bob left"."""
        me = self.model.me.user if self.model.me else None
        ids = m.text.split()
        names = ", ".join("you" if i == me else self._name(i) for i in ids)
        by = "you" if m.src == me else self._name(m.src) if m.src else ""
        if m.kind == SUBJECT:
            return f"{by[:1].upper() + by[1:]} named the group “{safe(m.text, self.marker)}”"
        if m.kind == ADDED:
            verb = "were" if ids == [me] or len(ids) > 1 else "was"
            sentence = f"{names[:1].upper() + names[1:]} {verb} added"
            return f"{sentence} by {by}" if by else sentence
        if m.kind == LEFT:
            return f"{names[:1].upper() + names[1:]} left"
        return m.text

    def _markup(self, m: Message, part: bool = False) -> list:
        if m.kind != TEXT:
            return [
                ("time", time.strftime("%H:%M ", time.localtime(filed_time(m)))),
                ("time", self._note_text(m)),
            ]
        if part:
            # The rest of one long message: shown with its first part, as one text.
            markup = [("time", " " * 6), ("me", " " * 4)]
        else:
            markup = [("time", time.strftime("%H:%M ", time.localtime(filed_time(m))))]
            if filed_time(m) != m.ts:
                stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.ts)) if 0 <= m.ts < 1e11 else m.ts
                markup.append(("time", f"(sent {stamp}) "))
            if m.outgoing:
                markup.append(("me", "me: "))
            else:
                markup.append(("them", f"{self._name(m.src)}: "))
        markup.extend(self._highlighted(safe(m.text, self.marker)))
        if m.outgoing:
            style = {READ: "tick_read", FAILED: "failed"}.get(m.state, "tick")
            markup.append((style, " " + TICKS[self.glyphs][m.state]))
        return markup

    def _highlighted(self, text: str) -> list:
        if not self.search or self.search not in text.lower():
            return [("text", text)]
        out, at, low = [], 0, text.lower()
        while (found := low.find(self.search, at)) >= 0:
            out += [("text", text[at:found]), ("selected", text[found : found + len(self.search)])]
            at = found + len(self.search)
        # No empty runs: urwid 2.6 (our floor) drops the rest of a line after one.
        return [run for run in [*out, ("text", text[at:])] if run[1]]

    def _append_messages(self) -> None:
        cid = self._view_cid
        if cid is None or cid not in self.model.conversations:
            return
        messages = self.model.conversations[cid].messages
        if len(messages) <= self._view_n:
            return
        at_end = self.msg_list.at_end()
        new = messages[self._view_n :]
        self._view_n = len(messages)
        items = []
        for m in new:
            items.extend(self._lines_for(m))
        self.msg_walker.extend(items)
        if len(self.msg_walker) > SHOWN_MESSAGES + TRIM_AFTER and not self._show_all:
            self._trim()
        if at_end:
            self.msg_list.to_end()
            self._below = 0
        else:
            self._below += sum(1 for m in new if m.incoming)

    def _trim(self) -> None:
        drop = len(self.msg_walker) - SHOWN_MESSAGES
        focus = self.msg_walker.focus
        for widget in self.msg_walker[:drop]:
            m = getattr(widget, "message", None)
            if m is not None:
                self._lines.pop(id(m), None)
        del self.msg_walker[:drop]
        if focus >= drop:
            self.msg_walker.set_focus(focus - drop)

    def _update_ticks(self) -> None:
        if self._tick_all:
            messages = [w.message for w in self.msg_walker if getattr(w, "message", None) is not None]
        else:
            messages = self._dirty_ticks
        self._tick_all, self._dirty_ticks = False, []
        for m in messages:
            found = self._lines.get(id(m))
            if found is not None and m.outgoing:
                line, part = found
                line.set_text(self._markup(m, part))

    def _draw_hint(self) -> None:
        if self._below and self.msg_list.at_end():
            self._below = 0
        if self._below:
            n = self._below
            keys = "Alt-End" if self.body.maxcol >= NARROW else "M-End"
            text = f"▼ {n} new message{'s' if n > 1 else ''} below ({keys} or Page-Down)"
            self.hint.original_widget.set_text(text if self.glyphs == "unicode" else "v" + text[1:])
            if self.main.footer is None:
                self.main.footer = self.hint
        elif self.main.footer is not None:
            self.main.footer = None

    # -- actions -------------------------------------------------------------------

    def open(self, cid: str | None) -> None:
        self.search, self._match = "", None
        conv = self.model.conversations.get(cid) if cid is not None else None
        self._unread_from.pop(cid, None)
        if conv is not None and conv.unread:
            # The first unread message: the unread-th incoming one from the end.
            left = conv.unread
            for i in range(len(conv.messages) - 1, -1, -1):
                if conv.messages[i].incoming:
                    left -= 1
                    if left == 0:
                        self._unread_from[cid] = i
                        break
        previous = self.model.open_id
        self._show_all = False
        self.model.open(cid)
        self._rebuild = True
        self._dirty_rows.update(x for x in (previous, cid) if x is not None)
        if self.body.maxcol < NARROW and self.list_mode == "shown":
            self._set_list_mode("auto")
        self.apply()
        self._focus_input()

    def _focus_input(self) -> None:
        self.frame.focus_position = "footer"

    def _input_focused(self) -> bool:
        return self.frame.focus_position == "footer"

    def handle_key(self, key) -> bool:
        """One key from the terminal; True when it was used. Errors become a notice, never a crash."""
        try:
            return self._handle_key(key)
        except urwid.ExitMainLoop:
            raise
        except Exception as e:
            self.log.failure("handling the key {key!r}", key=key)
            self.say(f"Something went wrong: {e}", error=True)
            return True

    def _handle_key(self, key) -> bool:
        if key == "begin paste":
            self.pasting = True
            return True
        if key == "end paste":
            self.pasting = False
            return True
        if self.pasting and self.dialog is None:
            # Everything pasted is text for the message: no key inside a paste is a command.
            self._focus_input()
            if key == "enter":
                self.input.insert_text("\n")
            elif key == "tab":
                self.input.insert_text("\t")
            elif isinstance(key, str) and len(key) == 1:
                self.input.insert_text(key)
            return True
        if self.notice is not IDLE_NOTICE:
            self.clear_notice()  # the next action clears a notice
        if self.dialog is not None:
            return False
        context = "input" if self._input_focused() else "list"
        for name in commands_for(key, context):
            command = KEYS[name]
            if not command.typing and context == "input" and self.input.edit_text and len(key) == 1:
                continue
            if getattr(self, "do_" + name.lower())() is False:
                continue  # not for this place (e.g. Up inside a multi-line message)
            return True
        return False

    def do_help(self) -> None:
        rows = [urwid.Text(("help_key", "Keys")), urwid.Divider()]
        context = None
        narrow = self.body.maxcol < NARROW
        for title, keys, text in help_lines():
            if title != context:
                context = title
                rows.append(urwid.Text(("help_key", title)))
            if narrow:
                rows += [urwid.Text("  " + keys), urwid.Padding(urwid.Text(text), left=6)]
            else:
                rows.append(urwid.Columns([("given", 26, urwid.Text("  " + keys)), urwid.Text(text)]))
        rows += [urwid.Divider(), urwid.Text(("help_key", "Ticks on your messages"))]
        for state, meaning in TICK_MEANING.items():
            rows.append(urwid.Text(f"  {TICKS[self.glyphs][state]:4} {meaning}"))
        rows += [urwid.Divider(), urwid.Text("Esc, F1 or ? closes this help.")]
        self.show_dialog(
            "Help",
            urwid.ListBox(urwid.SimpleFocusListWalker(rows)),
            lambda key: key in ("esc", "f1", "?", "q") and self.close_dialog(),
        )

    def do_send(self) -> None:
        text = self.input.edit_text
        if not text.strip():
            return
        if self.model.open_id is None:
            self.say("Open a conversation first: F2 adds a contact, Alt-Up/Down moves between them.", True)
            return
        if self.model.has_left(self.model.open_id):
            self.say("You left this group: it stays readable, but nothing can be sent to it.", error=True)
            return
        try:
            sent = self.model.send_text(self.model.open_id, text)
        except ValueError as e:
            self.say(str(e), error=True)
            return
        self.input.set_edit_text("")
        if not self.history or self.history[-1] != text:
            self.history.append(text)
        self._history_at = None
        if len(sent) > 1:
            self.say(f"That was long, so it went as {len(sent)} messages.")
        self.apply()
        self.msg_list.to_end()
        self._below = 0

    def do_newline(self) -> None:
        self.input.insert_text("\n")

    # the input line: history and the readline keys

    def _line_bounds(self) -> tuple[int, int]:
        text, pos = self.input.edit_text, self.input.edit_pos
        start = text.rfind("\n", 0, pos) + 1
        end = text.find("\n", pos)
        return start, len(text) if end < 0 else end

    def _recall(self, at: int | None) -> None:
        if self._history_at is None:
            self._draft = self.input.edit_text
        self._history_at = at
        text = self._draft if at is None else self.history[at]
        self.input.set_edit_text(text)
        self.input.set_edit_pos(len(text))

    def do_history_previous(self):
        if "\n" in self.input.edit_text[: self.input.edit_pos] or not self.history:
            return False  # Up moves between the lines of a message
        at = len(self.history) - 1 if self._history_at is None else self._history_at - 1
        if at >= 0:
            self._recall(at)

    def do_history_next(self):
        if "\n" in self.input.edit_text[self.input.edit_pos :] or self._history_at is None:
            return False
        at = self._history_at + 1
        self._recall(at if at < len(self.history) else None)

    def do_line_start(self) -> None:
        self.input.set_edit_pos(self._line_bounds()[0])

    def do_line_end(self) -> None:
        self.input.set_edit_pos(self._line_bounds()[1])

    def _word_start(self, pos: int) -> int:
        text = self.input.edit_text
        while pos > 0 and text[pos - 1].isspace():
            pos -= 1
        while pos > 0 and not text[pos - 1].isspace():
            pos -= 1
        return pos

    def do_word_back(self) -> None:
        self.input.set_edit_pos(self._word_start(self.input.edit_pos))

    def do_word_forward(self) -> None:
        text, pos = self.input.edit_text, self.input.edit_pos
        while pos < len(text) and text[pos].isspace():
            pos += 1
        while pos < len(text) and not text[pos].isspace():
            pos += 1
        self.input.set_edit_pos(pos)

    def _delete(self, start: int, end: int) -> None:
        text = self.input.edit_text
        self.input.set_edit_text(text[:start] + text[end:])
        self.input.set_edit_pos(start)

    def do_kill_before(self) -> None:
        self._delete(self._line_bounds()[0], self.input.edit_pos)

    def do_kill_after(self) -> None:
        self._delete(self.input.edit_pos, self._line_bounds()[1])

    def do_kill_word(self) -> None:
        self._delete(self._word_start(self.input.edit_pos), self.input.edit_pos)

    def do_next_unread(self) -> None:
        ordered = [c for c in self.model.ordered()]
        ids = [c.id for c in ordered]
        start = ids.index(self.model.open_id) + 1 if self.model.open_id in ids else 0
        for conv in ordered[start:] + ordered[:start]:
            if conv.unread and conv.id != self.model.open_id:
                self.open(conv.id)
                return
        self.say("No unread messages.")

    def do_open(self) -> None:
        cid = self._selected_id()
        if cid is not None:
            self.open(cid)

    def _step(self, by: int) -> None:
        ordered = [c.id for c in self.model.ordered()]
        if not ordered:
            return
        if self.model.open_id in ordered:
            at = (ordered.index(self.model.open_id) + by) % len(ordered)
        else:
            at = 0
        self.open(ordered[at])

    def do_next_conversation(self) -> None:
        self._step(1)

    def do_previous_conversation(self) -> None:
        self._step(-1)

    def do_switch_focus(self) -> None:
        if self._input_focused():
            if self.body.layout(self.body.maxcol) == "main":
                self._set_list_mode("shown")
            self.frame.focus_position = "body"
            if self.body.layout(self.body.maxcol) == "both":
                self.columns.focus_position = 0
        else:
            if self.body.maxcol < NARROW:
                self._set_list_mode("auto")
            self._focus_input()

    def _set_list_mode(self, mode: str) -> None:
        self.list_mode = mode
        self.body._arrange((self.body.maxcol,))
        self.status.relayout()  # the unread counts move between the list and the status line

    def do_toggle_list(self) -> None:
        shown = self.body.layout(self.body.maxcol) != "main"
        self._set_list_mode("hidden" if shown else "shown")
        if self.list_mode == "shown" and self.body.maxcol < NARROW:
            self.frame.focus_position = "body"
        else:
            self._focus_input()

    def do_scroll_up(self) -> None:
        self.msg_list.page("page up")

    def do_scroll_down(self) -> None:
        self.msg_list.page("page down")

    def do_latest(self) -> None:
        self.msg_list.to_end()
        self._below = 0

    def do_oldest(self) -> None:
        cid = self.model.open_id
        if cid in self.model.conversations and not self._show_all:
            if len(self.model.conversations[cid].messages) > SHOWN_MESSAGES:
                self._show_all = True
                self._rebuild = True
                self.apply()
        self.msg_list.to_start()

    # search

    def _ask(self, title: str, prompt: str, answer) -> None:
        field = Field(prompt)

        def on_key(key):
            if key == "esc":
                return self.close_dialog()
            if key == "enter":
                self.close_dialog()
                answer(field.edit_text)
                return True
            return False

        body = urwid.Pile([field, urwid.Divider(), urwid.Text("Enter: search   Esc: cancel")])
        self.show_dialog(title, urwid.Filler(body, valign="top"), on_key, height=6)

    def do_search(self) -> None:
        if self.model.open_id is None:
            self.say("Open a conversation first; F7 searches every conversation.", error=True)
            return
        self._ask("Search this conversation", "Find: ", self._search_here)

    def _search_here(self, term: str) -> None:
        self.search = term.strip().lower()
        self._match = None
        self._rebuild = True
        self._show_all = bool(self.search)
        self.apply()
        if self.search:
            self._search_step(-1, from_end=True)

    def _search_step(self, by: int, from_end: bool = False) -> None:
        lines = [w for w in self.msg_walker if getattr(w, "message", None) is not None]
        hits = [w for w in lines if w.message.kind == TEXT and self.search in w.message.text.lower()]
        if not hits:
            self.say(f"No message here holds “{self.search}”.")
            return
        at = next((i for i, w in enumerate(hits) if w.message is self._match), None)
        if from_end or at is None:
            at = len(hits) - 1
        else:
            at += by
            if not 0 <= at < len(hits):
                self.say("No more matches that way.")
                return
        self._match = hits[at].message
        self.msg_list.set_focus(self.msg_walker.index(hits[at]))
        self.msg_list.set_focus_valign("middle")
        self.say(f"Match {at + 1} of {len(hits)} for “{self.search}” (F6 older, Shift-F6 newer).")

    def do_search_older(self):
        if not self.search:
            return False
        self._search_step(-1)

    def do_search_newer(self):
        if not self.search:
            return False
        self._search_step(1)

    def do_search_all(self) -> None:
        self._ask("Search every conversation", "Find: ", self._search_everywhere)

    def _search_everywhere(self, term: str) -> None:
        term = term.strip().lower()
        if not term:
            return
        found = [
            (m.at, conv.id, m)
            for conv in self.model.conversations.values()
            for m in conv.messages
            if m.kind == TEXT and term in m.text.lower()
        ]
        found.sort(key=lambda x: -x[0])
        if not found:
            self.say(f"No message holds “{term}”.")
            return
        rows = []
        for _, cid, m in found[:200]:
            who = "me" if m.outgoing else self._name(m.src)
            text = safe(m.text, self.marker).replace("\n", " ")
            row = urwid.AttrMap(Row(f"{self._name(cid)} · {who}: {text}", wrap="clip"), None, "selected")
            row.conv_id, row.message = cid, m
            rows.append(row)
        walker = urwid.SimpleFocusListWalker(rows)

        def on_key(key):
            if key == "esc":
                return self.close_dialog()
            if key == "enter":
                row = walker.get_focus()[0]
                self.close_dialog()
                self.open(row.conv_id)
                self.search = term
                self._search_here(term)
                return True
            return False

        title = f"{len(found)} message{'s' if len(found) > 1 else ''} with “{term}” (Enter opens)"
        self.show_dialog(title, urwid.ListBox(walker), on_key)

    def do_add_contact(self) -> None:
        who = Field("Id:       ")
        nick = Field("Nickname: ")

        def save():
            conv = self.model.add_contact(who.edit_text, nick.edit_text)
            self.close_dialog()
            self.open(conv.id)

        self._two_fields(
            "Add a contact",
            "Their 13-digit id (they see it on their status line), and a name for them.",
            (who, nick),
            "Enter: next / add   Esc: cancel",
            save,
            height=12,
        )

    def do_new_group(self) -> None:
        contacts = self.model.contacts()
        if not contacts:
            self.say("Add contacts first (F2): a group is made from them.", error=True)
            return
        name = Field("Subject (every member sees it): ")
        boxes = [urwid.CheckBox(f"{safe(nick, self.marker)} ({cid})") for cid, nick in contacts]
        problem = urwid.Text("")
        items = [name, urwid.Divider(), urwid.Text("Members (Space ticks, Enter creates):")]
        items += boxes + [urwid.Divider(), problem, urwid.Text("Esc: cancel")]
        walker = urwid.SimpleFocusListWalker(items)

        def on_key(key):
            if key == "esc":
                return self.close_dialog()
            if key == "tab":
                walker.set_focus(3 if walker.focus == 0 else 0)
                return True
            if key == "enter":
                members = [cid for (cid, _), box in zip(contacts, boxes, strict=True) if box.get_state()]
                if not name.edit_text.strip():
                    problem.set_text(("error", "Give the group a subject: every member sees it."))
                    walker.set_focus(0)
                    return True
                try:
                    self.model.create_group(members, name.edit_text)
                except ValueError as e:
                    problem.set_text(("error", str(e)))
                    return True
                self.close_dialog()
                self.say("Creating the group…")
                return True
            return False

        self.show_dialog("New group", urwid.ListBox(walker), on_key, height=min(20, 9 + len(boxes)))

    # managing the open group

    def _open_group(self):
        """The open conversation's group, if it is one we are still in; else say why not."""
        cid = self.model.open_id
        group = self.model.groups.get(cid) if cid is not None else None
        if group is None:
            self.say("Open a group first (F3 makes one).", error=True)
            return None
        if self.model.has_left(cid):
            self.say("You left this group.", error=True)
            return None
        return group

    def do_rename_group(self) -> None:
        group = self._open_group()
        if group is None:
            return
        subject = Field("Subject:  ", group.subject)
        nick = Field("Nickname: ", self.model.names.get(group.id, ""))

        def save():
            if subject.edit_text.strip() != group.subject:
                self.model.set_subject(group.id, subject.edit_text)
            self.model.set_nickname(group.id, nick.edit_text)
            self.close_dialog()
            self._retitle = True

        self._two_fields(
            "Rename the group",
            "The subject is the group's name for every member; a nickname only you see.",
            (subject, nick),
            "Enter: next / save   Esc: cancel",
            save,
            height=11,
        )

    def do_add_members(self) -> None:
        group = self._open_group()
        if group is None:
            return
        contacts = [(cid, nick) for cid, nick in self.model.contacts() if cid not in group.members]
        if not contacts:
            self.say("Everyone in your contacts is in this group: F2 adds a contact.", error=True)
            return
        boxes = [urwid.CheckBox(f"{safe(nick, self.marker)} ({cid})") for cid, nick in contacts]
        problem = urwid.Text("")
        items = [urwid.Text("Contacts not in the group (Space ticks, Enter adds):"), *boxes]
        items += [urwid.Divider(), problem, urwid.Text("Esc: cancel")]
        walker = urwid.SimpleFocusListWalker(items)
        walker.set_focus(1)

        def on_key(key):
            if key == "esc":
                return self.close_dialog()
            if key == "enter":
                chosen = [cid for (cid, _), box in zip(contacts, boxes, strict=True) if box.get_state()]
                try:
                    self.model.add_members(group.id, chosen)
                except ValueError as e:
                    problem.set_text(("error", str(e)))
                    return True
                self.close_dialog()
                self.say("Adding…")
                return True
            return False

        title = f"Add to {self._name(group.id)}"
        self.show_dialog(title, urwid.ListBox(walker), on_key, height=min(20, 7 + len(boxes)))

    def do_leave_group(self) -> None:
        group = self._open_group()
        if group is None:
            return
        text = (
            f"Leave “{self._name(group.id)}”? You stop getting its messages; what it holds stays "
            "here to read.\n\ny: leave   n or Esc: stay"
        )

        def on_key(key):
            if key in ("y", "Y"):
                self.close_dialog()
                try:
                    self.model.leave_group(group.id)
                except ValueError as e:
                    self.say(str(e), error=True)
                return True
            if key in ("n", "N", "esc"):
                return self.close_dialog()
            return True

        self.show_dialog("Leave the group?", urwid.Filler(urwid.Text(text)), on_key, height=9)

    def do_reconnect(self) -> None:
        if self.client is not None:
            self.say("Reconnecting…")
            self.client.reconnect_now()

    def do_quit(self) -> None:
        unsent = len(self.model.unsent())
        typed = bool(self.input.edit_text.strip())
        if not unsent and not typed:
            raise urwid.ExitMainLoop()
        what = []
        if unsent:
            what.append(
                f"{unsent} message{'s have' if unsent > 1 else ' has'} not reached the server yet "
                "(kept, and sent the next time you start)"
            )
        if typed:
            what.append("the input line holds text that was not sent (it will be lost)")
        text = "Quit anyway? " + "; ".join(what) + ".\n\ny: quit   n or Esc: stay"

        def on_key(key):
            if key in ("y", "Y"):
                raise urwid.ExitMainLoop()
            if key in ("n", "N", "esc"):
                return self.close_dialog()
            return True

        self.show_dialog("Quit?", urwid.Filler(urwid.Text(text)), on_key, height=9)

    # -- dialogs -------------------------------------------------------------------

    def _two_fields(self, title: str, intro: str, fields, hint: str, save, height: int) -> None:
        """A dialog of two fields: Enter or Tab goes from the first to the second,
        Tab back, Enter on the second calls ``save`` (which closes the dialog);
        a ValueError it raises is shown in the dialog, which stays."""
        pile = urwid.Pile(list(fields))
        problem = urwid.Text("")
        body = urwid.Pile(
            [urwid.Text(intro), urwid.Divider(), pile, urwid.Divider(), problem, urwid.Text(hint)]
        )

        def on_key(key):
            if key == "esc":
                return self.close_dialog()
            if key in ("enter", "tab") and pile.focus_position == 0:
                pile.focus_position = 1
                return True
            if key == "tab":
                pile.focus_position = 0
                return True
            if key == "enter":
                try:
                    save()
                except ValueError as e:
                    problem.set_text(("error", str(e)))
                return True
            return False

        self.show_dialog(title, urwid.Filler(body, valign="top"), on_key, height=height)

    def show_dialog(self, title: str, body: urwid.Widget, on_key, height: int | None = None) -> None:
        self.dialog = Dialog(title, body, on_key, height)
        # What arrives while a dialog covers the conversation is not read yet.
        self.model.visible = False
        self.root.original_widget = urwid.Overlay(
            self.dialog,
            self.frame,
            align="center",
            width=("relative", 90),
            valign="middle",
            height=height if height is not None else ("relative", 90),
            min_width=30,
            min_height=5,
        )

    def close_dialog(self) -> bool:
        self.dialog = None
        self.root.original_widget = self.frame
        self.model.visible = True
        cid = self.model.open_id
        if cid in self.model.conversations and self.model.conversations[cid].unread:
            # What came meanwhile is on screen now: read, without moving the view.
            self.model.open(cid)
            self._dirty_rows.add(cid)
        return True


class _KeyRoot(urwid.WidgetWrap):
    """The top widget: the key table first, then whatever has the focus.

    Always selectable, whatever is on top: MainLoop gives keys only to a
    selectable top widget, and the key table must see every one.
    """

    def __init__(self, app: App):
        self.app = app
        super().__init__(app.root)

    def selectable(self) -> bool:
        return True

    def keypress(self, size, key):
        self.app.body.maxcol = size[0]  # the body is as wide as the screen
        try:
            if self.app.handle_key(key):
                return None
            return super().keypress(size, key)
        except urwid.ExitMainLoop:
            raise
        except Exception as e:
            self.app.log.failure("a widget failed on {key!r}", key=key)
            self.app.say(f"Something went wrong: {e}", error=True)
            return None
        finally:
            # urwid draws right after its input: let that draw show what the key changed.
            self.app.apply()
