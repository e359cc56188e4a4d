"""
Tests for L{hermux.shared}: the Redis URL, what an operator is told, and
two pools sharing what they know through a real C{redis-server}.
"""

from __future__ import annotations

import os

import redis
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hermux.access import AuthThrottle, Client
from hermux.clients import ClientBook, LimitRefusal
from hermux.config import ClientEntry, Key
from hermux.keypool import Kind, KeyPool, Use, Verdict, dayOf
from hermux.ledger import Counts, MemoryLedger
from hermux.shared import SharedPool, _problemOf, defaultInstanceName, parseRedisURL
from tests.harness import sleep, waitUntil
from tests.redisserver import RedisServer

PASSWORD = "s3cret-Redis-pw-51"
KEYS = (Key("alpha", "sk-or-v1-shared-alpha-1"), Key("beta", "sk-or-v1-shared-beta-2"))


class RedisURLTests(SynchronousTestCase):
    def test_forms(self):
        """
        redis://, rediss:// and unix:// URLs, with their defaults; the
        password is kept apart and left out of what is shown.
        """
        target = parseRedisURL(f"redis://:{PASSWORD}@10.0.0.5:6380/2")
        self.assertEqual((target.host, target.port, target.db, target.tls), ("10.0.0.5", 6380, 2, False))
        self.assertEqual(target.password, PASSWORD)
        self.assertEqual(target.shown, "redis://10.0.0.5:6380/2")
        self.assertNotIn(PASSWORD, repr(target))
        target = parseRedisURL("rediss://redis.example:6390")
        self.assertEqual((target.port, target.db, target.tls, target.password), (6390, 0, True, None))
        target = parseRedisURL("redis://[::1]")
        self.assertEqual((target.host, target.port, target.shown), ("::1", 6379, "redis://[::1]:6379/0"))
        target = parseRedisURL("unix:///run/redis/redis.sock?db=3")
        self.assertEqual((target.socket, target.db, target.host), ("/run/redis/redis.sock", 3, None))
        self.assertEqual(parseRedisURL("redis://:p%40ss@h/0").password, "p@ss")
        target = parseRedisURL(f"redis://hermux:{PASSWORD}@h/0")
        self.assertEqual((target.username, target.password), ("hermux", PASSWORD))

    def test_badNeverQuotesThePassword(self):
        """
        A URL hermux cannot use is refused with a sentence that never holds
        its password.
        """
        for text in (
            f"http://:{PASSWORD}@host:1/0",
            f"redis://:{PASSWORD}@host:99999/0",
            f"redis://:{PASSWORD}@host:1/zero",
            f"redis://:{PASSWORD}@:1/0",
            "redis://user@host:1/0",
            f"redis://:{PASSWORD}@host:1/0?ssl=1",
            f"unix://host/{PASSWORD}",
            f"unix:///x.sock?db=1&pw={PASSWORD}",
            f"redis://:{PASSWORD}@[::1:1/0",
        ):
            error = self.assertRaises(ValueError, parseRedisURL, text)
            self.assertNotIn(PASSWORD, str(error), text)
            self.assertNotIn("\n", str(error))

    def test_problems(self):
        """
        What goes wrong with Redis is told by where Redis is, never with
        the password or the error's own text.
        """
        target = parseRedisURL(f"redis://:{PASSWORD}@127.0.0.1:1/0")
        for error, words in (
            (redis.AuthenticationError(f"invalid password {PASSWORD}"), "refused the password"),
            (redis.ResponseError(f"WRONGPASS {PASSWORD}"), "refused the password"),
            (redis.ConnectionError(f"refused {PASSWORD}"), "cannot connect"),
            (redis.TimeoutError(PASSWORD), "did not answer in time"),
            (RuntimeError(PASSWORD), "failed (RuntimeError)"),
        ):
            problem = _problemOf(error, target)
            self.assertIn(words, problem)
            self.assertIn("redis://127.0.0.1:1/0", problem)
            self.assertNotIn(PASSWORD, problem)

    def test_defaultInstanceName(self):
        """
        By default an instance is named by its host and first port.
        """
        import socket

        host = socket.gethostname()
        self.assertEqual(defaultInstanceName(["tcp:3333:interface=127.0.0.1"]), f"{host}:3333")
        self.assertEqual(defaultInstanceName(["unix:/run/h.sock", "tcp:1"]), f"{host}:/run/h.sock")
        self.assertEqual(defaultInstanceName([]), f"{host}:3333")


class _Instance:
    """
    The parts of one hermux that share the pool: a key pool, a client book
    and a throttle, linked to Redis.
    """

    def __init__(self, testCase, server, name, *, prefix="hermux-test", url=None, caFile=None):
        self.pool = KeyPool(KEYS, ledger=MemoryLedger(), reactor=reactor)
        self.book = ClientBook(MemoryLedger(), reactor=reactor)
        self.throttle = AuthThrottle(3, reactor=reactor)
        target = parseRedisURL(url or server.url)
        if caFile is not None:
            target = target.withCA(caFile)
        self.shared = SharedPool(
            target,
            pool=self.pool,
            book=self.book,
            throttle=self.throttle,
            instance=name,
            prefix=prefix,
            reactor=reactor,
        )
        self.shared.syncInterval = 0.05
        self.shared.startService()
        testCase.addCleanup(lambda: self.shared.running and self.shared.stopService())


class SharedPoolTests(TestCase):
    async def setUp(self):
        self.server = RedisServer(self)
        await self.server.start()

    async def connected(self, *instances):
        await waitUntil(lambda: all(i.shared.problem() is None for i in instances))

    async def test_countsAreSummed(self):
        """
        Each instance sees the others' requests per key, and least-used
        spreads over the pool's sum; each reports only its own.
        """
        a, b = _Instance(self, self.server, "a"), _Instance(self, self.server, "b")
        await self.connected(a, b)
        for _ in range(4):
            a.pool.acquire().close()
        await waitUntil(lambda: sum(s.requestsToday for s in b.pool.statuses()) == 4)
        self.assertEqual(b.pool.ownCounts(), {"alpha": (0, 0, 0, 0, 0), "beta": (0, 0, 0, 0, 0)})
        chosen = {b.pool.acquire().key.name for _ in range(2)}
        self.assertEqual(chosen, {"alpha", "beta"})

    async def test_lastCountsOnStop(self):
        """
        An instance that stops writes its last counts first.
        """
        a, b = _Instance(self, self.server, "a"), _Instance(self, self.server, "b")
        await self.connected(a, b)
        # After the next exchange, a writes nothing for a minute.
        a.shared.syncInterval = 60
        await sleep(0.3)
        a.pool.acquire().close()
        await a.shared.stopService()
        await waitUntil(lambda: sum(s.requestsToday for s in b.pool.statuses()) == 1)

    async def test_verdictsReachTheOthers(self):
        """
        A verdict applied on one instance reaches the others, and keeps
        the key from their requests too; a reinstatement too.
        """
        a, b = _Instance(self, self.server, "a"), _Instance(self, self.server, "b")
        await self.connected(a, b)
        attempt = a.pool.acquire(exclude={"beta"})
        attempt.report(Verdict(Kind.EXHAUSTED, until=reactor.seconds() + 3600, reason="spent (429)"))
        await waitUntil(lambda: b.pool.statuses()[0].state.value == "exhausted")
        self.assertEqual({b.pool.acquire().key.name for _ in range(4)}, {"beta"})
        a.pool.acquire(exclude={"alpha"}).report(Verdict(Kind.DISABLED, reason="refused (401)"))
        await waitUntil(lambda: b.pool.statuses()[1].state.value == "disabled")
        a.pool.reinstate(KEYS[1], "accepted again")
        await waitUntil(lambda: b.pool.statuses()[1].state.value == "ready")

    async def test_restartedEmpty(self):
        """
        A Redis restarted empty gets every instance's counts and states in
        force again, nothing doubled.
        """
        a, b = _Instance(self, self.server, "a"), _Instance(self, self.server, "b")
        await self.connected(a, b)
        for _ in range(3):
            a.pool.acquire().close()
        a.pool.acquire(exclude={"beta"}).report(Verdict(Kind.EXHAUSTED, until=reactor.seconds() + 3600))
        await self.server.kill()
        await waitUntil(lambda: b.shared.problem() is not None)
        await self.server.start()
        await self.connected(a, b)
        c = _Instance(self, self.server, "c")
        await self.connected(c)
        await waitUntil(lambda: sum(s.requestsToday for s in c.pool.statuses()) == 4)
        await waitUntil(lambda: c.pool.statuses()[0].state.value == "exhausted")
        await waitUntil(lambda: sum(s.requestsToday for s in b.pool.statuses()) == 4)
        # Written again and again, counted once.
        await sleep(0.3)
        for instance in (b, c):
            self.assertEqual(sum(s.requestsToday for s in instance.pool.statuses()), 4)

    async def test_dailyRequestsExact(self):
        """
        A client's daily_requests holds across instances: the pool-wide
        check admits exactly that many, wherever they arrive.
        """
        a, b = _Instance(self, self.server, "a"), _Instance(self, self.server, "b")
        await self.connected(a, b)
        entry = ClientEntry(name="bot", token="hx-shared-bot-token-1", dailyRequests=5)
        bot = Client("bot", entry)
        admitted = refused = 0
        for i in range(12):
            instance = (a, b)[i % 2]
            try:
                admission = instance.book.admit(bot)
            except LimitRefusal:
                refused += 1
                continue
            try:
                await instance.book.confirm(bot, admission)
            except LimitRefusal:
                refused += 1
            else:
                admitted += 1
                admission.release()
        self.assertEqual((admitted, refused), (5, 7))

    async def test_perMinuteAndCostPoolWide(self):
        """
        A client's per_minute and daily_cost count its requests and credits
        on every instance, a moment behind.
        """
        a, b = _Instance(self, self.server, "a"), _Instance(self, self.server, "b")
        await self.connected(a, b)
        bot = Client("bot", ClientEntry(name="bot", token="hx-shared-bot-2", perMinute=3, dailyCost=10))
        for _ in range(2):
            a.book.admit(bot).release()
        a.book.counted(dayOf(reactor.seconds()), "bot", Counts(cost=6))
        await waitUntil(lambda: b.book.today("bot")[0] == 2)
        b.book.admit(bot).release()
        refusal = self.assertRaises(LimitRefusal, b.book.admit, bot)
        self.assertEqual(refusal.limit, "per_minute")
        self.assertIn(refusal.retryAfter, (59, 60))
        b.book.counted(dayOf(reactor.seconds()), "bot", Counts(cost=4))
        await waitUntil(lambda: a.book.today("bot")[1].cost == 10)
        self.assertEqual(self.assertRaises(LimitRefusal, a.book.admit, bot).limit, "daily_cost")

    async def test_failedTokensMerged(self):
        """
        Failed access tokens from one address on different instances add up.
        """
        a, b = _Instance(self, self.server, "a"), _Instance(self, self.server, "b")
        await self.connected(a, b)
        from twisted.internet.address import IPv4Address

        guesser = IPv4Address("TCP", "192.0.2.7", 1234)
        a.throttle.failed(guesser)
        b.throttle.failed(guesser)
        await waitUntil(lambda: len(a.throttle._failed.get("192.0.2.7", ())) == 2)
        self.assertIsNone(a.throttle.retryAfter(guesser))
        # The third of the pool's failures throttles the address, here and
        # on the other instance.
        self.assertTrue(a.throttle.failed(guesser))
        await waitUntil(lambda: b.throttle.retryAfter(guesser) is not None)

    async def test_unreachableThenRecovers(self):
        """
        With Redis unreachable, an instance says why and keeps working on
        its own counts; it connects when Redis comes, with its counts.
        """
        await self.server.stop()
        a = _Instance(self, self.server, "a")
        await waitUntil(lambda: a.shared.problem() is not None and "cannot connect" in a.shared.problem())
        a.pool.acquire(Use()).close()
        await self.server.start()
        b = _Instance(self, self.server, "b")
        await self.connected(a, b)
        await waitUntil(lambda: sum(s.requestsToday for s in b.pool.statuses()) == 1)

    async def test_degradedLoggedOnce(self):
        """
        While Redis cannot be reached the log says so once (a minute),
        however many tries fail, and once when it is reached again.
        """
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def said(words):
            return [e for e in events if e.get("log_namespace") == "hermux.shared.SharedPool"
                    and words in e.get("log_format", "")]

        await self.server.stop()
        a = _Instance(self, self.server, "a")
        await sleep(1.5)
        self.assertEqual(len(said("degraded")), 1)
        await self.server.start()
        await self.connected(a)
        await sleep(0.3)
        self.assertEqual(len(said("shared through Redis")), 1)
        self.assertEqual(said("shared through Redis")[0]["again"], " again")

    async def test_wrongPassword(self):
        """
        A wrong password is a problem that says so, without the password.
        """
        await self.server.stop()
        self.server.password = PASSWORD
        await self.server.start()
        a = _Instance(self, self.server, "a", url=f"redis://:wrong-{PASSWORD}@127.0.0.1:{self.server.port}/0")
        await waitUntil(lambda: a.shared.problem() is not None and "password" in a.shared.problem())
        self.assertNotIn(PASSWORD, a.shared.problem())
        b = _Instance(self, self.server, "b", url=f"redis://:{PASSWORD}@127.0.0.1:{self.server.port}/0")
        await self.connected(b)

    async def test_prefixesSeparatePools(self):
        """
        Two pools with different prefixes share one Redis, not their counts.
        """
        a = _Instance(self, self.server, "a", prefix="one")
        b = _Instance(self, self.server, "b", prefix="two")
        await self.connected(a, b)
        a.pool.acquire().close()
        c = _Instance(self, self.server, "c", prefix="one")
        await self.connected(c)
        await waitUntil(lambda: sum(s.requestsToday for s in c.pool.statuses()) == 1)
        self.assertEqual(sum(s.requestsToday for s in b.pool.statuses()), 0)



class _TLSRedisServer(RedisServer):
    """
    A redis-server that also serves TLS, on C{tlsPort}, with a certificate
    for C{hostname} from a throwaway CA (its PEM in C{caFile}).
    """

    def __init__(self, testCase, hostname: str):
        super().__init__(testCase)
        from tests.harness import closedFreePort, issueCertificates

        ca, server = issueCertificates(hostname)
        self.tlsPort = closedFreePort()
        self.caFile = os.path.join(self.directory, "ca.pem")
        self._certFile = os.path.join(self.directory, "server.pem")
        with open(self.caFile, "wb") as f:
            f.write(ca.dumpPEM())
        with open(self._certFile, "wb") as f:
            f.write(server.dumpPEM())

    def arguments(self) -> list[str]:
        return super().arguments() + [
            "--tls-port", str(self.tlsPort),
            "--tls-cert-file", self._certFile,
            "--tls-key-file", self._certFile,
            "--tls-ca-cert-file", self.caFile,
            "--tls-auth-clients", "no",
        ]


class RedisTLSTests(TestCase):
    """
    rediss://: the certificate is verified, against --redis-ca or the
    system's trust store, and its name too.
    """

    async def test_verified(self):
        server = _TLSRedisServer(self, "localhost")
        await server.start()
        url = f"rediss://localhost:{server.tlsPort}/0"
        trusting = _Instance(self, server, "trusting", url=url, caFile=server.caFile)
        untrusting = _Instance(self, server, "untrusting", url=url)
        await waitUntil(lambda: trusting.shared.problem() is None)
        await waitUntil(lambda: "TLS certificate" in (untrusting.shared.problem() or ""))

    async def test_nameChecked(self):
        server = _TLSRedisServer(self, "redis.example")
        await server.start()
        url = f"rediss://localhost:{server.tlsPort}/0"
        misnamed = _Instance(self, server, "misnamed", url=url, caFile=server.caFile)
        await waitUntil(lambda: "TLS certificate" in (misnamed.shared.problem() or ""))


class _SocketRedisServer(RedisServer):
    """
    A redis-server that also listens on a UNIX socket, C{socketPath}.
    """

    def __init__(self, testCase):
        super().__init__(testCase)
        self.socketPath = os.path.join(self.directory, "redis.sock")

    def arguments(self) -> list[str]:
        return super().arguments() + ["--unixsocket", self.socketPath, "--unixsocketperm", "700"]


class RedisSocketTests(TestCase):
    async def test_unixSocket(self):
        """
        unix:///path reaches a Redis on its UNIX socket.
        """
        server = _SocketRedisServer(self)
        await server.start()
        url = f"unix://{server.socketPath}?db=1"
        a = _Instance(self, server, "a", url=url)
        b = _Instance(self, server, "b", url=url)
        await waitUntil(lambda: a.shared.problem() is None and b.shared.problem() is None)
        a.pool.acquire().close()
        await waitUntil(lambda: sum(s.requestsToday for s in b.pool.statuses()) == 1)
