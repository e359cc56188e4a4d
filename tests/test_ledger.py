"""
Tests for L{hermux.ledger}: the usage ledger and its SQLite state file.
"""

from __future__ import annotations

import os
import shutil
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

import hermux.ledger
from hermux.config import Key
from hermux.keypool import KeyPool, dayOf
from hermux.ledger import (
    APPLICATION_ID,
    COUNTERS,
    MODEL_LENGTH,
    MODELS_PER_DAY,
    OTHER_MODEL,
    SCHEMA_VERSION,
    UNKNOWN,
    Counts,
    ILedger,
    KeyUsage,
    LedgerError,
    MemoryLedger,
    SQLiteLedger,
    TooManyRows,
    UsageRow,
    dayNumber,
    dayText,
    openReadOnly,
    readUsage,
)

NOW = 1_800_000_000.0 + 1234.5  # 2027-01-15T08:20:34Z
DAY = dayOf(NOW)
DAY_TEXT = "2027-01-15"
NEXT_DAY_TEXT = "2027-01-16"
SCHEMA1 = os.path.join(os.path.dirname(__file__), "data", "state-schema1.sqlite")


def requests(n: int = 1, **counts) -> Counts:
    """
    The counts of C{n} requests, and whatever else C{counts} names.
    """
    return Counts(requests=n, **counts)


class ThreadedClock(Clock):
    """
    A L{Clock} that also takes calls from other threads.

    L{SQLiteLedger} writes in a thread pool of its own and gets the result
    back with C{deferToThreadPool(reactor, ...)}, which calls
    C{reactor.callFromThread}; a plain L{Clock} has no such method.  This
    one hands those calls to the real reactor, so that the write really
    happens in a thread while time (the flush interval and
    C{problemLogInterval}) stays under the test's control.  Its thread pool
    (where L{SQLiteLedger.usage} reads) is the real reactor's.
    """

    def callFromThread(self, f, *args, **kwargs):
        reactor.callFromThread(f, *args, **kwargs)

    def getThreadPool(self):
        return reactor.getThreadPool()


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
    The key_usage table's rows: day, key, requests, rate limited, errors.
    """
    return set(query(path, "SELECT day, key, requests, rate_limited, errors FROM key_usage"))


def storedClients(path: str) -> set[tuple]:
    """
    The client_usage table's rows: day, client, requests.
    """
    return set(query(path, "SELECT day, client, requests FROM client_usage"))


def storedDetail(path: str) -> set[tuple]:
    """
    The usage table's rows, every column.
    """
    return set(query(path, "SELECT * FROM usage"))


def schema(path: str) -> list[tuple]:
    return query(path, "SELECT type, name, sql FROM sqlite_master ORDER BY name")


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


class CountsTests(SynchronousTestCase):
    """
    Tests for L{Counts}.
    """

    def test_add(self):
        """
        Counts add up counter by counter.
        """
        a = Counts(1, 2, 3, 4, 5, 6, 7, 8, 9)
        b = Counts(10, 20, 30, 40, 50, 60, 70, 80, 90)
        self.assertEqual(a + b, Counts(11, 22, 33, 44, 55, 66, 77, 88, 99))
        self.assertEqual(a + Counts(), a)

    def test_row(self):
        """
        L{Counts.asRow} gives the counters in L{COUNTERS}' order, and
        L{Counts.fromRow} takes them back.
        """
        counts = Counts(
            requests=1,
            freeRequests=2,
            rateLimited=3,
            errors=4,
            promptTokens=5,
            completionTokens=6,
            reasoningTokens=7,
            cachedTokens=8,
            cost=9,
        )
        self.assertEqual(counts.asRow(), (1, 2, 3, 4, 5, 6, 7, 8, 9))
        self.assertEqual(len(COUNTERS), 9)
        self.assertEqual(COUNTERS[-1], "cost")
        self.assertEqual(Counts.fromRow(counts.asRow()), counts)

    def test_keyUsageIsCounts(self):
        """
        L{KeyUsage} is the old name of L{Counts}.
        """
        self.assertIs(KeyUsage, Counts)


class LedgerTestsMixin:
    """
    What every L{ILedger} does with the counts it is given; C{makeLedger}
    makes the ledger tested.
    """

    def test_providesILedger(self):
        """
        The ledger provides L{ILedger}.
        """
        self.assertTrue(verifyObject(ILedger, self.makeLedger()))

    def test_countsPerDay(self):
        """
        Key and client counts add up per day, and days are kept apart.
        """
        ledger = self.makeLedger()
        ledger.add(DAY, "key0", "alice", "m", requests(2))
        ledger.add(DAY, "key0", "bob", "m", Counts(rateLimited=1, errors=1))
        ledger.add(DAY + 1, "key0", "bob", "m", requests(5))
        self.assertEqual(ledger.keyUsage(DAY), {"key0": requests(2, rateLimited=1, errors=1)})
        self.assertEqual(ledger.keyUsage(DAY + 1), {"key0": requests(5)})
        self.assertEqual(
            ledger.clientUsage(DAY),
            {"alice": requests(2), "bob": Counts(rateLimited=1, errors=1)},
        )
        self.assertEqual(ledger.clientUsage(DAY + 1), {"bob": requests(5)})
        self.assertEqual(ledger.keyUsage(DAY - 1), {})
        self.assertEqual(ledger.clientUsage(DAY - 1), {})

    def test_everyCounter(self):
        """
        Every counter is kept, tokens and cost too.
        """
        ledger = self.makeLedger()
        counts = Counts(1, 1, 0, 0, 1234, 567, 89, 1000, 12_300_000)
        ledger.add(DAY, "key0", "alice", "openai/gpt-4o", counts)
        ledger.add(DAY, "key0", "alice", "openai/gpt-4o", counts)
        self.assertEqual(ledger.keyUsage(DAY), {"key0": counts + counts})
        self.assertEqual(ledger.clientUsage(DAY), {"alice": counts + counts})

    async def usage(self, ledger, fromDay, toDay, groupBy, client=None) -> list[UsageRow]:
        if client is None:
            return await ledger.usage(fromDay, toDay, groupBy)
        return await ledger.usage(fromDay, toDay, groupBy, client)

    def fill(self, ledger):
        ledger.add(DAY, "key0", "alice", "m1", requests(1, cost=10))
        ledger.add(DAY, "key0", "bob", "m2", requests(2, cost=20))
        ledger.add(DAY, "key1", "alice", "m2", requests(4, cost=40))
        ledger.add(DAY + 1, "key1", "bob", "m1", requests(8, cost=80))
        ledger.add(DAY + 2, "key1", "bob", "m1", requests(16, cost=160))

    async def test_usageGroupings(self):
        """
        L{ILedger.usage} sums the days asked for per group of the columns
        asked for, in their order, sorted; days are ISO text.
        """
        ledger = self.makeLedger()
        self.fill(ledger)
        self.assertEqual(
            await self.usage(ledger, DAY, DAY + 1, ("day", "key")),
            [
                UsageRow((DAY_TEXT, "key0"), requests(3, cost=30)),
                UsageRow((DAY_TEXT, "key1"), requests(4, cost=40)),
                UsageRow((NEXT_DAY_TEXT, "key1"), requests(8, cost=80)),
            ],
        )
        self.assertEqual(
            await self.usage(ledger, DAY, DAY + 2, ("client",)),
            [UsageRow(("alice",), requests(5, cost=50)), UsageRow(("bob",), requests(26, cost=260))],
        )
        self.assertEqual(
            await self.usage(ledger, DAY, DAY, ("model", "day")),
            [UsageRow(("m1", DAY_TEXT), requests(1, cost=10)), UsageRow(("m2", DAY_TEXT), requests(6, cost=60))],
        )
        self.assertEqual(
            await self.usage(ledger, DAY, DAY + 2, ("key", "client", "model")),
            [
                UsageRow(("key0", "alice", "m1"), requests(1, cost=10)),
                UsageRow(("key0", "bob", "m2"), requests(2, cost=20)),
                UsageRow(("key1", "alice", "m2"), requests(4, cost=40)),
                UsageRow(("key1", "bob", "m1"), requests(24, cost=240)),
            ],
        )
        self.assertEqual(
            await self.usage(ledger, DAY + 1, DAY + 2, ()), [UsageRow((), requests(24, cost=240))]
        )
        self.assertEqual(await self.usage(ledger, DAY + 3, DAY + 9, ("day", "key")), [])
        self.assertEqual(await self.usage(ledger, DAY + 3, DAY + 9, ()), [])

    async def test_usageOfOneClient(self):
        """
        With a client, L{ILedger.usage} sums that client's counts only,
        however they are grouped; a client with no counts has no rows.
        """
        ledger = self.makeLedger()
        self.fill(ledger)
        self.assertEqual(
            await self.usage(ledger, DAY, DAY + 2, ("day", "key"), "alice"),
            [
                UsageRow((DAY_TEXT, "key0"), requests(1, cost=10)),
                UsageRow((DAY_TEXT, "key1"), requests(4, cost=40)),
            ],
        )
        for groupBy, group in [
            ((), ()),
            (("day",), (DAY_TEXT,)),
            (("client",), ("alice",)),
            (("client", "day"), ("alice", DAY_TEXT)),
        ]:
            self.assertEqual(
                await self.usage(ledger, DAY, DAY + 2, groupBy, "alice"),
                [UsageRow(group, requests(5, cost=50))],
            )
        self.assertEqual(
            await self.usage(ledger, DAY, DAY + 2, ("model",), "alice"),
            [UsageRow(("m1",), requests(1, cost=10)), UsageRow(("m2",), requests(4, cost=40))],
        )
        self.assertEqual(
            await self.usage(ledger, DAY, DAY + 2, ("day", "key", "client", "model"), "bob"),
            [
                UsageRow((DAY_TEXT, "key0", "bob", "m2"), requests(2, cost=20)),
                UsageRow((NEXT_DAY_TEXT, "key1", "bob", "m1"), requests(8, cost=80)),
                UsageRow((dayText(DAY + 2), "key1", "bob", "m1"), requests(16, cost=160)),
            ],
        )
        self.assertEqual(
            await self.usage(ledger, DAY + 1, DAY + 1, ("day", "client"), "bob"),
            [UsageRow((NEXT_DAY_TEXT, "bob"), requests(8, cost=80))],
        )
        self.assertEqual(await self.usage(ledger, DAY + 1, DAY + 2, ("key",), "alice"), [])
        for client in ["carol", UNKNOWN, "Alice", "alice ", "x' OR 'a' = 'a", "%"]:
            for groupBy in [(), ("day",), ("key",), ("day", "key", "client", "model")]:
                self.assertEqual(await self.usage(ledger, DAY, DAY + 2, groupBy, client), [])

    async def test_usageOfOneClientNamedLikeSQL(self):
        """
        A client's label is a value, never SQL: quotes and wildcards in it
        match only themselves.
        """
        ledger = self.makeLedger()
        self.fill(ledger)
        name = "o'brien\" OR 1=1 --%"
        ledger.add(DAY, "key0", name, "m1", requests(32))
        for groupBy in [(), ("day", "client"), ("key", "model")]:
            rows = await self.usage(ledger, DAY, DAY + 2, groupBy, name)
            self.assertEqual([row.counts for row in rows], [requests(32)])

    async def test_usageOfOneClientBounded(self):
        """
        L{ROW_LIMIT} bounds the groups of the client's counts, not of
        everyone's.
        """
        self.patch(hermux.ledger, "ROW_LIMIT", 2)
        ledger = self.makeLedger()
        self.fill(ledger)
        with self.assertRaises(TooManyRows):
            await self.usage(ledger, DAY, DAY + 2, ("key", "model"))
        self.assertEqual(
            await self.usage(ledger, DAY, DAY + 2, ("key", "model"), "alice"),
            [UsageRow(("key0", "m1"), requests(1, cost=10)), UsageRow(("key1", "m2"), requests(4, cost=40))],
        )
        ledger.add(DAY + 1, "key0", "alice", "m2", requests(1))
        with self.assertRaises(TooManyRows):
            await self.usage(ledger, DAY, DAY + 2, ("key", "model"), "alice")

    def test_usageBadGrouping(self):
        """
        A column that is not one of day, key, client and model, or one
        named twice, is a L{ValueError}, with a client too.
        """
        ledger = self.makeLedger()
        self.assertRaises(ValueError, ledger.usage, DAY, DAY, ("day", "token"))
        self.assertRaises(ValueError, ledger.usage, DAY, DAY, ("key", "key"))
        self.assertRaises(ValueError, ledger.usage, DAY, DAY, ("token",), "alice")

    async def test_longModelCut(self):
        """
        A model name longer than L{MODEL_LENGTH} characters is cut there; an
        empty one is L{UNKNOWN}.
        """
        ledger = self.makeLedger()
        ledger.add(DAY, "key0", "alice", "x" * 1000, requests(1))
        ledger.add(DAY, "key0", "alice", "x" * (MODEL_LENGTH + 1), requests(1))
        ledger.add(DAY, "key0", "alice", "", requests(1))
        self.assertEqual(
            await self.usage(ledger, DAY, DAY, ("model",)),
            [UsageRow((UNKNOWN,), requests(1)), UsageRow(("x" * MODEL_LENGTH,), requests(2))],
        )

    async def test_modelsPerDayCapped(self):
        """
        Beyond L{MODELS_PER_DAY} distinct models on one day, a new one
        counts as L{OTHER_MODEL}; the models already seen stay apart, and
        the next day starts afresh.
        """
        ledger = self.makeLedger()
        for i in range(MODELS_PER_DAY + 20):
            ledger.add(DAY, "key0", "alice", f"model-{i}", requests(1))
        ledger.add(DAY, "key0", "alice", "model-0", requests(1))
        ledger.add(DAY, "key0", "alice", UNKNOWN, requests(1))
        ledger.add(DAY + 1, "key0", "alice", "fresh", requests(1))
        rows = {row.group[0]: row.counts for row in await self.usage(ledger, DAY, DAY, ("model",))}
        self.assertEqual(len(rows), MODELS_PER_DAY + 2)
        self.assertEqual(rows[OTHER_MODEL], requests(20))
        self.assertEqual(rows["model-0"], requests(2))
        self.assertEqual(rows[UNKNOWN], requests(1))
        self.assertNotIn(f"model-{MODELS_PER_DAY}", rows)
        self.assertEqual(
            await self.usage(ledger, DAY + 1, DAY + 1, ("model",)), [UsageRow(("fresh",), requests(1))]
        )


class MemoryLedgerTests(LedgerTestsMixin, TestCase):
    """
    Tests for L{MemoryLedger}.
    """

    def makeLedger(self):
        return MemoryLedger()

    def test_flushFiresAtOnce(self):
        """
        A memory ledger has nothing to write: its flush has already fired.
        """
        ledger = MemoryLedger()
        ledger.add(DAY, "key0", "alice", "m", requests(1))
        self.assertIsNone(self.successResultOf(ledger.flush()))


class SQLiteLedgerUnwrittenTests(LedgerTestsMixin, TestCase):
    """
    The same for L{SQLiteLedger}, with nothing written: every count is
    in memory, L{SQLiteLedger.usage} reads an empty file in a thread.
    """

    def makeLedger(self):
        return SQLiteLedger(self.mktemp(), reactor=ThreadedClock())



class SQLiteLedgerWrittenTests(LedgerTestsMixin, TestCase):
    """
    The same for L{SQLiteLedger}, with every count written before it is
    read: what L{SQLiteLedger.usage} answers comes from the file.
    """

    def makeLedger(self):
        clock = ThreadedClock()
        clock.advance(NOW)
        ledger = SQLiteLedger(self.mktemp(), reactor=clock, interval=3600)
        ledger.startService()
        self.addCleanup(ledger.stopService)
        return ledger

    async def usage(self, ledger, fromDay, toDay, groupBy, client=None):
        await ledger.flush()
        self.assertEqual(ledger._writer.pending.size, 0)
        return await ledger.usage(fromDay, toDay, groupBy, client)

    def test_providesILedger(self):
        """
        L{SQLiteLedger} provides L{ILedger}.
        """
        self.assertTrue(verifyObject(ILedger, self.makeLedger()))


class StateFileTests(SynchronousTestCase):
    """
    Opening the state file: a new one gets hermux's schema, one of schema 1
    is migrated, anything that is not a hermux state file of a version this
    hermux knows stops startup.
    """

    def test_newFileGetsSchema(self):
        """
        A state file that does not exist yet is created with hermux's four
        tables, its application id and the schema version.
        """
        path = self.mktemp()
        SQLiteLedger(path, reactor=Clock())
        self.assertTrue(os.path.exists(path))
        tables = {
            name for (name,) in query(path, "SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        self.assertEqual(tables, {"usage", "key_usage", "client_usage", "model_usage"})
        self.assertEqual(query(path, "PRAGMA application_id"), [(APPLICATION_ID,)])
        self.assertEqual(APPLICATION_ID, 0x686D7578)
        self.assertEqual(query(path, "PRAGMA user_version"), [(SCHEMA_VERSION,)])
        self.assertEqual(SCHEMA_VERSION, 2)
        columns = [row[1] for row in query(path, "PRAGMA table_info(usage)")]
        self.assertEqual(columns, ["day", "key", "client", "model", *COUNTERS])
        for name, type in [(row[1], row[2]) for row in query(path, "PRAGMA table_info(usage)")]:
            self.assertEqual(type, "TEXT" if name in ("day", "key", "client", "model") else "INTEGER")

    def test_reopen(self):
        """
        A state file hermux created opens again, unchanged.
        """
        path = self.mktemp()
        SQLiteLedger(path, reactor=Clock())
        before = schema(path)
        SQLiteLedger(path, reactor=Clock())
        self.assertEqual(schema(path), before)
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
        refused rather than misread, in one line that names its schema.
        """
        path = self.mktemp()
        SQLiteLedger(path, reactor=Clock())
        connection = sqlite3.connect(path)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        connection.close()
        message = self.assertLedgerError(path)
        self.assertIn(f"state schema {SCHEMA_VERSION + 1}", message)
        self.assertEqual(query(path, "PRAGMA user_version"), [(SCHEMA_VERSION + 1,)])

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

    def test_retentionDaysPositive(self):
        """
        C{retentionDays} is at least 1.
        """
        self.assertRaises(ValueError, SQLiteLedger, self.mktemp(), reactor=Clock(), retentionDays=0)


class MigrationTests(SynchronousTestCase):
    """
    A state file of schema 1, as the released hermux writes it
    (tests/data/state-schema1.sqlite), is migrated to schema 2 in place.
    """

    def copy(self) -> str:
        path = self.mktemp()
        shutil.copyfile(SCHEMA1, path)
        return path

    def test_fixtureIsSchema1(self):
        """
        The fixture is what it says.
        """
        self.assertEqual(query(SCHEMA1, "PRAGMA user_version"), [(1,)])
        self.assertEqual(query(SCHEMA1, "PRAGMA application_id"), [(APPLICATION_ID,)])

    def test_everyCountKept(self):
        """
        After the migration the file has schema 2 (the same as a new
        file's), and every count of schema 1: each key row in key_usage,
        with zero for the counters schema 1 did not have, and as a detail
        row of client and model L{UNKNOWN}; each client row in
        client_usage.
        """
        path = self.copy()
        before = {
            "keys": storedKeys(path),
            "clients": storedClients(path),
        }
        self.assertEqual(len(before["keys"]), 4)
        self.assertEqual(len(before["clients"]), 3)
        ledger = SQLiteLedger(path, reactor=Clock())
        self.assertEqual(query(path, "PRAGMA user_version"), [(2,)])
        self.assertEqual(query(path, "PRAGMA application_id"), [(APPLICATION_ID,)])
        self.assertEqual(query(path, "PRAGMA integrity_check"), [("ok",)])
        fresh = self.mktemp()
        SQLiteLedger(fresh, reactor=Clock())
        self.assertEqual(schema(path), schema(fresh))

        self.assertEqual(storedKeys(path), before["keys"])
        self.assertEqual(storedClients(path), before["clients"])
        zeros = (0,) * (len(COUNTERS) - 3)
        self.assertEqual(
            set(query(path, "SELECT * FROM key_usage")),
            {
                (day, key, requests, 0, rateLimited, errors, *zeros[1:])
                for day, key, requests, rateLimited, errors in before["keys"]
            },
        )
        self.assertEqual(
            storedDetail(path),
            {
                (day, key, UNKNOWN, UNKNOWN, requests, 0, rateLimited, errors, *zeros[1:])
                for day, key, requests, rateLimited, errors in before["keys"]
            },
        )
        self.assertEqual(
            set(query(path, "SELECT day, model, requests, rate_limited, errors FROM model_usage")),
            {("2026-11-30", UNKNOWN, 19, 1, 2), ("2026-12-01", UNKNOWN, 43, 5, 1)},
        )
        day = dayNumber("2026-11-30")
        self.assertEqual(
            ledger.keyUsage(day),
            {"alice": requests(12, rateLimited=1), "bob": requests(7, errors=2)},
        )
        self.assertEqual(ledger.clientUsage(day), {"team-a": requests(15), "laptop": requests(4)})
        self.assertEqual(ledger.keyUsage(day + 1)["carol"], requests(40, rateLimited=5, errors=1))

    def test_migratedOnce(self):
        """
        A migrated file opens again without change.
        """
        path = self.copy()
        SQLiteLedger(path, reactor=Clock())
        before = (schema(path), storedDetail(path), storedClients(path))
        SQLiteLedger(path, reactor=Clock())
        self.assertEqual((schema(path), storedDetail(path), storedClients(path)), before)

    def test_failureLeavesSchema1(self):
        """
        A migration that fails part of the way (here its last statement
        fails) changes nothing: the file is still of schema 1 with its
        tables and rows, and hermux refuses to start on it with one line.
        """
        path = self.copy()
        with open(path, "rb") as f:
            original = f.read()
        self.patch(
            hermux.ledger,
            "_MIGRATE_1_TO_2",
            [*hermux.ledger._MIGRATE_1_TO_2, "INSERT INTO no_such_table VALUES (1)"],
        )
        error = self.assertRaises(LedgerError, SQLiteLedger, path, reactor=Clock())
        self.assertNotIn("\n", str(error))
        self.assertIn(path, str(error))
        self.assertEqual(query(path, "PRAGMA user_version"), [(1,)])
        self.assertEqual(schema(path), schema(SCHEMA1))
        self.assertEqual(storedKeys(path), storedKeys(SCHEMA1))
        self.assertEqual(storedClients(path), storedClients(SCHEMA1))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), original)


class ReadOnlyTests(SynchronousTestCase):
    """
    L{openReadOnly} and L{readUsage}: what the C{hermux usage} command
    reads the state file with.
    """

    def test_readsWithoutWriting(self):
        """
        L{readUsage} reads what a ledger wrote; L{openReadOnly} changes
        nothing and the connection cannot write.
        """
        path = self.mktemp()
        ledger = SQLiteLedger(path, reactor=Clock())
        connection = sqlite3.connect(path)
        connection.execute(
            "INSERT INTO key_usage (day, key, requests, cost) VALUES (?, 'key0', 3, 7)", (DAY_TEXT,)
        )
        connection.commit()
        connection.close()
        del ledger
        with open(path, "rb") as f:
            before = f.read()
        reader = openReadOnly(path)
        self.addCleanup(reader.close)
        self.assertEqual(
            readUsage(reader, DAY, DAY, ("day", "key")),
            [UsageRow((DAY_TEXT, "key0"), requests(3, cost=7))],
        )
        self.assertRaises(sqlite3.OperationalError, reader.execute, "DELETE FROM key_usage")
        self.assertRaises(ValueError, readUsage, reader, DAY, DAY, ("colour",))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_readsOneClient(self):
        """
        L{readUsage} with a client reads that client's counts only: from
        the per-client sums grouped by at most day and client, else from
        the detail.
        """
        path = self.mktemp()
        SQLiteLedger(path, reactor=Clock())
        connection = sqlite3.connect(path)
        for client, n in [("alice", 3), ("bob", 30)]:
            connection.execute(
                "INSERT INTO usage (day, key, client, model, requests) VALUES (?, 'key0', ?, 'm', ?)",
                (DAY_TEXT, client, n),
            )
            connection.execute(
                "INSERT INTO client_usage (day, client, requests) VALUES (?, ?, ?)",
                (DAY_TEXT, client, n),
            )
        connection.execute(
            "INSERT INTO key_usage (day, key, requests) VALUES (?, 'key0', 33)", (DAY_TEXT,)
        )
        connection.commit()
        connection.close()
        reader = openReadOnly(path)
        self.addCleanup(reader.close)
        for groupBy, group in [
            (("day", "client"), (DAY_TEXT, "alice")),
            (("day",), (DAY_TEXT,)),
            (("key",), ("key0",)),
            (("model", "client"), ("m", "alice")),
        ]:
            self.assertEqual(
                readUsage(reader, DAY, DAY, groupBy, "alice"), [UsageRow(group, requests(3))]
            )
        self.assertEqual(readUsage(reader, DAY, DAY, ("key",)), [UsageRow(("key0",), requests(33))])
        self.assertEqual(readUsage(reader, DAY, DAY, ("key",), "carol"), [])
        self.assertEqual(readUsage(reader, DAY, DAY, (), "carol"), [])

    def test_clientTable(self):
        """
        With a client, usage is read from a table that has the client
        column: its sums when grouped by at most day and client, else the
        detail.
        """
        table = hermux.ledger._table
        self.assertEqual(table(("day", "key")), "key_usage")
        self.assertEqual(table(("model",)), "model_usage")
        self.assertEqual(table((), "alice"), "client_usage")
        self.assertEqual(table(("day",), "alice"), "client_usage")
        self.assertEqual(table(("client", "day"), "alice"), "client_usage")
        self.assertEqual(table(("key",), "alice"), "usage")
        self.assertEqual(table(("day", "model"), "alice"), "usage")

    def test_missingFile(self):
        """
        A missing file is a one-line L{LedgerError}, and is not created.
        """
        path = self.mktemp()
        error = self.assertRaises(LedgerError, openReadOnly, path)
        self.assertIn(path, str(error))
        self.assertIn("no such state file", str(error))
        self.assertFalse(os.path.exists(path))

    def test_schema1(self):
        """
        A file of schema 1 is not migrated by a reader: it says that hermux
        must start once on it.
        """
        path = self.mktemp()
        shutil.copyfile(SCHEMA1, path)
        error = self.assertRaises(LedgerError, openReadOnly, path)
        self.assertIn("state schema 1", str(error))
        self.assertIn("start hermux", str(error))
        self.assertEqual(query(path, "PRAGMA user_version"), [(1,)])

    def test_notHermux(self):
        """
        Another program's database, or an empty file, is refused.
        """
        path = self.mktemp()
        connection = sqlite3.connect(path)
        connection.execute("CREATE TABLE notes (body TEXT)")
        connection.close()
        self.assertIn("not a hermux state file", str(self.assertRaises(LedgerError, openReadOnly, path)))
        empty = self.mktemp()
        open(empty, "wb").close()
        self.assertIn("not a hermux state file", str(self.assertRaises(LedgerError, openReadOnly, empty)))
        self.assertEqual(os.path.getsize(empty), 0)


class AddTests(SynchronousTestCase):
    """
    Counts are visible as soon as they are added, before any write.
    """

    def setUp(self):
        self.path = self.mktemp()
        self.ledger = SQLiteLedger(self.path, reactor=Clock())

    def test_addVisibleAtOnce(self):
        """
        What L{SQLiteLedger.add} adds shows in L{SQLiteLedger.keyUsage}
        and L{SQLiteLedger.clientUsage} at once, though nothing is written
        yet.
        """
        self.ledger.add(DAY, "key0", "alice", "m", requests(1))
        self.ledger.add(DAY, "key0", "bob", "m", requests(2, rateLimited=1))
        self.ledger.add(DAY, "key1", "alice", UNKNOWN, Counts(errors=4))
        self.assertEqual(
            self.ledger.keyUsage(DAY),
            {"key0": requests(3, rateLimited=1), "key1": Counts(errors=4)},
        )
        self.assertEqual(
            self.ledger.clientUsage(DAY),
            {"alice": requests(1, errors=4), "bob": requests(2, rateLimited=1)},
        )
        self.assertEqual(storedKeys(self.path), set())
        self.assertEqual(storedClients(self.path), set())

    def test_daysAreSeparate(self):
        """
        Counts for one day do not show on another.
        """
        self.ledger.add(DAY, "key0", "alice", "m", requests(1))
        self.ledger.add(DAY + 1, "key0", "bob", "m", requests(7))
        self.assertEqual(self.ledger.keyUsage(DAY), {"key0": requests(1)})
        self.assertEqual(self.ledger.keyUsage(DAY + 1), {"key0": requests(7)})
        self.assertEqual(self.ledger.keyUsage(DAY - 1), {})
        self.assertEqual(self.ledger.clientUsage(DAY), {"alice": requests(1)})
        self.assertEqual(self.ledger.clientUsage(DAY + 1), {"bob": requests(7)})
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
        Many additions make one batch: after one flush the file holds one
        row per day, key, client and model, and one per day and key (and
        per day and client, and per day and model) with the sums.
        """
        ledger = self.startLedger()
        for i in range(1000):
            ledger.add(
                DAY,
                f"key{i % 3}",
                "alice" if i % 4 else "bob",
                "m",
                Counts(
                    requests=1,
                    rateLimited=1 if i % 10 == 0 else 0,
                    errors=1 if i % 100 == 0 else 0,
                    promptTokens=10,
                    cost=1_000_001,
                ),
            )
        ledger.add(DAY + 1, "key0", "alice", "m2", requests(5))
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
            {(DAY_TEXT, "alice", 750), (DAY_TEXT, "bob", 250), (NEXT_DAY_TEXT, "alice", 5)},
        )
        self.assertEqual(
            query(ledger.path, "SELECT day, model, requests, prompt_tokens, cost FROM model_usage"),
            [(DAY_TEXT, "m", 1000, 10_000, 1_000_001_000), (NEXT_DAY_TEXT, "m2", 5, 0, 0)],
        )
        self.assertEqual(len(storedDetail(ledger.path)), 7)
        self.assertEqual(
            query(ledger.path, "SELECT sum(requests), sum(cost) FROM usage"), [(1005, 1_000_001_000)]
        )
        self.assertEqual(
            query(ledger.path, "SELECT requests FROM usage WHERE key = 'key0' AND client = 'bob'"),
            [(84,)],
        )

    async def test_flushesAddUp(self):
        """
        A second flush adds to the rows the first wrote.
        """
        ledger = self.startLedger()
        ledger.add(DAY, "key0", "alice", "m", requests(2, errors=1, cost=5))
        await ledger.flush()
        ledger.add(DAY, "key0", "alice", "m", requests(3, rateLimited=1, cost=6))
        await ledger.flush()
        self.assertEqual(storedKeys(ledger.path), {(DAY_TEXT, "key0", 5, 1, 1)})
        self.assertEqual(storedClients(ledger.path), {(DAY_TEXT, "alice", 5)})
        self.assertEqual(
            storedDetail(ledger.path), {(DAY_TEXT, "key0", "alice", "m", 5, 0, 1, 1, 0, 0, 0, 0, 11)}
        )

    async def test_usageMergesWrittenAndUnwritten(self):
        """
        L{SQLiteLedger.keyUsage}, L{SQLiteLedger.clientUsage} and
        L{SQLiteLedger.usage} add what is written to what is not yet
        written.
        """
        ledger = self.startLedger()
        ledger.add(DAY, "key0", "alice", "m", requests(2))
        await ledger.flush()
        ledger.add(DAY, "key0", "alice", "m", requests(3, errors=1))
        ledger.add(DAY, "key1", "bob", "m", Counts(rateLimited=1))
        self.assertEqual(storedKeys(ledger.path), {(DAY_TEXT, "key0", 2, 0, 0)})
        self.assertEqual(
            ledger.keyUsage(DAY), {"key0": requests(5, errors=1), "key1": Counts(rateLimited=1)}
        )
        self.assertEqual(
            ledger.clientUsage(DAY), {"alice": requests(5, errors=1), "bob": Counts(rateLimited=1)}
        )
        self.assertEqual(ledger.keyUsage(DAY + 1), {})
        for groupBy in [("day", "key"), ("key", "client", "model")]:
            rows = await ledger.usage(DAY, DAY, groupBy)
            self.assertEqual(
                [row.counts for row in rows], [requests(5, errors=1), Counts(rateLimited=1)]
            )
        self.assertEqual(
            await ledger.usage(DAY - 5, DAY + 5, ("model",)),
            [UsageRow(("m",), requests(5, errors=1, rateLimited=1))],
        )
        self.assertEqual(await ledger.usage(DAY + 1, DAY + 5, ("model",)), [])

    async def test_usageExactWhileWriting(self):
        """
        While a batch is being written, the counts read are neither missing
        it nor counting it twice: here the write has committed in its
        thread but the reactor has not yet heard of it (the test holds the
        reactor thread until the rows are in the file).
        """
        ledger = self.startLedger()
        ledger.add(DAY, "key0", "alice", "m", requests(5))
        writing = ledger.flush()
        reading = ledger.usage(DAY, DAY, ("day", "key"))
        deadline = time.monotonic() + 5
        while not storedClients(ledger.path) and time.monotonic() < deadline:
            time.sleep(0.005)
        self.assertEqual(storedKeys(ledger.path), {(DAY_TEXT, "key0", 5, 0, 0)})
        try:
            self.assertEqual(ledger.keyUsage(DAY), {"key0": requests(5)})
            self.assertEqual(ledger.clientUsage(DAY), {"alice": requests(5)})
            ledger.add(DAY, "key0", "alice", "m", requests(1))
            again = ledger.usage(DAY, DAY, ("day", "key"))
        finally:
            await writing
        self.assertEqual(await reading, [UsageRow((DAY_TEXT, "key0"), requests(5))])
        self.assertEqual(await again, [UsageRow((DAY_TEXT, "key0"), requests(6))])

    async def test_usageOfOneClientMergesWrittenAndUnwritten(self):
        """
        With a client, L{SQLiteLedger.usage} adds that client's unwritten
        counts, exactly, to its written ones, and nobody else's.
        """
        ledger = self.startLedger()
        ledger.add(DAY, "key0", "alice", "m", requests(2, cost=3))
        ledger.add(DAY, "key0", "bob", "m", requests(100))
        await ledger.flush()
        ledger.add(DAY, "key0", "alice", "m", requests(3, errors=1, cost=4))
        ledger.add(DAY, "key1", "alice", "m2", Counts(rateLimited=1))
        ledger.add(DAY, "key1", "bob", "m2", requests(1000))
        ledger.add(DAY + 1, "key1", "alice", "m2", requests(7))
        self.assertEqual(storedClients(ledger.path), {(DAY_TEXT, "alice", 2), (DAY_TEXT, "bob", 100)})
        for groupBy in [(), ("day",), ("client",), ("day", "client")]:
            rows = await ledger.usage(DAY, DAY, groupBy, "alice")
            self.assertEqual(
                [row.counts for row in rows], [requests(5, errors=1, rateLimited=1, cost=7)]
            )
        for groupBy in [("key",), ("day", "key", "model"), ("key", "client", "model")]:
            rows = await ledger.usage(DAY, DAY, groupBy, "alice")
            self.assertEqual(
                [row.counts for row in rows],
                [requests(5, errors=1, cost=7), Counts(rateLimited=1)],
            )
        self.assertEqual(
            await ledger.usage(DAY - 5, DAY + 5, ("day",), "alice"),
            [
                UsageRow((DAY_TEXT,), requests(5, errors=1, rateLimited=1, cost=7)),
                UsageRow((NEXT_DAY_TEXT,), requests(7)),
            ],
        )
        self.assertEqual(
            await ledger.usage(DAY, DAY + 1, ("model",), "bob"),
            [UsageRow(("m",), requests(100)), UsageRow(("m2",), requests(1000))],
        )
        self.assertEqual(await ledger.usage(DAY, DAY + 1, ("model",), "carol"), [])
        await ledger.flush()
        self.assertEqual(
            await ledger.usage(DAY, DAY + 1, ("client",), "alice"),
            [UsageRow(("alice",), requests(12, errors=1, rateLimited=1, cost=7))],
        )

    async def test_usageOfOneClientExactWhileWriting(self):
        """
        With a client too, a batch being written is neither missed nor
        counted twice.
        """
        ledger = self.startLedger()
        ledger.add(DAY, "key0", "alice", "m", requests(5))
        ledger.add(DAY, "key0", "bob", "m", requests(50))
        writing = ledger.flush()
        reading = ledger.usage(DAY, DAY, ("day", "key"), "alice")
        readingDetail = ledger.usage(DAY, DAY, ("model",), "alice")
        deadline = time.monotonic() + 5
        while not storedClients(ledger.path) and time.monotonic() < deadline:
            time.sleep(0.005)
        try:
            self.assertEqual(storedClients(ledger.path), {(DAY_TEXT, "alice", 5), (DAY_TEXT, "bob", 50)})
            ledger.add(DAY, "key0", "alice", "m", requests(1))
            ledger.add(DAY, "key0", "bob", "m", requests(10))
            again = ledger.usage(DAY, DAY, ("day", "key"), "alice")
        finally:
            await writing
        self.assertEqual(await reading, [UsageRow((DAY_TEXT, "key0"), requests(5))])
        self.assertEqual(await readingDetail, [UsageRow(("m",), requests(5))])
        self.assertEqual(await again, [UsageRow((DAY_TEXT, "key0"), requests(6))])

    async def test_usageExactWhileWriteFails(self):
        """
        A batch whose write fails while a usage read waits is counted once,
        from memory.
        """
        ledger = self.startLedger()
        ledger.add(DAY, "key0", "alice", "m", requests(2))
        await ledger.flush()
        ledger._connection.execute("PRAGMA query_only = ON")
        ledger.add(DAY, "key0", "alice", "m", requests(3))
        with capturedLogs():
            writing = ledger.flush()
            reading = ledger.usage(DAY, DAY, ("key",))
            await writing
        self.assertIsNotNone(ledger.problem)
        self.assertEqual(await reading, [UsageRow(("key0",), requests(5))])
        self.assertEqual(await ledger.usage(DAY, DAY, ("key",)), [UsageRow(("key0",), requests(5))])
        ledger._connection.execute("PRAGMA query_only = OFF")
        await ledger.flush()
        self.assertEqual(await ledger.usage(DAY, DAY, ("key",)), [UsageRow(("key0",), requests(5))])
        self.assertEqual(storedKeys(ledger.path), {(DAY_TEXT, "key0", 5, 0, 0)})

    async def test_usageInAThread(self):
        """
        L{SQLiteLedger.usage} does not read on the reactor thread: it has
        not fired when it returns.
        """
        ledger = self.startLedger()
        ledger.add(DAY, "key0", "alice", "m", requests(1))
        d = ledger.usage(DAY, DAY, ("day", "key"))
        self.assertNoResult(d)
        self.assertEqual(await d, [UsageRow((DAY_TEXT, "key0"), requests(1))])

    async def test_flushWaitsForWriteInProgress(self):
        """
        L{ILedger.flush} fires when what has been recorded is written, even
        when it is called while an earlier write is still in progress.
        """
        ledger = self.startLedger()
        ledger.add(DAY, "key0", "alice", "m", requests(1))
        first = ledger.flush()
        ledger.add(DAY, "key0", "alice", "m", requests(2))
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
        ledger.add(DAY, "key0", "alice", "m", requests(1))
        self.clock.advance(0.5)
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(storedKeys(ledger.path), set())
        self.clock.advance(0.5)
        self.assertTrue(await waitUntil(lambda: storedKeys(ledger.path)))
        self.assertEqual(storedKeys(ledger.path), {(DAY_TEXT, "key0", 1, 0, 0)})
        ledger.add(DAY, "key0", "bob", "m", requests(1))

        def later():
            # The loop waits for the first write's result (which the real
            # reactor delivers) before it counts the next interval, so let
            # time pass for as long as that takes.
            self.clock.advance(1.0)
            return (DAY_TEXT, "bob", 1) in storedClients(ledger.path)

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
        ledger.add(DAY, "key0", "alice", "m", requests(1))
        self.clock.advance(1.0)
        self.assertTrue(await waitUntil(lambda: storedKeys(ledger.path)))

    async def test_stopWritesPending(self):
        """
        Stopping writes what is still pending, then closes the file: the
        write-ahead log is checkpointed and removed once the last
        connection closes.
        """
        ledger = self.startLedger()
        ledger.add(DAY, "key0", "alice", "m", requests(4, rateLimited=2))
        await ledger.stopService()
        self.assertFalse(ledger.running)
        self.assertEqual(storedKeys(ledger.path), {(DAY_TEXT, "key0", 4, 2, 0)})
        self.assertEqual(storedClients(ledger.path), {(DAY_TEXT, "alice", 4)})
        self.assertFalse(os.path.exists(ledger.path + "-wal"))

    async def test_stopWaitsForWriteInProgress(self):
        """
        Stopping while a write is in progress waits for it, then writes
        what arrived meanwhile.
        """
        ledger = self.startLedger()
        ledger.add(DAY, "key0", "alice", "m", requests(1))
        ledger.flush()
        ledger.add(DAY, "key0", "bob", "m", requests(2))
        await ledger.stopService()
        self.assertEqual(storedKeys(ledger.path), {(DAY_TEXT, "key0", 3, 0, 0)})
        self.assertEqual(storedClients(ledger.path), {(DAY_TEXT, "alice", 1), (DAY_TEXT, "bob", 2)})

    async def test_restartContinues(self):
        """
        A ledger opened on the file a stopped one wrote has its counts, so
        a key pool started on it carries on with least-used where the last
        run left off.
        """
        ledger = self.startLedger()
        path = ledger.path
        for _ in range(3):
            ledger.add(DAY, "key0", "alice", "m", requests(1))
        ledger.add(DAY, "key1", "alice", "m", requests(1, errors=1))
        await ledger.stopService()

        again = SQLiteLedger(path, reactor=self.clock)
        self.assertEqual(again.keyUsage(DAY), {"key0": requests(3), "key1": requests(1, errors=1)})
        self.assertEqual(again.clientUsage(DAY), {"alice": requests(4, errors=1)})

        keys = (Key(name="key0", token="sk-test-0"), Key(name="key1", token="sk-test-1"))
        pool = KeyPool(keys, ledger=again, reactor=self.clock)
        self.assertEqual(pool.requestCounts(), {"key0": 3, "key1": 1})
        self.assertEqual(pool.acquire().key.name, "key1")
        self.assertEqual(pool.acquire().key.name, "key1")

    async def test_restartKeepsModelCap(self):
        """
        The models a day already has in the file count towards
        L{MODELS_PER_DAY} after a restart.
        """
        ledger = self.startLedger()
        for i in range(MODELS_PER_DAY - 1):
            ledger.add(DAY, "key0", "alice", f"model-{i}", requests(1))
        ledger.add(DAY - 5, "key0", "alice", "old", requests(1))
        await ledger.stopService()
        again = self.startLedger(ledger.path)
        again.add(DAY, "key0", "alice", "model-0", requests(1))
        again.add(DAY, "key0", "alice", "last", requests(1))
        again.add(DAY, "key0", "alice", "one-too-many", requests(1))
        again.add(DAY, "key0", "alice", "model-1", requests(1))
        rows = {row.group[0]: row.counts for row in await again.usage(DAY, DAY, ("model",))}
        self.assertEqual(len(rows), MODELS_PER_DAY + 1)
        self.assertEqual(rows["model-0"], requests(2))
        self.assertEqual(rows["model-1"], requests(2))
        self.assertEqual(rows["last"], requests(1))
        self.assertEqual(rows[OTHER_MODEL], requests(1))

    async def test_retention(self):
        """
        At start, and after each 00:00 UTC, the days older than
        C{retentionDays} (today included) are deleted from every table, in
        the writer's thread, and the count is logged.
        """
        path = self.mktemp()
        first = SQLiteLedger(path, reactor=Clock())
        connection = sqlite3.connect(path)
        for day in (DAY - 10, DAY - 3, DAY - 2, DAY):
            for table, columns in [
                ("usage", "day, key, client, model"),
                ("key_usage", "day, key"),
                ("client_usage", "day, client"),
                ("model_usage", "day, model"),
            ]:
                names = ", ".join(["?"] + ["'x'"] * columns.count(","))
                connection.execute(
                    f"INSERT INTO {table} ({columns}, requests) VALUES ({names}, 1)",
                    (dayText(day),),
                )
        connection.commit()
        connection.close()
        del first

        def days():
            return {
                table: sorted(d for (d,) in query(path, f"SELECT day FROM {table}"))
                for table in ("usage", "key_usage", "client_usage", "model_usage")
            }

        with capturedLogs() as events:
            ledger = self.startLedger(path, retentionDays=3)
            self.assertTrue(
                await waitUntil(lambda: any("deleted" in formatEvent(e) for e in events))
            )
        self.assertEqual(
            days(),
            {table: [dayText(DAY - 2), dayText(DAY)] for table in days()},
        )
        messages = [formatEvent(e) for e in events if "deleted" in formatEvent(e)]
        self.assertEqual(len(messages), 1, messages)
        self.assertIn("8 rows", messages[0])
        self.assertIn(dayText(DAY - 2), messages[0])

        ledger.add(DAY + 1, "key0", "alice", "m", requests(1))
        with capturedLogs() as events:
            self.clock.advance(86400)
            self.assertTrue(
                await waitUntil(lambda: any("deleted 4 rows" in formatEvent(e) for e in events))
            )
        self.assertEqual(days()["usage"], [dayText(DAY), dayText(DAY + 1)])
        self.assertEqual(days()["key_usage"], [dayText(DAY), dayText(DAY + 1)])
        self.assertEqual(days()["model_usage"], [dayText(DAY), dayText(DAY + 1)])
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
        ledger.add(DAY, "key0", "alice", "m", Counts(requests=5, rateLimited=1))
        await ledger.flush()
        ledger.add(DAY, "key0", "alice", "m", Counts(requests=100))
        ledger._writer._loop.stop()
        ledger._writer._threads.stop()

        fresh = SQLiteLedger(path, reactor=Clock())
        self.assertEqual(fresh.keyUsage(DAY), {"key0": Counts(requests=5, rateLimited=1)})
        self.assertEqual(fresh.clientUsage(DAY), {"alice": Counts(requests=5, rateLimited=1)})
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
            self.assertEqual(counts, times(_PER_BATCH, batches))
        self.assertEqual(ledger.clientUsage(DAY), {"alice": times(_PER_BATCH, batches * _KEYS_PER_BATCH)})
        self.assertEqual(
            query(path, f"SELECT {', '.join(f'sum({c})' for c in COUNTERS)} FROM usage"),
            [times(_PER_BATCH, batches * _KEYS_PER_BATCH).asRow()],
        )

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
            ledger.add(DAY, "key0", "alice", "m", Counts(requests=2))
            await ledger.flush()
            self.assertIn("readonly", ledger.problem)
            self.assertEqual(storedKeys(ledger.path), set())
            self.assertEqual(ledger.keyUsage(DAY), {"key0": Counts(requests=2)})
            self.assertEqual(ledger.clientUsage(DAY), {"alice": Counts(requests=2)})
            logged = self.errorsLogged(events)
            self.assertEqual(len(logged), 1, logged)
            self.assertIn("readonly", logged[0])

            self.clock.advance(ledger.problemLogInterval / 2)
            ledger.add(DAY, "key0", "alice", "m", Counts(errors=1))
            await ledger.flush()
            self.assertIsNotNone(ledger.problem)
            self.assertEqual(len(self.errorsLogged(events)), 1)
            self.assertEqual(ledger.keyUsage(DAY), {"key0": Counts(requests=2, errors=1)})

            self.clock.advance(ledger.problemLogInterval / 2)
            ledger.add(DAY, "key0", "alice", "m", Counts(requests=1))
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
        self.assertEqual(storedClients(ledger.path), {(DAY_TEXT, "alice", 3)})
        self.assertEqual(ledger.keyUsage(DAY), {"key0": Counts(requests=3, errors=1)})

    async def test_diskFullKeepsCounting(self):
        """
        A full disk (here the writer connection may not grow the file, with
        C{PRAGMA max_page_count}, which fails writes with SQLite's own
        "database or disk is full") loses nothing: the counts stay, and are
        written once there is room again.
        """
        ledger = self.startLedger()
        ledger.add(DAY, "key0", "alice", "m", Counts(requests=1))
        await ledger.flush()
        (pages,) = ledger._connection.execute("PRAGMA page_count").fetchone()
        self.breakWrites(ledger, f"max_page_count = {pages}")
        longName = "key-" + "x" * 20000  # needs pages the file may not get
        with capturedLogs() as events:
            ledger.add(DAY, longName, "alice", "m", Counts(requests=1))
            ledger.add(DAY, "key0", "alice", "m", Counts(requests=1))
            await ledger.flush()
            self.assertIn("full", ledger.problem)
            self.assertEqual(len(self.errorsLogged(events)), 1)
        self.assertEqual(storedKeys(ledger.path), {(DAY_TEXT, "key0", 1, 0, 0)})
        self.assertEqual(
            ledger.keyUsage(DAY), {"key0": Counts(requests=2), longName: Counts(requests=1)}
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
        ledger.add(DAY, "key0", "alice", "m", Counts(requests=5))
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
                self.assertEqual(ledger.keyUsage(DAY), {"key0": Counts(requests=5)})
                self.assertEqual(ledger.clientUsage(DAY), {"alice": Counts(requests=5)})
                self.assertEqual(storedKeys(ledger.path), set())
            finally:
                await writing
            self.assertIn("not authorized", ledger.problem)
            self.assertEqual(len(self.errorsLogged(events)), 1)
        self.assertEqual(ledger.keyUsage(DAY), {"key0": Counts(requests=5)})

        ledger._connection.set_authorizer(None)
        await ledger.flush()
        self.assertIsNone(ledger.problem)
        self.assertEqual(storedKeys(ledger.path), {(DAY_TEXT, "key0", 5, 0, 0)})
        self.assertEqual(storedClients(ledger.path), {(DAY_TEXT, "alice", 5)})
        self.assertEqual(ledger.keyUsage(DAY), {"key0": Counts(requests=5)})
        self.assertEqual(ledger.clientUsage(DAY), {"alice": Counts(requests=5)})

    async def test_stopWhileWritesFailKeepsNothingHalfWritten(self):
        """
        Stopping while writes fail gives up after a few tries without
        raising, and leaves the file intact and openable.
        """
        ledger = self.startLedger()
        self.breakWrites(ledger, "query_only = ON")
        ledger.add(DAY, "key0", "alice", "m", Counts(requests=1))
        with capturedLogs():
            await ledger.stopService()
        self.assertFalse(ledger.running)
        self.assertEqual(query(ledger.path, "PRAGMA integrity_check"), [("ok",)])
        self.assertEqual(SQLiteLedger(ledger.path, reactor=Clock()).keyUsage(DAY), {})


_KEYS_PER_BATCH = 20
# What the writer process adds per key per batch (the same literal is in
# _WRITER_PROCESS).
_PER_BATCH = Counts(7, 2, 3, 1, 100, 50, 5, 20, 1234)


def times(counts: Counts, n: int) -> Counts:
    return Counts.fromRow([c * n for c in counts.asRow()])

# The child process for test_killedProcessLeavesConsistentFile: a ledger
# service under a real reactor, writing batch after batch as fast as it can,
# reporting each batch on its standard output once the write has committed.
# Only one flush runs at a time, so each write holds exactly one batch.
_WRITER_PROCESS = """
import sys
from twisted.internet.task import react
from hermux.ledger import Counts, SQLiteLedger

path, day, keys = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

async def main(reactor):
    ledger = SQLiteLedger(path, reactor=reactor, interval=3600.0)
    ledger.startService()
    committed = 0
    while True:
        for i in range(keys):
            ledger.add(day, f"key{i}", "alice", f"model{i % 3}", Counts(7, 2, 3, 1, 100, 50, 5, 20, 1234))
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
