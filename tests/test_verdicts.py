"""
Every row of README's key-state table, as hermux is wired (in memory, on a
clock; see L{tests.memory}), with the answers L{hermux.testing.FakeOpenRouter}
gives as OpenRouter words them; the breaker that stops one request from
taking more than two keys out of service for the same kind of answer; and
L{hermux.quota.classify} on the edges of OpenRouter's error shape.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from hermux.keypool import ERROR, Kind, State, nextMidnight
from hermux.quota import EXHAUSTED_LONGEST, classify
from tests.harness import KEYS, Proxy
from tests.memory import NOW, MemoryProxy

ALPHA, BETA, GAMMA = KEYS
HOUR = 3600.0
FREE_MODEL = "test/model:free"
PAID_MODEL = "test/model"


def attempts(proxy) -> int:
    return len(proxy.fake.received)


def states(proxy) -> dict:
    return {status.name: status for status in proxy.pool.statuses()}


def retries(proxy, reason: str) -> float:
    value = proxy.metrics.registry.get_sample_value("hermux_retries_total", {"reason": reason})
    return value or 0.0


def keysPage(proxy) -> dict:
    _, raw = proxy.respond("GET", "/hermux/keys")
    return {key["name"]: key for key in json.loads(raw)["keys"]}


def allKeys(script, *args, **kwargs):
    """
    Script every key's answers with C{script} (a FakeOpenRouter method).
    """
    for key in KEYS:
        script(*args, key=key.token, times=None, **kwargs)


class PenaltyTests(SynchronousTestCase):
    """
    Answers that are the key's: the key is put out of service until the
    answer says, and the request goes on to another key.
    """

    def assertMovesOn(self, proxy, penalized: str, state: State, usableAt, reason: str):
        """
        Only C{penalized} is scripted: the request goes on to another key,
        and C{penalized} is in C{state} until C{usableAt}, with a reason
        that says C{reason}.
        """
        response, body = proxy.chatted()
        self.assertEqual(response.code, 200, body)
        self.assertNotEqual(response.headers.getRawHeaders("X-Token-Name"), [penalized])
        status = states(proxy)[penalized]
        self.assertEqual(status.state, state)
        self.assertEqual(status.usableAt, usableAt)
        self.assertIn(reason, keysPage(proxy)[penalized]["reason"])
        return status

    def assertMovesOnFor(self, proxy, penalized: str, kind: str, usableAt, reason: str):
        """
        Like L{assertMovesOn} for a verdict that keeps C{penalized} from
        C{kind} requests only (C{"free"} or C{"paid"}): the request (of that
        kind) goes on to another key; C{penalized} stays ready, serves the
        other kind, and serves this kind again at C{usableAt}.
        """
        free, other = (FREE_MODEL, PAID_MODEL) if kind == "free" else (PAID_MODEL, FREE_MODEL)
        response, body = proxy.chatted(model=free)
        self.assertEqual(response.code, 200, body)
        self.assertNotEqual(response.headers.getRawHeaders("X-Token-Name"), [penalized])
        self.assertEqual(states(proxy)[penalized].state, State.READY)
        self.assertIn(reason, keysPage(proxy)[penalized][f"{kind}_requests_reason"])
        response, body = proxy.chatted(model=other)
        self.assertEqual(response.headers.getRawHeaders("X-Token-Name"), [penalized], body)
        reasonOf = "freeReason" if kind == "free" else "paidReason"
        proxy.advance(usableAt - proxy.clock.seconds() - 1)
        self.assertIsNotNone(getattr(states(proxy)[penalized], reasonOf))
        proxy.advance(1)
        self.assertIsNone(getattr(states(proxy)[penalized], reasonOf))

    def scripted(self, script: str, *args, times=None, **kwargs):
        """
        A proxy whose fake answers ALPHA with its method C{script} (C{times}
        times; L{None}: always); ALPHA is tried first (the others start with
        more requests today).
        """
        proxy = MemoryProxy(self)
        proxy.pool.seed(BETA.name, used=5)
        proxy.pool.seed(GAMMA.name, used=5)
        getattr(proxy.fake, script)(*args, key=ALPHA.token, times=times, **kwargs)
        return proxy

    def test_platformPerDay(self):
        """
        429 free-models-per-day with X-RateLimit-*: kept from free-model
        requests until the reset; paid ones still go to the key.
        """
        proxy = self.scripted("platformLimitNext", perDay=True, resetIn=3 * HOUR, times=1)
        self.assertMovesOnFor(proxy, ALPHA.name, "free", NOW + 3 * HOUR, "429")

    def test_platformPerDayOnlyInHeaders(self):
        """
        X-RateLimit-* as response headers only is OpenRouter's limit too.
        """
        proxy = self.scripted(
            "platformLimitNext", perDay=True, resetIn=HOUR, inBody=False, times=1
        )
        self.assertMovesOnFor(proxy, ALPHA.name, "free", NOW + HOUR, "429")

    def test_platformPerMinute(self):
        """
        429 free-models-per-min with X-RateLimit-*: cooling until the reset.
        """
        proxy = self.scripted("platformLimitNext", perDay=False, resetIn=25)
        self.assertMovesOn(proxy, ALPHA.name, State.COOLING, NOW + 25, "per-minute")
        proxy.advance(25)
        self.assertEqual(states(proxy)[ALPHA.name].state, State.READY)

    def test_inFlightBudget(self):
        """
        402 openrouter_in_flight_budget: cooling until Retry-After.
        """
        proxy = self.scripted(
            "paymentRequiredNext", "in_flight_budget", retryAfter=4
        )
        self.assertMovesOn(proxy, ALPHA.name, State.COOLING, NOW + 4, "in-flight")

    def test_inFlightBudgetWithoutRetryAfter(self):
        """
        Without Retry-After, an in-flight budget cools the key for 10 s.
        """
        proxy = self.scripted("paymentRequiredNext", "in_flight_budget")
        self.assertMovesOn(proxy, ALPHA.name, State.COOLING, NOW + 10, "in-flight")

    def test_outOfCredits(self):
        """
        402 out of credits on a paid request: kept from paid requests until
        the next 00:00 UTC; free-model ones still go to the key.
        """
        proxy = self.scripted("paymentRequiredNext", "credits", times=1)
        self.assertMovesOnFor(proxy, ALPHA.name, "paid", nextMidnight(NOW), "402")

    def test_outOfCreditsOnAFreeRequest(self):
        """
        A 402 on a free-model request, which only a negative balance gives,
        disables the key for everything until the next 00:00 UTC.
        """
        proxy = self.scripted("paymentRequiredNext", "credits")
        response, body = proxy.chatted(model=FREE_MODEL)
        self.assertEqual(response.code, 200, body)
        self.assertEqual(states(proxy)[ALPHA.name].state, State.DISABLED)
        self.assertEqual(states(proxy)[ALPHA.name].usableAt, nextMidnight(NOW))

    def test_negativeBalance(self):
        """
        A 402 that says the balance is negative disables the key for
        everything, even on a paid request.
        """
        for kind in ("negative_balance", "negative"):
            proxy = self.scripted("paymentRequiredNext", kind)
            self.assertMovesOn(proxy, ALPHA.name, State.DISABLED, nextMidnight(NOW), "402")

    def test_keyLimits(self):
        """
        403 for the key's credit limit, its guardrail or its workspace
        budget: exhausted until C{resets_at}, ISO 8601 or epoch seconds.
        """
        for kind in ("key_limit", "guardrail_budget", "workspace_budget"):
            for epoch in (False, True):
                proxy = self.scripted(
                    "forbiddenNext", kind, resetsIn=2 * HOUR, epoch=epoch
                )
                resets = NOW + 2 * HOUR
                self.assertMovesOn(
                    proxy, ALPHA.name, State.EXHAUSTED, int(resets) if epoch else resets,
                    "openrouter_" + kind,
                )

    def test_keyLimitBounded(self):
        """
        A C{resets_at} a month away exhausts the key for at most 25 hours.
        """
        proxy = self.scripted("forbiddenNext", "key_limit", resetsIn=30 * 24 * HOUR)
        self.assertMovesOn(proxy, ALPHA.name, State.EXHAUSTED, NOW + EXHAUSTED_LONGEST, "403")

    def test_unauthorized(self):
        """
        401 in OpenRouter's shape: disabled until a probe or a reload.
        """
        proxy = MemoryProxy(self)
        proxy.fake.keys = frozenset({BETA.token, GAMMA.token})
        proxy.pool.seed(BETA.name, used=5)
        proxy.pool.seed(GAMMA.name, used=5)
        self.assertMovesOn(proxy, ALPHA.name, State.DISABLED, None, "401")


class PassThroughTests(SynchronousTestCase):
    """
    Answers that are not the key's: passed to the client as they are, after
    one upstream request, and every key stays ready.
    """

    def assertPassedThrough(self, proxy, status, contentType="application/json"):
        response, body = proxy.chatted()
        self.assertEqual(response.code, status, body)
        self.assertEqual(attempts(proxy), 1)
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), [contentType])
        self.assertIsNone(response.headers.getRawHeaders("X-Hermux-Error"))
        self.assertEqual({s.state for s in proxy.pool.statuses()}, {State.READY})
        return response, body

    def test_providerLimitWithRetryAfter(self):
        """
        A 429 without X-RateLimit-* is the provider's: passed through with
        its Retry-After, counted as rate limited, no penalty.
        """
        proxy = MemoryProxy(self)
        allKeys(proxy.fake.providerLimitNext, retryAfter=17)
        response, body = self.assertPassedThrough(proxy, 429)
        self.assertEqual(response.headers.getRawHeaders("Retry-After"), ["17"])
        self.assertEqual(json.loads(body)["error"]["metadata"]["provider_name"], "Chutes")
        [name] = response.headers.getRawHeaders("X-Token-Name")
        self.assertEqual(states(proxy)[name].rateLimitedToday, 1)

    def test_providerLimitWithoutRetryAfter(self):
        proxy = MemoryProxy(self)
        allKeys(proxy.fake.providerLimitNext)
        response, _ = self.assertPassedThrough(proxy, 429)
        self.assertIsNone(response.headers.getRawHeaders("Retry-After"))

    def test_permissionDenied(self):
        """
        403 permission_denied without a key limit: the request's, not the key's.
        """
        proxy = MemoryProxy(self)
        allKeys(proxy.fake.forbiddenNext, "permission_denied")
        self.assertPassedThrough(proxy, 403)

    def test_moderation(self):
        proxy = MemoryProxy(self)
        allKeys(proxy.fake.forbiddenNext, "moderation")
        self.assertPassedThrough(proxy, 403)

    def test_htmlForbidden(self):
        """
        A 403 page from a CDN or a firewall is passed through as it is.
        """
        proxy = MemoryProxy(self)
        allKeys(proxy.fake.htmlForbiddenNext)
        _, body = self.assertPassedThrough(proxy, 403, "text/html; charset=UTF-8")
        self.assertIn(b"Cloudflare", body)

    def test_otherShapes(self):
        """
        401, 402, 403 and 429 in a shape that is not OpenRouter's (another
        JSON, a code that is not the status, empty) change no key.
        """
        for status in (401, 402, 403, 429):
            for body in (
                {"message": "Payment Required"},
                {"error": {"code": 500, "message": "x"}},
                {"error": {"code": str(status), "message": "x"}},
                b"",
            ):
                proxy = MemoryProxy(self)
                proxy.fake.answerNext(status, body, times=None)
                self.assertPassedThrough(proxy, status)


class TooCostlyTests(SynchronousTestCase):
    def test_triedOnOneOtherKey(self):
        """
        A 402 saying this request's estimated cost is more than the whole
        budget penalizes no key; one other key tries (its account may have a
        larger budget), then the client gets the answer.
        """
        proxy = MemoryProxy(self)
        allKeys(proxy.fake.paymentRequiredNext, "request_too_costly")
        response, body = proxy.chatted()
        self.assertEqual(response.code, 402)
        self.assertEqual(json.loads(body)["error"]["metadata"]["reason"], "weight_exceeds_budget")
        self.assertEqual(attempts(proxy), 2)
        self.assertEqual({s.state for s in proxy.pool.statuses()}, {State.READY})
        self.assertEqual(retries(proxy, "over_budget"), 1)
        self.assertEqual(retries(proxy, "stopped_over_budget"), 1)

    def test_otherKeyServes(self):
        proxy = MemoryProxy(self)
        proxy.pool.seed(BETA.name, used=5)
        proxy.pool.seed(GAMMA.name, used=5)
        proxy.fake.paymentRequiredNext("request_too_costly", key=ALPHA.token, times=None)
        response, _ = proxy.chatted()
        self.assertEqual(response.code, 200)
        self.assertEqual(states(proxy)[ALPHA.name].state, State.READY)


class BreakerTests(SynchronousTestCase):
    """
    One request penalizes at most two keys for the same kind of answer
    (other than a 429), then gives the client the last answer.
    """

    def assertBroken(self, proxy, status, usable=lambda s: s.state is State.READY):
        with capturedLogs() as events:
            response, body = proxy.chatted()
        self.assertEqual(response.code, status, body)
        self.assertEqual(json.loads(body)["error"]["code"], status)
        self.assertEqual(attempts(proxy), 2)
        served = response.headers.getRawHeaders("X-Token-Name")
        self.assertEqual(served, [_nameOf(proxy.fake.received[-1].key)])
        self.assertEqual(retries(proxy, "stopped_breaker"), 1)
        lines = [formatEvent(event) for event in events]
        self.assertTrue(any("not trying another" in line and "same answer" in line for line in lines), lines)
        left = [s for s in proxy.pool.statuses() if usable(s)]
        self.assertEqual(len(left), 1)
        return left

    def test_outOfCredits(self):
        proxy = MemoryProxy(self)
        allKeys(proxy.fake.paymentRequiredNext, "credits")
        self.assertBroken(proxy, 402, usable=lambda s: s.paidReason is None)

    def test_unauthorized(self):
        proxy = MemoryProxy(self)
        proxy.fake.keys = frozenset()
        self.assertBroken(proxy, 401)

    def test_keyLimit(self):
        proxy = MemoryProxy(self)
        allKeys(proxy.fake.forbiddenNext, "key_limit")
        self.assertBroken(proxy, 403)

    def test_inFlightBudget(self):
        proxy = MemoryProxy(self)
        allKeys(proxy.fake.paymentRequiredNext, "in_flight_budget", retryAfter=3)
        self.assertBroken(proxy, 402)

    def test_differentKindsGoOn(self):
        """
        Answers of different kinds each count apart: three keys, three kinds,
        and hermux answers itself once none is left.
        """
        proxy = MemoryProxy(self)
        proxy.fake.paymentRequiredNext("credits", key=ALPHA.token, times=None)
        proxy.fake.forbiddenNext("key_limit", key=BETA.token, times=None)
        proxy.fake.paymentRequiredNext("in_flight_budget", retryAfter=3, key=GAMMA.token, times=None)
        response, _ = proxy.chatted()
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders("X-Hermux-Error"), ["429"])
        self.assertEqual(attempts(proxy), 3)
        self.assertEqual(retries(proxy, "stopped_breaker"), 0)

    def test_platformLimitsAreExempt(self):
        """
        OpenRouter's own 429s are each about one key's account: every key
        may be tried.
        """
        proxy = MemoryProxy(self)
        allKeys(proxy.fake.platformLimitNext, perDay=True)
        response, _ = proxy.chatted(model=FREE_MODEL)
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders("X-Hermux-Error"), ["429"])
        self.assertEqual(attempts(proxy), 3)
        self.assertTrue(all(s.freeReason for s in proxy.pool.statuses()))


def _nameOf(token: str) -> str:
    return {key.token: key.name for key in KEYS}[token]


def _body(status, metadata=None, message="x", code=None) -> bytes:
    error = {"code": status if code is None else code, "message": message}
    if metadata is not None:
        error["metadata"] = metadata
    return json.dumps({"error": error}).encode()


class ClassifyTests(SynchronousTestCase):
    """
    L{classify} on what decides each verdict.
    """

    def test_errorTypeMustMatch(self):
        """
        An C{error_type} that is not the status's own says nothing of the key.
        """
        for status, wrong in ((401, "rate_limit_exceeded"), (402, "authentication"),
                              (403, "payment_required")):
            self.assertEqual(classify(status, Headers(), _body(status, {"error_type": wrong}), NOW), ERROR)
        platform = Headers({b"X-RateLimit-Limit": [b"20"]})
        verdict = classify(429, platform, _body(429, {"error_type": "permission_denied"}), NOW)
        self.assertEqual(verdict, ERROR)

    def test_typedUnauthorized(self):
        verdict = classify(401, Headers(), _body(401, {"error_type": "authentication"}), NOW)
        self.assertEqual((verdict.kind, verdict.until), (Kind.DISABLED, None))

    def test_resetsAtForms(self):
        """
        C{resets_at} as ISO 8601 with or without a zone, epoch seconds or
        milliseconds (number or text); garbage or the past: next midnight.
        """
        resets = NOW + 5 * HOUR
        iso = datetime.fromtimestamp(resets, timezone.utc)
        for value, expected in (
            (iso.isoformat(), resets),
            (iso.isoformat().replace("+00:00", "Z"), resets),
            (iso.replace(tzinfo=None).isoformat(), resets),
            (resets, resets),
            (int(resets * 1000), int(resets * 1000) / 1000),
            (str(int(resets)), int(resets)),
            ("soon", nextMidnight(NOW)),
            (True, nextMidnight(NOW)),
            (None, nextMidnight(NOW)),
            (NOW - 10, nextMidnight(NOW)),
            (float("nan"), nextMidnight(NOW)),
            ("9" * 400, nextMidnight(NOW)),
        ):
            metadata = {"limit_source": "openrouter_key_limit"}
            if value is not None:
                metadata["resets_at"] = value
            verdict = classify(403, Headers(), _body(403, metadata), NOW)
            self.assertEqual(verdict.kind, Kind.EXHAUSTED, value)
            self.assertEqual(verdict.until, expected, value)

    def test_tooCostlyIsConservative(self):
        """
        Only C{openrouter_credits} with C{reason} C{weight_exceeds_budget}
        (as OpenRouter documents it), "retrying will not help", or an
        estimated cost above the budget, is about the request; otherwise
        the account is out of credits.
        """
        credits = {"limit_source": "openrouter_credits"}
        cases = (
            (_body(402, credits, "Too costly; retrying will not help."), Kind.OVER_BUDGET),
            (_body(402, {**credits, "reason": "weight_exceeds_budget"}), Kind.OVER_BUDGET),
            (_body(402, {**credits, "reason": "in_flight_budget_exhausted"}), Kind.DISABLED),
            (_body(402, {**credits, "estimated_cost": 3, "in_flight_budget": 1}), Kind.OVER_BUDGET),
            (_body(402, {**credits, "estimated_cost": 1, "in_flight_budget": 3}), Kind.DISABLED),
            (_body(402, {**credits, "estimated_cost": "3", "in_flight_budget": 1}), Kind.DISABLED),
            (_body(402, {"limit_source": "x"}, "retrying will not help"), Kind.DISABLED),
            (_body(402, credits, "Insufficient credits"), Kind.DISABLED),
        )
        for body, kind in cases:
            verdict = classify(402, Headers(), body, NOW)
            self.assertEqual(verdict.kind, kind, body)
            self.assertEqual(verdict.penalizes, kind is Kind.DISABLED)

    def test_inFlightCappedRetryAfter(self):
        metadata = {"limit_source": "openrouter_in_flight_budget"}
        for retryAfter, until in (("0", NOW + 10), ("soon", NOW + 10), ("99999", NOW + HOUR)):
            headers = Headers({b"Retry-After": [retryAfter.encode()]})
            verdict = classify(402, headers, _body(402, metadata), NOW)
            self.assertEqual((verdict.kind, verdict.until), (Kind.COOLING, until))


class LoopbackTests(TestCase):
    async def test_htmlForbiddenLeavesEveryKeyReady(self):
        """
        Over real sockets: an HTML 403 from the upstream reaches the client
        as it is, once, and every key stays ready.
        """
        proxy = Proxy(self)
        for key in KEYS:
            proxy.fake.htmlForbiddenNext(key=key.token, times=None)
        response = await proxy.chat()
        body = await response.content()
        self.assertEqual(response.code, 403)
        self.assertIn(b"Cloudflare", body)
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["text/html; charset=UTF-8"])
        self.assertEqual(len(proxy.fake.received), 1)
        self.assertEqual({s.state for s in proxy.pool.statuses()}, {State.READY})
