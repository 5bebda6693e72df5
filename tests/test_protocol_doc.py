"""docs/protocol.md against the code: its tables, every example frame, and
the by-hand session, so the page can never drift from chatproto.wire.

An example is a ```frame block: one line of fields separated by single
spaces (MSG last, so it takes the rest of the line), with ``\\0×N`` for N
NULs and ``\\xNN`` for a raw byte, then ``(N bytes)``. Each is rebuilt with
the encoder in chatproto.wire named after its code and must come out the
same, byte for byte.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from chatproto import wire

from . import installed

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "protocol.md"

ALL_CODES = [b"%02d" % i for i in range(1, 22)]
REASONS = [b"%02d" % i for i in range(1, 12)]

#: The encoder of each code, called with the fields of its layout after COD
#: (MEMBER×N as one list, N itself left out: the encoder counts).
ENCODERS = {
    b"01": wire.register,
    b"02": wire.registered,
    b"03": wire.online,
    b"04": wire.online_ok,
    b"05": wire.send,
    b"06": wire.message,
    b"07": wire.delivered,
    b"08": wire.seen,
    b"09": wire.seen_by,
    b"10": wire.create_group,
    b"11": wire.added_to_group,
    b"12": wire.error,
    b"13": wire.register_secret,
    b"14": wire.registered_secret,
    b"15": wire.online_secret,
    b"16": wire.received,
    b"17": wire.set_subject,
    b"18": wire.subject,
    b"19": wire.add_members,
    b"20": wire.leave_group,
    b"21": wire.left_group,
}

#: The fields that take the rest of an example's line (text, spaces included).
TEXT_FIELDS = ("MSG", "NAME")


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/protocol.md has no section {title!r}"
    return match.group(1)


def table(body: str) -> list[list[str]]:
    """The rows of the first Markdown table in ``body``, cells stripped, header and rule left out."""
    rows = []
    for line in body.splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    assert len(rows) > 2, "no table found"
    return rows[2:]


def field_widths() -> dict[str, int]:
    widths = {}
    for names, width, _ in table(section(doc_text(), "Fields")):
        for name in names.split(","):
            widths[name.strip()] = int(width)
    return widths


def frame_table() -> dict[bytes, tuple[str, str, list[str], str]]:
    """Code → (direction, name, layout fields, bytes column) from the Frames table."""
    frames = {}
    for code, direction, name, layout, size in table(section(doc_text(), "Frames")):
        frames[code.encode()] = (direction, name, layout.strip("`").split(), size)
    return frames


def unescape(line: str) -> bytes:
    r"""The bytes an example line stands for: ``\0×N`` is N NULs, ``\xNN`` one byte."""
    out = bytearray()
    at = 0
    for match in re.finditer(r"\\0×(\d+)|\\x([0-9a-f]{2})", line):
        out += line[at : match.start()].encode("utf-8")
        if match.group(1) is not None:
            out += b"\0" * int(match.group(1))
        else:
            out.append(int(match.group(2), 16))
        at = match.end()
    out += line[at:].encode("utf-8")
    return bytes(out)


def examples() -> list[tuple[str, bytes, int]]:
    """Every ```frame block: (its line as written, its bytes with the spaces, its stated length)."""
    found = []
    for block in re.findall(r"^```frame\n(.*?)^```$", doc_text(), re.M | re.S):
        lines = block.splitlines()
        assert len(lines) == 2, f"a frame block is one frame and its length: {block!r}"
        count = re.fullmatch(r"\((\d+) bytes\)", lines[1])
        assert count, f"second line must be '(N bytes)': {lines[1]!r}"
        found.append((lines[0], unescape(lines[0]), int(count.group(1))))
    return found


def parse(spaced: bytes, layout: list[str], widths: dict[str, int]) -> tuple[bytes, dict[str, object]]:
    """Split an example along its layout: the wire bytes, and each field's value."""
    fields: dict[str, object] = {}
    wire_bytes = b""
    at = 0
    for i, name in enumerate(layout):
        if i:
            assert spaced[at : at + 1] == b" ", f"expected one space before {name} at {at}: {spaced!r}"
            at += 1
        if name in TEXT_FIELDS:
            value = spaced[at:]
            at = len(spaced)
        elif name == "MEMBER×N":
            members = []
            for k in range(int(fields["N"])):
                if k:
                    assert spaced[at : at + 1] == b" ", spaced
                    at += 1
                members.append(spaced[at : at + widths["MEMBER"]])
                at += widths["MEMBER"]
            fields[name] = members
            wire_bytes += b"".join(members)
            continue
        else:
            value = spaced[at : at + widths[name]]
            at += widths[name]
        assert len(value) == widths[name], f"{name} is {len(value)} bytes, not {widths[name]}: {value!r}"
        fields[name] = value
        wire_bytes += value
    assert at == len(spaced), f"left over after the last field: {spaced[at:]!r}"
    return wire_bytes, fields


# -- the tables ----------------------------------------------------------------


def test_field_widths_are_the_codes_widths():
    widths = field_widths()
    assert widths == {
        "COD": 2,
        "ID": wire.ID_LEN,
        "SRC": wire.ID_LEN,
        "DST": wire.ID_LEN,
        "GROUP": wire.ID_LEN,
        "MEMBER": wire.ID_LEN,
        "TIMESTAMP": wire.TS_LEN,
        "MSG": wire.MSG_LEN,
        "N": wire.N_LEN,
        "REF": 2,
        "REASON": 2,
        "SECRET": wire.SECRET_LEN,
        "NAME": wire.NAME_LEN,
    }


def test_frame_table_matches_the_codes_lengths_and_directions():
    widths = field_widths()
    frames = frame_table()
    assert sorted(frames) == ALL_CODES
    for code, (direction, _, layout, size) in frames.items():
        assert layout[0] == "COD"
        fixed = sum(widths[name] for name in layout if name != "MEMBER×N")
        if direction == "C→S":
            lengths = wire.CLIENT_FRAME_LEN
        else:
            assert direction == "S→C", direction
            lengths = wire.SERVER_FRAME_LEN
        assert code in lengths, f"{code} is {direction} in the doc, not in the code"
        assert lengths[code] == fixed, code
        if code in wire.VARIABLE_LEN:
            assert layout[-1] == "MEMBER×N"
            assert size == f"{fixed} + {widths['MEMBER']}·N" == f"{wire.VARIABLE_LEN[code]} + {wire.ID_LEN}·N"
        else:
            assert "MEMBER×N" not in layout
            assert int(size) == fixed
    assert {c for c, row in frames.items() if row[0] == "C→S"} == set(wire.CLIENT_FRAME_LEN)
    assert {c for c, row in frames.items() if row[0] == "S→C"} == set(wire.SERVER_FRAME_LEN)


def test_reason_table_lists_every_reason_in_order():
    rows = table(doc_text().split("### 12 error", 1)[1])
    assert [row[0].encode() for row in rows] == REASONS == sorted(wire.REASON_TEXT)


# -- the examples --------------------------------------------------------------


def check_fields(code: bytes, fields: dict[str, object]) -> None:
    """Each field holds what the contract says it may, for this code."""
    user_fields = {"ID"} | (
        {"SRC"} if code in (b"05", b"06", b"10", b"16", b"17", b"18", b"19", b"20") else set()
    )
    for name, value in fields.items():
        if name in ("ID", "SRC", "DST", "GROUP"):
            assert wire.is_id(value), (name, value)
            if name in user_fields:
                assert wire.is_user_id(value), f"{name} of a {code} must be a user: {value!r}"
            if name == "GROUP":
                assert wire.is_group_id(value), value
            if code == b"16" and name == "DST":
                assert wire.is_user_id(value), "a 16 names a message sent to its own user"
        elif name == "MEMBER×N":
            assert all(map(wire.is_user_id, value)), value
            assert len(set(value)) == len(value) or code in (b"10", b"19"), (
                f"an 11 lists each member once: {value}"
            )
        elif name == "TIMESTAMP":
            assert wire.is_timestamp(value), value
        elif name == "N":
            assert value.isdigit() and 1 <= int(value) <= wire.MAX_MEMBERS, value
            assert int(value) == len(fields["MEMBER×N"])
        elif name == "MSG":
            text = wire.unpad_text(value)
            assert text is not None, f"the text of an example must be well-formed: {value!r}"
            assert value == wire.pad_text(text)
        elif name == "NAME":
            name_text = wire.unpad_name(value)
            assert name_text is not None, f"the NAME of an example must be well-formed: {value!r}"
            assert value == wire.pad_name(name_text)
        elif name == "SECRET":
            assert wire.is_secret(value), value
        elif name == "REASON":
            assert value in wire.REASON_TEXT, value
        elif name == "REF":
            reason = fields["REASON"]
            if reason == wire.UNKNOWN_CODE:
                assert value not in wire.CLIENT_FRAME_LEN, "12 REF 02 is for a code the server refuses"
            elif reason == wire.BUSY:
                assert value == b"00", "a refused connection's 12 answers no frame"
            else:
                assert value in wire.CLIENT_FRAME_LEN, f"REF {value!r} is not a client's frame"


def test_every_example_is_what_the_encoder_writes():
    widths = field_widths()
    frames = frame_table()
    found = examples()
    assert found, "no examples found"
    for line, spaced, stated in found:
        code = spaced[:2]
        assert code in frames, f"unknown code in {line!r}"
        direction, _, layout, _ = frames[code]
        wire_bytes, fields = parse(spaced, layout, widths)
        assert len(wire_bytes) == stated, f"{line!r} is {len(wire_bytes)} bytes, not {stated}"
        args = [value for name, value in fields.items() if name not in ("COD", "N")]
        assert ENCODERS[code](*args) == wire_bytes, line
        check_fields(code, fields)
        # A receiver on the right side of the connection frames it as one whole frame.
        lengths = wire.CLIENT_FRAME_LEN if direction == "C→S" else wire.SERVER_FRAME_LEN
        assert wire.split_frames(lengths, wire_bytes) == ([wire_bytes], b"", 0), line


def test_examples_cover_every_frame_both_group_sizes_and_every_reason():
    seen_codes = set()
    group_sizes = set()
    reasons = set()
    for _, spaced, _ in examples():
        code = spaced[:2]
        seen_codes.add(code)
        if code in wire.VARIABLE_LEN:
            group_sizes.add((code, spaced.split(b" ")[4 if code == wire.ADD_MEMBERS else 3]))
        if code == wire.ERROR:
            reasons.add(spaced.split(b" ")[-1])
    assert sorted(seen_codes) == ALL_CODES
    assert {(b"10", b"02"), (b"11", b"02"), (b"19", b"02")} <= group_sizes
    assert sorted(reasons) == REASONS


def test_unknown_code_examples_are_refused_by_the_server_framing():
    """Each 12 XX 02 example names bytes the server cannot frame."""
    refs = [spaced[3:-3] for _, spaced, _ in examples() if spaced[:2] == b"12" and spaced.endswith(b" 02")]
    assert refs
    for ref in refs:
        assert wire.split_frames(wire.CLIENT_FRAME_LEN, ref + b"0" * 60) == ([], ref + b"0" * 60, -1)


def test_choices_section_names_each_decision():
    body = section(doc_text(), "Choices this server makes")
    for needed in (
        "`12 XX 02`",
        "`12 10 01`",
        "`12 03 09`",
        "`12 15 08`",
        "`12 03 08`",
        "`12 08 06`",
        "`12 08 07`",
        "SHA-256",
        "constant time",
        "creator first",
        "Messages to oneself",
        "`09 GROUP LOWMARK`",
        "TCP send buffer",
        "`12 19 01`",
        "comes last",
        "lists the members of its moment",
        "A group everyone left",
    ):
        assert needed in body, f"the choices section no longer says {needed}"


# -- the by-hand session, against a real server ---------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def by_hand_script(port: int) -> str:
    body = section(doc_text(), "Talking to the server by hand")
    (script,) = re.findall(r"^```python\n(.*?)^```$", body, re.M | re.S)
    line = 'HOST, PORT = "127.0.0.1", 7000\n'
    assert line in script, "the session must start from HOST and PORT"
    return script.replace(line, f'HOST, PORT = "127.0.0.1", {port}\n')


def test_by_hand_session_works_against_a_real_server(tmp_path):
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log, start(port, tmp_path, log) as server:
        wait_listening(port, server, log_path)
        run = subprocess.run(
            [installed.python(), "-c", by_hand_script(port)], capture_output=True, text=True, timeout=30
        )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert re.fullmatch(r"alice is 0\d{12} and bob is 0\d{12}", lines[0]), lines
    assert lines[1:] == ["bob got: hello, bob", "alice: delivered", "alice: seen by bob"]


@contextmanager
def start(port: int, tmp_path: Path, log):
    """``twist chat`` from this checkout on a loopback port, stopped afterwards."""
    server = subprocess.Popen(
        [installed.python(), "-m", "twisted", "chat", "--port", f"tcp:{port}:interface=127.0.0.1"]
        + ["--db", str(tmp_path / "chat.sqlite3")],
        cwd=installed.outside(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield server
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def wait_listening(port: int, server: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            assert server.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the server did not start listening"
            time.sleep(0.1)


@pytest.mark.parametrize(
    ("line", "expected"),
    [("05 x \\0×3y", b"05 x \0\0\0y"), ("12 \\xde\\xad 02", b"12 \xde\xad 02"), ("grüße", "grüße".encode())],
)
def test_unescape_reads_the_notation(line, expected):
    assert unescape(line) == expected
