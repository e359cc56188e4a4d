"""
Tests for L{hermux.keypool}: which upstream key serves each request.
"""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from twisted.application.service import IService
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from hermux.config import Key
from hermux.keypool import (
    ERROR,
    SECONDS_PER_DAY,
    KeyPool,
    Kind,
    NoKeyAvailable,
    State,
    Use,
    Verdict,
    isoTime,
    nextMidnight,
)
from hermux.ledger import Counts, KeyUsage, MemoryLedger


def makeKeys(count: int) -> tuple[Key, ...]:
    return tuple(Key(name=f"key{i}", token=f"sk-test-{i}") for i in range(count))


class KeyPoolTests(SynchronousTestCase):
    """
    Tests for L{KeyPool}.
    """

    def test_isService(self):
        """
        A pool is a Twisted service, so it can be named and added to the
        application.
        """
        pool = KeyPool(makeKeys(2))
        self.assertTrue(verifyObject(IService, pool))
        pool.setName("keypool")
        self.assertEqual(pool.name, "keypool")

    def test_keys(self):
        """
        The pool keeps its keys in the order given.
        """
        keys = makeKeys(3)
        self.assertEqual(KeyPool(iter(keys)).keys, keys)

    def test_countsStartAtZero(self):
        """
        Before any request, every key has a count of zero.
        """
        pool = KeyPool(makeKeys(3))
        self.assertEqual(pool.requestCounts(), {"key0": 0, "key1": 0, "key2": 0})

    def test_acquireCounts(self):
        """
        Acquiring a key counts one request for it and none for the others.
        """
        pool = KeyPool(makeKeys(3), randomness=random.Random(1))
        key = pool.acquire().key
        counts = pool.requestCounts()
        self.assertEqual(counts[key.name], 1)
        self.assertEqual(sum(counts.values()), 1)

    def test_requestCountsIsACopy(self):
        """
        Changing the dictionary L{KeyPool.requestCounts} returns does not
        change the pool.
        """
        pool = KeyPool(makeKeys(2))
        pool.requestCounts()["key0"] = 100
        self.assertEqual(pool.requestCounts(), {"key0": 0, "key1": 0})

    def test_evenSpread(self):
        """
        With k keys, N*k acquisitions give each key exactly N requests, even
        when they are made back to back with none finished: a key is
        counted when it is chosen.
        """
        for k in (1, 2, 3, 5):
            for n in (1, 4, 10):
                pool = KeyPool(makeKeys(k), randomness=random.Random(k * 100 + n))
                chosen = Counter(pool.acquire().key.name for _ in range(n * k))
                expected = {f"key{i}": n for i in range(k)}
                self.assertEqual(dict(chosen), expected, (k, n))
                self.assertEqual(pool.requestCounts(), expected, (k, n))

    def test_eachRoundUsesEveryKey(self):
        """
        Every k consecutive acquisitions starting from an even state use each
        of the k keys once.
        """
        pool = KeyPool(makeKeys(4), randomness=random.Random(7))
        for _ in range(5):
            names = {pool.acquire().key.name for _ in range(4)}
            self.assertEqual(names, {"key0", "key1", "key2", "key3"})

    def test_fewerRequestsPreferred(self):
        """
        A key with fewer requests than the others is always the next one
        chosen, whatever the random choice would be.
        """
        for seed in range(50):
            pool = KeyPool(makeKeys(4), randomness=random.Random(seed))
            first = {pool.acquire().key.name for _ in range(3)}
            (missing,) = {"key0", "key1", "key2", "key3"} - first
            self.assertEqual(pool.acquire().key.name, missing, seed)

    def test_randomTies(self):
        """
        Ties are broken at random: across pools with different seeds, every
        key is sometimes the first one chosen.
        """
        firsts = Counter(
            KeyPool(makeKeys(3), randomness=random.Random(seed)).acquire().key.name
            for seed in range(100)
        )
        self.assertEqual(set(firsts), {"key0", "key1", "key2"})

    def test_defaultRandomness(self):
        """
        Without a given source of randomness the pool still spreads
        requests evenly.
        """
        pool = KeyPool(makeKeys(3))
        for _ in range(6):
            pool.acquire()
        self.assertEqual(pool.requestCounts(), {"key0": 2, "key1": 2, "key2": 2})

    def test_reproducible(self):
        """
        With the same seed, two pools choose the same keys in the same
        order.
        """

        def choices(seed):
            pool = KeyPool(makeKeys(5), randomness=random.Random(seed))
            return [pool.acquire().key.name for _ in range(30)]

        self.assertEqual(choices(1234), choices(1234))

    def test_returnsPoolKeys(self):
        """
        L{KeyPool.acquire} returns the L{Key} objects of the pool, token
        included.
        """
        keys = makeKeys(2)
        pool = KeyPool(keys, randomness=random.Random(0))
        self.assertIn(pool.acquire().key, keys)

    def test_emptyPool(self):
        """
        A pool with no keys raises L{NoKeyAvailable}, every time.
        """
        pool = KeyPool([])
        self.assertRaises(NoKeyAvailable, pool.acquire)
        self.assertRaises(NoKeyAvailable, pool.acquire)
        self.assertEqual(pool.requestCounts(), {})

    @settings(database=None)
    @given(
        keyCount=st.integers(min_value=1, max_value=8),
        acquisitions=st.integers(min_value=0, max_value=100),
        seed=st.integers(),
    )
    def test_neverUneven(self, keyCount, acquisitions, seed):
        """
        For any number of keys and any sequence of acquisitions, after each
        one no key has more than one request more than another, and the
        counts add up to the acquisitions made.
        """
        pool = KeyPool(makeKeys(keyCount), randomness=random.Random(seed))
        for made in range(1, acquisitions + 1):
            pool.acquire()
            counts = pool.requestCounts().values()
            self.assertLessEqual(max(counts) - min(counts), 1)
            self.assertEqual(sum(counts), made)


# A realistic moment: 2025-11-26T10:00:00Z.
DAY = 20418
MORNING = DAY * SECONDS_PER_DAY + 10 * 3600.0


class KeyStateTests(SynchronousTestCase):
    """
    Key states driven by upstream verdicts and by the clock.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(MORNING)
        self.ledger = MemoryLedger()
        self.keys = makeKeys(3)
        self.alpha, self.beta, self.gamma = self.keys

    def pool(self, keys=None, **kwargs) -> KeyPool:
        return KeyPool(
            keys or self.keys,
            ledger=self.ledger,
            reactor=self.clock,
            randomness=random.Random(4),
            **kwargs,
        )

    def states(self, pool) -> dict[str, State]:
        return {status.name: status.state for status in pool.statuses()}

    def chosen(self, pool, times, use=Use()) -> Counter:
        """
        Make C{times} requests of C{use}'s kind, each over at once; count
        the keys chosen.
        """
        chosen = Counter()
        for _ in range(times):
            attempt = pool.acquire(use=use)
            attempt.close()
            chosen[attempt.key.name] += 1
        return chosen

    def test_coolingKeyRestsUntilItsTime(self):
        """
        A cooling key is not chosen until its time comes; then it is, and it
        catches up as the least used.
        """
        pool = self.pool()
        pool.report(self.alpha, Verdict(Kind.COOLING, MORNING + 60, "per-minute"))
        self.assertEqual(self.states(pool)["key0"], State.COOLING)
        self.assertNotIn("key0", self.chosen(pool, 10))
        self.clock.advance(60)
        self.assertEqual(self.states(pool)["key0"], State.READY)
        self.assertEqual(self.chosen(pool, 5), Counter(key0=5))

    def test_exhaustedKeyRestsUntilReset(self):
        pool = self.pool()
        pool.report(self.beta, Verdict(Kind.EXHAUSTED, MORNING + 3600, "per-day"))
        [beta] = [s for s in pool.statuses() if s.name == "key1"]
        self.assertEqual(beta.state, State.EXHAUSTED)
        self.assertEqual(beta.usableAt, MORNING + 3600)
        self.assertEqual(beta.reason, "per-day")
        self.assertNotIn("key1", self.chosen(pool, 10))
        self.clock.advance(3600)
        self.assertIn("key1", self.chosen(pool, 10))

    def test_disabledUntilReload(self):
        """
        A key the upstream refused stays disabled, across midnight too.
        """
        pool = self.pool()
        pool.report(self.gamma, Verdict(Kind.DISABLED, None, "invalid (401)"))
        self.clock.advance(3 * SECONDS_PER_DAY)
        [gamma] = [s for s in pool.statuses() if s.name == "key2"]
        self.assertEqual(gamma.state, State.DISABLED)
        self.assertIsNone(gamma.usableAt)
        self.assertEqual(gamma.reason, "invalid (401)")
        self.assertNotIn("key2", self.chosen(pool, 10))

    def test_disabledForToday(self):
        """
        A key disabled until midnight (out of credits) serves again on the
        next UTC day.
        """
        pool = self.pool()
        midnight = nextMidnight(MORNING)
        pool.report(self.alpha, Verdict(Kind.DISABLED, midnight, "no credits (402)"))
        self.clock.advance(midnight - MORNING - 1)
        self.assertEqual(self.states(pool)["key0"], State.DISABLED)
        self.clock.advance(1)
        self.assertEqual(self.states(pool)["key0"], State.READY)

    def test_dailyLimit(self):
        """
        A key that reached its daily_limit of free-model requests today is
        not chosen for one until the next UTC day.
        """
        free = Use(model="m:free", free=True)
        limited = Key("limited", "sk-limited", dailyLimit=2)
        pool = self.pool(keys=[limited, self.alpha])
        self.assertEqual(self.chosen(pool, 4, free), Counter(limited=2, key0=2))
        [status, _] = pool.statuses()
        self.assertIn("daily_limit of 2", status.freeReason)
        self.assertEqual(pool.usableAt(free=True), MORNING)
        self.assertEqual(self.chosen(pool, 3, free), Counter(key0=3))
        self.clock.advance(nextMidnight(MORNING) - MORNING)
        self.assertIsNone(pool.statuses()[0].freeReason)
        self.assertEqual(self.chosen(pool, 4, free), Counter(limited=2, key0=2))

    def test_zeroDailyLimit(self):
        limited = Key("never", "sk-never", dailyLimit=0)
        pool = self.pool(keys=[limited])
        error = self.assertRaises(NoKeyAvailable, pool.acquire, use=Use(free=True))
        self.assertEqual(error.usableAt, nextMidnight(MORNING))

    def test_midnightStartsEveryKeyAtZero(self):
        """
        At 00:00 UTC every count starts again at zero, so least-used is
        about today only.
        """
        pool = self.pool()
        self.chosen(pool, 30)
        pool.acquire(exclude={"key1", "key2"})
        self.assertEqual(pool.requestCounts(), {"key0": 11, "key1": 10, "key2": 10})
        self.clock.advance(nextMidnight(MORNING) - MORNING - 0.001)
        self.assertEqual(pool.requestCounts()["key0"], 11)
        self.clock.advance(0.001)
        self.assertEqual(pool.requestCounts(), {"key0": 0, "key1": 0, "key2": 0})
        self.assertEqual(sorted(self.chosen(pool, 3).values()), [1, 1, 1])

    def test_countsGoToTheLedgerByDay(self):
        pool = self.pool()
        self.chosen(pool, 3)
        pool.report(self.alpha, Verdict(Kind.COOLING, MORNING + 1, "x"))
        pool.report(self.beta, ERROR)
        attempt = pool.acquire(exclude={"key0", "key1"}, use=Use(client="client-1", model="m"))
        attempt.report(ERROR)
        attempt.close()
        self.clock.advance(SECONDS_PER_DAY)
        pool.acquire().close()
        today = self.ledger.keyUsage(DAY)
        self.assertEqual(today["key0"], KeyUsage(requests=1, rateLimited=1, errors=0))
        self.assertEqual(today["key1"], KeyUsage(requests=1, rateLimited=0, errors=1))
        self.assertEqual(today["key2"], KeyUsage(requests=2, rateLimited=0, errors=1))
        self.assertEqual(self.ledger.clientUsage(DAY)["client-1"], KeyUsage(requests=1, errors=1))
        self.assertEqual(sum(u.requests for u in self.ledger.keyUsage(DAY + 1).values()), 1)

    def test_todayComesFromTheLedger(self):
        """
        A pool started today continues from the ledger's counts, so least
        used carries on across restarts.
        """
        self.ledger.add(DAY, "key0", "c", "m", Counts(requests=7, rateLimited=2))
        self.ledger.add(DAY, "key1", "c", "m", Counts(requests=5))
        self.ledger.add(DAY - 1, "key2", "c", "m", Counts(requests=100))
        pool = self.pool()
        self.assertEqual(pool.requestCounts(), {"key0": 7, "key1": 5, "key2": 0})
        self.assertEqual(self.chosen(pool, 5), Counter(key2=5))
        [alpha, _, _] = pool.statuses()
        self.assertEqual(alpha.rateLimitedToday, 2)

    def test_noKeyAvailableSaysWhen(self):
        """
        With no key ready, the pool says when the first one will be.
        """
        pool = self.pool()
        pool.report(self.alpha, Verdict(Kind.COOLING, MORNING + 90, "a"))
        pool.report(self.beta, Verdict(Kind.EXHAUSTED, MORNING + 30, "b"))
        pool.report(self.gamma, Verdict(Kind.DISABLED, None, "c"))
        error = self.assertRaises(NoKeyAvailable, pool.acquire)
        self.assertEqual(error.usableAt, MORNING + 30)

    def test_noKeyEverAvailable(self):
        pool = self.pool()
        for key in self.keys:
            pool.report(key, Verdict(Kind.DISABLED, None, "refused"))
        self.assertIsNone(self.assertRaises(NoKeyAvailable, pool.acquire).usableAt)

    def test_excludedKeysAreNotChosen(self):
        pool = self.pool()
        for _ in range(5):
            self.assertEqual(pool.acquire(exclude={"key0", "key2"}).key.name, "key1")
        error = self.assertRaises(NoKeyAvailable, pool.acquire, exclude={"key0", "key1", "key2"})
        self.assertEqual(error.usableAt, MORNING)

    def test_busyIsNoPenalty(self):
        pool = self.pool()
        pool.report(self.alpha, Verdict(Kind.BUSY, None, "high demand"))
        self.assertEqual(self.states(pool)["key0"], State.READY)
        self.assertEqual(pool.statuses()[0].rateLimitedToday, 1)

    def test_reportForAnUnknownKeyIsIgnored(self):
        pool = self.pool()
        pool.report(Key("stranger", "sk-x"), Verdict(Kind.DISABLED, None, "x"))
        pool.report(Key("key0", "sk-another-token"), Verdict(Kind.DISABLED, None, "x"))
        self.assertEqual(set(self.states(pool).values()), {State.READY})

    def test_seed(self):
        """
        What the upstream reports raises today's count and sets the daily
        limit, unless tokens.csv sets one.
        """
        limited = Key("limited", "sk-l", dailyLimit=10)
        pool = self.pool(keys=[limited, self.alpha])
        pool.acquire()
        pool.seed("limited", used=4, limit=50)
        pool.seed("key0", used=0, limit=50)
        [l, a] = pool.statuses()
        self.assertEqual((l.freeRequestsToday, l.dailyLimit), (4, 10))
        self.assertEqual(a.dailyLimit, 50)
        self.assertGreaterEqual(a.requestsToday, 0)

    def test_stateChangesAreLoggedByName(self):
        pool = self.pool()
        with capturedLogs() as events:
            pool.report(self.alpha, Verdict(Kind.DISABLED, None, "the upstream refused the key (403)"))
        [event] = events
        self.assertEqual(event["key"], "key0")
        self.assertIn("disabled", formatEvent(event))
        self.assertNotIn(self.alpha.token, formatEvent(event) + repr(event))

    def test_isoTime(self):
        self.assertEqual(isoTime(MORNING), "2025-11-26T10:00:00Z")
