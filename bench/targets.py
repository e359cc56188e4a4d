"""
What a benchmark loads, and the processes behind it: the configuration
hermux reads, nginx as the upstream and as a proxy, the slow upstream,
hermux and the naive proxy, each started as a L{Target}, checked with one
request of each kind, and stopped.
"""

from __future__ import annotations

import os
import resource
import sys
import time
import urllib.error
import urllib.request

import attr

from bench import nginx
from bench.procs import Process, Processes, childPids, cpuSeconds, freePort

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

ACCESS_TOKEN = "bench-access-token-0123456789abcdefghijklmnopqrstuvwxyz"
KEYS = [
    ("alice", "sk-or-v1-bench-alice-" + "0" * 43),
    ("bob", "sk-or-v1-bench-bob-" + "1" * 45),
    ("carol", "sk-or-v1-bench-carol-" + "2" * 43),
]

TWISTD = "from twisted.scripts.twistd import run; run()"


def log(text: str) -> None:
    """
    A line of progress on stderr, with the time.
    """
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def maxConnections() -> int:
    """
    As many client connections as hermux's open-file limit allows (it
    needs two descriptors for each, and some to spare).
    """
    return (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 256) // 2


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


class Targets:
    """
    The targets of one run, in its temporary directory C{tmp}: the
    configuration files hermux reads (written at once), and each target a
    process of C{procs}, started, checked and stopped here.  The proxies'
    processes are kept in C{hermuxLogs} and C{naiveLogs}, whose logs the
    report reads.
    """

    def __init__(self, tmp: str, procs: Processes):
        self.tmp = tmp
        self.procs = procs
        self.python = sys.executable
        self.sizes: dict[str, int] = {}
        self.hermuxLogs: list[Process] = []
        self.naiveLogs: list[Process] = []
        self.tokens = os.path.join(tmp, "tokens.csv")
        with open(self.tokens, "w") as f:
            f.write("name,token,daily_limit\n")
            for name, token in KEYS:
                f.write(f'{name},"{token}",\n')
        self.allow = os.path.join(tmp, "allow.txt")
        with open(self.allow, "w") as f:
            f.write(ACCESS_TOKEN + "\n")

    def _logPath(self, name: str) -> str:
        return os.path.join(self.tmp, f"{name}.out")

    # The upstreams, and nginx as a proxy.

    def startNginx(self, bigBytes: int = 0) -> Target:
        """
        nginx as the fast upstream, serving answers shaped like
        OpenRouter's, and one of C{bigBytes} for the slow reader (none if 0);
        their sizes go into C{sizes}.
        """
        port = freePort()
        config, self.sizes = nginx.prepare(self.tmp, port, bigSize=bigBytes)
        proc = self.procs.start("nginx", nginx.argv(nginx.findNginx(), self.tmp, config), self._logPath("nginx"))
        return self._nginxTarget("direct (nginx)", proc, port)

    def startNginxProxy(self, name: str, upstream: Target) -> Target:
        """
        nginx as a reverse proxy in front of C{upstream}: the floor for
        what a proxy adds, against which hermux's cost can be read.
        """
        port = freePort()
        config = nginx.prepareProxy(self.tmp, name, port, upstream.port)
        proc = self.procs.start(name, nginx.argv(nginx.findNginx(), self.tmp, config), self._logPath(name))
        return self._nginxTarget(name, proc, port)

    @staticmethod
    def _nginxTarget(name: str, proc: Process, port: int) -> Target:
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

    def startSlowUpstream(self, name: str, interval: float) -> Target:
        """
        hermux's fake OpenRouter, streaming one event every C{interval} seconds.
        """
        port = freePort()
        argv = [self.python, "-m", "bench.slow_upstream", "--port", str(port), "--interval", str(interval)]
        return self.start(f"direct ({name})", argv, port, logName=name)

    # The proxies.

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
            "--max-connections", str(maxConnections()),
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
            argv += ["--access-log", self.accessLog(name)]
        return argv

    def accessLog(self, name: str) -> str:
        """
        The C{--access-log} file of the hermux named C{name}.
        """
        return os.path.join(self.tmp, f"{name}.access.log")

    def naiveArgv(self, upstream: Target, port: int, logging: bool = True) -> list[str]:
        argv = [self.python, "-m", "bench.naive_proxy", "--port", str(port),
                "--upstream-port", str(upstream.port)]
        if not logging:
            argv.append("--no-log")
        return argv

    def startHermux(self, name: str, upstream: Target, *, logging: str = "twistd") -> Target:
        port = freePort()
        return self.start(name, self.hermuxArgv(name, upstream, port, logging), port, logs=self.hermuxLogs)

    def startNaive(self, name: str, upstream: Target, *, logging: bool = True) -> Target:
        # It forwards the client's Authorization header: the slow upstream
        # wants one, and every target gets the same request bytes.
        port = freePort()
        return self.start(name, self.naiveArgv(upstream, port, logging), port, logs=self.naiveLogs)

    def start(self, name: str, argv: list[str], port: int, *, logs: list | None = None,
              logName: str | None = None, env=None, cwd: str = REPO, timeout: float = 20.0) -> Target:
        """
        Start a process that listens on C{port} (within C{timeout}
        seconds), its output in the temporary directory; C{logs}, if given,
        keeps the process for the report.
        """
        proc = self.procs.start(name, argv, self._logPath(logName or name), cwd=cwd, env=env)
        proc.waitForPort(port, timeout=timeout)
        if logs is not None:
            logs.append(proc)
        return Target(name, port, ACCESS_TOKEN, [proc.pid])

    def process(self, target: Target) -> Process:
        return self.procs.find(target.pids[0])

    def stop(self, target: Target) -> None:
        self.procs.stop(self.process(target))

    # Checks.

    def smokeTest(self, targets: list[Target]) -> None:
        """
        One request of each kind through each target, answered as nginx
        answers it; and hermux refuses a request without a token.
        """
        for target in targets:
            for path, body in ((nginx.CHAT_PATH, nginx.CHAT_REQUEST), (nginx.SSE_PATH, nginx.STREAM_REQUEST)):
                status, headers, answer = post(target, path, body, target.token)
                expected = self.sizes[path]
                if status != 200 or len(answer) != expected:
                    raise RuntimeError(
                        f"{target.name}: {path} answered {status} with {len(answer)} bytes, "
                        f"not 200 with {expected}"
                    )
                if target.name.startswith("hermux") and "X-Token-Name" not in headers:
                    raise RuntimeError(f"{target.name}: no X-Token-Name header")
            if target.name.startswith("hermux"):
                status, _, _ = post(target, nginx.CHAT_PATH, nginx.CHAT_REQUEST, None)
                if status != 401:
                    raise RuntimeError(f"{target.name}: answered {status} without a token")


def post(target: Target, path: str, body: bytes, token: str | None = None):
    """
    One POST to C{target}: its status, headers and body.
    """
    request = urllib.request.Request(target.url(path), data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
