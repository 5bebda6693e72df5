"""How ``twist chat`` starts, fails, and answers SIGHUP, as a service manager expects.

The plugin names this module: its ``Options`` are the service's, and its
``makeService`` builds the service with ``chatproto.service.makeService``
and adds what an administrator's habits need around it:

- **A failed start is one line and exit status 1**, never a traceback, a
  hang, or a status of 0 that ``Restart=on-failure`` would take for a clean
  stop. A setting that cannot be used is caught by ``Options.postOptions``
  (``chatproto.config``); a database that cannot be opened or used, here;
  an address already in use (or anything else that fails once the reactor
  runs), by ``abort``, which stops the reactor so the store closes cleanly,
  then exits with status 1.
- **SIGHUP reopens the log file** given to ``twist --log-file``, so that
  ``logrotate`` can move it away and signal the server (contrib/logrotate).
  Without this, SIGHUP's default action kills the process.
- **A new SQLite database is created readable by its owner alone** (0600),
  whatever the umask: it holds every message and every secret's hash.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import threading

from twisted.application.service import MultiService, Service
from twisted.internet.defer import maybeDeferred
from twisted.internet.error import CannotListenError, ReactorNotRunning
from twisted.logger import Logger

from . import config, service
from .service import Options  # noqa: F401 - twist reads the plugin's Options from this module
from .store import SchemaError, StoreUnavailable

log = Logger(namespace="chatproto.startup")


class StartupError(Exception):
    """A step of the start that failed, in one line naming what and with what value."""


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def say(line: str) -> None:
    """``line`` on the process's standard error (twist points ``sys.stderr`` at the log once it runs)."""
    stream = sys.__stderr__ or sys.stderr
    stream.write(one_line(line) + "\n")
    stream.flush()


def fail(line: str) -> None:
    """Say ``line`` and exit with status 1, from before the reactor runs."""
    say(line)
    if threading.active_count() > 1:
        # A thread the failed step had started would keep the process alive.
        sys.stdout.flush()
        os._exit(1)
    raise SystemExit(1)


def create_private(db: str) -> None:
    """Create a missing SQLite file as 0600, so SQLite (which gives its -wal and
    -shm files the database's mode) never makes it readable by others."""
    if db == ":memory:" or db.startswith("file:") or service.is_postgres_url(db):
        return
    try:
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        pass  # it exists, or cannot be made: SQLite says which, with the path (below)


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    db = options["db"]
    create_private(db)
    try:
        chat = service.makeService(options, reactor)
    except SystemExit as e:
        if isinstance(e.code, str):
            fail(config.redact(e.code))
        raise
    except (SchemaError, StoreUnavailable) as e:
        fail(f"chatproto: {config.redact(str(e))}")
    except (sqlite3.Error, OSError) as e:
        fail(f"chatproto: cannot open the database --db {db}: {e}")
    top = MultiService()
    Hangup(reactor, _log_file(options)).setServiceParent(top)
    chat.setServiceParent(top)
    return top


# -- failures once the reactor runs ------------------------------------------------------


def step(option: str, f, *args):
    """``f(*args)``, a step of the start; its failure becomes a StartupError naming ``option``."""

    def failed(failure):
        reason = describe(failure)
        if reason is None:
            return failure
        raise StartupError(f"{option}: {reason}")

    return maybeDeferred(f, *args).addErrback(failed)


class ListeningService(Service):
    """Listens on ``endpoint`` with ``factory`` when started; a failure is ``abort``.

    What ``StreamServerEndpointService`` does, except that a port already in
    use (or any other failure to listen) stops the server with one line and
    exit status 1, where that service only logs a traceback and leaves the
    process running, listening on nothing. ``option`` names the setting in
    that line (``--port``, ``--metrics``).
    """

    def __init__(
        self, reactor, option: str, endpoint, factory, announce="listening for {option} on {address}"
    ):
        self._reactor = reactor
        self._announce = announce
        self.option = option
        self.endpoint = endpoint
        self.factory = factory
        self.port = None

    def startService(self):
        super().startService()
        d = step(self.option, self.endpoint.listen, self.factory)
        d.addCallbacks(self._listening, lambda failure: abort(self._reactor, failure))
        return d

    def _listening(self, port):
        self.port = port
        log.info(self._announce, option=self.option, address=port.getHost())
        return port

    def stopService(self):
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()


def describe(failure) -> str | None:
    """The one line for a failure an administrator can fix; None for a bug."""
    e = failure.value
    if isinstance(e, StartupError):
        return str(e)
    if isinstance(e, CannotListenError):
        where = f"{e.interface or '*'}:{e.port}" if isinstance(e.port, int) else str(e.port)
        why = getattr(e.socketError, "strerror", None) or one_line(e.socketError)
        return f"cannot listen on {where}: {why}"
    if isinstance(e, OSError) and e.strerror:
        where = e.filename2 if e.filename2 is not None else e.filename
        if isinstance(where, bytes):
            where = where.decode(errors="replace")
        return f"{e.strerror}: {where}" if where is not None else e.strerror
    if isinstance(e, (SchemaError, StoreUnavailable, sqlite3.Error, OSError)):
        return config.redact(one_line(e))
    return None


def abort(reactor, failure) -> None:
    """The start failed: stop the reactor (the store closes as at any stop), then exit 1."""
    reason = describe(failure)
    if reason is None:
        log.failure("chatproto could not start", failure)
        reason = f"could not start: {one_line(failure.getErrorMessage())} (a bug: the log has the traceback)"
    else:
        log.error("chatproto could not start: {reason}", reason=reason)
    say(f"chatproto: {reason}")
    reactor.addSystemEventTrigger("after", "shutdown", _exit, 1)
    if reactor.running:
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass  # already stopping
    else:
        reactor.callWhenRunning(reactor.stop)


def _exit(status: int) -> None:
    """twist itself would exit 0 once the reactor stops; a failed start must not."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    os._exit(status)


# -- SIGHUP ---------------------------------------------------------------------------


def _log_file(options):
    """The file ``twist --log-file`` opened, if it did (options.parent is twist's own)."""
    parent = getattr(options, "parent", None)
    if parent is None:
        return None
    try:
        return parent["logFile"]
    except KeyError:
        return None


def reopen(f) -> str | None:
    """Point ``f``'s descriptor at a fresh open of its path; the path, or None for a terminal or pipe."""
    name = getattr(f, "name", None)
    if f is None or not isinstance(name, str) or name.startswith("<") or f.fileno() in (1, 2):
        return None  # standard output or error (twist --log-file=- or +)
    f.flush()
    fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        # Every observer that holds this file object writes to the new file now.
        os.dup2(fd, f.fileno())
    finally:
        os.close(fd)
    return name


class Hangup(Service):
    """SIGHUP reopens the log file, and does not stop the server."""

    def __init__(self, reactor, log_file):
        self._reactor = reactor
        self._log_file = log_file

    def startService(self):
        super().startService()
        signal.signal(signal.SIGHUP, self._signalled)

    def _signalled(self, signum, frame):
        self._reactor.callFromThread(self.hangup)

    def hangup(self) -> None:
        try:
            path = reopen(self._log_file)
        except OSError as e:
            log.error("SIGHUP: cannot reopen the log file: {error}", error=one_line(e))
            return
        if path is None:
            log.info("SIGHUP: the log goes to standard output or error, nothing to reopen")
        else:
            log.info("SIGHUP: reopened the log file {path}", path=path)
