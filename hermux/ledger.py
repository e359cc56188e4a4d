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
    "dayText",
    "KeyUsage",
    "LedgerError",
    "ILedger",
    "MemoryLedger",
    "SQLiteLedger",
]

import sqlite3
from collections import Counter
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


@attr.frozen
class KeyUsage:
    requests: int = 0
    rateLimited: int = 0
    errors: int = 0


class LedgerError(Exception):
    """
    The state file cannot be used; C{str()} says why, in one line.
    """


class ILedger(Interface):
    """
    Where usage counts are kept.  C{day} is a UTC day number.
    """

    problem = Attribute("Why counts cannot be stored right now, or None.")

    def keyUsage(day: int) -> dict[str, KeyUsage]:
        """
        Each key's counts for C{day}, by name, including counts not yet
        written.
        """

    def clientUsage(day: int) -> dict[str, int]:
        """
        Each client's requests on C{day}, by label.
        """

    def record(day: int, key: str, requests: int = 0, rateLimited: int = 0, errors: int = 0):
        """
        Add to a key's counts for C{day}.
        """

    def recordClient(day: int, client: str) -> None:
        """
        Count one request from a client on C{day}.
        """

    def flush() -> Deferred:
        """
        Write what has been recorded; fires when it is written.
        """


@implementer(IBatch)
class _Pending:
    """
    Counts recorded and not written yet, summed per row: a batch of
    L{SQLiteLedger}'s writer, whose C{size} is the number of rows it adds
    to.
    """

    def __init__(self):
        self.keys: Counter[tuple[int, str, str]] = Counter()
        self.clients: Counter[tuple[int, str]] = Counter()

    @property
    def size(self) -> int:
        return len(self.keys) + len(self.clients)

    def extend(self, newer: _Pending):
        self.keys.update(newer.keys)
        self.clients.update(newer.clients)

    def trim(self, size):
        raise NotImplementedError("the ledger keeps every count; its writer has no backlog")

    def record(self, day, key, requests, rateLimited, errors):
        for column, n in (("requests", requests), ("rate_limited", rateLimited), ("errors", errors)):
            if n:
                self.keys[(day, key, column)] += n

    def keyUsage(self, day) -> dict[str, Counter]:
        usage: dict[str, Counter] = {}
        for (d, key, column), n in self.keys.items():
            if d == day:
                usage.setdefault(key, Counter())[column] += n
        return usage


def _merged(stored: dict[str, Counter], pending: dict[str, Counter]) -> dict[str, KeyUsage]:
    names = set(stored) | set(pending)
    merged = {}
    for name in names:
        counts = stored.get(name, Counter()) + pending.get(name, Counter())
        merged[name] = KeyUsage(counts["requests"], counts["rate_limited"], counts["errors"])
    return merged


@implementer(ILedger)
class MemoryLedger:
    """
    A ledger that forgets everything when hermux stops: for tests, and for
    code that needs a ledger but no state.
    """

    problem = None

    def __init__(self):
        self._counts = _Pending()

    def keyUsage(self, day):
        return _merged({}, self._counts.keyUsage(day))

    def clientUsage(self, day):
        return {c: n for (d, c), n in self._counts.clients.items() if d == day}

    def record(self, day, key, requests=0, rateLimited=0, errors=0):
        self._counts.record(day, key, requests, rateLimited, errors)

    def recordClient(self, day, client):
        self._counts.clients[(day, client)] += 1

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


def _readKeyUsage(connection, day: int) -> dict[str, Counter]:
    rows = connection.execute(
        "SELECT key, requests, rate_limited, errors FROM key_usage WHERE day = ?",
        (dayText(day),),
    )
    return {
        key: Counter(requests=r, rate_limited=l, errors=e) for key, r, l, e in rows
    }


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
            return _merged(stored, self._unwritten().keyUsage(day))

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
            usage = Counter(dict(rows))
            usage.update({c: n for (d, c), n in self._unwritten().clients.items() if d == day})
            return dict(usage)

    def _unwritten(self) -> _Pending:
        """
        The counts not in the file yet.  Call it holding the writer's lock,
        so that a batch being written is either committed or not.
        """
        unwritten = _Pending()
        for batch in self._writer.unwritten():
            unwritten.extend(batch)
        return unwritten

    def record(self, day, key, requests=0, rateLimited=0, errors=0):
        self._writer.pending.record(day, key, requests, rateLimited, errors)

    def recordClient(self, day, client):
        self._writer.pending.clients[(day, client)] += 1

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
        keyRows: dict[tuple[int, str], list[int]] = {}
        for (day, key, column), n in batch.keys.items():
            row = keyRows.setdefault((day, key), [0, 0, 0])
            row[("requests", "rate_limited", "errors").index(column)] += n
        connection = self._connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany(
                _ADD_KEY_USAGE, [(dayText(d), k, *row) for (d, k), row in keyRows.items()]
            )
            connection.executemany(
                _ADD_CLIENT_USAGE, [(dayText(d), c, n) for (d, c), n in batch.clients.items()]
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
