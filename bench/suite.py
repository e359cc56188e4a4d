"""
The benchmark run: starts the upstreams and the proxies, loads each the
same way, interleaved, and reports hermux as ratios against the baselines
measured in the same run.

    bench/run [--quick] [--record] [...]      (python -m bench does the same)

Its phases are modules of their own: bench/targets.py (configuration and
processes), bench/loads.py (the wrk runs and time to first byte),
bench/memory.py (held streams and the slow reader), bench/report.py (the
logs read and the report).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import sys
import time

from bench import nginx, report
from bench.loads import Loads
from bench.memory import Memory
from bench.procs import Processes, prepare
from bench.targets import HERE, Targets, log, maxConnections


def parseArgs(argv):
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="Benchmark hermux against a direct connection and "
        "twisted.web.proxy.ReverseProxyResource.",
        epilog="Other commands: bench/run profile, bench/run instructions, bench/run experiments "
        "(each with --help); see bench/README.md.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="a short run (about 1.5 minutes): fewer rounds, no 10,000-stream "
                        "test, a 20 MB slow read, hermux only")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the chat load (3)")
    parser.add_argument("--sse-rounds", type=int, default=2, help="interleaved rounds of the SSE load (2)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections for chat (16)")
    parser.add_argument("--sse-connections", type=int, default=8, help="wrk connections for SSE (8)")
    parser.add_argument("--ttfb-samples", type=int, default=50)
    parser.add_argument("--streams", type=int, default=1000, help="open streams per proxy (1000)")
    parser.add_argument("--many-streams", type=int, default=10000,
                        help="open streams for hermux alone (10000; 0 to skip)")
    parser.add_argument("--prompt-kb", type=int, default=0,
                        help="make each held stream's request this many KiB larger (0: a one-line prompt)")
    parser.add_argument("--stream-interval", type=float, default=5.0,
                        help="seconds between events of a held stream (5)")
    parser.add_argument("--big-mb", type=int, default=100, help="size of the slowly read answer (100)")
    parser.add_argument("--slow-read-rate", type=float, default=6.5,
                        help="the slow reader's MB/s (6.5; a 100 MB read takes ~16 s)")
    parser.add_argument("--skip", action="append", default=[],
                        choices=["chat", "sse", "ttfb", "streams", "slowread"])
    parser.add_argument("--output", default=os.path.join(HERE, "last-run"),
                        help="write the report to OUTPUT.md and the raw numbers to OUTPUT.json")
    parser.add_argument("--record", action="store_true",
                        help="also append the report to bench/RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 2
        args.sse_rounds = 1
        args.duration = 3.0
        args.ttfb_samples = 30
        args.streams = 500
        args.many_streams = 0
        args.big_mb = 20
    args.command = " ".join(["bench/run"] + list(argv))
    return args


class Suite:
    """
    The benchmark's measurements, in order, each target loaded alike; the
    results go into one dict that bench/report.py turns into the report.
    """

    def __init__(self, args, tmp: str, procs: Processes):
        self.args = args
        self.tmp = tmp
        self.results: dict = {"errors": []}
        self.targets = Targets(tmp, procs)
        self.loads = Loads(tmp, self.results["errors"], duration=args.duration)
        self.memory = Memory(self.targets, self.results["errors"],
                             promptKB=args.prompt_kb, slowReadRate=args.slow_read_rate)

    def run(self) -> dict:
        args = self.args
        skip = set(args.skip)
        self.describe()
        log("starting nginx and the slow upstreams")
        direct = self.targets.startNginx(0 if "slowread" in skip else args.big_mb * 10**6)
        self.results["sizes"] = self.targets.sizes
        if not ({"chat", "sse"} <= skip):
            self.throughput(direct)
        if "ttfb" not in skip:
            self.firstByte()
        if "streams" not in skip:
            self.heldStreams()
        if "slowread" not in skip:
            self.slowRead(direct)
        self.readLogs()
        return self.results

    def describe(self) -> None:
        """
        The machine, the command and its start.
        """
        self.results["machine"] = report.machine()
        self.results["command"] = self.args.command
        self.results["started"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.results["loadavgBefore"] = report.loadavg()
        self.results["fdLimit"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]

    def throughput(self, direct) -> None:
        """
        CPU per request, req/s and latency: the chat load on every
        target, the SSE load on direct, naive and hermux.
        """
        args, targets = self.args, self.targets
        hermux = targets.startHermux("hermux", direct)
        accessLog = targets.startHermux("hermux-accesslog", direct, logging="file")
        quiet = targets.startHermux("hermux-nolog", direct, logging="off")
        naive = targets.startNaive("naive", direct)
        nginxProxy = targets.startNginxProxy("nginx-proxy", direct)
        targets.smokeTest([nginxProxy, naive, hermux, accessLog, quiet])
        if "chat" not in args.skip:
            log("chat completions (JSON)")
            self.results["chat"] = self.loads.interleaved(
                "chat", [direct, nginxProxy, naive, hermux, accessLog, quiet],
                nginx.CHAT_PATH, nginx.CHAT_REQUEST,
                rounds=args.rounds, connections=args.connections, upstream=direct)
        if "sse" not in args.skip:
            log("streamed chat completions (100 KB of SSE each)")
            self.results["sse"] = self.loads.interleaved(
                "sse", [direct, naive, hermux], nginx.SSE_PATH, nginx.STREAM_REQUEST,
                rounds=args.sse_rounds, connections=args.sse_connections, upstream=direct)
        self.results["hermuxCpuTotal"] = hermux.cpu()
        for target in (quiet, accessLog, naive, hermux):
            targets.stop(target)

    def firstByte(self) -> None:
        """
        Time to first byte through each proxy, over the slow upstream.
        """
        log("time to first byte")
        targets = self.targets
        slow = targets.startSlowUpstream("slow-ttfb", 0.002)
        hermux = targets.startHermux("hermux-ttfb", slow)
        naive = targets.startNaive("naive-ttfb", slow)
        nginxProxy = targets.startNginxProxy("nginx-proxy-ttfb", slow)
        self.results["ttfb"] = self.loads.ttfb([nginxProxy, naive, hermux], slow, self.args.ttfb_samples)
        for target in (naive, hermux, slow):
            targets.stop(target)

    def heldStreams(self) -> None:
        """
        Memory with many open streams: through hermux (twice, and then
        many more) and through the naive proxy.
        """
        args, targets = self.args, self.targets
        slow = targets.startSlowUpstream("slow-streams", args.stream_interval)
        held = self.results.setdefault("streams", {})
        for name, start in (("hermux-streams", targets.startHermux), ("naive-streams", targets.startNaive)):
            target = start(name, slow)
            log(f"{args.streams} open streams through {name}")
            held[name] = self.memory.heldStreams(target, slow, args.streams)
            if name == "hermux-streams":
                # Once more: memory that a closed stream leaked would show
                # as a second rise.
                log(f"{args.streams} open streams through {name}, again")
                self.results["streamsAgain"] = self.memory.heldStreams(target, slow, args.streams)
                if args.many_streams:
                    self.manyStreams(target, slow)
            targets.stop(target)
        targets.stop(slow)

    def manyStreams(self, target, slow) -> None:
        # Each stream holds two descriptors in hermux (client and
        # upstream).  Without CAP_SYS_RESOURCE the hard limit may be too
        # low for the number asked: take what fits.
        args = self.args
        fits = (self.results["fdLimit"] - self.targets.process(target).files() - 40) // 2
        count = min(args.many_streams, fits, maxConnections())
        if count < args.many_streams:
            self.results["errors"].append(
                f"{count} streams instead of {args.many_streams}: the "
                f"file-descriptor limit is {self.results['fdLimit']} and cannot be raised"
            )
        log(f"{count} open streams through {target.name}")
        self.results["manyStreams"] = self.memory.heldStreams(target, slow, count)

    def slowRead(self, direct) -> None:
        """
        Memory while one client reads the big answer slowly.
        """
        args, targets = self.args, self.targets
        log(f"a slow client reading {args.big_mb} MB")
        self.results["slowRead"] = {}
        for name, start in (("hermux-slowread", targets.startHermux), ("naive-slowread", targets.startNaive)):
            if args.quick and name.startswith("naive"):
                continue
            target = start(name, direct)
            self.results["slowRead"][name] = self.memory.slowRead(target)
            targets.stop(target)

    def readLogs(self) -> None:
        """
        What the proxies' logs say, and the load average at the end.
        """
        self.results["loadavgAfter"] = report.loadavg()
        self.results["logs"], problems = report.readLogs(
            self.targets.hermuxLogs + self.targets.naiveLogs,
            {"hermux-accesslog (--access-log)": self.targets.accessLog("hermux-accesslog")},
        )
        self.results["errors"] += problems


def checkTools() -> list[str]:
    missing = []
    if shutil.which("wrk") is None:
        missing.append("wrk")
    if nginx.findNginx() is None:
        missing.append("nginx")
    return missing


def main(argv) -> int:
    args = parseArgs(argv)
    missing = checkTools()
    if missing:
        print(f"bench: missing {', '.join(missing)}: apt-get install -y {' '.join(missing)}", file=sys.stderr)
        return 2
    tmp = prepare("hermux-bench-")
    procs = Processes()
    started = time.monotonic()
    try:
        results = Suite(args, tmp, procs).run()
    finally:
        procs.stopAll()
        if args.keep:
            print(f"bench: kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    results["seconds"] = round(time.monotonic() - started, 1)
    text = report.markdown(results)
    print(text)
    with open(args.output + ".md", "w") as f:
        f.write(text)
    with open(args.output + ".json", "w") as f:
        json.dump(results, f, indent=1)
    if args.record:
        with open(os.path.join(HERE, "RESULTS.md"), "a") as f:
            f.write("\n" + text)
    return 0
