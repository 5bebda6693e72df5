"""``chat-client`` / ``python -m chatproto_tui``: options, the profile, then the screen."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys

from chatproto.client import ChatClient, ClientModel, LocalStore, ProfileError, default_data_dir

from .theme import THEMES


def version() -> str:
    try:
        return importlib.metadata.version("chatproto")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="chat-client",
        description="The chatproto terminal client. Your id is shown on the status line: "
        "give it to people who want to write to you. Inside: F1 lists every key, F2 adds a "
        "contact by their id, Enter sends, Ctrl-Q quits (it asks first if something is unsent).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    p.add_argument(
        "--server",
        action="append",
        help="a Twisted client endpoint string (tcp:HOST:PORT, tls:HOST:PORT, unix:PATH) "
        "or HOST:PORT as shorthand (default: tcp:localhost:7000); give it again for each node "
        "of a cluster: a reconnection tries them in turn",
    )
    p.add_argument("--profile", default="default", help="which identity to use (default: %(default)s)")
    p.add_argument(
        "--data-dir",
        default=None,
        help="where profiles live (default: $XDG_DATA_HOME/chatproto or ~/.local/share/chatproto)",
    )
    p.add_argument("--no-bell", action="store_true", help="no terminal bell for new messages")
    p.add_argument(
        "--no-read-receipts", action="store_true", help="never tell senders you read their messages"
    )
    p.add_argument("--ascii", action="store_true", help="ASCII ticks for terminals without Unicode")
    p.add_argument("--theme", choices=sorted(THEMES), default="dark", help="colours (default: %(default)s)")
    return p.parse_args(argv)


def _unicode_terminal() -> bool:
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "")
    return encoding == "utf8"


def main(argv=None) -> int:
    args = parse_args(argv)
    profile = os.path.join(args.data_dir or default_data_dir(), args.profile)
    try:
        store = LocalStore(profile)
    except ProfileError as e:
        sys.stderr.write(f"chat-client: {e}\n")
        return 2
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    # The terminal belongs to urwid: the log goes to a file in the profile.
    log_file = open(os.path.join(profile, "client.log"), "a", encoding="utf-8")  # noqa: SIM115
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)], redirectStandardIO=False)
    try:
        model = ClientModel(store, reactor, read_receipts=not args.no_read_receipts)
    except ProfileError as e:
        sys.stderr.write(f"chat-client: {e}\n")
        return 2
    from .ui import App

    client = ChatClient(reactor, args.server or ["tcp:localhost:7000"], model)
    app = App(
        model,
        client,
        bell=not args.no_bell,
        ascii_only=args.ascii or not _unicode_terminal(),
        theme=args.theme,
    )
    try:
        app.run(reactor)
    finally:
        store.close()
        log_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
