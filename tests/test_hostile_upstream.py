"""
Upstreams that misbehave, over real loopback sockets: a raw upstream that
writes exactly the bytes each test wants.  Each fault must give the client
a clean, documented error (or, mid-body, a visibly truncated response),
leak no secret or internal detail, and leave hermux serving.

Faults the fake OpenRouter can produce are tested in test_endtoend.py:
refused connections, a stall past --idle-timeout, a clean close
mid-stream, an endless body relayed with backpressure and aborted by the
client, untrusted and wrong-host certificates.  The last two cases here, a
name that does not resolve and a client that stops reading, need no raw
bytes: they run in memory (L{tests.memory}), the second on a clock.
"""

from __future__ import annotations

import json

import treq
from twisted.internet import reactor
from twisted.internet.protocol import Protocol
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseFailed

from hermux.upstream import MAX_UPSTREAM_HEAD_BYTES
from tests.harness import KEYS, SECRETS, Proxy, waitUntil
from tests.memory import MemoryProxy
from tests.rawhttp import RawUpstream

KEY_NAMES = {key.name for key in KEYS}


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class UpstreamFaultTestCase(TestCase):
    def proxyFor(self, answer, **kwargs) -> tuple[Proxy, RawUpstream]:
        upstream = RawUpstream(self, answer)
        proxy = Proxy(self, upstreamBase=upstream.base, **kwargs)
        return proxy, upstream

    async def assertCleanError(self, proxy, code: int, words: str):
        """
        A chat completion through C{proxy} gets hermux's own error C{code}
        saying C{words}, naming the key, with no secret or internals in
        the answer or the log; and hermux still serves.
        """
        with capturedLogs() as events:
            response = await proxy.chat()
            body = await response.content()
        self.assertEqual(response.code, code, body)
        self.assertEqual(response.headers.getRawHeaders("X-Hermux-Error"), [str(code)])
        self.assertIn(response.headers.getRawHeaders("X-Token-Name")[0], KEY_NAMES)
        error = json.loads(body)["error"]
        self.assertEqual(error["code"], code)
        self.assertIn(words, error["message"])
        for word in ("Traceback", "twisted", "Error(", "127.0.0.1", "sk-or", "injected"):
            self.assertNotIn(word, body.decode("utf-8", "replace"))
        everything = "\n".join(formatEvent(event) + repr(event) for event in events)
        for secret in SECRETS:
            self.assertNotIn(secret, everything)
        health = await proxy.request("GET", "/hermux/health", token=None)
        self.assertEqual(health.code, 200)
        await health.content()
        return body


class BrokenHeadTests(UpstreamFaultTestCase):
    async def test_resetBeforeAnswering(self):
        proxy, upstream = self.proxyFor(lambda connection, request: connection.reset())
        await self.assertCleanError(proxy, 502, "without answering")
        await waitUntil(lambda: not upstream.open)

    async def test_closedBeforeAnswering(self):
        proxy, upstream = self.proxyFor(
            lambda connection, request: connection.transport.loseConnection()
        )
        await self.assertCleanError(proxy, 502, "without answering")

    async def test_resetMidHeaders(self):
        def answer(connection, request):
            connection.write(b"HTTP/1.1 200 OK\r\nContent-Type: applica")
            reactor.callLater(0.05, connection.reset)

        proxy, upstream = self.proxyFor(answer)
        await self.assertCleanError(proxy, 502, "invalid response")
        await waitUntil(lambda: not upstream.open)

    async def test_garbageHeads(self):
        """
        Status lines that are not HTTP/1.x with a three-digit status, and
        header lines that are not name: value or hold a NUL, get 502.
        Twisted's own parser takes any integer and any reason phrase, and
        its server side would write them back to the client as they are: a
        status of 12345, or a bare CR in the phrase that splits the
        client's response head.
        """
        for garbage in (
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 12345 Large\r\nContent-Length: 2\r\n\r\n{}",
            b"HTTP/1.1 -20 Negative\r\nContent-Length: 2\r\n\r\n{}",
            b"HTTP/1.1 2_00 OK\r\nContent-Length: 2\r\n\r\n{}",
            b"HTTP/1.1 099 Small\r\nContent-Length: 2\r\n\r\n{}",
            b"HTTP/1.1 200 OK\rSet-Cookie: injected=1\r\nContent-Length: 2\r\n\r\n{}",
            b"HTTP/1.1 200 OK\x00injected\r\nContent-Length: 2\r\n\r\n{}",
            b"HTTP/9.9 200 OK\r\nContent-Length: 2\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\nX Space: injected\r\nContent-Length: 2\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\nX-Nul: a\x00injected\r\nContent-Length: 2\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\nNo colon, injected\r\nContent-Length: 2\r\n\r\n{}",
            b"\r\n\r\n",
        ):

            def answer(connection, request, garbage=garbage):
                connection.write(garbage)
                connection.transport.loseConnection()

            proxy, upstream = self.proxyFor(answer)
            body = await self.assertCleanError(proxy, 502, "invalid response")
            self.assertNotIn(b"injected", body)

    async def test_headerLineInjection(self):
        """
        A bare CR inside an upstream header value does not split the
        client's response head: Twisted turns it into a space.
        """

        def answer(connection, request):
            connection.write(
                b"HTTP/1.1 200 OK\r\nX-Upstream: a\rSet-Cookie: injected=1\r\n"
                b"Content-Length: 2\r\n\r\n{}"
            )

        proxy, upstream = self.proxyFor(answer)
        response = await proxy.chat()
        self.assertEqual(await response.content(), b"{}")
        self.assertIsNone(response.headers.getRawHeaders("Set-Cookie"))
        self.assertEqual(
            response.headers.getRawHeaders("X-Upstream"), ["a Set-Cookie: injected=1"]
        )


class OversizedHeadTests(UpstreamFaultTestCase):
    async def floodHead(self, line: bytes, first: bytes = b""):
        """
        An upstream that sends a status line and then C{line} over and
        over, as fast as hermux takes it, gets 502 once the head passes
        L{MAX_UPSTREAM_HEAD_BYTES}; hermux closes the connection having
        read little more than that.
        """
        sent = []

        def answer(connection, request):
            connection.write(b"HTTP/1.1 200 OK\r\n" + first)
            sent.append(0)

            def more():
                if connection.transport.disconnecting or not connection.transport.connected:
                    return
                connection.write(line * 64)
                sent[0] += len(line) * 64
                if sent[0] < 64 * MAX_UPSTREAM_HEAD_BYTES:
                    reactor.callLater(0, more)

            more()

        proxy, upstream = self.proxyFor(answer)
        await self.assertCleanError(proxy, 502, "invalid response")
        await waitUntil(lambda: not upstream.open)
        self.assertLess(sent[0], 16 * MAX_UPSTREAM_HEAD_BYTES)

    async def test_endlessHeaders(self):
        await self.floodHead(b"X-Padding: " + b"p" * 100 + b"\r\n")

    async def test_endlessFoldedHeader(self):
        """
        Continuation lines, which Twisted's client collects in a list
        without limit, count too.
        """
        await self.floodHead(b" " + b"f" * 100 + b"\r\n", first=b"X-Folded: f\r\n")

    async def test_oneLineTooLong(self):
        await self.floodHead(b"x" * 1000)

    async def test_largeButAcceptableHead(self):
        """
        A head just under the limit is relayed.
        """
        padding = b"X-Padding: " + b"p" * 1000 + b"\r\n"
        count = (MAX_UPSTREAM_HEAD_BYTES - 200) // len(padding)

        def answer(connection, request):
            connection.write(
                b"HTTP/1.1 200 OK\r\n" + padding * count + b"Content-Length: 2\r\n\r\n{}"
            )

        proxy, upstream = self.proxyFor(answer)
        response = await proxy.chat()
        self.assertEqual(response.code, 200)
        self.assertEqual(await response.content(), b"{}")
        self.assertEqual(len(response.headers.getRawHeaders("X-Padding")), count)


class BrokenBodyTests(UpstreamFaultTestCase):
    async def test_resetMidStream(self):
        """
        An upstream reset in the middle of an event stream leaves the
        client with a truncated response that fails to complete.
        """

        def answer(connection, request):
            connection.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
                + _chunk(b"data: one\n\n")
                + _chunk(b"data: two\n\n")
            )
            reactor.callLater(0.1, connection.reset)

        proxy, upstream = self.proxyFor(answer)
        response = await proxy.chat(stream=True)
        self.assertEqual(response.code, 200)
        received = []
        await self.assertFailure(treq.collect(response, received.append), ResponseFailed)
        self.assertEqual(b"".join(received), b"data: one\n\ndata: two\n\n")
        health = await proxy.request("GET", "/hermux/health", token=None)
        self.assertEqual(health.code, 200)
        await health.content()

    async def test_shortContentLength(self):
        """
        An upstream that promises more bytes than it sends leaves the client
        with a response that fails to complete (hermux relays it chunked,
        and ends it without the last chunk).
        """

        def answer(connection, request):
            connection.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"partial\":")
            reactor.callLater(0.1, connection.transport.loseConnection)

        proxy, upstream = self.proxyFor(answer)
        response = await proxy.chat()
        self.assertEqual(response.code, 200)
        failure = await self.assertFailure(treq.content(response), ResponseFailed)
        self.assertTrue(failure)

    async def test_badChunkMidStream(self):
        def answer(connection, request):
            connection.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                + _chunk(b"data: one\n\n")
                + b"zz\r\n"
            )

        proxy, upstream = self.proxyFor(answer)
        response = await proxy.chat(stream=True)
        received = []
        await self.assertFailure(treq.collect(response, received.append), ResponseFailed)
        self.assertEqual(b"".join(received), b"data: one\n\n")
        await waitUntil(lambda: not upstream.open)


class UnresolvableTests(SynchronousTestCase):
    def test_nameDoesNotResolve(self):
        """
        An upstream whose name does not resolve (.invalid never does) gets
        502 saying so.  (In memory, where every other name is 127.0.0.1.)
        """
        proxy = MemoryProxy(self, upstreamBase=b"http://hermux-test-upstream.invalid:80")
        response, body = proxy.chatted()
        self.assertEqual(response.code, 502)
        error = json.loads(body)["error"]
        self.assertEqual(error["message"], "the upstream host name does not resolve")
        self.assertNotIn("invalid", error["message"])


class SlowReaderTests(SynchronousTestCase):
    def test_clientThatStopsReadingIsCut(self):
        """
        A client that asks for an endless answer and stops reading holds
        hermux's connection only until --idle-timeout (the upstream is
        paused meanwhile) plus the channel's abortTimeout: hermux aborts a
        connection whose client will not take the rest, instead of waiting
        for it forever.  (In memory, so that both times are exact.)
        """
        from hermux.channel import HermuxChannel

        idle, abort = 30.0, HermuxChannel.abortTimeout
        proxy = MemoryProxy(self, idleTimeout=idle)
        proxy.fake.floodNext(None)
        response = proxy.resultOf(proxy.chat())
        reader = _Ignore()
        response.deliverBody(reader)
        reader.transport.pauseProducing()
        proxy.flush()
        [received] = proxy.fake.received
        [upstream] = proxy.upstreamConnections()
        self.assertEqual(upstream.client.producerState, "paused")
        self.assertGreater(proxy.fake.flooded, 0)
        proxy.advance(idle - 0.5)
        self.assertNoResult(received.lost)
        proxy.advance(0.5)
        self.successResultOf(received.lost)
        self.assertEqual(len(proxy.site.channels), 1)
        proxy.advance(abort - 0.5)
        self.assertEqual(len(proxy.site.channels), 1)
        proxy.advance(0.5)
        self.assertEqual(proxy.site.channels, set())


class _Ignore(Protocol):
    def dataReceived(self, data):
        pass
