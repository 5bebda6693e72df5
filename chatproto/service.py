"""``twist chat``: its options, and the service they wire together."""

from __future__ import annotations

import gc
import sys
import time
from functools import partial

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from . import config
from .admission import Admission, Policy
from .config import endpoint_description  # noqa: F401 - imported from here by others
from .cork import Cork
from .domain import DatabaseRouting, Domain, LocalRouting
from .housekeeping import Housekeeping
from .server import ChatFactory, Limits
from .store import DEFAULT_RETENTION, Retention, StoreUnavailable
from .store.sqlite import SchemaError, SQLiteStore

DEFAULT_PORT = "tcp:7000"
DEFAULT_DB = "chatproto.sqlite3"
#: About 50 MB of text for one user: far past any conversation, short of a disk.
DEFAULT_MAX_HELD = 200_000
GC_THRESHOLD = 100_000
#: Seconds a SIGTERM waits for clients to read what was written to them.
SHUTDOWN_TIMEOUT = 10.0


#: Each setting's value when neither the command line nor --config gives one.
DEFAULTS = {
    "port": DEFAULT_PORT,
    "db": DEFAULT_DB,
    "metrics": None,
    "shutdown-timeout": SHUTDOWN_TIMEOUT,
    "max-frame-rate": Limits.frame_rate,
    "frame-burst": Limits.frame_burst,
    "max-connections": Limits.max_connections,
    "max-held": DEFAULT_MAX_HELD,
    "login-timeout": Limits.login_timeout,
    "max-buffer": Limits.max_buffer,
    "require-secrets": False,
    "dedup-window": DEFAULT_RETENTION.dedup_window,
    "keep-delivered": DEFAULT_RETENTION.keep_delivered,
    "expire-held": DEFAULT_RETENTION.expire_held,
    "trusted": ",".join(Policy.trusted),
    "max-address-connections": Policy.connections,
    "address-connect-rate": Policy.connect_rate,
    "address-frame-rate": Policy.frame_rate,
    "address-frame-burst": Policy.frame_burst,
    "registrations-per-hour": Policy.registrations,
    "group-changes-per-hour": Policy.group_changes,
    "max-groups-per-user": Domain.MAX_GROUPS_PER_USER,
    "max-login-delay": Policy.max_failure_delay,
}


def _help(text: str, name: str) -> str:
    default = DEFAULTS[name]
    shown = f"{default:g}" if isinstance(default, float) else default
    return f"{text} [default: {shown}]"


class Options(usage.Options):
    synopsis = "[--config FILE] [--port ENDPOINT] [--db PATH] [--metrics ENDPOINT] [--require-secrets]"
    longdesc = (
        "Run the chatproto server. ENDPOINT is a Twisted endpoint string "
        "(tcp:7000, tcp:7000:interface=127.0.0.1, ssl:7443:privateKey=key.pem:certKey=cert.pem, "
        "unix:/run/chat.sock, systemd:domain=INET:index=0) or a bare port number, shorthand for "
        "tcp:PORT. Every option can also be set in the --config file (TOML, the option's name "
        "without its dashes as the key); the command line overrides the file. A setting that "
        "cannot be used stops the server with one line and exit status 1."
    )
    # The defaults are None here so that postOptions can tell what the command line gave
    # from what it did not (the file then decides); the real ones are in DEFAULTS.
    optParameters = [
        [
            "config",
            "c",
            None,
            "A TOML file of settings (e.g. /etc/chatproto/chat.toml); the command line overrides it.",
        ],
        [
            "port",
            "p",
            None,
            _help("Where to listen: an endpoint string, or a bare port number.", "port"),
        ],
        [
            "db",
            "d",
            None,
            _help(
                "SQLite database file, created if missing (mode 0600); ':memory:' keeps nothing after "
                "exit; or a postgresql://USER@HOST/DBNAME URL, which several nodes may share (its "
                "password from PGPASSWORD, PGPASSFILE or ?passfile=, never the command line).",
                "db",
            ),
        ],
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics at /metrics here (an endpoint string, e.g. "
            "tcp:9100:interface=127.0.0.1, or a bare port); off by default.",
        ],
        [
            "shutdown-timeout",
            None,
            None,
            _help(
                "Seconds a stop waits for clients to read their last frames before dropping them.",
                "shutdown-timeout",
            ),
        ],
        [
            "max-frame-rate",
            None,
            None,
            _help("Frames per second one connection may send (0: no limit).", "max-frame-rate"),
        ],
        ["frame-burst", None, None, _help("Frames one connection may send in a burst.", "frame-burst")],
        [
            "max-connections",
            None,
            None,
            _help("Open connections at most (0: no limit).", "max-connections"),
        ],
        [
            "max-held",
            None,
            None,
            _help(
                "Messages and notices (07, 09, 11, 21) that may wait for one offline user; past it a "
                "05 to that user gets 12 05 11, an 08 naming it 12 08 11 (0: no cap).",
                "max-held",
            ),
        ],
        [
            "login-timeout",
            None,
            None,
            _help("Seconds a connection may wait before logging in.", "login-timeout"),
        ],
        [
            "max-buffer",
            None,
            None,
            _help("Bytes written to a client that stopped reading before it is dropped.", "max-buffer"),
        ],
        [
            "dedup-window",
            None,
            None,
            "How long a delivered message's identity (sender, destination, TIMESTAMP, a hash of its "
            "text; never the text) is kept, so that a resend gets its 07 again instead of a second "
            "delivery; after it a resend is a new message. A DURATION: 30d, 12h, 90m, 45s or seconds "
            "[default: 30d].",
        ],
        [
            "keep-delivered",
            None,
            None,
            "Keep delivered texts this long (a DURATION), an archive on the server's disk; "
            "off (0) by default: a text is deleted the moment its last recipient has it.",
        ],
        [
            "expire-held",
            None,
            None,
            "Drop messages held for users who have not logged in or out for this long (a DURATION); "
            "off (0) by default: nothing undelivered is ever dropped.",
        ],
        [
            "trusted",
            None,
            None,
            _help(
                "Addresses or networks, comma-separated, that no per-address limit applies to "
                "(the machine itself by default; 127.0.0.2 and the rest of loopback are limited).",
                "trusted",
            ),
        ],
        [
            "max-address-connections",
            None,
            None,
            _help(
                "Connections open at once from one address (an IPv6 /64); one more gets 12 00 11 "
                "(0: no limit).",
                "max-address-connections",
            ),
        ],
        [
            "address-connect-rate",
            None,
            None,
            _help(
                "New connections a second from one address, with bursts up to --max-address-connections; "
                "more get 12 00 10 (0: no limit).",
                "address-connect-rate",
            ),
        ],
        [
            "address-frame-rate",
            None,
            None,
            _help(
                "Frames a second from one address over all its connections (0: no limit).",
                "address-frame-rate",
            ),
        ],
        [
            "address-frame-burst",
            None,
            None,
            _help("Frames one address may send in a burst.", "address-frame-burst"),
        ],
        [
            "registrations-per-hour",
            None,
            None,
            _help(
                "Accounts (01/13) one address may make an hour; more get 12 XX 10 (0: no limit).",
                "registrations-per-hour",
            ),
        ],
        [
            "group-changes-per-hour",
            None,
            None,
            _help(
                "Group changes one user from an untrusted address may make an hour (10 create, "
                "17 subject, 19 add members); more get 12 XX 10 (0: no limit).",
                "group-changes-per-hour",
            ),
        ],
        [
            "max-groups-per-user",
            None,
            None,
            _help(
                "Groups one user may be a member of; a 10 or 19 that would pass it for a member "
                "gets 12 XX 11 (0: no limit).",
                "max-groups-per-user",
            ),
        ],
        [
            "max-login-delay",
            None,
            None,
            _help(
                "After 5 failed logins from one address its next login waits 1 s, doubled at each failure up "
                "to this many seconds (0: no wait).",
                "max-login-delay",
            ),
        ],
    ]
    optFlags = [
        [
            "require-secrets",
            "s",
            "Refuse 01 and 03: every account is made with 13 and logs in with 15 and its secret.",
        ],
    ]

    def opt_version(self):
        """Print chatproto's version (and Twisted's and Python's) and exit."""
        from .version import describe

        print(describe())
        raise SystemExit(0)

    def postOptions(self):
        # Said in one line with exit status 1, not twist's usage screen: a service
        # manager's log shows the one line that says what to fix.
        given = {name: self[name] for name in DEFAULTS if name in self and self[name] is not None}
        given.pop("require-secrets", None)
        if self["require-secrets"]:
            given["require-secrets"] = True
        try:
            self.update(config.settle(given, self["config"], DEFAULTS))
        except config.ConfigError as e:
            raise SystemExit(f"chatproto: {e}") from None
        if config.password_in_url(self["db"]) and "db" in given:
            sys.stderr.write(
                "chatproto: warning: the --db URL holds a password, which every local user can read "
                "with ps; put the URL in --config, or the password in PGPASSWORD or a PGPASSFILE\n"
            )


class ChatService(MultiService):
    """Loads the store into the domain, and only then starts its children (the
    listeners); stops them first, then drains in an order that loses nothing.

    A plain MultiService would start its listeners at once, before the users
    and groups are loaded, and stop them concurrently with the store.
    """

    log = Logger()

    def __init__(
        self, reactor, domain, factory, children=(), metrics=None, shutdown_timeout=SHUTDOWN_TIMEOUT
    ):
        super().__init__()
        self._reactor = reactor
        self.domain = domain
        self.store = domain.store
        self.factory = factory
        self.metrics = metrics
        self.shutdown_timeout = shutdown_timeout
        for child in children:
            child.setServiceParent(self)

    def startService(self):
        Service.startService(self)  # the children wait for the store
        d = self.domain.start()
        d.addCallback(lambda _: _tune_garbage_collector())
        d.addCallbacks(lambda _: self._start_children(), self._failed)
        return d

    def _start_children(self):
        for child in self:
            child.startService()

    def _failed(self, failure):
        from . import startup  # which imports this module

        # One line and exit status 1 once the reactor has stopped (and the store closed).
        startup.abort(self._reactor, failure)

    def stopService(self):
        """Stop in an order that loses nothing a client was told.

        Stop the children (accept no connection more); read no frame more;
        let the store commit everything submitted, and what those commits set
        off (a 07 after a delivery), so every answer is written; log everyone
        out, which holds the notices still waiting behind a flush; close the
        store; then close each connection once its written bytes are sent.
        Clients that do not read are dropped after ``shutdown_timeout``
        seconds: nothing is lost by that, as a message stays held until its
        delivery is committed.
        """
        started = time.monotonic()
        self.factory.tick()  # the last summaries of what each address did
        self.log.info(
            "chatproto stopping: {count} connections, {ops} store operations pending",
            count=self.factory.connections,
            ops=self.store.backlog,
        )
        d = super().stopService()
        self.factory.stop_reading()
        self._deadline = self._reactor.callLater(self.shutdown_timeout, self._out_of_time)
        self._aborted = 0
        d.addCallback(lambda _: self._drain())
        d.addCallback(lambda _: self._log_out_everyone())
        d.addCallback(lambda _: self.store.close())
        d.addCallback(lambda _: self.factory.close_all())
        d.addBoth(self._stopped, started)
        return d

    def _drain(self) -> Deferred:
        """Fires once the store is idle: nothing queued, nothing running.

        A barrier fires after everything before it; what its batch's answers
        submitted comes after it, so wait again until a barrier finds nothing.
        """
        d = self.store.barrier()
        d.addCallback(lambda _: self._drain() if self.store.backlog else None)
        return d

    def _log_out_everyone(self) -> None:
        for session in list(self.domain.sessions.values()):
            self.domain.logout(session)

    def _out_of_time(self) -> None:
        self._aborted = self.factory.abort_all()
        self.log.warn(
            "stopping took over {seconds:g} s: dropped {count} connections that did not read",
            seconds=self.shutdown_timeout,
            count=self._aborted,
        )

    def _stopped(self, result, started: float):
        if self._deadline.active():
            self._deadline.cancel()
        if self.metrics is not None:
            self.metrics.close()
        ms = round((time.monotonic() - started) * 1000)
        if isinstance(result, Failure):
            self.log.failure("chatproto stopped in {ms} ms, with an error", result, ms=ms)
        else:
            self.log.info(
                "chatproto stopped in {ms} ms; the store is closed ({aborted} connections dropped)",
                ms=ms,
                aborted=self._aborted,
            )


#: Descriptors kept for what is not a client: the database and its WAL and
#: SHM, the log, the listening sockets, the metrics, one refused newcomer.
RESERVED_DESCRIPTORS = 64

log = Logger(namespace="chatproto.service")


def fit_connections(wanted: int) -> int:
    """``--max-connections``, lowered to what the descriptor limit allows.

    The soft limit is raised to the hard one first; a connection past the
    cap is answered 12 00 11, which needs a descriptor too, so the cap must
    sit below the limit or newcomers get a reset instead of an answer.
    """
    try:
        import resource
    except ImportError:
        return wanted  # not Unix
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # an unlimited hard limit the kernel will not grant: keep the soft one
    if soft == resource.RLIM_INFINITY:
        return wanted
    fits = max(1, soft - RESERVED_DESCRIPTORS)
    if wanted == 0 or wanted > fits:
        log.warn(
            "--max-connections {wanted} does not fit in {limit} file descriptors: lowered to {fits}",
            wanted=wanted or "0 (no limit)",
            limit=soft,
            fits=fits,
        )
        return fits
    return wanted


def _tune_garbage_collector():
    """Each message allocates a few short-lived objects (a Deferred, tuples);
    with the default threshold the cyclic collector ran every few hundred
    messages and took most of the server's time (bench/profile.txt). What was
    loaded at start-up lives for good, so it is frozen out of every pass."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 50, 100)


def is_postgres_url(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


def _postgres_store(url: str, reactor, **kwargs):
    try:
        from .store.postgres import PostgresStore
    except ImportError as e:
        raise SystemExit(
            f"chatproto: --db {url} needs psycopg: pip install 'chatproto[postgres]' ({e})"
        ) from None
    return PostgresStore(url, reactor, **kwargs)


def makeService(options, reactor=None):
    """Wire the store, the domain and the listeners together; nothing else."""
    if reactor is None:
        from twisted.internet import reactor
    db = options["db"]
    cork = Cork()
    figures = None
    if options["metrics"]:
        from .metrics import StoreFigures  # only with --metrics: it needs prometheus_client

        figures = StoreFigures()
    on_commit = figures.committed if figures is not None else None
    retention = Retention(options["dedup-window"], options["keep-delivered"], options["expire-held"])
    try:
        if is_postgres_url(db):
            store = _postgres_store(db, reactor, answering=cork, on_commit=on_commit, retention=retention)
            routing = partial(DatabaseRouting, clock=reactor)
            max_held = 0  # each node's count of what is held would be its own guess
        else:
            store = SQLiteStore(db, reactor, answering=cork, on_commit=on_commit, retention=retention)
            routing = LocalRouting
            max_held = options["max-held"]
    except (SchemaError, StoreUnavailable) as e:
        # Said in one line, not a traceback: the operator has a decision to make.
        raise SystemExit(f"chatproto: {e}") from None
    domain = Domain(
        store,
        routing,
        require_secrets=bool(options["require-secrets"]),
        max_held=max_held,
        max_groups_per_user=options["max-groups-per-user"],
    )
    limits = Limits(
        frame_rate=options["max-frame-rate"],
        frame_burst=options["frame-burst"],
        max_connections=fit_connections(options["max-connections"]),
        login_timeout=options["login-timeout"],
        max_buffer=options["max-buffer"],
    )
    policy = Policy(
        trusted=tuple(options["trusted"].split(",")) if options["trusted"] else (),
        connections=options["max-address-connections"],
        connect_rate=options["address-connect-rate"],
        frame_rate=options["address-frame-rate"],
        frame_burst=options["address-frame-burst"],
        registrations=options["registrations-per-hour"],
        group_changes=options["group-changes-per-hour"],
        max_failure_delay=options["max-login-delay"],
    )
    factory = ChatFactory(domain, cork, reactor, limits, Admission(reactor, policy))
    from . import startup  # which imports this module

    summaries = TimerService(policy.summary_interval, factory.tick)
    summaries.clock = reactor
    children = [
        summaries,
        startup.ListeningService(
            reactor,
            "--port",
            serverFromString(reactor, options["port"]),
            factory,
            "chatproto listening on {address}",
        ),
        Housekeeping(reactor, domain),
    ]
    metrics = None
    if figures is not None:
        from .metrics import Metrics

        metrics = Metrics(factory, domain, store, figures)
        children.append(
            startup.ListeningService(
                reactor,
                "--metrics",
                serverFromString(reactor, options["metrics"]),
                metrics.site(),
                "metrics at http://{address.host}:{address.port}/metrics",
            )
        )
    return ChatService(
        reactor, domain, factory, children, metrics=metrics, shutdown_timeout=options["shutdown-timeout"]
    )
