"""
Where hermux spends its time and memory: hermux behind the same nginx
upstream as the benchmark, under the same chat load, observed three ways.

- py-spy samples the hermux process (no instrumentation): own and
  cumulative time per function, and own time per source file, turned into
  milliseconds per request with the process's CPU time from /proc.
- cProfile (twistd --profiler=cprofile) counts calls: how many times each
  function runs per request, and its deterministic own and cumulative time
  (inflated by the profiler, so use it for counts and proportions).
- tracemalloc (bench/tracemalloc_twistd.py): the Python allocations that
  1000 open streams hold, by source line, per stream.

    bench/run profile [--seconds 15] [--skip pyspy|cprofile|memory] [--access-log]

Reports go to bench/profile-out/ (and a summary to stdout).
"""

from __future__ import annotations

import argparse
import collections
import linecache
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc

from bench import names, nginx
from bench.loads import Loads
from bench.memory import Memory
from bench.procs import Processes, freePort, prepare
from bench.targets import HERE, REPO, TWISTD, Targets

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_SITE = re.compile(r"^.*?/(site|dist)-packages/")
_STDLIB = re.compile(r"^.*?/lib/python3\.\d+/")


def frameKey(frame: str) -> tuple[str, str]:
    """
    A py-spy frame (C{"function (path/to/file.py:123)"}) as the function
    and the shortened file it is in, without the line, so that samples of
    one function at different lines add up.
    """
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), "?"
    return match.group("function"), _shortPath(match.group("file"))


# What the hot path is made of: a sample belongs to the innermost of these
# functions on its stack, so each line counts its function's time less the
# time of the ones nested in it.  (function, file) -> what it stands for.
# A function is named as py-spy names its frames: by the class that defines
# it, in the file that defines it (tests/test_bench.py checks that each is).
STEPS = [
    (("EPollReactor.doPoll", "twisted/internet/epollreactor.py"), "reactor: epoll wait and dispatch"),
    (("Connection.doRead", "twisted/internet/tcp.py"), "sockets: recv and dispatch"),
    (("FileDescriptor.doWrite", "twisted/internet/abstract.py"), "sockets: send (buffered writes)"),
    (("HTTPChannel.dataReceived", "twisted/web/http.py"), "server: parse the request line and headers"),
    (("Request.requestReceived", "twisted/web/http.py"), "server: request setup (Content-Type parse via email, args)"),
    (("Request.process", "twisted/web/server.py"), "server: resource traversal, render plumbing"),
    (("AccessList.authorize", "hermux/access.py"), "hermux: authorize (SHA-256 of the token)"),
    (("upstreamTarget", "hermux/hygiene.py"), "hermux: check the request target"),
    (("KeyPool.acquire", "hermux/keypool.py"), "hermux: choose the key"),
    (("Relay.forward", "hermux/relay.py"), "hermux: start the exchange (coroutine, Deferreds, watchdog)"),
    (("_Watchdog.__init__", "hermux/relay.py"), "hermux: idle watchdog (callLater)"),
    (("_Watchdog.kick", "hermux/relay.py"), "hermux: idle watchdog (reset per chunk)"),
    (("_Watchdog.stop", "hermux/relay.py"), "hermux: idle watchdog (cancel)"),
    (("_Exchange._open", "hermux/relay.py"), "hermux: send upstream (glue around Agent.request)"),
    (("upstreamHeaders", "hermux/hygiene.py"), "hermux: filter request headers"),
    (("_requestBody", "hermux/relay.py"), "hermux: request body"),
    (("Agent.request", "twisted/web/client.py"), "Agent.request: URI parse, origin form, key"),
    (("_UpstreamAgent.request", "hermux/upstream.py"), "hermux's agent: origin looked up, client Request made"),
    (("HostnameEndpoint.__init__", "twisted/internet/endpoints.py"), "Agent.request: new HostnameEndpoint (IDNA)"),
    (("_StandardEndpointFactory.endpointForURI", "twisted/web/client.py"), "Agent.request: endpoint for URI"),
    (("HTTPConnectionPool.getConnection", "twisted/web/client.py"), "Agent.request: pool lookup"),
    (("HTTP11ClientProtocol.request", "twisted/web/_newclient.py"), "client: serialize and write the request"),
    (("HTTP11ClientProtocol.dataReceived", "twisted/web/_newclient.py"), "client: parse the response"),
    (("_Exchange._sendHead", "hermux/relay.py"), "hermux: response head to the client"),
    (("copyResponseHeaders", "hermux/hygiene.py"), "hermux: filter response headers"),
    (("_BodyRelay.dataReceived", "hermux/relay.py"), "hermux: relay body chunks"),
    (("Request.write", "twisted/web/http.py"), "server: write head and body (chunked framing)"),
    (("_BodyReader.connectionLost", "hermux/relay.py"), "hermux: end of body"),
    (("_Exchange._relayBody", "hermux/relay.py"), "hermux: end of exchange (unregister, finish)"),
    (("Request.finish", "twisted/web/http.py"), "server: finish the request"),
    (("HTTPConnectionPool._putConnection", "twisted/web/client.py"), "client: return the connection to the pool"),
    (("HermuxRequest._over", "hermux/site.py"), "log line: hermux's fields"),
    (("RequestLogEvents.record", "hermux/requestlog.py"), "log line: the event for twistd's log (str.format)"),
    (("RequestLogFile.record", "hermux/requestlog.py"), "log line: --access-log (format, queue)"),
    (("Logger.emit", "twisted/logger/_logger.py"), "log line: twisted.logger emit"),
    (("FileLogObserver.__call__", "twisted/logger/_file.py"), "log line: format and write"),
    (("HTTPChannel.connectionLost", "twisted/web/http.py"), "server: connection closed"),
]
_STEPS = dict(STEPS)
_IDLE_THREAD = ("Condition.wait", "threading.py")


def collapse(lines, steps=_STEPS) -> dict:
    """
    Sum py-spy's raw (collapsed) stacks, one C{"frame;frame;... count"}
    per line, into own and cumulative samples per function, own samples per
    file, and samples per step of the hot path (see L{STEPS}).

    Threads waiting for work are left out: py-spy does not always see that
    they are idle.
    """
    total = 0
    idle = 0
    own: collections.Counter = collections.Counter()
    cumulative: collections.Counter = collections.Counter()
    files: collections.Counter = collections.Counter()
    byStep: collections.Counter = collections.Counter()
    for line in lines:
        line = line.rstrip("\n")
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        frames = [frameKey(frame) for frame in stack.split(";")]
        if _IDLE_THREAD in frames:
            idle += samples
            continue
        total += samples
        own[frames[-1]] += samples
        files[frames[-1][1]] += samples
        for key in set(frames):
            cumulative[key] += samples
        step = next((steps[f] for f in reversed(frames) if f in steps), "other")
        byStep[step] += samples
    return {"total": total, "idle": idle, "own": own, "cumulative": cumulative,
            "files": files, "steps": byStep}


def _table(title, counter, total, perRequest, limit) -> list[str]:
    out = [title, f"{'%':>6} {'ms/req':>8}  function (file)"]
    for (function, path), samples in counter.most_common(limit):
        share = samples / total
        out.append(f"{100 * share:6.1f} {share * perRequest:8.4f}  {function} ({path})")
    return out + [""]


def _fileTable(title, counter, total, perRequest, limit) -> list[str]:
    out = [title, f"{'%':>6} {'ms/req':>8}"]
    for path, samples in counter.most_common(limit):
        share = samples / total
        out.append(f"{100 * share:6.1f} {share * perRequest:8.4f}  {path}")
    return out + [""]


def staleSteps(steps=STEPS) -> list[str]:
    """
    Why each step that names no function as it is now names nothing.
    """
    found = (names.functionProblem(function, path) for (function, path), _ in steps)
    return [problem for problem in found if problem]


class Profiler:
    """
    hermux profiled three ways, in the temporary directory C{tmp}, with
    the reports' files in C{out}.
    """

    def __init__(self, args, tmp, procs, out):
        self.args = args
        self.tmp = tmp
        self.procs = procs
        self.out = out
        self.python = sys.executable
        self.targets = Targets(tmp, procs)
        self.problems: list[str] = []
        self.loads = Loads(tmp, self.problems, duration=args.seconds)
        self.streams = Memory(self.targets, self.problems, promptKB=args.prompt_kb)

    def startHermuxWith(self, name, upstream, prefix, env=None):
        port = freePort()
        argv = prefix + ["-n", "--pidfile=", "--logfile=-"] + self.targets.hermuxOptions(name, upstream, port)
        if self.args.access_log:
            argv += ["--access-log", self.targets.accessLog(name)]
        environ = dict(os.environ, **(env or {}))
        # Slow to start under tracemalloc.
        target = self.targets.start(name, argv, port, env=environ, timeout=90)
        return target, self.targets.process(target)

    def chatLoad(self, target, seconds):
        return self.loads.load(target, nginx.CHAT_PATH, nginx.CHAT_REQUEST,
                               seconds=seconds, connections=self.args.connections)

    def pyspy(self, direct) -> list[str]:
        pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        if not os.path.exists(pyspy):
            return ["py-spy not found: pip install py-spy", ""]
        target, proc = self.startHermuxWith("hermux-pyspy", direct, [self.python, "-c", TWISTD])
        self.chatLoad(target, 2)
        raw = os.path.join(self.out, "pyspy-raw.txt")
        seconds = self.args.seconds
        recorder = subprocess.Popen(
            [pyspy, "record", "--pid", str(proc.pid), "--rate", str(self.args.rate),
             "--duration", str(int(seconds) + 1), "--format", "raw", "--output", raw],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        measured = self.chatLoad(target, seconds)
        recorder.wait(timeout=seconds + 60)
        self.procs.stop(proc)
        perRequest = 1000 * measured["cpu"] / measured["requests"]
        with open(raw) as f:
            summary = collapse(f)
        total = summary["total"]
        out = [
            f"py-spy, {self.args.rate} Hz, chat load for {seconds:.0f}s at {self.args.connections} connections "
            f"({'--access-log' if self.args.access_log else 'logging on'}): {measured['requests']} requests at {measured['rate']:.0f}/s, hermux CPU "
            f"{measured['cpu']:.2f}s = {perRequest:.3f} ms/request; {total} samples "
            f"({summary['idle']} of idle threads left out); each share of the samples is turned into "
            "ms/request",
            "",
        ]
        out += _fileTable("The hot path by step (a sample counts for the innermost step on its stack)",
                          summary["steps"], total, perRequest, 60)
        out += _table("Own time (top 40)", summary["own"], total, perRequest, 40)
        out += _table("Cumulative time (top 70)", summary["cumulative"], total, perRequest, 70)
        out += _fileTable("Own time by source file", summary["files"], total, perRequest, 30)
        return out

    def cprofile(self, direct) -> list[str]:
        stats = os.path.join(self.out, "hermux.cprof")
        target, proc = self.startHermuxWith(
            "hermux-cprofile", direct,
            [self.python, "-c", TWISTD, f"--profile={stats}", "--profiler=cprofile", "--savestats"],
        )
        warmup = self.chatLoad(target, 1)
        measured = self.chatLoad(target, self.args.seconds)
        self.procs.stop(proc)  # twistd writes the statistics as it stops
        requests = warmup["requests"] + measured["requests"]
        p = pstats.Stats(stats)
        out = [
            f"cProfile, chat load for {self.args.seconds:.0f}s after a 1s warm-up: {requests} requests "
            f"profiled, {measured['rate']:.0f}/s under the profiler.  calls/req and ms/req divide by "
            "that count; the times are inflated by the profiler, so read them as proportions",
            "",
        ]
        for column, title in ((2, "By own time"), (3, "By cumulative time")):
            rows = sorted(p.stats.items(), key=lambda item: item[1][column], reverse=True)
            out += [f"{title} (top 45)", f"{'calls/req':>9} {'own ms/req':>10} {'cum ms/req':>10}  function"]
            for (path, line, function), (cc, nc, tt, ct, callers) in rows[:45]:
                out.append(f"{nc / requests:9.2f} {1000 * tt / requests:10.4f} {1000 * ct / requests:10.4f}  "
                           f"{function} ({_shortPath(path)}:{line})")
            out.append("")
        return out

    def memory(self, slow) -> list[str]:
        snapshot = os.path.join(self.tmp, "snapshot")
        target, proc = self.startHermuxWith(
            "hermux-tracemalloc", slow, [self.python, "-m", "bench.tracemalloc_twistd"],
            env={"BENCH_SNAPSHOT": snapshot},
        )

        def takeSnapshot(number, collect=False):
            proc.popen.send_signal(signal.SIGUSR2 if collect else signal.SIGUSR1)
            deadline = time.monotonic() + 120
            while not os.path.exists(f"{snapshot}.{number}") and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1)  # let the dump finish writing

        self.streams.heldStreams(target, slow, 50)  # warm up: pools, caches, code paths
        takeSnapshot(1)
        held = self.streams.heldStreams(target, slow, self.args.streams, onOpened=lambda: takeSnapshot(2))
        takeSnapshot(3, collect=True)
        with open(f"{snapshot}.3.gc") as f:
            collected = int(f.read())
        self.procs.stop(proc)
        ignore = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen *>")]
        before = tracemalloc.Snapshot.load(f"{snapshot}.1").filter_traces(ignore)
        during = tracemalloc.Snapshot.load(f"{snapshot}.2").filter_traces(ignore)
        after = tracemalloc.Snapshot.load(f"{snapshot}.3").filter_traces(ignore)
        opened = held["opened"]
        grown = sum(s.size_diff for s in during.compare_to(before, "filename"))
        kept = sum(s.size_diff for s in after.compare_to(before, "filename"))
        out = [
            f"tracemalloc: {opened} streams held open through hermux, compared with after 50 streams "
            f"came and went.  Live Python allocations grew by {grown / 1024:.0f} KiB = "
            f"{grown / opened / 1024:.1f} KiB/stream.  After all were closed, gc.collect() found "
            f"{collected} unreachable objects (reference cycles) and then {kept / 1024:.0f} KiB more than "
            "before remained allocated.  (RSS under tracemalloc is not representative: see "
            "bench/RESULTS.md for RSS per stream.)",
            "",
            "Growth by source line (top 40)",
            f"{'B/stream':>9} {'blocks/stream':>13}  line",
        ]
        for stat in during.compare_to(before, "lineno")[:40]:
            frame = stat.traceback[0]
            out.append(f"{stat.size_diff / opened:9.0f} {stat.count_diff / opened:13.1f}  "
                       f"{_shortPath(frame.filename)}:{frame.lineno}  {_line(frame)}")
        out += ["", "Growth by file (top 20)", f"{'B/stream':>9}  file"]
        for stat in during.compare_to(before, "filename")[:20]:
            out.append(f"{stat.size_diff / opened:9.0f}  {_shortPath(stat.traceback[0].filename)}")
        out += ["", "Growth by allocating call stack (top 15, innermost frame first)"]
        for stat in during.compare_to(before, "traceback")[:15]:
            out.append(f"{stat.size_diff / opened:9.0f} B/stream, {stat.count_diff / opened:.1f} blocks:")
            for frame in list(reversed(stat.traceback))[:8]:
                out.append(f"      {_shortPath(frame.filename)}:{frame.lineno}  {_line(frame)}")
        out += ["", "Still allocated after the streams closed and gc.collect(), by line (top 10)",
                f"{'KiB':>9}  line"]
        for stat in after.compare_to(before, "lineno")[:10]:
            frame = stat.traceback[0]
            out.append(f"{stat.size_diff / 1024:9.1f}  {_shortPath(frame.filename)}:{frame.lineno}  {_line(frame)}")
        return out + [""]


def _shortPath(path: str) -> str:
    """
    A source path without the directories of the installation: relative
    to site-packages, the standard library or the repository.
    """
    path = _SITE.sub("", path)
    path = _STDLIB.sub("", path)
    if path.startswith(REPO + "/"):
        path = path[len(REPO) + 1 :]
    return path


def _line(frame) -> str:
    return linecache.getline(frame.filename, frame.lineno).strip()[:70]


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="bench/run profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second (100)")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--prompt-kb", type=int, default=0)
    parser.add_argument("--access-log", action="store_true",
                        help="run hermux with its request lines in an --access-log file")
    parser.add_argument("--skip", action="append", default=[], choices=["pyspy", "cprofile", "memory"])
    parser.add_argument("--out", default=os.path.join(HERE, "profile-out"))
    args = parser.parse_args(argv)
    for problem in staleSteps():
        print(f"bench: a step of the hot path names nothing: {problem}", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    tmp = prepare("hermux-profile-")
    procs = Processes()
    try:
        profiler = Profiler(args, tmp, procs, args.out)
        direct = profiler.targets.startNginx()

        def section(name, lines):
            text = "\n".join(lines)
            with open(os.path.join(args.out, f"{name}.txt"), "w") as f:
                f.write(text + "\n")
            print(text, flush=True)

        if "pyspy" not in args.skip:
            section("pyspy", profiler.pyspy(direct))
        if "cprofile" not in args.skip:
            section("cprofile", profiler.cprofile(direct))
        if "memory" not in args.skip:
            slow = profiler.targets.startSlowUpstream("slow-streams", 5.0)
            section("memory", profiler.memory(slow))
    finally:
        procs.stopAll()
        shutil.rmtree(tmp, ignore_errors=True)
    for problem in profiler.problems:
        print(f"bench: {problem}", file=sys.stderr)
    print(f"bench: reports in {args.out}", file=sys.stderr)
    return 0
