"""
Clients that attack hermux, the way an attacker meets its rules; the
channel's rules are tested one by one in memory in test_site.py.

Attacks whose point is what reaches the upstream run over real loopback
sockets, in front of a raw upstream that strictly parses the exact bytes
it receives (L{tests.rawhttp.RawUpstream}); the throttle's, from real
source addresses.  They wait only for answers that come at once.  Attacks whose point is when hermux answers or how many
connections it holds run in memory (L{tests.memory.MemoryProxy}): the real
wiring on a clock, with the real default --client-timeout reached exactly,
not a shortened one waited for.  Every attack must get a valid HTTP error
or a closed connection, forward nothing it should not, and leave hermux
serving.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase, TestCase

from hermux.channel import MAX_HEAD_BYTES
from hermux.tap import Options
from tests.harness import ACCESS_TOKEN, KEYS, Proxy, waitUntil
from tests.memory import MemoryProxy
from tests.rawhttp import RawUpstream, connectRaw, splitResponse

TOKEN = ACCESS_TOKEN.encode()
AUTHORIZATION = b"Authorization: Bearer " + TOKEN + b"\r\n"
KEY_TOKENS = {key.token.encode() for key in KEYS}
SMUGGLED = b"GET /api/v1/smuggled HTTP/1.1\r\nHost: x\r\n" + AUTHORIZATION + b"\r\n"
MODELS = b"GET /api/v1/models HTTP/1.1\r\n" + AUTHORIZATION + b"Connection: close\r\n\r\n"

# hermux's own default --client-timeout, which the tests in memory reach.
CLIENT_TIMEOUT = Options().defaults["client-timeout"]
# About a millisecond, and a power of two: the clock's floats add it
# exactly, so that T - EPSILON + EPSILON is T.
EPSILON = 2.0**-10


class _Answers:
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

    def exchangeInMemory(self, proxy: MemoryProxy, data: bytes) -> bytes:
        """
        Send C{data} on a new connection to C{proxy}; what came back, once
        hermux has closed the connection without any time passing.
        """
        client = proxy.connect(data)
        self.assertTrue(client.closed, client.received[:300])
        return client.received

    def assertUnanswered(self, client) -> None:
        """
        hermux has neither answered C{client} nor closed its connection.
        """
        self.assertEqual((client.received, client.closed), (b"", False))


class HostileTestCase(_Answers, TestCase):
    """
    Attacks over real loopback sockets, in front of a L{RawUpstream}.
    """

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
        answer = await self.exchange(proxy, MODELS)
        self.assertEqual(splitResponse(answer)[0], 200)
        self.assertEqual(self.upstream.malformed, [])


class MemoryHostileTestCase(_Answers, SynchronousTestCase):
    """
    Attacks on hermux in memory, in front of the fake OpenRouter, on a
    clock that moves only when a test says.
    """

    def proxy(self, **kwargs) -> MemoryProxy:
        kwargs.setdefault("clientTimeout", CLIENT_TIMEOUT)
        return MemoryProxy(self, **kwargs)

    def assertStillServing(self, proxy: MemoryProxy):
        self.assertEqual(splitResponse(self.exchangeInMemory(proxy, MODELS))[0], 200)


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

    def test_hugeChunkSize(self):
        """
        A chunk size past any limit swallows everything after it as body:
        nothing is smuggled, and the request gets 413 when its body passes
        --max-body, or 408 when it has not arrived in --client-timeout.
        (In memory, where the 408 comes at exactly the default timeout.)
        """
        proxy = MemoryProxy(self, clientTimeout=CLIENT_TIMEOUT, maxBody=1000)
        head = b"POST /api/v1/chat/completions HTTP/1.1\r\n" + AUTHORIZATION
        client = proxy.connect(
            head + b"Transfer-Encoding: chunked\r\n\r\n10000000000000002\r\n{}\r\n0\r\n\r\n"
            + SMUGGLED,
        )
        proxy.advance(CLIENT_TIMEOUT - EPSILON)
        self.assertUnanswered(client)
        proxy.advance(EPSILON)
        self.assertError(client.received, 408)
        self.assertTrue(client.closed)
        answer = self.exchangeInMemory(
            proxy,
            head + b"Transfer-Encoding: chunked\r\n\r\n10000000000000002\r\n" + b"x" * 2000,
        )
        self.assertError(answer, 413)
        self.assertEqual(proxy.fake.received, [])

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

    # Absolute-form targets (RFC 9112 section 3.2.2): routed by their path
    # and query, to the configured upstream.
    ABSOLUTE = (
        b"http://evil.invalid/api/v1/models",
        b"https://evil.invalid:443/api/v1/models",
        b"http://127.0.0.1:1/api/v1/models",
        b"HTTP://user:pass@evil.invalid/api/v1/models",
    )

    TARGETS = (
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

    async def test_absoluteFormGoesToTheUpstream(self):
        """
        An absolute-form target's host decides nothing: the request goes to
        the configured upstream, with its Host, as its path.
        """
        proxy = self.proxy()
        for target in self.ABSOLUTE:
            answer = await self.exchange(
                proxy,
                b"GET " + target + b" HTTP/1.1\r\nHost: evil.invalid\r\n"
                + AUTHORIZATION + b"Connection: close\r\n\r\n",
            )
            self.assertEqual(splitResponse(answer)[0], 200, target)
        self.assertEqual(
            [r.target for r in self.upstream.requests], [b"/api/v1/models"] * len(self.ABSOLUTE)
        )
        for received in self.upstream.requests:
            self.assertEqual(received.values(b"Host"), [self.upstream.base.split(b"//")[1]])

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


class LimitTests(MemoryHostileTestCase):
    """
    Heads and bodies past hermux's limits, in memory: whether hermux
    answers at once is whether it answers before any time passes.
    """

    def test_headerLimits(self):
        proxy = self.proxy()
        tooMany = b"".join(b"X-Filler-%d: x\r\n" % (n,) for n in range(120))
        tooLong = b"X-Big: " + b"b" * (MAX_HEAD_BYTES + 100) + b"\r\n"
        for extra, code in ((tooMany, 431), (tooLong, 431)):
            answer = self.exchangeInMemory(
                proxy, b"GET /api/v1/models HTTP/1.1\r\n" + AUTHORIZATION + extra + b"\r\n"
            )
            self.assertError(answer, code)
        answer = self.exchangeInMemory(
            proxy, b"GET /api/v1/" + b"m" * (MAX_HEAD_BYTES + 100) + b" HTTP/1.1\r\n\r\n"
        )
        self.assertError(answer, 414)
        self.assertEqual(proxy.fake.received, [])
        self.assertStillServing(proxy)

    def test_bodyOverLimitWithoutSendingIt(self):
        """
        A declared body over --max-body gets 413 at once: the client need
        not send it, and hermux does not wait for it.
        """
        proxy = self.proxy(maxBody=1000)
        answer = self.exchangeInMemory(
            proxy,
            b"POST /api/v1/chat/completions HTTP/1.1\r\n" + AUTHORIZATION
            + b"Content-Length: 1000000000000\r\n\r\n",
        )
        self.assertError(answer, 413)

    def test_chunkedBodyOverLimitMidway(self):
        """
        A chunked body gets 413 as soon as it passes --max-body, before its
        end (a body of exactly --max-body bytes so far gets no answer), and
        the client can go on sending meanwhile without harm.
        """
        limit = 100_000
        proxy = self.proxy(maxBody=limit)
        client = proxy.connect(
            b"POST /api/v1/chat/completions HTTP/1.1\r\n" + AUTHORIZATION
            + b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
        whole, part = divmod(limit, 0x4000)
        client.send(chunk * whole + b"4000\r\n" + b"x" * part)
        proxy.flush()
        self.assertUnanswered(client)
        # One byte past the limit, and more chunks sent with it, before the
        # client could have read the answer.
        client.send(b"x" * (0x4000 - part) + b"\r\n" + chunk * 10)
        proxy.flush()
        self.assertError(client.received, 413)
        self.assertTrue(client.closed)
        self.assertEqual(proxy.fake.received, [])
        self.assertStillServing(proxy)


class SlowClientTests(MemoryHostileTestCase):
    """
    Slowloris: a client that sends its request a little at a time, each
    piece well within the idle timeout, is cut off after --client-timeout
    (hermux's default, on a clock) from its first byte, and not before.
    """

    def trickle(self, proxy, client, data: bytes, seconds: float) -> None:
        """
        Have C{client} send C{data} a byte a second from now for C{seconds}
        seconds, each byte well within the idle timeout (which every byte
        restarts); fail if hermux answers or closes meanwhile.
        """
        end = proxy.clock.seconds() + seconds
        for byte in data:
            now = proxy.clock.seconds()
            if now >= end:
                break
            client.send(bytes([byte]))
            proxy.advance(min(1.0, end - now))
            self.assertUnanswered(client)
        self.assertEqual(proxy.clock.seconds(), end, "too little to send")

    def test_tricklingHead(self):
        proxy = self.proxy()
        client = proxy.connect()
        self.trickle(
            proxy,
            client,
            b"GET /api/v1/models HTTP/1.1\r\n" + AUTHORIZATION + b"X-Slow: " + b"s" * 1000,
            CLIENT_TIMEOUT - EPSILON,
        )
        proxy.advance(EPSILON)
        self.assertError(client.received, 408)
        self.assertIn(b"within %g seconds" % (CLIENT_TIMEOUT,), client.received)
        self.assertTrue(client.closed)
        self.assertEqual(proxy.fake.received, [])

    def test_tricklingBody(self):
        """
        The time a request may take counts its body: a head that arrives
        at once, then a body a byte a second, gets 408 at --client-timeout.
        """
        proxy = self.proxy()
        client = proxy.connect(
            b"POST /api/v1/chat/completions HTTP/1.1\r\n" + AUTHORIZATION
            + b"Content-Length: 1000\r\n\r\n",
        )
        self.trickle(proxy, client, b"x" * 1000, CLIENT_TIMEOUT - EPSILON)
        proxy.advance(EPSILON)
        self.assertError(client.received, 408)
        self.assertTrue(client.closed)
        self.assertEqual(proxy.fake.received, [])

    def test_idleConnection(self):
        """
        A connection that never sends anything is closed after
        --client-timeout, without an answer.
        """
        proxy = self.proxy()
        client = proxy.connect()
        proxy.advance(CLIENT_TIMEOUT - EPSILON)
        self.assertUnanswered(client)
        proxy.advance(EPSILON)
        self.assertTrue(client.closed)
        self.assertEqual(client.received, b"")
        self.assertEqual(proxy.site.channels, set())

    def test_slowButInTime(self):
        """
        A client that sends its request slowly but within --client-timeout
        (its last piece just before it is over) is served.
        """
        proxy = self.proxy()
        client = proxy.connect()
        third = CLIENT_TIMEOUT / 3
        pieces = (b"GET /api/v1/models HTTP/1.1\r\n", AUTHORIZATION, b"Connection: close\r\n")
        for piece, wait in zip(pieces, (third, third, third - EPSILON)):
            client.send(piece)
            proxy.advance(wait)
            self.assertUnanswered(client)
        client.send(b"\r\n")
        proxy.flush()
        self.assertEqual(splitResponse(client.received)[0], 200)
        self.assertTrue(client.closed)


class ConnectionLimitTests(MemoryHostileTestCase):
    def test_connectionsAreBounded(self):
        """
        Past --max-connections a client gets 503 with Retry-After and is
        disconnected; the connections already open are served, and a slot
        that frees up can be used again.
        """
        proxy = self.proxy(maxConnections=5)
        held = [proxy.connect() for _ in range(5)]
        self.assertEqual(len(proxy.site.channels), 5)
        for _ in range(3):
            answer = self.exchangeInMemory(
                proxy, b"GET /api/v1/models HTTP/1.1\r\n" + AUTHORIZATION + b"\r\n"
            )
            self.assertError(answer, 503)
            self.assertIn(b"Retry-After: 1\r\n", answer)
        self.assertEqual(len(proxy.site.channels), 5)
        held[0].send(MODELS)
        proxy.flush()
        self.assertTrue(held[0].closed)
        self.assertEqual(splitResponse(held[0].received)[0], 200)
        self.assertEqual(len(proxy.site.channels), 4)
        self.assertStillServing(proxy)
        self.assertEqual(len(proxy.site.channels), 4)
        for client in held[1:]:
            self.assertUnanswered(client)


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
