"""
The relay in memory: a real HTTP channel over a L{StringTransport} for the
client, a stub agent for the upstream, and a L{Clock} for time.
"""

from __future__ import annotations

import gc
import weakref

from OpenSSL.SSL import Error as TLSError
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent
from zope.interface import implementer

from hermux.access import AccessList
from hermux.config import Key
from hermux.keypool import KeyPool
from hermux.relay import Relay
from hermux.resource import buildRoot
from hermux.site import HermuxSite
from hermux.upstream import Upstream

KEY = Key("alpha", "sk-or-v1-relay-test-key")
ACCESS_TOKEN = b"relay-test-access-token"
IDLE = 30.0


class _PendingRequest:
    def __init__(self, method, uri, headers, bodyProducer):
        self.method = method
        self.uri = uri
        self.headers = headers
        self.body = bodyProducer
        self.cancelled = False
        self.response = Deferred(self._cancel)

    def _cancel(self, d):
        self.cancelled = True


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
        # Like Twisted's client: Content-Length is taken out of the headers.
        self.headers = Headers(headers or {})
        self.length = length
        self.transport = StringTransport()
        self.protocol = None

    def deliverBody(self, protocol):
        self.protocol = protocol
        protocol.makeConnection(self.transport)


class RelayTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.agent = _StubAgent()
        upstream = Upstream(b"https://upstream.test", self.agent)
        self.pool = KeyPool([KEY], reactor=self.clock)
        self.relay = Relay(upstream, self.pool, idleTimeout=IDLE, reactor=self.clock)
        root = buildRoot(self.pool, AccessList([ACCESS_TOKEN.decode()]), self.relay)
        site = HermuxSite(root, maxBody=1000, reactor=self.clock)
        self.channel = site.buildProtocol(None)
        self.client = StringTransport()
        self.channel.makeConnection(self.client)

    def send(self, target=b"/api/v1/chat/completions", body=b"{}", extra=b""):
        self.channel.dataReceived(
            b"POST " + target + b" HTTP/1.1\r\nHost: hermux.test\r\n"
            b"Authorization: Bearer " + ACCESS_TOKEN + b"\r\n"
            b"Content-Length: %d\r\n" % (len(body),) + extra + b"\r\n" + body
        )
        [pending] = self.agent.requests
        return pending

    def answer(self, pending, code=200, headers=None, length=UNKNOWN_LENGTH) -> _StubResponse:
        response = _StubResponse(code, headers, length)
        pending.response.callback(response)
        return response

    def clientSaw(self) -> bytes:
        return self.client.value()


class ForwardingTests(RelayTestCase):
    def test_requestGoesToUpstreamWithKey(self):
        """
        The upstream request targets the configured base URL and carries the
        key, not the client's token, and the client's body.
        """
        pending = self.send(body=b'{"model": "m"}')
        self.assertEqual(pending.method, b"POST")
        self.assertEqual(pending.uri, b"https://upstream.test/api/v1/chat/completions")
        self.assertEqual(
            pending.headers.getRawHeaders(b"authorization"), [b"Bearer " + KEY.token.encode()]
        )
        self.assertEqual(pending.body.length, len(b'{"model": "m"}'))
        consumer = StringTransport()
        pending.body.startProducing(consumer)
        self.assertEqual(consumer.value(), b'{"model": "m"}')

    def test_headIsSentAtOnce(self):
        """
        The client gets the status line and headers, with X-Token-Name, as
        soon as the upstream's arrive, before any body byte.
        """
        self.answer(self.send(), headers={b"content-type": [b"text/event-stream"]})
        head = self.clientSaw()
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertIn(b"X-Token-Name: alpha\r\n", head)
        self.assertIn(b"Content-Type: text/event-stream\r\n", head)
        self.assertIn(b"Transfer-Encoding: chunked\r\n", head)

    def test_hopByHopResponseHeadersStay(self):
        response = self.answer(
            self.send(),
            headers={
                b"connection": [b"close, x-secret-hop"],
                b"x-secret-hop": [b"1"],
                b"keep-alive": [b"timeout=5"],
                b"set-cookie": [b"a=b"],
            },
            length=2,
        )
        response.protocol.dataReceived(b"{}")
        response.protocol.connectionLost(Failure(ResponseDone()))
        seen = self.clientSaw().lower()
        for name in (b"x-secret-hop", b"keep-alive", b"set-cookie", b"connection: close"):
            self.assertNotIn(name, seen)
        self.assertIn(b"content-length: 2\r\n", seen)
        self.assertTrue(seen.endswith(b"\r\n\r\n{}"))

    def test_bodyIsRelayedChunkByChunk(self):
        """
        Each upstream chunk is written to the client when it arrives, and
        the response ends cleanly when the upstream's does.
        """
        response = self.answer(self.send())
        response.protocol.dataReceived(b"data: one\n\n")
        self.assertTrue(self.clientSaw().endswith(b"data: one\n\n\r\n"))
        response.protocol.dataReceived(b"data: two\n\n")
        self.assertTrue(self.clientSaw().endswith(b"data: two\n\n\r\n"))
        response.protocol.connectionLost(Failure(ResponseDone()))
        self.assertTrue(self.clientSaw().endswith(b"0\r\n\r\n"))
        self.assertFalse(self.client.disconnecting)


class BackpressureTests(RelayTestCase):
    def test_pausedClientPausesUpstream(self):
        """
        When the client's connection cannot take more, the upstream
        transport is paused; when it can again, it is resumed.
        """
        response = self.answer(self.send())
        self.assertEqual(response.transport.producerState, "producing")
        self.channel.pauseProducing()
        self.assertEqual(response.transport.producerState, "paused")
        self.channel.resumeProducing()
        self.assertEqual(response.transport.producerState, "producing")

    def test_clientLeavingMidBodyStopsUpstream(self):
        """
        A client that disconnects mid-body stops the upstream transport,
        and nothing more is written to the dead request.
        """
        response = self.answer(self.send())
        response.protocol.dataReceived(b"data: one\n\n")
        self.channel.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(response.transport.producerState, "stopped")
        response.protocol.connectionLost(Failure(ResponseFailed([Failure(CancelledError())])))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_clientLeavingBeforeAnswerCancelsUpstream(self):
        pending = self.send()
        self.channel.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(pending.cancelled)
        self.assertEqual(self.flushLoggedErrors(), [])


class IdleTimeoutTests(RelayTestCase):
    def test_noAnswerIn(self):
        """
        An upstream that sends nothing for the idle timeout gets the request
        cancelled and the client a 504.
        """
        pending = self.send()
        self.clock.advance(IDLE - 1)
        self.assertFalse(pending.cancelled)
        self.clock.advance(1)
        self.assertTrue(pending.cancelled)
        self.assertTrue(self.clientSaw().startswith(b"HTTP/1.1 504 "))
        self.assertIn(b'"code": 504', self.clientSaw())

    def test_eachChunkRestartsTheClock(self):
        response = self.answer(self.send())
        for _ in range(5):
            self.clock.advance(IDLE - 1)
            response.protocol.dataReceived(b"data: x\n\n")
        self.assertEqual(response.transport.producerState, "producing")

    def test_stallMidBodyCutsTheResponse(self):
        """
        An upstream that stalls mid-body is aborted, and the client's
        connection closes without a clean end.
        """
        response = self.answer(self.send())
        response.protocol.dataReceived(b"data: one\n\n")
        self.clock.advance(IDLE)
        self.assertEqual(response.transport.producerState, "stopped")
        response.protocol.connectionLost(Failure(ResponseFailed([Failure(error.ConnectionLost())])))
        self.assertTrue(self.client.disconnecting)
        self.assertFalse(self.clientSaw().endswith(b"0\r\n\r\n"))

    def test_nothingLeftScheduled(self):
        response = self.answer(self.send())
        response.protocol.connectionLost(Failure(ResponseDone()))
        self.assertEqual(
            [call for call in self.clock.getDelayedCalls() if "Watchdog" in repr(call)], []
        )


class UpstreamFailureTests(RelayTestCase):
    def assertAnswered(self, reason, code, words):
        pending = self.send()
        pending.response.errback(reason)
        seen = self.clientSaw()
        self.assertTrue(seen.startswith(b"HTTP/1.1 %d " % (code,)), seen)
        self.assertIn(words, seen)
        self.assertIn(b"X-Token-Name: alpha\r\n", seen)
        self.assertNotIn(b"Traceback", seen)
        self.assertNotIn(KEY.token.encode(), seen)

    def test_refused(self):
        self.assertAnswered(error.ConnectionRefusedError(), 502, b"could not connect")

    def test_connectTimeout(self):
        self.assertAnswered(error.TimeoutError(), 504, b"timed out connecting")

    def test_unresolvableName(self):
        self.assertAnswered(error.DNSLookupError("upstream.test"), 502, b"does not resolve")

    def test_untrustedCertificate(self):
        self.assertAnswered(
            ResponseNeverReceived([Failure(TLSError([("SSL routines", "", "certificate verify failed")]))]),
            502,
            b"TLS certificate",
        )

    def test_closedWithoutAnswer(self):
        self.assertAnswered(
            ResponseNeverReceived([Failure(error.ConnectionDone())]), 502, b"without answering"
        )

    def test_garbage(self):
        self.assertAnswered(ResponseFailed([Failure(ValueError("bad status"))]), 502, b"invalid response")

    def test_brokeMidBody(self):
        """
        An upstream that breaks mid-body leaves the client with a response
        that visibly did not end.
        """
        response = self.answer(self.send())
        response.protocol.dataReceived(b"data: one\n\n")
        response.protocol.connectionLost(Failure(ResponseFailed([Failure(error.ConnectionLost())])))
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(self.clientSaw().endswith(b"data: one\n\n\r\n"))


class BodyLimitTests(RelayTestCase):
    def test_declaredTooLarge(self):
        self.channel.dataReceived(
            b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: h\r\n"
            b"Authorization: Bearer " + ACCESS_TOKEN + b"\r\nContent-Length: 1001\r\n\r\n"
            + b"x" * 1001
        )
        self.assertTrue(self.clientSaw().startswith(b"HTTP/1.1 413 "))
        self.assertEqual(self.agent.requests, [])

    def test_chunkedTooLargeIsNotBuffered(self):
        """
        Chunks past the limit are dropped as they arrive, not kept.
        """
        self.channel.dataReceived(
            b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: h\r\n"
            b"Authorization: Bearer " + ACCESS_TOKEN + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        [request] = self.channel.requests
        for _ in range(10):
            self.channel.dataReceived(b"1f4\r\n" + b"x" * 500 + b"\r\n")
            self.assertLessEqual(request.content.tell(), 1000)
        self.channel.dataReceived(b"0\r\n\r\n")
        self.assertTrue(self.clientSaw().startswith(b"HTTP/1.1 413 "))
        self.assertEqual(self.agent.requests, [])

    def test_atTheLimit(self):
        self.send(body=b"x" * 1000)
        self.assertEqual(len(self.agent.requests), 1)


class EconomyTests(RelayTestCase):
    """
    What the relay does not keep or do, since it costs memory or time on
    every request.
    """

    def test_lengthIsPassedOn(self):
        """
        A known body length goes to the client as Content-Length, so the
        answer is not re-chunked.
        """
        response = self.answer(self.send(), length=11)
        head = self.clientSaw()
        self.assertIn(b"Content-Length: 11\r\n", head)
        self.assertNotIn(b"Transfer-Encoding", head)
        response.protocol.dataReceived(b"hello world")
        response.protocol.connectionLost(Failure(ResponseDone()))
        self.assertTrue(self.clientSaw().endswith(b"\r\n\r\nhello world"))

    def test_noLengthForNoContent(self):
        self.answer(self.send(), code=204, length=0)
        self.assertNotIn(b"Content-Length", self.clientSaw())

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
        self.assertEqual(pending.body._data, b"")
        self.answer(pending)
        self.assertIsNone(request.content)

    def test_formsAreNotParsed(self):
        """
        A form-encoded body is forwarded as it is, not parsed into
        request.args on the way.
        """
        body = b"a=1&b=2"
        pending = self.send(body=body, extra=b"Content-Type: application/x-www-form-urlencoded\r\n")
        [request] = self.channel.requests
        self.assertEqual(request.args, {})
        consumer = StringTransport()
        pending.body.startProducing(consumer)
        self.assertEqual(consumer.value(), body)

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


class ErrorAnswerTests(RelayTestCase):
    """
    An answer that may be about the key is read whole before hermux
    decides; it is read only so far.
    """

    def test_tooLongErrorAnswer(self):
        """
        An error answer longer than the relay reads into memory stops the
        upstream read and gets the client a 502, not a retry.
        """
        self.relay.errorBodyLimit = 10
        response = self.answer(self.send(), code=429)
        response.protocol.dataReceived(b'{"error": {"code": 429, "message": "long"}}')
        self.assertEqual(response.transport.producerState, "stopped")
        response.protocol.connectionLost(Failure(ResponseFailed([Failure(error.ConnectionLost())])))
        self.assertTrue(self.clientSaw().startswith(b"HTTP/1.1 502 "))
        self.assertIn(b"could not be read", self.clientSaw())
        self.assertEqual(len(self.agent.requests), 1)

    def test_brokenErrorAnswer(self):
        response = self.answer(self.send(), code=402)
        response.protocol.dataReceived(b'{"error": ')
        response.protocol.connectionLost(Failure(ResponseFailed([Failure(error.ConnectionLost())])))
        self.assertTrue(self.clientSaw().startswith(b"HTTP/1.1 502 "))
        self.assertEqual(len(self.agent.requests), 1)
