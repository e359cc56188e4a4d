# -*- test-case-name: tests.test_site,tests.test_operations -*-
"""
The site that serves hermux's resource tree: its requests bound what they
buffer, carry a request id and log one line each; its connections (see
L{hermux.channel}) are counted, bounded, and drained when hermux stops.
"""

from __future__ import annotations

__all__ = ["HermuxRequest", "HermuxSite", "ensureFileLimit"]

import random
import re
import resource
from io import BytesIO

from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from hermux.channel import HermuxChannel
from hermux.hygiene import originForm
from hermux.metrics import Metrics
from hermux.record import RequestRecord, recordOf, statusOf
from hermux.requestlog import IRequestLog, RequestLogEvents

# A request id a client may choose: short, and safe in a log line or header.
_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
# Request ids need to be distinct, not secret: a generator seeded once from
# the system's randomness costs no system call per request.
_requestIds = random.Random()


class HermuxRequest(server.Request):
    """
    A request that never buffers a body past the site's C{maxBody} (it is
    refused with 413 as soon as it is known to be larger), nor the body of
    a request without a valid access token, which no upstream will see;
    and that logs one line when it is over, however it ended, to the
    site's C{requestLog}.

    @ivar hermuxRecord: what the resources and the relay learn about the
        request, for that line and the metrics (read it with
        L{hermux.record.recordOf}).  Its request id is the client's
        C{X-Request-Id} if it sent a sane one, a new random one otherwise,
        and is sent back in C{X-Request-Id}.
    """

    discardBody = False
    _bodyBytes = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hermuxRecord = RequestRecord()

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

    def requestReceived(self, command, path, version):
        # An absolute-form target is routed as the origin form it carries:
        # Twisted would take its scheme and host for path segments.
        super().requestReceived(command, originForm(path), version)

    def process(self):
        site = self.channel.site
        record = self.hermuxRecord
        record.started = site.reactor.seconds()
        requestId = self.getHeader(b"x-request-id")
        if requestId is None or not _CLIENT_REQUEST_ID.fullmatch(requestId):
            requestId = b"%016x" % (_requestIds.getrandbits(64),)
        record.requestId = requestId.decode("ascii")
        record.clientAddress = site.clientAddress(self)
        self.setHeader(b"X-Request-Id", requestId)
        site.metrics.inFlight.inc()
        self.notifyFinish().addBoth(self._over)
        super().process()

    def write(self, data):
        if not self.startedWriting and self.responseHeaders.getRawHeaders(b"server") == [
            server.version
        ]:
            # Twisted's default names its version; an upstream's own stays.
            self.responseHeaders.setRawHeaders(b"Server", [b"hermux"])
        super().write(data)

    def _over(self, result):
        record = self.hermuxRecord
        # Whoever ended the request otherwise has said how; a request that
        # is over unfinished, without a word, lost its client.
        if record.outcome is None and not self.finished:
            record.outcome = "client went away"
        site = self.site
        site.metrics.inFlight.dec()
        site.metrics.requestDone(record, statusOf(self), self.sentLength)
        site.requestLog.record(record.logFields(self, site.reactor.seconds()))


class HermuxSite(server.Site):
    """
    The site serving a hermux resource tree.

    Requests log themselves (see L{HermuxRequest}) to C{requestLog}, so
    the site's own access log is off.

    @ivar channels: the open client connections, at most C{maxConnections}.
    @ivar trustedProxies: the proxies whose word is taken for the client's
        address (a L{hermux.access.TrustedProxies}), or L{None}.
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
        trustedProxies=None,
        metrics: Metrics | None = None,
        requestLog: IRequestLog | None = None,
        reactor=None,
        **kwargs,
    ):
        # hermux forwards bodies as they are: Twisted's parsing of form
        # bodies into request.args would only cost time on every POST.
        super().__init__(
            root,
            timeout=clientTimeout,
            reactor=reactor,
            parsePOSTFormSubmission=False,
            **kwargs,
        )
        self.maxBody = maxBody
        self.maxConnections = maxConnections
        self.metrics = metrics if metrics is not None else Metrics()
        self.requestLog = requestLog if requestLog is not None else RequestLogEvents()
        self.channels: set[HermuxChannel] = set()
        self._access = access
        self.trustedProxies = trustedProxies

    def wantsBody(self, request) -> bool:
        """
        Whether to keep the body of C{request}, whose head has arrived: only
        a request with a valid access token can be forwarded, so another's
        body is read and dropped, and cannot make hermux hold C{maxBody}
        bytes per connection for a client without a token.  The answer goes
        into the request's record, for the gate (L{hermux.resource.Gate}).
        """
        if self._access is None:
            return True
        values = request.requestHeaders.getRawHeaders(b"authorization", ())
        if len(values) != 1:
            return False
        # The gate finds the answer on the record, and need not hash again.
        record = recordOf(request)
        record.tokenLookup = lookup = self._access.lookup(values[0], record.tokenLookup)
        return lookup.client is not None

    def clientAddress(self, request):
        """
        The address of the client C{request} comes from: its peer's, or,
        from a trusted proxy (C{trustedProxies}, a
        L{hermux.access.TrustedProxies}), the one the proxy names.
        """
        peer = request.getClientAddress()
        if self.trustedProxies is None:
            return peer
        return self.trustedProxies.clientAddress(peer, request.requestHeaders)

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
