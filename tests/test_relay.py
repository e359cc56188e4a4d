"""
The relay, through hermux as L{hermux.wiring.assemble} builds it.

Most tests run in memory (L{tests.memory}): a real client, the real upstream
agent and the fake OpenRouter (or an upstream that writes exactly the bytes
a test gives), over connections that pause and resume their producers as
TCP does, with time on a clock.  A few look inside one exchange (what it
keeps, what it frees, what a TLS failure becomes): they replace the
upstream's agent with a stub whose requests the test answers, and talk to
hermux's site over a L{StringTransport}.
"""

from __future__ import annotations

import gc
import json
import weakref

from OpenSSL.SSL import Error as TLSError
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent
from zope.interface import implementer

from hermux.config import Configuration, Key
from hermux.ledger import MemoryLedger
from hermux.testing import FAKE_ANSWER
from hermux.wiring import assemble
from tests.harness import ACCESS_TOKEN, CHAT, chatBody, hermuxOptions
from tests.memory import (
    BUFFER_SIZE,
    UPSTREAM_PORT,
    MemoryProxy,
    RawClient,
    ScriptedUpstream,
)

KEY = Key("alpha", "sk-or-v1-relay-test-key")
IDLE = 30.0
# The comment, the words, the finish chunk, the usage chunk, [DONE].
EVENTS = 1 + len(FAKE_ANSWER.split()) + 2 + 1


def relayProxy(testCase, **kwargs) -> MemoryProxy:
    """
    hermux in memory with the one key L{KEY} and the idle timeout L{IDLE}.
    """
    kwargs.setdefault("idleTimeout", IDLE)
    return MemoryProxy(testCase, keys=(KEY,), accessTokens=(ACCESS_TOKEN,), **kwargs)


def rawRequest(method=b"POST", target=CHAT.encode(), body=b"{}", extra=b"", close=True) -> bytes:
    """
    A request as a client sends it, after which hermux closes the
    connection if C{close}.
    """
    if close:
        extra += b"Connection: close\r\n"
    return (
        method + b" " + target + b" HTTP/1.1\r\nHost: hermux.test\r\n"
        b"Authorization: Bearer " + ACCESS_TOKEN.encode() + b"\r\n"
        b"Content-Length: %d\r\n" % (len(body),) + extra + b"\r\n" + body
    )


def splitHead(raw: bytes) -> tuple[bytes, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head + b"\r\n", body


class _Reader(RawClient):
    """
    Keeps a response body as it arrives, and how it ended.
    """

    def events(self) -> int:
        return self.received.count(b"\n\n")


def readBody(proxy: MemoryProxy, **chat) -> tuple[object, _Reader]:
    response = proxy.resultOf(proxy.chat(**chat))
    reader = _Reader()
    response.deliverBody(reader)
    return response, reader


class ForwardingTests(SynchronousTestCase):
    def test_requestGoesToUpstreamWithKey(self):
        """
        The upstream request goes to the configured upstream and carries
        the key, not the client's token, and the client's body.
        """
        proxy = relayProxy(self)
        proxy.respond(
            "POST", CHAT, headers={"Content-Type": "application/json"}, data=b'{"model": "m"}'
        )
        [received] = proxy.fake.received
        self.assertEqual(received.method, b"POST")
        self.assertEqual(received.uri, b"/api/v1/chat/completions")
        self.assertEqual(
            received.headers.getRawHeaders(b"host"), [b"openrouter.test:%d" % (UPSTREAM_PORT,)]
        )
        self.assertEqual(
            received.headers.getRawHeaders(b"authorization"), [b"Bearer " + KEY.token.encode()]
        )
        self.assertEqual(received.body, b'{"model": "m"}')

    def test_headIsSentAtOnce(self):
        """
        The client gets the status line and headers, with X-Token-Name, as
        soon as the upstream's arrive, before any body byte.
        """
        proxy = relayProxy(
            self,
            upstreamFactory=ScriptedUpstream(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n",
                close=False,
            ),
        )
        client = proxy.connect(rawRequest())
        head, body = splitHead(client.received)
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertIn(b"X-Token-Name: alpha\r\n", head)
        self.assertIn(b"Content-Type: text/event-stream\r\n", head)
        self.assertIn(b"Transfer-Encoding: chunked\r\n", head)
        self.assertEqual(body, b"")
        self.assertFalse(client.closed)

    def hopByHop(self) -> bytes:
        """
        What a client sees of an answer with hop-by-hop headers, over a
        connection that stays open.
        """
        proxy = relayProxy(
            self,
            upstreamFactory=ScriptedUpstream(
                b"HTTP/1.1 200 OK\r\nConnection: close, x-secret-hop\r\nX-Secret-Hop: 1\r\n"
                b"Keep-Alive: timeout=5\r\nSet-Cookie: a=b\r\nContent-Length: 2\r\n\r\n{}"
            ),
        )
        return proxy.connect(rawRequest(close=False)).received.lower()

    def test_hopByHopResponseHeadersStay(self):
        seen = self.hopByHop()
        for name in (b"keep-alive", b"set-cookie", b"connection: close"):
            self.assertNotIn(name, seen)
        self.assertIn(b"content-length: 2\r\n", seen)
        self.assertTrue(seen.endswith(b"\r\n\r\n{}"))

    def test_headersNamedByConnectionStay(self):
        """
        A header that the upstream's Connection header names is hop-by-hop
        too, and stays.
        """
        self.assertNotIn(b"x-secret-hop", self.hopByHop())

    def test_bodyIsRelayedChunkByChunk(self):
        """
        Each upstream event is written to the client when it arrives, and
        the response ends cleanly when the upstream's does.
        """
        proxy = relayProxy(self, eventInterval=1.0)
        client = proxy.connect(rawRequest(body=chatBody(stream=True)))
        self.assertTrue(client.received.endswith(b": OPENROUTER PROCESSING\n\n\r\n"))
        for seen in range(2, EVENTS + 1):
            proxy.advance(1.0)
            self.assertEqual(splitHead(client.received)[1].count(b"\n\n\r\n"), seen)
        self.assertTrue(client.received.endswith(b"data: [DONE]\n\n\r\n"))
        self.assertFalse(client.closed)
        proxy.advance(1.0)
        self.assertTrue(client.received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"))
        self.assertTrue(client.closed)


class BackpressureTests(SynchronousTestCase):
    def test_pausedClientPausesUpstream(self):
        """
        When the client's connection cannot take more, hermux stops reading
        the upstream's: the upstream stops at a few buffers' worth of an
        endless body.  When the client reads again, so does hermux.
        """
        proxy = relayProxy(self)
        proxy.fake.floodNext(None)
        response = proxy.resultOf(proxy.chat())
        reader = _Reader()
        response.deliverBody(reader)
        reader.transport.pauseProducing()
        proxy.flush()
        [upstream] = proxy.upstreamConnections()
        self.assertEqual(upstream.client.producerState, "paused")
        held = proxy.fake.flooded
        self.assertLess(held, 4 * BUFFER_SIZE)
        proxy.advance(IDLE / 2)
        self.assertEqual(proxy.fake.flooded, held)
        reader.transport.resumeProducing()
        for _ in range(50):
            proxy.network.step()
        self.assertGreater(proxy.fake.flooded, held + 8 * BUFFER_SIZE)
        self.assertGreater(len(reader.received), 8 * BUFFER_SIZE)
        reader.transport.pauseProducing()
        proxy.flush()
        self.assertEqual(upstream.client.producerState, "paused")

    def test_clientLeavingMidBodyStopsUpstream(self):
        """
        A client that disconnects mid-body stops the upstream transport,
        and nothing more is written to the dead request.
        """
        proxy = relayProxy(self, eventInterval=1.0)
        response, reader = readBody(proxy, stream=True)
        proxy.flush()
        self.assertEqual(reader.events(), 1)
        [upstream] = proxy.upstreamConnections()
        [received] = proxy.fake.received
        reader.transport.stopProducing()
        proxy.flush()
        self.assertEqual(upstream.client.producerState, "stopped")
        self.assertTrue(upstream.closed)
        self.successResultOf(received.lost)
        proxy.advance(EVENTS)
        self.assertEqual(proxy.network.connections, [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_clientLeavingBeforeAnswerCancelsUpstream(self):
        proxy = relayProxy(self)
        proxy.fake.stallNext()
        pending = proxy.chat()
        proxy.flush()
        [received] = proxy.fake.received
        self.assertNoResult(received.lost)
        pending.cancel()
        proxy.failureOf(pending)
        self.successResultOf(received.lost)
        self.assertEqual(proxy.network.connections, [])
        self.assertEqual(self.flushLoggedErrors(), [])


class IdleTimeoutTests(SynchronousTestCase):
    def test_noAnswerIn(self):
        """
        An upstream that sends nothing for the idle timeout gets the request
        cancelled and the client a 504, exactly then.
        """
        proxy = relayProxy(self)
        proxy.fake.stallNext()
        pending = proxy.chat()
        proxy.advance(IDLE - 0.5)
        self.assertNoResult(pending)
        [received] = proxy.fake.received
        self.assertNoResult(received.lost)
        proxy.advance(0.5)
        response = self.successResultOf(pending)
        self.assertEqual(response.code, 504)
        self.assertEqual(json.loads(proxy.resultOf(response.content()))["error"]["code"], 504)
        self.successResultOf(received.lost)

    def test_eachChunkRestartsTheClock(self):
        """
        Events that come less than the idle timeout apart keep a stream
        going, however long it lasts in all.
        """
        proxy = relayProxy(self, eventInterval=IDLE - 1)
        response, reader = readBody(proxy, stream=True)
        for _ in range(EVENTS):
            proxy.advance(IDLE - 1)
        reader.reason.trap(ResponseDone)
        self.assertTrue(reader.received.endswith(b"data: [DONE]\n\n"))
        self.assertNoResult(proxy.fake.received[0].lost)

    def test_stallMidBodyCutsTheResponse(self):
        """
        An upstream that stalls mid-body is aborted after the idle timeout,
        and the client's connection closes without a clean end.
        """
        proxy = relayProxy(self, eventInterval=IDLE + 1)
        response, reader = readBody(proxy, stream=True)
        proxy.flush()
        [received] = proxy.fake.received
        proxy.advance(IDLE - 0.5)
        self.assertIsNone(reader.reason)
        self.assertNoResult(received.lost)
        proxy.advance(0.5)
        self.successResultOf(received.lost)
        reader.reason.trap(ResponseFailed)
        self.assertEqual(reader.received, b": OPENROUTER PROCESSING\n\n")

    def test_nothingLeftScheduled(self):
        proxy = relayProxy(self)
        proxy.chatted()
        self.assertEqual(
            [call for call in proxy.clock.getDelayedCalls() if "Watchdog" in repr(call)], []
        )


class UpstreamFailureTests(SynchronousTestCase):
    def assertAnswered(self, proxy, code, words, pending=None):
        if pending is None:
            pending = proxy.chat()
        response = proxy.resultOf(pending)
        body = proxy.resultOf(response.content())
        self.assertEqual(response.code, code, body)
        self.assertIn(words, json.loads(body)["error"]["message"].encode())
        self.assertEqual(response.headers.getRawHeaders("X-Token-Name"), ["alpha"])
        self.assertNotIn(b"Traceback", body)
        self.assertNotIn(KEY.token.encode(), body)

    def test_refused(self):
        proxy = relayProxy(self, upstreamBase=b"http://openrouter.test:%d" % (UPSTREAM_PORT + 1,))
        pending = proxy.chat()
        # HostnameEndpoint waits its delay between attempts (0.3 seconds)
        # for another address before it gives up.
        proxy.advance(0.3)
        self.assertAnswered(proxy, 502, b"could not connect", pending)

    def test_connectTimeout(self):
        """
        A connection attempt that gets no answer fails with 504 after the
        connect timeout, exactly.
        """
        proxy = relayProxy(self, connectTimeout=5.0)
        proxy.network.unreachable.add(UPSTREAM_PORT)
        pending = proxy.chat()
        proxy.advance(4.5)
        self.assertNoResult(pending)
        proxy.advance(0.5)
        self.assertAnswered(proxy, 504, b"timed out connecting", pending)

    def test_unresolvableName(self):
        proxy = relayProxy(self, upstreamBase=b"http://openrouter.invalid:%d" % (UPSTREAM_PORT,))
        self.assertAnswered(proxy, 502, b"does not resolve")

    def test_closedWithoutAnswer(self):
        proxy = relayProxy(self, upstreamFactory=ScriptedUpstream(b""))
        self.assertAnswered(proxy, 502, b"without answering")

    def test_garbage(self):
        proxy = relayProxy(self, upstreamFactory=ScriptedUpstream(b"SSH-2.0-OpenSSH_9.6\r\n"))
        self.assertAnswered(proxy, 502, b"invalid response")

    def test_brokeMidBody(self):
        """
        An upstream that breaks mid-body leaves the client with a response
        that visibly did not end.
        """
        proxy = relayProxy(self)
        proxy.fake.dropNext(afterEvents=1)
        client = proxy.connect(rawRequest(body=chatBody(stream=True)))
        self.assertTrue(client.closed)
        self.assertTrue(client.received.endswith(b": OPENROUTER PROCESSING\n\n\r\n"))


class BodyLimitTests(SynchronousTestCase):
    def test_declaredTooLarge(self):
        proxy = relayProxy(self, maxBody=1000)
        client = proxy.connect(rawRequest(body=b"x" * 1001))
        self.assertTrue(client.received.startswith(b"HTTP/1.1 413 "))
        self.assertEqual(proxy.fake.received, [])

    def test_chunkedTooLargeIsNotBuffered(self):
        """
        Chunks past the limit are dropped as they arrive, not kept.
        """
        proxy = relayProxy(self, maxBody=1000)
        client = proxy.connect(
            b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: h\r\n"
            b"Authorization: Bearer " + ACCESS_TOKEN.encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        [channel] = proxy.site.channels
        [request] = channel.requests
        for _ in range(10):
            if client.closed:
                break
            self.assertLessEqual(request.content.tell(), 1000)
            client.send(b"1f4\r\n" + b"x" * 500 + b"\r\n")
            proxy.flush()
        self.assertTrue(client.closed)
        self.assertTrue(client.received.startswith(b"HTTP/1.1 413 "))
        self.assertEqual(proxy.fake.received, [])

    def test_atTheLimit(self):
        proxy = relayProxy(self, maxBody=1000)
        proxy.connect(rawRequest(body=b"x" * 1000))
        self.assertEqual(len(proxy.fake.received), 1)


class EconomyTests(SynchronousTestCase):
    """
    What the relay does not keep or do, since it costs memory or time on
    every request.
    """

    def test_lengthIsPassedOn(self):
        """
        A known body length goes to the client as Content-Length, so the
        answer is not re-chunked.
        """
        proxy = relayProxy(
            self,
            upstreamFactory=ScriptedUpstream(
                b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world", close=False
            ),
        )
        head, body = splitHead(proxy.connect(rawRequest()).received)
        self.assertIn(b"Content-Length: 11\r\n", head)
        self.assertNotIn(b"Transfer-Encoding", head)
        self.assertEqual(body, b"hello world")

    def test_noLengthForNoContent(self):
        proxy = relayProxy(self)
        proxy.fake.answerNext(204, b"")
        head, body = splitHead(proxy.connect(rawRequest()).received)
        self.assertTrue(head.startswith(b"HTTP/1.1 204 "))
        self.assertNotIn(b"Content-Length", head)

    def test_formsAreNotParsed(self):
        """
        A form-encoded body is forwarded as it is, not parsed into
        request.args on the way.
        """
        proxy = relayProxy(self)
        proxy.fake.stallNext()
        body = b"a=1&b=2"
        proxy.connect(rawRequest(body=body, extra=b"Content-Type: application/x-www-form-urlencoded\r\n"))
        [channel] = proxy.site.channels
        [request] = channel.requests
        self.assertEqual(request.args, {})
        self.assertEqual(proxy.fake.received[0].body, body)


class ErrorAnswerTests(SynchronousTestCase):
    """
    An answer that may be about the key is read whole before hermux
    decides; it is read only so far.
    """

    def test_tooLongErrorAnswer(self):
        """
        An error answer longer than the relay reads into memory stops the
        upstream read and gets the client a 502, not a retry.
        """
        proxy = relayProxy(self)
        proxy.relay.errorBodyLimit = 10
        proxy.fake.answerNext(429, {"error": {"code": 429, "message": "long"}})
        response, body = proxy.chatted()
        self.assertEqual(response.code, 502)
        self.assertIn(b"could not be read", body)
        self.assertEqual(len(proxy.fake.received), 1)
        self.assertEqual(proxy.upstreamConnections(), [])

    def test_brokenErrorAnswer(self):
        upstream = ScriptedUpstream(
            b"HTTP/1.1 402 Payment Required\r\nContent-Length: 100\r\n\r\n{\"error\": "
        )
        proxy = relayProxy(self, upstreamFactory=upstream)
        response, body = proxy.chatted()
        self.assertEqual(response.code, 502)
        self.assertEqual(len(upstream.received), 1)


class _PendingRequest:
    def __init__(self, method, uri, headers, bodyProducer):
        self.method = method
        self.uri = uri
        self.headers = headers
        self.body = bodyProducer
        self.response = Deferred()


@implementer(IAgent)
class _StubAgent:
    """
    An agent whose requests wait for the test to answer them.
    """

    def __init__(self):
        self.requests: list[_PendingRequest] = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        pending = _PendingRequest(method, uri, headers, bodyProducer)
        self.requests.append(pending)
        return pending.response


class _StubResponse:
    """
    An upstream response head whose body the test delivers through the
    protocol it was given, over a L{StringTransport}.
    """

    def __init__(self, code=200, headers=None, length=UNKNOWN_LENGTH):
        self.version = (b"HTTP", 1, 1)
        self.code = code
        self.phrase = b"OK" if code == 200 else b"Whatever"
        self.headers = Headers(headers or {})
        self.length = length
        self.transport = StringTransport()
        self.protocol = None

    def deliverBody(self, protocol):
        self.protocol = protocol
        protocol.makeConnection(self.transport)


class StubbedUpstreamTestCase(SynchronousTestCase):
    """
    hermux as L{assemble} builds it, with the upstream's agent replaced by
    a L{_StubAgent}, and one client connection over a L{StringTransport}.
    """

    def setUp(self):
        self.clock = Clock()
        self.components = assemble(
            Configuration((KEY,), (ACCESS_TOKEN,)),
            hermuxOptions(
                upstream=b"https://upstream.test",
                connectTimeout=10.0,
                idleTimeout=IDLE,
                maxBody=1000,
                clientTimeout=60.0,
                maxConnections=1024,
                authFailures=10,
                tokensPath="tokens.csv",
                allowPath="allow.txt",
            ),
            ledger=MemoryLedger(),
            reactor=self.clock,
        )
        self.agent = _StubAgent()
        self.components.upstream.agent = self.agent
        self.channel = self.components.site.buildProtocol(None)
        self.client = StringTransport()
        self.channel.makeConnection(self.client)

    def send(self, body=b"{}"):
        self.channel.dataReceived(rawRequest(body=body))
        [pending] = self.agent.requests
        return pending

    def answer(self, pending, code=200, headers=None, length=UNKNOWN_LENGTH) -> _StubResponse:
        response = _StubResponse(code, headers, length)
        pending.response.callback(response)
        return response


class TLSFailureTests(StubbedUpstreamTestCase):
    def test_untrustedCertificate(self):
        """
        A certificate that cannot be verified gets the client a 502 that
        says so (the TLS handshake itself is tested over sockets in
        L{tests.test_endtoend}).
        """
        self.send().response.errback(
            ResponseNeverReceived([Failure(TLSError([("SSL routines", "", "certificate verify failed")]))])
        )
        seen = self.client.value()
        self.assertTrue(seen.startswith(b"HTTP/1.1 502 "), seen)
        self.assertIn(b"TLS certificate", seen)
        self.assertIn(b"X-Token-Name: alpha\r\n", seen)
        self.assertNotIn(b"Traceback", seen)
        self.assertNotIn(KEY.token.encode(), seen)


class ExchangeMemoryTests(StubbedUpstreamTestCase):
    """
    What one exchange holds, and for how long.
    """

    def test_bodyIsFreedOnceAnswered(self):
        """
        The client's request body is held while another key may need it,
        and let go once the answer has begun.
        """
        pending = self.send(body=b'{"big": "prompt"}')
        [request] = self.channel.requests
        self.assertIsNotNone(request.content)
        consumer = StringTransport()
        pending.body.startProducing(consumer)
        self.assertEqual(consumer.value(), b'{"big": "prompt"}')
        self.assertEqual(pending.body._data, b"")
        self.answer(pending)
        self.assertIsNone(request.content)

    def test_exchangeNeedsNoCyclicCollection(self):
        """
        Once a response is over, what relayed it is freed by reference
        counting alone, without waiting for the cyclic garbage collector.
        """
        response = self.answer(self.send())
        protocol = weakref.ref(response.protocol)
        response.protocol.dataReceived(b"data: x\n\n")
        response.protocol.connectionLost(Failure(ResponseDone()))
        response.protocol = None
        gc.disable()
        try:
            self.assertIsNone(protocol())
        finally:
            gc.enable()
