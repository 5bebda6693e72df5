"""The one key table: key handling, the help screen and the README's key list all read it.

Each command has its keys, a line of help and a context: ``global`` keys work
everywhere (``typing=False`` ones only when they would not type a character
into a non-empty input line), ``input`` keys while the input line has the
focus, ``list`` keys while the conversation list has it.
"""

from __future__ import annotations

from typing import NamedTuple


class Command(NamedTuple):
    keys: tuple[str, ...]
    help: str
    context: str = "global"
    #: False: this key also types a character, so it acts only on an empty input line.
    typing: bool = True


KEYS: dict[str, Command] = {
    "HELP": Command(("f1", "?"), "Show this help (? only when the input line is empty)", typing=False),
    "SEND": Command(("enter",), "Send the message", "input"),
    "NEWLINE": Command(("meta enter", "ctrl n"), "Start a new line inside the message", "input"),
    "HISTORY_PREVIOUS": Command(("up",), "Recall the message sent before (from the first line)", "input"),
    "HISTORY_NEXT": Command(("down",), "Recall the message sent after (from the last line)", "input"),
    "LINE_START": Command(("ctrl a", "home"), "Go to the start of the line", "input"),
    "LINE_END": Command(("ctrl e", "end"), "Go to the end of the line", "input"),
    "WORD_BACK": Command(("meta b", "ctrl left"), "Go back a word", "input"),
    "WORD_FORWARD": Command(("meta f", "ctrl right"), "Go forward a word", "input"),
    "KILL_BEFORE": Command(("ctrl u",), "Delete to the start of the line", "input"),
    "KILL_AFTER": Command(("ctrl k",), "Delete to the end of the line", "input"),
    "KILL_WORD": Command(("ctrl w", "meta backspace"), "Delete the word before the cursor", "input"),
    "OPEN": Command(("enter",), "Open the selected conversation", "list"),
    "NEXT_CONVERSATION": Command(("meta down", "ctrl down"), "Open the next conversation in the list"),
    "PREVIOUS_CONVERSATION": Command(("meta up", "ctrl up"), "Open the previous conversation in the list"),
    "NEXT_UNREAD": Command(("meta a",), "Open the next conversation with unread messages"),
    "SWITCH_FOCUS": Command(("tab",), "Move between the conversation list and the input line"),
    "SCROLL_UP": Command(("page up",), "Scroll the conversation back a screenful"),
    "SCROLL_DOWN": Command(("page down",), "Scroll the conversation forward a screenful"),
    "LATEST": Command(("meta end", "ctrl end", "meta >"), "Go to the latest message"),
    "OLDEST": Command(("meta home", "ctrl home", "meta <"), "Go to the oldest message"),
    "TOGGLE_LIST": Command(("f4", "meta l"), "Show or hide the conversation list (hidden below 60 columns)"),
    "SEARCH": Command(("ctrl f",), "Search the open conversation (matches highlighted; empty: stop)"),
    "SEARCH_OLDER": Command(("f6",), "Go to the previous (older) match of the search"),
    "SEARCH_NEWER": Command(("shift f6",), "Go to the next (newer) match of the search"),
    "SEARCH_ALL": Command(("f7",), "Search every conversation; Enter opens the one found"),
    "ADD_CONTACT": Command(("f2", "meta c"), "Add a contact: their id and a nickname"),
    "NEW_GROUP": Command(("f3", "meta g"), "Create a group from your contacts"),
    "RENAME_GROUP": Command(("f8", "meta t"), "Rename the open group (for every member), or nickname it"),
    "ADD_MEMBERS": Command(("f9", "meta m"), "Add contacts to the open group"),
    "LEAVE_GROUP": Command(("meta x",), "Leave the open group (asks first)"),
    "RECONNECT": Command(("f5", "meta r"), "Reconnect now (also after 'logged in elsewhere')"),
    "QUIT": Command(("ctrl q", "ctrl c", "f10"), "Quit (asks first only if something is unsent)"),
}

CONTEXT_TITLES = {"global": "Everywhere", "input": "In the input line", "list": "In the conversation list"}


def commands_for(key: str, context: str) -> list[str]:
    """Commands bound to ``key`` in ``context`` (global ones included), in table order."""
    return [name for name, c in KEYS.items() if key in c.keys and c.context in ("global", context)]


def help_lines() -> list[tuple[str, str, str]]:
    """(context title, keys, help) for the help screen, grouped by context."""
    lines = []
    for context, title in CONTEXT_TITLES.items():
        for c in KEYS.values():
            if c.context == context:
                lines.append((title, ", ".join(_pretty(k) for k in c.keys), c.help))
    return lines


def key_name(command: str) -> str:
    """How a hint on screen names ``command``: its first key, as the help screen writes it."""
    return _pretty(KEYS[command].keys[0])


def _pretty(key: str) -> str:
    parts = key.split()
    names = {"meta": "Alt", "ctrl": "Ctrl", "page": "Page"}
    return "-".join(names.get(p, p.capitalize()) for p in parts)
