"""
What operators reach for: reloading the configuration, stopping without
dropping requests, metrics, TLS listening and request ids.
"""

from __future__ import annotations

import gc
import json
import os
import signal

import treq
from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet import reactor
from twisted.internet.error import ConnectionRefusedError, ProcessDone
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import TestCase
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseNeverReceived,
)

from hermux.config import Key
from hermux.keypool import Kind, State, Verdict, dayOf
from hermux.ledger import Counts, MemoryLedger, SQLiteLedger
from hermux.lifecycle import HermuxService
from tests.harness import (
    ACCESS_TOKEN,
    DEMO_TOKEN,
    KEYS,
    SECRETS,
    Proxy,
    demoArguments,
    issueCertificates,
    runTwistd,
    sleep,
    waitUntil,
)

ALPHA, BETA, GAMMA = KEYS
DELTA = Key("delta", "sk-or-v1-test-delta-9f8e7d6c5b4a")
OTHER_TOKEN = "test-access-token-other-3Kq8"


def writeKeys(path, keys):
    with open(path, "w") as f:
        f.write("name,token,daily_limit\n")
        for key in keys:
            limit = "" if key.dailyLimit is None else key.dailyLimit
            f.write(f'{key.name},"{key.token}",{limit}\n')


def writeAllow(path, tokens):
    with open(path, "w") as f:
        f.write("\n".join(tokens) + "\n")


class ReloadTests(TestCase):
    def setUp(self):
        self.tokens = os.path.abspath(self.mktemp())
        self.allow = os.path.abspath(self.mktemp())
        writeKeys(self.tokens, KEYS)
        writeAllow(self.allow, [ACCESS_TOKEN, OTHER_TOKEN])
        self.ledger = MemoryLedger()
        # Earlier today, before a restart, a key named delta was in use.
        self.ledger.add(dayOf(reactor.seconds()), "delta", "-", "-", Counts(requests=1))
        self.proxy = Proxy(
            self,
            accessTokens=(ACCESS_TOKEN, OTHER_TOKEN),
            ledger=self.ledger,
            tokensPath=self.tokens,
            allowPath=self.allow,
        )
        self.reloader = self.proxy.reloader
        self.reloaded = []
        self.reloader.onReload = self.reloaded.append

    async def served(self, n=1, token=ACCESS_TOKEN):
        names = []
        for _ in range(n):
            response = await self.proxy.request("GET", "/api/v1/models", token=token)
            await response.content()
            self.assertEqual(response.code, 200)
            names.extend(response.headers.getRawHeaders("X-Token-Name"))
        return names

    async def test_keysKeepTheirCountsByName(self):
        """
        After a reload, keys that stay keep today's counts, removed keys are
        no longer chosen, and new keys start at today's count for their
        name; the log names what changed and no secret.
        """
        await self.served(6)
        before = self.proxy.pool.requestCounts()
        newBeta = Key("beta", "sk-or-v1-test-beta-rotated-000111")
        writeKeys(self.tokens, [ALPHA, newBeta, DELTA])
        with capturedLogs() as events:
            self.assertTrue(await self.reloader.reload())
        self.assertEqual(
            self.proxy.pool.requestCounts(),
            {"alpha": before["alpha"], "beta": before["beta"], "delta": 1},
        )
        # The fake accepts the new tokens too: one request now disables at
        # most two keys the upstream refuses (the breaker), so a fake that
        # refused them would fail requests rather than exercise the reload.
        self.proxy.fake.keys = None
        self.assertNotIn("gamma", await self.served(9))
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn("keys added: delta", text)
        self.assertIn("keys removed: gamma", text)
        self.assertIn("keys with a new token: beta", text)
        for secret in SECRETS + (newBeta.token, DELTA.token):
            self.assertNotIn(secret, text + repr(events))
        self.assertEqual(self.reloaded, [True])

    async def test_refusedKeyGetsAnotherChance(self):
        """
        A key disabled until the configuration is reloaded is ready again
        after a reload.
        """
        self.proxy.pool.report(ALPHA, Verdict(Kind.DISABLED, None, "refused (401)"))
        await self.reloader.reload()
        [alpha] = [s for s in self.proxy.pool.statuses() if s.name == "alpha"]
        self.assertEqual(alpha.state, State.READY)

    async def test_removedAccessTokenIsRefused(self):
        await self.served(1, token=OTHER_TOKEN)
        writeAllow(self.allow, [ACCESS_TOKEN, "test-access-token-new-77"])
        with capturedLogs() as events:
            await self.reloader.reload()
        response = await self.proxy.request("GET", "/api/v1/models", token=OTHER_TOKEN)
        await response.content()
        self.assertEqual(response.code, 401)
        await self.served(1, token="test-access-token-new-77")
        await self.served(1)
        self.assertIn("access tokens: 1 added, 1 removed", "\n".join(formatEvent(e) for e in events))

    async def test_badFileKeepsTheConfiguration(self):
        """
        A file with an error is rejected whole, with a log line naming file
        and line, and the old configuration keeps working.
        """
        writeKeys(self.tokens, [ALPHA, DELTA])
        with open(self.tokens, "a") as f:
            f.write('alpha,"sk-or-v1-duplicate-name",\n')
        writeAllow(self.allow, [OTHER_TOKEN])
        with capturedLogs() as events:
            self.assertFalse(await self.reloader.reload())
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn(f"{self.tokens}, line 4: duplicate name 'alpha'", text)
        self.assertEqual({k.name for k in self.proxy.pool.keys}, {"alpha", "beta", "gamma"})
        await self.served(3)
        self.assertEqual(self.reloaded, [False])
        self.assertNotIn("sk-or-v1-duplicate-name", text)

    async def test_sighupReloads(self):
        self.reloader.startService()
        self.addCleanup(self.reloader.stopService)
        writeKeys(self.tokens, [ALPHA])
        os.kill(os.getpid(), signal.SIGHUP)
        await waitUntil(lambda: [k.name for k in self.proxy.pool.keys] == ["alpha"])

    async def test_reloadUnderLoad(self):
        """
        Requests in flight while the configuration is reloaded, well or
        badly, all complete; the bad file leaves the old one working.
        """
        self.proxy.fake.keys = None
        self.proxy.fake.eventInterval = 0.01
        streams = [self.proxy.chat(stream=True) for _ in range(20)]
        await waitUntil(lambda: len(self.proxy.fake.received) >= 10)
        writeKeys(self.tokens, [ALPHA, DELTA])
        self.assertTrue(await self.reloader.reload())
        with open(self.tokens, "w") as f:
            f.write("name,token\nbroken\n")
        self.assertFalse(await self.reloader.reload())
        more = [self.proxy.chat(stream=True) for _ in range(10)]
        for pending in streams + more:
            response = await pending
            self.assertEqual(response.code, 200)
            self.assertTrue((await response.content()).endswith(b"data: [DONE]\n\n"))
        self.assertEqual({k.name for k in self.proxy.pool.keys}, {"alpha", "delta"})


class _PortService(Service):
    """
    A listener for tests: like strports' service, but it says its port.
    """

    def __init__(self, site):
        self._site = site
        self.port = None

    def startService(self):
        super().startService()
        self.port = reactor.listenTCP(0, self._site, interface="127.0.0.1")

    def stopService(self):
        super().stopService()
        return self.port.stopListening()


class DrainTests(TestCase):
    def build(self, drainTimeout=5.0, **kwargs):
        self.ledger = SQLiteLedger(os.path.abspath(self.mktemp()))
        self.proxy = Proxy(self, ledger=self.ledger, **kwargs)
        service = HermuxService(self.proxy.site, drainTimeout=drainTimeout)
        self.ledger.setServiceParent(service)
        listener = _PortService(self.proxy.site)
        service.addListener(listener)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        port = listener.port.getHost().port
        self.url = lambda path: f"http://127.0.0.1:{port}{path}"
        return service

    def client(self, persistent=False):
        pool = HTTPConnectionPool(reactor, persistent=persistent)
        self.addCleanup(pool.closeCachedConnections)
        return HTTPClient(Agent(reactor, pool=pool))

    def chat(self, client, stream=True):
        return client.post(
            self.url("/api/v1/chat/completions"),
            data=json.dumps({"model": "m", "messages": [], "stream": stream}).encode(),
            headers={"Authorization": f"Bearer {ACCESS_TOKEN}"},
            unbuffered=True,
        )

    async def test_inFlightRequestsFinish(self):
        """
        Stopping stops accepting at once, lets a streaming response in
        flight finish, then writes the final counts.
        """
        service = self.build()
        self.proxy.fake.eventInterval = 0.05
        client = self.client()
        response = await self.chat(client)
        received = []
        done = treq.collect(response, received.append)
        stopped = service.stopService()
        await sleep(0.05)
        await self.assertFailure(self.chat(self.client()), ConnectionRefusedError)
        self.assertFalse(done.called)
        await done
        await stopped
        self.assertTrue(b"".join(received).endswith(b"data: [DONE]\n\n"))
        restarted = SQLiteLedger(self.ledger.path)
        self.assertEqual(sum(u.requests for u in restarted.keyUsage(dayOf(reactor.seconds())).values()), 1)

    async def test_stragglersAreAborted(self):
        """
        A request still running at the drain timeout is aborted, upstream
        too, and the stop completes.
        """
        service = self.build(drainTimeout=0.3)
        self.proxy.fake.stallNext()
        pending = self.chat(self.client())
        await waitUntil(lambda: self.proxy.fake.received)
        started = reactor.seconds()
        await service.stopService()
        self.assertLess(reactor.seconds() - started, 3.0)
        await self.assertFailure(pending, ResponseNeverReceived)
        await self.proxy.fake.received[0].lost

    async def test_startupObjectsFrozenWhileServing(self):
        """
        While hermux serves, what startup made is frozen out of the garbage
        collector's sight; it is put back when hermux stops.
        """
        service = self.build()
        self.assertGreater(gc.get_freeze_count(), 0)
        await service.stopService()
        self.assertEqual(gc.get_freeze_count(), 0)

    async def test_idleConnectionsCloseAtOnce(self):
        service = self.build(drainTimeout=20.0)
        client = self.client(persistent=True)
        response = await client.get(self.url("/hermux/health"))
        await response.content()
        self.assertEqual(len(self.proxy.site.channels), 1)
        started = reactor.seconds()
        await service.stopService()
        self.assertLess(reactor.seconds() - started, 3.0)


class SIGTERMTests(TestCase):
    timeout = 60

    async def test_drainsAndExitsZero(self):
        """
        SIGTERM lets a streaming response in flight finish, then twistd
        exits with status 0.
        """
        child = runTwistd(self, *demoArguments(self, "--listen", "tcp:0:interface=127.0.0.1"))
        port = await child.port()
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        client = HTTPClient(Agent(reactor, pool=pool))
        response = await client.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=b'{"model": "m", "messages": [], "stream": true}',
            headers={"Authorization": f"Bearer {DEMO_TOKEN}"},
            unbuffered=True,
        )
        body = treq.content(response)
        child.kill("TERM")
        self.assertTrue((await body).endswith(b"data: [DONE]\n\n"))
        ended = await child.ended
        self.assertIsInstance(ended, ProcessDone)
        self.assertIn(b"waiting up to 30.0s for 1 requests in flight", child.output)


def metricValues(text: str) -> dict[tuple, float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


class MetricsTests(TestCase):
    async def scrape(self, proxy) -> dict:
        response = await proxy.request("GET", "/hermux/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders("Content-Type")[0].startswith("text/plain"))
        text = (await response.content()).decode()
        for secret in SECRETS:
            self.assertNotIn(secret, text)
        return metricValues(text)

    async def test_afterAKnownSequence(self):
        proxy = Proxy(self)
        proxy.fake.answerNext(
            429,
            {
                "error": {
                    "code": 429,
                    "message": "Rate limit exceeded: free-models-per-day.",
                    "metadata": {"headers": {"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0"}},
                }
            },
            key=ALPHA.token,
            times=None,
        )
        proxy.fake.answerNext(502, {"error": {"code": 502, "message": "down"}}, key=BETA.token, times=None)
        proxy.fake.answerNext(400, {"error": {"code": 400, "message": "bad"}}, key=GAMMA.token, times=1)
        statuses = []
        for _ in range(4):
            response = await proxy.chat(model="test/model:free")
            await response.content()
            statuses.append((response.code, response.headers.getRawHeaders("X-Token-Name")[0]))
        unauthorized = await proxy.request("GET", "/api/v1/models", token="wrong")
        await unauthorized.content()
        proxy.metrics.reloaded(True)
        values = await self.scrape(proxy)

        def served(key, status):
            return values.get(("hermux_requests_total", (("key", key), ("status", status))), 0)

        byKey = {}
        for code, name in statuses:
            byKey.setdefault((name, f"{code // 100}xx"), 0)
            byKey[(name, f"{code // 100}xx")] += 1
        for (name, status), count in byKey.items():
            self.assertEqual(served(name, status), count, (name, status))
        self.assertEqual(served("none", "4xx"), 1)
        alphaTried = sum(1 for r in proxy.fake.received if r.key == ALPHA.token)
        self.assertEqual(values[("hermux_retries_total", (("reason", "exhausted"),))], alphaTried)
        # Kept from free-model requests only, it is still ready for paid ones.
        self.assertEqual(alphaTried, 1)
        self.assertEqual(values[("hermux_key_state", (("key", "alpha"), ("state", "ready")))], 1)
        self.assertEqual(values[("hermux_key_state", (("key", "beta"), ("state", "ready")))], 1)
        self.assertEqual(
            values[("hermux_upstream_ttfb_seconds_count", ())], len(proxy.fake.received)
        )
        self.assertEqual(
            sum(values[("hermux_key_requests_today", (("key", k.name),))] for k in KEYS),
            len(proxy.fake.received),
        )
        self.assertEqual(values[("hermux_config_reloads_total", (("result", "ok"),))], 1)
        self.assertEqual(values[("hermux_requests_in_flight", ())], 1)  # the scrape itself
        self.assertGreater(values[("hermux_relayed_bytes_total", ())], 0)

    async def test_needsAToken(self):
        proxy = Proxy(self)
        response = await proxy.request("GET", "/hermux/metrics", token=None)
        self.assertEqual(response.code, 401)
        await response.content()


class RequestIdTests(TestCase):
    async def test_generated(self):
        proxy = Proxy(self)
        with capturedLogs() as events:
            response = await proxy.chat()
            await response.content()
        [requestId] = response.headers.getRawHeaders("X-Request-Id")
        self.assertRegex(requestId, r"^[0-9a-f]{16}$")
        [line] = [e for e in events if e.get("log_namespace") == "hermux.site.HermuxRequest"]
        self.assertEqual(line["requestId"], requestId)
        self.assertTrue(formatEvent(line).startswith(requestId))

    async def test_clientsSaneIdIsKept(self):
        proxy = Proxy(self)
        proxy.fake.answerNext(200, {"ok": True}, headers={"X-Request-Id": "upstream-says"})
        response = await proxy.request("GET", "/api/v1/models", headers={"X-Request-Id": "trace-42.a:b"})
        await response.content()
        self.assertEqual(response.headers.getRawHeaders("X-Request-Id"), ["trace-42.a:b"])

    async def test_insaneIdIsReplaced(self):
        proxy = Proxy(self)
        for bad in ("x" * 65, "has space", "semi;colon", ""):
            response = await proxy.request("GET", "/hermux/health", headers={"X-Request-Id": bad})
            await response.content()
            [requestId] = response.headers.getRawHeaders("X-Request-Id")
            self.assertRegex(requestId, r"^[0-9a-f]{16}$")


class TLSListenTests(TestCase):
    timeout = 60

    async def test_servesOnEveryListen(self):
        """
        --listen given twice, once ssl: with a certificate made here, once
        tcp:, serves on both.
        """
        ca, server = issueCertificates("localhost")
        pem = os.path.abspath(self.mktemp())
        with open(pem, "wb") as f:
            f.write(server.dumpPEM())
        child = runTwistd(
            self,
            *demoArguments(
                self,
                "--listen", f"ssl:0:interface=127.0.0.1:privateKey={pem}",
                "--listen", "tcp:0:interface=127.0.0.1",
            ),
        )
        tlsPort = await child.port(tls=True)
        tcpPort = await child.port()
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        client = HTTPClient(
            Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=ca), pool=pool)
        )
        for url in (f"https://localhost:{tlsPort}/v1/models", f"http://127.0.0.1:{tcpPort}/v1/models"):
            response = await client.get(url, headers={"Authorization": f"Bearer {DEMO_TOKEN}"})
            self.assertEqual(response.code, 200, url)
            self.assertIn("hermux/fake-model", (await response.content()).decode())
        child.kill("TERM")
        self.assertIsInstance(await child.ended, ProcessDone)
