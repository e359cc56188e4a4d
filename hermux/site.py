"""
The site that serves hermux's resource tree: its requests bound what they
buffer, carry a request id and log one line each; its channels are counted,
bounded in number and in how long a client may take to send a request,
refuse malformed requests with an error in OpenRouter's shape, and are
drained when hermux stops.
"""

from __future__ import annotations

import re
import resource
import secrets
from io import BytesIO

from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import Resource

from hermux.errors import errorBody, reasonPhrase
from hermux.metrics import Metrics

# The request line and header section together, and the number of header
# lines: the limits of nginx's default large_client_header_buffers and
# more headers than any SDK sends.
MAX_HEAD_BYTES = 16384
MAX_HEADERS = 100

# Control characters other than HTAB, which RFC 9110 (section 5.5) does not
# allow in a field value.  Twisted refuses only NUL, CR and LF.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# A request id a client may choose: short, and safe in a log line or header.
_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


class HermuxRequest(server.Request):
    """
    A request that never buffers a body past the site's C{maxBody} (it is
    refused with 413 as soon as it is known to be larger), nor the body of
    a request without a valid access token, which no upstream will see;
    and that logs one line when it is over, however it ended.

    The resources annotate it for that line: C{clientLabel} and C{keyName}
    once known, C{outcome} when the exchange ended other than normally.

    @ivar requestId: the client's C{X-Request-Id} if it sent a sane one, a
        new random one otherwise; sent back in C{X-Request-Id} and logged.
    """

    _log = Logger()

    clientLabel: str | None = None
    keyName: str | None = None
    outcome: str | None = None
    requestId: str = "-"
    discardBody = False
    _bodyBytes = 0
    _started = 0.0

    def gotLength(self, length):
        # Bodies stay in memory: they are bounded by maxBody, and a
        # temporary file would mean disk I/O on the reactor thread.
        self.content = BytesIO()
        site = self.channel.site
        if length is not None and length > site.maxBody:
            self._tooLarge()
            return
        self.discardBody = not site.wantsBody(self)

    def handleContentChunk(self, data):
        self._bodyBytes += len(data)
        if self._bodyBytes > self.channel.site.maxBody:
            self._tooLarge()
            return
        if not self.discardBody:
            self.content.write(data)

    def _tooLarge(self):
        self.content = BytesIO()
        self.channel.refuse(
            413,
            f"the request body is larger than the limit of "
            f"{self.channel.site.maxBody} bytes",
        )

    def process(self):
        site = self.channel.site
        self._started = site.reactor.seconds()
        requestId = self.getHeader(b"x-request-id")
        if requestId is None or not _CLIENT_REQUEST_ID.fullmatch(requestId):
            requestId = secrets.token_hex(8).encode("ascii")
        self.requestId = requestId.decode("ascii")
        self.setHeader(b"X-Request-Id", requestId)
        site.metrics.inFlight.inc()
        self.notifyFinish().addBoth(self._over)
        super().process()

    def _over(self, result):
        status = self.code if self.startedWriting else "-"
        if self.outcome is None and not self.finished:
            self.outcome = "client went away"
        self.site.metrics.inFlight.dec()
        self.site.metrics.requestDone(self.keyName, status, self.sentLength)
        self._log.info(
            "{requestId} {method} {path} -> {status} via {key} for {client}: "
            "{bytes} bytes in {duration:.3f}s from {peer}{outcomeNote}",
            requestId=self.requestId,
            method=self.method.decode("ascii", "replace"),
            path=self.path.decode("ascii", "replace"),
            status=status,
            key=self.keyName or "-",
            client=self.clientLabel or "-",
            bytes=self.sentLength,
            duration=self.site.reactor.seconds() - self._started,
            peer=_peerText(self.getClientAddress()),
            outcome=self.outcome or "complete",
            outcomeNote=f" ({self.outcome})" if self.outcome else "",
        )


def _peerText(address) -> str:
    host = getattr(address, "host", None)
    if host is not None:
        return f"{host}:{address.port}"
    return getattr(address, "name", None) or str(address)


class HermuxChannel(http.HTTPChannel):
    """
    An HTTP connection that tells its site when it opens and closes, and
    that is stricter than Twisted's about what it accepts:

      - a connection over the site's C{maxConnections} gets 503;
      - a request line over L{MAX_HEAD_BYTES} gets 414, a head over it or
        with more than L{MAX_HEADERS} header lines 431;
      - obsolete line folding, and control characters in a header value,
        get 400 rather than being joined or passed upstream;
      - a request whose head and body have not all arrived within the
        site's C{timeOut} of its first byte gets 408, however steadily it
        trickles in (the idle timeout alone restarts with every byte);
      - every refusal is a complete response in OpenRouter's error shape,
        after which the connection closes;
      - a connection that hermux closes is aborted if the client has not
        taken what is left to send within C{abortTimeout}, so that a client
        that stops reading cannot hold it open.
    """

    _log = Logger()

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
    _deadline = None

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
            and not self._handlingRequest
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
                value = line.partition(b":")[2].strip(b" \t")
                if _CONTROL.search(value):
                    return self.refuse(400, "a header value contains control characters")
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
        self._stopDeadline()
        super().allContentReceived()

    def _send100Continue(self):
        if not self.refused:
            super()._send100Continue()

    def _respondToBadRequestAndDisconnect(self):
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
        self._log.info(
            "refused a request from {peer} with {status}: {reason}",
            peer=_peerText(self.transport.getPeer()),
            status=code,
            reason=message,
        )
        self.loseConnection()

    def loseConnection(self):
        super().loseConnection()
        if self._abortingCall is None and self.abortTimeout is not None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)


class HermuxSite(server.Site):
    """
    The site serving a hermux resource tree.

    Requests log themselves (see L{HermuxRequest}), so the site's own
    access log is off.

    @ivar channels: the open client connections, at most C{maxConnections}.
    @ivar timeOut: seconds a client may stay idle between requests, and
        may take to send one request.
    """

    _log = Logger()
    protocol = HermuxChannel
    requestFactory = HermuxRequest
    displayTracebacks = False
    noisy = False

    def __init__(
        self,
        root: Resource,
        *,
        maxBody: int,
        clientTimeout: float | None = 60.0,
        maxConnections: int = 1024,
        access=None,
        metrics: Metrics | None = None,
        reactor=None,
        **kwargs,
    ):
        super().__init__(root, timeout=clientTimeout, reactor=reactor, **kwargs)
        self.maxBody = maxBody
        self.maxConnections = maxConnections
        self.metrics = metrics if metrics is not None else Metrics()
        self.channels: set[HermuxChannel] = set()
        self._access = access

    def wantsBody(self, request) -> bool:
        """
        Whether to keep the body of C{request}, whose head has arrived: only
        a request with a valid access token can be forwarded, so another's
        body is read and dropped, and cannot make hermux hold C{maxBody}
        bytes per connection for a client without a token.
        """
        if self._access is None:
            return True
        values = request.requestHeaders.getRawHeaders(b"authorization", [])
        return len(values) == 1 and self._access.authorize(values[0]) is not None

    def log(self, request):
        pass

    def requestsInFlight(self) -> int:
        return sum(len(channel.requests) for channel in self.channels)

    async def drain(self, timeout: float, poll: float = 0.05) -> int:
        """
        Close idle connections now, the others once their response is
        over, and abort whatever is still open after C{timeout} seconds.
        Call it once nothing listens any more.

        @return: how many connections had to be aborted.
        """
        for channel in list(self.channels):
            if channel.requests:
                channel.persistent = False
                for request in channel.requests:
                    if not request.startedWriting:
                        request.setHeader(b"Connection", b"close")
            else:
                channel.transport.loseConnection()
        waited = 0.0
        while self.channels and waited < timeout:
            await deferLater(self.reactor, poll, lambda: None)
            waited += poll
        aborted = len(self.channels)
        if aborted:
            self._log.warn(
                "{count} connections still busy after {timeout}s: aborting them",
                count=aborted,
                timeout=timeout,
            )
            for channel in list(self.channels):
                channel.transport.abortConnection()
        return aborted


def ensureFileLimit(maxConnections: int) -> int:
    """
    Raise this process's soft limit of open files, if it must and may, to
    what C{maxConnections} clients need: a socket each, another to the
    upstream while their request is forwarded, and some to spare.  Past
    the limit hermux could neither accept clients nor reach the upstream.

    @return: the soft limit now; lower than needed if the hard limit is.
    """
    needed = 2 * maxConnections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < needed:
        Logger().warn(
            "--max-connections {maxConnections} needs {needed} open files but the "
            "limit is {soft}: lower --max-connections or raise the limit (ulimit -n, "
            "LimitNOFILE= under systemd)",
            maxConnections=maxConnections,
            needed=needed,
            soft=soft,
        )
    return soft
