"""
Tests for L{hermux.clients}: each limit of a named client on a clock,
across a UTC midnight, the model patterns, and the ledger's tally.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hermux.access import Client
from hermux.clients import ClientBook, LimitRefusal, TalliedLedger, notAllowedModel
from hermux.config import ClientEntry, Role
from hermux.keypool import NANOCREDITS, SECONDS_PER_DAY, isoTime
from hermux.ledger import Counts, MemoryLedger

DAY = 20424
# 23:59:00 UTC: a minute before midnight.
LATE = (DAY + 1) * SECONDS_PER_DAY - 60


def client(name="ci-bot", **limits) -> Client:
    entry = ClientEntry(name=name, token=f"token-of-{name}", role=Role.USER, **limits)
    keys = None if entry.keys is None else frozenset(entry.keys)
    return Client(name, entry, keys)


class BookTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(LATE)
        self.ledger = MemoryLedger()
        self.book = ClientBook(self.ledger, reactor=self.clock)

    def refusal(self, who) -> LimitRefusal:
        return self.assertRaises(LimitRefusal, self.book.admit, who)


class DailyRequestsTests(BookTestCase):
    def test_exactAndUntilMidnight(self):
        """
        C{daily_requests} admits exactly that many requests a UTC day; the
        next gets 429 with a C{Retry-After} that ends at 00:00 UTC, and
        after midnight it is admitted again.
        """
        bot = client(dailyRequests=3)
        for _ in range(3):
            self.book.admit(bot).release()
        refusal = self.refusal(bot)
        self.assertEqual((refusal.code, refusal.limit, refusal.retryAfter), (429, "daily_requests", 60))
        self.assertIn("daily_requests limit of 3", refusal.message)
        self.clock.advance(30.5)
        self.assertEqual(self.refusal(bot).retryAfter, 30)
        self.clock.advance(29.5)
        self.book.admit(bot)
        self.assertEqual(self.book.today("ci-bot")[0], 1)

    def test_refusedRequestsAreNotCounted(self):
        """
        A refused request counts toward nothing: C{daily_requests} counts
        the admitted.
        """
        bot = client(dailyRequests=1)
        self.book.admit(bot)
        for _ in range(5):
            self.refusal(bot)
        self.assertEqual(self.book.today("ci-bot")[0], 1)

    def test_zeroPauses(self):
        """
        C{daily_requests} 0 admits nothing.
        """
        self.assertEqual(self.refusal(client(dailyRequests=0)).limit, "daily_requests")

    def test_othersUnaffected(self):
        """
        One client's limit is its own.
        """
        self.book.admit(client(dailyRequests=1))
        self.refusal(client(dailyRequests=1))
        for _ in range(5):
            self.book.admit(client("other", dailyRequests=5))
        self.book.admit(Client("client-0a1b2c3d"))

    def test_seededFromLedger(self):
        """
        Today's counts in the ledger (a restart) count toward the limits;
        yesterday's do not.
        """
        self.ledger.add(DAY, "alpha", "ci-bot", "m", Counts(requests=2, cost=5))
        self.ledger.add(DAY - 1, "alpha", "ci-bot", "m", Counts(requests=9))
        book = ClientBook(self.ledger, reactor=self.clock)
        self.assertEqual(book.today("ci-bot"), (2, Counts(requests=2, cost=5)))
        book.admit(client(dailyRequests=3))
        self.assertRaises(LimitRefusal, book.admit, client(dailyRequests=3))


class DailyCostTests(BookTestCase):
    def test_spentUntilMidnight(self):
        """
        C{daily_cost} refuses once the client's credits today (what the
        ledger was given for it) reach it, until 00:00 UTC.
        """
        bot = client(dailyCost=2 * NANOCREDITS)
        tallied = TalliedLedger(self.ledger, self.book)
        self.book.admit(bot)
        tallied.add(DAY, "alpha", "ci-bot", "m", Counts(requests=1, cost=NANOCREDITS))
        self.book.admit(bot)
        # A request in flight may take it past the limit.
        tallied.add(DAY, "beta", "ci-bot", "m", Counts(requests=1, cost=NANOCREDITS + 7))
        refusal = self.refusal(bot)
        self.assertEqual((refusal.code, refusal.limit, refusal.retryAfter), (429, "daily_cost", 60))
        self.assertIn("daily_cost of 2 credits", refusal.message)
        self.clock.advance(60)
        self.book.admit(bot)

    def test_otherDaysNotCounted(self):
        """
        What the ledger is given for an earlier day (a request that began
        before midnight) is not today's.
        """
        bot = client(dailyCost=1)
        TalliedLedger(self.ledger, self.book).add(DAY - 1, "alpha", "ci-bot", "m", Counts(cost=5))
        self.book.admit(bot)
        self.assertEqual(self.book.today("ci-bot")[1], Counts())

    def test_talliedLedgerPassesThrough(self):
        """
        L{TalliedLedger} gives the ledger everything it is given.
        """
        TalliedLedger(self.ledger, self.book).add(DAY, "alpha", "ci-bot", "m", Counts(requests=1, cost=3))
        self.assertEqual(self.ledger.clientUsage(DAY), {"ci-bot": Counts(requests=1, cost=3)})
        self.assertEqual(self.book.today("ci-bot")[1], Counts(requests=1, cost=3))


class PerMinuteTests(BookTestCase):
    def test_slidingWindow(self):
        """
        C{per_minute} admits that many requests in any 60 s; the next gets
        429 with the seconds until the oldest leaves the window.  The
        window runs on across midnight.
        """
        bot = client(perMinute=2)
        self.book.admit(bot).release()
        self.clock.advance(10)
        self.book.admit(bot).release()
        self.clock.advance(10)
        refusal = self.refusal(bot)
        self.assertEqual((refusal.limit, refusal.retryAfter), ("per_minute", 40))
        self.assertIn("retry in 40 seconds", refusal.message)
        self.clock.advance(39.5)
        self.assertEqual(self.refusal(bot).retryAfter, 1)
        # 00:00:00 UTC: the first one left the window, not the second.
        self.clock.advance(0.5)
        self.book.admit(bot)
        self.assertEqual(self.refusal(bot).retryAfter, 10)

    def test_refusalsTakeNoSlot(self):
        """
        A request refused by another limit does not use a per-minute slot.
        """
        bot = client(perMinute=1, maxParallel=1)
        admission = self.book.admit(bot)
        self.clock.advance(61)
        self.assertEqual(self.refusal(bot).limit, "max_parallel")
        admission.release()
        self.book.admit(bot)


class MaxParallelTests(BookTestCase):
    def test_inFlight(self):
        """
        C{max_parallel} admits that many requests at once; the next gets
        429 with C{Retry-After: 1}; a release, counted once, frees one.
        """
        bot = client(maxParallel=2)
        first = self.book.admit(bot)
        self.book.admit(bot)
        refusal = self.refusal(bot)
        self.assertEqual((refusal.limit, refusal.retryAfter), ("max_parallel", 1))
        first.release()
        first.release()
        self.book.admit(bot)
        self.refusal(bot)

    def test_acrossMidnight(self):
        """
        Requests in flight at midnight stay in flight.
        """
        bot = client(maxParallel=1)
        admission = self.book.admit(bot)
        self.clock.advance(120)
        self.refusal(bot)
        admission.release()
        self.book.admit(bot)

    def test_reloadedLimit(self):
        """
        A reload that changes a limit applies it to the next request; the
        requests in flight count toward it by the client's name.
        """
        one, two = client(maxParallel=1), client(maxParallel=2)
        first = self.book.admit(one)
        self.refusal(one)
        second = self.book.admit(two)
        self.assertRaises(LimitRefusal, self.book.admit, two)
        first.release()
        self.refusal(one)
        second.release()
        self.book.admit(one)


class OrderTests(BookTestCase):
    def test_order(self):
        """
        The limits are checked in the order daily_requests, daily_cost,
        per_minute, max_parallel: the first reached names the refusal.
        """
        bot = client(dailyRequests=1, dailyCost=1, perMinute=1, maxParallel=1)
        self.book.admit(bot)
        TalliedLedger(self.ledger, self.book).add(DAY, "alpha", "ci-bot", "m", Counts(cost=1))
        self.assertEqual(self.refusal(bot).limit, "daily_requests")
        self.assertEqual(self.refusal(client(dailyCost=1, perMinute=1, maxParallel=1)).limit, "daily_cost")
        self.assertEqual(self.refusal(client(perMinute=1, maxParallel=1)).limit, "per_minute")
        self.assertEqual(self.refusal(client(maxParallel=1)).limit, "max_parallel")


class ModelPatternTests(SynchronousTestCase):
    def entry(self, *patterns):
        return ClientEntry(name="x", token="t", models=patterns or None)

    def test_anyModel(self):
        """
        A client without C{models} may name any model, or none.
        """
        self.assertIsNone(notAllowedModel(self.entry(), ("openai/gpt-4o",), True))
        self.assertIsNone(notAllowedModel(self.entry(), None, True))

    def test_globs(self):
        """
        Each model named must match one of the patterns, globbed and
        case-sensitive.
        """
        entry = self.entry("*:free", "openai/*", "anthropic/claude-?-haiku")
        for names in (
            ("meta-llama/llama-3.3-70b-instruct:free",),
            ("openai/gpt-4o", "openai/o3"),
            ("anthropic/claude-3-haiku", "x:free"),
        ):
            self.assertIsNone(notAllowedModel(entry, names, True), names)
        for names, shown in (
            (("anthropic/claude-3-opus",), "anthropic/claude-3-opus"),
            (("openai/gpt-4o", "google/gemini"), "google/gemini"),
            (("x:FREE",), "x:FREE"),
            (("OpenAI/gpt-4o",), "OpenAI/gpt-4o"),
            (("7",), "7"),
        ):
            self.assertEqual(
                notAllowedModel(entry, names, True),
                f"model {shown!r} is not allowed for this access token",
            )

    def test_noModelNamed(self):
        """
        A request without a body names no model and passes (C{GET
        /models}); a JSON object that names none does not (OpenRouter would
        use the account's default model), nor a body hermux cannot read.
        """
        entry = self.entry("*:free")
        self.assertIsNone(notAllowedModel(entry, None, False))
        self.assertIn("name one in 'model'", notAllowedModel(entry, (), True))
        self.assertIn("cannot be read", notAllowedModel(entry, None, True))

    def test_shownPrintable(self):
        """
        The model a refusal names is shown printable and short.
        """
        message = notAllowedModel(self.entry("a"), ("\x1b[31mred\n" + "x" * 300,), True)
        self.assertNotIn("\x1b", message)
        self.assertNotIn("\n", message)
        self.assertLess(len(message), 200)


class ClientResourceTests(SynchronousTestCase):
    """
    The resource tree with named clients: expiry, models, limits and keys
    before anything is forwarded, and who sees which of C{/hermux/}.
    """

    def setUp(self):
        from hermux.access import AccessList
        from hermux.keypool import KeyPool
        from hermux.metrics import Metrics
        from hermux.resource import buildRoot
        from tests.test_resource import KEYS, _StubRelay

        self.clock = Clock()
        self.clock.advance(LATE)
        self.ledger = MemoryLedger()
        self.relay = _StubRelay()
        self.bot = ClientEntry(
            name="ci-bot", token=BOT_TOKEN, dailyRequests=2, perMinute=20, maxParallel=4,
            models=("*:free",), expires=LATE + 30,
        )
        self.team = ClientEntry(name="team", token=TEAM_TOKEN, keys=("beta",), dailyCost=NANOCREDITS)
        self.boss = ClientEntry(name="boss", token=BOSS_TOKEN, role=Role.ADMIN)
        self.access = AccessList([ADMIN_TOKEN], [self.bot, self.team, self.boss])
        self.pool = KeyPool(KEYS, ledger=self.ledger, reactor=self.clock)
        self.book = ClientBook(self.ledger, reactor=self.clock)
        root = buildRoot(
            self.pool, self.access, self.relay, self.ledger, Metrics(),
            reactor=self.clock, book=self.book,
        )
        from treq.testing import StubTreq

        self.stub = StubTreq(root)

    def respond(self, method, path, token, body=None):
        import json

        import treq

        headers = {"Authorization": f"Bearer {token}"}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        response = self.successResultOf(
            self.stub.request(method, "http://hermux.test" + path, headers=headers, data=data)
        )
        response.body = self.successResultOf(treq.content(response))
        return response

    def assertRefused(self, response, code, message=None) -> dict:
        import json

        self.assertEqual(response.code, code, response.body)
        self.assertEqual(response.headers.getRawHeaders("X-Hermux-Error"), [str(code)])
        error = json.loads(response.body)
        self.assertEqual(list(error), ["error"])
        self.assertEqual(error["error"]["code"], code)
        if message is not None:
            self.assertEqual(error["error"]["message"], message)
        return error

    def chat(self, token, model="x:free", **extra):
        return self.respond("POST", "/api/v1/chat/completions", token, {"model": model, **extra})

    def test_expired(self):
        """
        A token past its C{expires} gets 401 everywhere, forwarding
        nothing; up to that moment it works.
        """
        self.clock.advance(30)
        self.assertEqual(self.chat(BOT_TOKEN).code, 200)
        self.clock.advance(0.001)
        for path in ("/api/v1/chat/completions", "/hermux/me", "/hermux/usage"):
            response = self.respond("POST" if "chat" in path else "GET", path, BOT_TOKEN, {"model": "x:free"})
            self.assertRefused(response, 401, "this access token has expired")
        self.assertEqual(len(self.relay.calls), 1)

    def test_modelNotAllowed(self):
        """
        A model outside the client's patterns gets 403 in OpenRouter's
        shape, and nothing is forwarded or counted.
        """
        response = self.chat(BOT_TOKEN, "openai/gpt-4o")
        self.assertRefused(response, 403, "model 'openai/gpt-4o' is not allowed for this access token")
        response = self.chat(BOT_TOKEN, "a:free", models=["b:free", "openai/gpt-4o"])
        self.assertRefused(response, 403, "model 'openai/gpt-4o' is not allowed for this access token")
        self.assertEqual(self.relay.calls, [])
        self.assertEqual(self.book.today("ci-bot")[0], 0)
        # Requests without a model pass.
        self.assertEqual(self.respond("GET", "/api/v1/models", BOT_TOKEN).code, 200)

    def test_limitAnswers(self):
        """
        A limit reached gets 429 with C{Retry-After} and a message naming
        it; nothing is forwarded.
        """
        self.assertEqual(self.chat(BOT_TOKEN).code, 200)
        self.assertEqual(self.chat(BOT_TOKEN).code, 200)
        response = self.chat(BOT_TOKEN)
        error = self.assertRefused(response, 429)
        self.assertIn("daily_requests", error["error"]["message"])
        self.assertEqual(response.headers.getRawHeaders("Retry-After"), ["60"])
        self.assertEqual(len(self.relay.calls), 2)

    def test_keysGoToThePool(self):
        """
        A client limited to some keys asks the pool for those only; others
        for any.
        """
        self.chat(TEAM_TOKEN, "openai/gpt-4o")
        self.chat(ADMIN_TOKEN, "openai/gpt-4o")
        self.assertEqual([use.keys for use in self.relay.uses], [frozenset({"beta"}), None])
        self.assertEqual([use.client for use in self.relay.uses], ["team", _adminLabel()])

    def test_adminEndpoints(self):
        """
        C{/hermux/keys} and C{/hermux/metrics} are for admins: allow.txt's
        tokens and clients with the admin role; a user gets 403.
        """
        for path in ("/hermux/keys", "/hermux/metrics"):
            for token in (ADMIN_TOKEN, BOSS_TOKEN):
                self.assertEqual(self.respond("GET", path, token).code, 200, (path, token))
            for token in (BOT_TOKEN, TEAM_TOKEN):
                self.assertRefused(self.respond("GET", path, token), 403, "this endpoint needs an admin access token")

    def test_usageOfUsers(self):
        """
        A user's C{/hermux/usage} answers its own rows only; asking for
        another client's gets 403.  An admin sees everyone's, or one
        client's.
        """
        import json

        for client in ("team", "ci-bot", "other"):
            self.ledger.add(DAY, "alpha", client, "m", Counts(requests=1))
        rows = lambda response: [row["client"] for row in json.loads(response.body)["rows"]]  # noqa: E731
        query = "/hermux/usage?group_by=client"
        self.assertEqual(rows(self.respond("GET", query, TEAM_TOKEN)), ["team"])
        self.assertEqual(rows(self.respond("GET", query + "&client=team", TEAM_TOKEN)), ["team"])
        self.assertRefused(self.respond("GET", query + "&client=other", TEAM_TOKEN), 403)
        self.assertEqual(rows(self.respond("GET", query, BOSS_TOKEN)), ["ci-bot", "other", "team"])
        self.assertEqual(rows(self.respond("GET", query + "&client=other", ADMIN_TOKEN)), ["other"])

    def test_me(self):
        """
        C{/hermux/me} gives any valid token its name, role, limits, what it
        used today and what remains.
        """
        import json

        self.chat(BOT_TOKEN)
        TalliedLedger(self.ledger, self.book).add(DAY, "alpha", "ci-bot", "x:free", Counts(requests=1, promptTokens=7))
        me = json.loads(self.respond("GET", "/hermux/me", BOT_TOKEN).body)
        self.assertEqual(me["name"], "ci-bot")
        self.assertEqual(me["role"], "user")
        self.assertEqual(
            me["limits"],
            {
                "daily_requests": 2, "daily_cost": None, "per_minute": 20, "max_parallel": 4,
                "models": ["*:free"], "keys": None, "expires": isoTime(LATE + 30),
            },
        )
        self.assertEqual(me["today"]["requests"], 1)
        self.assertEqual(me["today"]["prompt_tokens"], 7)
        self.assertEqual(me["today"]["cost"], 0.0)
        self.assertEqual(me["remaining"], {"requests": 1, "cost": None})
        team = json.loads(self.respond("GET", "/hermux/me", TEAM_TOKEN).body)
        self.assertEqual(team["limits"]["keys"], ["beta"])
        self.assertEqual(team["remaining"], {"requests": None, "cost": 1.0})
        admin = json.loads(self.respond("GET", "/hermux/me", ADMIN_TOKEN).body)
        self.assertEqual((admin["name"], admin["role"]), (_adminLabel(), "admin"))
        self.assertEqual(set(admin["limits"].values()), {None})


BOT_TOKEN = "hx-test-ci-bot-token-7a1f0e"
TEAM_TOKEN = "hx-test-team-token-2b8c4d"
BOSS_TOKEN = "hx-test-boss-token-9d3e5f"
ADMIN_TOKEN = "hx-test-allow-token-4c6a8b"


def _adminLabel() -> str:
    from hermux.access import clientLabel

    return clientLabel(ADMIN_TOKEN)


class ExpiredAndThrottledTests(SynchronousTestCase):
    def test_expiredIsNoGuess(self):
        """
        An expired token is refused, but not counted as a failed one: the
        address is not throttled for it.
        """
        import treq
        from treq.testing import StubTreq

        from hermux.access import AccessList, AuthThrottle
        from hermux.keypool import KeyPool
        from hermux.resource import buildRoot
        from tests.test_resource import KEYS, _StubRelay

        clock = Clock()
        clock.advance(LATE)
        expired = ClientEntry(name="old", token=BOT_TOKEN, expires=LATE - 1)
        access = AccessList([ADMIN_TOKEN], [expired])
        root = buildRoot(
            KeyPool(KEYS, reactor=clock), access, _StubRelay(),
            throttle=AuthThrottle(1, reactor=clock), reactor=clock,
        )
        stub = StubTreq(root)

        def status(token):
            response = self.successResultOf(
                stub.get("http://hermux.test/hermux/me", headers={"Authorization": f"Bearer {token}"})
            )
            self.successResultOf(treq.content(response))
            return response.code

        self.assertEqual([status(BOT_TOKEN) for _ in range(3)], [401, 401, 401])
        self.assertEqual(status(ADMIN_TOKEN), 200)
        self.assertEqual(status("hx-a-wrong-guess-000"), 401)
        self.assertEqual(status("hx-another-wrong-guess-000"), 429)


class ReloadDescriptionTests(SynchronousTestCase):
    def test_byNameOnly(self):
        """
        What a reload changed in clients.csv, by name only.
        """
        from hermux.reload import describeClientChanges

        old = (ClientEntry("a", "ta"), ClientEntry("b", "tb"), ClientEntry("c", "tc"))
        new = (ClientEntry("a", "ta"), ClientEntry("b", "tb", dailyRequests=3), ClientEntry("d", "td"))
        self.assertEqual(
            describeClientChanges(old, new),
            ["clients added: d", "clients removed: c", "clients changed: b"],
        )
        self.assertEqual(describeClientChanges(old, old), [])
