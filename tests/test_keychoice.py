# -*- test-case-name: tests.test_keychoice -*-
"""
Tests for the key pool's choice between free-model and paid requests
(L{hermux.keypool}, L{hermux.quota}): which key serves each kind, the daily
caps of tokens.csv, and verdicts that keep a key from one kind only.
"""

from __future__ import annotations

import json
import random
from collections import Counter

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from hermux.config import Key
from hermux.keypool import (
    NANOCREDITS,
    SECONDS_PER_DAY,
    KeyPool,
    NoKeyAvailable,
    Scope,
    State,
    Use,
    nextMidnight,
)
from hermux.ledger import Counts, MemoryLedger
from hermux.quota import classify
from hermux.usage import Usage

DAY = 20418
MORNING = DAY * SECONDS_PER_DAY + 10 * 3600.0
FREE = Use(client="team", model="meta/llama:free", free=True)
PAID = Use(client="team", model="openai/gpt-4o", free=False)
NEITHER = Use(client="team")


def credits(amount: float) -> int:
    return round(amount * NANOCREDITS)


def paymentRequired(message="Insufficient credits", **metadata) -> bytes:
    metadata.setdefault("limit_source", "openrouter_credits")
    return json.dumps({"error": {"code": 402, "message": message, "metadata": metadata}}).encode()


def freePerDay() -> bytes:
    return json.dumps({"error": {
        "code": 429,
        "message": "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000",
        "metadata": {"headers": {"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0"}},
    }}).encode()


class ChoiceTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(MORNING)
        self.ledger = MemoryLedger()

    def pool(self, keys) -> KeyPool:
        return KeyPool(keys, ledger=self.ledger, reactor=self.clock, randomness=random.Random(7))

    def serve(self, pool, use, cost=0) -> str:
        """
        Send one request of C{use}'s kind, costing C{cost} nanocredits;
        return the name of the key that served it.
        """
        attempt = pool.acquire(use=use)
        attempt.charge(Usage(cost=cost))
        attempt.close()
        return attempt.key.name

    def test_freeRequestsGoToTheFewestFreeRequests(self):
        """
        A free-model request goes to the key with the fewest free-model
        requests today, whatever its paid requests.
        """
        pool = self.pool([Key("a", "sk-a"), Key("b", "sk-b")])
        for _ in range(5):
            pool.acquire(exclude={"b"}, use=PAID).close()
        pool.acquire(exclude={"a"}, use=FREE).close()
        self.assertEqual(Counter(self.serve(pool, FREE) for _ in range(3)), Counter(a=2, b=1))

    def test_paidRequestsGoToTheFewestCredits(self):
        """
        A paid request goes to the key that spent the fewest credits today;
        among keys that spent the same, to the one with fewest requests.
        """
        pool = self.pool([Key("a", "sk-a"), Key("b", "sk-b"), Key("c", "sk-c")])
        attempt = pool.acquire(exclude={"b", "c"}, use=PAID)
        attempt.charge(Usage(cost=credits(0.5)))
        attempt.close()
        for _ in range(3):
            pool.acquire(exclude={"a", "c"}, use=FREE).close()
        self.assertEqual(self.serve(pool, PAID, cost=credits(0.1)), "c")
        self.assertEqual(self.serve(pool, PAID, cost=credits(0.1)), "b")
        self.assertEqual(self.serve(pool, PAID, cost=credits(0.1)), "c")

    def test_requestsWithoutAModelGoToTheFewestRequests(self):
        pool = self.pool([Key("a", "sk-a"), Key("b", "sk-b")])
        attempt = pool.acquire(exclude={"b"}, use=PAID)
        attempt.charge(Usage(cost=credits(3)))
        attempt.close()
        self.assertEqual(self.serve(pool, NEITHER), "b")

    def test_dailyLimitCapsFreeRequestsOnly(self):
        """
        A key's daily_limit caps its free-model requests: once reached, it
        serves no free one until the next 00:00 UTC, and paid ones still.
        """
        pool = self.pool([Key("a", "sk-a", dailyLimit=2)])
        self.serve(pool, FREE)
        self.serve(pool, FREE)
        error = self.assertRaises(NoKeyAvailable, pool.acquire, use=FREE)
        self.assertEqual(error.usableAt, nextMidnight(MORNING))
        self.assertEqual(self.serve(pool, PAID), "a")
        self.assertEqual(self.serve(pool, NEITHER), "a")
        [status] = pool.statuses()
        self.assertEqual(status.state, State.READY)
        self.assertIn("daily_limit of 2 free-model requests", status.freeReason)
        self.assertIsNone(status.paidReason)
        self.clock.advance(nextMidnight(MORNING) - MORNING)
        self.assertEqual(self.serve(pool, FREE), "a")

    def test_dailyCostCapsPaidRequestsOnly(self):
        """
        A key's daily_cost caps the credits it spends on paid requests in a
        UTC day, checked before each request: the request that crosses it
        is served (it may overshoot), the next is not.
        """
        pool = self.pool([Key("a", "sk-a", dailyCost=credits(1))])
        self.serve(pool, PAID, cost=credits(0.6))
        self.serve(pool, PAID, cost=credits(0.6))
        error = self.assertRaises(NoKeyAvailable, pool.acquire, use=PAID)
        self.assertEqual(error.usableAt, nextMidnight(MORNING))
        self.assertEqual(self.serve(pool, FREE), "a")
        [status] = pool.statuses()
        self.assertEqual(status.costToday, credits(1.2))
        self.assertIn("daily_cost of 1 credits", status.paidReason)
        self.clock.advance(nextMidnight(MORNING) - MORNING - 1)
        self.assertRaises(NoKeyAvailable, pool.acquire, use=PAID)
        self.clock.advance(1)
        self.assertEqual(self.serve(pool, PAID), "a")
        self.assertEqual(pool.statuses()[0].costToday, 0)

    def test_bothCapsReachedIsExhausted(self):
        pool = self.pool([Key("a", "sk-a", dailyLimit=1, dailyCost=credits(0.1))])
        self.serve(pool, FREE)
        self.serve(pool, PAID, cost=credits(0.1))
        [status] = pool.statuses()
        self.assertEqual(status.state, State.EXHAUSTED)
        self.assertEqual(status.usableAt, nextMidnight(MORNING))
        self.assertRaises(NoKeyAvailable, pool.acquire, use=NEITHER)

    def test_outOfCreditsOnAPaidRequestStopsPaidOnly(self):
        """
        A 402 on a paid request keeps the key from paid requests until the
        next 00:00 UTC; it goes on serving free ones.
        """
        pool = self.pool([Key("a", "sk-a"), Key("b", "sk-b")])
        attempt = pool.acquire(exclude={"b"}, use=PAID)
        verdict = classify(402, Headers(), paymentRequired(), MORNING, free=False)
        self.assertEqual(verdict.scope, Scope.PAID)
        attempt.report(verdict)
        attempt.close()
        self.assertEqual({self.serve(pool, PAID) for _ in range(4)}, {"b"})
        self.assertIn("a", {self.serve(pool, FREE) for _ in range(4)})
        [a, _] = pool.statuses()
        self.assertEqual(a.state, State.READY)
        self.assertIn("out of credits", a.paidReason)
        self.clock.advance(nextMidnight(MORNING) - MORNING)
        self.assertIn("a", {self.serve(pool, PAID) for _ in range(4)})

    def test_negativeBalanceStopsEverything(self):
        """
        A 402 that says the balance is negative disables the key for every
        request until the next 00:00 UTC, as does a 402 on a free-model
        request (which only a negative balance gives).
        """
        for body, free in [
            (paymentRequired("Your account has a negative credit balance."), False),
            (paymentRequired(reason="negative_balance"), False),
            (paymentRequired(), True),
        ]:
            pool = self.pool([Key("a", "sk-a")])
            attempt = pool.acquire(use=FREE if free else PAID)
            verdict = classify(402, Headers(), body, MORNING, free=free)
            self.assertEqual(verdict.scope, Scope.ALL, body)
            attempt.report(verdict)
            attempt.close()
            [status] = pool.statuses()
            self.assertEqual(status.state, State.DISABLED, body)
            self.assertEqual(status.usableAt, nextMidnight(MORNING))
            for use in (FREE, PAID, NEITHER):
                self.assertRaises(NoKeyAvailable, pool.acquire, use=use)

    def test_freeModelsPerDayStopsFreeOnly(self):
        """
        A free-models-per-day 429 stops only free-model requests: the key
        still serves paid ones.
        """
        pool = self.pool([Key("a", "sk-a")])
        attempt = pool.acquire(use=FREE)
        verdict = classify(429, Headers(), freePerDay(), MORNING, free=True)
        self.assertEqual(verdict.scope, Scope.FREE)
        attempt.report(verdict)
        attempt.close()
        self.assertRaises(NoKeyAvailable, pool.acquire, use=FREE)
        self.assertEqual(self.serve(pool, PAID), "a")
        [status] = pool.statuses()
        self.assertEqual((status.state, status.rateLimitedToday), (State.READY, 1))
        self.assertIn("free-model requests are used up", status.freeReason)

    def test_attemptGoesToTheLedgerOnceUnderTheAnswersModel(self):
        """
        An attempt is one row of the ledger, written when it is closed,
        under the model the answer named, else the request's.
        """
        pool = self.pool([Key("a", "sk-a")])
        attempt = pool.acquire(use=Use(client="team", model="openrouter/auto", free=False))
        attempt.charge(Usage(
            model="anthropic/claude-x", promptTokens=10, completionTokens=5,
            reasoningTokens=2, cachedTokens=3, cost=credits(0.25),
        ))
        self.assertEqual(self.ledger.keyUsage(DAY), {})
        attempt.close()
        attempt.close()
        expected = Counts(
            requests=1, promptTokens=10, completionTokens=5, reasoningTokens=2,
            cachedTokens=3, cost=credits(0.25),
        )
        self.assertEqual(self.ledger.keyUsage(DAY), {"a": expected})
        rows = self.successResultOf(self.ledger.usage(DAY, DAY, ("client", "model")))
        self.assertEqual([(r.group, r.counts) for r in rows], [(("team", "anthropic/claude-x"), expected)])
        other = pool.acquire(use=FREE)
        other.close()
        rows = self.successResultOf(self.ledger.usage(DAY, DAY, ("model",)))
        self.assertIn((("meta/llama:free",), Counts(requests=1, freeRequests=1)),
                      [(r.group, r.counts) for r in rows])

    def test_lateVerdictIsCountedStill(self):
        """
        A verdict that arrives after its attempt was closed is counted in a
        row of its own.
        """
        pool = self.pool([Key("a", "sk-a")])
        attempt = pool.acquire(use=PAID)
        attempt.close()
        attempt.report(classify(500, Headers(), b"", MORNING))
        self.assertEqual(self.ledger.keyUsage(DAY)["a"], Counts(requests=1, errors=1))

    def test_freeAndCostCarryAcrossARestart(self):
        """
        A pool started later the same day takes free-model requests and
        credits spent from the ledger.
        """
        pool = self.pool([Key("a", "sk-a", dailyLimit=1), Key("b", "sk-b")])
        attempt = pool.acquire(exclude={"b"}, use=FREE)
        attempt.charge(Usage(cost=0))
        attempt.close()
        attempt = pool.acquire(exclude={"a"}, use=PAID)
        attempt.charge(Usage(cost=credits(2)))
        attempt.close()
        restarted = self.pool([Key("a", "sk-a", dailyLimit=1), Key("b", "sk-b")])
        [a, b] = restarted.statuses()
        self.assertEqual((a.freeRequestsToday, a.costToday), (1, 0))
        self.assertEqual((b.freeRequestsToday, b.costToday), (0, credits(2)))
        self.assertEqual(self.serve(restarted, PAID), "a")
        self.assertEqual(self.serve(restarted, FREE), "b")

    def test_aVerdictOfYesterdayChangesNoCountOfToday(self):
        pool = self.pool([Key("a", "sk-a")])
        attempt = pool.acquire(use=PAID)
        self.clock.advance(SECONDS_PER_DAY)
        attempt.charge(Usage(cost=credits(1)))
        attempt.close()
        self.assertEqual(pool.statuses()[0].costToday, 0)
        self.assertEqual(self.ledger.keyUsage(DAY)["a"].cost, credits(1))
