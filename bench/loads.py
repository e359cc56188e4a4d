"""
The load runs: wrk against one target at a time, or against several in
interleaved rounds, each run with the CPU seconds its target used
meanwhile; and the time to first byte of a stream, sampled the same way.
"""

from __future__ import annotations

import json
import os

from bench import clients, nginx, wrk
from bench.targets import Target, log


class Loads:
    """
    Load runs of one benchmark: wrk's Lua scripts go to C{tmp}; each
    measured run lasts C{duration} seconds; problems seen (wrk errors, a
    stream that did not answer 200) are added to C{problems}.
    """

    def __init__(self, tmp: str, problems: list[str], *, duration: float):
        self.tmp = tmp
        self.problems = problems
        self.duration = duration

    def _script(self, path: str, body: bytes, token: str | None) -> str:
        script = os.path.join(self.tmp, f"{path.strip('/').replace('/', '-')}-{token is not None}.lua")
        with open(script, "w") as f:
            f.write(wrk.luaScript(body, token))
        return script

    def load(self, target: Target, path: str, body: bytes, *, seconds, connections, upstream=None) -> dict:
        """
        One wrk run against C{target}, with the CPU seconds its processes
        (and the upstream's, if given) used meanwhile.
        """
        script = self._script(path, body, target.token)
        cpu0 = target.cpu()
        up0 = upstream.cpu() if upstream else 0.0
        result, output = wrk.run(target.url(path), script, seconds=seconds, connections=connections)
        cpu = target.cpu() - cpu0
        up = (upstream.cpu() - up0) if upstream else None
        if result.errors:
            self.problems.append(
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

    def interleaved(self, kind, targets, path, body, *, rounds, connections, upstream) -> dict:
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
                    target, path, body, seconds=self.duration,
                    connections=connections,
                    upstream=None if target.name.startswith("direct") else upstream,
                )
                runs[target.name].append(measured)
                log(
                    f"{kind} round {index + 1}: {target.name}: {measured['rate']:.0f} req/s, "
                    f"{1000 * measured['cpu'] / max(1, measured['requests']):.3f} ms CPU/req, "
                    f"p50 {measured['p50_ms']:.2f} ms, p99 {measured['p99_ms']:.2f} ms"
                )
        return runs

    def ttfb(self, targets: list[Target], direct: Target, samples: int) -> dict:
        """
        Time to first byte of a streamed chat completion: C{samples}
        requests per target, interleaved, after five warm-up requests each.
        """
        body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "hi"}],
                           "stream": True, "max_tokens": 1}).encode()
        everyone = [direct] + targets
        times = {t.name: [] for t in everyone}
        for target in everyone:
            for _ in range(5):
                clients.firstByte(target.port, nginx.CHAT_PATH, body, target.token)
        for index in range(samples):
            order = everyone if index % 2 == 0 else list(reversed(everyone))
            for target in order:
                sample = clients.firstByte(target.port, nginx.CHAT_PATH, body, target.token)
                if sample.status != 200:
                    self.problems.append(f"ttfb {target.name}: status {sample.status}")
                times[target.name].append(sample.seconds * 1000)
        return times
