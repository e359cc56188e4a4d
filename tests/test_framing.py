"""
How hermux's channel frames a request body, in memory: a Transfer-Encoding
other than one C{chunked}, and a trailer section that is not header fields,
get 400 and a closed connection, with nothing forwarded, rather than a
framing that a proxy in front of hermux could read differently.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent
from zope.interface import implementer

from hermux.access import AccessList, AuthThrottle
from hermux.config import Key
from hermux.keypool import KeyPool
from hermux.relay import Relay
from hermux.resource import buildRoot
from hermux.site import HermuxSite
from hermux.upstream import Upstream
from tests.rawhttp import splitResponse

KEY = Key("alpha", "sk-or-v1-framing-test-key-4c2a")
ACCESS_TOKEN = b"framing-test-access-token-Qw8p"
POST = (
    b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: h\r\n"
    b"Authorization: Bearer " + ACCESS_TOKEN + b"\r\n"
    b"Content-Type: application/json\r\n"
)
NEXT = b"GET /api/v1/models HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer " + ACCESS_TOKEN + b"\r\n\r\n"


class _Consumer:
    def __init__(self):
        self.written = []

    def write(self, data):
        self.written.append(data)


@implementer(IAgent)
class _PendingAgent:
    """
    An agent whose requests never get an answer, keeping what each one sent.
    """

    def __init__(self):
        self.requests = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        consumer = _Consumer()
        if bodyProducer is not None:
            bodyProducer.startProducing(consumer)
        self.requests.append((method, uri, b"".join(consumer.written)))
        return Deferred()


class FramingTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.agent = _PendingAgent()
        pool = KeyPool([KEY], reactor=self.clock)
        relay = Relay(Upstream(b"https://upstream.test", self.agent), pool, reactor=self.clock)
        access = AccessList([ACCESS_TOKEN.decode()])
        self.site = HermuxSite(
            buildRoot(pool, access, relay, throttle=AuthThrottle(3, reactor=self.clock)),
            maxBody=1000,
            clientTimeout=60.0,
            maxConnections=3,
            access=access,
            reactor=self.clock,
        )
        self.channel = self.site.buildProtocol(None)
        self.client = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        self.channel.makeConnection(self.client)

    def send(self, data: bytes, pieces: int = 1):
        """
        Send C{data} whole, or byte by byte when C{pieces} is 0.
        """
        if pieces:
            self.channel.dataReceived(data)
        else:
            for i in range(len(data)):
                self.channel.dataReceived(data[i : i + 1])

    def assertRefused(self, data: bytes) -> str:
        """
        C{data}, sent whole and byte by byte on a new connection, gets one of
        hermux's JSON 400s and a closing connection; nothing goes upstream.
        """
        messages = []
        for pieces in (1, 0):
            self.setUp()
            self.send(data, pieces)
            status, headers, body = splitResponse(self.client.value())
            self.assertEqual(status, 400, (data, pieces))
            self.assertEqual(headers[b"x-hermux-error"], [b"400"])
            self.assertEqual(headers[b"content-type"], [b"application/json"])
            self.assertEqual(headers[b"connection"], [b"close"])
            self.assertEqual(json.loads(body)["error"]["code"], 400)
            # One answer only: nothing after the error's body.
            self.assertEqual(self.client.value().count(b"HTTP/1.1 "), 1)
            self.assertTrue(self.client.disconnecting)
            self.assertEqual(self.agent.requests, [])
            messages.append(json.loads(body)["error"]["message"])
        self.assertEqual(messages[0], messages[1])
        return messages[0]

    def assertForwarded(self, data: bytes, body: bytes):
        """
        C{data}, sent whole and byte by byte, is forwarded once with C{body}
        and the connection stays open.
        """
        for pieces in (1, 0):
            self.setUp()
            self.send(data, pieces)
            self.assertEqual(
                self.agent.requests,
                [(b"POST", b"https://upstream.test/api/v1/chat/completions", body)],
            )
            self.assertEqual(self.client.value(), b"")
            self.assertFalse(self.client.disconnecting)


class TransferEncodingTests(FramingTestCase):
    def test_identityWithContentLength(self):
        """
        C{Transfer-Encoding: identity} with a Content-Length gets 400:
        Twisted would ignore it and frame the body by the length, while a
        proxy that takes the Transfer-Encoding for the framing reads on.
        """
        for head in (
            b"Transfer-Encoding: identity\r\nContent-Length: 2\r\n",
            b"Content-Length: 2\r\nTransfer-Encoding: identity\r\n",
            b"Content-Length: 2\r\nTransfer-Encoding: IDENTITY\r\n",
        ):
            message = self.assertRefused(POST + head + b"\r\n{}" + NEXT)
            self.assertIn("Transfer-Encoding", message)

    def test_identityAlone(self):
        """
        C{Transfer-Encoding: identity} alone gets 400: Twisted would read the
        request without a body and what follows as the next request.
        """
        self.assertRefused(POST + b"Transfer-Encoding: identity\r\n\r\n" + NEXT)

    def test_codingList(self):
        """
        A list of codings, even one ending with chunked, gets 400: hermux
        decodes chunked only.
        """
        for value in (b"gzip, chunked", b"chunked, chunked", b"identity, chunked", b"chunked,"):
            self.assertRefused(
                POST + b"Transfer-Encoding: " + value + b"\r\n\r\n2\r\n{}\r\n0\r\n\r\n" + NEXT
            )

    def test_otherCodings(self):
        for value in (b"gzip", b"deflate", b"compress", b"chunked;x=1", b"chunkedx", b""):
            self.assertRefused(
                POST + b"Transfer-Encoding: " + value + b"\r\n\r\n2\r\n{}\r\n0\r\n\r\n" + NEXT
            )

    def test_twoTransferEncodingLines(self):
        """
        A second Transfer-Encoding line gets 400 whatever the two say,
        including identity next to chunked, which Twisted would take as
        chunked alone.
        """
        for first, second in (
            (b"chunked", b"chunked"),
            (b"identity", b"chunked"),
            (b"chunked", b"identity"),
            (b"gzip", b"chunked"),
        ):
            message = self.assertRefused(
                POST
                + b"Transfer-Encoding: " + first + b"\r\n"
                + b"X-Between: 1\r\n"
                + b"transfer-encoding: " + second + b"\r\n\r\n"
                + b"2\r\n{}\r\n0\r\n\r\n" + NEXT
            )
            self.assertIn("Transfer-Encoding", message)

    def test_chunkedIsForwarded(self):
        """
        C{chunked}, in any case and with spaces around it, is still decoded
        and forwarded.
        """
        for value in (b"chunked", b"Chunked", b"CHUNKED", b" chunked \t"):
            self.assertForwarded(
                POST + b"Transfer-Encoding:" + value + b"\r\n\r\n2\r\n{}\r\n3\r\n[1]\r\n0\r\n\r\n",
                b"{}[1]",
            )

    def test_eachRequestCountsItsOwn(self):
        """
        The Transfer-Encoding lines are counted per request: two pipelined
        chunked requests on one connection are both served.
        """
        request = POST + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
        self.send(request + request)
        self.assertEqual(len(self.agent.requests), 1)
        self.channel.requests[0].finish()
        self.assertEqual(len(self.agent.requests), 2)
        self.assertFalse(self.client.disconnecting)


class TrailerTests(FramingTestCase):
    CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n"

    def test_validTrailersAreAccepted(self):
        """
        Trailer fields after the last chunk are read (and not forwarded) and
        the request goes on.
        """
        for trailers in (b"X-Trailer: 1\r\n", b"X-Trailer:1\r\nX-Other: a b\t\r\n", b"X-Empty:\r\n"):
            self.assertForwarded(self.CHUNKED + trailers + b"\r\n", b"{}")

    def test_bareLF(self):
        """
        A bare LF in a trailer line gets 400: a parser that ends lines at LF
        would read the rest as the next request.
        """
        self.assertRefused(self.CHUNKED + b"X-Trailer: 1\nX-Other: 2\r\n\r\n")
        self.assertRefused(self.CHUNKED + b"\n" + NEXT)

    def test_bareCR(self):
        self.assertRefused(self.CHUNKED + b"X-Trailer: 1\rX-Other: 2\r\n\r\n")
        self.assertRefused(self.CHUNKED + b"\r" + NEXT)

    def test_noColon(self):
        message = self.assertRefused(self.CHUNKED + b"X-Trailer 1\r\n\r\n")
        self.assertIn("trailer", message)

    def test_otherMalformedTrailers(self):
        """
        A trailer line that would be refused as a header line is refused too.
        """
        for trailers in (
            b"X-Trailer : 1\r\n",
            b": 1\r\n",
            b"X-Trailer: 1\r\n folded\r\n",
            b"X-Trailer: \x00\r\n",
            b"X-Trailer: \x1b[31m\r\n",
        ):
            self.assertRefused(self.CHUNKED + trailers + b"\r\n")

    def test_pipelinedRequestAfterBadTrailerIsNotServed(self):
        """
        A request head that Twisted would swallow as trailers, and whatever
        follows the refused request, reach nothing: the chunked request and
        the pipelined one are both unforwarded.
        """
        # Twisted would take the next request's head as the trailer section
        # and serve the chunked request alone.
        self.assertRefused(self.CHUNKED + NEXT + NEXT)
        # A bad trailer, then a complete pipelined request.
        self.assertRefused(self.CHUNKED + b"X-Trailer 1\r\n\r\n" + NEXT)
