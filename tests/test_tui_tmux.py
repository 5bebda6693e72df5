"""End to end in a real terminal: a real server, two terminal clients in tmux, a server restart.

Every wait polls capture-pane against a deadline; nothing sleeps a fixed time
hoping it is enough.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from . import installed

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float = 15.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


class Server:
    def __init__(self, port: int, db: Path, log: Path, listen: str | None = None):
        self.port, self.db, self.log = port, db, log
        #: The --port endpoint: plain TCP on loopback unless a test gives another (ssl:...).
        self.listen = listen or f"tcp:{port}:interface=127.0.0.1"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    installed.python(),
                    "-m",
                    "twisted",
                    "chat",
                    "--port",
                    self.listen,
                ]
                + ["--db", str(self.db)],
                cwd=installed.outside(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for("the server to listen", self._listening)

    def _listening(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Tmux:
    def __init__(self):
        self.socket = f"chatproto-test-{uuid.uuid4().hex[:12]}"

    def run(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", self.socket, "-f", "/dev/null", *args], check=True, capture_output=True, text=True
        ).stdout

    def start(self, name: str, command: str, size: tuple[int, int] = (80, 24)) -> None:
        self.run("new-session", "-d", "-s", name, "-x", str(size[0]), "-y", str(size[1]), command)

    @staticmethod
    def pane(name: str) -> str:
        """The exact session ``name``: a bare "b" may name a window or pane of
        another session, and then keys and screens come from the wrong client."""
        return f"={name}:"

    def keys(self, name: str, *keys: str) -> None:
        self.run("send-keys", "-t", self.pane(name), *keys)

    def type(self, name: str, text: str) -> None:
        self.run("send-keys", "-t", self.pane(name), "-l", text)

    def screen(self, name: str) -> str:
        return self.run("capture-pane", "-p", "-t", self.pane(name))

    def wait(self, name: str, pattern: str, timeout: float = 15.0) -> re.Match:
        try:
            return wait_for(pattern, lambda: re.search(pattern, self.screen(name)), timeout)
        except AssertionError:
            raise AssertionError(f"{pattern!r} never appeared on {name}:\n{self.screen(name)}") from None

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


@pytest.fixture
def world(tmp_path):
    server = Server(free_port(), tmp_path / "server.sqlite3", tmp_path / "server.log")
    tmux = Tmux()
    try:
        server.start()
        yield server, tmux, tmp_path
    finally:
        tmux.kill()
        server.stop()


def client_command(server: Server, data_dir: Path, profile: str, address: str | None = None) -> str:
    return (
        f"cd {installed.outside()} && env LANG=C.UTF-8 LC_ALL=C.UTF-8"
        f" {installed.python()} -m chatproto_tui --server {address or f'127.0.0.1:{server.port}'}"
        f" --data-dir {data_dir} --profile {profile} --no-bell"
    )


def add_contact(tmux: Tmux, name: str, user: str, nick: str) -> None:
    """F2, then each field once the screen shows the one before: keys typed
    ahead of the dialog they are meant for would land elsewhere."""
    tmux.keys(name, "F2")
    tmux.wait(name, r"Add a contact")
    tmux.type(name, user)
    tmux.wait(name, r"Id: *" + user)
    tmux.keys(name, "Enter")
    tmux.type(name, nick)
    tmux.wait(name, r"Nickname: *" + nick)
    tmux.keys(name, "Enter")
    tmux.wait(name, rf"{nick}  \(id {user}")


def test_two_people_talk_ticks_tell_the_truth_and_a_server_restart_loses_nothing(world):
    server, tmux, tmp = world
    tmux.start("a", client_command(server, tmp, "alice"))
    tmux.start("b", client_command(server, tmp, "bob"))
    alice = tmux.wait("a", r"you: (\d{13})  ● connected").group(1)
    bob = tmux.wait("b", r"you: (\d{13})  ● connected").group(1)
    assert alice != bob
    assert (tmp / "alice" / "identity.json").stat().st_mode & 0o777 == 0o600

    # Alice adds Bob and writes; Bob's list shows an unread conversation from her id.
    add_contact(tmux, "a", bob, "Bob")
    tmux.type("a", "hello bob")
    tmux.keys("a", "Enter")
    tmux.wait("b", alice + r" +\(1\)")
    # Delivered (Bob's client acknowledged it), not yet read.
    tmux.wait("a", r"me: hello bob ✓✓")
    assert "✔✔" not in tmux.screen("a")

    # Bob opens the conversation: he sees the text, and Alice sees it read.
    tmux.keys("b", "M-Down")
    tmux.wait("b", alice + ": hello bob")
    tmux.wait("a", r"me: hello bob ✔✔")

    # The server restarts: both clients say so, reconnect by themselves, and messages still flow.
    server.stop()
    # The status line names the server and why it is not connected.
    down = rf"● (cannot connect to |lost )?127\.0\.0\.1:{server.port}:? ?(connection )?(refused|closed)"
    tmux.wait("a", down)
    tmux.type("a", "while you were away")
    tmux.keys("a", "Enter")
    tmux.wait("a", r"me: while you were away ◷")
    server.start()
    tmux.wait("a", r"● connected")
    tmux.wait("b", r"● connected")
    tmux.wait("b", alice + ": while you were away")
    tmux.wait("a", r"me: while you were away ✔✔")

    tmux.type("b", "back at you")
    tmux.keys("b", "Enter")
    tmux.wait("a", r"Bob: back at you")

    # Quitting with nothing unsent asks nothing, and history survives a restart of the client.
    tmux.keys("b", "C-q")
    wait_for("bob's client to exit", lambda: "b" not in tmux.run("list-sessions", "-F", "#S").split())
    tmux.start("b", client_command(server, tmp, "bob"))
    tmux.wait("b", r"● connected")
    tmux.keys("b", "M-Down")
    tmux.wait("b", alice + ": while you were away")
    tmux.wait("b", r"me: back at you ✔✔")


def test_three_people_make_a_group_and_group_ticks_wait_for_everyone(world):
    server, tmux, tmp = world
    ids = {}
    for name in ("a", "b", "c"):
        tmux.start(name, client_command(server, tmp, name))
    for name in ("a", "b", "c"):
        ids[name] = tmux.wait(name, r"you: (\d{13})  ● connected").group(1)
    for who, nick in (("b", "Bob"), ("c", "Carol")):
        add_contact(tmux, "a", ids[who], nick)
    tmux.keys("a", "F3")
    tmux.wait("a", r"Members")
    tmux.wait("a", rf"Bob \({ids['b']}\)[\s\S]*Carol \({ids['c']}\)")
    tmux.type("a", "Trio")
    tmux.keys("a", "Tab", "Space", "Down", "Space", "Enter")
    tmux.wait("a", r"Trio  \(group 1\d{12}\)")
    tmux.type("a", "hi all")
    tmux.keys("a", "Enter")
    for name in ("b", "c"):
        tmux.wait(name, r"Trio +\(1\)")  # the subject, for every member
    tmux.wait("a", r"me: hi all ✓✓")

    tmux.keys("b", "M-Down")
    tmux.wait("b", ids["a"] + ": hi all")
    # Only one of two readers has opened it: not read yet.
    time.sleep(0.3)
    assert "me: hi all ✓✓" in tmux.screen("a") and "✔✔" not in tmux.screen("a")
    tmux.keys("c", "M-Down")
    tmux.wait("c", ids["a"] + ": hi all")
    tmux.wait("a", r"me: hi all ✔✔")

    tmux.type("c", "hey")
    tmux.keys("c", "Enter")
    tmux.wait("a", r"Carol: hey")
    tmux.wait("b", ids["c"] + ": hey")


def sessions(tmux: Tmux) -> list[str]:
    try:
        return tmux.run("list-sessions", "-F", "#S").split()
    except subprocess.CalledProcessError:  # the last session ended, and the tmux server with it
        return []


def test_the_quit_dialog_answers_n_esc_and_y(world):
    server, tmux, tmp = world
    tmux.start("a", client_command(server, tmp, "alice"))
    tmux.wait("a", r"● connected")
    tmux.type("a", "half a thought")
    tmux.wait("a", r"> half a thought")
    tmux.keys("a", "C-q")
    tmux.wait("a", r"Quit anyway\?")
    tmux.keys("a", "n")
    wait_for("the dialog to close on n", lambda: "Quit anyway" not in tmux.screen("a"))
    tmux.keys("a", "C-q")
    tmux.wait("a", r"Quit anyway\?")
    tmux.keys("a", "Escape")
    wait_for("the dialog to close on Esc", lambda: "Quit anyway" not in tmux.screen("a"))
    assert "> half a thought" in tmux.screen("a")
    tmux.keys("a", "C-q")
    tmux.wait("a", r"Quit anyway\?")
    tmux.keys("a", "y")
    wait_for("the client to exit on y", lambda: "a" not in sessions(tmux))


def test_a_flood_into_the_open_conversation_never_takes_the_keyboard_away(world):
    """bench/client_flood.py's run, smaller bounds than its aim (200 ms, 2 s) for a busy CI box."""
    server, tmux, tmp = world
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from client_flood import flood
    finally:
        sys.path.remove(str(ROOT / "bench"))
    result = flood(tmux, server.port, tmp, 2000, (100, 30))
    assert result["errors"] == 0
    assert result["f1_probes"] >= 1 and result["f1_worst_s"] < 1.0, result
    assert result["last_on_screen_after_end_s"] < 3.0, result
    assert result["rate_per_s"] > 500, result


def test_a_bracketed_paste_is_text_even_where_it_holds_keys(world):
    server, tmux, tmp = world
    tmux.start("a", client_command(server, tmp, "alice"))
    tmux.start("b", client_command(server, tmp, "bob"))
    tmux.wait("a", r"● connected")
    bob = tmux.wait("b", r"you: (\d{13})  ● connected").group(1)
    add_contact(tmux, "a", bob, "Bob")
    tmux.run("set-buffer", "?first line\nsecond line")
    tmux.run("paste-buffer", "-p", "-t", tmux.pane("a"))
    tmux.wait("a", r">\s*\?first line\s*\n\s*second line")
    assert "Keys" not in tmux.screen("a")  # the ? opened no help, the line end sent nothing
    tmux.keys("a", "Enter")
    tmux.wait("a", r"me: \?first line")
    # Alt-Down opens the first conversation in the list: wait until there is one.
    tmux.wait("b", r"\d{13} +\(1\)")
    tmux.keys("b", "M-Down")
    tmux.wait("b", r"\?first line\s*\n\s*second line")


def test_an_untrusted_certificate_is_named_on_the_status_line_even_at_40_columns(tmp_path):
    """A TLS server whose self-signed certificate the client was not told to trust: the status
    line says so (at 40 columns too) instead of "reconnecting"; with trustRoots= it connects."""
    from .test_tls import make_certificate

    key, cert = make_certificate(tmp_path)
    port = free_port()
    listen = f"ssl:{port}:privateKey={key}:certKey={cert}:interface=127.0.0.1"
    server = Server(port, tmp_path / "server.sqlite3", tmp_path / "server.log", listen)
    tmux = Tmux()
    try:
        server.start()
        untrusted = f"tls:127.0.0.1:{port}"
        tmux.start("wide", client_command(server, tmp_path, "wide", untrusted), (100, 30))
        tmux.start("narrow", client_command(server, tmp_path, "narrow", untrusted), (40, 12))
        tmux.wait("wide", r"● certificate not trusted: see --server tls:…:trustRoots=, retrying in \d+ s, F5")
        line = tmux.wait("narrow", r"(?m)^ ● certificate not trusted, \d+ s, F5\s*$").group(0)
        assert len(line.rstrip()) <= 40
        assert "connected" not in tmux.screen("wide").splitlines()[0]
        tmux.run("kill-session", "-t", "=wide")
        trusted = f"{untrusted}:trustRoots={Path(cert).parent}"
        tmux.start("wide", client_command(server, tmp_path, "wide", trusted), (100, 30))
        tmux.wait("wide", rf"you: \d{{13}}  ● connected to 127\.0\.0\.1:{port}")
    finally:
        tmux.kill()
        server.stop()


def test_a_group_is_named_added_to_and_left_from_the_keyboard(world):
    """Issue 18 by hand: Alice makes "Trio" with Bob and Carol, adds Dave (who sees the name and
    only later messages), Bob renames it for everyone, Carol (on a 40x12 terminal) leaves."""
    server, tmux, tmp = world
    ids = {}
    for name in ("a", "b", "d"):
        tmux.start(name, client_command(server, tmp, name))
    tmux.start("c", client_command(server, tmp, "c"), (40, 12))
    for name in ("a", "b", "d"):
        ids[name] = tmux.wait(name, r"you: (\d{13})  ● connected").group(1)
    ids["c"] = tmux.wait("c", r"^ (\d{13}) ● connected").group(1)
    for who, nick in (("b", "Bob"), ("c", "Carol"), ("d", "Dave")):
        add_contact(tmux, "a", ids[who], nick)

    tmux.keys("a", "F3")
    tmux.wait("a", rf"Carol \({ids['c']}\)")
    tmux.type("a", "Trio")
    tmux.wait("a", r"Subject \(every member sees it\): Trio")
    tmux.keys("a", "Tab", "Space", "Down", "Space", "Enter")
    tmux.wait("a", r"You named the group “Trio”")
    tmux.wait("a", r"Trio  \(group 1\d{12}\)")
    tmux.wait("b", r"Trio")
    tmux.type("a", "before dave")
    tmux.keys("a", "Enter")
    tmux.wait("b", r"Trio +\(1\)")
    tmux.keys("b", "M-Down")
    tmux.wait("b", ids["a"] + ": before dave")

    # Add Dave: only contacts not in the group are offered.
    tmux.keys("a", "F9")
    tmux.wait("a", rf"Add to Trio[\s\S]*Dave \({ids['d']}\)")
    assert f"Bob ({ids['b']})" not in tmux.screen("a")
    tmux.keys("a", "Space", "Enter")
    tmux.wait("a", r"Dave was added by you")
    tmux.wait("b", ids["d"] + " was added")
    tmux.type("a", "welcome dave")
    tmux.keys("a", "Enter")
    tmux.wait("d", r"Trio +\(1\)")
    tmux.keys("d", "M-Down")
    tmux.wait("d", ids["a"] + r": welcome dave")
    assert ids["a"] + " named the group “Trio”" in tmux.screen("d")
    assert "before dave" not in tmux.screen("d")

    # Bob renames it for everyone.
    tmux.wait("b", ids["a"] + r": welcome dave")
    tmux.keys("b", "F8")
    tmux.wait("b", r"Subject:  Trio")
    tmux.keys("b", "C-u")
    tmux.type("b", "Quartet")
    tmux.wait("b", r"Subject:  Quartet")
    tmux.keys("b", "Enter", "Enter")
    tmux.wait("b", r"You named the group “Quartet”")
    tmux.wait("a", r"Bob named the group “Quartet”")
    tmux.wait("a", r"Quartet  \(group 1\d{12}\)")
    tmux.wait("d", r"Quartet  \(group 1\d{12}\)")

    # Carol leaves: the confirmation answers n and Esc, then y.
    tmux.keys("c", "M-Down")
    tmux.wait("c", r"Quartet  \(group")
    for answer in ("n", "Escape"):
        tmux.keys("c", "M-x")
        tmux.wait("c", r"Leave the group\?")
        tmux.keys("c", answer)
        wait_for(f"the dialog to close on {answer}", lambda: "Leave the group?" not in tmux.screen("c"))
    tmux.keys("c", "M-x")
    tmux.wait("c", r"y: leave")
    tmux.keys("c", "y")
    tmux.wait("c", r"you left  \(group")
    tmux.wait("c", r"you left the group >")
    tmux.wait("a", r"Carol left")
    tmux.wait("d", ids["c"] + " left")

    # Carol gets nothing more from the group: Alice's next group message reaches Bob, and a
    # direct message Alice sends after it reaches Carol without the group's before it.
    tmux.type("a", "after carol")
    tmux.keys("a", "Enter")
    tmux.wait("b", ids["a"] + ": after carol")

    def open_one() -> str:
        return re.search(r"\n▸ (\w+)", tmux.screen("a")).group(1)

    for _ in range(4):  # Alt-Down through the list until Carol's conversation is the open one
        before = open_one()
        if before == "Carol":
            break
        tmux.keys("a", "M-Down")
        wait_for("the next conversation", lambda before=before: open_one() != before)
    tmux.wait("a", r"Carol  \(id")
    tmux.type("a", "direct to carol")
    tmux.keys("a", "Enter")
    tmux.wait("a", r"me: direct to carol ✓✓")  # Carol's client has it: Alt-A finds it unread
    tmux.keys("c", "M-a")
    tmux.wait("c", ids["a"] + ": direct to carol")
    tmux.keys("c", "M-Up")
    tmux.wait("c", r"Quartet  you left")
    assert "after carol" not in tmux.screen("c")
    tmux.type("c", "still here?")
    tmux.keys("c", "Enter")
    tmux.wait("c", r"nothing can be")
