"""
The memory measurements: a proxy's resident memory and descriptors while it
holds many open streams and after they closed, and its memory while one
client reads a big answer slowly (backpressure).
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
import urllib.request

from bench import clients, nginx
from bench.targets import REPO, Target, Targets, log


def upstreamOpen(upstream: Target) -> int | None:
    """
    How many connections the slow upstream has open, as it says itself.
    """
    try:
        with urllib.request.urlopen(upstream.url("/bench-status"), timeout=5) as response:
            return json.load(response)["open"] - 1  # not counting this request
    except OSError:
        return None


class _StreamGenerator:
    """
    bench/streams.py in a process of its own, opening C{count} streams
    through C{target}; its events (one JSON object a line) read on a thread.
    """

    deadline = 240.0

    def __init__(self, python: str, target: Target, count: int, promptKB: int):
        self._popen = subprocess.Popen(
            [python, "-m", "bench.streams", "--port", str(target.port), "--count", str(count),
             "--deadline", str(self.deadline), "--prompt-kb", str(promptKB)]
            + (["--token", target.token] if target.token else []),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        )
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._popen.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def next(self, name: str, timeout: float) -> dict:
        """
        The next event called C{name}, skipping others; an C{"error"} event
        or none in C{timeout} seconds fails.
        """
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self._lines.get(timeout=max(0.1, end - time.monotonic()))
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

    def close(self) -> None:
        """
        Ask it to close every stream.
        """
        self._popen.stdin.write("close\n")
        self._popen.stdin.flush()

    def end(self) -> None:
        if self._popen.poll() is None:
            try:
                self._popen.wait(30)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait()


class Memory:
    """
    Memory measurements of the targets started by C{targets}; problems
    seen (streams that failed or ended early, an incomplete slow read) are
    added to C{problems}.  C{promptKB} makes each held stream's request
    larger; the slow reader reads at C{slowReadRate} MB/s.
    """

    def __init__(self, targets: Targets, problems: list[str], *, promptKB: int = 0, slowReadRate: float = 6.5):
        self.targets = targets
        self.problems = problems
        self.promptKB = promptKB
        self.slowReadRate = slowReadRate

    def heldStreams(self, target: Target, upstream: Target, count: int, onOpened=None) -> dict:
        """
        Open C{count} streams through C{target} and hold them; measure the
        proxy's memory and descriptors before, while they are open, and
        after they were all closed.  C{onOpened} is called once they are
        all open.
        """
        proc = self.targets.process(target)
        rss0, files0, cpu0 = proc.rss(), proc.files(), proc.cpu()
        upstreamOpen0 = upstreamOpen(upstream)
        generator = _StreamGenerator(self.targets.python, target, count, self.promptKB)
        try:
            opened = generator.next("opened", generator.deadline)
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
            upstreamOpenHeld = upstreamOpen(upstream)
            generator.close()
            closed = generator.next("closed", 60)
        finally:
            generator.end()
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
            "upstreamOpen": upstreamOpenHeld,
            "upstreamOpenAfter": upstreamOpen(upstream),
            "endedEarly": closed["endedEarly"],
        }
        if result["failed"] or result["endedEarly"]:
            self.problems.append(
                f"{target.name}, {count} streams: {result['failed']} failed to open "
                f"{result['failures']}, {result['endedEarly']} ended early"
            )
        log(
            f"streams {target.name} x{count}: opened {result['opened']} in {result['openSeconds']}s, "
            f"RSS {rss0 / 1024:.1f} -> {rssOpen / 1024:.1f} MiB "
            f"({result['perStreamKiB']:.1f} KiB/stream) -> {result['rssAfterKiB'] / 1024:.1f} MiB after, "
            f"fds {files0} -> {filesOpen} -> {result['filesAfter']}, "
            f"upstream open {upstreamOpenHeld} -> {result['upstreamOpenAfter']}"
        )
        return result

    def slowRead(self, target: Target) -> dict:
        """
        One client reads the big answer slowly through C{target}; sample
        the proxy's memory meanwhile.
        """
        proc = self.targets.process(target)
        size = self.targets.sizes[nginx.BIG_PATH]
        chunk = 65536
        pause = chunk / (self.slowReadRate * 1e6)
        time.sleep(0.5)
        rss0 = proc.rss()
        state = clients.SlowRead()
        reader = threading.Thread(
            target=clients.slowRead,
            args=(target.port, nginx.BIG_PATH, nginx.STREAM_REQUEST, target.token),
            kwargs=dict(expected=size, chunk=chunk, pause=pause,
                        deadline=3 * size / (self.slowReadRate * 1e6) + 30, progress=state),
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
            self.problems.append(
                f"slow read through {target.name}: {state.bodyBytes} of {size} bytes, "
                f"status {state.status}, {state.error or 'no error'}"
            )
        log(
            f"slow read {target.name}: {state.bodyBytes / 1e6:.1f} MB in {state.seconds:.1f}s, "
            f"RSS {rss0 / 1024:.1f} -> peak {peak / 1024:.1f} MiB (+{(peak - rss0) / 1024:.1f})"
        )
        return result
