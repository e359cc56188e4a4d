"""
The site that serves hermux's resource tree: its requests bound what they
buffer, carry a request id and log one line each; its connections are
counted, and drained when hermux stops.
"""

from __future__ import annotations

import re
import secrets
from io import BytesIO

from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import Resource

from hermux.errors import ErrorResource
from hermux.metrics import Metrics

# A request id a client may choose: short, and safe in a log line or header.
_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


class HermuxRequest(server.Request):
    """
    A request that never buffers a body past the site's C{maxBody}, and
    that logs one line when it is over, however it ended.

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
    bodyTooLarge = False
    _started = 0.0

    def gotLength(self, length):
        # Bodies stay in memory: they are bounded by maxBody, and a
        # temporary file would mean disk I/O on the reactor thread.
        self.content = BytesIO()
        if length is not None and length > self.channel.site.maxBody:
            self.bodyTooLarge = True

    def handleContentChunk(self, data):
        if self.bodyTooLarge:
            return
        if self.content.tell() + len(data) > self.channel.site.maxBody:
            self.bodyTooLarge = True
            self.content = BytesIO()
            return
        self.content.write(data)

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
    An HTTP connection that tells its site when it closes.
    """

    def connectionMade(self):
        super().connectionMade()
        self.site.channels.add(self)

    def connectionLost(self, reason):
        self.site.channels.discard(self)
        super().connectionLost(reason)


class HermuxSite(server.Site):
    """
    The site serving a hermux resource tree.

    Requests log themselves (see L{HermuxRequest}), so the site's own
    access log is off.

    @ivar channels: the open client connections.
    """

    _log = Logger()
    protocol = HermuxChannel
    requestFactory = HermuxRequest
    displayTracebacks = False
    noisy = False

    def __init__(
        self, root: Resource, *, maxBody: int, metrics: Metrics | None = None, reactor=None, **kwargs
    ):
        super().__init__(root, reactor=reactor, **kwargs)
        self.maxBody = maxBody
        self.metrics = metrics if metrics is not None else Metrics()
        self.channels: set[HermuxChannel] = set()
        self._tooLarge = ErrorResource(
            413, f"the request body is larger than the limit of {maxBody} bytes"
        )

    def getResourceFor(self, request):
        if request.bodyTooLarge:
            return self._tooLarge
        return super().getResourceFor(request)

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
