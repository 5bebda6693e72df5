"""Colours and glyphs as data: a theme is style → (foreground, background)."""

from __future__ import annotations

from chatproto.client import DELIVERED, FAILED, QUEUED, READ, SENT

REQUIRED_STYLES = (
    "header",
    "status_ok",
    "status_bad",
    "status_unread",
    "sidebar",
    "selected",
    "open",
    "unread",
    "title",
    "time",
    "me",
    "them",
    "text",
    "tick",
    "tick_read",
    "failed",
    "notice",
    "error",
    "input",
    "dialog",
    "help_key",
)

THEMES: dict[str, dict[str, tuple[str, str]]] = {
    "dark": {
        "header": ("white,bold", "dark blue"),
        "status_ok": ("light green,bold", "dark blue"),
        "status_bad": ("yellow,bold", "dark blue"),
        "status_unread": ("black", "yellow"),
        "sidebar": ("light gray", "black"),
        "selected": ("black", "light gray"),
        "open": ("white,bold", "black"),
        "unread": ("yellow,bold", "black"),
        "title": ("white,bold", "dark gray"),
        "time": ("dark cyan", "black"),
        "me": ("light green", "black"),
        "them": ("light cyan,bold", "black"),
        "text": ("light gray", "black"),
        "tick": ("dark green", "black"),
        "tick_read": ("light blue,bold", "black"),
        "failed": ("light red,bold", "black"),
        "notice": ("light gray", "dark gray"),
        "error": ("white,bold", "dark red"),
        "input": ("white", "black"),
        "dialog": ("black", "light gray"),
        "help_key": ("dark blue,bold", "light gray"),
    },
    "light": {
        "header": ("white,bold", "dark blue"),
        "status_ok": ("light green,bold", "dark blue"),
        "status_bad": ("yellow,bold", "dark blue"),
        "status_unread": ("black", "yellow"),
        "sidebar": ("black", "white"),
        "selected": ("white", "dark blue"),
        "open": ("dark blue,bold", "white"),
        "unread": ("dark red,bold", "white"),
        "title": ("black,bold", "light gray"),
        "time": ("dark gray", "white"),
        "me": ("dark green", "white"),
        "them": ("dark blue,bold", "white"),
        "text": ("black", "white"),
        "tick": ("dark green", "white"),
        "tick_read": ("dark blue,bold", "white"),
        "failed": ("dark red,bold", "white"),
        "notice": ("black", "light gray"),
        "error": ("white,bold", "dark red"),
        "input": ("black", "white"),
        "dialog": ("black", "light gray"),
        "help_key": ("dark blue,bold", "light gray"),
    },
}

#: Ticks, with a fallback for terminals that cannot show the check marks.
TICKS = {
    "unicode": {QUEUED: "◷", SENT: "✓", DELIVERED: "✓✓", READ: "✔✔", FAILED: "✗"},
    "ascii": {QUEUED: "(q)", SENT: "(s)", DELIVERED: "(d)", READ: "(r)", FAILED: "(!)"},
}
TICK_MEANING = {
    QUEUED: "queued: not yet sent to the server",
    SENT: "sent: the server has it",
    DELIVERED: "delivered: it reached them (in a group: everyone)",
    READ: "read: they opened it (in a group: everyone)",
    FAILED: "failed: the server refused it; it will not be retried",
}
DOT = {"unicode": "●", "ascii": "*"}
#: Between the connection state and the unread count on the status line.
SEPARATOR = {"unicode": " · ", "ascii": " - "}


def palette(theme: str) -> list[tuple[str, str, str]]:
    return [(name, fg, bg) for name, (fg, bg) in THEMES[theme].items()]
