# -*- test-case-name: tests.test_ledger,tests.test_durability -*-
"""
The usage ledger: per UTC day, key, client and model, how many requests
were made (and how many of them for free models), how many were rate
limited or failed, the tokens they used and what they cost.

Counts are kept in memory as they happen and written to SQLite in batches,
in a thread of their own (a L{BatchWriter}), at least every second and when
hermux stops: a crash loses at most the last second of counts, and the file
is never left half-written (SQLite in WAL mode commits each batch
atomically).

The state file (schema 2) holds the counts per day, key, client and model
in C{usage}, and their sums per day and key (C{key_usage}), per day and
client (C{client_usage}) and per day and model (C{model_usage}), all kept
in the same transaction, so that the key pool's start and most usage
reports read a small table.  A file of schema 1 (hermux 0.1: requests,
rate limited and errors per key, requests per client) is migrated in place
when it is opened, in one transaction: its days keep every per-key and
per-client count, but they do not know which client used which key, nor
the models, tokens or cost (their detail rows say client and model
L{UNKNOWN}).

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
    "ROW_LIMIT",
    "TooManyRows",
    "ILedger",
    "MemoryLedger",
    "SQLiteLedger",
    "openReadOnly",
    "readUsage",
]

import os
import sqlite3
from datetime import date, timedelta
from typing import NamedTuple
from urllib.request import pathname2url

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from hermux.batchwriter import BatchWriter, IBatch, IBatchTarget, writerSetting

SCHEMA_VERSION = 2
# PRAGMA application_id: "hmux" in ASCII, so that no other program's
# database is taken for hermux's.
APPLICATION_ID = 0x686D7578
_EPOCH = date(1970, 1, 1)
_SECONDS_PER_DAY = 86400

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

# Each table of schema 2 and the columns that name its rows (days are ISO
# text, as in schema 1: the file reads well in the sqlite3 shell).  usage is
# the detail; the others are its sums, kept in the same transaction.
_TABLES = {
    "usage": ("day", "key", "client", "model"),
    "key_usage": ("day", "key"),
    "client_usage": ("day", "client"),
    "model_usage": ("day", "model"),
}


def _createTable(table: str) -> str:
    columns = _TABLES[table]
    return (
        f"CREATE TABLE {table} (\n"
        + "".join(f"    {c} TEXT NOT NULL,\n" for c in columns)
        + "".join(f"    {c} INTEGER NOT NULL DEFAULT 0,\n" for c in COUNTERS)
        + f"    PRIMARY KEY ({', '.join(columns)})\n) WITHOUT ROWID;\n"
    )


def _addTo(table: str) -> str:
    columns = _TABLES[table]
    return (
        f"INSERT INTO {table} ({', '.join(columns + COUNTERS)}) "
        f"VALUES ({', '.join('?' * (len(columns) + len(COUNTERS)))}) "
        f"ON CONFLICT ({', '.join(columns)}) DO UPDATE SET "
        + ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTERS)
    )


_SCHEMA = "".join(_createTable(table) for table in _TABLES)
_ADD = {table: _addTo(table) for table in _TABLES}

# Schema 1 to 2, run in one transaction with the version's change: the old
# tables are renamed, the new ones made and filled, the old ones dropped.
_MIGRATE_1_TO_2 = [
    "ALTER TABLE key_usage RENAME TO key_usage_1",
    "ALTER TABLE client_usage RENAME TO client_usage_1",
    *(statement + ";" for statement in _SCHEMA.split(";\n") if statement.strip()),
    "INSERT INTO key_usage (day, key, requests, rate_limited, errors) "
    "SELECT day, key, requests, rate_limited, errors FROM key_usage_1",
    "INSERT INTO usage (day, key, client, model, requests, rate_limited, errors) "
    f"SELECT day, key, '{UNKNOWN}', '{UNKNOWN}', requests, rate_limited, errors FROM key_usage_1",
    "INSERT INTO model_usage (day, model, requests, rate_limited, errors) "
    f"SELECT day, '{UNKNOWN}', sum(requests), sum(rate_limited), sum(errors) "
    "FROM key_usage_1 GROUP BY day",
    "INSERT INTO client_usage (day, client, requests) SELECT day, client, requests FROM client_usage_1",
    "DROP TABLE key_usage_1",
    "DROP TABLE client_usage_1",
]


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


class Counts(NamedTuple):
    """
    What was counted for one day, key, client and model (or a sum of
    those).  C{cost} is in nanocredits.  A named tuple rather than an attrs
    class: one is made for every request, and a tuple is made fastest.
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

    def __add__(self, other: Counts) -> Counts:  # type: ignore[override]
        # The sum of the counters, not the tuples' concatenation.
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
        return tuple(self)

    @classmethod
    def fromRow(cls, row) -> Counts:
        """
        The counts of a row of counters in L{COUNTERS}' order.
        """
        return cls(*row)


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


# The most groups one usage query answers: 400 days of 20 keys, 10 clients
# and 20 models grouped by all four would be 1.6 million rows, hundreds of
# MB of JSON; a caller who asks for more is told to ask for fewer.
ROW_LIMIT = 100_000


class TooManyRows(Exception):
    """
    A usage query would answer more than L{ROW_LIMIT} groups.
    """

    def __str__(self) -> str:
        return (
            f"more than {ROW_LIMIT} rows; ask for fewer days or group by fewer columns"
        )


def _bounded(groups: dict) -> dict:
    if len(groups) > ROW_LIMIT:
        raise TooManyRows()
    return groups


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

    def usage(
        fromDay: int, toDay: int, groupBy: tuple[str, ...], client: str | None = None
    ) -> Deferred:
        """
        The counts from C{fromDay} to C{toDay} (inclusive) summed per
        distinct value of the C{groupBy} columns (names from
        L{GROUP_COLUMNS}), including counts not yet written: a L{Deferred}
        that fires with a list of L{UsageRow}, sorted by group.  With
        C{client} (a label), only that client's counts.  Never blocks the
        reactor thread.  It fails with L{TooManyRows} rather than answer
        more than L{ROW_LIMIT} groups.

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

    def __init__(self, serial: int = 0):
        self.rows: dict[tuple[int, str, str, str], Counts] = {}
        # Batches are numbered as they are made; a batch that took in a
        # newer one (a failed write kept ahead of what came since) takes its
        # number.  Writes commit in that order, so the file holds every
        # batch up to the last one committed, and none after it.
        self.serial = serial

    @property
    def size(self) -> int:
        return len(self.rows)

    def extend(self, newer: _Pending):
        for row, counts in newer.rows.items():
            self.add(row, counts)
        self.serial = max(self.serial, newer.serial)

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

    def grouped(
        self, fromDay: int, toDay: int, groupBy: tuple[str, ...], client: str | None = None
    ) -> dict[tuple, Counts]:
        """
        The counts from C{fromDay} to C{toDay}, summed per group; with
        C{client}, that client's only.
        """
        indexes = [GROUP_COLUMNS.index(c) for c in groupBy]
        groups: dict[tuple, Counts] = {}
        for row, counts in self.rows.items():
            if fromDay <= row[0] <= toDay and (client is None or row[2] == client):
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

    def usage(self, fromDay, toDay, groupBy, client=None):
        groupBy = _checkGroupBy(groupBy)
        try:
            return succeed(
                _rows(_bounded(self._counts.grouped(fromDay, toDay, groupBy, client)))
            )
        except TooManyRows:
            return fail()

    def flush(self):
        return succeed(None)


def _today(reactor) -> int:
    return int(reactor.seconds() // _SECONDS_PER_DAY)


def _version(connection, path: str) -> int:
    """
    The schema of a hermux state file (0 for an empty database).

    @raise LedgerError: if it is another program's database, or written by
        a newer hermux.
    """
    applicationId = connection.execute("PRAGMA application_id").fetchone()[0]
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    tables = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if applicationId == 0 and version == 0 and tables == 0:
        return 0
    if applicationId != APPLICATION_ID:
        raise LedgerError(f"{path}: not a hermux state file (another program's database?)")
    if version > SCHEMA_VERSION or version < 1:
        raise LedgerError(
            f"{path}: written by a hermux with state schema {version}; "
            f"this one reads schemas 1 to {SCHEMA_VERSION}"
        )
    return version


def _inTransaction(connection, statements) -> None:
    """
    Run C{statements} (SQL text, or SQL and its parameters) in one
    transaction: all of them or, with an exception, none.
    """
    connection.execute("BEGIN IMMEDIATE")
    try:
        for statement in statements:
            if isinstance(statement, str):
                statement = (statement,)
            connection.execute(*statement)
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def _connect(path: str) -> sqlite3.Connection:
    """
    Open the state file for writing: create it with hermux's schema if it
    is new, migrate it if it has schema 1.

    @raise LedgerError: if it cannot be opened or is not hermux's.
    """
    try:
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            connection.execute("PRAGMA busy_timeout = 5000")
            version = _version(connection, path)
            if version == 0:
                _inTransaction(
                    connection,
                    [
                        *(s for s in _SCHEMA.split(";\n") if s.strip()),
                        f"PRAGMA application_id = {APPLICATION_ID}",
                        f"PRAGMA user_version = {SCHEMA_VERSION}",
                    ],
                )
            if connection.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise LedgerError(f"{path}: the state file is damaged")
            if version == 1:
                _inTransaction(connection, [*_MIGRATE_1_TO_2, "PRAGMA user_version = 2"])
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            connection.close()
            raise
        return connection
    except sqlite3.DatabaseError as e:
        raise LedgerError(f"{path}: cannot use the state file: {e}")


def openReadOnly(path: str) -> sqlite3.Connection:
    """
    Open the state file to read it only (a C{mode=ro} URI): never created,
    migrated or written, and safe while hermux writes it (WAL).  A file of
    schema 1 is refused: hermux migrates it when it starts.

    @raise LedgerError: if it does not exist, cannot be read, or is not a
        hermux state file of schema 2.
    """
    if not os.path.isfile(path):
        raise LedgerError(f"{path}: no such state file")
    try:
        connection = sqlite3.connect(
            f"file:{pathname2url(os.path.abspath(path))}?mode=ro",
            uri=True,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            connection.execute("PRAGMA busy_timeout = 5000")
            version = _version(connection, path)
            if version == 0:
                raise LedgerError(f"{path}: not a hermux state file (an empty database)")
            if version < SCHEMA_VERSION:
                raise LedgerError(
                    f"{path}: written by an older hermux (state schema {version}); "
                    "start hermux once on it to migrate it"
                )
        except BaseException:
            connection.close()
            raise
        return connection
    except sqlite3.DatabaseError as e:
        raise LedgerError(f"{path}: cannot read the state file: {e}")


def _table(groupBy: tuple[str, ...], client: str | None = None) -> str:
    """
    The smallest table that has the C{groupBy} columns, and the client
    column if the counts are C{client}'s only.
    """
    needed = set(groupBy) | ({"client"} if client is not None else set())
    for table in ("key_usage", "client_usage", "model_usage"):
        if needed <= set(_TABLES[table]):
            return table
    return "usage"


def _readGroups(
    connection, fromDay: int, toDay: int, groupBy: tuple[str, ...], client: str | None = None
) -> dict:
    table = _table(groupBy, client)
    columns = ", ".join(groupBy)
    where = "WHERE day BETWEEN ? AND ?"
    parameters: tuple[str, ...] = (dayText(fromDay), dayText(toDay))
    if client is not None:
        where += " AND client = ?"
        parameters += (client,)
    if set(groupBy) == set(_TABLES[table]):
        # One row per group already: nothing to sum.
        sql = f"SELECT {columns}, {', '.join(COUNTERS)} FROM {table} {where}"
    else:
        sums = ", ".join(f"sum({c})" for c in COUNTERS)
        sql = f"SELECT {columns + ', ' if groupBy else ''}{sums} FROM {table} {where}"
        if groupBy:
            sql += f" GROUP BY {columns}"
    # One more than may be answered, so that too many is known.
    sql += f" LIMIT {ROW_LIMIT + 1}"
    width = len(groupBy)
    groups = {}
    for row in connection.execute(sql, parameters):
        if row[width] is None:
            continue  # no group: the sums of no rows
        groups[row[:width]] = Counts(*row[width:])
    return _bounded(groups)


def readUsage(
    connection, fromDay: int, toDay: int, groupBy: tuple[str, ...], client: str | None = None
) -> list[UsageRow]:
    """
    The counts in the state file from C{fromDay} to C{toDay} (inclusive)
    summed per group of C{groupBy} (names from L{GROUP_COLUMNS}), sorted by
    group; with C{client} (a label), that client's only: what
    L{ILedger.usage} answers, less what is not written yet.  Synchronous:
    for a thread, or for the C{hermux usage} command.

    @raise ValueError: if C{groupBy} names something else or a column twice.
    """
    return _rows(_readGroups(connection, fromDay, toDay, _checkGroupBy(groupBy), client))


def _readByColumn(connection, table: str, day: int) -> dict[str, Counts]:
    name = _TABLES[table][1]
    rows = connection.execute(
        f"SELECT {name}, {', '.join(COUNTERS)} FROM {table} WHERE day = ?", (dayText(day),)
    )
    return {row[0]: Counts.fromRow(row[1:]) for row in rows}


@implementer(ILedger, IBatchTarget)
class SQLiteLedger(Service):
    """
    The ledger in a SQLite file, written in batches by a L{BatchWriter}.

    Opening checks the file at once, creating or migrating it (so a bad one
    stops hermux from starting); the connection that writes is made when
    the service starts, after twistd has daemonized.

    While the file cannot be written, counts wait in memory, merged per row:
    what waits grows with the keys, clients, models (at most
    L{MODELS_PER_DAY}) and days counted, not with the requests, so the
    writer keeps all of it (it has no C{backlog}): a count dropped would be
    usage the key pool forgets.

    Days older than C{retentionDays} (today included) are deleted at start
    and after each 00:00 UTC, in the writer's thread.
    """

    _log = Logger()
    problemLogInterval = writerSetting(
        "problemLogInterval", "How often, at most, a write problem is logged, in seconds."
    )

    def __init__(
        self, path: str, *, reactor=None, interval: float = 1.0, retentionDays: int = 400
    ):
        if reactor is None:
            from twisted.internet import reactor
        if retentionDays < 1:
            raise ValueError("retentionDays must be at least 1")
        self.path = path
        self.retentionDays = retentionDays
        self._reactor = reactor
        self._connection: sqlite3.Connection | None = None
        self._serial = 0
        # The serial of the last batch committed: written by the writer's
        # thread, read by usage()'s, both holding the writer's lock.
        self._committed = 0
        self._pruning = None
        self._writer = BatchWriter(
            self, interval=interval, reactor=reactor, stopAttempts=3, threadName="hermux-ledger"
        )
        connection = _connect(path)
        try:
            self._models = _Models(self._recentModels(connection))
        finally:
            connection.close()

    def _recentModels(self, connection) -> dict[int, set[str]]:
        """
        The models each of the last few days already has in the file.
        """
        since = _today(self._reactor) - _Models.keepDays + 1
        known: dict[int, set[str]] = {}
        rows = connection.execute(
            "SELECT day, model FROM model_usage WHERE day >= ?", (dayText(since),)
        )
        for day, model in rows:
            if model not in (UNKNOWN, OTHER_MODEL):
                known.setdefault(dayNumber(day), set()).add(model)
        return known

    @property
    def problem(self) -> str | None:
        """
        Why counts cannot be written, while writing fails (for
        C{/hermux/health}); L{None} when all is well.
        """
        if self._writer.problem is None:
            return None
        return f"cannot write the state file: {self._writer.problem}"

    def add(self, day, key, client, model, counts):
        self._writer.pending.add((day, key, client, self._models.name(day, model)), counts)

    def keyUsage(self, day):
        """
        Read synchronously, with a connection of its own: for startup, not
        for the reactor thread once hermux serves.
        """
        return self._usageOf("key_usage", day)

    def clientUsage(self, day):
        """
        Read synchronously, like L{keyUsage}.
        """
        return self._usageOf("client_usage", day)

    def _usageOf(self, table: str, day: int) -> dict[str, Counts]:
        with self._writer.lock:
            connection = _connect(self.path)
            try:
                stored = _readByColumn(connection, table, day)
            finally:
                connection.close()
            column = 1 if table == "key_usage" else 2
            return _merge(stored, self._unwritten().byColumn(day, column))

    def _unwritten(self) -> _Pending:
        """
        The counts not in the file yet.  Call it holding the writer's lock,
        so that a batch being written is either committed or not.
        """
        unwritten = _Pending()
        for batch in self._writer.unwritten():
            unwritten.extend(batch)
        return unwritten

    def usage(self, fromDay, toDay, groupBy, client=None):
        """
        Read in a thread of the reactor's pool, with a read-only connection
        of its own.  What is not written yet is copied here, in the reactor
        thread (only C{client}'s rows, given one); the thread reads the
        file as of a moment when it knows which of those copies the file
        already holds.
        """
        groupBy = _checkGroupBy(groupBy)
        copies = []
        for batch in self._writer.unwritten():
            if batch is None:
                continue  # written just now, in the writer's thread
            rows = {
                r: c
                for r, c in batch.rows.items()
                if fromDay <= r[0] <= toDay and (client is None or r[2] == client)
            }
            copies.append((batch.serial, rows))
        return deferToThreadPool(
            self._reactor,
            self._reactor.getThreadPool(),
            self._readUsage,
            fromDay,
            toDay,
            groupBy,
            client,
            copies,
        )

    def _readUsage(self, fromDay, toDay, groupBy, client, copies) -> list[UsageRow]:
        # In a thread of the reactor's pool.
        connection = openReadOnly(self.path)
        try:
            with self._writer.lock:
                # The first read of a transaction fixes what it sees (WAL):
                # no batch commits while the lock is held.
                connection.execute("BEGIN")
                connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
                committed = self._committed
            groups = _readGroups(connection, fromDay, toDay, groupBy, client)
            connection.execute("COMMIT")
        finally:
            connection.close()
        unwritten = _Pending()
        for serial, rows in copies:
            if serial > committed:
                unwritten.rows = rows
                for group, counts in unwritten.grouped(fromDay, toDay, groupBy, client).items():
                    groups[group] = groups.get(group, _ZERO) + counts
        return _rows(_bounded(groups))

    def startService(self):
        super().startService()
        self._connection = _connect(self.path)
        self._writer.startService()
        self._prune()

    async def _stop(self):
        if self._pruning is not None and self._pruning.active():
            self._pruning.cancel()
        self._pruning = None
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

    # Retention.

    def _prune(self) -> Deferred:
        """
        Delete the days older than C{retentionDays}, in the writer's
        thread, then do it again after the next 00:00 UTC.
        """
        now = self._reactor.seconds()
        keepFrom = int(now // _SECONDS_PER_DAY) - self.retentionDays + 1
        nextDay = (int(now // _SECONDS_PER_DAY) + 1) * _SECONDS_PER_DAY
        self._pruning = self._reactor.callLater(nextDay - now + 1, self._prune)
        d = self._writer.flushThen(lambda: self._deleteBefore(keepFrom))

        def pruned(deleted):
            if deleted:
                self._log.info(
                    "deleted {rows} rows of days before {day} from {path} (--retention-days {days})",
                    rows=deleted,
                    day=dayText(keepFrom),
                    path=self.path,
                    days=self.retentionDays,
                )

        def failed(failure):
            # As with a write that fails: the state file is the problem,
            # and the next day tries again.
            self._log.error(
                "could not delete old days from {path}: {problem}",
                path=self.path,
                problem=failure.getErrorMessage(),
            )

        return d.addCallbacks(pruned, failed)

    def _deleteBefore(self, day: int) -> int:
        # In the writer's thread.  Most days there is nothing to delete:
        # then nothing is written.
        connection = self._connection
        before = (dayText(day),)
        tables = [
            t
            for t in _TABLES
            if connection.execute(f"SELECT 1 FROM {t} WHERE day < ? LIMIT 1", before).fetchone()
        ]
        if not tables:
            return 0
        changes = connection.total_changes
        _inTransaction(connection, [(f"DELETE FROM {t} WHERE day < ?", before) for t in tables])
        return connection.total_changes - changes

    # IBatchTarget: how the writer writes a batch of counts.

    def newBatch(self) -> _Pending:
        self._serial += 1
        return _Pending(self._serial)

    def writeBatch(self, batch: _Pending) -> None:
        """
        Add C{batch} to the file in one transaction, in the writer's thread.
        """
        sums: dict[str, dict[tuple, Counts]] = {t: {} for t in _TABLES if t != "usage"}
        detail = []
        for (day, key, client, model), counts in batch.rows.items():
            text = dayText(day)
            detail.append((text, key, client, model, *counts.asRow()))
            for table, row in (
                ("key_usage", (text, key)),
                ("client_usage", (text, client)),
                ("model_usage", (text, model)),
            ):
                rows = sums[table]
                rows[row] = rows.get(row, _ZERO) + counts
        connection = self._connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany(_ADD["usage"], detail)
            for table, rows in sums.items():
                connection.executemany(
                    _ADD[table], [(*row, *counts.asRow()) for row, counts in rows.items()]
                )
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        self._committed = batch.serial

    def writeFailing(self, problem: str) -> None:
        # Nothing is lost while the file cannot be written, only delayed.
        self._log.error(
            "{problem}; hermux keeps counting in memory and will retry", problem=self.problem
        )

    def writingAgain(self, dropped: int) -> None:
        self._log.info("the state file {path} is written again", path=self.path)
