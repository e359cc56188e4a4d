"""
Instructions per proxied chat request, counted by valgrind's callgrind: a
figure that other load on a shared machine does not move, for reading the
CPU ratio (hermux against the naive proxy) without the noise of CPU seconds.

    bench/run instructions [--seconds 20] [--connections 4] [--only hermux ...]

Each proxy runs under callgrind with instrumentation off while it starts
and warms up; then instrumentation is switched on and the counters zeroed,
wrk loads it with the chat request for --seconds, and the counters are
dumped: instructions executed divided by requests completed.  Under
callgrind a proxy runs some 50 times slower, so each count covers a few
hundred requests; the naive proxy, hermux and hermux --access-log are
counted one after the other against the same nginx.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys

from bench import nginx
from bench.procs import Processes, freePort, prepare
from bench.suite import ACCESS_TOKEN, REPO, Run, Target

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


class Counter(Run):
    def __init__(self, args, tmp, procs):
        super().__init__(args, tmp, procs)
        self.args.big_mb = 0  # no 100 MB file for nginx to serve

    def startCounted(self, name: str, argv: list[str], port: int) -> tuple[Target, int]:
        dumps = os.path.join(self.tmp, f"{name}.callgrind")
        counted = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                   f"--callgrind-out-file={dumps}.%p"] + argv
        proc = self.procs.start(name, counted, os.path.join(self.tmp, f"{name}.out"), cwd=REPO)
        proc.waitForPort(port, timeout=_START_TIMEOUT)
        return Target(name, port, ACCESS_TOKEN, [proc.pid]), proc.pid

    def count(self, target: Target, pid: int) -> dict:
        def control(*options):
            subprocess.run(["callgrind_control", *options, str(pid)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        self.load(target, nginx.CHAT_PATH, nginx.CHAT_REQUEST, seconds=3, connections=self.args.connections)
        control("--instr=on")
        control("--zero")
        measured = self.load(target, nginx.CHAT_PATH, nginx.CHAT_REQUEST,
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

    def countAll(self) -> list[str]:
        direct = self.startNginx()
        variants = [
            ("naive", lambda port: self.naiveArgv(direct, port)),
            ("hermux", lambda port: self.hermuxArgv("hermux", direct, port)),
            ("hermux-accesslog", lambda port: self.hermuxArgv("hermux-accesslog", direct, port, "file")),
        ]
        counts = {}
        for name, argv in variants:
            if self.args.only and name not in self.args.only:
                continue
            port = freePort()
            target, pid = self.startCounted(name, argv(port), port)
            self.log(f"counting {name}")
            counts[name] = self.count(target, pid)
            self.procs.stop(self.process(target))
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
            per = f"{c['perRequest'] / 1e6:.2f} M" if c["perRequest"] else "-"
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
    args = parser.parse_args(argv)
    args.duration = args.seconds
    args.skip = []
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("bench: valgrind not found: apt-get install -y valgrind", file=sys.stderr)
        return 2
    tmp = prepare("hermux-instructions-")
    procs = Processes()
    try:
        counter = Counter(args, tmp, procs)
        counter.writeConfig()
        print("\n".join(counter.countAll()), flush=True)
    finally:
        procs.stopAll()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0
