"""
What the recommended optimizations would save, measured without changing
hermux/: hermux runs once as it is and once per change, patched in at
startup (bench/patches.py, bench/quietlog.py), under the benchmark's chat
load, in interleaved rounds; CPU per request is read from /proc.  Of the
patches, none is pending; the log observers remain.

    bench/run experiments [--rounds 3] [--duration 5] [--connections 16]

The report goes to bench/profile-out/experiments.txt and stdout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics

from bench import nginx
from bench.procs import Processes, freePort, prepare
from bench.report import summarizeLoad
from bench.suite import ACCESS_TOKEN, HERE, REPO, Run, Target

# name -> (patches, twistd log option, what it stands for)
VARIANTS = {
    "hermux": ("", "--logfile=-", "hermux as it is (log to stdout, as everywhere in the benchmark)"),
    "fastlog": ("", "--logger=bench.quietlog.fastObserver", "str.format, timestamp per second, batched writes"),
    "nolog": ("", "--logger=bench.quietlog.observer", "log events emitted, then dropped (lower bound)"),
}


class Experiments(Run):
    def startVariant(self, name, upstream) -> Target:
        patches, logOption, _ = VARIANTS[name]
        port = freePort()
        argv = [self.python, "-m", "bench.patched_twistd", "-n", "--pidfile=", logOption]
        argv += self.hermuxOptions(name, upstream, port)
        env = dict(os.environ, BENCH_PATCHES=patches)
        proc = self.procs.start(name, argv, os.path.join(self.tmp, f"{name}.out"), cwd=REPO, env=env)
        proc.waitForPort(port)
        self.hermuxLogs.append(proc)
        return Target(name, port, ACCESS_TOKEN, [proc.pid])


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="bench/run experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--sse", action="store_true", help="also load each variant with the 100 KB SSE answer")
    parser.add_argument("--ttfb", action="store_true",
                        help="also measure each variant's time to first byte over the slow upstream")
    parser.add_argument("--ttfb-samples", type=int, default=50)
    parser.add_argument("--out", default=os.path.join(HERE, "profile-out"))
    args = parser.parse_args(argv)
    args.skip = ["slowread"]
    args.big_mb = 0
    args.command = "bench/run experiments " + " ".join(argv)
    names = [n for n in args.variants.split(",") if n]
    tmp = prepare("hermux-experiments-")
    procs = Processes()
    try:
        run = Experiments(args, tmp, procs)
        run.writeConfig()
        direct = run.startNginx()
        targets = [run.startVariant(name, direct) for name in names]
        run.smokeTest(targets, direct)
        runs = run.interleaved("chat", targets, nginx.CHAT_PATH, nginx.CHAT_REQUEST,
                               rounds=args.rounds, connections=args.connections, upstream=direct)
        sse = None
        if args.sse:
            sse = run.interleaved("sse", targets, nginx.SSE_PATH, nginx.STREAM_REQUEST,
                                  rounds=args.rounds, connections=8, upstream=direct)
        ttfb = None
        if args.ttfb:
            for target in targets:
                run.stopTarget(target)
            slow = run.startSlowUpstream("slow-ttfb", 0.002)
            ttfb = run.ttfb([run.startVariant(name, slow) for name in names], slow)
    finally:
        procs.stopAll()
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {name: summarizeLoad(r) for name, r in runs.items()}
    base = summary[names[0]]["cpuPerRequestMs"]
    lines = [
        f"Chat load, {args.rounds} interleaved rounds of {args.duration:.0f}s at {args.connections} "
        f"connections.  ms/req: CPU per request of the hermux process over all rounds.  paired: the "
        f"median, over rounds, of the saving against {names[0]} in the same round (and its range)",
        "",
        f"{'variant':13} {'ms/req':>7} {'saved':>14} {'paired':>6} {'(range)':>15} {'req/s':>6}  what it stands for",
    ]
    baseRounds = summary[names[0]]["cpuPerRequestRounds"]
    for name in names:
        s = summary[name]
        saved = base - s["cpuPerRequestMs"]
        paired = sorted(1 - x / b for x, b in zip(s["cpuPerRequestRounds"], baseRounds))
        lines.append(
            f"{name:13} {s['cpuPerRequestMs']:7.3f} {saved:+7.3f} ({100 * saved / base:+4.0f}%) "
            f"{100 * statistics.median(paired):+5.0f}% ({100 * paired[0]:+4.0f}% ..{100 * paired[-1]:+4.0f}%) "
            f"{s['rate']:6.0f}  {VARIANTS[name][2]}"
        )
    lines += ["", "Per round, ms/req:"]
    for name in names:
        lines.append(f"{name:13} " + ", ".join(f"{x:.3f}" for x in summary[name]["cpuPerRequestRounds"]))
    if sse:
        size = run.sizes[nginx.SSE_PATH]
        summary = {name: summarizeLoad(r, size) for name, r in sse.items()}
        base = summary[names[0]]["cpuPerMBms"]
        lines += ["", f"SSE load ({size // 1024} KiB answers, 8 connections): CPU per MB relayed",
                  f"{'variant':12} {'ms/MB':>7} {'saved':>14} {'MB/s':>6}"]
        for name in names:
            s = summary[name]
            saved = base - s["cpuPerMBms"]
            lines.append(f"{name:12} {s['cpuPerMBms']:7.2f} {saved:+7.2f} ({100 * saved / base:+4.0f}%) "
                         f"{s['mbps']:6.0f}")
    if ttfb:
        medians = {name: statistics.median(samples) for name, samples in ttfb.items()}
        direct = next(v for k, v in medians.items() if k.startswith("direct"))
        lines += ["", f"Time to first byte of a stream over the slow upstream, median of {args.ttfb_samples}, "
                  f"ms (direct: {direct:.3f})", f"{'variant':12} {'added':>7}"]
        for name in names:
            lines.append(f"{name:12} {medians[name] - direct:7.3f}")
    if run.results["errors"]:
        lines += ["", "Problems:"] + [f"- {e}" for e in run.results["errors"]]
    text = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "experiments.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0
