"""
The benchmark run: starts the upstreams and the proxies, loads each the
same way, interleaved, and reports hermux as ratios against the baselines
measured in the same run.

    python -m bench [--quick] [--record] [...]      (bench/run does the same)
    python -m bench profile [...]                   (see bench/profile.py)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import resource
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import attr

from bench import clients, nginx, report, wrk
from bench.procs import Processes, childPids, cpuSeconds, freePort, prepare

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

ACCESS_TOKEN = "bench-access-token-0123456789abcdefghijklmnopqrstuvwxyz"
KEYS = [
    ("alice", "sk-or-v1-bench-alice-" + "0" * 43),
    ("bob", "sk-or-v1-bench-bob-" + "1" * 45),
    ("carol", "sk-or-v1-bench-carol-" + "2" * 43),
]

TWISTD = "from twisted.scripts.twistd import run; run()"


def parseArgs(argv):
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="Benchmark hermux against a direct connection and "
        "twisted.web.proxy.ReverseProxyResource.",
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


@attr.s(auto_attribs=True)
class Target:
    """
    Something the load is sent to: a proxy (a process of ours) or nginx.
    """

    name: str
    port: int
    token: str | None
    pids: list[int]

    def cpu(self) -> float:
        return sum(cpuSeconds(pid) for pid in self.pids)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class Run:
    def __init__(self, args, tmp: str, procs: Processes):
        self.args = args
        self.tmp = tmp
        self.procs = procs
        self.python = sys.executable
        self.results: dict = {"errors": []}
        self.checks: list[str] = []
        self.hermuxLogs = []
        self.naiveLogs = []

    # Processes.

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def writeConfig(self) -> None:
        self.tokens = os.path.join(self.tmp, "tokens.csv")
        with open(self.tokens, "w") as f:
            f.write("name,token,daily_limit\n")
            for name, token in KEYS:
                f.write(f'{name},"{token}",\n')
        self.allow = os.path.join(self.tmp, "allow.txt")
        with open(self.allow, "w") as f:
            f.write(ACCESS_TOKEN + "\n")

    def startNginx(self) -> Target:
        port = freePort()
        config, self.sizes = nginx.prepare(
            self.tmp, port, bigSize=0 if "slowread" in self.args.skip else self.args.big_mb * 10**6
        )
        proc = self.procs.start(
            "nginx", nginx.argv(nginx.findNginx(), self.tmp, config),
            os.path.join(self.tmp, "nginx.out"),
        )
        return self._nginxTarget("direct (nginx)", proc, port)

    @staticmethod
    def _nginxTarget(name: str, proc, port: int) -> Target:
        """
        A started nginx as a target: its CPU is its worker's, not its master's.
        """
        proc.waitForPort(port)
        workers = []
        for _ in range(50):
            workers = childPids(proc.pid)
            if workers:
                break
            time.sleep(0.05)
        return Target(name, port, ACCESS_TOKEN, workers)

    def startNginxProxy(self, name: str, upstream: Target) -> Target:
        """
        nginx as a reverse proxy in front of C{upstream}: the floor for
        what a proxy adds, against which hermux's cost can be read.
        """
        port = freePort()
        config = nginx.prepareProxy(self.tmp, name, port, upstream.port)
        proc = self.procs.start(
            name, nginx.argv(nginx.findNginx(), self.tmp, config), os.path.join(self.tmp, f"{name}.out")
        )
        return self._nginxTarget(name, proc, port)

    def startSlowUpstream(self, name: str, interval: float) -> Target:
        port = freePort()
        proc = self.procs.start(
            name,
            [self.python, "-m", "bench.slow_upstream", "--port", str(port), "--interval", str(interval)],
            os.path.join(self.tmp, f"{name}.out"),
            cwd=REPO,
        )
        proc.waitForPort(port)
        return Target(f"direct ({name})", port, ACCESS_TOKEN, [proc.pid])

    @staticmethod
    def maxConnections() -> int:
        """
        As many client connections as hermux's open-file limit allows (it
        needs two descriptors for each, and some to spare).
        """
        return (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 256) // 2

    def hermuxOptions(self, name: str, upstream: Target, port: int) -> list[str]:
        """
        hermux's own options for a run: a state file of its own (several
        run at once), and room for the many-streams test.
        """
        return [
            "hermux",
            "--tokens", self.tokens,
            "--allow", self.allow,
            "--state", os.path.join(self.tmp, f"{name}.sqlite3"),
            "--upstream", f"http://127.0.0.1:{upstream.port}",
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--max-connections", str(self.maxConnections()),
        ]

    def hermuxArgv(self, name: str, upstream: Target, port: int, logging: str = "twistd") -> list[str]:
        """
        twistd running hermux, with its request lines in twistd's log
        (C{logging="twistd"}), in an access log file (C{"file"}), or
        dropped (C{"off"}).
        """
        argv = [self.python, "-c", TWISTD, "-n", "--pidfile="]
        argv += ["--logger=bench.quietlog.observer"] if logging == "off" else ["--logfile=-"]
        argv += self.hermuxOptions(name, upstream, port)
        if logging == "file":
            argv += ["--access-log", os.path.join(self.tmp, f"{name}.access.log")]
        return argv

    def naiveArgv(self, upstream: Target, port: int, logging: bool = True) -> list[str]:
        argv = [self.python, "-m", "bench.naive_proxy", "--port", str(port),
                "--upstream-port", str(upstream.port)]
        if not logging:
            argv.append("--no-log")
        return argv

    def startHermux(self, name: str, upstream: Target, *, logging: str = "twistd") -> Target:
        port = freePort()
        argv = self.hermuxArgv(name, upstream, port, logging)
        proc = self.procs.start(name, argv, os.path.join(self.tmp, f"{name}.out"), cwd=REPO)
        proc.waitForPort(port)
        self.hermuxLogs.append(proc)
        return Target(name, port, ACCESS_TOKEN, [proc.pid])

    def startNaive(self, name: str, upstream: Target, *, logging: bool = True) -> Target:
        port = freePort()
        argv = self.naiveArgv(upstream, port, logging)
        proc = self.procs.start(name, argv, os.path.join(self.tmp, f"{name}.out"), cwd=REPO)
        proc.waitForPort(port)
        self.naiveLogs.append(proc)
        # It forwards the client's Authorization header: the slow upstream
        # wants one, and every target gets the same request bytes.
        return Target(name, port, ACCESS_TOKEN, [proc.pid])

    def process(self, target: Target):
        return next(p for p in self.procs._running if p.pid == target.pids[0])

    def stopTarget(self, target: Target) -> None:
        self.procs.stop(self.process(target))

    # Checks.

    def post(self, target: Target, path: str, body: bytes, token=None):
        request = urllib.request.Request(target.url(path), data=body, method="POST")
        request.add_header("Content-Type", "application/json")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def smokeTest(self, targets: list[Target], direct: Target) -> None:
        """
        One request of each kind through each target, answered as nginx
        answers it; and hermux refuses a request without a token.
        """
        for target in targets:
            for path, body in ((nginx.CHAT_PATH, nginx.CHAT_REQUEST), (nginx.SSE_PATH, nginx.STREAM_REQUEST)):
                status, headers, answer = self.post(target, path, body, target.token)
                expected = self.sizes[path]
                if status != 200 or len(answer) != expected:
                    raise RuntimeError(
                        f"{target.name}: {path} answered {status} with {len(answer)} bytes, "
                        f"not 200 with {expected}"
                    )
                if target.name.startswith("hermux") and "X-Token-Name" not in headers:
                    raise RuntimeError(f"{target.name}: no X-Token-Name header")
            if target.name.startswith("hermux"):
                status, _, _ = self.post(target, nginx.CHAT_PATH, nginx.CHAT_REQUEST, None)
                if status != 401:
                    raise RuntimeError(f"{target.name}: answered {status} without a token")

    # Measurements.

    def wrkScript(self, name: str, body: bytes, token: str | None) -> str:
        path = os.path.join(self.tmp, f"{name}.lua")
        with open(path, "w") as f:
            f.write(wrk.luaScript(body, token))
        return path

    def load(self, target: Target, path: str, body: bytes, *, seconds, connections, upstream=None):
        """
        One wrk run against C{target}, with the CPU seconds its processes
        (and the upstream's, if given) used meanwhile.
        """
        script = self.wrkScript(f"{path.strip('/').replace('/', '-')}-{target.token is not None}", body, target.token)
        cpu0 = target.cpu()
        up0 = upstream.cpu() if upstream else 0.0
        result, output = wrk.run(target.url(path), script, seconds=seconds, connections=connections)
        cpu = target.cpu() - cpu0
        up = (upstream.cpu() - up0) if upstream else None
        if result.errors:
            self.results["errors"].append(
                f"{target.name} {path}: {result.errors} wrk errors "
                f"({result.nonSuccess} non-2xx/3xx) in {result.requests} requests"
            )
        return {
            "requests": result.requests,
            "seconds": result.seconds,
            "bytes": result.bytes,
            "errors": result.errors,
            "p50_ms": result.p50 / 1000,
            "p90_ms": None if result.p90 is None else result.p90 / 1000,
            "p99_ms": result.p99 / 1000,
            "rate": result.rate,
            "cpu": cpu,
            "upstreamCpu": up,
        }

    def interleaved(self, kind, targets, path, body, *, rounds, connections, upstream):
        """
        C{rounds} rounds of wrk runs, each round loading every target once
        (in alternating order), after a one-second warm-up of each.
        """
        for target in targets:
            self.load(target, path, body, seconds=1, connections=connections)
        runs = {target.name: [] for target in targets}
        for index in range(rounds):
            order = targets if index % 2 == 0 else list(reversed(targets))
            for target in order:
                measured = self.load(
                    target, path, body, seconds=self.args.duration,
                    connections=connections,
                    upstream=None if target.name.startswith("direct") else upstream,
                )
                runs[target.name].append(measured)
                self.log(
                    f"{kind} round {index + 1}: {target.name}: {measured['rate']:.0f} req/s, "
                    f"{1000 * measured['cpu'] / max(1, measured['requests']):.3f} ms CPU/req, "
                    f"p50 {measured['p50_ms']:.2f} ms, p99 {measured['p99_ms']:.2f} ms"
                )
        return runs

    def ttfb(self, targets: list[Target], direct: Target) -> dict:
        """
        Time to first byte of a streamed chat completion: C{ttfb-samples}
        requests per target, interleaved, after five warm-up requests each.
        """
        body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "hi"}],
                           "stream": True, "max_tokens": 1}).encode()
        everyone = [direct] + targets
        samples = {t.name: [] for t in everyone}
        for target in everyone:
            for _ in range(5):
                clients.firstByte(target.port, nginx.CHAT_PATH, body, target.token)
        for index in range(self.args.ttfb_samples):
            order = everyone if index % 2 == 0 else list(reversed(everyone))
            for target in order:
                sample = clients.firstByte(target.port, nginx.CHAT_PATH, body, target.token)
                if sample.status != 200:
                    self.results["errors"].append(f"ttfb {target.name}: status {sample.status}")
                samples[target.name].append(sample.seconds * 1000)
        return samples

    def heldStreams(self, target: Target, upstream: Target, count: int, onOpened=None) -> dict:
        """
        Open C{count} streams through C{target} and hold them; measure the
        proxy's memory and descriptors before, while they are open, and
        after they were all closed.  C{onOpened} is called once they are
        all open.
        """
        proc = self.process(target)
        rss0, files0, cpu0 = proc.rss(), proc.files(), proc.cpu()
        upstreamOpen0 = self.upstreamOpen(upstream)
        deadline = 240.0
        generator = subprocess.Popen(
            [self.python, "-m", "bench.streams", "--port", str(target.port),
             "--count", str(count), "--deadline", str(deadline), "--prompt-kb", str(self.args.prompt_kb)]
            + (["--token", target.token] if target.token else []),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l) for l in generator.stdout] + [lines.put(None)],
                         daemon=True).start()

        def nextEvent(name, timeout):
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                try:
                    line = lines.get(timeout=max(0.1, end - time.monotonic()))
                except queue.Empty:
                    break
                if line is None:
                    break
                event = json.loads(line)
                if event["event"] == name:
                    return event
                if event["event"] == "error":
                    raise RuntimeError(event["message"])
            raise RuntimeError(f"the stream generator gave no {name!r} event in {timeout}s")

        try:
            opened = nextEvent("opened", deadline)
            cpuOpen = proc.cpu() - cpu0
            if onOpened is not None:
                onOpened()
            time.sleep(3)
            samples = []
            for _ in range(5):
                samples.append(proc.rss())
                time.sleep(0.4)
            rssOpen = max(samples)
            filesOpen = proc.files()
            upstreamOpen = self.upstreamOpen(upstream)
            generator.stdin.write("close\n")
            generator.stdin.flush()
            closed = nextEvent("closed", 60)
        finally:
            if generator.poll() is None:
                try:
                    generator.wait(30)
                except subprocess.TimeoutExpired:
                    generator.kill()
                    generator.wait()
        # hermux keeps up to 64 idle upstream connections: allow for them.
        settled = time.monotonic()
        while time.monotonic() - settled < 15 and proc.files() > files0 + 70:
            time.sleep(0.2)
        teardown = time.monotonic() - settled
        time.sleep(1)
        result = {
            "count": count,
            "opened": opened["opened"],
            "failed": opened["failed"],
            "failures": opened["failures"],
            "openSeconds": opened["seconds"],
            "cpuPerOpenMs": 1000 * cpuOpen / max(1, opened["opened"]),
            "rssBeforeKiB": rss0,
            "rssOpenKiB": rssOpen,
            "rssAfterKiB": proc.rss(),
            "perStreamKiB": (rssOpen - rss0) / max(1, opened["opened"]),
            "filesBefore": files0,
            "filesOpen": filesOpen,
            "filesAfter": proc.files(),
            "teardownSeconds": teardown,
            "upstreamOpenBefore": upstreamOpen0,
            "upstreamOpen": upstreamOpen,
            "upstreamOpenAfter": self.upstreamOpen(upstream),
            "endedEarly": closed["endedEarly"],
        }
        if result["failed"] or result["endedEarly"]:
            self.results["errors"].append(
                f"{target.name}, {count} streams: {result['failed']} failed to open "
                f"{result['failures']}, {result['endedEarly']} ended early"
            )
        self.log(
            f"streams {target.name} x{count}: opened {result['opened']} in {result['openSeconds']}s, "
            f"RSS {rss0 / 1024:.1f} -> {rssOpen / 1024:.1f} MiB "
            f"({result['perStreamKiB']:.1f} KiB/stream) -> {result['rssAfterKiB'] / 1024:.1f} MiB after, "
            f"fds {files0} -> {filesOpen} -> {result['filesAfter']}, "
            f"upstream open {upstreamOpen} -> {result['upstreamOpenAfter']}"
        )
        return result

    def upstreamOpen(self, upstream: Target) -> int | None:
        try:
            with urllib.request.urlopen(upstream.url("/bench-status"), timeout=5) as response:
                return json.load(response)["open"] - 1  # not counting this request
        except OSError:
            return None

    def slowRead(self, target: Target) -> dict:
        """
        One client reads the big answer slowly through C{target}; sample
        the proxy's memory meanwhile.
        """
        proc = self.process(target)
        size = self.sizes[nginx.BIG_PATH]
        chunk = 65536
        pause = chunk / (self.args.slow_read_rate * 1e6)
        time.sleep(0.5)
        rss0 = proc.rss()
        state = clients.SlowRead()
        reader = threading.Thread(
            target=clients.slowRead,
            args=(target.port, nginx.BIG_PATH, nginx.STREAM_REQUEST, target.token),
            kwargs=dict(expected=size, chunk=chunk, pause=pause,
                        deadline=3 * size / (self.args.slow_read_rate * 1e6) + 30, progress=state),
            daemon=True,
        )
        reader.start()
        peak = rss0
        while reader.is_alive():
            peak = max(peak, proc.rss())
            time.sleep(0.2)
        result = {
            "sizeBytes": size,
            "bodyBytes": state.bodyBytes,
            "complete": state.complete,
            "seconds": state.seconds,
            "status": state.status,
            "chunked": state.chunked,
            "error": state.error,
            "rssBeforeKiB": rss0,
            "rssPeakKiB": peak,
            "growthKiB": peak - rss0,
            "rssAfterKiB": proc.rss(),
        }
        if not state.complete:
            self.results["errors"].append(
                f"slow read through {target.name}: {state.bodyBytes} of {size} bytes, "
                f"status {state.status}, {state.error or 'no error'}"
            )
        self.log(
            f"slow read {target.name}: {state.bodyBytes / 1e6:.1f} MB in {state.seconds:.1f}s, "
            f"RSS {rss0 / 1024:.1f} -> peak {peak / 1024:.1f} MiB (+{(peak - rss0) / 1024:.1f})"
        )
        return result

    # The run.

    def run(self) -> dict:
        args = self.args
        self.writeConfig()
        self.results["machine"] = report.machine()
        self.results["command"] = args.command
        self.results["started"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.results["loadavgBefore"] = report.loadavg()
        self.results["fdLimit"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]

        self.log("starting nginx and the slow upstreams")
        direct = self.startNginx()
        self.results["sizes"] = self.sizes

        if not ({"chat", "sse"} <= set(args.skip)):
            hermux = self.startHermux("hermux", direct)
            accessLog = self.startHermux("hermux-accesslog", direct, logging="file")
            quiet = self.startHermux("hermux-nolog", direct, logging="off")
            naive = self.startNaive("naive", direct)
            nginxProxy = self.startNginxProxy("nginx-proxy", direct)
            targets = [direct, nginxProxy, naive, hermux, accessLog, quiet]
            self.smokeTest([nginxProxy, naive, hermux, accessLog, quiet], direct)
            if "chat" not in args.skip:
                self.log("chat completions (JSON)")
                self.results["chat"] = self.interleaved(
                    "chat", targets, nginx.CHAT_PATH, nginx.CHAT_REQUEST,
                    rounds=args.rounds, connections=args.connections, upstream=direct)
            if "sse" not in args.skip:
                self.log("streamed chat completions (100 KB of SSE each)")
                self.results["sse"] = self.interleaved(
                    "sse", [direct, naive, hermux], nginx.SSE_PATH, nginx.STREAM_REQUEST,
                    rounds=args.sse_rounds, connections=args.sse_connections, upstream=direct)
            self.results["hermuxCpuTotal"] = hermux.cpu()
            for target in (quiet, accessLog, naive, hermux):
                self.stopTarget(target)

        if "ttfb" not in args.skip:
            self.log("time to first byte")
            slow = self.startSlowUpstream("slow-ttfb", 0.002)
            hermux = self.startHermux("hermux-ttfb", slow)
            naive = self.startNaive("naive-ttfb", slow)
            nginxProxy = self.startNginxProxy("nginx-proxy-ttfb", slow)
            self.results["ttfb"] = self.ttfb([nginxProxy, naive, hermux], slow)
            for target in (naive, hermux, slow):
                self.stopTarget(target)

        if "streams" not in args.skip:
            slow = self.startSlowUpstream("slow-streams", args.stream_interval)
            for name, start in (("hermux-streams", self.startHermux), ("naive-streams", self.startNaive)):
                target = start(name, slow)
                self.log(f"{args.streams} open streams through {name}")
                held = self.results.setdefault("streams", {})
                held[name] = self.heldStreams(target, slow, args.streams)
                if name == "hermux-streams":
                    # Once more: memory that a closed stream leaked would
                    # show as a second rise.
                    self.log(f"{args.streams} open streams through {name}, again")
                    self.results["streamsAgain"] = self.heldStreams(target, slow, args.streams)
                if name == "hermux-streams" and args.many_streams:
                    # Each stream holds two descriptors in hermux (client and
                    # upstream).  Without CAP_SYS_RESOURCE the hard limit may
                    # be too low for the number asked: take what fits.
                    fits = (self.results["fdLimit"] - self.process(target).files() - 40) // 2
                    count = min(args.many_streams, fits, self.maxConnections())
                    if count < args.many_streams:
                        self.results["errors"].append(
                            f"{count} streams instead of {args.many_streams}: the "
                            f"file-descriptor limit is {self.results['fdLimit']} and cannot be raised"
                        )
                    self.log(f"{count} open streams through {name}")
                    self.results["manyStreams"] = self.heldStreams(target, slow, count)
                self.stopTarget(target)
            self.stopTarget(slow)

        if "slowread" not in args.skip:
            self.log(f"a slow client reading {args.big_mb} MB")
            self.results["slowRead"] = {}
            for name, start in (("hermux-slowread", self.startHermux), ("naive-slowread", self.startNaive)):
                if args.quick and name.startswith("naive"):
                    continue
                target = start(name, direct)
                self.results["slowRead"][name] = self.slowRead(target)
                self.stopTarget(target)

        self.results["loadavgAfter"] = report.loadavg()
        self.results["logs"] = {
            p.name: report.scanLog(p.logPath) for p in self.hermuxLogs + self.naiveLogs
        }
        accessLog = os.path.join(self.tmp, "hermux-accesslog.access.log")
        if os.path.exists(accessLog):
            self.results["logs"]["hermux-accesslog (--access-log)"] = report.scanLog(accessLog)
        for name, scan in self.results["logs"].items():
            if scan["problems"]:
                self.results["errors"].append(f"{name}: {scan['problems']} warning/error/traceback log lines")
        return self.results


def checkTools() -> list[str]:
    missing = []
    if shutil.which("wrk") is None:
        missing.append("wrk")
    if nginx.findNginx() is None:
        missing.append("nginx")
    return missing


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["profile"]:
        from bench.profile import main as profile

        return profile(argv[1:])
    if argv[:1] == ["instructions"]:
        from bench.instructions import main as instructions

        return instructions(argv[1:])
    if argv[:1] == ["experiments"]:
        from bench.experiments import main as experiments

        return experiments(argv[1:])
    args = parseArgs(argv)
    missing = checkTools()
    if missing:
        print(f"bench: missing {', '.join(missing)}: apt-get install -y {' '.join(missing)}", file=sys.stderr)
        return 2
    tmp = prepare("hermux-bench-")
    procs = Processes()
    started = time.monotonic()
    try:
        results = Run(args, tmp, procs).run()
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
