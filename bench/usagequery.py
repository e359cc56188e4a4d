"""
How long a usage report takes on a full state file (issue 12: under 50 ms
for 400 days x 20 keys x 10 clients x 20 models).

    python -m bench.usagequery [--state PATH] [--runs N]

Fills a state file (once: an existing one at --state is reused) through
SQLiteLedger.writeBatch, one batch per day, then times readUsage (what
GET /hermux/usage and hermux usage read, on a read-only connection) for
several groupings over the full range, and SQLiteLedger.usage (the same in
a thread of the reactor's pool, unwritten counts merged) for the default
one; prints the median of --runs runs in ms.  Not a test: the numbers
depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react

from hermux.usagereport import UsageQuery, reportBody
from hermux.ledger import Counts, SQLiteLedger, _connect, _Pending, _table, openReadOnly, readUsage

DAYS, KEYS, CLIENTS, MODELS = 400, 20, 10, 20
TODAY = int(time.time() // 86400)
GROUPINGS = [
    ("day", "key"),
    (),
    ("key",),
    ("day", "client"),
    ("client",),
    ("model",),
    ("day", "model"),
    ("key", "model"),
    ("client", "model"),
    ("day", "key", "client", "model"),
]


def fill(path: str) -> None:
    ledger = SQLiteLedger(path, retentionDays=DAYS)
    ledger._connection = _connect(path)
    started = time.perf_counter()
    for day in range(TODAY - DAYS + 1, TODAY + 1):
        batch = _Pending()
        for k in range(KEYS):
            for c in range(CLIENTS):
                for m in range(MODELS):
                    n = 1 + (day + k + c + m) % 7
                    batch.rows[(day, f"key-{k:02}", f"client-{c}", f"vendor/model-{m:02}")] = Counts(
                        n, n if m % 4 == 0 else 0, 0, n // 7, 900 * n, 300 * n, 50 * n, 100 * n, 12_345 * n
                    )
        ledger.writeBatch(batch)
    ledger._connection.close()
    print(f"filled {path} in {time.perf_counter() - started:.1f} s "
          f"({os.path.getsize(path) / 1e6:.0f} MB)", file=sys.stderr)


def median(f, runs: int) -> tuple[float, int]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = f()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), len(result)


async def throughLedger(reactor, path: str, runs: int) -> tuple[float, float]:
    """
    SQLiteLedger.usage for the default grouping, with an unwritten count to
    merge; and the same with the JSON answer of GET /hermux/usage made
    (usagereport.reportBody).
    """
    ledger = SQLiteLedger(path, reactor=reactor, retentionDays=DAYS)
    ledger.add(TODAY, "key-00", "client-0", "vendor/model-00", Counts(requests=1))
    query = UsageQuery(TODAY - DAYS + 1, TODAY, ("day", "key"))
    times, answers = [], []
    for _ in range(runs):
        started = time.perf_counter()
        rows = await ledger.usage(query.fromDay, query.toDay, query.groupBy)
        times.append((time.perf_counter() - started) * 1000)
        reportBody(query, rows)
        answers.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), statistics.median(answers)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.usagequery")
    parser.add_argument("--state", default=os.path.join(tempfile.gettempdir(), "hermux-usagequery.sqlite3"))
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument(
        "--rollups-only", action="store_true",
        help="skip the groupings read from the detail table (seconds each)",
    )
    options = parser.parse_args(argv)
    if not os.path.exists(options.state):
        fill(options.state)
    connection = openReadOnly(options.state)
    print(f"{DAYS} days x {KEYS} keys x {CLIENTS} clients x {MODELS} models, "
          f"median of {options.runs} runs over the full range:")
    print(f"{'group_by':<26} {'rows':>8} {'ms':>9}")
    for groupBy in GROUPINGS:
        if options.rollups_only and _table(groupBy) == "usage":
            continue
        ms, rows = median(
            lambda: readUsage(connection, TODAY - DAYS + 1, TODAY, groupBy), options.runs
        )
        print(f"{','.join(groupBy) or '(totals)':<26} {rows:>8} {ms:>9.1f}")
    connection.close()

    def run(reactor):
        async def measure():
            ms, answer = await throughLedger(reactor, options.state, options.runs)
            print(f"{'SQLiteLedger.usage day,key':<26} {DAYS * KEYS:>8} {ms:>9.1f}")
            print(f"{'  + its JSON body':<26} {DAYS * KEYS:>8} {answer:>9.1f}")

        return ensureDeferred(measure())

    react(run, [])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
