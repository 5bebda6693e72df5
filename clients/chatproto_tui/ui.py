"""The screen: a conversation list, the open conversation, an input line, a status line.

Widgets only display what the model holds (unread counts, ticks, order); every
change comes back from the model as an event, after which the affected parts
are rebuilt and the screen is drawn: urwid's Twisted loop redraws only after
its own callbacks, not after a network event.
"""

from __future__ import annotations

import time

import urwid
from twisted.logger import Logger

from chatproto.client import CONNECTED, FAILED, READ, ChatClient, ClientModel

from .keys import KEYS, commands_for, help_lines
from .theme import DOT, TICK_MEANING, TICKS, palette

SIDEBAR_WIDTH = 24
#: Older history stays in the store; drawing it all on every event would not scale.
SHOWN_MESSAGES = 500


class _Row(urwid.Text):
    """A selectable line of text (urwid.Text is not selectable)."""

    _selectable = True

    def keypress(self, size, key):
        return key


class InputLine(urwid.Edit):
    """Multi-line edit whose Enter is left to the key table, so SEND and NEWLINE are data."""

    def __init__(self):
        super().__init__(("input", "> "), multiline=True)

    def keypress(self, size, key):
        if key == "enter":
            return key
        return super().keypress(size, key)


class Dialog(urwid.WidgetWrap):
    """A box over the main screen; ``on_key`` sees every key before its widgets do.

    Always selectable: urwid hands keys only to a selectable top widget, and a
    dialog of plain text (Quit?) has nothing selectable inside it.
    """

    def __init__(self, title: str, body: urwid.Widget, on_key=None, height: int | None = None):
        self.on_key = on_key
        self.height = height
        super().__init__(urwid.AttrMap(urwid.LineBox(body, title=title), "dialog"))

    def selectable(self) -> bool:
        return True

    def keypress(self, size, key):
        if self.on_key is not None and self.on_key(key):
            return None
        if not self._w.selectable():
            return key
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
        self.bell = bell
        self.glyphs = "ascii" if ascii_only else "unicode"
        self.theme = theme
        self.loop: urwid.MainLoop | None = None
        self.pasting = False
        self.notice: tuple[str, str] = ("notice", "F1 or ? lists every key.")
        self.dialog: Dialog | None = None

        self.status = urwid.Text("")
        self.conv_walker = urwid.SimpleFocusListWalker([])
        self.conv_list = urwid.ListBox(self.conv_walker)
        self.title = urwid.Text("")
        self.msg_walker = urwid.SimpleFocusListWalker([])
        self.msg_list = urwid.ListBox(self.msg_walker)
        self.input = InputLine()
        self.notice_text = urwid.Text("")
        sidebar = urwid.Frame(
            urwid.AttrMap(self.conv_list, "sidebar"),
            header=urwid.AttrMap(urwid.Text("Conversations"), "title"),
        )
        main = urwid.Frame(urwid.AttrMap(self.msg_list, "text"), header=urwid.AttrMap(self.title, "title"))
        self.columns = urwid.Columns([("given", SIDEBAR_WIDTH, sidebar), main], dividechars=1)
        self.frame = urwid.Frame(
            self.columns,
            header=urwid.AttrMap(self.status, "header"),
            footer=urwid.Pile(
                [urwid.AttrMap(self.input, "input"), urwid.AttrMap(self.notice_text, "notice")]
            ),
            focus_part="footer",
        )
        self.root = urwid.WidgetPlaceholder(self.frame)
        self.top = _KeyRoot(self)
        model.listeners.append(self._on_model_event)
        self.refresh()

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
        loop = urwid.MainLoop(self.top, screen=_SizedScreen(size), handle_mouse=False)
        loop.process_input(list(keys))

    def redraw(self) -> None:
        if self.loop is not None and self.loop.screen.started:
            self.loop.draw_screen()

    def render_text(self, size=(80, 24)) -> str:
        """What the screen shows at ``size``, as plain text (for tests and screenshots)."""
        canvas = self.top.render(size, focus=True)
        return "\n".join(line.decode("utf-8") for line in canvas.text)

    # -- model events --------------------------------------------------------------

    def _on_model_event(self, event: str, **data) -> None:
        """Called from the network: never let an exception reach the reactor."""
        try:
            if event == "error":
                self.say(data["text"], error=True)
            elif event == "incoming" and data.get("notify") and self.bell:
                self.ring()
            elif event == "group" and data.get("created_by_me"):
                self.open(data["conv"].id)
                self.say(f"Group {self.model.display_name(data['conv'].id)} created.")
            self.refresh()
            self.redraw()
        except Exception:
            self.log.failure("drawing after a {event} event", event=event)

    def ring(self) -> None:
        if self.loop is not None and self.loop.screen.started:
            self.loop.screen.write("\a")
            self.loop.screen.flush()

    def say(self, text: str, error: bool = False) -> None:
        self.notice = ("error" if error else "notice", text)
        self.notice_text.set_text(self.notice)

    # -- drawing -------------------------------------------------------------------

    def refresh(self) -> None:
        self._draw_status()
        self._draw_conversations()
        self._draw_messages()
        self.notice_text.set_text(self.notice)

    def _draw_status(self) -> None:
        model = self.model
        me = model.me.user if model.me else "(registering…)"
        good = model.status == CONNECTED
        state = model.status + (f": {model.status_detail}" if model.status_detail and not good else "")
        self.status.set_text(
            [
                ("header", f" you: {me}  "),
                ("status_ok" if good else "status_bad", f"{DOT[self.glyphs]} {state}"),
                ("header", "   F1 help"),
            ]
        )

    def _draw_conversations(self) -> None:
        focused = self._selected_id()
        rows = []
        focus_at = 0
        for i, conv in enumerate(self.model.ordered()):
            name = self.model.display_name(conv.id)
            style = "open" if conv.id == self.model.open_id else "sidebar"
            markup = [(style, ("▸ " if self.glyphs == "unicode" else "> ") if style == "open" else "  ")]
            count = f" ({conv.unread})" if conv.unread else ""
            room = SIDEBAR_WIDTH - 2 - len(count)
            markup.append((style, name[:room].ljust(room)))
            if count:
                markup.append(("unread", count))
            row = urwid.AttrMap(_Row(markup, wrap="clip"), None, focus_map="selected")
            row.conv_id = conv.id
            rows.append(row)
            if conv.id == (focused or self.model.open_id):
                focus_at = i
        self.conv_walker[:] = rows
        if rows:
            self.conv_walker.set_focus(focus_at)

    def _selected_id(self) -> str | None:
        if not self.conv_walker:
            return None
        widget, _ = self.conv_walker.get_focus()
        return getattr(widget, "conv_id", None)

    def _draw_messages(self) -> None:
        model = self.model
        cid = model.open_id
        at_end = not self.msg_walker or self.msg_walker.focus == len(self.msg_walker) - 1
        if cid is None or cid not in model.conversations:
            self.title.set_text(" No conversation open")
            me = model.me.user if model.me else "(not yet known: it comes with the first connection)"
            self.msg_walker[:] = [
                urwid.Text(line)
                for line in (
                    "",
                    f" Your id is {me}.",
                    " Give it to the people who want to write to you.",
                    "",
                    " F2 adds a contact by id; Alt-Up/Down or Tab and Enter open a conversation;",
                    " F3 makes a group; F1 lists every key.",
                )
            ]
            return
        conv = model.conversations[cid]
        kind = "group" if conv.is_group else "id"
        self.title.set_text(f" {model.display_name(cid)}  ({kind} {cid})")
        widgets = []
        day = None
        for m in conv.messages[-SHOWN_MESSAGES:]:
            local = time.localtime(m.ts)
            if time.strftime("%Y-%m-%d", local) != day:
                day = time.strftime("%Y-%m-%d", local)
                heading = f"— {time.strftime('%a %d %b %Y', local)} —"
                widgets.append(urwid.Text(("time", heading), align="center"))
            markup = [("time", time.strftime("%H:%M ", local))]
            if m.outgoing:
                markup.append(("me", "me: "))
            else:
                markup.append(("them", f"{model.display_name(m.src)}: "))
            markup.append(("text", m.text))
            if m.outgoing:
                style = {READ: "tick_read", FAILED: "failed"}.get(m.state, "tick")
                markup.append((style, " " + TICKS[self.glyphs][m.state]))
            widgets.append(urwid.Text(markup))
        self.msg_walker[:] = widgets
        if widgets and at_end:
            self.msg_walker.set_focus(len(widgets) - 1)

    # -- actions -------------------------------------------------------------------

    def open(self, cid: str | None) -> None:
        self.model.open(cid)
        self.msg_walker[:] = []
        self.refresh()
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
        if self.dialog is not None:
            return False
        context = "input" if self._input_focused() else "list"
        for name in commands_for(key, context):
            command = KEYS[name]
            if not command.typing and context == "input" and self.input.edit_text and len(key) == 1:
                continue
            getattr(self, "do_" + name.lower())()
            return True
        return False

    def do_help(self) -> None:
        rows = [urwid.Text(("help_key", "Keys")), urwid.Divider()]
        context = None
        for title, keys, text in help_lines():
            if title != context:
                context = title
                rows.append(urwid.Text(("help_key", title)))
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
        try:
            sent = self.model.send_text(self.model.open_id, text)
        except ValueError as e:
            self.say(str(e), error=True)
            return
        self.input.set_edit_text("")
        if len(sent) > 1:
            self.say(f"That was long, so it went as {len(sent)} messages.")
        self.msg_walker[:] = []
        self.refresh()

    def do_newline(self) -> None:
        self.input.insert_text("\n")

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
            self.frame.focus_position = "body"
            self.columns.focus_position = 0
        else:
            self._focus_input()

    def _scroll(self, by: int) -> None:
        if self.msg_walker:
            at = max(0, min(len(self.msg_walker) - 1, self.msg_walker.focus + by))
            self.msg_walker.set_focus(at)

    def do_scroll_up(self) -> None:
        self._scroll(-10)

    def do_scroll_down(self) -> None:
        self._scroll(10)

    def do_add_contact(self) -> None:
        who = urwid.Edit("Id:       ")
        nick = urwid.Edit("Nickname: ")
        problem = urwid.Text("")
        fields = urwid.Pile([who, nick])
        body = urwid.Pile(
            [
                urwid.Text("Their 13-digit id (they see it on their status line), and a name for them."),
                urwid.Divider(),
                fields,
                urwid.Divider(),
                problem,
                urwid.Text("Enter: next / add   Esc: cancel"),
            ]
        )

        def on_key(key):
            if key == "esc":
                return self.close_dialog()
            if key in ("enter", "tab") and fields.focus_position == 0:
                fields.focus_position = 1
                return True
            if key == "enter":
                try:
                    conv = self.model.add_contact(who.edit_text, nick.edit_text)
                except ValueError as e:
                    problem.set_text(("error", str(e)))
                    return True
                self.close_dialog()
                self.open(conv.id)
                return True
            return False

        self.show_dialog("Add a contact", urwid.Filler(body, valign="top"), on_key, height=12)

    def do_new_group(self) -> None:
        contacts = self.model.contacts()
        if not contacts:
            self.say("Add contacts first (F2): a group is made from them.", error=True)
            return
        name = urwid.Edit("Group name: ")
        boxes = [urwid.CheckBox(f"{nick} ({cid})") for cid, nick in contacts]
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

    def show_dialog(self, title: str, body: urwid.Widget, on_key, height: int | None = None) -> None:
        self.dialog = Dialog(title, body, on_key, height)
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
        return True


class _SizedScreen(urwid.display.common.BaseScreen):
    """A screen that is never started: MainLoop.process_input needs only its size."""

    def __init__(self, size):
        super().__init__()
        self.size = size

    def get_cols_rows(self):
        return self.size

    def draw_screen(self, size, canvas) -> None:
        pass


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
        if self.app.handle_key(key):
            return None
        try:
            return super().keypress(size, key)
        except urwid.ExitMainLoop:
            raise
        except Exception as e:
            self.app.log.failure("a widget failed on {key!r}", key=key)
            self.app.say(f"Something went wrong: {e}", error=True)
            return None
