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
from twisted.trial.unittest import SynchronousTestCase

from hermux.config import Key
from hermux.keypool import KeyPool, NoKeyAvailable


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
        key = pool.acquire()
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
                chosen = Counter(pool.acquire().name for _ in range(n * k))
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
            names = {pool.acquire().name for _ in range(4)}
            self.assertEqual(names, {"key0", "key1", "key2", "key3"})

    def test_fewerRequestsPreferred(self):
        """
        A key with fewer requests than the others is always the next one
        chosen, whatever the random choice would be.
        """
        for seed in range(50):
            pool = KeyPool(makeKeys(4), randomness=random.Random(seed))
            first = {pool.acquire().name for _ in range(3)}
            (missing,) = {"key0", "key1", "key2", "key3"} - first
            self.assertEqual(pool.acquire().name, missing, seed)

    def test_randomTies(self):
        """
        Ties are broken at random: across pools with different seeds, every
        key is sometimes the first one chosen.
        """
        firsts = Counter(
            KeyPool(makeKeys(3), randomness=random.Random(seed)).acquire().name
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
            return [pool.acquire().name for _ in range(30)]

        self.assertEqual(choices(1234), choices(1234))

    def test_returnsPoolKeys(self):
        """
        L{KeyPool.acquire} returns the L{Key} objects of the pool, token
        included.
        """
        keys = makeKeys(2)
        pool = KeyPool(keys, randomness=random.Random(0))
        self.assertIn(pool.acquire(), keys)

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
