"""The package as an administrator installs it: a wheel with every module,
the plugin and the schemas; installed into a fresh virtualenv, it runs
``twist chat``; the plugin cache, written once by the installer as the docs
say, lets a service user start it without an error; and the editable
install the README gives works for development."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from .test_e2e_server import REPO

#: What docs/operations.md has the installer (root) run after each install or upgrade.
REGENERATE_PLUGIN_CACHE = "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"


NOT_SOURCE = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", ".*cache", "__pycache__")


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("timeout", 300)
    done = subprocess.run(list(args), capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{args} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the tree, so the build leaves nothing (build/, *.egg-info) in the repository.
    src = out / "src"
    shutil.copytree(
        REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", ".*cache")
    )
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src))
    (built,) = out.glob("chatproto-*.whl")
    return built


def test_the_wheel_holds_every_module_the_plugin_and_the_schemas(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tree = {
        str(p.relative_to(REPO))
        for p in (REPO / "chatproto").rglob("*")
        if p.suffix in (".py", ".sql") and "__pycache__" not in p.parts
    }
    tree |= {
        "chatproto_tui/" + str(p.relative_to(REPO / "clients" / "chatproto_tui"))
        for p in (REPO / "clients" / "chatproto_tui").rglob("*.py")
    }
    assert tree <= names, sorted(tree - names)
    assert "twisted/plugins/chatproto_plugin.py" in names
    assert "twisted/plugins/__init__.py" not in names, "it would hide Twisted's own plugins"
    assert not [n for n in names if "__pycache__" in n or n.startswith(("tests/", "bench/", "docs/"))]
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "License-Expression: MIT" in text
    assert "Provides-Extra: tls" in text and "Provides-Extra: postgres" in text
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_the_declared_metadata_is_pep_621_alone():
    assert not (REPO / "setup.cfg").exists() and not (REPO / "setup.py").exists()
    tomllib = __import__("tomllib" if sys.version_info >= (3, 11) else "tomli")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert {"name", "version", "dependencies", "requires-python", "classifiers", "license"} <= set(project)


@pytest.fixture(scope="module")
def venv():
    """A fresh virtualenv any user can read (pytest's own tmp dirs are root's alone)."""
    where = Path(tempfile.mkdtemp(prefix="chatproto-venv-", dir="/tmp"))
    os.chmod(where, 0o755)
    run(sys.executable, "-m", "venv", str(where))
    yield where
    shutil.rmtree(where, ignore_errors=True)


def test_a_wheel_install_runs_and_a_service_user_starts_it_without_a_cache_error(wheel, venv, tmp_path):
    py = str(venv / "bin" / "python")
    run(py, "-m", "pip", "install", "-q", str(wheel))
    out = run(str(venv / "bin" / "twist"), "chat", "--version", cwd=tmp_path).stdout
    assert out.startswith("chatproto 0.1.0 (Twisted "), out
    assert run(str(venv / "bin" / "chatproto-admin"), "--version").stdout.startswith("chatproto 0.1.0")
    plugins = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    plugins = plugins / "site-packages" / "twisted" / "plugins"
    assert (plugins / "chatproto_plugin.py").exists()
    if os.geteuid() != 0:
        return  # the rest needs another user to be
    (plugins / "dropin.cache").unlink(missing_ok=True)
    # Without the installer's step, the service user cannot write the cache and says so:
    assert "Unable to write to plugin cache" in start_as_nobody(venv)
    # The installer (root) writes it once, as docs/operations.md says; then the start is quiet.
    run(py, "-c", REGENERATE_PLUGIN_CACHE)
    log = start_as_nobody(venv)
    assert "plugin cache" not in log and "Traceback" not in log, log


def start_as_nobody(venv: Path) -> str:
    """Start the installed server as an unprivileged user, stop it once it listens; its log."""
    proc = subprocess.Popen(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
        + [str(venv / "bin" / "twist"), "--log-format=text", "chat"]
        + ["--port", "tcp:0:interface=127.0.0.1", "--db", ":memory:"],
        cwd="/",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "chatproto listening on" in line:
                break
        proc.send_signal(signal.SIGTERM)
        lines.extend(proc.stdout)
    finally:
        proc.kill()
        proc.wait(30)
    log = "".join(lines)
    assert "chatproto listening on" in log, log
    return log


def test_the_readme_editable_install_finds_the_plugin_and_the_client(venv, tmp_path):
    command = "pip install -e . --config-settings editable_mode=strict"
    assert command in (REPO / "README.md").read_text()
    src = tmp_path / "src"
    shutil.copytree(
        REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", ".*cache")
    )
    py = str(venv / "bin" / "python")
    run(py, "-m", *command.split(), cwd=src)
    out = run(str(venv / "bin" / "twist"), "chat", "--version", cwd=tmp_path).stdout
    assert out.startswith("chatproto 0.1.0"), out
    imports = "import chatproto, chatproto_tui; print(chatproto.__file__, chatproto_tui.__file__)"
    where = run(py, "-c", imports, cwd=tmp_path)
    # Each module is a link to the tree: an edit shows without reinstalling.
    for path in where.stdout.split():
        assert Path(path).resolve().is_relative_to(src), path
