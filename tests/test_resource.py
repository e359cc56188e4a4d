"""
hermux's resource tree in memory: a L{StubTreq} over L{buildRoot}, with a
stub relay that answers requests itself, so no upstream is involved.
"""

from __future__ import annotations

import json

import treq

import hermux
from treq.testing import StubTreq
from twisted.internet.defer import succeed
from twisted.trial.unittest import SynchronousTestCase

from hermux.access import AccessList, AuthThrottle
from hermux.config import Key
from hermux.access import clientLabel
from hermux.keypool import SECONDS_PER_DAY, KeyPool
from hermux.ledger import Counts, MemoryLedger, dayText
from twisted.internet.task import Clock
from hermux.record import recordOf
from hermux.resource import buildRoot

KEYS = (
    Key("alpha", "sk-or-v1-resource-test-alpha-0a1b"),
    Key("beta", "sk-or-v1-resource-test-beta-2c3d"),
)
ACCESS_TOKEN = "resource-test-access-token-Qw8e"
OTHER_TOKEN = "resource-test-other-token-Lp3v"
RELAYED = b"relayed by the stub"
DAY = 20424
TODAY, YESTERDAY = dayText(DAY), dayText(DAY - 1)

UNKNOWN_PATHS = ("/", "/foo", "/hermux/nope", "/hermux/health/extra", "/hermux/static/nope")
BAD_TARGETS = (
    "/api/v1/%2e%2e/x",
    "/api/v1/%2E%2E/keys",
    "/api/v1/../x",
    "/v1/./models",
    "/api/v1//x",
    "/api/v1/a%2fb",
    "/v1/a%5cb",
    "/api/v1/%00x",
)


class _StubRelay:
    """
    A relay that records what it is asked to forward and answers the
    request itself.
    """

    def __init__(self):
        self.calls = []
        self.uses = []

    def forward(self, request, target, use=None):
        self.calls.append((target, recordOf(request).client.label))
        self.uses.append(use)
        request.write(RELAYED)
        request.finish()
        return succeed(None)


class ResourceTestCase(SynchronousTestCase):
    def setUp(self):
        self.relay = _StubRelay()
        self.clock = Clock()
        self.ledger = MemoryLedger()
        self.pool = KeyPool(KEYS, ledger=self.ledger, reactor=self.clock)
        root = buildRoot(self.pool, AccessList([ACCESS_TOKEN]), self.relay, reactor=self.clock)
        self.stub = StubTreq(root)

    def respond(self, method, path, *, authorization=f"Bearer {ACCESS_TOKEN}", data=None):
        """
        Send a request to hermux and return its response, with its body
        read as C{body}.
        """
        headers = {}
        if authorization is not None:
            headers["Authorization"] = authorization
        response = self.successResultOf(
            self.stub.request(method, "http://hermux.test" + path, headers=headers, data=data)
        )
        response.body = self.successResultOf(treq.content(response))
        return response

    def assertError(self, response, code):
        """
        C{response} is one of hermux's own JSON errors with status C{code}.
        """
        self.assertEqual(response.code, code)
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["application/json"])
        self.assertEqual(response.headers.getRawHeaders("X-Hermux-Error"), [str(code)])
        body = json.loads(response.body)
        self.assertEqual(list(body), ["error"])
        self.assertEqual(body["error"]["code"], code)
        self.assertIsInstance(body["error"]["message"], str)
        self.assertTrue(body["error"]["message"])
        self.assertNotIn(RELAYED, response.body)


class AuthorizationTests(ResourceTestCase):
    """
    Only clients with an access token are forwarded.
    """

    def test_missingTokenIsRefused(self):
        """
        A request without an access token gets a 401 asking for a Bearer
        token, and is not relayed.
        """
        for path in ("/api/v1/chat/completions", "/v1/models"):
            response = self.respond("POST", path, authorization=None, data=b"{}")
            self.assertError(response, 401)
            self.assertEqual(response.headers.getRawHeaders("WWW-Authenticate"), ["Bearer"])
        self.assertEqual(self.relay.calls, [])

    def test_unknownTokenIsRefused(self):
        """
        A token that is not in the access list gets a 401, and is not
        relayed.
        """
        for authorization in (
            "Bearer not-the-token",
            f"Bearer {ACCESS_TOKEN}x",
            f"Bearer {ACCESS_TOKEN[:-1]}",
            "Bearer",
            "",
            f"Basic {ACCESS_TOKEN}",
        ):
            response = self.respond("GET", "/api/v1/models", authorization=authorization)
            self.assertError(response, 401)
            self.assertEqual(response.headers.getRawHeaders("WWW-Authenticate"), ["Bearer"])
        self.assertEqual(self.relay.calls, [])

    def test_bearerTokenIsRelayed(self):
        """
        C{Authorization: Bearer <token>} reaches the relay.
        """
        response = self.respond("GET", "/api/v1/models")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.body, RELAYED)
        self.assertEqual(len(self.relay.calls), 1)

    def test_bareTokenIsRelayed(self):
        """
        The bare token as the C{Authorization} header reaches the relay.
        """
        response = self.respond("GET", "/api/v1/models", authorization=ACCESS_TOKEN)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.body, RELAYED)
        self.assertEqual(len(self.relay.calls), 1)

    def test_bearerSchemeIsCaseInsensitive(self):
        """
        The Bearer scheme is recognised in any case.
        """
        response = self.respond("GET", "/api/v1/models", authorization=f"bearer {ACCESS_TOKEN}")
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.relay.calls), 1)


class GateThrottleTests(ResourceTestCase):
    """
    The gate with a throttle, behind a plain twisted.web site (whose
    requests have no client address on their record: the peer's is used).
    """

    def setUp(self):
        super().setUp()
        self.throttle = AuthThrottle(2, reactor=self.clock)
        root = buildRoot(
            self.pool, AccessList([ACCESS_TOKEN, OTHER_TOKEN]), self.relay, throttle=self.throttle
        )
        self.stub = StubTreq(root)

    def test_knownClientPasses(self):
        """
        A throttled address gets 429 for a token new to it, and is still
        served with the token that succeeded from it before.
        """
        self.assertEqual(self.respond("GET", "/api/v1/models").code, 200)
        for _ in range(2):
            self.assertError(self.respond("GET", "/api/v1/models", authorization="wrong"), 401)
        self.assertError(self.respond("GET", "/api/v1/models", authorization=OTHER_TOKEN), 429)
        self.assertEqual(self.respond("GET", "/api/v1/models").code, 200)
        self.assertEqual(len(self.relay.calls), 2)

    def test_twoHeadersWhileThrottled(self):
        """
        A throttled address that sends two Authorization headers gets 429,
        as before the token was looked at.
        """
        for _ in range(2):
            self.respond("GET", "/api/v1/models", authorization="wrong")
        response = self.successResultOf(
            self.stub.request(
                "GET",
                "http://hermux.test/api/v1/models",
                headers={"Authorization": [f"Bearer {ACCESS_TOKEN}", f"Bearer {ACCESS_TOKEN}"]},
            )
        )
        self.assertEqual(response.code, 429)


class RoutingTests(ResourceTestCase):
    """
    What the relay is asked to forward, and what is refused before.
    """

    def assertTarget(self, path, target):
        before = len(self.relay.calls)
        response = self.respond("GET", path)
        self.assertEqual(response.code, 200, path)
        self.assertEqual(len(self.relay.calls), before + 1)
        self.assertEqual(self.relay.calls[-1][0], target)

    def test_apiTargetsAreKept(self):
        """
        /api/v1/... is forwarded as is, query string included.
        """
        self.assertTarget("/api/v1/chat/completions", b"/api/v1/chat/completions")
        self.assertTarget("/api/v1/models", b"/api/v1/models")
        self.assertTarget(
            "/api/v1/models?supported_parameters=tools&x=%20y",
            b"/api/v1/models?supported_parameters=tools&x=%20y",
        )

    def test_v1AliasTargets(self):
        """
        /v1/... is forwarded as /api/v1/..., query string included.
        """
        self.assertTarget("/v1/models", b"/api/v1/models")
        self.assertTarget("/v1/chat/completions", b"/api/v1/chat/completions")
        self.assertTarget("/v1/models?category=programming", b"/api/v1/models?category=programming")

    def test_clientsAreNamedToTheRelay(self):
        """
        Each forwarded request reaches the relay (which counts it) with its
        client's label in its record; refused ones do not reach it.
        """
        for _ in range(3):
            self.assertEqual(self.respond("GET", "/api/v1/models").code, 200)
        self.respond("GET", "/api/v1/models", authorization="Bearer wrong")
        label = clientLabel(ACCESS_TOKEN)
        self.assertEqual([client for target, client in self.relay.calls], [label] * 3)

    def test_badTargetsAreRefused(self):
        """
        A target with dot segments, empty segments or encoded slashes,
        backslashes or control characters gets a 400, and is not relayed.
        """
        for path in BAD_TARGETS:
            self.assertError(self.respond("GET", path), 400)
        self.assertEqual(self.relay.calls, [])

    def test_unknownPathsAreNotFound(self):
        """
        Paths outside /api, /v1 and /hermux/health get a 404, with a token
        or without.
        """
        for path in UNKNOWN_PATHS:
            self.assertError(self.respond("GET", path), 404)
            self.assertError(self.respond("GET", path, authorization=None), 404)
        self.assertEqual(self.relay.calls, [])


class UsageTests(ResourceTestCase):
    """
    C{/hermux/usage}: the ledger's counts over days, grouped as asked.
    """

    def setUp(self):
        super().setUp()
        self.clock.advance(DAY * SECONDS_PER_DAY + 3600)
        root = buildRoot(
            self.pool, AccessList([ACCESS_TOKEN]), self.relay, ledger=self.ledger, reactor=self.clock
        )
        self.stub = StubTreq(root)
        for day, key, client, model, counts in [
            (DAY, "beta", "c1", "m:free", Counts(requests=2, freeRequests=2, promptTokens=10)),
            (DAY, "alpha", "c1", "paid/m", Counts(requests=1, promptTokens=5, cost=1_500_000)),
            (DAY, "alpha", "c2", "paid/m", Counts(requests=1, errors=1)),
            (DAY - 1, "alpha", "c1", "paid/m", Counts(requests=7, cost=10**9)),
        ]:
            self.ledger.add(day, key, client, model, counts)

    def usage(self, query="") -> dict:
        response = self.respond("GET", "/hermux/usage" + query)
        self.assertEqual(response.code, 200, response.body)
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["application/json"])
        return json.loads(response.body)

    def test_needsAToken(self):
        self.assertError(self.respond("GET", "/hermux/usage", authorization=None), 401)

    def test_todayByDayAndKey(self):
        """
        By default: today, by day and key, rows sorted, totals of all.
        """
        report = self.usage()
        self.assertEqual((report["from"], report["to"]), (TODAY, TODAY))
        self.assertEqual(report["group_by"], ["day", "key"])
        self.assertEqual(
            [(row["day"], row["key"], row["requests"], row["cost"]) for row in report["rows"]],
            [(TODAY, "alpha", 2, 0.0015), (TODAY, "beta", 2, 0.0)],
        )
        self.assertEqual(report["totals"]["requests"], 4)
        self.assertEqual(report["totals"]["free_requests"], 2)
        self.assertEqual(report["totals"]["errors"], 1)
        self.assertEqual(report["totals"]["prompt_tokens"], 15)

    def test_rangeAndGrouping(self):
        report = self.usage(f"?from={YESTERDAY}&to={TODAY}&group_by=model,client")
        self.assertEqual(
            [(row["model"], row["client"], row["requests"]) for row in report["rows"]],
            [("m:free", "c1", 2), ("paid/m", "c1", 8), ("paid/m", "c2", 1)],
        )
        self.assertEqual(report["totals"]["cost"], 1.0015)

    def test_badParametersNameThemselves(self):
        """
        A bad parameter gets 400 with a message that names it.
        """
        for query, named in [
            ("?from=yesterday", "from"),
            ("?to=2026-13-01", "to"),
            (f"?from={TODAY}&to={YESTERDAY}", "from"),
            ("?from=2020-01-01", "from"),
            ("?group_by=key,colour", "group_by"),
            ("?group_by=", "group_by"),
            ("?colour=red", "colour"),
        ]:
            response = self.respond("GET", "/hermux/usage" + query)
            self.assertError(response, 400)
            self.assertIn(named, json.loads(response.body)["error"]["message"], query)

    def test_readOnly(self):
        self.assertError(self.respond("POST", "/hermux/usage"), 405)


class HealthTests(ResourceTestCase):
    """
    /hermux/health.
    """

    def test_healthNeedsNoToken(self):
        """
        GET /hermux/health answers 200 with the version, the uptime and
        the number of keys and of those ready, without a token, never to be
        cached.
        """
        self.clock.advance(7.5)
        response = self.respond("GET", "/hermux/health", authorization=None)
        self.assertEqual(response.code, 200)
        self.assertEqual(
            json.loads(response.body),
            {"status": "ok", "version": hermux.__version__, "uptime": 7, "keys": 2, "keys_ready": 2},
        )
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["application/json"])
        self.assertEqual(response.headers.getRawHeaders("Cache-Control"), ["no-store"])
        self.assertEqual(self.relay.calls, [])

    def test_healthHead(self):
        """
        HEAD /hermux/health answers 200 without a body.
        """
        response = self.respond("HEAD", "/hermux/health", authorization=None)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.body, b"")

    def test_healthOtherMethods(self):
        """
        Other methods on /hermux/health get a 405 that says what is allowed.
        """
        for method in ("POST", "PUT", "DELETE"):
            response = self.respond(method, "/hermux/health", authorization=None, data=b"{}")
            self.assertError(response, 405)
            self.assertEqual(response.headers.getRawHeaders("Allow"), ["GET, HEAD"])


class ErrorTests(ResourceTestCase):
    """
    What every error hermux answers itself has in common.
    """

    def errorResponses(self):
        """
        One response of each error hermux answers itself, each sent with
        the access token or a near miss of it.
        """
        yield 401, self.respond("GET", "/v1/models", authorization=f"Bearer {ACCESS_TOKEN}!")
        yield 401, self.respond("GET", "/v1/models", authorization=ACCESS_TOKEN[:-1])
        for path in BAD_TARGETS:
            yield 400, self.respond("GET", path)
            yield 400, self.respond("GET", path, authorization=ACCESS_TOKEN)
        yield 400, self.respond("GET", f"/api/v1/%2e%2e/{ACCESS_TOKEN}")
        for path in UNKNOWN_PATHS:
            yield 404, self.respond("GET", path)
        yield 404, self.respond("GET", f"/hermux/{ACCESS_TOKEN}")
        yield 405, self.respond("POST", "/hermux/health", data=b"{}")

    def test_errorsAreJSON(self):
        """
        Every error hermux answers itself is a JSON error body, with
        Content-Type application/json and X-Hermux-Error set to its status,
        and a Content-Length that matches the body.
        """
        for code, response in self.errorResponses():
            self.assertError(response, code)
            # The agent moves Content-Length from the headers to length.
            self.assertEqual(response.length, len(response.body))

    def test_errorsNeverShowTheToken(self):
        """
        No error body or header contains the access token, or the near miss
        a client sent.
        """
        secret = ACCESS_TOKEN[:-1].encode()
        for code, response in self.errorResponses():
            self.assertNotIn(secret, response.body)
            headers = repr(list(response.headers.getAllRawHeaders())).encode()
            self.assertNotIn(secret, headers)
        self.assertEqual(self.relay.calls, [])
