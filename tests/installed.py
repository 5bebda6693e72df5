"""The checkout as a user gets it: ``pip install .`` into a venv made once per run.

Real-process tests run the server, the admin command and the client from
here, in a directory outside the checkout, so that a file missing from the
package (a schema, the plugin) fails them. The venv reuses the running
environment's dependencies (a .pth file) and installs chatproto alone, so it
costs one build, not a download of Twisted.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import site
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@functools.cache
def _venv() -> Path:
    root = Path(tempfile.mkdtemp(prefix="chatproto-installed-"))
    atexit.register(shutil.rmtree, root, True)
    venv.EnvBuilder(with_pip=True).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    (purelib,) = (
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()
    )
    # The running environment's packages, after the venv's own: chatproto comes from the venv.
    outer = [p for p in site.getsitepackages() if Path(p).is_dir()]
    Path(purelib, "_chatproto_test_deps.pth").write_text("\n".join(outer) + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", str(REPO)],
        check=True,
        cwd=root,
    )
    (root / "work").mkdir()
    return root


def python() -> str:
    """The installed venv's interpreter."""
    return str(_venv() / "venv" / "bin" / "python")


def script(name: str) -> str:
    """A console script of the installed package (chat-client, chatproto-admin)."""
    return str(_venv() / "venv" / "bin" / name)


def outside() -> Path:
    """A directory outside the checkout, to run the installed package from."""
    return _venv() / "work"


def running_installed() -> bool:
    """Whether ``python()`` imports chatproto from the venv (the check the suite relies on)."""
    out = subprocess.run(
        [python(), "-c", "import chatproto; print(chatproto.__file__)"],
        cwd=outside(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.startswith(str(_venv())) and sys.prefix not in out
