"""The maps a newcomer reads first stay whole: the README's option table has a
row, with its default and reason, for every option ``twist chat --help`` shows,
and docs/architecture.md's module table names every module of the server and
the client."""

from __future__ import annotations

from pathlib import Path

from chatproto.service import Options

ROOT = Path(__file__).resolve().parent.parent


def _table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of each row of the markdown table whose header row starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_the_readme_option_table_gives_every_option_its_default_and_reason():
    rows = _table_rows((ROOT / "README.md").read_text(), "| option | default |")
    for opt in Options.optParameters + Options.optFlags:
        name = f"`--{opt[0]}"
        row = next((r for r in rows if name + "`" in r[0] or name + " " in r[0]), None)
        assert row is not None, f"--{opt[0]} has no row in the README's option table"
        assert row[1] or opt in Options.optFlags, f"--{opt[0]}: no default"
        assert row[3], f"--{opt[0]}: no reason for its default"


def test_the_architecture_module_table_names_every_module():
    rows = _table_rows((ROOT / "docs" / "architecture.md").read_text(), "| module |")
    named = {row[0].strip("`") for row in rows}
    modules = [
        path.relative_to(ROOT).as_posix()
        for path in sorted((ROOT / "chatproto").rglob("*.py"))
        if path.name != "__init__.py" or path.parent.name == "domain"
    ]
    for module in modules:
        folder = module.rsplit("/", 1)[0] + "/"
        assert module in named or folder in named, f"{module} is not in architecture.md's module table"
    assert "clients/chatproto_tui/" in named
