# -*- test-case-name: tests.test_twistedinternals -*-
"""
Every name hermux takes from Twisted that Twisted does not make public, and
the only module of hermux that uses one.

Each item below says why the public API does not do what hermux needs.
tests/test_twistedinternals.py checks, one test named after each private
name, that it is still there with the shape relied on here, so that a
Twisted release that changes one fails that test by name instead of making
hermux misbehave.  setup.py bounds Twisted to the releases the suite ran on.
"""

from __future__ import annotations

import re
from typing import Callable

from twisted.internet.protocol import Factory
from twisted.web import http
from twisted.web._newclient import HEADER, STATUS, HTTP11ClientProtocol, ParseError, Request
from twisted.web.http import _ChunkedTransferDecoder
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer

__all__ = [
    "HTTPChannelHooks",
    "HeadCheckingClientProtocol",
    "clientRequest",
    "connectPoolWith",
]


def clientRequest(
    method: bytes,
    target: bytes,
    headers: Headers,
    bodyProducer: IBodyProducer | None,
    persistent: bool,
) -> Request:
    """
    The request that a pooled connection's protocol sends, as
    C{protocol.request(clientRequest(...))}: C{target} is sent as it is.

    Private: L{twisted.web._newclient.Request}.  Why: the public way to
    send a request is L{IAgent.request}, and L{Agent} parses each absolute
    URI, rebuilds its target and finds its endpoint and pool key again for
    every request; hermux's agent works those out once per origin (see
    L{hermux.upstream._UpstreamAgent}), which takes the request object
    Agent builds internally.

    @raise ValueError: if C{method} or C{target} cannot be sent (the
        constructor checks both, as Agent relies on it to).
    """
    return Request(method, target, headers, bodyProducer, persistent=persistent)


class _QuietFactory(Factory):
    """
    The factory that L{HTTPConnectionPool} connects with, building the
    protocol it was given and logging nothing per connection.
    """

    noisy = False

    def __init__(self, buildProtocol, quiescentCallback, metadata):
        self._build = buildProtocol
        self._quiescentCallback = quiescentCallback
        self._metadata = metadata

    def __repr__(self) -> str:
        return f"_QuietFactory({self._quiescentCallback}, {self._metadata})"

    def buildProtocol(self, addr):
        return self._build(self._quiescentCallback)


def connectPoolWith(
    pool: HTTPConnectionPool, buildProtocol: Callable[[Callable], HTTP11ClientProtocol]
) -> None:
    """
    Have C{pool} make each new connection's protocol with
    C{buildProtocol(quiescentCallback)}, where C{quiescentCallback} is what
    the protocol calls to go back into the pool, and log no line for each
    connection it opens and closes.

    Private: L{HTTPConnectionPool._factory}, called as
    C{_factory(quiescentCallback, metadata)} for each new connection.  Why:
    the pool takes no factory or protocol of its own, and Twisted's factory
    (C{_HTTP11ClientFactory}) is noisy and builds L{HTTP11ClientProtocol}
    itself.
    """

    def factory(quiescentCallback, metadata):
        return _QuietFactory(buildProtocol, quiescentCallback, metadata)

    pool._factory = factory


class HeadCheckingClientProtocol(HTTP11ClientProtocol):
    """
    Twisted's HTTP/1.1 client protocol, stricter about response heads: a
    head longer than C{maxHeadBytes} (counting each line with its line
    ending), a status line that does not match C{statusLine} all through,
    or a NUL anywhere in the head fails the request with L{ResponseFailed}
    and closes the connection, as Twisted's own parse errors do; and the
    headers that the response's C{Connection} header names are dropped from
    it, as hop-by-hop.

    Private: L{HTTP11ClientProtocol} (in C{twisted.web._newclient}: the
    protocol the pool's connections speak), its C{_parser} (one per
    request), the parser's C{lineReceived} (replaced on the instance for
    the head), its C{allHeadersReceived} (likewise) and C{connHeaders}, its
    states C{STATUS} and C{HEADER}, and L{ParseError}.  Why:
    the head reaches public API only as a L{Response}, once it is all read:
    Twisted buffers it without limit until then (continuation lines
    included); the Response's C{code} is what C{int()} made of the status
    (C{2_00}, C{+200} and C{ 200} are all 200), it never exists for a 1xx
    status (Twisted skips those), and its C{headers} leave out the
    connection headers (C{Content-Length}, C{Transfer-Encoding}, ...).
    """

    def __init__(self, quiescentCallback, maxHeadBytes: int, statusLine: re.Pattern):
        super().__init__(quiescentCallback)
        self._maxHeadBytes = maxHeadBytes
        self._statusLine = statusLine

    def request(self, request):
        result = super().request(request)
        if self._parser is not None:
            _guardHead(self._parser, self._maxHeadBytes, self._statusLine)
        return result


def _guardHead(parser, maxHeadBytes: int, statusLine: re.Pattern) -> None:
    """
    Check the lines of the head C{parser} (an C{HTTPClientParser}) reads.
    """
    seen = 0
    lineReceived = parser.lineReceived

    def checkedLineReceived(line):
        nonlocal seen
        state = parser.state
        if state in (STATUS, HEADER):
            seen += len(line) + 1
            if seen > maxHeadBytes:
                raise ParseError("response head too large", line[:64])
            if b"\x00" in line:
                # RFC 9110 section 5.5: reject it or replace it; Twisted
                # would relay it to the client.
                raise ParseError("NUL in the response head", line[:64])
            if state == STATUS:
                # The parser takes any integer as the status code and any
                # bytes as the reason phrase (a bare CR included), and the
                # server side writes both back out.
                status = line[:-1] if line[-1:] == b"\r" else line
                if not statusLine.fullmatch(status):
                    raise ParseError("invalid status line", status)
        lineReceived(line)
        if parser.state not in (STATUS, HEADER):
            # The head is over: let the parser's own method back, so that
            # it and this function do not hold each other until the
            # cyclic garbage collector runs.
            del parser.lineReceived

    allHeadersReceived = parser.allHeadersReceived

    def headersWithoutConnectionOptions():
        # RFC 9110 section 7.6.1: the headers that Connection names are
        # hop-by-hop.  The parser files Connection among its connHeaders,
        # which the Response never shows, so they are dropped here, before
        # the Response is handed on.
        for value in parser.connHeaders.getRawHeaders(b"connection", ()):
            for name in value.split(b","):
                name = name.strip()
                if name:
                    parser.headers.removeHeader(name)
        del parser.allHeadersReceived
        allHeadersReceived()

    parser.lineReceived = checkedLineReceived
    parser.allHeadersReceived = headersWithoutConnectionOptions


class HTTPChannelHooks(http.HTTPChannel):
    """
    L{http.HTTPChannel} with public names for what hermux changes or calls
    among its private methods and attributes; a subclass overrides
    L{requestMalformed} and L{sendContinue}, and calls L{abortLater} and
    L{trailerLines}.
    """

    def requestMalformed(self) -> None:
        """
        Answer a request that Twisted's parser found malformed (a bad
        request line, header or chunk size, ambiguous framing, a multipart
        body that does not parse) and close the connection; by default
        with Twisted's bare 400.

        Private: C{HTTPChannel._respondToBadRequestAndDisconnect}, which
        both the channel and L{http.Request} call.  Why: it is Twisted's
        only answer to a malformed request, and no public method or
        attribute changes it.
        """
        super()._respondToBadRequestAndDisconnect()

    def _respondToBadRequestAndDisconnect(self):
        self.requestMalformed()

    def sendContinue(self) -> None:
        """
        Send C{100 Continue} to a request that asked for it (with
        C{Expect: 100-continue}); by default right after its head.

        Private: C{HTTPChannel._send100Continue}.  Why: the channel sends it
        from C{allHeadersReceived}, after the request's C{gotLength} may
        already have refused the request; nothing public keeps it from
        writing C{100 Continue} after the refusal.
        """
        super()._send100Continue()

    def _send100Continue(self):
        self.sendContinue()

    def abortLater(self) -> None:
        """
        Abort the connection after C{abortTimeout} seconds if it is still
        open then, unless an abort is already due.

        Private: C{HTTPChannel._abortingCall}, where the channel keeps that
        call: its C{timeoutConnection} sets it before it closes the
        connection, C{forceAbortClient} clears it, and C{connectionLost}
        cancels it.  Why: Twisted aborts a connection that will not close
        only after its own idle timeout, never after C{loseConnection}; in
        its slot, the abort is cancelled by Twisted's C{connectionLost},
        and the idle timeout's own abort is not followed by a second one
        when it closes the connection.
        """
        if self._abortingCall is None and self.abortTimeout is not None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)

    def trailerLines(self) -> list[bytes]:
        """
        The trailer section of the chunked request body just read: each line
        between the last chunk and the empty line that ends the body, as the
        client sent it but for its CRLF; none for a body that is not chunked.
        Valid in C{allContentReceived}, before Twisted's resets the channel
        for the next request.

        Private: C{HTTPChannel._transferDecoder}, the request body's decoder
        until then, L{_ChunkedTransferDecoder}, and its C{_trailerHeaders},
        where it keeps those lines.  Why: Twisted reads the trailer section
        but checks none of it (any bytes up to a CRLF make a line: a bare CR
        or LF, no colon, a pipelined request's head) and hands none of it to
        L{http.Request} or anything else public, so nothing public can
        refuse what a front proxy may have read as the next request.
        """
        decoder = self._transferDecoder
        if not isinstance(decoder, _ChunkedTransferDecoder):
            return []
        return [bytes(line) for line in decoder._trailerHeaders]
