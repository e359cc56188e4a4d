"""
Variants of hermux measured against each other under the benchmark's chat
load, one process each, in interleaved rounds; CPU per request is read
from /proc.  The first variant is the reference: "paired" is the median,
over rounds, of each variant's saving against it in the same round.

- hermux as it is in the working tree ("hermux");
- with --baseline REV, hermux at revision REV, first: a git worktree of REV
  in the run's temporary directory, run with PYTHONPATH pointing at it and
  removed afterwards.  Against the working tree's hermux this gives the
  CPU per request before and after a change from one invocation, paired
  round by round;
- twistd's log observer replaced by a cheaper one (bench/quietlog.py,
  "fastlog") or by one that drops the events ("nolog"): what twistd's log
  line costs hermux;
- a candidate optimization patched in at startup (bench/patches.py; none
  is pending);
- hermux sharing its pool through Redis ("redis": --redis to a
  redis-server the benchmark starts on loopback, in its temporary
  directory): what sharing costs per request.

    bench/run experiments [--baseline REV] [--variants hermux,fastlog,nolog]
        [--rounds 3] [--duration 5] [--connections 16] [--sse] [--ttfb]

The report goes to bench/profile-out/experiments.txt and stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys

import attr

from bench import names, nginx, patches, report, worktree
from bench.loads import Loads
from bench.procs import Processes, freePort, prepare
from bench.report import summarizeLoad
from bench.targets import HERE, REPO, TWISTD, Target, Targets, log


@attr.frozen
class Variant:
    """
    A way to run hermux: twistd's log option C{logOption}, the patches of
    bench/patches.py applied at startup, and the checkout (C{tree}) whose
    hermux runs.
    """

    name: str
    what: str
    logOption: str = "--logfile=-"
    patches: tuple[str, ...] = ()
    tree: str = REPO
    redis: bool = False

    def argv(self, python: str, options: list[str], redisURL: str | None = None) -> list[str]:
        twistd = [python, "-m", "bench.patched_twistd"] if self.patches else [python, "-c", TWISTD]
        shared = ["--redis", redisURL, "--instance-name", self.name] if self.redis else []
        return twistd + ["-n", "--pidfile=", self.logOption] + options + shared

    def environ(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.patches:
            env["BENCH_PATCHES"] = ",".join(self.patches)
        if self.tree != REPO:
            env["PYTHONPATH"] = self.tree
        return env


VARIANTS = (
    Variant("hermux", "hermux as it is (log to stdout, as everywhere in the benchmark)"),
    Variant("fastlog", "twistd's log by str.format, a timestamp per second, batched writes",
            "--logger=bench.quietlog.fastObserver"),
    Variant("nolog", "log events emitted, then dropped (lower bound)", "--logger=bench.quietlog.observer"),
    Variant("redis", "hermux as it is, sharing its pool through a loopback redis-server", redis=True),
)


def variantProblems(variant: Variant) -> list[str]:
    """
    Why C{variant} cannot run as it says: a patch that does not exist, a
    name in hermux/ that a patch replaces and that is gone, a log observer
    that is not there.
    """
    problems = []
    for name in variant.patches:
        if name not in patches.PATCHES:
            problems.append(f"{variant.name}: no patch {name!r} in bench/patches.py")
            continue
        for dotted in patches.PATCHES[name].names:
            problem = names.attributeProblem(dotted)
            if problem:
                problems.append(f"{variant.name}, patch {name}: {problem}")
    if variant.logOption.startswith("--logger="):
        problem = names.attributeProblem(variant.logOption[len("--logger="):])
        if problem:
            problems.append(f"{variant.name}: {problem}")
    if variant.redis and shutil.which("redis-server") is None:
        problems.append(f"{variant.name}: redis-server is not installed (apt-get install redis-server)")
    return problems


@contextlib.contextmanager
def baseline(revision: str, tmp: str):
    """
    A variant running hermux at C{revision}, from a git worktree made in
    C{tmp} and removed when the context ends.
    """
    with worktree.checkout(revision, tmp) as found:
        yield Variant(f"hermux@{found.short}", f"hermux at {revision} ({found.commit[:12]}), from a git worktree",
                      tree=found.tree)


class Experiments:
    """
    The variants' processes and loads, in the temporary directory C{tmp}.
    """

    def __init__(self, args, tmp: str, procs: Processes):
        self.args = args
        self.targets = Targets(tmp, procs)
        self.problems: list[str] = []
        self.loads = Loads(tmp, self.problems, duration=args.duration)
        self._tmp = tmp
        self._procs = procs
        self._redisURL: str | None = None

    def redisURL(self) -> str:
        """
        The URL of the benchmark's redis-server, started at the first call.
        """
        if self._redisURL is None:
            port = freePort()
            argv = [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                    "--dir", self._tmp, "--save", "", "--appendonly", "no"]
            self._procs.start("redis-server", argv, os.path.join(self._tmp, "redis.log")).waitForPort(port)
            self._redisURL = f"redis://127.0.0.1:{port}/0"
        return self._redisURL

    def start(self, variant: Variant, upstream: Target) -> Target:
        port = freePort()
        options = self.targets.hermuxOptions(variant.name, upstream, port)
        argv = variant.argv(self.targets.python, options, self.redisURL() if variant.redis else None)
        return self.targets.start(variant.name, argv, port, logs=self.targets.hermuxLogs,
                                  env=variant.environ(), cwd=variant.tree)

    def measure(self, variants: list[Variant]) -> dict:
        """
        The chat load on every variant (and the SSE load and the time to
        first byte, if asked), interleaved.
        """
        args = self.args
        direct = self.targets.startNginx()
        targets = [self.start(variant, direct) for variant in variants]
        self.targets.smokeTest(targets)
        measured = {"chat": self.loads.interleaved(
            "chat", targets, nginx.CHAT_PATH, nginx.CHAT_REQUEST,
            rounds=args.rounds, connections=args.connections, upstream=direct)}
        if args.sse:
            measured["sse"] = self.loads.interleaved(
                "sse", targets, nginx.SSE_PATH, nginx.STREAM_REQUEST,
                rounds=args.rounds, connections=8, upstream=direct)
        if args.ttfb:
            for target in targets:
                self.targets.stop(target)
            slow = self.targets.startSlowUpstream("slow-ttfb", 0.002)
            measured["ttfb"] = self.loads.ttfb([self.start(v, slow) for v in variants], slow,
                                               args.ttfb_samples)
        return measured

    def readLogs(self) -> None:
        _, problems = report.readLogs(self.targets.hermuxLogs, {})
        self.problems += problems


def reportText(args, variants: list[Variant], measured: dict, sizes: dict, problems: list[str],
               machine: dict) -> str:
    order = [v.name for v in variants]
    what = {v.name: v.what for v in variants}
    width = max(13, max(map(len, order)) + 1)
    reference = order[0]
    summary = {name: summarizeLoad(r) for name, r in measured["chat"].items()}
    base = summary[reference]["cpuPerRequestMs"]
    baseRounds = summary[reference]["cpuPerRequestRounds"]
    lines = [
        f"Working tree: {machine['commit']}; load average {machine['loadavg']}.",
        f"Chat load, {args.rounds} interleaved rounds of {args.duration:.0f}s at {args.connections} "
        f"connections.  ms/req: CPU per request of the hermux process over all rounds.  paired: the "
        f"median, over rounds, of the saving against {reference} in the same round (and its range)",
        "",
        f"{'variant':{width}} {'ms/req':>7} {'saved':>14} {'paired':>6} {'(range)':>15} {'req/s':>6}  "
        "what it stands for",
    ]
    paired = {}
    for name in order:
        s = summary[name]
        saved = base - s["cpuPerRequestMs"]
        paired[name] = sorted(1 - x / b for x, b in zip(s["cpuPerRequestRounds"], baseRounds))
        lines.append(
            f"{name:{width}} {s['cpuPerRequestMs']:7.3f} {saved:+7.3f} ({100 * saved / base:+4.0f}%) "
            f"{100 * statistics.median(paired[name]):+5.0f}% "
            f"({100 * paired[name][0]:+4.0f}% ..{100 * paired[name][-1]:+4.0f}%) "
            f"{s['rate']:6.0f}  {what[name]}"
        )
    lines += ["", "Per round, ms/req:"]
    for name in order:
        lines.append(f"{name:{width}} " + ", ".join(f"{x:.3f}" for x in summary[name]["cpuPerRequestRounds"]))
    if args.baseline and "hermux" in order:
        after = summary["hermux"]
        ratios = sorted(x / b for x, b in zip(after["cpuPerRequestRounds"], baseRounds))
        lines += [
            "",
            f"Before and after: {reference} {base:.3f} ms CPU per request, the working tree's hermux "
            f"{after['cpuPerRequestMs']:.3f} ms ({after['cpuPerRequestMs'] / base:.3f}x); per round "
            f"{', '.join(f'{r:.3f}x' for r in ratios)} (sorted), median {statistics.median(ratios):.3f}x",
        ]
    if "sse" in measured:
        size = sizes[nginx.SSE_PATH]
        summary = {name: summarizeLoad(r, size) for name, r in measured["sse"].items()}
        base = summary[reference]["cpuPerMBms"]
        lines += ["", f"SSE load ({size // 1024} KiB answers, 8 connections): CPU per MB relayed",
                  f"{'variant':{width}} {'ms/MB':>7} {'saved':>14} {'MB/s':>6}"]
        for name in order:
            s = summary[name]
            saved = base - s["cpuPerMBms"]
            lines.append(f"{name:{width}} {s['cpuPerMBms']:7.2f} {saved:+7.2f} ({100 * saved / base:+4.0f}%) "
                         f"{s['mbps']:6.0f}")
    if "ttfb" in measured:
        medians = {name: statistics.median(samples) for name, samples in measured["ttfb"].items()}
        direct = next(v for k, v in medians.items() if k.startswith("direct"))
        lines += ["", f"Time to first byte of a stream over the slow upstream, median of {args.ttfb_samples}, "
                  f"ms (direct: {direct:.3f})", f"{'variant':{width}} {'added':>7}"]
        for name in order:
            lines.append(f"{name:{width}} {medians[name] - direct:7.3f}")
    if problems:
        lines += ["", "Problems:"] + [f"- {e}" for e in problems]
    else:
        lines += ["", "Problems: none"]
    return "\n".join(lines)


def main(argv) -> int:
    byName = {variant.name: variant for variant in VARIANTS}
    parser = argparse.ArgumentParser(prog="bench/run experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", metavar="REV",
                        help="also run hermux at git revision REV (from a temporary worktree), "
                        "first: the reference")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--variants", default=",".join(byName),
                        help=f"comma-separated, of {', '.join(byName)} (all)")
    parser.add_argument("--sse", action="store_true", help="also load each variant with the 100 KB SSE answer")
    parser.add_argument("--ttfb", action="store_true",
                        help="also measure each variant's time to first byte over the slow upstream")
    parser.add_argument("--ttfb-samples", type=int, default=50)
    parser.add_argument("--out", default=os.path.join(HERE, "profile-out"))
    args = parser.parse_args(argv)
    chosen = [n for n in args.variants.split(",") if n]
    unknown = [n for n in chosen if n not in byName]
    if unknown or not (chosen or args.baseline):
        parser.error(f"--variants: {', '.join(unknown) or 'none'}; choose from {', '.join(byName)}")
    variants = [byName[n] for n in chosen]
    problems = [problem for variant in variants for problem in variantProblems(variant)]
    if problems:
        print("\n".join(f"bench: {problem}" for problem in problems), file=sys.stderr)
        return 2
    tmp = prepare("hermux-experiments-")
    procs = Processes()
    machine = report.machine()
    machine["loadavg"] = report.loadavg()
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, tmp, ignore_errors=True)
        if args.baseline:
            variants.insert(0, cleanup.enter_context(baseline(args.baseline, tmp)))
        cleanup.callback(procs.stopAll)
        run = Experiments(args, tmp, procs)
        log(f"variants: {', '.join(v.name for v in variants)}")
        measured = run.measure(variants)
        procs.stopAll()
        run.readLogs()
    machine["loadavg"] += f" -> {report.loadavg()}"
    text = reportText(args, variants, measured, run.targets.sizes, run.problems, machine)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "experiments.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0
