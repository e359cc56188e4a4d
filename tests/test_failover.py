"""
Quota-aware forwarding through hermux as it is wired, in memory (see
L{tests.memory}): what hermux does when OpenRouter says a key cannot serve.
Time stands still unless a test moves it, so the times a key is cooling or
exhausted until, and the Retry-After hermux sends, are asserted exactly.
"""

from __future__ import annotations

import json
import math
import os

from twisted.trial.unittest import SynchronousTestCase, TestCase

from hermux.keypool import KeyPool, State, dayOf, nextMidnight
from hermux.ledger import SQLiteLedger
from hermux.probe import KeyProbe
from tests.harness import ACCESS_TOKEN, CHAT, KEYS, chatBody
from tests.memory import NOW, MemoryProxy

FREE_MODEL = "test/model:free"

ALPHA, BETA, GAMMA = KEYS
HOUR = 3600.0


def rateLimit(kind: str, resetIn: float | None = None, inHeader: bool = False):
    """
    OpenRouter's 429 body (and headers) for a cap of C{kind}, with a reset
    time C{resetIn} seconds after L{NOW}.
    """
    metadata = {}
    headers = {}
    if kind != "shared":
        # OpenRouter's own limits carry X-RateLimit-*, copied into the body.
        metadata["headers"] = {"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0"}
    if resetIn is not None:
        reset = str(int((NOW + resetIn) * 1000))
        if inHeader:
            headers["X-RateLimit-Reset"] = reset
        else:
            metadata["headers"]["X-RateLimit-Reset"] = reset
    message = {
        "day": "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000.",
        "minute": "Rate limit exceeded: free-models-per-min.",
        "shared": "High demand for meta-llama/llama-3.3-70b-instruct:free on OpenRouter.",
    }[kind]
    if kind == "shared":
        metadata["limit_source"] = "openrouter_shared_capacity"
    body = {"error": {"code": 429, "message": message, "metadata": metadata}}
    return body, headers


def attemptsBy(proxy) -> dict[str, int]:
    names = {key.token: key.name for key in KEYS}
    counts = {key.name: 0 for key in KEYS}
    for received in proxy.fake.received:
        counts[names[received.key]] += 1
    return counts


class FailoverTests(SynchronousTestCase):
    """
    A key-attributable refusal before any byte reached the client is
    retried on another key; the client sees only the success.
    """

    def assertServedBy(self, proxy, name, stream=False):
        response, body = proxy.chatted(stream=stream)
        self.assertEqual(response.code, 200, body)
        self.assertEqual(response.headers.getRawHeaders("X-Token-Name"), [name])
        return body

    def test_perDayCapMovesOn(self):
        """
        Keys that answer "free-models-per-day" to a free-model request are
        kept from free-model requests until the reset time the answer gives,
        and skipped for them; each is tried at most once.  They still serve
        paid requests.
        """
        proxy = MemoryProxy(self)
        body, headers = rateLimit("day", resetIn=3 * HOUR)
        for key in (ALPHA, BETA):
            proxy.fake.answerNext(429, body, headers, key=key.token, times=None)
        for _ in range(4):
            response, raw = proxy.chatted(model=FREE_MODEL)
            self.assertEqual(response.headers.getRawHeaders("X-Token-Name"), [GAMMA.name], raw)
        self.assertEqual(attemptsBy(proxy), {"alpha": 1, "beta": 1, "gamma": 4})
        states = {s.name: s for s in proxy.pool.statuses()}
        self.assertEqual(states["alpha"].state, State.READY)
        self.assertIn("free-model requests are used up", states["alpha"].freeReason)
        proxy.advance(3 * HOUR - 1)
        self.assertIsNotNone(proxy.pool.statuses()[0].freeReason)
        proxy.advance(1)
        self.assertIsNone(proxy.pool.statuses()[0].freeReason)

    def test_perMinuteCapCools(self):
        """
        Keys that answer "free-models-per-min" cool until the reset time
        the answer gives, exactly, and serve again from then on.
        """
        proxy = MemoryProxy(self)
        body, headers = rateLimit("minute", resetIn=30, inHeader=True)
        proxy.fake.answerNext(429, body, headers, key=ALPHA.token, times=1)
        proxy.fake.answerNext(429, body, headers, key=BETA.token, times=1)
        self.assertServedBy(proxy, GAMMA.name)
        states = {s.name: s for s in proxy.pool.statuses()}
        self.assertEqual(states["gamma"].state, State.READY)
        cooled = [n for n, a in attemptsBy(proxy).items() if a and n != "gamma"]
        for name in cooled:
            self.assertEqual(states[name].state, State.COOLING)
            self.assertEqual(states[name].usableAt, NOW + 30)
        proxy.advance(29.5)
        states = {s.name: s.state for s in proxy.pool.statuses()}
        for name in cooled:
            self.assertEqual(states[name], State.COOLING)
        proxy.advance(0.5)
        self.assertEqual({s.state for s in proxy.pool.statuses()}, {State.READY})

    def test_invalidKeysAreDisabled(self):
        """
        401 and 403 disable a key until the configuration is reloaded; 402
        on a paid request keeps it from paid requests for the rest of the
        UTC day.
        """
        proxy = MemoryProxy(self)
        proxy.fake.answerNext(401, {"error": {"code": 401, "message": "User not found."}}, key=ALPHA.token, times=None)
        proxy.fake.answerNext(402, {"error": {"code": 402, "message": "Insufficient credits"}}, key=BETA.token, times=None)
        for _ in range(3):
            self.assertServedBy(proxy, GAMMA.name)
        states = {s.name: s for s in proxy.pool.statuses()}
        self.assertEqual(states["alpha"].state, State.DISABLED)
        self.assertIsNone(states["alpha"].usableAt)
        self.assertEqual(states["beta"].state, State.READY)
        self.assertIn("out of credits", states["beta"].paidReason)
        self.assertIsNone(states["beta"].freeReason)

    def test_forbiddenKeyMovesOn(self):
        """
        A 403 for a key's own limit (here its credit limit and its workspace
        budget) moves on to another key.
        """
        proxy = MemoryProxy(self)
        proxy.fake.forbiddenNext("key_limit", key=ALPHA.token, times=None)
        proxy.fake.forbiddenNext("workspace_budget", key=BETA.token, times=None)
        self.assertServedBy(proxy, GAMMA.name)

    def test_streamingRequestMovesOn(self):
        proxy = MemoryProxy(self)
        body, headers = rateLimit("minute")
        for key in (ALPHA, BETA):
            proxy.fake.answerNext(429, body, headers, key=key.token, times=None)
        stream = self.assertServedBy(proxy, GAMMA.name, stream=True)
        self.assertTrue(stream.endswith(b"data: [DONE]\n\n"))

    def test_retrySendsTheSameRequest(self):
        """
        A retried request carries the same method, target, headers and body,
        with only the key changed.
        """
        proxy = MemoryProxy(self)
        body, headers = rateLimit("minute")
        for key in (ALPHA, BETA):
            proxy.fake.answerNext(429, body, headers, key=key.token, times=None)
        proxy.respond(
            "POST",
            CHAT + "?trace=1",
            headers={"Content-Type": "application/json", "X-Title": "retry test"},
            data=chatBody(temperature=0.5),
        )
        attempts = proxy.fake.received
        self.assertGreaterEqual(len(attempts), 1)
        for attempt in attempts:
            self.assertEqual(attempt.method, b"POST")
            self.assertEqual(attempt.uri, b"/api/v1/chat/completions?trace=1")
            self.assertEqual(attempt.body, chatBody(temperature=0.5))
            self.assertEqual(attempt.headers.getRawHeaders(b"X-Title"), [b"retry test"])
        self.assertEqual(len({a.key for a in attempts}), len(attempts))


class NoRetryTests(SynchronousTestCase):
    """
    Answers that another key would not change go to the client as they are.
    """

    def assertPassedThrough(self, proxy, status):
        response, raw = proxy.chatted()
        body = json.loads(raw)
        self.assertEqual(response.code, status)
        self.assertEqual(body["error"]["code"], status)
        self.assertEqual(len(proxy.fake.received), 1)
        self.assertIsNone(response.headers.getRawHeaders("X-Hermux-Error"))
        return response

    def test_badRequest(self):
        """
        A 400 is the request's fault: retrying would burn every account's
        quota.
        """
        proxy = MemoryProxy(self)
        proxy.fake.answerNext(400, {"error": {"code": 400, "message": "bad"}}, times=None)
        self.assertPassedThrough(proxy, 400)
        self.assertEqual({s.state for s in proxy.pool.statuses()}, {State.READY})

    def test_serverError(self):
        proxy = MemoryProxy(self)
        proxy.fake.answerNext(502, {"error": {"code": 502, "message": "model down"}}, times=None)
        self.assertPassedThrough(proxy, 502)

    def test_sharedCapacity(self):
        """
        A busy model is busy for every key: no retry, no penalty.
        """
        proxy = MemoryProxy(self)
        body, headers = rateLimit("shared")
        proxy.fake.answerNext(429, body, headers, times=None)
        response = self.assertPassedThrough(proxy, 429)
        [name] = response.headers.getRawHeaders("X-Token-Name")
        states = {s.name: s for s in proxy.pool.statuses()}
        self.assertEqual(states[name].state, State.READY)
        self.assertEqual(states[name].rateLimitedToday, 1)

    def test_moderation(self):
        """
        A 403 for flagged input is the input's fault, not the key's.
        """
        proxy = MemoryProxy(self)
        proxy.fake.answerNext(
            403,
            {"error": {"code": 403, "message": "Input flagged", "metadata": {"reasons": ["x"], "flagged_input": "..."}}},
            times=None,
        )
        self.assertPassedThrough(proxy, 403)
        self.assertEqual({s.state for s in proxy.pool.statuses()}, {State.READY})


class ExhaustionTests(SynchronousTestCase):
    def test_everyKeyExhausted(self):
        """
        When no key is left for a free-model request, hermux answers 429
        itself, with Retry-After until the first key is usable for one (here
        the next midnight UTC), and asks the upstream nothing more.
        """
        proxy = MemoryProxy(self)
        body, headers = rateLimit("day")
        proxy.fake.answerNext(429, body, headers, times=None)
        response, raw = proxy.chatted(model=FREE_MODEL)
        answer = json.loads(raw)
        self.assertEqual(response.code, 429)
        self.assertEqual(answer["error"]["code"], 429)
        self.assertEqual(response.headers.getRawHeaders("X-Hermux-Error"), ["429"])
        untilMidnight = nextMidnight(NOW) - NOW
        self.assertEqual(
            response.headers.getRawHeaders("Retry-After"), [str(math.ceil(untilMidnight))]
        )
        self.assertEqual(attemptsBy(proxy), {"alpha": 1, "beta": 1, "gamma": 1})
        response, _ = proxy.chatted(model=FREE_MODEL)
        self.assertEqual(response.code, 429)
        self.assertEqual(len(proxy.fake.received), 3)

    def test_earliestKeyDecides(self):
        proxy = MemoryProxy(self)
        day, _ = rateLimit("day")
        minute, headers = rateLimit("minute", resetIn=42, inHeader=True)
        proxy.fake.answerNext(429, day, key=ALPHA.token, times=None)
        proxy.fake.answerNext(429, day, key=BETA.token, times=None)
        proxy.fake.answerNext(429, minute, headers, key=GAMMA.token, times=None)
        response, _ = proxy.chatted(model=FREE_MODEL)
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders("Retry-After"), ["42"])

    def test_retryAfterCountsDown(self):
        """
        Retry-After is the seconds left until the first key is usable,
        rounded up to a whole second; at that moment the key serves.
        """
        proxy = MemoryProxy(self)
        minute, headers = rateLimit("minute", resetIn=42, inHeader=True)
        proxy.fake.answerNext(429, minute, headers, times=3)
        self.assertEqual(proxy.chatted()[0].code, 429)
        for passed, retryAfter in ((10.5, "32"), (31, "1"), (0.25, "1")):
            proxy.advance(passed)
            response, _ = proxy.chatted()
            self.assertEqual(response.headers.getRawHeaders("Retry-After"), [retryAfter])
        proxy.advance(0.25)
        self.assertEqual(proxy.chatted()[0].code, 200)
        self.assertEqual(len(proxy.fake.received), 4)

    def test_everyKeyRefused(self):
        """
        When every key is refused for good, waiting will not help: 503.  (One
        request disables at most two keys and gets the second 401; the next
        request finds the last key refused too.)
        """
        proxy = MemoryProxy(self)
        proxy.fake.answerNext(401, {"error": {"code": 401, "message": "User not found."}}, times=None)
        self.assertEqual(proxy.chatted()[0].code, 401)
        response, raw = proxy.chatted()
        answer = json.loads(raw)
        self.assertEqual(response.code, 503)
        self.assertIn("tokens.csv", answer["error"]["message"])
        self.assertIsNone(response.headers.getRawHeaders("Retry-After"))


class KeysResourceTests(SynchronousTestCase):
    def test_needsAToken(self):
        proxy = MemoryProxy(self)
        response, _ = proxy.respond("GET", "/hermux/keys", token=None)
        self.assertEqual(response.code, 401)

    def test_describesEveryKey(self):
        """
        /hermux/keys shows each key's name, state and counts, and never a
        key's token.
        """
        proxy = MemoryProxy(self)
        proxy.fake.answerNext(401, {"error": {"code": 401, "message": "User not found."}}, key=ALPHA.token, times=None)
        for _ in range(4):
            proxy.chatted()
        response, raw = proxy.respond("GET", "/hermux/keys")
        keys = {key["name"]: key for key in json.loads(raw)["keys"]}
        self.assertEqual(set(keys), {"alpha", "beta", "gamma"})
        self.assertEqual(keys["alpha"]["state"], "disabled")
        self.assertIsNone(keys["alpha"]["usable_again_at"])
        self.assertIn("401", keys["alpha"]["reason"])
        self.assertEqual(keys["beta"]["state"], "ready")
        self.assertEqual(
            sum(k["requests_today"] for k in keys.values()), len(proxy.fake.received)
        )
        self.assertEqual(
            set(keys["beta"]),
            {"name", "state", "requests_today", "daily_limit", "rate_limited_today",
             "errors_today", "usable_again_at", "reason", "free_requests_today",
             "cost_today", "daily_cost", "free_requests_reason", "paid_requests_reason"},
        )
        for key in KEYS:
            self.assertNotIn(key.token.encode(), raw)

    def test_guessingIsThrottledHereToo(self):
        """
        Failed access tokens sent to hermux's own pages count like those sent
        to /api, and throttle the address everywhere.
        """
        proxy = MemoryProxy(self, authFailures=3)
        for path in ("/hermux/keys", "/hermux/metrics", "/hermux/keys"):
            response, _ = proxy.respond("GET", path, token="guess")
            self.assertEqual(response.code, 401)
        for path in ("/hermux/keys", "/hermux/metrics", "/api/v1/models"):
            response, _ = proxy.respond("GET", path)
            self.assertEqual(response.code, 429, path)
            self.assertTrue(response.headers.getRawHeaders("Retry-After"))
        self.assertEqual(proxy.fake.received, [])


class LedgerContinuityTests(TestCase):
    async def test_countsSurviveARestart(self):
        """
        Counts written by one hermux are where the next one starts from.
        The ledger writes with a thread of its own, whose answers come
        through the real reactor.
        """
        path = os.path.abspath(self.mktemp())
        ledger = SQLiteLedger(path)
        ledger.startService()
        proxy = MemoryProxy(self, ledger=ledger)
        for _ in range(5):
            proxy.chatted()
        before = proxy.pool.requestCounts()
        await ledger.stopService()
        restarted = KeyPool(KEYS, ledger=SQLiteLedger(path), reactor=proxy.clock)
        self.assertEqual(restarted.requestCounts(), before)
        self.assertEqual(sum(before.values()), 5)
        from hermux.access import clientLabel

        usage = SQLiteLedger(path).clientUsage(dayOf(NOW))
        self.assertEqual(list(usage), [clientLabel(ACCESS_TOKEN)])
        self.assertEqual(usage[clientLabel(ACCESS_TOKEN)].requests, 5)


class ProbeTests(SynchronousTestCase):
    def test_probeSeedsThePool(self):
        """
        --probe-keys takes each key's used requests and daily limit from
        GET /api/v1/key, and disables keys the upstream refuses.
        """
        proxy = MemoryProxy(self, probeKeys=True)
        proxy.fake.keys = frozenset({ALPHA.token, BETA.token})
        proxy.fake.usedToday[ALPHA.token] = 12
        proxy.fake.dailyLimit = 1000
        probe = dict(proxy.components.services)["probe"]
        self.assertIsInstance(probe, KeyProbe)
        probe.startService()
        proxy.resultOf(probe.done)
        states = {s.name: s for s in proxy.pool.statuses()}
        self.assertEqual((states["alpha"].requestsToday, states["alpha"].dailyLimit), (12, 1000))
        self.assertEqual((states["beta"].requestsToday, states["beta"].dailyLimit), (0, 1000))
        self.assertEqual(states["gamma"].state, State.DISABLED)
        self.assertEqual([r.uri for r in proxy.fake.received], [b"/api/v1/key"] * 3)
