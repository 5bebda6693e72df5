"""Per-address admission: what one address may cost the server, however many
connections it opens.

A flood comes from somewhere: every connection is counted against its
**address** (an IPv6 client by its /64, which one host usually holds
whole), so that reconnecting buys no new burst. An address may hold so many
connections at once, open so many a second, send so many frames a second
over all its connections, register so many accounts an hour, and each
failed login makes its next login wait longer. Quotas of frames that cost
the disk are counted by a frame code (``QUOTAS``): one line adds a code.
Trusted addresses (the machine itself, by default) are limited by nothing
here, so that local tools, monitoring and test suites are never refused.

Refusals are not logged one by one: each address's events are counted and
written as one summary line per address every ``summary_interval`` seconds
(``tick``), and every event is counted for ``/metrics`` (``events``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from twisted.logger import Logger

from . import wire

# What is counted, per address for the summaries and in all for /metrics.
CONNECTIONS = "connections"
CONNECTIONS_REFUSED = "connections refused"
FRAMES_REFUSED = "frames refused"
REGISTRATIONS = "registrations"
REGISTRATIONS_REFUSED = "registrations refused"
GROUP_CHANGES_REFUSED = "group changes refused"
FAILED_LOGINS = "failed logins"
LOGINS_DELAYED = "logins delayed"
ERRORS = "errors"
EVENTS = (
    CONNECTIONS,
    CONNECTIONS_REFUSED,
    FRAMES_REFUSED,
    REGISTRATIONS,
    REGISTRATIONS_REFUSED,
    GROUP_CHANGES_REFUSED,
    FAILED_LOGINS,
    LOGINS_DELAYED,
    ERRORS,
)

HOUR = 3600.0
#: Addresses remembered at most: past it, quiet ones are forgotten first, and
#: a new address is refused (12 00 11) only if none is quiet.
MAX_ADDRESSES = 100_000
#: Seconds a connection over its address's frame budget is read no further, at least.
MIN_PAUSE = 0.1
#: Seconds over which one failed login is forgiven.
FAILURE_DECAY = 60.0


@dataclass(frozen=True)
class Quota:
    """A frame code's cost against an hourly budget: an address's (``per_user``
    False, counted from the first frame) or its logged-in user's."""

    name: str
    refused: str
    per_user: bool


REGISTRATION = Quota("registrations", REGISTRATIONS_REFUSED, per_user=False)
GROUP_CHANGE = Quota("group changes", GROUP_CHANGES_REFUSED, per_user=True)

#: Frame codes that spend a quota; a frame past it gets 12 XX 10 and is not acted on.
#: A new code that costs the disk is counted here, with one line.
QUOTAS: dict[bytes, Quota] = {
    wire.REGISTER: REGISTRATION,
    wire.REGISTER_SECRET: REGISTRATION,
    wire.CREATE_GROUP: GROUP_CHANGE,
    wire.SET_SUBJECT: GROUP_CHANGE,
    wire.ADD_MEMBERS: GROUP_CHANGE,
}


@dataclass
class Policy:
    """What an untrusted address may do; 0 turns a limit off."""

    #: Addresses or networks limited by nothing here (fail2ban's ignoreip).
    trusted: tuple[str, ...] = ("127.0.0.1", "::1")
    #: Connections open at once; the next one gets 12 00 11.
    connections: int = 100
    #: New connections a second, sustained (bursts up to ``connections``); past it 12 00 10.
    connect_rate: float = 10.0
    #: Frames a second over all of an address's connections, and its burst.
    frame_rate: float = 500.0
    frame_burst: float = 10000.0
    #: Accounts (01/13) an address may make an hour; all of them at once if it likes.
    registrations: int = 300
    #: Group changes (10 create, 17 subject, 19 add members) a user may make an hour.
    group_changes: int = 30
    #: Failed logins (03/15) an address may make before its logins wait.
    free_failures: int = 5
    #: The first wait, doubled at each further failure, up to ``max_failure_delay``.
    failure_delay: float = 1.0
    max_failure_delay: float = 30.0
    #: Seconds between two summaries of what each address did.
    summary_interval: float = 10.0


class Bucket:
    """A token bucket on the server's clock: ``rate`` a second, up to ``burst``."""

    __slots__ = ("rate", "burst", "tokens", "at")

    def __init__(self, rate: float, burst: float, now: float):
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = now

    def refill(self, now: float) -> float:
        tokens = self.tokens + (now - self.at) * self.rate
        self.tokens = tokens if tokens < self.burst else self.burst
        self.at = now
        return self.tokens

    def take(self, now: float) -> bool:
        if self.refill(now) < 1:
            return False
        self.tokens -= 1
        return True

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.at) * self.rate >= self.burst


class Peer:
    """One address (an IPv6 /64), shared by all its connections."""

    __slots__ = (
        "key",
        "trusted",
        "open",
        "connects",
        "frames",
        "registrations",
        "failures",
        "failed_at",
        "not_before",
        "counts",
    )

    def __init__(self, key: str, trusted: bool, policy: Policy, now: float):
        self.key = key
        self.trusted = trusted
        self.open = 0
        self.connects = Bucket(policy.connect_rate, max(policy.connections, 1), now)
        self.frames = Bucket(policy.frame_rate, policy.frame_burst, now)
        self.registrations = Bucket(policy.registrations / HOUR, policy.registrations, now)
        self.failures = 0
        self.failed_at = now
        self.not_before = 0.0
        #: Events since the last summary, by name.
        self.counts: dict[str, int] = {}

    def quiet(self, now: float) -> bool:
        """Nothing of it would be remembered if it were forgotten now."""
        return (
            self.open == 0
            and not self.counts
            and self.connects.full(now)
            and self.frames.full(now)
            and self.registrations.full(now)
            and self._failures(now) == 0
        )

    def _failures(self, now: float) -> int:
        """The failures not yet forgiven: one each FAILURE_DECAY seconds since the last."""
        return max(0, self.failures - int((now - self.failed_at) // FAILURE_DECAY))


def address_key(host: str) -> str:
    """What an address is counted as: itself, an IPv4-mapped IPv6 address as
    its IPv4 address, any other IPv6 address as its /64."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def parse_trusted(values) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Addresses or networks (``10.0.0.0/8``); a ValueError names the bad one."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an address or network") from None
    return tuple(networks)


class Admission:
    """Every address's counts, the decisions on them, and their summaries."""

    log = Logger()

    def __init__(self, clock, policy: Policy | None = None, stats_events: dict | None = None):
        self.clock = clock
        self.policy = policy or Policy()
        self.trusted = parse_trusted(self.policy.trusted)
        self.peers: dict[str, Peer] = {}
        #: user id → that user's group-change bucket.
        self.users: dict[bytes, Bucket] = {}
        #: Every event since start, by name (for /metrics).
        self.events: dict[str, int] = stats_events if stats_events is not None else dict.fromkeys(EVENTS, 0)

    def is_trusted(self, host: str | None) -> bool:
        if host is None:
            return True  # a UNIX socket: someone on this machine
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.trusted)

    def count(self, peer: Peer, event: str, n: int = 1) -> None:
        self.events[event] += n
        peer.counts[event] = peer.counts.get(event, 0) + n

    # -- connections ---------------------------------------------------------

    def admit(self, host: str | None) -> tuple[Peer | None, bytes | None]:
        """The peer a new connection from ``host`` counts against, and the
        reason it is refused (``wire.BUSY`` for no slot, ``wire.RATE_LIMITED``
        for too many new ones a second), or None when it is welcome."""
        now = self.clock.seconds()
        trusted = self.is_trusted(host)
        key = "local" if host is None else address_key(host)
        peer = self.peers.get(key)
        if peer is None:
            if len(self.peers) >= MAX_ADDRESSES and not self._forget_quiet(now):
                return None, wire.BUSY
            peer = self.peers[key] = Peer(key, trusted, self.policy, now)
        if not trusted:
            policy = self.policy
            if 0 < policy.connections <= peer.open:
                self.count(peer, CONNECTIONS_REFUSED)
                return peer, wire.BUSY
            if policy.connect_rate > 0 and not peer.connects.take(now):
                self.count(peer, CONNECTIONS_REFUSED)
                return peer, wire.RATE_LIMITED
        peer.open += 1
        self.count(peer, CONNECTIONS)
        return peer, None

    def closed(self, peer: Peer) -> None:
        peer.open -= 1

    # -- frames --------------------------------------------------------------

    def frame_allowed(self, peer: Peer, now: float) -> bool:
        """One frame from an untrusted ``peer``: within the address's rate?"""
        if self.policy.frame_rate <= 0 or peer.frames.take(now):
            return True
        self.count(peer, FRAMES_REFUSED)
        return False

    def frames_now(self, peer: Peer, now: float) -> int | None:
        """How many frames ``peer`` may send now, and the one that would be refused."""
        if self.policy.frame_rate <= 0:
            return None
        return int(peer.frames.refill(now)) + 1

    def refill_wait(self, peer: Peer) -> float:
        """Seconds until ``peer``'s frame budget has a tenth of a second's worth again."""
        frames = peer.frames
        wanted = min(frames.burst, max(1.0, frames.rate * MIN_PAUSE))
        return max(MIN_PAUSE, (wanted - frames.tokens) / frames.rate)

    def spend(self, quota: Quota, peer: Peer, user: bytes | None) -> bool:
        """A frame that spends ``quota``: True if it may be acted on (a per-user
        quota before a login costs nothing: the frame is refused as not online)."""
        now = self.clock.seconds()
        if quota.per_user:
            if user is None or self.policy.group_changes <= 0:
                return True
            bucket = self.users.get(user)
            if bucket is None:
                limit = self.policy.group_changes
                bucket = self.users[user] = Bucket(limit / HOUR, limit, now)
        else:
            if self.policy.registrations <= 0:
                self.count(peer, REGISTRATIONS)
                return True
            bucket = peer.registrations
        if bucket.take(now):
            if not quota.per_user:
                self.count(peer, REGISTRATIONS)
            return True
        self.count(peer, quota.refused)
        return False

    # -- logins --------------------------------------------------------------

    def login_wait(self, peer: Peer) -> float:
        """Seconds a login from ``peer`` must wait, after its failed ones."""
        wait = peer.not_before - self.clock.seconds()
        if wait > 0:
            self.count(peer, LOGINS_DELAYED)
            return wait
        return 0.0

    def login_failed(self, peer: Peer) -> None:
        """A 03/15 was refused (no such user, or the wrong secret): past the
        free ones, each failure doubles the wait before the address's next login."""
        self.count(peer, FAILED_LOGINS)
        if peer.trusted:
            return
        now = self.clock.seconds()
        policy = self.policy
        peer.failures = peer._failures(now) + 1
        peer.failed_at = now
        over = peer.failures - policy.free_failures
        if over > 0 and policy.failure_delay > 0:
            delay = min(policy.max_failure_delay, policy.failure_delay * 2 ** min(over - 1, 30))
            peer.not_before = max(peer.not_before, now + delay)

    # -- summaries -----------------------------------------------------------

    def tick(self) -> None:
        """One line per address that did something since the last one; forget
        the addresses that are quiet."""
        now = self.clock.seconds()
        interval = self.policy.summary_interval
        for key, peer in list(self.peers.items()):
            if peer.counts:
                counts, peer.counts = peer.counts, {}
                said = ", ".join(f"{n:,} {event}" for event, n in counts.items())
                self.log.info(
                    "from {address} in the last {seconds:g} s: {said}",
                    address=key,
                    seconds=interval,
                    said=said,
                )
            elif peer.quiet(now):
                del self.peers[key]
        for user, bucket in list(self.users.items()):
            if bucket.full(now):
                del self.users[user]

    def _forget_quiet(self, now: float) -> bool:
        quiet = [key for key, peer in self.peers.items() if peer.quiet(now)]
        for key in quiet:
            del self.peers[key]
        return bool(quiet)
