"""
Tests for L{hermux.ledger}: the usage ledger and its SQLite state file.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import threading
import time

from zope.interface.verify import verifyObject

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hermux.config import Key
from hermux.keypool import KeyPool, dayOf
from hermux.ledger import (
    APPLICATION_ID,
    SCHEMA_VERSION,
    ILedger,
    KeyUsage,
    LedgerError,
    MemoryLedger,
    SQLiteLedger,
)

NOW = 1_800_000_000.0 + 1234.5  # 2027-01-15T08:20:34Z
DAY = dayOf(NOW)
DAY_TEXT = "2027-01-15"
NEXT_DAY_TEXT = "2027-01-16"


class ThreadedClock(Clock):
    """
    A L{Clock} that also takes calls from other threads.

    L{SQLiteLedger} writes in a thread pool of its own and gets the result
    back with C{deferToThreadPool(reactor, ...)}, which calls
    C{reactor.callFromThread}; a plain L{Clock} has no such method.  This
    one hands those calls to the real reactor, so that the write really
    happens in a thread while time (the flush interval and
    C{problemLogInterval}) stays under the test's control.
    """

    def callFromThread(self, f, *args, **kwargs):
        reactor.callFromThread(f, *args, **kwargs)


def query(path: str, sql: str, parameters=()) -> list[tuple]:
    """
    Run C{sql} on the file at C{path} with a connection of the test's own,
    as any other reader of the state file would.
    """
    connection = sqlite3.connect(path)
    try:
        return connection.execute(sql, parameters).fetchall()
    finally:
        connection.close()


def storedKeys(path: str) -> set[tuple]:
    """
    The rows of the key_usage table.
    """
    return set(query(path, "SELECT day, key, requests, rate_limited, errors FROM key_usage"))


def storedClients(path: str) -> set[tuple]:
    """
    The rows of the client_usage table.
    """
    return set(query(path, "SELECT day, client, requests FROM client_usage"))


async def waitUntil(predicate, timeout: float = 5.0) -> bool:
    """
    Let the real reactor run until C{predicate()} is true or C{timeout}
    seconds have passed; say whether it became true.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await deferLater(reactor, 0.01, lambda: None)
    return True


class MemoryLedgerTests(SynchronousTestCase):
    """
    Tests for L{MemoryLedger}.
    """

    def test_providesILedger(self):
        """
        L{MemoryLedger} provides L{ILedger}.
        """
        self.assertTrue(verifyObject(ILedger, MemoryLedger()))

    def test_countsPerDay(self):
        """
        Key and client counts add up per day, and days are kept apart.
        """
        ledger = MemoryLedger()
        ledger.record(DAY, "key0", requests=2)
        ledger.record(DAY, "key0", rateLimited=1, errors=1)
        ledger.record(DAY + 1, "key0", requests=5)
        ledger.recordClient(DAY, "alice")
        ledger.recordClient(DAY, "alice")
        ledger.recordClient(DAY + 1, "bob")
        self.assertEqual(ledger.keyUsage(DAY), {"key0": KeyUsage(2, 1, 1)})
        self.assertEqual(ledger.keyUsage(DAY + 1), {"key0": KeyUsage(5, 0, 0)})
        self.assertEqual(ledger.clientUsage(DAY), {"alice": 2})
        self.assertEqual(ledger.clientUsage(DAY + 1), {"bob": 1})
        self.assertEqual(ledger.keyUsage(DAY - 1), {})
        self.assertEqual(ledger.clientUsage(DAY - 1), {})

    def test_flushFiresAtOnce(self):
        """
        A memory ledger has nothing to write: its flush has already fired.
        """
        ledger = MemoryLedger()
        ledger.record(DAY, "key0", requests=1)
        self.assertIsNone(self.successResultOf(ledger.flush()))


class StateFileTests(SynchronousTestCase):
    """
    Opening the state file: a new one gets hermux's schema, anything that
    is not a hermux state file of this version stops startup.
    """

    def test_providesILedger(self):
        """
        L{SQLiteLedger} provides L{ILedger}.
        """
        ledger = SQLiteLedger(self.mktemp(), reactor=Clock())
        self.assertTrue(verifyObject(ILedger, ledger))

    def test_newFileGetsSchema(self):
        """
        A state file that does not exist yet is created with hermux's two
        tables, its application id and the schema version.
        """
        path = self.mktemp()
        SQLiteLedger(path, reactor=Clock())
        self.assertTrue(os.path.exists(path))
        tables = {
            name for (name,) in query(path, "SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        self.assertEqual(tables, {"key_usage", "client_usage"})
        self.assertEqual(query(path, "PRAGMA application_id"), [(APPLICATION_ID,)])
        self.assertEqual(APPLICATION_ID, 0x686D7578)
        self.assertEqual(query(path, "PRAGMA user_version"), [(SCHEMA_VERSION,)])
        self.assertGreaterEqual(SCHEMA_VERSION, 1)

    def test_reopen(self):
        """
        A state file hermux created opens again, unchanged.
        """
        path = self.mktemp()
        SQLiteLedger(path, reactor=Clock())
        before = query(path, "SELECT type, name, sql FROM sqlite_master ORDER BY name")
        SQLiteLedger(path, reactor=Clock())
        after = query(path, "SELECT type, name, sql FROM sqlite_master ORDER BY name")
        self.assertEqual(before, after)
        self.assertEqual(query(path, "PRAGMA application_id"), [(APPLICATION_ID,)])
        self.assertEqual(query(path, "PRAGMA user_version"), [(SCHEMA_VERSION,)])

    def test_emptyDay(self):
        """
        A day with no counts has no keys and no clients.
        """
        ledger = SQLiteLedger(self.mktemp(), reactor=Clock())
        self.assertEqual(ledger.keyUsage(DAY), {})
        self.assertEqual(ledger.clientUsage(DAY), {})

    def assertLedgerError(self, path: str) -> str:
        """
        Opening C{path} raises L{LedgerError} whose text is one line naming
        C{path}.
        """
        error = self.assertRaises(LedgerError, SQLiteLedger, path, reactor=Clock())
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertIn(path, message)
        return message

    def test_notADatabase(self):
        """
        A file that is not a SQLite database is refused, and left as it was.
        """
        path = self.mktemp()
        content = b"user,token\nalice,sk-or-v1-0000\n" * 200
        with open(path, "wb") as f:
            f.write(content)
        self.assertLedgerError(path)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), content)

    def test_anotherProgramsDatabase(self):
        """
        Another program's SQLite database (a table of its own, application
        id 0) is refused, and left as it was: hermux adds no tables to it.
        """
        path = self.mktemp()
        connection = sqlite3.connect(path)
        connection.execute("CREATE TABLE notes (body TEXT)")
        connection.execute("INSERT INTO notes VALUES ('mine')")
        connection.commit()
        connection.close()
        self.assertLedgerError(path)
        self.assertEqual(query(path, "SELECT name FROM sqlite_master"), [("notes",)])
        self.assertEqual(query(path, "SELECT body FROM notes"), [("mine",)])
        self.assertEqual(query(path, "PRAGMA application_id"), [(0,)])

    def test_newerSchema(self):
        """
        A state file written by a newer hermux (a higher user_version) is
        refused rather than misread.
        """
        path = self.mktemp()
        SQLiteLedger(path, reactor=Clock())
        connection = sqlite3.connect(path)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        connection.close()
        message = self.assertLedgerError(path)
        self.assertIn(str(SCHEMA_VERSION + 1), message)

    def test_missingDirectory(self):
        """
        A path in a directory that does not exist is refused.
        """
        path = os.path.join(self.mktemp(), "state.sqlite")
        self.assertLedgerError(path)
        self.assertFalse(os.path.exists(os.path.dirname(path)))

    def test_directory(self):
        """
        A path that names a directory is refused.
        """
        path = self.mktemp()
        os.mkdir(path)
        self.assertLedgerError(path)


class RecordTests(SynchronousTestCase):
    """
    Counts are visible as soon as they are recorded, before any write.
    """

    def setUp(self):
        self.path = self.mktemp()
        self.ledger = SQLiteLedger(self.path, reactor=Clock())

    def test_recordVisibleAtOnce(self):
        """
        What L{SQLiteLedger.record} adds shows in
        L{SQLiteLedger.keyUsage} at once, though nothing is written yet.
        """
        self.ledger.record(DAY, "key0", requests=1)
        self.ledger.record(DAY, "key0", requests=2, rateLimited=1)
        self.ledger.record(DAY, "key1", errors=4)
        self.assertEqual(
            self.ledger.keyUsage(DAY), {"key0": KeyUsage(3, 1, 0), "key1": KeyUsage(0, 0, 4)}
        )
        self.assertEqual(storedKeys(self.path), set())

    def test_recordClientVisibleAtOnce(self):
        """
        What L{SQLiteLedger.recordClient} counts shows in
        L{SQLiteLedger.clientUsage} at once, though nothing is written yet.
        """
        for client in ["alice", "bob", "alice"]:
            self.ledger.recordClient(DAY, client)
        self.assertEqual(self.ledger.clientUsage(DAY), {"alice": 2, "bob": 1})
        self.assertEqual(storedClients(self.path), set())

    def test_daysAreSeparate(self):
        """
        Counts for one day do not show on another.
        """
        self.ledger.record(DAY, "key0", requests=1)
        self.ledger.record(DAY + 1, "key0", requests=7)
        self.ledger.recordClient(DAY, "alice")
        self.ledger.recordClient(DAY + 1, "bob")
        self.assertEqual(self.ledger.keyUsage(DAY), {"key0": KeyUsage(1, 0, 0)})
        self.assertEqual(self.ledger.keyUsage(DAY + 1), {"key0": KeyUsage(7, 0, 0)})
        self.assertEqual(self.ledger.keyUsage(DAY - 1), {})
        self.assertEqual(self.ledger.clientUsage(DAY), {"alice": 1})
        self.assertEqual(self.ledger.clientUsage(DAY + 1), {"bob": 1})
        self.assertEqual(self.ledger.clientUsage(DAY - 1), {})


class WriterTests(TestCase):
    """
    Tests for the running L{SQLiteLedger}: batched writes in a thread of
    its own.  Time is a L{ThreadedClock}; the writes are real.
    """

    def startLedger(self, path: str | None = None, **kwargs) -> SQLiteLedger:
        """
        Start a ledger on C{path} (a new file by default), stopped when the
        test ends if the test has not stopped it.
        """
        if path is None:
            path = self.mktemp()
        self.clock = ThreadedClock()
        self.clock.advance(NOW)
        kwargs.setdefault("interval", 3600.0)
        ledger = SQLiteLedger(path, reactor=self.clock, **kwargs)
        ledger.startService()
        self.addCleanup(lambda: ledger.stopService() if ledger.running else None)
        return ledger

    async def test_flushWritesSums(self):
        """
        Many records make one batch: after one flush the file holds one row
        per day and key (and per day and client) with the sums.
        """
        ledger = self.startLedger()
        for i in range(1000):
            ledger.record(DAY, f"key{i % 3}", requests=1)
            if i % 10 == 0:
                ledger.record(DAY, f"key{i % 3}", rateLimited=1)
            if i % 100 == 0:
                ledger.record(DAY, f"key{i % 3}", errors=1)
            ledger.recordClient(DAY, "alice" if i % 4 else "bob")
        ledger.record(DAY + 1, "key0", requests=5)
        ledger.recordClient(DAY + 1, "alice")
        await ledger.flush()
        self.assertEqual(
            storedKeys(ledger.path),
            {
                (DAY_TEXT, "key0", 334, 34, 4),
                (DAY_TEXT, "key1", 333, 33, 3),
                (DAY_TEXT, "key2", 333, 33, 3),
                (NEXT_DAY_TEXT, "key0", 5, 0, 0),
            },
        )
        self.assertEqual(
            storedClients(ledger.path),
            {(DAY_TEXT, "alice", 750), (DAY_TEXT, "bob", 250), (NEXT_DAY_TEXT, "alice", 1)},
        )

    async def test_flushesAddUp(self):
        """
        A second flush adds to the rows the first wrote.
        """
        ledger = self.startLedger()
        ledger.record(DAY, "key0", requests=2, errors=1)
        ledger.recordClient(DAY, "alice")
        await ledger.flush()
        ledger.record(DAY, "key0", requests=3, rateLimited=1)
        ledger.recordClient(DAY, "alice")
        await ledger.flush()
        self.assertEqual(storedKeys(ledger.path), {(DAY_TEXT, "key0", 5, 1, 1)})
        self.assertEqual(storedClients(ledger.path), {(DAY_TEXT, "alice", 2)})

    async def test_usageMergesWrittenAndUnwritten(self):
        """
        L{SQLiteLedger.keyUsage} and L{SQLiteLedger.clientUsage} add what
        is written to what is not yet written.
        """
        ledger = self.startLedger()
        ledger.record(DAY, "key0", requests=2)
        ledger.recordClient(DAY, "alice")
        await ledger.flush()
        ledger.record(DAY, "key0", requests=3, errors=1)
        ledger.record(DAY, "key1", rateLimited=1)
        ledger.recordClient(DAY, "alice")
        ledger.recordClient(DAY, "bob")
        self.assertEqual(storedKeys(ledger.path), {(DAY_TEXT, "key0", 2, 0, 0)})
        self.assertEqual(
            ledger.keyUsage(DAY), {"key0": KeyUsage(5, 0, 1), "key1": KeyUsage(0, 1, 0)}
        )
        self.assertEqual(ledger.clientUsage(DAY), {"alice": 2, "bob": 1})
        self.assertEqual(ledger.keyUsage(DAY + 1), {})

    async def test_usageExactWhileWriting(self):
        """
        While a batch is being written, the counts read are neither missing
        it nor counting it twice: here the write has committed in its
        thread but the reactor has not yet heard of it (the test holds the
        reactor thread until the rows are in the file).
        """
        ledger = self.startLedger()
        ledger.record(DAY, "key0", requests=5)
        ledger.recordClient(DAY, "alice")
        writing = ledger.flush()
        deadline = time.monotonic() + 5
        while not storedClients(ledger.path) and time.monotonic() < deadline:
            time.sleep(0.005)
        self.assertEqual(storedKeys(ledger.path), {(DAY_TEXT, "key0", 5, 0, 0)})
        try:
            self.assertEqual(ledger.keyUsage(DAY), {"key0": KeyUsage(5, 0, 0)})
            self.assertEqual(ledger.clientUsage(DAY), {"alice": 1})
        finally:
            await writing

    async def test_flushWaitsForWriteInProgress(self):
        """
        L{ILedger.flush} fires when what has been recorded is written, even
        when it is called while an earlier write is still in progress.
        """
        ledger = self.startLedger()
        ledger.record(DAY, "key0", requests=1)
        first = ledger.flush()
        ledger.record(DAY, "key0", requests=2)
        second = ledger.flush()
        try:
            await second
            self.assertEqual(storedKeys(ledger.path), {(DAY_TEXT, "key0", 3, 0, 0)})
        finally:
            await first

    async def test_flushesEveryInterval(self):
        """
        While running, the ledger writes every C{interval} seconds (one by
        default) without being asked.
        """
        ledger = self.startLedger(interval=1.0)
        ledger.record(DAY, "key0", requests=1)
        self.clock.advance(0.5)
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(storedKeys(ledger.path), set())
        self.clock.advance(0.5)
        self.assertTrue(await waitUntil(lambda: storedKeys(ledger.path)))
        self.assertEqual(storedKeys(ledger.path), {(DAY_TEXT, "key0", 1, 0, 0)})
        ledger.record(DAY, "key0", requests=1)
        ledger.recordClient(DAY, "alice")

        def later():
            # The loop waits for the first write's result (which the real
            # reactor delivers) before it counts the next interval, so let
            # time pass for as long as that takes.
            self.clock.advance(1.0)
            return storedClients(ledger.path)

        self.assertTrue(await waitUntil(later))
        self.assertEqual(storedKeys(ledger.path), {(DAY_TEXT, "key0", 2, 0, 0)})

    async def test_defaultIntervalAtMostOneSecond(self):
        """
        Without an C{interval}, counts are written within a second.
        """
        self.clock = ThreadedClock()
        ledger = SQLiteLedger(self.mktemp(), reactor=self.clock)
        ledger.startService()
        self.addCleanup(ledger.stopService)
        ledger.record(DAY, "key0", requests=1)
        self.clock.advance(1.0)
        self.assertTrue(await waitUntil(lambda: storedKeys(ledger.path)))

    async def test_stopWritesPending(self):
        """
        Stopping writes what is still pending, then closes the file: the
        write-ahead log is checkpointed and removed once the last
        connection closes.
        """
        ledger = self.startLedger()
        ledger.record(DAY, "key0", requests=4, rateLimited=2)
        ledger.recordClient(DAY, "alice")
        await ledger.stopService()
        self.assertFalse(ledger.running)
        self.assertEqual(storedKeys(ledger.path), {(DAY_TEXT, "key0", 4, 2, 0)})
        self.assertEqual(storedClients(ledger.path), {(DAY_TEXT, "alice", 1)})
        self.assertFalse(os.path.exists(ledger.path + "-wal"))

    async def test_stopWaitsForWriteInProgress(self):
        """
        Stopping while a write is in progress waits for it, then writes
        what arrived meanwhile.
        """
        ledger = self.startLedger()
        ledger.record(DAY, "key0", requests=1)
        ledger.flush()
        ledger.record(DAY, "key0", requests=2)
        ledger.recordClient(DAY, "alice")
        await ledger.stopService()
        self.assertEqual(storedKeys(ledger.path), {(DAY_TEXT, "key0", 3, 0, 0)})
        self.assertEqual(storedClients(ledger.path), {(DAY_TEXT, "alice", 1)})

    async def test_restartContinues(self):
        """
        A ledger opened on the file a stopped one wrote has its counts, so
        a key pool started on it carries on with least-used where the last
        run left off.
        """
        ledger = self.startLedger()
        path = ledger.path
        for _ in range(3):
            ledger.record(DAY, "key0", requests=1)
        ledger.record(DAY, "key1", requests=1, errors=1)
        ledger.recordClient(DAY, "alice")
        await ledger.stopService()

        again = SQLiteLedger(path, reactor=self.clock)
        self.assertEqual(
            again.keyUsage(DAY), {"key0": KeyUsage(3, 0, 0), "key1": KeyUsage(1, 0, 1)}
        )
        self.assertEqual(again.clientUsage(DAY), {"alice": 1})

        keys = (Key(name="key0", token="sk-test-0"), Key(name="key1", token="sk-test-1"))
        pool = KeyPool(keys, ledger=again, reactor=self.clock)
        self.assertEqual(pool.requestCounts(), {"key0": 3, "key1": 1})
        self.assertEqual(pool.acquire().name, "key1")
        self.assertEqual(pool.acquire().name, "key1")

    async def test_abandonedLosesOnlyUnwritten(self):
        """
        A ledger that disappears without stopping (as with C{kill -9})
        loses only what it had not written: a new ledger on the file has
        every written count and none of the others, and the file is intact.

        The abandoned ledger's LoopingCall and thread pool are stopped
        directly, not through C{stopService} (which would write the rest),
        so that the test leaves the reactor and threads clean; its writer
        connection is left open, as a killed process leaves it, until the
        test ends.
        """
        path = self.mktemp()
        clock = ThreadedClock()
        ledger = SQLiteLedger(path, reactor=clock)
        ledger.startService()
        self.addCleanup(lambda: ledger._connection.close())
        ledger.record(DAY, "key0", requests=5, rateLimited=1)
        ledger.recordClient(DAY, "alice")
        await ledger.flush()
        ledger.record(DAY, "key0", requests=100)
        ledger.recordClient(DAY, "bob")
        ledger._writer._loop.stop()
        ledger._writer._threads.stop()

        fresh = SQLiteLedger(path, reactor=Clock())
        self.assertEqual(fresh.keyUsage(DAY), {"key0": KeyUsage(5, 1, 0)})
        self.assertEqual(fresh.clientUsage(DAY), {"alice": 1})
        self.assertEqual(query(path, "PRAGMA integrity_check"), [("ok",)])

    async def test_killedProcessLeavesConsistentFile(self):
        """
        A process killed with SIGKILL while it writes batch after batch
        leaves a file that opens, passes C{integrity_check} and holds whole
        batches only: every row of a batch moved together, and the number of
        batches is the number the process reported committed (or one more,
        if it was killed between a commit and its report).
        """
        path = os.path.abspath(self.mktemp())
        SQLiteLedger(path, reactor=Clock())
        protocol = _WriterProcess(killAfter=200)
        reactor.spawnProcess(
            protocol,
            sys.executable,
            [sys.executable, "-c", _WRITER_PROCESS, path, str(DAY), str(_KEYS_PER_BATCH)],
            env=os.environ.copy(),
        )
        reason = await protocol.ended
        self.assertIsInstance(reason, ProcessTerminated, protocol.errors)
        self.assertEqual(reason.signal, signal.SIGKILL, protocol.errors)
        self.assertGreaterEqual(protocol.reported, 200)

        ledger = SQLiteLedger(path, reactor=Clock())
        self.assertEqual(query(path, "PRAGMA integrity_check"), [("ok",)])
        usage = ledger.keyUsage(DAY)
        self.assertEqual(set(usage), {f"key{i}" for i in range(_KEYS_PER_BATCH)})
        batches = usage["key0"].errors
        self.assertIn(batches, (protocol.reported, protocol.reported + 1))
        for counts in usage.values():
            self.assertEqual(counts, KeyUsage(7 * batches, 3 * batches, batches))
        self.assertEqual(ledger.clientUsage(DAY), {"alice": 2 * batches})

    def breakWrites(self, ledger: SQLiteLedger, pragma: str):
        """
        Make the ledger's own writer connection fail its writes with a real
        SQLite error by setting C{pragma} on it.  File permissions would not
        do: the tests may run as root, which ignores them.
        """
        ledger._connection.execute(f"PRAGMA {pragma}")

    def errorsLogged(self, events) -> list[str]:
        return [
            formatEvent(event)
            for event in events
            if event.get("log_level") == LogLevel.error
            and event.get("log_namespace", "").startswith("hermux.ledger")
        ]

    async def test_readOnlyKeepsCounting(self):
        """
        While the state file cannot be written (here the writer connection
        is made read-only with C{PRAGMA query_only}, which fails writes with
        SQLite's own "attempt to write a readonly database"), counts stay
        in memory and keep showing, C{problem} says what is wrong, and the
        error is logged once per C{problemLogInterval}.  When writes work
        again, the next flush writes everything, clears C{problem} and logs
        the recovery.
        """
        ledger = self.startLedger()
        self.assertIsNone(ledger.problem)
        self.breakWrites(ledger, "query_only = ON")
        with capturedLogs() as events:
            ledger.record(DAY, "key0", requests=2)
            ledger.recordClient(DAY, "alice")
            await ledger.flush()
            self.assertIn("readonly", ledger.problem)
            self.assertEqual(storedKeys(ledger.path), set())
            self.assertEqual(ledger.keyUsage(DAY), {"key0": KeyUsage(2, 0, 0)})
            self.assertEqual(ledger.clientUsage(DAY), {"alice": 1})
            logged = self.errorsLogged(events)
            self.assertEqual(len(logged), 1, logged)
            self.assertIn("readonly", logged[0])

            self.clock.advance(ledger.problemLogInterval / 2)
            ledger.record(DAY, "key0", errors=1)
            await ledger.flush()
            self.assertIsNotNone(ledger.problem)
            self.assertEqual(len(self.errorsLogged(events)), 1)
            self.assertEqual(ledger.keyUsage(DAY), {"key0": KeyUsage(2, 0, 1)})

            self.clock.advance(ledger.problemLogInterval / 2)
            ledger.record(DAY, "key0", requests=1)
            await ledger.flush()
            self.assertEqual(len(self.errorsLogged(events)), 2)

            self.breakWrites(ledger, "query_only = OFF")
            await ledger.flush()
            self.assertIsNone(ledger.problem)
            recovered = [
                formatEvent(e)
                for e in events
                if e.get("log_level") == LogLevel.info
                and e.get("log_namespace", "").startswith("hermux.ledger")
            ]
            self.assertEqual(len(recovered), 1, recovered)
            self.assertIn(ledger.path, recovered[0])
        self.assertEqual(storedKeys(ledger.path), {(DAY_TEXT, "key0", 3, 0, 1)})
        self.assertEqual(storedClients(ledger.path), {(DAY_TEXT, "alice", 1)})
        self.assertEqual(ledger.keyUsage(DAY), {"key0": KeyUsage(3, 0, 1)})

    async def test_diskFullKeepsCounting(self):
        """
        A full disk (here the writer connection may not grow the file, with
        C{PRAGMA max_page_count}, which fails writes with SQLite's own
        "database or disk is full") loses nothing: the counts stay, and are
        written once there is room again.
        """
        ledger = self.startLedger()
        ledger.record(DAY, "key0", requests=1)
        await ledger.flush()
        (pages,) = ledger._connection.execute("PRAGMA page_count").fetchone()
        self.breakWrites(ledger, f"max_page_count = {pages}")
        longName = "key-" + "x" * 20000  # needs pages the file may not get
        with capturedLogs() as events:
            ledger.record(DAY, longName, requests=1)
            ledger.record(DAY, "key0", requests=1)
            await ledger.flush()
            self.assertIn("full", ledger.problem)
            self.assertEqual(len(self.errorsLogged(events)), 1)
        self.assertEqual(storedKeys(ledger.path), {(DAY_TEXT, "key0", 1, 0, 0)})
        self.assertEqual(
            ledger.keyUsage(DAY), {"key0": KeyUsage(2, 0, 0), longName: KeyUsage(1, 0, 0)}
        )
        self.breakWrites(ledger, "max_page_count = 1073741823")
        await ledger.flush()
        self.assertIsNone(ledger.problem)
        self.assertEqual(
            storedKeys(ledger.path),
            {(DAY_TEXT, "key0", 2, 0, 0), (DAY_TEXT, longName, 1, 0, 0)},
        )

    async def test_failedCommitCountedOnceAndRetried(self):
        """
        A write whose inserts worked but whose COMMIT failed (here SQLite's
        authorizer denies the COMMIT) leaves the counts counted exactly once:
        while the writer's thread is done with it and the reactor has not yet
        heard of it, they are not in the file, so they show from memory; the
        next write puts them in the file, once.
        """
        ledger = self.startLedger()
        ledger.record(DAY, "key0", requests=5)
        ledger.recordClient(DAY, "alice")
        commitDenied = threading.Event()

        def denyCommit(action, argument, *rest):
            if action == sqlite3.SQLITE_TRANSACTION and argument == "COMMIT":
                commitDenied.set()
                return sqlite3.SQLITE_DENY
            return sqlite3.SQLITE_OK

        ledger._connection.set_authorizer(denyCommit)
        with capturedLogs() as events:
            writing = ledger.flush()
            # The reactor thread is held here, so the failure's result
            # cannot reach it: the reads below take the writer's lock, which
            # the writer's thread holds until it is done with the batch.
            self.assertTrue(commitDenied.wait(5))
            try:
                self.assertEqual(ledger.keyUsage(DAY), {"key0": KeyUsage(5, 0, 0)})
                self.assertEqual(ledger.clientUsage(DAY), {"alice": 1})
                self.assertEqual(storedKeys(ledger.path), set())
            finally:
                await writing
            self.assertIn("not authorized", ledger.problem)
            self.assertEqual(len(self.errorsLogged(events)), 1)
        self.assertEqual(ledger.keyUsage(DAY), {"key0": KeyUsage(5, 0, 0)})

        ledger._connection.set_authorizer(None)
        await ledger.flush()
        self.assertIsNone(ledger.problem)
        self.assertEqual(storedKeys(ledger.path), {(DAY_TEXT, "key0", 5, 0, 0)})
        self.assertEqual(storedClients(ledger.path), {(DAY_TEXT, "alice", 1)})
        self.assertEqual(ledger.keyUsage(DAY), {"key0": KeyUsage(5, 0, 0)})
        self.assertEqual(ledger.clientUsage(DAY), {"alice": 1})

    async def test_stopWhileWritesFailKeepsNothingHalfWritten(self):
        """
        Stopping while writes fail gives up after a few tries without
        raising, and leaves the file intact and openable.
        """
        ledger = self.startLedger()
        self.breakWrites(ledger, "query_only = ON")
        ledger.record(DAY, "key0", requests=1)
        with capturedLogs():
            await ledger.stopService()
        self.assertFalse(ledger.running)
        self.assertEqual(query(ledger.path, "PRAGMA integrity_check"), [("ok",)])
        self.assertEqual(SQLiteLedger(ledger.path, reactor=Clock()).keyUsage(DAY), {})


_KEYS_PER_BATCH = 20

# The child process for test_killedProcessLeavesConsistentFile: a ledger
# service under a real reactor, writing batch after batch as fast as it can,
# reporting each batch on its standard output once the write has committed.
# Only one flush runs at a time, so each write holds exactly one batch.
_WRITER_PROCESS = """
import sys
from twisted.internet.task import react
from hermux.ledger import SQLiteLedger

path, day, keys = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

async def main(reactor):
    ledger = SQLiteLedger(path, reactor=reactor, interval=3600.0)
    ledger.startService()
    committed = 0
    while True:
        for i in range(keys):
            ledger.record(day, f"key{i}", requests=7, rateLimited=3, errors=1)
        ledger.recordClient(day, "alice")
        ledger.recordClient(day, "alice")
        await ledger.flush()
        if ledger.problem is not None:
            raise SystemExit(ledger.problem)
        committed += 1
        sys.stdout.write(f"{committed}\\n")
        sys.stdout.flush()

react(main)
"""


class _WriterProcess(ProcessProtocol):
    """
    Follows the writer process's reports and kills it (SIGKILL) once it
    has committed C{killAfter} batches.

    @ivar reported: the last batch count the process reported.
    @ivar ended: fires with the exception saying why the process ended
        (never errs back, even for a process ended by a signal).
    """

    def __init__(self, killAfter: int):
        self.killAfter = killAfter
        self.reported = 0
        self.errors = b""
        self.ended: Deferred = Deferred()
        self._buffer = b""
        self._killed = False

    def outReceived(self, data: bytes):
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if lines:
            self.reported = int(lines[-1])
        if self.reported >= self.killAfter and not self._killed:
            self._killed = True
            self.transport.signalProcess("KILL")

    def errReceived(self, data: bytes):
        self.errors += data

    def processEnded(self, reason):
        self.ended.callback(reason.value)
