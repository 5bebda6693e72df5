"""Profile chatproto under the throughput workload with py-spy; write bench/profile.txt.

    python bench/profile.py [--pairs 100] [--messages 300000] [--rate 250]

The server runs pinned to core 0 as in run.py; the generator and py-spy run
on core 1. py-spy samples every thread of the server (without pausing it) and
the samples are summed three ways: by thread, by function where the sample
was taken (self), and by function anywhere on the stack (inclusive).
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadgen import Stream, block_of, pump
from systems import Chat, export_tree

BENCH = Path(__file__).resolve().parent


def parse_raw(path: Path):
    """py-spy's raw format: ``frame;frame;...;leaf count`` per line, root first."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def _fn(frame: str) -> str:
    """``name (path/to/file.py:123)`` → ``name (file.py)``: one entry per function."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    parts = file.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else file
    return f"{name} ({short})"


def summarize(stacks, top=30) -> str:
    total = sum(c for _, c in stacks) or 1
    threads = collections.Counter()
    self_t = collections.Counter()
    incl = collections.Counter()
    lines_self = collections.Counter()
    for frames, count in stacks:
        thread = frames[0] if frames and frames[0].startswith(("thread", "process")) else "?"
        body = [f for f in frames if not f.startswith(("thread", "process"))]
        name = "reactor (main thread)"
        if body and body[-1].startswith(("Condition.wait", "wait (threading")):
            name = "SQLite thread, idle: waiting for a batch"
        elif any("chatproto/store/sqlite.py" in f and "_transaction" in f for f in body) or any(
            "_threadworker" in f for f in body
        ):
            name = "SQLite thread"
        threads[name] += count
        if body:
            self_t[_fn(body[-1])] += count
            lines_self[body[-1]] += count
        for fn in {_fn(f) for f in body}:
            incl[fn] += count
        del thread
    out = [f"samples: {total}", "", "By thread (share of all samples):"]
    for name, c in threads.most_common():
        out.append(f"  {100 * c / total:5.1f}%  {name}")
    out += ["", f"Top {top} functions by self time (where the sample was taken):"]
    for name, c in self_t.most_common(top):
        out.append(f"  {100 * c / total:5.1f}%  {name}")
    out += ["", f"Top {top} functions by inclusive time (anywhere on the stack):"]
    for name, c in incl.most_common(top + 15):
        if name.startswith(("<module>", "_run_code", "_run_module_as_main", "main (", "run (")):
            continue
        out.append(f"  {100 * c / total:5.1f}%  {name}")
    out += ["", "Top 25 source lines by self time:"]
    for name, c in lines_self.most_common(25):
        out.append(f"  {100 * c / total:5.1f}%  {name}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--messages", type=int, default=300_000)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--ref", default="HEAD", help="git ref of the chatproto code, or 'worktree'")
    ap.add_argument("--output", default=str(BENCH / "profile.txt"))
    args = ap.parse_args(argv)
    spy = shutil.which("py-spy")
    if spy is None:
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory(prefix="chatprofile-") as tmp:
        work = Path(tmp)
        Chat.source, code = export_tree(args.ref, work / "src")
        chat = Chat(work, 0)
        chat.start()
        try:
            per = args.messages // args.pairs
            streams = []
            for s, r, make, _ in chat.pairs(args.pairs):
                block, repeat = block_of(make, per)
                streams += [Stream(s, block, repeat), Stream(r, need=per * chat.rx)]
            # Two recorders at once: every busy thread (wall time, including a
            # thread waiting for the GIL), and only the thread holding the GIL
            # (where the CPU time of Python code goes; native frames show C
            # functions such as the cyclic garbage collector, gc_collect_main).
            recorders = {}
            both = (
                ("all threads", ["--nonblocking"]),
                ("GIL holder, with native frames", ["--gil", "--native"]),
            )
            for kind, flags in both:
                raw = work / f"profile-{len(recorders)}.raw"
                proc = subprocess.Popen(
                    ["taskset", "-c", "1", spy, "record", "--pid", str(chat.server.pid), "--format", "raw"]
                    + ["--threads", "--rate", str(args.rate), "--output", str(raw), *flags],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                recorders[kind] = (proc, raw)
            time.sleep(1.0)
            start, end, unfinished = pump(streams, timeout=600)
            rate = per * args.pairs / (end - start)
            summaries = []
            for kind, (proc, raw) in recorders.items():
                proc.send_signal(signal.SIGINT)
                try:
                    _, err = proc.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    _, err = proc.communicate()
                if not raw.exists():
                    print(f"py-spy wrote nothing: {err.decode(errors='replace')}", file=sys.stderr)
                    return 1
                summaries.append(f"=== Samples of {kind} ===\n\n" + summarize(parse_raw(raw)))
            summary = "\n\n".join(summaries)
        finally:
            chat.stop()
    header = (
        "chatproto under the throughput workload, profiled with py-spy "
        f"(`python bench/profile.py --pairs {args.pairs} --messages {args.messages}`).\n"
        f"Server code: {code}. {args.pairs} pairs, {per * args.pairs:,} messages, "
        f"{rate:,.0f} msg/s while sampled"
        f"{' (UNFINISHED)' if unfinished else ''}; "
        f"{args.rate} samples/s, idle samples left out. Under 'all threads', a thread waiting for\n"
        "the GIL is sampled where it waits; under 'GIL holder' only the thread running Python is.\n"
    )
    Path(args.output).write_text(header + "\n" + summary + "\n")
    print(header + "\n" + summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
