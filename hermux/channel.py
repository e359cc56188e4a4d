# -*- test-case-name: tests.test_site,tests.test_hostile_client,tests.test_framing -*-
"""
The connection to a client: stricter than Twisted's about what it accepts
(see L{HermuxChannel}), counted and bounded by its site, and answering every
refusal with an error in OpenRouter's shape.
"""

from __future__ import annotations

import re

from twisted.logger import Logger

from hermux._twistedinternals import HTTPChannelHooks
from hermux.errors import errorBody, reasonPhrase

__all__ = ["MAX_HEAD_BYTES", "MAX_HEADERS", "HermuxChannel", "peerText"]

# The request line and header section together, and the number of header
# lines: the limits of nginx's default large_client_header_buffers and
# more headers than any SDK sends.
MAX_HEAD_BYTES = 16384
MAX_HEADERS = 100

# Control characters other than HTAB, which RFC 9110 (section 5.5) does not
# allow in a field value.  Twisted refuses only NUL, CR and LF.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# A trailer line as RFC 9112 (section 7.1.2) has it: a field line, a token
# for its name and a value without control characters other than HTAB.
_TRAILER_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*")


def peerText(address) -> str:
    """
    A client's address for a log line: host:port, or a UNIX socket's path.
    """
    host = getattr(address, "host", None)
    if host is not None:
        return f"{host}:{address.port}"
    return getattr(address, "name", None) or str(address)


class HermuxChannel(HTTPChannelHooks):
    """
    An HTTP connection that tells its site when it opens and closes, and
    that is stricter than Twisted's about what it accepts:

      - a connection over the site's C{maxConnections} gets 503;
      - a request line over L{MAX_HEAD_BYTES} gets 414, a head over it or
        with more than L{MAX_HEADERS} header lines 431;
      - obsolete line folding, and control characters in a header value,
        get 400 rather than being joined or passed upstream;
      - a Transfer-Encoding other than one C{chunked} (C{identity}, which
        Twisted ignores, a list of codings, a second Transfer-Encoding
        line) gets 400, as RFC 9112 (section 6.1) has a server answer a
        coding it does not decode: hermux decodes C{chunked} only;
      - a trailer line after the last chunk that is not C{name: value}
        (a bare CR or LF in it, no colon: a pipelined request's head, say)
        gets 400 rather than being skipped as Twisted does;
      - a request whose head and body have not all arrived within the
        site's C{timeOut} of its first byte gets 408, however steadily it
        trickles in (the idle timeout alone restarts with every byte);
      - every refusal is a complete response in OpenRouter's error shape,
        after which the connection closes;
      - a connection that hermux closes is aborted if the client has not
        taken what is left to send within C{abortTimeout}, so that a client
        that stops reading cannot hold it open.
    """

    # Not _log: that is HTTPChannel's own, which its messages go through.
    _refusalLog = Logger()

    maxHeaders = MAX_HEADERS
    totalHeadersSize = MAX_HEAD_BYTES
    # LineReceiver's limit for a single line, which would otherwise close
    # the connection without an answer.
    MAX_LENGTH = MAX_HEAD_BYTES

    refused = False
    _counted = False
    _inHead = False
    _headBytes = 0
    _headLines = 0
    _transferEncodings = 0
    _deadline = None
    # Between a request's last byte and its answer's: bytes that arrive
    # meanwhile are the next request's, which Twisted holds until then.
    _answering = False

    def connectionMade(self):
        super().connectionMade()
        if len(self.site.channels) >= self.site.maxConnections:
            self.refuse(
                503,
                "hermux has too many open connections; try again later",
                [(b"Retry-After", b"1")],
            )
            return
        self._counted = True
        self.site.channels.add(self)

    def connectionLost(self, reason):
        self._stopDeadline()
        if self._counted:
            self.site.channels.discard(self)
        super().connectionLost(reason)

    def dataReceived(self, data):
        if self.refused:
            return
        if (
            self._deadline is None
            and not self._answering
            and data.strip(b"\r\n")
            and self.site.timeOut
        ):
            self._deadline = self.callLater(self.site.timeOut, self._tooSlow)
        super().dataReceived(data)

    def lineReceived(self, line):
        if self.refused:
            return
        if not self._inHead:
            if line:
                # The request line.
                self._inHead = True
                self._headBytes = len(line)
                self._headLines = 0
                self._transferEncodings = 0
                if self._headBytes > MAX_HEAD_BYTES:
                    return self._requestLineTooLong()
        else:
            self._headBytes += len(line)
            if self._headBytes > MAX_HEAD_BYTES:
                return self._headTooLarge()
            if not line:
                self._inHead = False
            elif line[:1] in b" \t":
                return self.refuse(
                    400, "obsolete line folding (a header line starting with a space or tab) is not accepted"
                )
            else:
                self._headLines += 1
                if self._headLines > MAX_HEADERS:
                    return self._headTooLarge()
                name, _, value = line.partition(b":")
                value = value.strip(b" \t")
                if _CONTROL.search(value):
                    return self.refuse(400, "a header value contains control characters")
                if name.lower() == b"transfer-encoding":
                    # Checked here, before Twisted sees it: Twisted ignores
                    # identity, so the body is framed by Content-Length, or
                    # by chunked on another line, or read as the next
                    # request.
                    self._transferEncodings += 1
                    if self._transferEncodings > 1:
                        return self.refuse(400, "the request has more than one Transfer-Encoding header")
                    if value.lower() != b"chunked":
                        return self.refuse(
                            400, "the only Transfer-Encoding hermux accepts is chunked, alone"
                        )
        return super().lineReceived(line)

    def lineLengthExceeded(self, line):
        if self._inHead:
            return self._headTooLarge()
        return self._requestLineTooLong()

    def _requestLineTooLong(self):
        return self.refuse(414, f"the request line is longer than {MAX_HEAD_BYTES} bytes")

    def _headTooLarge(self):
        return self.refuse(
            431,
            f"the request has more than {MAX_HEADERS} header lines "
            f"or more than {MAX_HEAD_BYTES} bytes of them",
        )

    def allContentReceived(self):
        if self.refused:
            return
        for line in self.trailerLines():
            if not _TRAILER_LINE.fullmatch(line):
                return self.refuse(
                    400, "a trailer line after the last chunk is not a header field (name: value)"
                )
        self._stopDeadline()
        self._answering = True
        super().allContentReceived()

    def requestDone(self, request):
        if self.persistent:
            # Twisted now hands over the next request's bytes it held,
            # which start that request's deadline.
            self._answering = False
        super().requestDone(request)

    def sendContinue(self):
        if not self.refused:
            super().sendContinue()

    def requestMalformed(self):
        # Twisted's own parser found the request malformed: a bad request
        # line, header name or chunk size, or ambiguous framing (both
        # Content-Length and Transfer-Encoding, or either twice).
        self.refuse(400, "the request is malformed")

    def timeoutConnection(self):
        # The idle timeout, restarted by every byte: it can only come first
        # when a request's first byte and its deadline are as old.
        if self.refused:
            return
        if self._deadline is not None:
            return self._tooSlow()
        super().timeoutConnection()

    def _tooSlow(self):
        self._stopDeadline()
        self.refuse(
            408, f"the request did not arrive within {self.site.timeOut:g} seconds"
        )

    def _stopDeadline(self):
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def refuse(self, code: int, message: str, headers=()) -> None:
        """
        Answer the request being received with an error and close the
        connection, reading nothing more from it.
        """
        if self.refused:
            return
        self.refused = True
        self._stopDeadline()
        self.setTimeout(None)
        body = errorBody(code, message)
        head = [
            b"HTTP/1.1 %d %s\r\n" % (code, reasonPhrase(code)),
            b"Content-Type: application/json\r\n",
            b"Content-Length: %d\r\n" % (len(body),),
            b"X-Hermux-Error: %d\r\n" % (code,),
            b"Connection: close\r\n",
        ]
        head.extend(b"%s: %s\r\n" % (name, value) for name, value in headers)
        self.transport.writeSequence(head + [b"\r\n", body])
        self._refusalLog.info(
            "refused a request from {peer} with {status}: {reason}",
            peer=peerText(self.transport.getPeer()),
            status=code,
            reason=message,
        )
        self.loseConnection()

    def loseConnection(self):
        super().loseConnection()
        self.abortLater()
