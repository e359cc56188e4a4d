"""
Instructions per proxied chat request, counted by valgrind's callgrind: a
figure that other load on a shared machine does not move, for reading the
CPU ratio (hermux against the naive proxy) without the noise of CPU seconds.

    bench/run instructions [--seconds 20] [--connections 4] [--only hermux ...] [--baseline REV]

Each proxy runs under callgrind with instrumentation off while it starts
and warms up; then instrumentation is switched on and the counters zeroed,
wrk loads it with the chat request for --seconds, and the counters are
dumped: instructions executed divided by requests completed.  Under
callgrind a proxy runs some 50 times slower, so each count covers a few
hundred requests; the naive proxy, hermux and hermux --access-log are
counted one after the other against the same nginx; with --baseline REV,
hermux at git revision REV too (from a temporary git worktree), before the
working tree's.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import subprocess
import sys

from bench import nginx, worktree
from bench.loads import Loads
from bench.procs import Processes, freePort, prepare
from bench.targets import REPO, Target, Targets, log

# Under valgrind, starting Python and importing Twisted takes a while.
_START_TIMEOUT = 300.0


def callgrindTotal(path: str) -> int:
    """
    The instructions a callgrind dump counts: its C{totals:} line, or its
    C{summary:} line.
    """
    found = {}
    with open(path) as f:
        for line in f:
            for name in ("totals:", "summary:"):
                if line.startswith(name):
                    found[name] = int(line.split()[1])
    return found.get("totals:", found.get("summary:", 0))


class Counter:
    """
    The proxies counted one after the other, in the temporary directory C{tmp}.
    """

    def __init__(self, args, tmp, procs):
        self.args = args
        self.tmp = tmp
        self.targets = Targets(tmp, procs)
        self.loads = Loads(tmp, [], duration=args.seconds)

    def startCounted(self, name: str, argv: list[str], port: int, *, env=None, cwd=REPO) -> tuple[Target, int]:
        dumps = os.path.join(self.tmp, f"{name}.callgrind")
        counted = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                   f"--callgrind-out-file={dumps}.%p"] + argv
        target = self.targets.start(name, counted, port, timeout=_START_TIMEOUT, env=env, cwd=cwd)
        return target, target.pids[0]

    def count(self, target: Target, pid: int) -> dict:
        def control(*options):
            subprocess.run(["callgrind_control", *options, str(pid)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        self.loads.load(target, nginx.CHAT_PATH, nginx.CHAT_REQUEST, seconds=3, connections=self.args.connections)
        control("--instr=on")
        control("--zero")
        measured = self.loads.load(target, nginx.CHAT_PATH, nginx.CHAT_REQUEST,
                                   seconds=self.args.seconds, connections=self.args.connections)
        before = set(glob.glob(os.path.join(self.tmp, f"{target.name}.callgrind.{pid}*")))
        control("--dump")
        [dump] = set(glob.glob(os.path.join(self.tmp, f"{target.name}.callgrind.{pid}*"))) - before
        instructions = callgrindTotal(dump)
        return {
            "requests": measured["requests"],
            "errors": measured["errors"],
            "instructions": instructions,
            "perRequest": instructions / measured["requests"] if measured["requests"] else None,
        }

    def countAll(self, baseline: worktree.Checkout | None = None) -> list[str]:
        targets = self.targets
        direct = targets.startNginx()
        variants = [
            ("naive", lambda name, port: targets.naiveArgv(direct, port), {}),
            ("hermux", lambda name, port: targets.hermuxArgv(name, direct, port), {}),
            ("hermux-accesslog", lambda name, port: targets.hermuxArgv(name, direct, port, "file"), {}),
        ]
        if baseline is not None:
            where = {"env": baseline.environ(), "cwd": baseline.tree}
            variants.insert(1, (f"hermux@{baseline.short}", variants[1][1], where))
        counts = {}
        for name, argv, where in variants:
            if self.args.only and name not in self.args.only and not where:
                continue
            port = freePort()
            target, pid = self.startCounted(name, argv(name, port), port, **where)
            log(f"counting {name}")
            counts[name] = self.count(target, pid)
            targets.stop(target)
        naive = counts["naive"]["perRequest"] if "naive" in counts else None
        out = [
            f"Instructions per chat request (callgrind; wrk at {self.args.connections} connections for "
            f"{self.args.seconds:.0f}s against each proxy under callgrind):",
            "",
            "| proxy | requests | instructions per request | vs naive |",
            "|---|---:|---:|---:|",
        ]
        for name, c in counts.items():
            ratio = f"{c['perRequest'] / naive:.2f}x" if naive and c["perRequest"] else "-"
            per = f"{c['perRequest'] / 1e6:.3f} M" if c["perRequest"] else "-"
            errors = f" ({c['errors']} errors)" if c["errors"] else ""
            out.append(f"| {name} | {c['requests']}{errors} | {per} | {ratio} |")
        return out


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="bench/run instructions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--only", action="append", default=[],
                        choices=["naive", "hermux", "hermux-accesslog"],
                        help="count only this proxy (repeatable)")
    parser.add_argument("--baseline", metavar="REV",
                        help="also count hermux at git revision REV (from a temporary worktree)")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("bench: valgrind not found: apt-get install -y valgrind", file=sys.stderr)
        return 2
    tmp = prepare("hermux-instructions-")
    procs = Processes()
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, tmp, ignore_errors=True)
        baseline = cleanup.enter_context(worktree.checkout(args.baseline, tmp)) if args.baseline else None
        cleanup.callback(procs.stopAll)
        counter = Counter(args, tmp, procs)
        print("\n".join(counter.countAll(baseline)), flush=True)
    return 0
