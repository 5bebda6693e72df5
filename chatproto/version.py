"""chatproto's version, from one place: the installed package's metadata."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version


def chatproto_version() -> str:
    """The version in pyproject.toml, as installed; ``unknown`` when run from a tree never installed."""
    try:
        return version("chatproto")
    except PackageNotFoundError:
        return "unknown"


def twisted_version() -> str:
    from twisted import __version__

    return __version__


def describe() -> str:
    """What ``--version`` prints: ``chatproto 0.1.0 (Twisted 26.10.0, Python 3.11.7)``."""
    python = platform.python_version()
    return f"chatproto {chatproto_version()} (Twisted {twisted_version()}, Python {python})"
