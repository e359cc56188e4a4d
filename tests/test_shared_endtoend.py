"""
Two hermux instances sharing one pool through a real Redis (the tests' own
C{redis-server}, see L{tests.redisserver}), in front of one fake OpenRouter
that counts what they both sent: one least-used choice, one view of each
key's state, one budget per client, and serving that never stops when Redis
does.
"""

from __future__ import annotations

import json
import os
from collections import Counter

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from hermux.config import ClientEntry
from tests.harness import ACCESS_TOKEN, CHAT, KEYS, Proxy, chatBody, closedFreePort, sleep
from tests.redisserver import RedisServer

ALPHA, BETA, GAMMA = KEYS
NAMES = {key.token: key.name for key in KEYS}
FREE = "meta-llama/llama-3.3-70b-instruct:free"
METERED_TOKEN = "hx-shared-metered-token-6b0e2f"
METERED = ClientEntry(name="metered", token=METERED_TOKEN, dailyRequests=10)
PASSWORD = "hx-redis-s3cret-4a7c91"


def together(coroutines):
    """
    Run C{coroutines} at once; a Deferred of their results, in order.
    """
    return gatherResults([ensureDeferred(c) for c in coroutines], consumeErrors=True)


async def waitFor(check, timeout: float, interval: float = 0.02, what: str = ""):
    """
    Wait until the coroutine function C{check} returns something true, and
    return it; fail after C{timeout} seconds with the last value seen.
    """
    started = reactor.seconds()
    while True:
        value = await check()
        if value:
            return value
        if reactor.seconds() - started >= timeout:
            raise AssertionError(f"{what or check} still not true after {timeout}s; last: {value!r}")
        await sleep(interval)


async def ask(proxy: Proxy, *, model: str = FREE, token: str = ACCESS_TOKEN, timeout: float = 10.0):
    """
    One chat completion through C{proxy}: its status and the key that served
    it (C{X-Token-Name}), once its whole body arrived.  A request that takes
    longer than C{timeout} seconds fails the test.
    """
    asking = proxy.request(
        "POST", CHAT, token=token, headers={"Content-Type": "application/json"},
        data=chatBody(model=model),
    )
    asking.addTimeout(timeout, reactor)
    response = await asking
    reading = response.content()
    reading.addTimeout(timeout, reactor)
    await reading
    [name] = response.headers.getRawHeaders("X-Token-Name", [None])
    return response.code, name


async def keysOf(proxy: Proxy) -> dict[str, dict]:
    """
    C{/hermux/keys} of C{proxy}, by key name.
    """
    response = await proxy.request("GET", "/hermux/keys")
    body = await response.content()
    if response.code != 200:
        raise AssertionError(f"/hermux/keys: {response.code} {body!r}")
    return {key["name"]: key for key in json.loads(body)["keys"]}


async def healthOf(proxy: Proxy) -> tuple[dict, bytes]:
    response = await proxy.request("GET", "/hermux/health", token=None)
    body = await response.content()
    return json.loads(body), body


def sentPerKey(proxy: Proxy) -> Counter:
    """
    What the fake upstream really received, per key name.
    """
    return Counter(NAMES.get(received.key) for received in proxy.fake.received)


def countsOf(keys: dict[str, dict], field: str = "requests_today") -> dict[str, int]:
    return {name: keys[name][field] for name in sorted(keys)}


class _Log:
    """
    Every log event while the test runs, to check that none of them holds
    a secret.
    """

    def __init__(self, testCase):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        testCase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def text(self) -> str:
        lines = []
        for event in self.events:
            lines.append(formatEvent(event) or "")
            lines.extend(
                repr(value) for name, value in event.items()
                if not name.startswith("log_") or name == "log_format"
            )
            failure = event.get("log_failure")
            if failure is not None:
                lines.append(failure.getTraceback())
        return "\n".join(lines)


class SharedPoolTests(TestCase):
    """
    Two instances, C{a} and C{b}, on one Redis and one upstream.
    """

    timeout = 40

    async def instances(self, *, clients=(), syncInterval=None):
        self.server = RedisServer(self)
        await self.server.start()
        self.a = Proxy(
            self, redis=self.server.url, instanceName="a", clients=clients,
            syncInterval=syncInterval,
        )
        self.b = Proxy(
            self, fake=self.a, redis=self.server.url, instanceName="b", clients=clients,
            syncInterval=syncInterval,
        )
        self.assertIsNotNone(self.a.shared, "--redis built no shared pool")
        await waitFor(
            self.bothConnected, timeout=5, what="both instances connected to Redis"
        )

    async def bothConnected(self):
        return self.a.shared.problem() is None and self.b.shared.problem() is None

    async def agreeOn(self, expected: dict[str, int], fields=("requests_today",), timeout: float = 5.0):
        """
        Wait until both instances' C{/hermux/keys} give C{expected} (by key
        name) in each of C{fields}.
        """
        counts = {name: expected.get(name, 0) for name in sorted(NAMES.values())}
        expected = {field: counts for field in fields}
        seen = {}

        async def agree():
            for name, proxy in (("a", self.a), ("b", self.b)):
                keys = await keysOf(proxy)
                seen[name] = {field: countsOf(keys, field) for field in fields}
            return seen["a"] == seen["b"] == expected

        try:
            await waitFor(agree, timeout=timeout, what="both instances' counts")
        except AssertionError:
            raise AssertionError(f"expected {expected}, a says {seen['a']}, b says {seen['b']}")

    async def test_leastUsedAcrossInstances(self):
        """
        60 free-model requests alternating between the instances, each one
        sent once both instances see the same totals: every key serves
        exactly 20, and no key is ever two ahead of another, as one instance
        alone would choose.
        """
        # Faster than the default 0.25 s only to keep 60 waits short.
        await self.instances(syncInterval=0.05)
        served = Counter()
        for n in range(60):
            proxy = (self.a, self.b)[n % 2]
            code, name = await ask(proxy)
            self.assertEqual(code, 200)
            served[name] += 1
            await self.agreeOn(
                sentPerKey(self.a), ("requests_today", "free_requests_today"), timeout=2.0
            )
            # One pool: never a key two ahead of another (two pools that
            # each balance their own half could be).
            counts = [sentPerKey(self.a)[key.name] for key in KEYS]
            self.assertLessEqual(max(counts) - min(counts), 1, counts)
        self.assertEqual(served, {"alpha": 20, "beta": 20, "gamma": 20})
        self.assertEqual(sentPerKey(self.a), {"alpha": 20, "beta": 20, "gamma": 20})

    async def test_verdictReachesTheOther(self):
        """
        A per-day 429 on instance C{a} (OpenRouter's daily cap on free-model
        requests) keeps that key from free-model requests there; from 1 s
        later, instance C{b} sends nothing more with it, and says why in
        its C{/hermux/keys}.
        """
        await self.instances()
        self.a.fake.platformLimitNext(perDay=True, key=ALPHA.token, times=None)
        for _ in range(3):
            code, name = await ask(self.a)
            self.assertEqual(code, 200)
            self.assertNotEqual(name, "alpha")
            if sentPerKey(self.a)["alpha"]:
                break
        self.assertEqual(sentPerKey(self.a)["alpha"], 1, "a never tried alpha")
        await sleep(1.0)
        before = len(self.a.fake.received)
        verdict = (await keysOf(self.b))["alpha"]
        self.assertIsNotNone(verdict["free_requests_reason"], verdict)
        results = await together([ask(self.b) for _ in range(12)])
        results += [await ask((self.a, self.b)[n % 2]) for n in range(8)]
        self.assertEqual({code for code, _ in results}, {200})
        self.assertNotIn("alpha", {name for _, name in results})
        later = [NAMES[r.key] for r in self.a.fake.received[before:]]
        self.assertEqual(len(later), 20)
        self.assertNotIn("alpha", later)

    async def test_clientDailyRequestsExact(self):
        """
        A client with C{daily_requests=10} gets exactly ten answers across
        both instances, whether its requests come one by one or at once;
        the rest are 429 and forwarded nowhere.
        """
        await self.instances(clients=(METERED,))
        codes = []
        for n in range(4):
            code, _ = await ask((self.a, self.b)[n % 2], token=METERED_TOKEN)
            codes.append(code)
        for _ in range(3):
            batch = [ask(proxy, token=METERED_TOKEN) for proxy in (self.a, self.b, self.a, self.b)]
            codes += [code for code, _ in await together(batch)]
        self.assertEqual(len(codes), 16)
        self.assertEqual(Counter(codes), {200: 10, 429: 6})
        self.assertEqual(len(self.a.fake.received), 10)
        for proxy in (self.a, self.b):
            code, _ = await ask(proxy, token=METERED_TOKEN)
            self.assertEqual(code, 429)
        code, _ = await ask(self.b)
        self.assertEqual(code, 200)

    async def test_redisKilledAndRestartedEmpty(self):
        """
        C{redis-server} killed (SIGKILL) while 200 requests go through both
        instances, ten at a time: every one is answered 200, none waits
        long.  Restarted empty, within 5 s both instances' C{/hermux/keys}
        agree with what the upstream really received, nothing lost and
        nothing doubled.
        """
        await self.instances()
        codes = Counter()
        slowest = 0.0

        async def timed(proxy):
            nonlocal slowest
            started = reactor.seconds()
            code, _ = await ask(proxy, timeout=5.0)
            slowest = max(slowest, reactor.seconds() - started)
            return code

        for batch in range(20):
            inFlight = together([timed((self.a, self.b)[n % 2]) for n in range(10)])
            if batch == 6:
                await self.server.kill()
            codes.update(await inFlight)
        self.assertEqual(codes, {200: 200})
        self.assertLess(slowest, 2.0)
        self.assertEqual(sum(sentPerKey(self.a).values()), 200)
        for proxy in (self.a, self.b):
            await waitFor(
                lambda proxy=proxy: _asyncValue(proxy.shared.problem() is not None),
                timeout=5, what="the lost Redis noticed",
            )
            health, _ = await healthOf(proxy)
            self.assertEqual(health["status"], "degraded")
        await self.server.start()
        await self.agreeOn(sentPerKey(self.a), timeout=5.0)
        for proxy in (self.a, self.b):
            health, _ = await healthOf(proxy)
            self.assertEqual(health["status"], "ok", health)


async def _asyncValue(value):
    return value


class RedisTroubleTests(TestCase):
    """
    Redis that cannot be used when hermux starts (a wrong password, nothing
    listening): hermux serves anyway, says it is degraded without ever
    naming the password, and recovers by itself once Redis is usable.
    """

    timeout = 40

    async def checkDegradedThenRecovers(self, proxy: Proxy, log: _Log, fix, secrets=(PASSWORD,)):
        code, _ = await ask(proxy)
        self.assertEqual(code, 200)

        async def degraded():
            health, body = await healthOf(proxy)
            return health if health["status"] == "degraded" else None

        health = await waitFor(degraded, timeout=5, what="health degraded")
        self.assertTrue(health.get("problem"), health)
        code, _ = await ask(proxy)
        self.assertEqual(code, 200)
        await fix()

        async def ok():
            health, body = await healthOf(proxy)
            return (health, body) if health["status"] == "ok" else None

        fixed = reactor.seconds()
        health, body = await waitFor(ok, timeout=12, what="health ok after the fix")
        recovery = reactor.seconds() - fixed
        self.assertIsNone(proxy.shared.problem())
        code, _ = await ask(proxy)
        self.assertEqual(code, 200)
        for secret in secrets:
            self.assertNotIn(secret, json.dumps(health))
            self.assertNotIn(secret, log.text())
        return recovery

    async def assertProblemHidesPassword(self, proxy: Proxy, secrets=(PASSWORD,)):
        health, body = await healthOf(proxy)
        problem = proxy.shared.problem()
        self.assertIsNotNone(problem)
        for secret in secrets:
            self.assertNotIn(secret.encode(), body)
            self.assertNotIn(secret, problem)

    async def test_passwordMissing(self):
        """
        A server that requires a password, a URL without one: degraded;
        recovers when the server no longer requires one.
        """
        log = _Log(self)
        server = RedisServer(self, password=PASSWORD)
        await server.start()
        proxy = Proxy(self, redis=server.url, instanceName="a")

        async def fix():
            await self.assertProblemHidesPassword(proxy)
            await server.kill()
            server.password = None
            await server.start()

        await self.checkDegradedThenRecovers(proxy, log, fix)

    async def test_passwordWrongInURL(self):
        """
        A wrong password in the URL: degraded, with a problem that never
        quotes it (nor the server's); recovers when the server takes it.
        """
        log = _Log(self)
        server = RedisServer(self, password=PASSWORD)
        await server.start()
        wrong = "hx-wrong-pass-0f3e77"
        proxy = Proxy(self, redis=f"redis://:{wrong}@127.0.0.1:{server.port}/0", instanceName="a")
        fix = self.restartTakingPassword(server, proxy, wrong)
        await self.checkDegradedThenRecovers(proxy, log, fix, (PASSWORD, wrong))

    def restartTakingPassword(self, server, proxy, wrong: str):
        """
        What makes a Redis refusing C{proxy}'s C{wrong} password take it:
        after checking that the problem quotes neither password, restart
        the server with that one.
        """

        async def fix():
            await self.assertProblemHidesPassword(proxy, (PASSWORD, wrong))
            await server.kill()
            server.password = wrong
            await server.start()

        return fix

    async def test_passwordFile(self):
        """
        The password from C{--redis-password-file}: right, it connects; a
        wrong one is degraded, never quoted, and recovers when the server
        takes it.
        """
        log = _Log(self)
        server = RedisServer(self, password=PASSWORD)
        await server.start()
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(PASSWORD + "\n")
        right = Proxy(self, redis=server.url, redisPasswordFile=path, instanceName="right")
        await waitFor(
            lambda: _asyncValue(right.shared.problem() is None), timeout=5,
            what="connected with the password file",
        )
        code, _ = await ask(right)
        self.assertEqual(code, 200)
        wrong = "hx-wrong-file-pass-7d21"
        wrongPath = os.path.abspath(self.mktemp())
        with open(wrongPath, "w") as f:
            f.write(wrong + "\n")
        proxy = Proxy(self, redis=server.url, redisPasswordFile=wrongPath, instanceName="wrong")
        fix = self.restartTakingPassword(server, proxy, wrong)
        await self.checkDegradedThenRecovers(proxy, log, fix, (PASSWORD, wrong))

    async def test_unreachable(self):
        """
        Nothing listening at the URL's port: hermux starts and serves,
        degraded; once a Redis starts on that port it recovers within a
        few seconds (its retries back off, capped at 10 s).
        """
        log = _Log(self)
        port = closedFreePort()
        # Made first, so that it stops after hermux does.
        server = RedisServer(self, port=port, password=PASSWORD)
        proxy = Proxy(self, redis=f"redis://:{PASSWORD}@127.0.0.1:{port}/0", instanceName="a")

        async def fix():
            await self.assertProblemHidesPassword(proxy)
            await server.start()

        recovery = await self.checkDegradedThenRecovers(proxy, log, fix)
        self.assertLess(recovery, 11.0)
