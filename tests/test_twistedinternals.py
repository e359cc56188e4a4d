"""
The private names of Twisted that hermux._twistedinternals relies on, one
test named after each, checking that it is still there with the shape
relied on; and the helpers built on them.  After a Twisted upgrade, a
failure here names what moved.
"""

from __future__ import annotations

import re

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http
from twisted.web._newclient import (
    HEADER,
    STATUS,
    HTTP11ClientProtocol,
    HTTPClientParser,
    ParseError,
    Request,
)
from twisted.web.client import HTTPConnectionPool, ResponseFailed
from twisted.web.http import _ChunkedTransferDecoder
from twisted.web.http_headers import Headers

from hermux._twistedinternals import (
    HeadCheckingClientProtocol,
    HTTPChannelHooks,
    clientRequest,
    connectPoolWith,
)

_ANY_STATUS = re.compile(rb"HTTP/1\.1 [0-9]{3}(?: .*)?")


def _request(target=b"/x") -> Request:
    return clientRequest(b"GET", target, Headers({b"Host": [b"upstream.test"]}), None, True)


def _connected(protocol):
    transport = StringTransport()
    protocol.makeConnection(transport)
    return transport


class ClientRequestTests(SynchronousTestCase):
    def test_newclient_Request(self):
        """
        C{twisted.web._newclient.Request(method, uri, headers, bodyProducer,
        persistent=...)} keeps what it is given, refuses a method or target
        that cannot be sent with L{ValueError}, and writes itself with the
        target as it is.
        """
        headers = Headers({b"Host": [b"upstream.test"]})
        request = Request(b"POST", b"/a?b=%2F", headers, None, persistent=True)
        self.assertEqual((request.method, request.uri), (b"POST", b"/a?b=%2F"))
        self.assertIs(request.headers, headers)
        self.assertTrue(request.persistent)
        for method, target in ((b"GE T", b"/x"), (b"GET", b"/x y"), (b"GET", b"/x\r\nA: b")):
            self.assertRaises(ValueError, Request, method, target, headers, None, persistent=True)
        transport = StringTransport()
        request.writeTo(transport)
        self.assertTrue(transport.value().startswith(b"POST /a?b=%2F HTTP/1.1\r\n"))

    def test_clientRequest(self):
        request = _request(b"/api/v1/models")
        self.assertIsInstance(request, Request)
        self.assertEqual((request.method, request.uri), (b"GET", b"/api/v1/models"))
        self.assertRaises(ValueError, clientRequest, b"GET", b"/x y", Headers(), None, True)


class ClientProtocolTests(SynchronousTestCase):
    def test_HTTP11ClientProtocol_request(self):
        """
        L{HTTP11ClientProtocol} is made with the pool's quiescent callback;
        C{request(Request)} sends it and fires with the response, after
        which the protocol calls that callback.
        """
        quiet = []
        protocol = HTTP11ClientProtocol(quiet.append)
        transport = _connected(protocol)
        d = protocol.request(_request())
        self.assertTrue(transport.value().startswith(b"GET /x HTTP/1.1\r\n"))
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(quiet, [protocol])

    def test_HTTP11ClientProtocol__parser(self):
        """
        C{request} makes a new L{HTTPClientParser} for each request, as
        C{_parser}, before it returns.
        """
        protocol = HTTP11ClientProtocol()
        _connected(protocol)
        protocol.request(_request())
        first = protocol._parser
        self.assertIsInstance(first, HTTPClientParser)
        protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        protocol.request(_request())
        self.assertIsInstance(protocol._parser, HTTPClientParser)
        self.assertIsNot(protocol._parser, first)

    def test_HTTPClientParser_lineReceived(self):
        """
        The parser is a line receiver that looks up C{lineReceived} on
        itself for every line of the head, so that one set on the instance
        sees each line as it arrived (its CR included, its LF not).
        """
        protocol = HTTP11ClientProtocol()
        _connected(protocol)
        protocol.request(_request())
        parser = protocol._parser
        lines = []
        own = parser.lineReceived

        def spy(line):
            lines.append(line)
            own(line)

        parser.lineReceived = spy
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n cont\r\n\r\n")
        self.assertEqual(lines, [b"HTTP/1.1 200 OK\r", b"X-A: 1\r", b" cont\r", b"\r"])
        del parser.lineReceived
        self.assertEqual(parser.lineReceived, own)

    def test_HTTPClientParser_allHeadersReceived_connHeaders(self):
        """
        The parser files Connection among its C{connHeaders}, the other
        headers in C{headers}, which the response shares; C{allHeadersReceived},
        looked up on the instance, runs once every header is in and before
        the response is handed on.
        """
        protocol = HTTP11ClientProtocol()
        _connected(protocol)
        responses = []
        protocol.request(_request()).addCallback(responses.append)
        parser = protocol._parser
        seen = []
        own = parser.allHeadersReceived

        def spy():
            seen.append(
                (
                    parser.connHeaders.getRawHeaders(b"connection"),
                    parser.headers.getRawHeaders(b"x-a"),
                    list(responses),
                )
            )
            own()

        parser.allHeadersReceived = spy
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nConnection: x-a\r\nX-A: 1\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertEqual(seen, [([b"x-a"], [b"1"], [])])
        [response] = responses
        self.assertIs(response.headers, parser.headers)

    def test_STATUS_HEADER(self):
        """
        The parser's C{state} is C{STATUS} until the status line, then
        C{HEADER} until the end of the head, then neither.
        """
        protocol = HTTP11ClientProtocol()
        _connected(protocol)
        protocol.request(_request())
        parser = protocol._parser
        self.assertEqual(parser.state, STATUS)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertEqual(parser.state, HEADER)
        protocol.dataReceived(b"Content-Length: 2\r\n")
        self.assertEqual(parser.state, HEADER)
        protocol.dataReceived(b"\r\n")
        self.assertNotIn(parser.state, (STATUS, HEADER))

    def test_ParseError(self):
        """
        A L{ParseError} raised from the parser's C{lineReceived} fails the
        request with L{ResponseFailed} wrapping it, and closes the
        connection.
        """
        self.assertTrue(issubclass(ParseError, Exception))
        protocol = HTTP11ClientProtocol()
        transport = _connected(protocol)
        d = protocol.request(_request())

        def refuse(line):
            raise ParseError("refused", line)

        protocol._parser.lineReceived = refuse
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        failure = self.failureResultOf(d, ResponseFailed)
        [reason] = failure.value.reasons
        self.assertTrue(reason.check(ParseError))
        self.assertTrue(transport.disconnecting)


class HeadCheckingClientProtocolTests(SynchronousTestCase):
    def exchange(self, head: bytes, maxHeadBytes: int = 1000):
        protocol = HeadCheckingClientProtocol(lambda p: None, maxHeadBytes, _ANY_STATUS)
        transport = _connected(protocol)
        d = protocol.request(_request())
        parser = protocol._parser
        protocol.dataReceived(head)
        return d, transport, parser

    def test_acceptedHead(self):
        """
        A head within the limits gets its response, and the parser its own
        C{lineReceived} back.
        """
        d, transport, parser = self.exchange(b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertNotIn("lineReceived", vars(parser))
        self.assertFalse(transport.disconnecting)

    def test_refusedHeads(self):
        for head in (
            b"HTTP/1.1 2_00 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\x00\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-A: \x00\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 200,
        ):
            d, transport, parser = self.exchange(head)
            failure = self.failureResultOf(d, ResponseFailed)
            self.assertTrue(failure.value.reasons[0].check(ParseError), head)
            self.assertTrue(transport.disconnecting, head)

    def test_limitCountsLineEndings(self):
        head = b"HTTP/1.1 204 No Content\r\n\r\n"
        d, _, _ = self.exchange(head, maxHeadBytes=len(head))
        self.assertEqual(self.successResultOf(d).code, 204)
        d, _, _ = self.exchange(head, maxHeadBytes=len(head) - 1)
        self.failureResultOf(d, ResponseFailed)


class _Endpoint:
    def __init__(self):
        self.factories = []

    def connect(self, factory):
        self.factories.append(factory)
        return Deferred()


class PoolTests(SynchronousTestCase):
    def test_HTTPConnectionPool__factory(self):
        """
        The pool makes each new connection's factory as
        C{_factory(quiescentCallback, metadata)}; a protocol built with that
        callback goes back into the pool when its response is over.
        """
        self.assertTrue(hasattr(HTTPConnectionPool, "_factory"))
        pool = HTTPConnectionPool(Clock(), persistent=True)
        connectPoolWith(pool, HTTP11ClientProtocol)
        endpoint = _Endpoint()
        key = (b"http", b"upstream.test", 80)
        connecting = pool.getConnection(key, endpoint)
        [factory] = endpoint.factories
        self.assertFalse(factory.noisy)
        protocol = factory.buildProtocol(None)
        self.assertIsInstance(protocol, HTTP11ClientProtocol)
        _connected(protocol)
        connecting.callback(protocol)
        d = protocol.request(_request())
        protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.successResultOf(d)
        again = self.successResultOf(pool.getConnection(key, endpoint))
        self.assertIs(getattr(again, "_clientProtocol", again), protocol)
        self.assertEqual(len(endpoint.factories), 1)


class _Channel(HTTPChannelHooks):
    timeOut = None

    def __init__(self):
        super().__init__()
        self.calls = []
        self.clock = Clock()
        self.callLater = self.clock.callLater

    def requestMalformed(self):
        self.calls.append("requestMalformed")
        super().requestMalformed()

    def sendContinue(self):
        self.calls.append("sendContinue")
        super().sendContinue()


class _Transport(StringTransport):
    aborted = False

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()


def _channel(channelClass=_Channel):
    channel = channelClass()
    transport = _Transport()
    channel.makeConnection(transport)
    return channel, transport


class ChannelTests(SynchronousTestCase):
    def test_HTTPChannel__respondToBadRequestAndDisconnect(self):
        """
        The channel calls C{_respondToBadRequestAndDisconnect} for a
        malformed request; by default it writes a bare 400 and closes.
        """
        self.assertTrue(callable(getattr(http.HTTPChannel, "_respondToBadRequestAndDisconnect", None)))
        channel, transport = _channel()
        channel.dataReceived(b"NOT A REQUEST LINE AT ALL\r\n\r\n")
        self.assertEqual(channel.calls, ["requestMalformed"])
        self.assertEqual(transport.value(), b"HTTP/1.1 400 Bad Request\r\n\r\n")
        self.assertTrue(transport.disconnecting)

    def test_HTTPChannel__send100Continue(self):
        """
        The channel calls C{_send100Continue} when a request's head asks
        for it; by default it writes C{100 Continue}.
        """
        self.assertTrue(callable(getattr(http.HTTPChannel, "_send100Continue", None)))
        channel, transport = _channel()
        channel.dataReceived(
            b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        self.assertEqual(channel.calls, ["sendContinue"])
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")

    def test_HTTPChannel__abortingCall(self):
        """
        C{_abortingCall} starts as None; C{timeoutConnection} sets it to the
        call of C{forceAbortClient}, which clears it, and C{connectionLost}
        cancels it.
        """
        self.assertIsNone(http.HTTPChannel._abortingCall)
        channel, transport = _channel()
        self.assertIsNone(channel._abortingCall)
        channel.timeoutConnection()
        call = channel._abortingCall
        self.assertTrue(call.active())
        self.assertEqual(call.getTime(), channel.abortTimeout)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(call.active())
        self.assertIsNone(channel._abortingCall)

        channel, transport = _channel()
        channel.timeoutConnection()
        channel.clock.advance(channel.abortTimeout)
        self.assertIsNone(channel._abortingCall)
        self.assertTrue(transport.aborted)

    def test_abortLater(self):
        """
        L{HTTPChannelHooks.abortLater} aborts the connection after
        C{abortTimeout}, in the slot Twisted's own timeout uses: no second
        abort when one is due (as when Twisted's idle timeout closes the
        connection), and a lost connection cancels it.
        """
        channel, transport = _channel()
        channel.abortLater()
        channel.abortLater()
        self.assertEqual(len(channel.clock.getDelayedCalls()), 1)

        channel, transport = _channel()
        channel.loseConnection = channel.abortLater
        channel.timeoutConnection()
        self.assertEqual(len(channel.clock.getDelayedCalls()), 1)

        channel, transport = _channel()
        channel.abortLater()
        channel.clock.advance(channel.abortTimeout)
        self.assertTrue(transport.aborted)

        channel, transport = _channel()
        channel.abortLater()
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(channel.clock.getDelayedCalls(), [])

    def test_abortLaterWithoutTimeout(self):
        channel, transport = _channel()
        channel.abortTimeout = None
        channel.abortLater()
        self.assertEqual(channel.clock.getDelayedCalls(), [])


class _ContentChannel(_Channel):
    """
    A channel that notes, when a request's body is all in, its body decoder,
    the decoder's trailer lines, and L{HTTPChannelHooks.trailerLines}.
    """

    def allContentReceived(self):
        decoder = self._transferDecoder
        self.calls.append(
            (
                type(decoder),
                list(getattr(decoder, "_trailerHeaders", [])),
                self.trailerLines(),
            )
        )
        super().allContentReceived()


class TrailerTests(SynchronousTestCase):
    def test_HTTPChannel__transferDecoder_ChunkedTransferDecoder__trailerHeaders(self):
        """
        While C{allContentReceived} runs, the channel's C{_transferDecoder}
        is the chunked body's L{_ChunkedTransferDecoder}, whose
        C{_trailerHeaders} holds each trailer line without its CRLF, whatever
        it contains; Twisted's C{allContentReceived} resets it.
        """
        channel, transport = _channel(_ContentChannel)
        channel.dataReceived(
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\n{}\r\n0\r\nX-A: 1\r\nGET /x HTTP/1.1\r\nX-B: 1\nX-C\r2\r\n\r\n"
        )
        [(decoderType, trailers, lines)] = channel.calls
        self.assertIs(decoderType, _ChunkedTransferDecoder)
        self.assertEqual(trailers, [b"X-A: 1", b"GET /x HTTP/1.1", b"X-B: 1\nX-C\r2"])
        self.assertIsNone(channel._transferDecoder)
        self.assertFalse(transport.disconnecting)

    def test_trailerLines(self):
        """
        L{HTTPChannelHooks.trailerLines} is the trailer section of a chunked
        body as bytes, empty for a chunked body without one and for a body
        framed by Content-Length or a request without a body.
        """
        channel, transport = _channel(_ContentChannel)
        channel.dataReceived(
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\nX-A: 1\r\nX-B\r\n\r\n"
        )
        [(_, _, lines)] = channel.calls
        self.assertEqual(lines, [b"X-A: 1", b"X-B"])
        self.assertEqual({type(line) for line in lines}, {bytes})

        for request in (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}",
            b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
        ):
            channel, transport = _channel(_ContentChannel)
            channel.dataReceived(request)
            [(_, _, lines)] = channel.calls
            self.assertEqual(lines, [], request)

