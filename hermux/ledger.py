"""
The usage ledger: per UTC day, how many requests each key served, how many
were rate limited or failed, and how many requests each client made.

Counts are kept in memory as they happen and written to SQLite in batches,
in a thread of their own, at least every second and when hermux stops: a
crash loses at most the last second of counts, and the file is never left
half-written (SQLite in WAL mode commits each batch atomically).

L{ILedger} is all the rest of hermux sees, so that another store (one shared
by several hermux instances) can take SQLite's place.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter
from datetime import date, timedelta

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import Attribute, Interface, implementer

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


class _Pending:
    """
    Counts recorded since the last write.

    @ivar committed: set by the writer thread once the counts are in the
        file.
    """

    def __init__(self):
        self.keys: Counter[tuple[int, str, str]] = Counter()
        self.clients: Counter[tuple[int, str]] = Counter()
        self.committed = False

    def __bool__(self):
        return bool(self.keys or self.clients)

    def add(self, other: _Pending):
        self.keys.update(other.keys)
        self.clients.update(other.clients)

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


def _write(connection: sqlite3.Connection, batch: _Pending, lock: threading.Lock) -> None:
    keyRows: dict[tuple[int, str], list[int]] = {}
    for (day, key, column), n in batch.keys.items():
        row = keyRows.setdefault((day, key), [0, 0, 0])
        row[("requests", "rate_limited", "errors").index(column)] += n
    with lock, connection:
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(
            _ADD_KEY_USAGE, [(dayText(d), k, *row) for (d, k), row in keyRows.items()]
        )
        connection.executemany(
            _ADD_CLIENT_USAGE, [(dayText(d), c, n) for (d, c), n in batch.clients.items()]
        )
        batch.committed = True


@implementer(ILedger)
class SQLiteLedger(Service):
    """
    The ledger in a SQLite file, written by a thread of its own.

    Opening checks the file at once (so a bad one stops hermux from
    starting); the connection that writes is made when the service starts,
    after twistd has daemonized.

    @ivar problem: the last write error, while writing fails (for
        C{/hermux/health}); L{None} when all is well.
    """

    _log = Logger()
    problemLogInterval = 60.0

    def __init__(self, path: str, *, reactor=None, interval: float = 1.0):
        if reactor is None:
            from twisted.internet import reactor
        self.path = path
        self._reactor = reactor
        self._interval = interval
        self._pending = _Pending()
        self._writing = _Pending()
        self._connection: sqlite3.Connection | None = None
        self._threads: ThreadPool | None = None
        self._loop: LoopingCall | None = None
        self._flushing: Deferred | None = None
        self._lastProblemLogged: float | None = None
        self._lock = threading.Lock()
        self.problem: str | None = None
        _connect(path).close()

    def keyUsage(self, day):
        """
        Read synchronously, with a connection of its own: for startup, not
        for the reactor thread once hermux serves.
        """
        with self._lock:
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
        with self._lock:
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
        The counts not in the file yet.  Call it holding C{_lock}, so that
        a batch being written is either committed or not.
        """
        unwritten = _Pending()
        if not self._writing.committed:
            unwritten.add(self._writing)
        unwritten.add(self._pending)
        return unwritten

    def record(self, day, key, requests=0, rateLimited=0, errors=0):
        self._pending.record(day, key, requests, rateLimited, errors)

    def recordClient(self, day, client):
        self._pending.clients[(day, client)] += 1

    def startService(self):
        super().startService()
        self._threads = ThreadPool(minthreads=1, maxthreads=1, name="hermux-ledger")
        self._threads.start()
        self._connection = _connect(self.path)
        self._loop = LoopingCall(self.flush)
        self._loop.clock = self._reactor
        self._loop.start(self._interval, now=False)

    async def _stop(self):
        self._loop.stop()
        for attempt in range(3):
            await self.flush()
            if not self._pending:
                break
        if self._pending:
            self._log.error(
                "stopping with counts that could not be written to {path}", path=self.path
            )
        self._connection.close()
        self._connection = None
        self._threads.stop()
        self._threads = None

    def stopService(self):
        super().stopService()
        return ensureDeferred(self._stop())

    def flush(self) -> Deferred:
        """
        Write what has been recorded so far; fires once it is written (or
        the write failed and the counts wait for the next try).  One write
        runs at a time: a flush asked for meanwhile follows it.
        """
        if self._threads is None:
            return succeed(None)
        if self._flushing is not None:
            after: Deferred[None] = Deferred()

            def thenFlush(_):
                self.flush().chainDeferred(after)

            self._flushing.addBoth(thenFlush)
            return after
        if not self._pending:
            return succeed(None)
        batch, self._pending = self._pending, _Pending()
        self._writing = batch
        d = deferToThreadPool(
            self._reactor, self._threads, _write, self._connection, batch, self._lock
        )
        d.addCallbacks(self._written, self._notWritten, errbackArgs=(batch,))
        self._flushing = d
        return d

    def _written(self, result):
        self._flushing = None
        self._writing = _Pending()
        if self.problem is not None:
            self._log.info("the state file {path} is written again", path=self.path)
            self.problem = None

    def _notWritten(self, failure, batch):
        # Keep the counts for the next try: nothing is lost while the
        # file cannot be written, only delayed.
        self._flushing = None
        self._writing = _Pending()
        batch.add(self._pending)
        self._pending = batch
        self.problem = f"cannot write the state file: {failure.getErrorMessage()}"
        now = self._reactor.seconds()
        if (
            self._lastProblemLogged is None
            or now - self._lastProblemLogged >= self.problemLogInterval
        ):
            self._lastProblemLogged = now
            self._log.error(
                "{problem}; hermux keeps counting in memory and will retry",
                problem=self.problem,
            )
