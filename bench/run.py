"""Run the whole benchmark and write bench/results.md.

    python bench/run.py            # the full run (about 20 minutes, 10 of them chatproto-pg and -pg2)
    python bench/run.py --quick    # smaller counts, one run each (about 2 minutes)
    python bench/run.py --systems chatproto,mosquitto --workloads throughput

Every server runs pinned to core 0 and this process (the load generator) to
core 1. Each figure is the median of ``--repeats`` runs, each against a
freshly started server (a fresh database for ours).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import loadgen
from loadgen import BenchError, Stream, block_of, close_all, pump, settle
from systems import LINES, PG_SETTINGS, SYSTEMS, Chat, System, export_tree, pg_version

BENCH = Path(__file__).resolve().parent
SERVER_CORE = 0
GEN_CORE = 1

#: Messages per throughput run, by system: enough for a run of about a second or more.
FULL = {
    "throughput": {
        "chatproto": 100_000,
        # As many as SQLite's: the tables grow alike, and the 07s, which lag the
        # deliveries, fall mostly inside the timed part (see rate_acked).
        "chatproto-pg": 100_000,
        "chatproto-pg2": 100_000,
        "mosquitto": 300_000,
        "ngircd": 1_500_000,
        "relay": 6_000_000,
    },
    "fanout": {"chatproto": 6_000, "mosquitto": 30_000, "ngircd": 60_000, "relay": 200_000},
    "pairs": [1, 10, 100],
    "rates": [2_000, 10_000],
    "latency_s": 5.0,
    "conns": [1_000, 5_000, 10_000],
    "groups": [10, 99],
    "drain": 100_000,
    "repeats": 3,
}
QUICK = {
    "throughput": {
        "chatproto": 20_000,
        "chatproto-pg": 10_000,
        "chatproto-pg2": 10_000,
        "mosquitto": 100_000,
        "ngircd": 500_000,
        "relay": 2_000_000,
    },
    "fanout": {"chatproto": 2_000, "mosquitto": 10_000, "ngircd": 20_000, "relay": 60_000},
    "pairs": [1, 100],
    "rates": [2_000, 10_000],
    "latency_s": 2.0,
    "conns": [1_000],
    "groups": [10, 99],
    "drain": 20_000,
    "repeats": 1,
}
WORKLOADS = ["selftalk", "throughput", "latency", "connections", "drain", "fanout"]


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


class Notes:
    """Anything odd seen during the run: it goes into results.md."""

    def __init__(self):
        self.items: list[str] = []

    def add(self, text: str):
        log("NOTE:", text)
        if text not in self.items:
            self.items.append(text)


def check_server(system: System, notes: Notes, what: str):
    servers = system.servers()
    for n, server in enumerate(servers, 1):
        name = system.name if len(servers) == 1 else f"{system.name} node {n}"
        if not server.alive():
            notes.add(f"{name} died during {what}: {server.tail(400)!r}")
            continue
        log_text = server.tail(200_000)
        for bad in ("Traceback", "Unhandled", "CRITICAL", "failed"):
            if bad in log_text:
                i = log_text.index(bad)
                notes.add(f"{name} logged {bad!r} during {what}: {log_text[max(0, i - 200) : i + 600]!r}")
                break
    found = system.problems()
    if found:
        notes.add(f"{system.name}'s database logged during {what}: {found!r}")


def recv_need(system: System, count: int) -> tuple[int, bool]:
    if system.rx == LINES:
        return count, True
    return count * system.rx, False


# -- workloads ----------------------------------------------------------------


def throughput(system: System, pairs: int, total: int, notes: Notes) -> dict:
    per = max(1, total // pairs)
    made = system.pairs(pairs)
    streams, acks = [], []
    for s, r, make, _ in made:
        block, repeat = block_of(make, per, system.distinct)
        sender = Stream(s, block, repeat)
        need, lines = recv_need(system, per)
        streams += [sender, Stream(r, need=need, lines=lines)]
        acks.append(sender)
    start, end, unfinished = pump(streams, timeout=300)
    if unfinished:
        got = sum(st.got for st in streams if st.need)
        raise BenchError(f"{len(unfinished)} receivers unfinished; received {got} units of {per * pairs}")
    result = {"rate": per * pairs / (end - start), "seconds": end - start, "messages": per * pairs}
    if system.ack:
        for st in acks:
            st.need = per * system.ack
            st.repeat = 0
        # settle(), keeping the time of the last 07: a server may deliver first and ack later.
        _, acked, late = pump(acks, timeout=60)
        result["rate_acked"] = per * pairs / (acked - start)
        if late:
            missing = sum(st.need - st.got for st in late) // system.ack
            notes.add(f"{system.name} throughput P={pairs}: {missing} of {per * pairs} 07s never arrived")
    if system.server:
        result["rss_kib"] = system.server.rss_kib()
    return result


def latency(system: System, rate: int, duration: float, notes: Notes) -> dict:
    made = system.pairs(100)
    senders = [(s, stamped) for s, _, _, stamped in made]
    receivers = [r for _, r, _, _ in made]
    out = loadgen.paced(senders, receivers, rate, duration, drain=20.0)
    lat = out["latencies"]
    if len(lat) < out["sent"]:
        notes.add(f"{system.name} latency {rate}/s: only {len(lat)} of {out['sent']} messages arrived")
    tenth = max(1, len(lat) // 10)
    return {
        "p50": loadgen.percentile(lat, 50),
        "p99": loadgen.percentile(lat, 99),
        "max": max(lat) if lat else float("nan"),
        # In order of arrival: a system that cannot keep up has a queue that grows.
        "p50_first_tenth": loadgen.percentile(lat[:tenth], 50),
        "p50_last_tenth": loadgen.percentile(lat[-tenth:], 50),
        "sent": out["sent"],
        "received": len(lat),
        "gen_lag_ms": out["max_lag_ms"],
    }


def connections(system: System, count: int, notes: Notes) -> dict:
    prepared = system.idle_prepare(count)
    time.sleep(0.5)
    before = system.server.rss_kib()
    started = time.perf_counter()
    socks = system.idle(count, prepared)
    took = time.perf_counter() - started
    time.sleep(1.0)
    after = system.server.rss_kib()
    if not system.server.alive():
        raise BenchError("server died holding idle connections")
    close_all(socks)
    per = (after - before) / count
    return {"kib_per_conn": per, "rss_before": before, "rss_after": after, "login_s": took}


def drain(system: System, count: int, notes: Notes) -> dict:
    r, login, need, sender = system.offline(count)
    stream = Stream(r, login, 1, need=need)
    extra = [Stream(sender)] if system.ack else []
    start, end, unfinished = pump([stream, *extra], timeout=600)
    if unfinished:
        raise BenchError(f"drain unfinished: {stream.got} of {need} bytes")
    result = {"seconds": end - start, "rate": count / (end - start)}
    if system.ack:
        extra[0].need = count * system.ack
        late = settle(extra, timeout=120)
        if late:
            missing = (late[0].need - late[0].got) // system.ack
            notes.add(f"{system.name} drain: {missing} of {count} 07s never arrived")
    return result


def fanout(system: System, members: int, count: int, notes: Notes) -> dict:
    sender, receivers, make = system.group(members)
    block, repeat = block_of(make, count, system.distinct)
    s = Stream(sender, block, repeat)
    need, lines = recv_need(system, count)
    streams = [s] + [Stream(r, need=need, lines=lines) for r in receivers]
    start, end, unfinished = pump(streams, timeout=600)
    if unfinished:
        raise BenchError(f"fan-out unfinished: {len(unfinished)} members short")
    took = end - start
    result = {"rate": count * (members - 1) / took, "msg_rate": count / took, "seconds": took}
    if system.ack:
        s.need = count * system.ack
        if settle([s], timeout=120):
            missing = (s.need - s.got) // system.ack
            notes.add(f"{system.name} fan-out {members}: {missing} of {count} 07s never arrived")
    return result


# -- the run -------------------------------------------------------------------


def measure(kind: str, system_cls, args, cfg, notes: Notes, workroot: Path, param) -> list[dict]:
    results = []
    for rep in range(cfg["repeats"]):
        workdir = Path(tempfile.mkdtemp(prefix=f"{system_cls.name}-{kind}-", dir=workroot))
        system = system_cls(workdir, SERVER_CORE)
        try:
            system.start()
            before = _cpu_snapshot(system)
            if kind == "throughput":
                out = throughput(system, param, cfg["throughput"][system.name], notes)
            elif kind == "latency":
                out = latency(system, param, cfg["latency_s"], notes)
            elif kind == "connections":
                out = connections(system, param, notes)
            elif kind == "drain":
                out = drain(system, cfg["drain"], notes)
            elif kind == "fanout":
                out = fanout(system, param, cfg["fanout"][system.name], notes)
            else:
                raise ValueError(kind)
            out["other_cores"] = _other_cores(before, _cpu_snapshot(system))
            check_server(system, notes, f"{kind} {param}")
            log(f"{kind:11} {system.name:13} {param!s:>6} run {rep + 1}: {_brief(out)}")
            results.append(out)
        except BenchError as e:
            check_server(system, notes, f"{kind} {param}")
            notes.add(f"{system.name} {kind} {param} run {rep + 1} failed: {e}")
        except Exception:  # noqa: BLE001 - one broken run must not lose the others
            notes.add(f"{system.name} {kind} {param} run {rep + 1} crashed: {traceback.format_exc()[-600:]}")
        finally:
            system.stop()
    return results


# -- what else ran meanwhile -----------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_snapshot(system: System) -> tuple[float, int, dict[int, int]]:
    """(time, busy ticks of the whole machine, {pid: ticks} of the run's own processes).

    The run's own: this process, the servers and everything under them, and
    any process the system started outside that tree (PostgreSQL's postmaster).
    """
    first = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system_, _idle, _iowait, irq, softirq = (int(v) for v in first[:7])
    parent, ticks = {}, {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        rest = stat.rsplit(")", 1)[1].split()
        pid = int(entry.name)
        parent[pid], ticks[pid] = int(rest[1]), int(rest[11]) + int(rest[12])
    roots = {os.getpid(), *system.extra_pids()}
    ours = {}
    for pid in ticks:
        p, seen = pid, 0
        while p and p not in roots and seen < 64:
            p, seen = parent.get(p, 0), seen + 1
        if p in roots:
            ours[pid] = ticks[pid]
    return time.monotonic(), user + nice + system_ + irq + softirq, ours


def _other_cores(before, after) -> float:
    """Cores kept busy, on average, by processes other than the run's own in between."""
    (t0, busy0, ours0), (t1, busy1, ours1) = before, after
    ours = sum(v - ours0.get(pid, 0) for pid, v in ours1.items())
    return max(0.0, (busy1 - busy0 - ours) / _TICK / max(t1 - t0, 1e-9))


def _brief(out: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items())


def median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def machine() -> dict:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import twisted

    def version(cmd):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return done.stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "mosquitto": version(["dpkg-query", "-W", "-f", "${Version}", "mosquitto"]),
        "ngircd": version(["dpkg-query", "-W", "-f", "${Version}", "ngircd"]),
        "postgresql": pg_version(),
        "load_before": os.getloadavg()[0],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller counts and one run each")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated: " + ",".join(SYSTEMS))
    ap.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ",".join(WORKLOADS)
    )
    ap.add_argument("--repeats", type=int, help="runs per figure (median); default 3, or 1 with --quick")
    ap.add_argument(
        "--ref",
        default="HEAD",
        help="git ref of the chatproto code to measure (exported to a temp dir), or 'worktree'",
    )
    ap.add_argument("--output", default=str(BENCH / "results.md"))
    ap.add_argument("--json", default=str(BENCH / "results.json"))
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.repeats:
        cfg["repeats"] = args.repeats
    systems = [SYSTEMS[s] for s in args.systems.split(",") if s]
    workloads = [w for w in args.workloads.split(",") if w]

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # The generator holds C sockets (the server its own C, under its own limit).
    if max(cfg["conns"]) + 200 > hard:
        print(f"ulimit -Hn is {hard}: connection counts above {hard - 200} skipped", file=sys.stderr)
        cfg["conns"] = [c for c in cfg["conns"] if c + 200 <= hard]
    os.sched_setaffinity(0, {GEN_CORE})
    notes = Notes()
    began = time.time()
    data: dict = {"machine": machine(), "config": cfg, "command": _command(argv), "results": {}}
    data["json"] = _shown(args.json)
    if any(cls.name.startswith("chatproto-pg") for cls in systems):
        data["postgres"] = PG_SETTINGS
    res = data["results"]
    signal.signal(signal.SIGTERM, _terminate)
    with tempfile.TemporaryDirectory(prefix="chatbench-") as tmp:
        workroot = Path(tmp)
        Chat.source, data["server_code"] = export_tree(args.ref, workroot / "src")
        log(f"chatproto from {data['server_code']}")
        if "selftalk" in workloads:
            res["selftalk"] = {}
            for p in cfg["pairs"]:
                runs = [loadgen.self_talk(p, 4_000_000 if not args.quick else 1_000_000) for _ in range(3)]
                res["selftalk"][str(p)] = statistics.median(runs)
                log(f"selftalk P={p}: {res['selftalk'][str(p)]:.0f} msg/s")
            res["selftalk_latency"] = _selftalk_latency(cfg)
        plan = [
            ("throughput", cfg["pairs"]),
            ("latency", cfg["rates"]),
            ("connections", cfg["conns"]),
            ("drain", [cfg["drain"]]),
            ("fanout", cfg["groups"]),
        ]
        for kind, params in plan:
            if kind not in workloads:
                continue
            res[kind] = {}
            for param in params:
                res[kind][str(param)] = {}
                for cls in systems:
                    if kind == "drain" and not cls.offline_ok:
                        continue
                    if not cls.supports(kind):
                        log(f"{kind:11} {cls.name:13} {param!s:>6}: n/a")
                        continue
                    runs = measure(kind, cls, args, cfg, notes, workroot, param)
                    res[kind][str(param)][cls.name] = runs
    data["seconds"] = time.time() - began
    data["machine"]["load_after"] = os.getloadavg()[0]
    data["notes"] = notes.items
    Path(args.json).write_text(json.dumps(data, indent=1))
    Path(args.output).write_text(render(data, [c.name for c in systems]))
    log(f"wrote {args.output} in {data['seconds']:.0f} s")
    return 0


def _terminate(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")


def _selftalk_latency(cfg) -> dict:
    """Latency through the generator alone: the floor under every latency figure."""
    import socket

    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(256)
    port = lst.getsockname()[1]
    senders, receivers = [], []
    try:
        for _ in range(100):
            (s,) = loadgen.dial(port, 1)
            r, _ = lst.accept()
            r.setblocking(False)
            senders.append((s, _plain_stamped))
            receivers.append(r)
        out = {}
        for rate in cfg["rates"]:
            got = loadgen.paced(senders, receivers, rate, min(2.0, cfg["latency_s"]))
            lat = got["latencies"]
            p50, p99 = loadgen.percentile(lat, 50), loadgen.percentile(lat, 99)
            out[str(rate)] = {"p50": p50, "p99": p99, "max": max(lat)}
            log(f"selftalk latency {rate}/s: {_brief(out[str(rate)])}")
        return out
    finally:
        close_all([s for s, _ in senders] + receivers)
        lst.close()


def _plain_stamped(i, now_ns):
    return b"05" + b"0" * 36 + loadgen.stamped_text(i, now_ns, 218)


def _shown(path: str) -> str:
    """``path`` as results.md names it: relative to the repository when inside it."""
    full = Path(path).resolve()
    return str(full.relative_to(BENCH.parent)) if full.is_relative_to(BENCH.parent) else str(full)


def _command(argv) -> str:
    given = argv if argv is not None else sys.argv[1:]
    return "python bench/run.py" + (" " + shlex.join(given) if given else "")


# -- results.md ----------------------------------------------------------------


def _fmt(v, digits=0):
    if v is None:
        return "—"
    if v != v:  # NaN
        return "—"
    return f"{v:,.{digits}f}"


def _ratio(a, b):
    if a is None or b is None or not b:
        return "—"
    return f"{a / b:.2f}×"


def render(data: dict, names: list[str]) -> str:
    m = data["machine"]
    cfg = data["config"]
    res = data["results"]
    out = ["# chatproto benchmark results", ""]
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    out.append(f"Command: `{data['command']}` — {data['seconds'] / 60:.1f} minutes, {when}.")
    out.append("")
    out.append(
        f"Machine: {m['nproc']} cores, {m['cpu']}, Linux {m['kernel']}; Python {m['python']}, "
        f"Twisted {m['twisted']}; mosquitto {m['mosquitto']}, ngircd {m['ngircd']}"
        + (f", PostgreSQL {m.get('postgresql', '?')}." if "postgres" in data else ".")
    )
    out.append("")
    if "load_before" in m:
        out.append(
            f"Load average (1 min) at the start {m['load_before']:.2f}, at the end {m['load_after']:.2f} "
            "(the run's own load included; anything else running on the machine shows here)."
        )
        out.append("")
    code = data.get("server_code", "?")
    out.append(f"chatproto measured: {code} (exported, so edits made during the run do not count).")
    out.append("")
    out.append(
        f"Every server pinned to core {SERVER_CORE}, the load generator (`bench/loadgen.py`, one "
        f"process, epoll) to core {GEN_CORE} (`taskset`). Each figure is the median of {cfg['repeats']} "
        "run(s), each against a freshly started server. Messages carry 218 bytes of text on every "
        "system (our 05/06 frame: 256 bytes). "
        "chatproto (`python -m twisted chat --max-frame-rate 0`: its per-connection flood limit off, as "
        "ngircd's penalties are) records every message in its default SQLite store (WAL, group commit) "
        "on the root file system (ext4, not tmpfs); mosquitto runs "
        "without persistence, ngircd stores nothing, the relay neither parses nor stores."
    )
    out.append("")
    if "postgres" in data:
        out.append(_postgres_setup(data["postgres"]))
        out.append("")
    ours = "chatproto"

    def table(title, kind, key, unit, params, label, better="higher", digits=0, note=""):
        if kind not in res:
            return
        out.append(f"## {title}")
        out.append("")
        if note:
            out.append(note)
            out.append("")
        present = [
            n for n in names if any(key in r for p in params for r in res[kind].get(str(p), {}).get(n, []))
        ]
        skipped = [n for n in names if n in SYSTEMS and not SYSTEMS[n].supports(kind)]
        unsupported = [f"n/a: {n} (measured on {' and '.join(SYSTEMS[n].workloads)} only)." for n in skipped]
        if not present:
            out.extend([*unsupported, ""])
            return
        # Our other stores are set against ours (SQLite); ours against the other systems.
        variants = [n for n in present if n.startswith(ours + "-")]
        others = [n for n in present if n != ours and n not in variants]
        head = [label] + [f"{n} ({unit})" for n in present]
        if ours in present:
            head += [f"{ours} / {n}" for n in others] + [f"{n} / {ours}" for n in variants]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for p in params:
            row = res[kind].get(str(p), {})
            med = {n: median(row.get(n, []), key) for n in present}
            cells = [f"{p:,}" if isinstance(p, int) else str(p)]
            cells += [_fmt(med[n], digits) + _runs(row.get(n), key) for n in present]
            if ours in present:
                cells += [_ratio(med[ours], med[n]) for n in others]
                cells += [_ratio(med[n], med[ours]) for n in variants]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        out.append(f"({better} is better; a ratio A / B is A's figure divided by B's)")
        if unsupported:
            out.extend(["", *unsupported])
        out.append("")

    if "selftalk" in res:
        out.append("## The generator against itself")
        out.append("")
        out.append(
            "The same pump with no server: senders write pre-built 256-byte frames to sockets that the "
            "generator itself accepted and reads. Every figure below is far under this ceiling."
        )
        out.append("")
        out.append("| pairs | msg/s |")
        out.append("|---|---|")
        for p, v in res["selftalk"].items():
            out.append(f"| {p} | {_fmt(v)} |")
        out.append("")
        if "selftalk_latency" in res:
            out.append("| offered msg/s | p50 ms | p99 ms | max ms |")
            out.append("|---|---|---|---|")
            for rate, v in res["selftalk_latency"].items():
                out.append(f"| {int(rate):,} | {v['p50']:.3f} | {v['p99']:.3f} | {v['max']:.3f} |")
            out.append("")
    table(
        "Throughput",
        "throughput",
        "rate",
        "msg/s",
        cfg["pairs"],
        "pairs",
        note=(
            "P sender→receiver pairs logged in; each sender pipelines its share of the messages "
            f"({', '.join(f'{k} {v:,}' for k, v in cfg['throughput'].items())} in all); delivered "
            "messages per second from the first send to the last receive. For chatproto (every store) "
            "every 07 is awaited afterwards and checked."
        ),
    )
    table(
        "Throughput, every 07 received",
        "throughput",
        "rate_acked",
        "msg/s",
        cfg["pairs"],
        "pairs",
        note=(
            "The same runs, timed from the first send to the last 07 (ours only): a server that delivers "
            "first and writes its 07s later shows a lower figure here."
        ),
    )
    for q in ("p50", "p99", "max"):
        table(
            f"Latency {q}",
            "latency",
            q,
            "ms",
            cfg["rates"],
            "offered msg/s",
            better="lower",
            digits=2,
            note=(
                "100 pairs, a fixed offered rate for "
                f"{cfg['latency_s']:g} s, round robin; the send time (ns) is inside the text; "
                "latency is taken when the receiver's read returns."
                if q == "p50"
                else ""
            ),
        )
    table(
        "Memory per idle logged-in connection",
        "connections",
        "kib_per_conn",
        "KiB",
        cfg["conns"],
        "connections",
        better="lower",
        digits=2,
        note=(
            "Server RSS (VmRSS in /proc/PID/status) after C clients logged in and idle, minus before, "
            "over C. "
            "chatproto's accounts are registered before the baseline, so this is the connection alone; "
            "MQTT clients also subscribe to their own topic, IRC clients are registered nicks."
        ),
    )
    table(
        "Offline drain",
        "drain",
        "rate",
        "msg/s",
        [cfg["drain"]],
        "messages held",
        note=(
            "Messages queued for one offline user (mosquitto: a persistent session with "
            "queue_qos0_messages; the relay: bytes held for a key with no receiver); time from its login "
            "(03 / CONNECT / header) to the last message received. ngircd has no offline delivery."
        ),
    )
    table(
        "Offline drain time",
        "drain",
        "seconds",
        "s",
        [cfg["drain"]],
        "messages held",
        better="lower",
        digits=3,
    )
    table(
        "Group fan-out (deliveries)",
        "fanout",
        "rate",
        "deliveries/s",
        cfg["groups"],
        "members",
        note=(
            "One member pipelines messages to a group (chatproto 10/11 group, an MQTT topic all other "
            "members subscribe to, an IRC channel, a relay key); every other member receives each: "
            f"deliveries per second ({', '.join(f'{k} {v:,}' for k, v in cfg['fanout'].items())} messages)."
        ),
    )
    table("Group fan-out (messages)", "fanout", "msg_rate", "msg/s", cfg["groups"], "members")
    if "postgres" in data and ours in names:
        out.append("## PostgreSQL against SQLite (from this run)")
        out.append("")
        out.extend(_postgres_summary(res, cfg, names))
        out.append("")
    if "throughput" in res and ours in names:
        out.append("## Targets of issue 6 (from this run)")
        out.append("")
        out.extend(_targets(res, cfg))
        out.append("")
    out.append("## Notes")
    out.append("")
    busy = _interference(res)
    if busy:
        out.append(f"- {busy}")
    if data["notes"]:
        out.extend(f"- {n}" for n in data["notes"])
    else:
        out.append("- Nothing odd: no server died or logged an error, and every message and 07 arrived.")
    out.append("")
    out.append(f"Raw figures of every run: `{data.get('json', 'bench/results.json')}`.")
    out.append("Profile of chatproto under the throughput workload: `bench/profile.txt`.")
    out.append("")
    return "\n".join(out)


def _postgres_setup(settings: dict) -> str:
    conf = ", ".join(f"`{k} = {v}`" for k, v in settings.items())
    return (
        "chatproto-pg is one node (`--db postgresql://postgres@127.0.0.1:PORT/DB`) on a PostgreSQL "
        "cluster made for the run (initdb and pg_ctl as the `postgres` user, through `tests/postgres.py`; "
        "data under /tmp on the same ext4 file system as the SQLite database, a fresh cluster and "
        "database for every run); chatproto-pg2 is two nodes on one such database, every sender logged "
        "in on node 1 and every receiver on node 2, so every message and every 07 crosses nodes through "
        "the database (commit, NOTIFY, the other node's listener). PostgreSQL, with all its processes, "
        f"is pinned to core {SERVER_CORE} with the node(s): the database shares the server's core, and "
        "chatproto-pg2's two nodes share it too. Durability as the server promises (a 07 only after "
        f"the commit): {conf}; the rest as initdb makes it (WAL flushed with fdatasync)."
    )


def _postgres_summary(res, cfg, names) -> list[str]:
    def med(kind, p, name, key):
        return median(res.get(kind, {}).get(str(p), {}).get(name, []), key)

    lines = []
    pg = [n for n in names if n.startswith("chatproto-pg")]
    if "throughput" in res:
        for p in cfg["pairs"]:
            base = med("throughput", p, "chatproto", "rate")
            parts = [f"SQLite {_fmt(base)} ({_fmt(med('throughput', p, 'chatproto', 'rate_acked'))})"]
            for n in pg:
                rate, acked = med("throughput", p, n, "rate"), med("throughput", p, n, "rate_acked")
                parts.append(f"{n} {_fmt(rate)} ({_fmt(acked)}; {_ratio(rate, base)} SQLite)")
            lines.append(f"- Throughput, P = {p}, msg/s delivered (with every 07): " + "; ".join(parts))
    if "latency" in res:
        for r in cfg["rates"]:
            parts = []
            for n in ["chatproto", *pg]:
                p50, p99 = med("latency", r, n, "p50"), med("latency", r, n, "p99")
                part = f"{'SQLite' if n == 'chatproto' else n} {_fmt(p50, 2)} / {_fmt(p99, 2)}"
                first, last = med("latency", r, n, "p50_first_tenth"), med("latency", r, n, "p50_last_tenth")
                if first is not None and last is not None and last > max(50.0, 10 * first):
                    # Offered faster than it can go: the figure is the queue, not the path.
                    part += (
                        f" (saturated: p50 of the first tenth {_fmt(first, 2)}, of the last {_fmt(last, 2)})"
                    )
                parts.append(part)
            lines.append(f"- Latency at {r:,} msg/s (p50 / p99 ms): " + "; ".join(parts))
    return lines


def _interference(res) -> str:
    """How much CPU other processes took during the measurements (other people's tests)."""
    seen = []
    for kind, by_param in res.items():
        if not isinstance(by_param, dict):
            continue
        for param, by_system in by_param.items():
            if not isinstance(by_system, dict):
                continue
            for name, runs in by_system.items():
                for r in runs if isinstance(runs, list) else []:
                    if "other_cores" in r:
                        seen.append((r["other_cores"], f"{name} {kind} {param}"))
    if not seen:
        return ""
    worst, where = max(seen)
    mid = statistics.median(v for v, _ in seen)
    return (
        f"Processes other than the benchmark's (its generator, servers and PostgreSQL) kept "
        f"{mid:.2f} cores busy during the median run, {worst:.2f} at most ({where}): "
        "figures taken while that was high are less reliable."
    )


def _runs(runs, key) -> str:
    if not runs or len(runs) < 2:
        return ""
    return " (" + "/".join(_short(r[key]) for r in runs if key in r) + ")"


def _short(v) -> str:
    if v >= 1000:
        return f"{v / 1000:.0f}k"
    if v >= 10:
        return f"{v:.0f}"
    return f"{v:.2f}"


def _targets(res, cfg) -> list[str]:
    def med(kind, p, name, key):
        return median(res.get(kind, {}).get(str(p), {}).get(name, []), key)

    lines = []
    p = max(cfg["pairs"])
    ours, mq, irc = (med("throughput", p, n, "rate") for n in ("chatproto", "mosquitto", "ngircd"))
    lines.append(
        f"- Throughput, P = {p}: chatproto {_fmt(ours)} msg/s = {_ratio(ours, mq)} mosquitto, "
        f"{_ratio(ours, irc)} ngircd (target: ≥ 1.00× mosquitto) — {_verdict(ours, mq, True)}"
    )
    r = max(cfg["rates"])
    ours, mq = med("latency", r, "chatproto", "p99"), med("latency", r, "mosquitto", "p99")
    lines.append(
        f"- p99 latency at {r:,} msg/s: chatproto {_fmt(ours, 2)} ms vs mosquitto {_fmt(mq, 2)} ms "
        f"(target: no worse) — {_verdict(mq, ours, True)}"
    )
    if "connections" in res:
        c = max(cfg["conns"])
        kib = med("connections", c, "chatproto", "kib_per_conn")
        lines.append(
            f"- Memory at {c:,} idle connections: {_fmt(kib, 2)} KiB each (target: < 3 KiB) — "
            f"{_verdict(3.0, kib, False)}"
        )
    if "drain" in res:
        d = med("drain", cfg["drain"], "chatproto", "rate")
        online = med("throughput", 1, "chatproto", "rate")
        lines.append(
            f"- Offline drain: {_fmt(d)} msg/s vs online throughput (P = 1) {_fmt(online)} msg/s "
            f"(target: at least as fast) — {_verdict(d, online, True)}"
        )
    return lines


def _verdict(a, b, allow_equal) -> str:
    if a is None or b is None:
        return "not measured"
    return "**met**" if (a >= b if allow_equal else a > b) else "**not met**"


if __name__ == "__main__":
    sys.exit(main())
