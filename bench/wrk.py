"""
Load with wrk: a Lua script that POSTs a body with an Authorization header
and prints one machine-readable summary line, and a parser for wrk's output
(the summary line if present, wrk's text report otherwise).
"""

from __future__ import annotations

import json
import re
import subprocess

import attr

_SUMMARY_MARK = "WRKJSON "

_LUA = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
{authorization}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "{mark}{{\\"requests\\": %d, \\"duration_us\\": %d, \\"bytes\\": %d, " ..
    "\\"connect\\": %d, \\"read\\": %d, \\"write\\": %d, \\"status\\": %d, \\"timeout\\": %d, " ..
    "\\"p50_us\\": %d, \\"p90_us\\": %d, \\"p99_us\\": %d, \\"mean_us\\": %.1f}}\\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
"""


def luaScript(body: bytes, token: str | None) -> str:
    """
    A wrk script that POSTs C{body} with C{token} as Bearer token.
    """
    text = body.decode("utf-8")
    if "]==]" in text:
        raise ValueError("the body may not contain ']==]'")
    authorization = (
        f'wrk.headers["Authorization"] = "Bearer {token}"' if token is not None else ""
    )
    return _LUA.format(body=text, authorization=authorization, mark=_SUMMARY_MARK)


@attr.frozen
class WrkResult:
    """
    What one wrk run measured.  Latencies are in microseconds; C{errors} is
    the sum of socket errors, timeouts and non-2xx/3xx answers.
    """

    requests: int
    seconds: float
    bytes: int
    errors: int
    p50: float
    p90: float | None
    p99: float
    nonSuccess: int = 0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def parseSummaryLine(output: str) -> WrkResult | None:
    """
    The result from the line the Lua C{done} hook printed, if any.
    """
    for line in output.splitlines():
        if line.startswith(_SUMMARY_MARK):
            data = json.loads(line[len(_SUMMARY_MARK) :])
            return WrkResult(
                requests=data["requests"],
                seconds=data["duration_us"] / 1e6,
                bytes=data["bytes"],
                errors=sum(data[k] for k in ("connect", "read", "write", "status", "timeout")),
                p50=float(data["p50_us"]),
                p90=float(data["p90_us"]),
                p99=float(data["p99_us"]),
                nonSuccess=data["status"],
            )
    return None


_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
_SIZE = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def _duration(number: str, unit: str) -> float:
    """
    A wrk duration (C{617.50us}, C{1.20ms}, C{5.00s}, C{1.00m}) in µs.
    """
    return float(number) * _UNITS_US[unit]


def parseText(output: str) -> WrkResult:
    """
    The result from wrk's own text report (run with C{--latency}).

    @raise ValueError: if the report has no request count.
    """
    total = re.search(
        r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h), ([\d.]+)([KMGT]?B) read",
        output,
        re.MULTILINE,
    )
    if total is None:
        raise ValueError("no 'N requests in T' line in wrk's output")
    percentiles = {
        int(p): _duration(n, u)
        for p, n, u in re.findall(
            r"^\s*(50|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.MULTILINE
        )
    }
    errors = 0
    socket = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket:
        errors += sum(int(n) for n in socket.groups())
    nonSuccess = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    bad = int(nonSuccess.group(1)) if nonSuccess else 0
    return WrkResult(
        requests=int(total.group(1)),
        seconds=_duration(total.group(2), total.group(3)) / 1e6,
        bytes=int(float(total.group(4)) * _SIZE[total.group(5)]),
        errors=errors + bad,
        p50=percentiles.get(50, float("nan")),
        p90=percentiles.get(90),
        p99=percentiles.get(99, float("nan")),
        nonSuccess=bad,
    )


def parse(output: str) -> WrkResult:
    return parseSummaryLine(output) or parseText(output)


def run(
    url: str,
    script: str,
    *,
    seconds: float,
    connections: int,
    threads: int = 1,
    timeoutSeconds: float = 5.0,
) -> tuple[WrkResult, str]:
    """
    Run wrk against C{url} for C{seconds} and return its result and output.
    """
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError("the benchmark only loads 127.0.0.1")
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={max(1, round(timeoutSeconds))}s",
        "--latency",
        "-s",
        script,
        url,
    ]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + timeoutSeconds + 30
    )
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{output}")
    return parse(output), output
