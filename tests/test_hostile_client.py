"""
Clients that attack hermux, over real loopback sockets, in front of a raw
upstream that records exactly the bytes it receives.  Every attack must
get a valid HTTP error or a closed connection, forward nothing it should
not, and leave hermux serving.

The channel's rules are tested one by one in memory in test_site.py;
here they are tested the way an attacker meets them.
"""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from hermux.channel import MAX_HEAD_BYTES
from tests.harness import ACCESS_TOKEN, KEYS, Proxy, sleep, waitUntil
from tests.rawhttp import RawUpstream, connectRaw, splitResponse

TOKEN = ACCESS_TOKEN.encode()
AUTHORIZATION = b"Authorization: Bearer " + TOKEN + b"\r\n"
KEY_TOKENS = {key.token.encode() for key in KEYS}
SMUGGLED = b"GET /api/v1/smuggled HTTP/1.1\r\nHost: x\r\n" + AUTHORIZATION + b"\r\n"


class HostileTestCase(TestCase):
    def setUp(self):
        self.upstream = RawUpstream(self)

    def proxy(self, **kwargs) -> Proxy:
        return Proxy(self, upstreamBase=self.upstream.base, **kwargs)

    async def exchange(self, proxy: Proxy, data: bytes, *, wait: float = 5.0) -> bytes:
        """
        Send C{data} on a new connection; collect the answer until hermux
        closes the connection (failing after C{wait} seconds).
        """
        client = await connectRaw(proxy.portNumber, data)
        await waitUntil(lambda: client.closed.called, timeout=wait)
        return client.received

    async def assertStillServing(self, proxy: Proxy):
        answer = await self.exchange(
            proxy, b"GET /api/v1/models HTTP/1.1\r\n" + AUTHORIZATION + b"Connection: close\r\n\r\n"
        )
        self.assertEqual(splitResponse(answer)[0], 200)
        self.assertEqual(self.upstream.malformed, [])

    def assertError(self, answer: bytes, *codes: int) -> int:
        """
        C{answer} is exactly one of hermux's JSON errors, with one of
        C{codes}, and nothing after it.
        """
        status, headers, body = splitResponse(answer)
        self.assertIn(status, codes, answer[:300])
        self.assertEqual(headers[b"x-hermux-error"], [b"%d" % (status,)])
        self.assertEqual(len(body), int(headers[b"content-length"][0]), answer)
        self.assertEqual(json.loads(body)["error"]["code"], status)
        return status


class SmugglingTests(HostileTestCase):
    """
    Requests whose length two parsers could read differently are refused
    and never reach the upstream as two requests.
    """

    SHAPES = {
        "Content-Length then Transfer-Encoding": (
            b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\n" + SMUGGLED
        ),
        "Transfer-Encoding then Content-Length": (
            b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
            b"0\r\n\r\n" + SMUGGLED
        ),
        "two equal Content-Lengths": (
            b"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}" + SMUGGLED
        ),
        "two different Content-Lengths": (
            b"Content-Length: 2\r\nContent-Length: %d\r\n\r\n{}" % (len(SMUGGLED),) + SMUGGLED
        ),
        "a Content-Length list": b"Content-Length: 2, 2\r\n\r\n{}" + SMUGGLED,
        "a signed Content-Length": b"Content-Length: +2\r\n\r\n{}" + SMUGGLED,
        "a hex Content-Length": b"Content-Length: 0x2\r\n\r\n{}" + SMUGGLED,
        "Transfer-Encoding twice": (
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\n{}\r\n0\r\n\r\n" + SMUGGLED
        ),
        "chunked, then another coding": (
            b"Transfer-Encoding: chunked, identity\r\n\r\n2\r\n{}\r\n0\r\n\r\n" + SMUGGLED
        ),
        "an unknown coding": b"Transfer-Encoding: xchunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n" + SMUGGLED,
        "a folded Transfer-Encoding": (
            b"Transfer-Encoding:\r\n chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n" + SMUGGLED
        ),
        "a space before the colon": (
            b"Transfer-Encoding : chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n" + SMUGGLED
        ),
        "a hex prefix in a chunk size": b"Transfer-Encoding: chunked\r\n\r\n0x2\r\n{}\r\n0\r\n\r\n" + SMUGGLED,
        "a negative chunk size": b"Transfer-Encoding: chunked\r\n\r\n-2\r\n{}\r\n0\r\n\r\n" + SMUGGLED,
        "a chunk size with junk": b"Transfer-Encoding: chunked\r\n\r\n2 x\r\n{}\r\n0\r\n\r\n" + SMUGGLED,
        "a chunk without its CRLF": (
            b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n" + SMUGGLED
        ),
        "a chunk size ended by LF alone": b"Transfer-Encoding: chunked\r\n\r\n2\n{}\r\n0\r\n\r\n" + SMUGGLED,
        "a bad chunk extension": (
            b"Transfer-Encoding: chunked\r\n\r\n2;\x00\r\n{}\r\n0\r\n\r\n" + SMUGGLED
        ),
    }

    async def test_ambiguousFraming(self):
        proxy = self.proxy()
        for shape, rest in self.SHAPES.items():
            answer = await self.exchange(
                proxy, b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: h\r\n" + AUTHORIZATION + rest
            )
            self.assertError(answer, 400)
            self.assertEqual(answer.count(b"HTTP/1.1 "), 1, shape)
            self.assertEqual(self.upstream.requests, [], shape)
        await self.assertStillServing(proxy)
        self.assertNotIn(b"/smuggled", b"".join(c.received for c in self.upstream.connections))

    async def test_hugeChunkSize(self):
        """
        A chunk size past any limit swallows everything after it as body:
        nothing is smuggled, and the request gets 413 when its body passes
        --max-body, or 408 when it has not arrived in --client-timeout.
        """
        proxy = self.proxy(clientTimeout=1.0, maxBody=1000)
        head = b"POST /api/v1/chat/completions HTTP/1.1\r\n" + AUTHORIZATION
        answer = await self.exchange(
            proxy,
            head + b"Transfer-Encoding: chunked\r\n\r\n10000000000000002\r\n{}\r\n0\r\n\r\n"
            + SMUGGLED,
        )
        self.assertError(answer, 408)
        answer = await self.exchange(
            proxy,
            head + b"Transfer-Encoding: chunked\r\n\r\n10000000000000002\r\n" + b"x" * 2000,
        )
        self.assertError(answer, 413)
        self.assertEqual(self.upstream.requests, [])

    async def test_pipelinedRequestsStayApart(self):
        """
        Two well-framed requests sent together are answered in order and
        reach the upstream as the same two requests, bodies intact.
        """
        proxy = self.proxy()
        first = b'{"first": true}'
        second = b'{"second": true, "text": "GET /api/v1/x HTTP/1.1\\r\\n"}'
        answer = await self.exchange(
            proxy,
            b"POST /api/v1/chat/completions HTTP/1.1\r\n" + AUTHORIZATION
            + b"Content-Length: %d\r\n\r\n" % (len(first),) + first
            + b"POST /v1/chat/completions HTTP/1.1\r\n" + AUTHORIZATION
            + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(second), second),
        )
        self.assertEqual(answer.count(b"HTTP/1.1 200 OK"), 2)
        self.assertEqual([r.body for r in self.upstream.requests], [first, second])
        self.assertEqual(
            [r.target for r in self.upstream.requests],
            [b"/api/v1/chat/completions", b"/api/v1/chat/completions"],
        )


class TargetTests(HostileTestCase):
    """
    Nothing in the request line or the headers changes the upstream host
    or lets a request leave /api/.
    """

    TARGETS = (
        b"http://evil.invalid/api/v1/models",
        b"https://evil.invalid:443/api/v1/models",
        b"http://127.0.0.1:1/api/v1/models",
        b"//evil.invalid/api/v1/models",
        b"/@evil.invalid/api/v1/models",
        b"@evil.invalid/api/v1/models",
        b"evil.invalid:443",
        b"*",
        b"/api/v1/../../hermux/health",
        b"/api/%2e%2e/hermux/health",
        b"/api/v1/models%2f..%2f..%2fx",
        b"/api%2fv1/models",
        b"/v1/%2e%2e/%2e%2e/x",
        b"/v1/..%5c..%5cx",
        b"/api/v1/models%00",
        b"/api/v1/models#fragment",
        b"/api\\v1\\models",
    )

    async def test_trickyTargetsAreNotForwarded(self):
        proxy = self.proxy()
        for target in self.TARGETS:
            for method in (b"GET", b"CONNECT", b"OPTIONS"):
                answer = await self.exchange(
                    proxy,
                    method + b" " + target + b" HTTP/1.1\r\nHost: evil.invalid\r\n"
                    + AUTHORIZATION + b"Connection: close\r\n\r\n",
                )
                # "*" gets Twisted's own 405 (or 200 for OPTIONS), without
                # hermux's error shape; everything else one of hermux's.
                status, headers, body = splitResponse(answer)
                if target == b"*":
                    self.assertIn(status, (200, 405))
                else:
                    self.assertError(answer, 400, 404, 405)
        self.assertEqual(self.upstream.requests, [])
        await self.assertStillServing(proxy)

    async def test_hostHeadersAreNotUsed(self):
        """
        Host, X-Forwarded-Host and the like, however many, reach neither
        the connection hermux makes nor the Host it sends.
        """
        proxy = self.proxy()
        answer = await self.exchange(
            proxy,
            b"GET /api/v1/models HTTP/1.1\r\nHost: evil.invalid\r\nHost: evil2.invalid\r\n"
            b"X-Forwarded-Host: evil3.invalid\r\nForwarded: host=evil4.invalid\r\n"
            + AUTHORIZATION + b"Connection: close\r\n\r\n",
        )
        self.assertEqual(splitResponse(answer)[0], 200)
        [received] = self.upstream.requests
        self.assertEqual(received.values(b"Host"), [self.upstream.base.split(b"//")[1]])
        self.assertEqual(received.target, b"/api/v1/models")

    async def test_traceIsNotForwarded(self):
        """
        An upstream that answers TRACE echoes the request it received, key
        included; hermux forwards no TRACE (nor any method OpenRouter does
        not use).
        """

        def echo(connection, request):
            connection.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: message/http\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(request.raw), request.raw)
            )

        self.upstream.answer = echo
        proxy = self.proxy()
        for method in (b"TRACE", b"TRACK", b"CONNECT", b"PROPFIND"):
            answer = await self.exchange(
                proxy,
                method + b" /api/v1/models HTTP/1.1\r\n" + AUTHORIZATION + b"Connection: close\r\n\r\n",
            )
            self.assertError(answer, 405)
            for token in KEY_TOKENS:
                self.assertNotIn(token, answer)
        self.assertEqual(self.upstream.requests, [])


class LimitTests(HostileTestCase):
    async def test_headerLimits(self):
        proxy = self.proxy()
        tooMany = b"".join(b"X-Filler-%d: x\r\n" % (n,) for n in range(120))
        tooLong = b"X-Big: " + b"b" * (MAX_HEAD_BYTES + 100) + b"\r\n"
        for extra, code in ((tooMany, 431), (tooLong, 431)):
            answer = await self.exchange(
                proxy, b"GET /api/v1/models HTTP/1.1\r\n" + AUTHORIZATION + extra + b"\r\n"
            )
            self.assertError(answer, code)
        answer = await self.exchange(
            proxy, b"GET /api/v1/" + b"m" * (MAX_HEAD_BYTES + 100) + b" HTTP/1.1\r\n\r\n"
        )
        self.assertError(answer, 414)
        self.assertEqual(self.upstream.requests, [])
        await self.assertStillServing(proxy)

    async def test_bodyOverLimitWithoutSendingIt(self):
        """
        A declared body over --max-body gets 413 at once: the client need
        not send it, and hermux does not wait for it.
        """
        proxy = self.proxy(maxBody=1000)
        answer = await self.exchange(
            proxy,
            b"POST /api/v1/chat/completions HTTP/1.1\r\n" + AUTHORIZATION
            + b"Content-Length: 1000000000000\r\n\r\n",
        )
        self.assertError(answer, 413)

    async def test_chunkedBodyOverLimitMidway(self):
        """
        A chunked body gets 413 as soon as it passes --max-body, before its
        end, and the client can go on sending meanwhile without harm.
        """
        proxy = self.proxy(maxBody=100_000)
        client = await connectRaw(
            proxy.portNumber,
            b"POST /api/v1/chat/completions HTTP/1.1\r\n" + AUTHORIZATION
            + b"Transfer-Encoding: chunked\r\n\r\n",
        )
        chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
        for _ in range(20):
            if client.closed.called:
                break
            client.send(chunk)
            await sleep(0.01)
        await waitUntil(lambda: client.closed.called)
        self.assertError(client.received, 413)
        self.assertEqual(self.upstream.requests, [])


class SlowClientTests(HostileTestCase):
    """
    Slowloris: a client that sends its request a little at a time, each
    piece well within the idle timeout, is cut off after --client-timeout.
    """

    async def trickle(self, proxy, data: bytes, interval: float, limit: float) -> bytes:
        client = await connectRaw(proxy.portNumber)
        started = reactor.seconds()
        for byte in data:
            if client.closed.called:
                break
            self.assertLess(reactor.seconds() - started, limit, "never cut off")
            client.send(bytes([byte]))
            await sleep(interval)
        await waitUntil(lambda: client.closed.called)
        return client.received

    async def test_tricklingHead(self):
        proxy = self.proxy(clientTimeout=1.0)
        answer = await self.trickle(
            proxy,
            b"GET /api/v1/models HTTP/1.1\r\n" + AUTHORIZATION + b"X-Slow: " + b"s" * 1000,
            interval=0.05,
            limit=5.0,
        )
        self.assertError(answer, 408)
        self.assertEqual(self.upstream.requests, [])

    async def test_tricklingBody(self):
        proxy = self.proxy(clientTimeout=1.0)
        client = await connectRaw(
            proxy.portNumber,
            b"POST /api/v1/chat/completions HTTP/1.1\r\n" + AUTHORIZATION
            + b"Content-Length: 1000\r\n\r\n",
        )
        for _ in range(100):
            if client.closed.called:
                break
            client.send(b"x")
            await sleep(0.05)
        await waitUntil(lambda: client.closed.called)
        self.assertError(client.received, 408)
        self.assertEqual(self.upstream.requests, [])

    async def test_idleConnection(self):
        """
        A connection that never sends anything is closed after
        --client-timeout, without an answer.
        """
        proxy = self.proxy(clientTimeout=0.5)
        client = await connectRaw(proxy.portNumber)
        await waitUntil(lambda: client.closed.called, timeout=5)
        self.assertEqual(client.received, b"")

    async def test_slowButInTime(self):
        """
        A client that sends its request slowly but within --client-timeout
        is served.
        """
        proxy = self.proxy(clientTimeout=3.0)
        client = await connectRaw(proxy.portNumber)
        for piece in (b"GET /api/v1/models HTTP/1.1\r\n", AUTHORIZATION, b"Connection: close\r\n", b"\r\n"):
            client.send(piece)
            await sleep(0.2)
        await waitUntil(lambda: client.closed.called)
        self.assertEqual(splitResponse(client.received)[0], 200)


class ConnectionLimitTests(HostileTestCase):
    async def test_connectionsAreBounded(self):
        """
        Past --max-connections a client gets 503 with Retry-After and is
        disconnected; the connections already open are served, and a slot
        that frees up can be used again.
        """
        proxy = self.proxy(maxConnections=5)
        held = [await connectRaw(proxy.portNumber) for _ in range(5)]
        await waitUntil(lambda: len(proxy.site.channels) == 5)
        for _ in range(3):
            answer = await self.exchange(
                proxy, b"GET /api/v1/models HTTP/1.1\r\n" + AUTHORIZATION + b"\r\n"
            )
            self.assertError(answer, 503)
            self.assertIn(b"Retry-After: 1\r\n", answer)
        self.assertEqual(len(proxy.site.channels), 5)
        held[0].send(b"GET /api/v1/models HTTP/1.1\r\n" + AUTHORIZATION + b"Connection: close\r\n\r\n")
        await waitUntil(lambda: held[0].closed.called)
        self.assertEqual(splitResponse(held[0].received)[0], 200)
        await waitUntil(lambda: len(proxy.site.channels) == 4)
        await self.assertStillServing(proxy)
        for client in held[1:]:
            client.transport.loseConnection()


class ThrottleTests(HostileTestCase):
    async def ask(self, proxy, token: bytes, source: str = "127.0.0.1") -> bytes:
        client = await connectRaw(
            proxy.portNumber,
            b"GET /api/v1/models HTTP/1.1\r\nAuthorization: Bearer " + token
            + b"\r\nConnection: close\r\n\r\n",
            bindAddress=(source, 0),
        )
        await waitUntil(lambda: client.closed.called)
        return client.received

    async def test_failuresAreThrottledPerAddress(self):
        """
        After --auth-failures wrong tokens in a minute an address gets 429
        with Retry-After for every request with a token, valid or not;
        another address is served as before.
        """
        proxy = self.proxy(authFailures=3)
        for _ in range(3):
            self.assertError(await self.ask(proxy, b"wrong-token"), 401)
        answer = await self.ask(proxy, b"wrong-token")
        self.assertError(answer, 429)
        retryAfter = int(splitResponse(answer)[1][b"retry-after"][0])
        self.assertTrue(55 <= retryAfter <= 60, retryAfter)
        self.assertError(await self.ask(proxy, TOKEN), 429)
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(splitResponse(await self.ask(proxy, TOKEN, "127.0.0.2"))[0], 200)
        self.assertError(await self.ask(proxy, b"wrong-token", "127.0.0.2"), 401)
        health = await self.exchange(proxy, b"GET /hermux/health HTTP/1.1\r\nConnection: close\r\n\r\n")
        self.assertEqual(splitResponse(health)[0], 200)
