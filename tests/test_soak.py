"""The soak (``bench/soak.py``) in small: clients with outboxes, random drops, two
kill -9 restarts of a real server, hostile input alongside; nothing lost.

The full run is ``python bench/soak.py`` (30 clients, 60 s, 5 kills); its
figures are in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import importlib.util

from .test_e2e_server import REPO

_spec = importlib.util.spec_from_file_location("soak", REPO / "bench" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)


def test_small_soak_with_kills_and_drops_loses_and_duplicates_nothing():
    counts, failures = soak.soak(
        ["--clients", "12", "--groups", "4", "--duration", "8", "--kills", "2", "--rate", "15"]
        + ["--mean-connected", "1.5", "--fuzzers", "1", "--drain", "20", "--seed", "20261125"]
    )
    print(soak.report(counts))
    assert failures == []
    assert counts["kills"] == 2 and counts["server starts"] == 3
    assert counts["disconnects"] > 0 and counts["fuzz inputs"] > 0
    assert counts["sent"] > 500
    assert counts["lost"] == 0
    assert counts["unconfirmed (no 07)"] == 0
    assert counts["misrouted"] == counts["forged"] == 0
    assert counts["07 naming nothing sent"] == counts["07 before a 15 recipient had it"] == 0
    # Every expected delivery happened, except those the contract lets a 03 session lose.
    assert counts["delivered"] + counts["lost (03 in flight)"] == counts["expected deliveries"]
    assert counts["07"] == counts["sent"]


def make_soak() -> soak.Soak:
    """A soak's bookkeeping with two clients, no server: to feed its checks by hand."""
    args = soak.parse_args(["--seed", "1"])
    s = soak.Soak(args, "/nonexistent")
    a = soak.Peer(s, 0, b"0000000000001", b"a" * 32)
    b = soak.Peer(s, 1, b"0000000000002", None)
    s.peers = [a, b]
    s.by_user = {a.user: a, b.user: b}
    s.groups_of = {a.user: [], b.user: []}
    return s


def test_the_soaks_checks_catch_misrouted_forged_and_unsent():
    """The checks the soak relies on do fail on a bad frame (so a green soak means something)."""
    s = make_soak()
    a, b = s.peers
    a.sent[(b.user, b"1700000001")] = b"hi"
    good = b"06" + a.user + b.user + b"1700000001" + soak.pad(b"hi")
    assert b.on_message(good) == b"16" + a.user + b.user + b"1700000001"
    assert s.failures == [] and s.counts["delivered"] == 1
    b.on_message(good)
    assert s.counts["duplicates dropped"] == 1 and s.failures == []
    a.on_message(good)  # addressed to b, arriving at a
    assert s.counts["misrouted"] == 1
    b.on_message(b"06" + a.user + b.user + b"1700000002" + soak.pad(b"never sent"))
    assert s.counts["forged"] == 1
    b.on_delivered(a.user, b"1700000009")
    assert s.counts["07 naming nothing sent"] == 1
    b.sent[(a.user, b"1700000003")] = b"to a"
    b.on_delivered(a.user, b"1700000003")  # a (a 15 session) never had it
    assert s.counts["07 before a 15 recipient had it"] == 1
    assert len(s.failures) == 4


def test_the_verdict_counts_a_message_that_never_arrived_as_lost():
    s = make_soak()
    s.servers = [argparse.Namespace(log="/dev/null", starts=1, max_rss_kb=0)]
    a, b = s.peers
    b.sent[(a.user, b"1700000001")] = b"lost one"
    b.outbox[(a.user, b"1700000001")] = b"lost one"
    counts = s.verdict()
    assert counts["lost"] == 1 and counts["unconfirmed (no 07)"] == 1
    assert len(s.failures) == 2
