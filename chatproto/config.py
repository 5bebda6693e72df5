"""The server's settings: their types, the ``--config`` file, and their checks.

Every option of ``twist chat`` can also be set in a TOML file named by
``--config`` (read with the standard library's ``tomllib``), under the same
name without its dashes: ``port = "tcp:7000"``, ``max-held = 50000``,
``require-secrets = true``. A value given on the command line wins over the
file's, and the file's over the default. Every value, from either place, is
checked before anything starts, and a bad one is a ``ConfigError``: one line
that names the setting and the value.
"""

from __future__ import annotations

import sys
from urllib.parse import urlsplit

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, from PyPI, before it joined the standard library
    import tomli as tomllib

from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor


class ConfigError(Exception):
    """A setting that cannot be used; its message is the one line to print."""


def endpoint_description(value: str) -> str:
    """A bare port number is shorthand for a TCP endpoint on every interface."""
    return f"tcp:{value}" if value.isdigit() else value


def check_endpoint(where: str, value: str) -> str:
    """``value`` as an endpoint string that ``serverFromString`` accepts.

    It is parsed against a reactor that listens on nothing, so every mistake
    a parser can see (an unknown type, a port that is not a number, an ``ssl:``
    key file that is missing, a ``systemd:`` index that systemd did not pass)
    is found here, before the store opens. That the address is free is only
    known when the server listens (``chatproto.startup``).
    """
    description = endpoint_description(value)
    try:
        serverFromString(MemoryReactor(), description)
    except ImportError as e:
        raise ConfigError(
            f"{where} {value}: TLS needs pyOpenSSL and service-identity: pip install 'chatproto[tls]' ({e})"
        ) from None
    except IndexError:
        raise ConfigError(f"{where} {value}: systemd passed no socket at that index") from None
    except Exception as e:
        reason = _one_line(e)
        host, _, port = value.rpartition(":")
        if "Unknown endpoint type" in reason and port.isdigit() and host and ":" not in host:
            reason += f" (for an address: tcp:{port}:interface={host})"
        raise ConfigError(f"{where} {value}: not an endpoint this server can listen on: {reason}") from None
    return description


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text.rstrip(".")


def _number(kind):
    name = "a whole number" if kind is int else "a number"

    def coerce(value):
        if isinstance(value, bool):
            raise ValueError(f"not {name}")
        if isinstance(value, str):
            try:
                value = kind(value.strip())
            except ValueError:
                raise ValueError(f"not {name}") from None
        elif kind is int and isinstance(value, float):
            raise ValueError(f"not {name}")
        elif not isinstance(value, (int, float)):
            raise ValueError(f"not {name}")
        value = kind(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"not {name}")
        if value < 0:
            raise ValueError("must not be negative")
        return value

    return coerce


#: The units a duration may be written in, in seconds.
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(value) -> int:
    """Whole seconds from a duration: ``30d``, ``12h``, ``90m``, ``45s``, ``2w``, or bare seconds."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError("not a duration (e.g. 30d, 12h, 90m, 45s, or seconds)")
    text = str(value).strip().lower()
    unit = _UNITS.get(text[-1:], None)
    number = text[:-1] if unit else text
    if not number.isdigit():
        raise ValueError("not a duration (e.g. 30d, 12h, 90m, 45s, or seconds)")
    return int(number) * (unit or 1)


def _text(value):
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError("not a string")
    return str(value)


def _networks(value):
    """Addresses or networks, comma-separated in a string or listed in TOML; "" for none."""
    from .admission import parse_trusted

    if isinstance(value, list):
        value = ",".join(map(str, value))
    value = _text(value)
    items = [item.strip() for item in value.split(",") if item.strip()]
    parse_trusted(items)
    return ",".join(items)


def _flag(value):
    if not isinstance(value, bool):
        raise ValueError("not true or false")
    return value


#: What each setting holds. The defaults and help texts are in chatproto.service.Options.
KINDS = {
    "port": _text,
    "db": _text,
    "metrics": _text,
    "shutdown-timeout": _number(float),
    "max-frame-rate": _number(float),
    "frame-burst": _number(float),
    "max-connections": _number(int),
    "max-held": _number(int),
    "login-timeout": _number(float),
    "max-buffer": _number(int),
    "require-secrets": _flag,
    "dedup-window": duration,
    "keep-delivered": duration,
    "expire-held": duration,
    "trusted": _networks,
    "max-address-connections": _number(int),
    "address-connect-rate": _number(float),
    "address-frame-rate": _number(float),
    "address-frame-burst": _number(float),
    "registrations-per-hour": _number(int),
    "group-changes-per-hour": _number(int),
    "max-groups-per-user": _number(int),
    "max-login-delay": _number(float),
}


def load(path: str) -> dict:
    """The settings in the TOML file at ``path``, checked for names and types."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML: {_one_line(e)}") from None
    settings = {}
    for name, value in data.items():
        if name == "config":
            raise ConfigError(f"--config {path}: a config file cannot name another one")
        if name not in KINDS:
            known = ", ".join(sorted(KINDS))
            raise ConfigError(f"--config {path}: unknown setting {name!r} (known: {known})")
        try:
            settings[name] = KINDS[name](value)
        except ValueError as e:
            raise ConfigError(f"--config {path}: {name} = {value!r}: {e}") from None
    return settings


def settle(given: dict, path: str | None, defaults: dict) -> dict:
    """Every setting's value: from the command line (``given``), else the file, else the default.

    ``given`` holds the command line's values as typed (strings, or True for
    a flag); each is checked as the file's are.
    """
    from_file = load(path) if path else {}
    settled = {}
    for name, kind in KINDS.items():
        if name in given:
            try:
                settled[name] = kind(given[name])
            except ValueError as e:
                raise ConfigError(f"--{name} {given[name]}: {e}") from None
            where = f"--{name}"
        elif name in from_file:
            settled[name] = from_file[name]
            where = f"--config {path}: {name} ="
        else:
            settled[name] = defaults[name]
            where = f"--{name}"
        if name in ("port", "metrics") and settled[name] is not None:
            settled[name] = check_endpoint(where, settled[name])
    return settled


def password_in_url(db: str) -> bool:
    """Whether a postgresql:// URL carries its password (which ``ps`` would show)."""
    if not db.startswith(("postgresql://", "postgres://")):
        return False
    try:
        return urlsplit(db).password is not None
    except ValueError:
        return False


def redact(db: str) -> str:
    """``db`` fit to print: a postgresql:// URL's password replaced by ``***``."""
    if not password_in_url(db):
        return db
    parts = urlsplit(db)
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()
