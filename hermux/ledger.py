# -*- test-case-name: tests.test_ledger,tests.test_durability -*-
"""
The usage ledger: per UTC day, how many requests each key served, how many
were rate limited or failed, and how many requests each client made.

Counts are kept in memory as they happen and written to SQLite in batches,
in a thread of their own (a L{BatchWriter}), at least every second and when
hermux stops: a crash loses at most the last second of counts, and the file
is never left half-written (SQLite in WAL mode commits each batch
atomically).

L{ILedger} is all the rest of hermux sees, so that another store (one shared
by several hermux instances) can take SQLite's place.
"""

from __future__ import annotations

__all__ = [
    "SCHEMA_VERSION",
    "APPLICATION_ID",
    "MODEL_LENGTH",
    "MODELS_PER_DAY",
    "OTHER_MODEL",
    "UNKNOWN",
    "COUNTERS",
    "GROUP_COLUMNS",
    "dayText",
    "dayNumber",
    "Counts",
    "KeyUsage",
    "UsageRow",
    "LedgerError",
    "ILedger",
    "MemoryLedger",
    "SQLiteLedger",
]

import sqlite3
from datetime import date, timedelta

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from hermux.batchwriter import BatchWriter, IBatch, IBatchTarget, writerSetting

SCHEMA_VERSION = 1
# PRAGMA application_id: "hmux" in ASCII, so that no other program's
# database is taken for hermux's.
APPLICATION_ID = 0x686D7578
_EPOCH = date(1970, 1, 1)

# A model name longer than this is cut; beyond MODELS_PER_DAY distinct models
# on one day, a new one counts as OTHER_MODEL: whatever names clients send,
# the state stays bounded.
MODEL_LENGTH = 128
MODELS_PER_DAY = 500
OTHER_MODEL = "other"
# The client of a request no client made (a probe), the model of an answer
# that named none.
UNKNOWN = "-"
# The counters, as the state file's columns and the usage report's fields
# name them, in the order of Counts.asRow.  cost is in nanocredits (1e-9
# credits): integers add up without drift.
COUNTERS = (
    "requests",
    "free_requests",
    "rate_limited",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cached_tokens",
    "cost",
)
# What usage can be grouped by.
GROUP_COLUMNS = ("day", "key", "client", "model")

_SCHEMA = """
CREATE TABLE key_usage (
    day TEXT NOT NULL,
    key TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    rate_limited INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key)
);
CREATE TABLE client_usage (
    day TEXT NOT NULL,
    client TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, client)
);
"""

_ADD_KEY_USAGE = """
INSERT INTO key_usage (day, key, requests, rate_limited, errors) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (day, key) DO UPDATE SET
    requests = requests + excluded.requests,
    rate_limited = rate_limited + excluded.rate_limited,
    errors = errors + excluded.errors
"""

_ADD_CLIENT_USAGE = """
INSERT INTO client_usage (day, client, requests) VALUES (?, ?, ?)
ON CONFLICT (day, client) DO UPDATE SET requests = requests + excluded.requests
"""


def dayText(day: int) -> str:
    """
    The ISO date of a UTC day number (days since 1970-01-01).
    """
    return (_EPOCH + timedelta(days=day)).isoformat()


def dayNumber(text: str) -> int:
    """
    The UTC day number of an ISO date (C{YYYY-MM-DD}).

    @raise ValueError: if C{text} is not one.
    """
    return (date.fromisoformat(text) - _EPOCH).days


@attr.frozen
class Counts:
    """
    What was counted for one day, key, client and model (or a sum of
    those).  C{cost} is in nanocredits.
    """

    requests: int = 0
    freeRequests: int = 0
    rateLimited: int = 0
    errors: int = 0
    promptTokens: int = 0
    completionTokens: int = 0
    reasoningTokens: int = 0
    cachedTokens: int = 0
    cost: int = 0

    def __add__(self, other: Counts) -> Counts:
        if not isinstance(other, Counts):
            return NotImplemented
        return Counts(
            self.requests + other.requests,
            self.freeRequests + other.freeRequests,
            self.rateLimited + other.rateLimited,
            self.errors + other.errors,
            self.promptTokens + other.promptTokens,
            self.completionTokens + other.completionTokens,
            self.reasoningTokens + other.reasoningTokens,
            self.cachedTokens + other.cachedTokens,
            self.cost + other.cost,
        )

    def asRow(self) -> tuple[int, ...]:
        """
        The counters in L{COUNTERS}' order.
        """
        return (
            self.requests,
            self.freeRequests,
            self.rateLimited,
            self.errors,
            self.promptTokens,
            self.completionTokens,
            self.reasoningTokens,
            self.cachedTokens,
            self.cost,
        )

    @classmethod
    def fromRow(cls, row) -> Counts:
        """
        The counts of a row of counters in L{COUNTERS}' order.
        """
        return cls(*(int(n) for n in row))


# The name today's callers know.
KeyUsage = Counts
_ZERO = Counts()


@attr.frozen
class UsageRow:
    """
    One row of L{ILedger.usage}: the values of the grouping columns, in
    the order asked for (a day as ISO text), and their counts.
    """

    group: tuple[str, ...]
    counts: Counts


class LedgerError(Exception):
    """
    The state file cannot be used; C{str()} says why, in one line.
    """


class ILedger(Interface):
    """
    Where usage counts are kept.  C{day} is a UTC day number.
    """

    problem = Attribute("Why counts cannot be stored right now, or None.")

    def add(day: int, key: str, client: str, model: str, counts: Counts) -> None:
        """
        Add C{counts} to what C{key} served C{client} for C{model} on
        C{day}.  C{client} is L{UNKNOWN} for a request no client made (a
        probe), C{model} L{UNKNOWN} when it is not known.  A model name
        longer than L{MODEL_LENGTH} is cut; beyond L{MODELS_PER_DAY}
        distinct models on one day, a new one counts as L{OTHER_MODEL}.
        """

    def keyUsage(day: int) -> dict[str, Counts]:
        """
        Each key's counts for C{day}, by name, including counts not yet
        written.  Synchronous: for startup.
        """

    def clientUsage(day: int) -> dict[str, Counts]:
        """
        Each client's counts for C{day}, by label, including counts not
        yet written.
        """

    def usage(fromDay: int, toDay: int, groupBy: tuple[str, ...]) -> Deferred:
        """
        The counts from C{fromDay} to C{toDay} (inclusive) summed per
        distinct value of the C{groupBy} columns (names from
        L{GROUP_COLUMNS}), including counts not yet written: a L{Deferred}
        that fires with a list of L{UsageRow}, sorted by group.  Never
        blocks the reactor thread.

        @raise ValueError: if C{groupBy} names something else or a column
            twice.
        """

    def flush() -> Deferred:
        """
        Write what has been recorded; fires when it is written.
        """


def _checkGroupBy(groupBy) -> tuple[str, ...]:
    groupBy = tuple(groupBy)
    for column in groupBy:
        if column not in GROUP_COLUMNS:
            raise ValueError(f"cannot group usage by {column!r}")
    if len(set(groupBy)) != len(groupBy):
        raise ValueError("a column named twice in groupBy")
    return groupBy


def _modelName(model: str) -> str:
    if not model:
        return UNKNOWN
    return model[:MODEL_LENGTH]


class _Models:
    """
    The distinct models of each recent day, so that at most
    L{MODELS_PER_DAY} of them are kept apart per day (L{UNKNOWN} and
    L{OTHER_MODEL} not counted).  Only the last few days are remembered.
    """

    keepDays = 3

    def __init__(self, known: dict[int, set[str]] | None = None):
        self._days: dict[int, set[str]] = dict(known or {})

    def name(self, day: int, model: str) -> str:
        model = _modelName(model)
        if model == UNKNOWN or model == OTHER_MODEL:
            return model
        models = self._days.get(day)
        if models is None:
            models = self._days[day] = set()
            if len(self._days) > self.keepDays:
                for old in sorted(self._days)[: -self.keepDays]:
                    del self._days[old]
        if model in models:
            return model
        if len(models) >= MODELS_PER_DAY:
            return OTHER_MODEL
        models.add(model)
        return model


@implementer(IBatch)
class _Pending:
    """
    Counts added and not written yet, summed per day, key, client and
    model: a batch of L{SQLiteLedger}'s writer, whose C{size} is the
    number of rows it adds to.
    """

    def __init__(self):
        self.rows: dict[tuple[int, str, str, str], Counts] = {}

    @property
    def size(self) -> int:
        return len(self.rows)

    def extend(self, newer: _Pending):
        for row, counts in newer.rows.items():
            self.add(row, counts)

    def trim(self, size):
        raise NotImplementedError("the ledger keeps every count; its writer has no backlog")

    def add(self, row: tuple[int, str, str, str], counts: Counts) -> None:
        before = self.rows.get(row)
        self.rows[row] = counts if before is None else before + counts

    def byColumn(self, day: int, column: int) -> dict[str, Counts]:
        """
        The counts of C{day} summed per key (C{column} 1) or client (2).
        """
        usage: dict[str, Counts] = {}
        for row, counts in self.rows.items():
            if row[0] == day:
                name = row[column]
                usage[name] = usage.get(name, _ZERO) + counts
        return usage

    def grouped(self, fromDay: int, toDay: int, groupBy: tuple[str, ...]) -> dict[tuple, Counts]:
        """
        The counts from C{fromDay} to C{toDay}, summed per group.
        """
        indexes = [GROUP_COLUMNS.index(c) for c in groupBy]
        groups: dict[tuple, Counts] = {}
        for row, counts in self.rows.items():
            if fromDay <= row[0] <= toDay:
                group = tuple(
                    dayText(row[0]) if i == 0 else row[i] for i in indexes
                )
                groups[group] = groups.get(group, _ZERO) + counts
        return groups


def _merge(*usages: dict) -> dict:
    merged: dict = {}
    for usage in usages:
        for name, counts in usage.items():
            merged[name] = merged.get(name, _ZERO) + counts
    return merged


def _rows(groups: dict[tuple, Counts]) -> list[UsageRow]:
    return [UsageRow(group, groups[group]) for group in sorted(groups)]


@implementer(ILedger)
class MemoryLedger:
    """
    A ledger that forgets everything when hermux stops: for tests, and for
    code that needs a ledger but no state.
    """

    problem = None

    def __init__(self):
        self._counts = _Pending()
        self._models = _Models()

    def add(self, day, key, client, model, counts):
        self._counts.add((day, key, client, self._models.name(day, model)), counts)

    def keyUsage(self, day):
        return self._counts.byColumn(day, 1)

    def clientUsage(self, day):
        return self._counts.byColumn(day, 2)

    def usage(self, fromDay, toDay, groupBy):
        groupBy = _checkGroupBy(groupBy)
        return succeed(_rows(self._counts.grouped(fromDay, toDay, groupBy)))

    def flush(self):
        return succeed(None)


def _connect(path: str) -> sqlite3.Connection:
    """
    Open the state file, creating it with hermux's schema if it is new.

    @raise LedgerError: if it cannot be opened or is not hermux's.
    """
    try:
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA busy_timeout = 5000")
        applicationId = connection.execute("PRAGMA application_id").fetchone()[0]
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        tables = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if applicationId == 0 and version == 0 and tables == 0:
            connection.executescript(
                "BEGIN;" + _SCHEMA + f"PRAGMA application_id = {APPLICATION_ID};"
                f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            )
        elif applicationId != APPLICATION_ID:
            raise LedgerError(f"{path}: not a hermux state file (another program's database?)")
        elif version != SCHEMA_VERSION:
            raise LedgerError(
                f"{path}: written by a hermux with state schema {version}; "
                f"this one reads schema {SCHEMA_VERSION}"
            )
        if connection.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise LedgerError(f"{path}: the state file is damaged")
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
        return connection
    except sqlite3.DatabaseError as e:
        raise LedgerError(f"{path}: cannot use the state file: {e}")


def _readKeyUsage(connection, day: int) -> dict[str, Counts]:
    rows = connection.execute(
        "SELECT key, requests, rate_limited, errors FROM key_usage WHERE day = ?",
        (dayText(day),),
    )
    return {key: Counts(requests=r, rateLimited=l, errors=e) for key, r, l, e in rows}


@implementer(ILedger, IBatchTarget)
class SQLiteLedger(Service):
    """
    The ledger in a SQLite file, written in batches by a L{BatchWriter}.

    Opening checks the file at once (so a bad one stops hermux from
    starting); the connection that writes is made when the service starts,
    after twistd has daemonized.

    While the file cannot be written, counts wait in memory, merged per row:
    what waits grows with the keys, clients and days counted (all from the
    configuration), not with the requests, so the writer keeps all of it
    (it has no C{backlog}): a count dropped would be usage the key pool
    forgets.
    """

    _log = Logger()
    problemLogInterval = writerSetting(
        "problemLogInterval", "How often, at most, a write problem is logged, in seconds."
    )

    def __init__(self, path: str, *, reactor=None, interval: float = 1.0):
        self.path = path
        self._connection: sqlite3.Connection | None = None
        self._writer = BatchWriter(
            self, interval=interval, reactor=reactor, stopAttempts=3, threadName="hermux-ledger"
        )
        self._models = _Models()
        _connect(path).close()

    @property
    def problem(self) -> str | None:
        """
        Why counts cannot be written, while writing fails (for
        C{/hermux/health}); L{None} when all is well.
        """
        if self._writer.problem is None:
            return None
        return f"cannot write the state file: {self._writer.problem}"

    def keyUsage(self, day):
        """
        Read synchronously, with a connection of its own: for startup, not
        for the reactor thread once hermux serves.
        """
        with self._writer.lock:
            connection = _connect(self.path)
            try:
                stored = _readKeyUsage(connection, day)
            finally:
                connection.close()
            return _merge(stored, self._unwritten().byColumn(day, 1))

    def clientUsage(self, day):
        """
        Read synchronously, like L{keyUsage}.
        """
        with self._writer.lock:
            connection = _connect(self.path)
            try:
                rows = connection.execute(
                    "SELECT client, requests FROM client_usage WHERE day = ?", (dayText(day),)
                ).fetchall()
            finally:
                connection.close()
            stored = {client: Counts(requests=n) for client, n in rows}
            return _merge(stored, self._unwritten().byColumn(day, 2))

    def usage(self, fromDay, toDay, groupBy):
        raise NotImplementedError("schema 2 comes next")

    def _unwritten(self) -> _Pending:
        """
        The counts not in the file yet.  Call it holding the writer's lock,
        so that a batch being written is either committed or not.
        """
        unwritten = _Pending()
        for batch in self._writer.unwritten():
            unwritten.extend(batch)
        return unwritten

    def add(self, day, key, client, model, counts):
        self._writer.pending.add((day, key, client, self._models.name(day, model)), counts)

    def startService(self):
        super().startService()
        self._connection = _connect(self.path)
        self._writer.startService()

    async def _stop(self):
        await self._writer.stopService()
        if self._writer.pending.size:
            self._log.error(
                "stopping with counts that could not be written to {path}", path=self.path
            )
        self._connection.close()
        self._connection = None

    def stopService(self):
        super().stopService()
        return ensureDeferred(self._stop())

    def flush(self) -> Deferred:
        """
        Write what has been recorded so far; fires once it is written (or
        the write failed and the counts wait for the next try).
        """
        return self._writer.flush()

    # IBatchTarget: how the writer writes a batch of counts.

    def newBatch(self) -> _Pending:
        return _Pending()

    def writeBatch(self, batch: _Pending) -> None:
        """
        Add C{batch} to the file in one transaction, in the writer's thread.
        """
        keyRows: dict[tuple[int, str], Counts] = {}
        clientRows: dict[tuple[int, str], int] = {}
        for (day, key, client, model), counts in batch.rows.items():
            keyRows[(day, key)] = keyRows.get((day, key), _ZERO) + counts
            if client != UNKNOWN:
                clientRows[(day, client)] = clientRows.get((day, client), 0) + counts.requests
        connection = self._connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany(
                _ADD_KEY_USAGE,
                [(dayText(d), k, c.requests, c.rateLimited, c.errors) for (d, k), c in keyRows.items()],
            )
            connection.executemany(
                _ADD_CLIENT_USAGE, [(dayText(d), c, n) for (d, c), n in clientRows.items()]
            )
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise

    def writeFailing(self, problem: str) -> None:
        # Nothing is lost while the file cannot be written, only delayed.
        self._log.error(
            "{problem}; hermux keeps counting in memory and will retry", problem=self.problem
        )

    def writingAgain(self, dropped: int) -> None:
        self._log.info("the state file {path} is written again", path=self.path)
