"""Housekeeping: what the server no longer needs leaves the database, a little at a time.

A delivered message's text goes the moment its last recipient has it (in the
transaction that records it, store/); what stays (its identity, for the
dedup window; an archived text, with ``--keep-delivered``; messages held for
users long gone, with ``--expire-held``) is removed here, by passes of the
store's ``sweep``: each a small batch in a short transaction of its own,
between the frames' transactions, so no pass holds the database for long and
no frame waits for more than one.
"""

from __future__ import annotations

from twisted.application.internet import TimerService
from twisted.logger import Logger

from .domain.answers import failed

#: Seconds between two rounds of passes. A round goes on, pass after pass,
#: while a pass found a full batch, so a backlog (after an upgrade, or a
#: burst a window ago) is worked off at the database's pace, between frames.
SWEEP_INTERVAL = 10.0


class Housekeeping(TimerService):
    """The store's ``sweep`` every SWEEP_INTERVAL seconds, in the service's MultiService."""

    log = Logger()

    def __init__(self, clock, domain, interval: float = SWEEP_INTERVAL):
        super().__init__(interval, self.round)
        self.clock = clock
        self.domain = domain
        #: Totals since start, for the logs and the tests.
        self.identities = self.texts = self.held = 0
        self._stopping = False

    def startService(self):
        self._stopping = False
        return super().startService()

    def stopService(self):
        """Stop after the pass in flight: a round's next pass is not started."""
        self._stopping = True
        return super().stopService()

    def round(self):
        """Deferred: passes until one finds less than a full batch (or the service is stopping)."""
        return self._pass()

    def _pass(self):
        online = [user.decode() for user in self.domain.sessions]
        d = self.domain.store.sweep(self.clock.seconds(), online)
        d.addCallbacks(self._swept, failed, errbackArgs=("housekeeping",))
        return d

    def _swept(self, swept):
        if swept.held:
            self.domain.delivery.expired(swept.held)
            count = sum(swept.held.values())
            self.held += count
            self.log.info(
                "--expire-held dropped {count} messages held for {users} users away too long",
                count=count,
                users=len(swept.held),
            )
        self.identities += swept.identities
        self.texts += swept.texts
        if swept.more and not self._stopping:
            return self._pass()
        return None
