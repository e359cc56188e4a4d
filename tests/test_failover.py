"""
Quota-aware forwarding end to end: what hermux does when OpenRouter says a
key cannot serve.
"""

from __future__ import annotations

import json
import math
import os

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from hermux.keypool import KeyPool, State, dayOf, nextMidnight
from hermux.ledger import SQLiteLedger
from hermux.probe import KeyProbe
from tests.harness import ACCESS_TOKEN, CHAT, KEYS, Proxy, chatBody

ALPHA, BETA, GAMMA = KEYS


def rateLimit(kind: str, resetIn: float | None = None, inHeader: bool = False):
    """
    OpenRouter's 429 body (and headers) for a cap of C{kind}.
    """
    metadata = {}
    headers = {}
    if resetIn is not None:
        reset = str(int((reactor.seconds() + resetIn) * 1000))
        if inHeader:
            headers["X-RateLimit-Reset"] = reset
        else:
            metadata["headers"] = {
                "X-RateLimit-Limit": "50",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": reset,
            }
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


class FailoverTests(TestCase):
    """
    A key-attributable refusal before any byte reached the client is
    retried on another key; the client sees only the success.
    """

    async def assertServedBy(self, proxy, name, stream=False):
        response = await proxy.chat(stream=stream)
        body = await response.content()
        self.assertEqual(response.code, 200, body)
        self.assertEqual(response.headers.getRawHeaders("X-Token-Name"), [name])
        return body

    async def test_perDayCapMovesOn(self):
        """
        Keys that answer "free-models-per-day" are exhausted and skipped;
        each is tried at most once.
        """
        proxy = Proxy(self)
        body, headers = rateLimit("day", resetIn=3 * 3600)
        for key in (ALPHA, BETA):
            proxy.fake.answerNext(429, body, headers, key=key.token, times=None)
        for _ in range(4):
            await self.assertServedBy(proxy, GAMMA.name)
        self.assertEqual(attemptsBy(proxy), {"alpha": 1, "beta": 1, "gamma": 4})
        states = {s.name: s for s in proxy.pool.statuses()}
        self.assertEqual(states["alpha"].state, State.EXHAUSTED)
        self.assertLessEqual(abs(states["alpha"].usableAt - reactor.seconds() - 3 * 3600), 60)

    async def test_perMinuteCapCools(self):
        proxy = Proxy(self)
        body, headers = rateLimit("minute", resetIn=30, inHeader=True)
        proxy.fake.answerNext(429, body, headers, key=ALPHA.token, times=None)
        proxy.fake.answerNext(429, body, headers, key=BETA.token, times=None)
        await self.assertServedBy(proxy, GAMMA.name)
        states = {s.name: s.state for s in proxy.pool.statuses()}
        self.assertEqual(states["gamma"], State.READY)
        for name in (n for n, a in attemptsBy(proxy).items() if a and n != "gamma"):
            self.assertEqual(states[name], State.COOLING)

    async def test_invalidKeysAreDisabled(self):
        """
        401 and 403 disable a key until the configuration is reloaded; 402
        for the rest of the UTC day.
        """
        proxy = Proxy(self)
        proxy.fake.answerNext(401, {"error": {"code": 401, "message": "User not found."}}, key=ALPHA.token, times=None)
        proxy.fake.answerNext(402, {"error": {"code": 402, "message": "Insufficient credits"}}, key=BETA.token, times=None)
        for _ in range(3):
            await self.assertServedBy(proxy, GAMMA.name)
        states = {s.name: s for s in proxy.pool.statuses()}
        self.assertEqual(states["alpha"].state, State.DISABLED)
        self.assertIsNone(states["alpha"].usableAt)
        self.assertEqual(states["beta"].state, State.DISABLED)
        self.assertEqual(states["beta"].usableAt, nextMidnight(reactor.seconds()))

    async def test_forbiddenKeyMovesOn(self):
        proxy = Proxy(self)
        for key in (ALPHA, BETA):
            proxy.fake.answerNext(403, {"error": {"code": 403, "message": "Key disabled"}}, key=key.token, times=None)
        await self.assertServedBy(proxy, GAMMA.name)

    async def test_streamingRequestMovesOn(self):
        proxy = Proxy(self)
        body, headers = rateLimit("minute")
        for key in (ALPHA, BETA):
            proxy.fake.answerNext(429, body, headers, key=key.token, times=None)
        stream = await self.assertServedBy(proxy, GAMMA.name, stream=True)
        self.assertTrue(stream.endswith(b"data: [DONE]\n\n"))

    async def test_retrySendsTheSameRequest(self):
        """
        A retried request carries the same method, target, headers and body,
        with only the key changed.
        """
        proxy = Proxy(self)
        body, headers = rateLimit("minute")
        for key in (ALPHA, BETA):
            proxy.fake.answerNext(429, body, headers, key=key.token, times=None)
        response = await proxy.request(
            "POST",
            CHAT + "?trace=1",
            headers={"Content-Type": "application/json", "X-Title": "retry test"},
            data=chatBody(temperature=0.5),
        )
        await response.content()
        attempts = proxy.fake.received
        self.assertGreaterEqual(len(attempts), 1)
        for attempt in attempts:
            self.assertEqual(attempt.method, b"POST")
            self.assertEqual(attempt.uri, b"/api/v1/chat/completions?trace=1")
            self.assertEqual(attempt.body, chatBody(temperature=0.5))
            self.assertEqual(attempt.headers.getRawHeaders(b"X-Title"), [b"retry test"])
        self.assertEqual(len({a.key for a in attempts}), len(attempts))


class NoRetryTests(TestCase):
    """
    Answers that another key would not change go to the client as they are.
    """

    async def assertPassedThrough(self, proxy, status):
        response = await proxy.chat()
        body = json.loads(await response.content())
        self.assertEqual(response.code, status)
        self.assertEqual(body["error"]["code"], status)
        self.assertEqual(len(proxy.fake.received), 1)
        self.assertIsNone(response.headers.getRawHeaders("X-Hermux-Error"))
        return response

    async def test_badRequest(self):
        """
        A 400 is the request's fault: retrying would burn every account's
        quota.
        """
        proxy = Proxy(self)
        proxy.fake.answerNext(400, {"error": {"code": 400, "message": "bad"}}, times=None)
        await self.assertPassedThrough(proxy, 400)
        self.assertEqual({s.state for s in proxy.pool.statuses()}, {State.READY})

    async def test_serverError(self):
        proxy = Proxy(self)
        proxy.fake.answerNext(502, {"error": {"code": 502, "message": "model down"}}, times=None)
        await self.assertPassedThrough(proxy, 502)

    async def test_sharedCapacity(self):
        """
        A busy model is busy for every key: no retry, no penalty.
        """
        proxy = Proxy(self)
        body, headers = rateLimit("shared")
        proxy.fake.answerNext(429, body, headers, times=None)
        response = await self.assertPassedThrough(proxy, 429)
        [name] = response.headers.getRawHeaders("X-Token-Name")
        states = {s.name: s for s in proxy.pool.statuses()}
        self.assertEqual(states[name].state, State.READY)
        self.assertEqual(states[name].rateLimitedToday, 1)

    async def test_moderation(self):
        """
        A 403 for flagged input is the input's fault, not the key's.
        """
        proxy = Proxy(self)
        proxy.fake.answerNext(
            403,
            {"error": {"code": 403, "message": "Input flagged", "metadata": {"reasons": ["x"], "flagged_input": "..."}}},
            times=None,
        )
        await self.assertPassedThrough(proxy, 403)
        self.assertEqual({s.state for s in proxy.pool.statuses()}, {State.READY})


class ExhaustionTests(TestCase):
    async def test_everyKeyExhausted(self):
        """
        When no key is left, hermux answers 429 itself, with Retry-After
        until the first key is usable, and asks the upstream nothing more.
        """
        proxy = Proxy(self)
        body, headers = rateLimit("day")
        proxy.fake.answerNext(429, body, headers, times=None)
        response = await proxy.chat()
        answer = json.loads(await response.content())
        self.assertEqual(response.code, 429)
        self.assertEqual(answer["error"]["code"], 429)
        self.assertEqual(response.headers.getRawHeaders("X-Hermux-Error"), ["429"])
        untilMidnight = nextMidnight(reactor.seconds()) - reactor.seconds()
        [retryAfter] = response.headers.getRawHeaders("Retry-After")
        self.assertLessEqual(abs(int(retryAfter) - math.ceil(untilMidnight)), 2)
        self.assertEqual(attemptsBy(proxy), {"alpha": 1, "beta": 1, "gamma": 1})
        response = await proxy.chat()
        await response.content()
        self.assertEqual(response.code, 429)
        self.assertEqual(len(proxy.fake.received), 3)

    async def test_earliestKeyDecides(self):
        proxy = Proxy(self)
        day, _ = rateLimit("day")
        minute, headers = rateLimit("minute", resetIn=42, inHeader=True)
        proxy.fake.answerNext(429, day, key=ALPHA.token, times=None)
        proxy.fake.answerNext(429, day, key=BETA.token, times=None)
        proxy.fake.answerNext(429, minute, headers, key=GAMMA.token, times=None)
        response = await proxy.chat()
        await response.content()
        self.assertEqual(response.code, 429)
        self.assertLessEqual(abs(int(response.headers.getRawHeaders("Retry-After")[0]) - 42), 2)

    async def test_everyKeyRefused(self):
        """
        When every key is refused for good, waiting will not help: 503.
        """
        proxy = Proxy(self)
        proxy.fake.answerNext(401, {"error": {"code": 401, "message": "User not found."}}, times=None)
        response = await proxy.chat()
        answer = json.loads(await response.content())
        self.assertEqual(response.code, 503)
        self.assertIn("tokens.csv", answer["error"]["message"])
        self.assertIsNone(response.headers.getRawHeaders("Retry-After"))


class KeysResourceTests(TestCase):
    async def test_needsAToken(self):
        proxy = Proxy(self)
        response = await proxy.request("GET", "/hermux/keys", token=None)
        self.assertEqual(response.code, 401)
        await response.content()

    async def test_describesEveryKey(self):
        """
        /hermux/keys shows each key's name, state and counts, and never a
        key's token.
        """
        proxy = Proxy(self)
        proxy.fake.answerNext(401, {"error": {"code": 401, "message": "User not found."}}, key=ALPHA.token, times=None)
        for _ in range(4):
            await (await proxy.chat()).content()
        response = await proxy.request("GET", "/hermux/keys")
        raw = await response.content()
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
             "errors_today", "usable_again_at", "reason"},
        )
        for key in KEYS:
            self.assertNotIn(key.token.encode(), raw)


    async def test_guessingIsThrottledHereToo(self):
        """
        Failed access tokens sent to hermux's own pages count like those sent
        to /api, and throttle the address everywhere.
        """
        proxy = Proxy(self, authFailures=3)
        for path in ("/hermux/keys", "/hermux/metrics", "/hermux/keys"):
            response = await proxy.request("GET", path, token="guess")
            self.assertEqual(response.code, 401)
            await response.content()
        for path in ("/hermux/keys", "/hermux/metrics", "/api/v1/models"):
            response = await proxy.request("GET", path)
            self.assertEqual(response.code, 429, path)
            self.assertTrue(response.headers.getRawHeaders("Retry-After"))
            await response.content()
        self.assertEqual(proxy.fake.received, [])


class LedgerContinuityTests(TestCase):
    async def test_countsSurviveARestart(self):
        """
        Counts written by one hermux are where the next one starts from.
        """
        path = os.path.abspath(self.mktemp())
        ledger = SQLiteLedger(path)
        ledger.startService()
        proxy = Proxy(self, ledger=ledger)
        for _ in range(5):
            await (await proxy.chat()).content()
        before = proxy.pool.requestCounts()
        await ledger.stopService()
        restarted = KeyPool(KEYS, ledger=SQLiteLedger(path))
        self.assertEqual(restarted.requestCounts(), before)
        self.assertEqual(sum(before.values()), 5)
        from hermux.access import clientLabel

        self.assertEqual(
            SQLiteLedger(path).clientUsage(dayOf(reactor.seconds())),
            {clientLabel(ACCESS_TOKEN): 5},
        )


class ProbeTests(TestCase):
    async def test_probeSeedsThePool(self):
        """
        --probe-keys takes each key's used requests and daily limit from
        GET /api/v1/key, and disables keys the upstream refuses.
        """
        proxy = Proxy(self)
        proxy.fake.keys = frozenset({ALPHA.token, BETA.token})
        proxy.fake.usedToday[ALPHA.token] = 12
        proxy.fake.dailyLimit = 1000
        probe = KeyProbe(proxy.pool, proxy.upstream)
        probe.startService()
        await probe.done
        states = {s.name: s for s in proxy.pool.statuses()}
        self.assertEqual((states["alpha"].requestsToday, states["alpha"].dailyLimit), (12, 1000))
        self.assertEqual((states["beta"].requestsToday, states["beta"].dailyLimit), (0, 1000))
        self.assertEqual(states["gamma"].state, State.DISABLED)
        self.assertEqual([r.uri for r in proxy.fake.received], [b"/api/v1/key"] * 3)
