"""The screen's building blocks: plain urwid widgets that know nothing of the model."""

from __future__ import annotations

import unicodedata

import urwid

#: Bidi embeddings, overrides and isolates, and the marks: they reorder what surrounds them.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
#: Format characters that only join what is next to them (emoji sequences, some scripts).
_JOINERS = frozenset("\u200c\u200d")


def safe(text: str, marker: str = "\ufffd") -> str:
    """``text`` as it may reach the terminal: bidi controls and other format or control
    characters become ``marker``, so a sender cannot reorder or hide what surrounds them.
    Line ends stay (a message may have several lines); a tab becomes a space."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append(ch)
        elif ch == "\t":
            out.append(" ")
        elif ch in _BIDI:
            out.append(marker)
        elif ch in _JOINERS:
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp"):
            out.append(marker)
        else:
            out.append(ch)
    return "".join(out)


class Row(urwid.Text):
    """A selectable line of text (urwid.Text is not selectable)."""

    _selectable = True

    def keypress(self, size, key):
        return key


class Field(urwid.Edit):
    """A dialog's one-line field with the line keys a terminal user types without thinking
    (Ctrl-A/E to the start or end, Ctrl-U/K delete before or after the cursor): a prefilled
    group subject is replaced with Ctrl-U, as in the input line."""

    def keypress(self, size, key):
        text, pos = self.edit_text, self.edit_pos
        if key == "ctrl a":
            self.set_edit_pos(0)
        elif key == "ctrl e":
            self.set_edit_pos(len(text))
        elif key == "ctrl u":
            self.set_edit_text(text[pos:])
            self.set_edit_pos(0)
        elif key == "ctrl k":
            self.set_edit_text(text[:pos])
        else:
            return super().keypress(size, key)
        return None


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


class StatusLine(urwid.Widget):
    """One line that never wraps: the first of its variants (longest first) that fits the width,
    the last one clipped if none does.

    ``list_hidden(maxcol)`` says whether the conversation list is folded away at that width:
    then the ``hidden`` variants are shown instead, if any (they carry what the list would).
    It is asked at render time, as the width is only known then; ``relayout`` redraws the
    line when the answer changes at the same width (the list key)."""

    _sizing = frozenset([urwid.FLOW])
    ignore_focus = True

    def __init__(self, list_hidden=lambda maxcol: False):
        super().__init__()
        self.list_hidden = list_hidden
        self.variants: list[list] = [[""]]
        self.hidden: list[list] | None = None

    def set_variants(self, variants: list[list], hidden: list[list] | None = None) -> None:
        if variants != self.variants or hidden != self.hidden:
            self.variants, self.hidden = variants, hidden
            self._invalidate()

    def relayout(self) -> None:
        self._invalidate()

    def rows(self, size, focus=False) -> int:
        return 1

    def text_for(self, maxcol: int) -> urwid.Text:
        variants = self.hidden if self.hidden and self.list_hidden(maxcol) else self.variants
        for markup in variants:
            text = urwid.Text(markup, wrap="clip")
            if text.pack()[0] <= maxcol:
                return text
        return urwid.Text(variants[-1], wrap="clip")

    def render(self, size, focus=False):
        (maxcol,) = size
        return self.text_for(maxcol).render(size)


class MessageList(urwid.ListBox):
    """The open conversation; remembers the size it was last drawn at, for Page-Up/Down and
    for knowing whether the newest message is on screen."""

    def __init__(self, walker):
        super().__init__(walker)
        self.last_size: tuple[int, int] | None = None

    def render(self, size, focus=False):
        self.last_size = size
        return super().render(size, focus)

    def at_end(self) -> bool:
        """The last line is on screen (also before the first draw, or when empty)."""
        if not self.body or self.last_size is None:
            return True
        try:
            return "bottom" in self.ends_visible(self.last_size)
        except Exception:  # an empty or changing list: urwid cannot say
            return True

    def page(self, key: str) -> None:
        if self.body and self.last_size is not None:
            self.keypress(self.last_size, key)

    def to_end(self) -> None:
        if self.body:
            self.set_focus(len(self.body) - 1)
            self.set_focus_valign("bottom")

    def to_start(self) -> None:
        if self.body:
            self.set_focus(0)
            self.set_focus_valign("top")


class SizedScreen(urwid.display.common.BaseScreen):
    """A screen that is never started: MainLoop.process_input needs only its size."""

    def __init__(self, size):
        super().__init__()
        self.size = size

    def get_cols_rows(self):
        return self.size

    def draw_screen(self, size, canvas) -> None:
        pass
