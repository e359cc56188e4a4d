"""
hermux's HTTP channel in memory: what it refuses before any resource sees
a request, how long it lets a client take, and how many clients it
serves, with a L{StringTransport} per client and a L{Clock} for time.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent
from zope.interface import implementer

from hermux.access import AccessList, AuthThrottle
from hermux.config import Key
from hermux.keypool import KeyPool
from hermux.relay import Relay
from hermux.resource import buildRoot
from hermux import access as access_module
from hermux import site as site_module
from hermux.channel import MAX_HEAD_BYTES, MAX_HEADERS, HermuxChannel
from hermux.site import HermuxSite, ensureFileLimit
from hermux.upstream import Upstream
from tests.rawhttp import splitResponse

KEY = Key("alpha", "sk-or-v1-site-test-key-8d1e")
ACCESS_TOKEN = b"site-test-access-token-Zr5k"
AUTHORIZATION = b"Authorization: Bearer " + ACCESS_TOKEN + b"\r\n"
MAX_BODY = 1000
CLIENT_TIMEOUT = 60.0
_CLOSED = Failure(ConnectionDone())


@implementer(IAgent)
class PendingAgent:
    """
    An agent whose requests never get an answer: enough to see whether a
    request was forwarded.
    """

    def __init__(self):
        self.requests = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        self.requests.append((method, uri, headers, bodyProducer))
        return Deferred()


class ChannelTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.agent = PendingAgent()
        pool = KeyPool([KEY], reactor=self.clock)
        relay = Relay(Upstream(b"https://upstream.test", self.agent), pool, reactor=self.clock)
        access = AccessList([ACCESS_TOKEN.decode()])
        self.throttle = AuthThrottle(3, reactor=self.clock)
        self.site = HermuxSite(
            buildRoot(pool, access, relay, throttle=self.throttle),
            maxBody=MAX_BODY,
            clientTimeout=CLIENT_TIMEOUT,
            maxConnections=3,
            access=access,
            reactor=self.clock,
        )
        self.channel, self.client = self.connect()

    def connect(self, host="192.0.2.7"):
        channel = self.site.buildProtocol(None)
        client = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        channel.makeConnection(client)
        return channel, client

    def assertRefused(self, code: int, client=None):
        """
        The client got one of hermux's JSON errors with C{code}, and its
        connection is closing; nothing went upstream.
        """
        client = client or self.client
        status, headers, body = splitResponse(client.value())
        self.assertEqual(status, code)
        self.assertEqual(headers[b"content-type"], [b"application/json"])
        self.assertEqual(headers[b"x-hermux-error"], [b"%d" % (code,)])
        self.assertEqual(headers[b"content-length"], [b"%d" % (len(body),)])
        self.assertEqual(json.loads(body)["error"]["code"], code)
        self.assertTrue(client.disconnecting)
        self.assertEqual(self.agent.requests, [])
        return json.loads(body)["error"]["message"]


class HeadLimitTests(ChannelTestCase):
    def test_atTheHeaderCountLimit(self):
        """
        A request with exactly L{MAX_HEADERS} header lines is forwarded.
        """
        filler = b"".join(b"X-Filler-%d: x\r\n" % (n,) for n in range(MAX_HEADERS - 2))
        self.channel.dataReceived(
            b"GET /api/v1/models HTTP/1.1\r\nHost: h\r\n" + AUTHORIZATION + filler + b"\r\n"
        )
        self.assertEqual(len(self.agent.requests), 1)

    def test_tooManyHeaders(self):
        filler = b"".join(b"X-Filler-%d: x\r\n" % (n,) for n in range(MAX_HEADERS - 1))
        self.channel.dataReceived(
            b"GET /api/v1/models HTTP/1.1\r\nHost: h\r\n" + AUTHORIZATION + filler + b"\r\n"
        )
        self.assertRefused(431)

    def test_headTooLarge(self):
        """
        Header lines that together pass L{MAX_HEAD_BYTES} get 431, before
        the head is over.
        """
        self.channel.dataReceived(b"GET /api/v1/models HTTP/1.1\r\n" + AUTHORIZATION)
        line = b"X-Big: " + b"b" * 1000 + b"\r\n"
        for _ in range(MAX_HEAD_BYTES // len(line) + 1):
            self.channel.dataReceived(line)
        self.assertRefused(431)

    def test_oneHeaderLineTooLong(self):
        """
        A single header line longer than L{MAX_HEAD_BYTES} gets 431 rather
        than a silent close, even before its end arrives.
        """
        self.channel.dataReceived(b"GET /api/v1/models HTTP/1.1\r\n" + AUTHORIZATION)
        self.channel.dataReceived(b"X-Big: " + b"b" * MAX_HEAD_BYTES)
        self.assertRefused(431)

    def test_requestLineTooLong(self):
        self.channel.dataReceived(b"GET /api/v1/" + b"m" * MAX_HEAD_BYTES + b" HTTP/1.1\r\n")
        self.assertRefused(414)

    def test_requestLineTooLongWithoutEnd(self):
        self.channel.dataReceived(b"GET /api/v1/" + b"m" * (MAX_HEAD_BYTES + 10))
        self.assertRefused(414)

    def test_nothingIsReadAfterARefusal(self):
        """
        Once refused, the rest of what the client sent (here a complete
        second request) is ignored.
        """
        self.channel.dataReceived(
            b"GET /api/v1/models HTTP/1.1\r\nX-Bad: a\x01b\r\n\r\n"
            b"GET /api/v1/models HTTP/1.1\r\n" + AUTHORIZATION + b"\r\n"
        )
        self.assertRefused(400)
        self.assertEqual(self.client.value().count(b"HTTP/1.1 "), 1)


class HeaderSyntaxTests(ChannelTestCase):
    def send(self, header: bytes):
        self.channel.dataReceived(
            b"GET /api/v1/models HTTP/1.1\r\nHost: h\r\n" + AUTHORIZATION + header + b"\r\n"
        )

    def test_obsoleteLineFolding(self):
        """
        A header line starting with a space or a tab continues the previous
        one (obsolete line folding): Twisted joins them, so the upstream
        would see a value the client never sent in one line.  It is refused.
        """
        for fold in (b"X-Title: a\r\n X-Injected: yes\r\n", b"X-Title: a\r\n\tmore\r\n"):
            self.setUp()
            self.send(fold)
            self.assertIn("folding", self.assertRefused(400))

    def test_foldedAuthorization(self):
        self.channel.dataReceived(
            b"GET /api/v1/models HTTP/1.1\r\nAuthorization: Bearer\r\n "
            + ACCESS_TOKEN + b"\r\n\r\n"
        )
        self.assertRefused(400)

    def test_controlCharacters(self):
        """
        Control characters other than a tab in a header value are refused,
        not passed upstream.
        """
        for byte in list(range(0x00, 0x09)) + list(range(0x0A, 0x20)) + [0x7F]:
            if byte in (0x0A,):
                continue
            self.setUp()
            self.send(b"X-Title: a" + bytes([byte]) + b"b\r\n")
            self.assertRefused(400)

    def test_tabAndHighBytesPass(self):
        self.send(b"X-Title: a\tb \xc3\xa9\r\n")
        [(method, uri, headers, body)] = self.agent.requests
        self.assertEqual(headers.getRawHeaders(b"X-Title"), [b"a\tb \xc3\xa9"])

    def test_twistedRefusalsAreJSON(self):
        """
        What Twisted's parser refuses (here both Content-Length and
        Transfer-Encoding) gets hermux's error shape, not a bare status
        line.
        """
        self.channel.dataReceived(
            b"POST /api/v1/chat/completions HTTP/1.1\r\n" + AUTHORIZATION
            + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        self.assertRefused(400)

    def test_duplicateAuthorization(self):
        """
        Two Authorization headers are refused, whichever of them is valid.
        """
        for first, second in ((b"Bearer wrong", b"Bearer " + ACCESS_TOKEN),
                              (b"Bearer " + ACCESS_TOKEN, b"Bearer wrong")):
            self.setUp()
            self.channel.dataReceived(
                b"GET /api/v1/models HTTP/1.1\r\nAuthorization: " + first
                + b"\r\nAuthorization: " + second + b"\r\n\r\n"
            )
            status, headers, body = splitResponse(self.client.value())
            self.assertEqual(status, 400)
            self.assertEqual(self.agent.requests, [])


class BodyTests(ChannelTestCase):
    def test_declaredTooLargeIsRefusedAtOnce(self):
        """
        A Content-Length over the limit gets 413 as soon as the head is in,
        without waiting for a body that hermux would only throw away.
        """
        self.channel.dataReceived(
            b"POST /api/v1/chat/completions HTTP/1.1\r\n" + AUTHORIZATION
            + b"Content-Length: 10000000000\r\n\r\n"
        )
        self.assertRefused(413)

    def test_declaredTooLargeGetsNo100Continue(self):
        self.channel.dataReceived(
            b"POST /api/v1/chat/completions HTTP/1.1\r\n" + AUTHORIZATION
            + b"Expect: 100-continue\r\nContent-Length: 1001\r\n\r\n"
        )
        self.assertRefused(413)
        self.assertNotIn(b"100 Continue", self.client.value())

    def test_chunkedTooLargeIsRefusedWhenItPassesTheLimit(self):
        self.channel.dataReceived(
            b"POST /api/v1/chat/completions HTTP/1.1\r\n" + AUTHORIZATION
            + b"Transfer-Encoding: chunked\r\n\r\n"
        )
        [request] = self.channel.requests
        self.channel.dataReceived(b"1f4\r\n" + b"x" * 500 + b"\r\n")
        self.channel.dataReceived(b"1f4\r\n" + b"x" * 500 + b"\r\n")
        self.assertEqual(self.client.value(), b"")
        self.channel.dataReceived(b"1\r\nx\r\n")
        self.assertRefused(413)
        self.assertEqual(request.content.tell(), 0)

    def test_bodyWithoutValidTokenIsNotKept(self):
        """
        The body of a request without a valid access token is read and
        dropped, not buffered: it would never go upstream.
        """
        for authorization in (b"", b"Authorization: Bearer wrong\r\n"):
            self.setUp()
            self.channel.dataReceived(
                b"POST /api/v1/chat/completions HTTP/1.1\r\n" + authorization
                + b"Content-Length: %d\r\n\r\n" % (MAX_BODY,)
            )
            [request] = self.channel.requests
            self.channel.dataReceived(b"x" * (MAX_BODY - 1))
            self.assertEqual(request.content.tell(), 0)
            self.channel.dataReceived(b"x")
            status, _, _ = splitResponse(self.client.value())
            self.assertEqual(status, 401)
            self.assertEqual(self.agent.requests, [])

    def test_bodyWithValidTokenIsKept(self):
        self.channel.dataReceived(
            b"POST /api/v1/chat/completions HTTP/1.1\r\n" + AUTHORIZATION
            + b"Content-Length: 5\r\n\r\nhello"
        )
        [(method, uri, headers, body)] = self.agent.requests
        consumer = StringTransport()
        body.startProducing(consumer)
        self.assertEqual(consumer.value(), b"hello")


class TokenLookupTests(ChannelTestCase):
    """
    The access token is looked up once per request: when the head arrives,
    to know whether to keep the body; the gate uses that answer.
    """

    def countDigests(self) -> list[bytes]:
        digested: list[bytes] = []
        real = access_module._digest

        def digest(token):
            digested.append(token)
            return real(token)

        self.patch(access_module, "_digest", digest)
        return digested

    def test_hashedOnce(self):
        digested = self.countDigests()
        self.channel.dataReceived(
            b"POST /api/v1/chat/completions HTTP/1.1\r\n" + AUTHORIZATION
            + b"Content-Length: 2\r\n\r\n{}"
        )
        self.assertEqual(len(self.agent.requests), 1)
        self.assertEqual(digested, [ACCESS_TOKEN])

    def test_unknownTokenHashedOnce(self):
        digested = self.countDigests()
        self.channel.dataReceived(
            b"POST /api/v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer wrong\r\n"
            b"Content-Length: 2\r\n\r\n{}"
        )
        status, _, _ = splitResponse(self.client.value())
        self.assertEqual(status, 401)
        self.assertEqual(digested, [b"wrong"])

    def test_removedWhileTheBodyArrives(self):
        """
        A token removed from the access list (by a reload) after the head
        arrived and before the body is complete is refused, as the list
        now says.
        """
        self.channel.dataReceived(
            b"POST /api/v1/chat/completions HTTP/1.1\r\n" + AUTHORIZATION
            + b"Content-Length: 2\r\n\r\n{"
        )
        self.site._access.replace(["another-access-token-Lm4n"])
        self.channel.dataReceived(b"}")
        status, _, _ = splitResponse(self.client.value())
        self.assertEqual(status, 401)
        self.assertEqual(self.agent.requests, [])


    def test_allowedWhileTheBodyArrives(self):
        """
        A token allowed (by a reload) after the head arrived unknown, so
        that its body was dropped, is asked to send the request again: it
        is not forwarded with an empty body.
        """
        other = "another-access-token-Lm4n"
        self.channel.dataReceived(
            b"POST /api/v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer "
            + other.encode() + b"\r\nContent-Length: 2\r\n\r\n{"
        )
        self.site._access.replace([ACCESS_TOKEN.decode(), other])
        self.channel.dataReceived(b"}")
        status, headers, body = splitResponse(self.client.value())
        self.assertEqual(status, 503)
        self.assertIn(b"send it again", body)
        self.assertEqual(self.agent.requests, [])


class ClientTimeoutTests(ChannelTestCase):
    def test_idleConnectionIsClosed(self):
        """
        A connection that sends nothing is closed after the client timeout
        (Twisted's idle timeout), without an answer.
        """
        self.clock.advance(CLIENT_TIMEOUT - 1)
        self.assertFalse(self.client.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.client.disconnecting)
        self.assertEqual(self.client.value(), b"")

    def test_tricklingHeadIsCutOff(self):
        """
        A head that arrives a byte at a time, each byte well within the
        idle timeout, gets 408 once the client timeout has passed since its
        first byte.
        """
        request = b"GET /api/v1/models HTTP/1.1\r\n" + AUTHORIZATION + b"X-Slow: " + b"s" * 200
        for byte in request[: int(CLIENT_TIMEOUT) - 1]:
            self.channel.dataReceived(bytes([byte]))
            self.clock.advance(1)
        self.assertEqual(self.client.value(), b"")
        self.channel.dataReceived(b"x")
        self.clock.advance(1)
        self.assertIn("did not arrive", self.assertRefused(408))

    def test_tricklingBodyIsCutOff(self):
        self.channel.dataReceived(
            b"POST /api/v1/chat/completions HTTP/1.1\r\n" + AUTHORIZATION
            + b"Content-Length: %d\r\n\r\n" % (MAX_BODY,)
        )
        for _ in range(int(CLIENT_TIMEOUT)):
            self.channel.dataReceived(b"x")
            self.clock.advance(1)
        self.assertRefused(408)

    def test_partialRequestThenSilence(self):
        """
        A partial request followed by silence gets 408, not a silent close,
        though the idle timeout falls due at the same moment; and nothing
        is left scheduled once the connection is gone.
        """
        self.channel.dataReceived(b"GET /api/v1/models HTTP/1.1\r\n")
        self.clock.advance(CLIENT_TIMEOUT)
        self.assertRefused(408)
        self.channel.connectionLost(_CLOSED)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_aRequestInTimeIsServed(self):
        """
        The deadline ends when the request is complete: forwarding and
        answering may take longer.
        """
        self.channel.dataReceived(b"GET /api/v1/models HTTP/1.1\r\n")
        self.clock.advance(CLIENT_TIMEOUT - 1)
        self.channel.dataReceived(AUTHORIZATION + b"\r\n")
        self.assertEqual(len(self.agent.requests), 1)
        self.clock.advance(CLIENT_TIMEOUT * 2)
        self.assertEqual(self.client.value(), b"")
        self.assertFalse(self.client.disconnecting)

    def test_eachRequestHasItsOwnDeadline(self):
        """
        On a kept-alive connection the deadline starts again with the first
        byte of each request.
        """
        for _ in range(3):
            self.channel.dataReceived(b"GET /hermux/health HTTP/1.1\r\n")
            self.clock.advance(CLIENT_TIMEOUT - 1)
            self.channel.dataReceived(b"\r\n")
            self.clock.advance(CLIENT_TIMEOUT - 1)
        self.assertEqual(self.client.value().count(b"HTTP/1.1 200 OK"), 3)
        self.assertFalse(self.client.disconnecting)

    def test_strayLineEndsStartNoDeadline(self):
        """
        The empty line some clients send after a request's body is not the
        start of another request: the connection just idles out, without
        a 408 nobody asked for.
        """
        self.channel.dataReceived(b"GET /hermux/health HTTP/1.1\r\n\r\n\r\n")
        answered = self.client.value()
        self.clock.advance(CLIENT_TIMEOUT)
        self.assertTrue(self.client.disconnecting)
        self.assertEqual(self.client.value(), answered)

    def test_noDeadlineWithoutTimeout(self):
        site = HermuxSite(self.site.resource, maxBody=MAX_BODY, clientTimeout=None, reactor=self.clock)
        channel = site.buildProtocol(None)
        client = StringTransport()
        channel.makeConnection(client)
        channel.dataReceived(b"GET /hermux/health HTTP/1.1\r\n")
        self.clock.advance(10 * CLIENT_TIMEOUT)
        self.assertFalse(client.disconnecting)


class AbortTests(ChannelTestCase):
    def test_closedConnectionIsAbortedIfNotRead(self):
        """
        When hermux closes a connection whose client does not take what is
        left to send, the connection is aborted after C{abortTimeout}.
        """
        self.channel.dataReceived(b"GET /api/v1/models HTTP/1.1\r\nX-Bad: \x01\r\n\r\n")
        self.assertTrue(self.client.disconnecting)
        self.clock.advance(HermuxChannel.abortTimeout - 1)
        self.assertFalse(self.client.disconnected)
        self.clock.advance(1)
        self.assertTrue(self.client.disconnected)

    def test_abortIsCancelledWhenTheConnectionCloses(self):
        self.channel.dataReceived(b"GET /api/v1/models HTTP/1.1\r\nX-Bad: \x01\r\n\r\n")
        self.channel.connectionLost(_CLOSED)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ConnectionLimitTests(ChannelTestCase):
    def test_overTheLimit(self):
        """
        Connections past C{maxConnections} get 503 with Retry-After and are
        not counted; when one closes, a new one is served.
        """
        second, _ = self.connect()
        third, _ = self.connect()
        self.assertEqual(len(self.site.channels), 3)
        fourth, client = self.connect()
        self.assertRefused(503, client)
        _, headers, _ = splitResponse(client.value())
        self.assertEqual(headers[b"retry-after"], [b"1"])
        self.assertEqual(len(self.site.channels), 3)
        fourth.connectionLost(_CLOSED)
        self.assertEqual(len(self.site.channels), 3)
        second.connectionLost(_CLOSED)
        fifth, client = self.connect()
        self.assertIn(fifth, self.site.channels)
        fifth.dataReceived(b"GET /hermux/health HTTP/1.1\r\n\r\n")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 200 OK"))


class ThrottleTests(ChannelTestCase):
    def ask(self, token: bytes, host="192.0.2.7"):
        channel, client = self.connect(host)
        channel.dataReceived(
            b"GET /api/v1/models HTTP/1.1\r\nAuthorization: Bearer " + token + b"\r\n\r\n"
        )
        answer = client.value()
        channel.connectionLost(_CLOSED)
        # A forwarded request gets no answer from the pending agent.
        return splitResponse(answer) if answer else (None, {}, b"")

    def test_throttledAfterFailures(self):
        """
        After the limit of failures an address gets 429 with Retry-After,
        even with a valid token; another address is served, and after a
        minute the first is too.
        """
        self.channel.connectionLost(_CLOSED)
        for _ in range(3):
            self.assertEqual(self.ask(b"wrong")[0], 401)
        status, headers, body = self.ask(b"wrong")
        self.assertEqual(status, 429)
        self.assertEqual(headers[b"retry-after"], [b"60"])
        self.assertEqual(json.loads(body)["error"]["code"], 429)
        self.assertEqual(self.ask(ACCESS_TOKEN)[0], 429)
        self.assertEqual(self.agent.requests, [])
        self.ask(ACCESS_TOKEN, host="192.0.2.8")
        self.assertEqual(len(self.agent.requests), 1)
        self.clock.advance(60)
        self.ask(ACCESS_TOKEN)
        self.assertEqual(len(self.agent.requests), 2)

    def test_throttlingIsLoggedOnce(self):
        self.channel.connectionLost(_CLOSED)
        with capturedLogs() as events:
            for _ in range(5):
                self.ask(b"wrong-" + ACCESS_TOKEN)
        [warning] = [e for e in events if "throttling" in e.get("log_format", "")]
        self.assertEqual(formatEvent(warning), "throttling 192.0.2.7: 3 failed access tokens within 60 seconds")
        self.assertNotIn(ACCESS_TOKEN.decode(), repr(events))

    def test_healthIsNotThrottled(self):
        self.channel.connectionLost(_CLOSED)
        for _ in range(4):
            self.ask(b"wrong")
        channel, client = self.connect()
        channel.dataReceived(b"GET /hermux/health HTTP/1.1\r\n\r\n")
        self.assertEqual(splitResponse(client.value())[0], 200)


class _Lines:
    def __init__(self):
        self.lines = []

    def record(self, fields):
        self.lines.append(fields)


class ClientAddressTests(ChannelTestCase):
    def test_peerWithoutTrustedProxies(self):
        """
        A site without trusted proxies takes the peer for the client, and
        ignores what X-Forwarded-For says: so says its log line.
        """
        self.site.requestLog = log = _Lines()
        self.assertIsNone(self.site.trustedProxies)
        self.channel.dataReceived(
            b"GET /hermux/health HTTP/1.1\r\nX-Forwarded-For: 203.0.113.5\r\n\r\n"
        )
        self.assertEqual([line["peer"] for line in log.lines], ["192.0.2.7:40000"])


class FileLimitTests(SynchronousTestCase):
    """
    L{ensureFileLimit} makes room for --max-connections when it can.
    """

    def limits(self, soft, hard):
        calls = []
        self.patch(site_module.resource, "getrlimit", lambda which: (soft, hard))
        self.patch(site_module.resource, "setrlimit", lambda which, limits: calls.append(limits))
        return calls

    def test_enough(self):
        calls = self.limits(100_000, 100_000)
        self.assertEqual(ensureFileLimit(1024), 100_000)
        self.assertEqual(calls, [])

    def test_raised(self):
        calls = self.limits(1024, 524288)
        self.assertEqual(ensureFileLimit(1024), 2 * 1024 + 256)
        self.assertEqual(calls, [(2 * 1024 + 256, 524288)])

    def test_hardLimitTooLow(self):
        calls = self.limits(256, 1024)
        with capturedLogs() as events:
            self.assertEqual(ensureFileLimit(1024), 1024)
        self.assertEqual(calls, [(1024, 1024)])
        [warning] = events
        self.assertIn("--max-connections", formatEvent(warning))
