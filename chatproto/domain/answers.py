"""How the domain takes the store's answers, and the one way it meets a failure.

Every store failure, whatever the exception (``StoreUnavailable``, a
locked or full SQLite file, a bug), ends in ``failed``: logged once, and
answered ``12 XX 11`` to the frame it concerned where there is one.
"""

from __future__ import annotations

from twisted.logger import Logger

from .. import wire
from ..store import StoreUnavailable

log = Logger(namespace="chatproto.domain")


def failed(failure, doing: str) -> None:
    """Log a store failure: one line when the database is unavailable, a traceback otherwise."""
    if failure.check(StoreUnavailable):
        log.warn("{doing}: the store is unavailable ({error})", doing=doing, error=failure.value)
    else:
        log.failure("{doing}: the store failed", failure, doing=doing)


def busy(failure, session, code: bytes) -> None:
    """A change the store could not commit: the client is told to try again (12 XX 11)."""
    failed(failure, f"a {code.decode()} from {session.user.decode() if session.user else 'a client'}")
    session.connection.error(code, wire.BUSY)


def kept(failure) -> None:
    """A hold that could not be ended or written stays as it was: sent again, never lost."""
    failed(failure, "a delivery stays held and will be sent again")


class Answer:
    """Where the store sends a hot operation's result: a method and its
    arguments for success, another for failure, and no Deferred (Deferreds
    were about a tenth of the server's time under load, bench/profile.txt)."""

    __slots__ = ("ok", "ok_args", "failed", "failed_args")

    def __init__(self, ok, ok_args: tuple, failed, failed_args: tuple):
        self.ok, self.ok_args, self.failed, self.failed_args = ok, ok_args, failed, failed_args

    def callback(self, value) -> None:
        # A bug here must not stop the store from answering the rest of its batch.
        try:
            self.ok(value, *self.ok_args)
        except Exception:
            log.failure("handling a stored result failed")

    def errback(self, failure) -> None:
        try:
            self.failed(failure, *self.failed_args)
        except Exception:
            log.failure("handling a store failure failed", failure)
