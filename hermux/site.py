"""
The site that serves hermux's resource tree: its requests bound what they
buffer and log one line each; its channels are counted.
"""

from __future__ import annotations

from io import BytesIO

from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import Resource

from hermux.errors import ErrorResource


class HermuxRequest(server.Request):
    """
    A request that never buffers a body past the site's C{maxBody}, and
    that logs one line when it is over, however it ended.

    The resources annotate it for that line: C{clientLabel} and C{keyName}
    once known, C{outcome} when the exchange ended other than normally.
    """

    _log = Logger()

    clientLabel: str | None = None
    keyName: str | None = None
    outcome: str | None = None
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
        self._started = self.channel.site.reactor.seconds()
        self.notifyFinish().addBoth(self._logLine)
        super().process()

    def _logLine(self, result):
        status = self.code if self.startedWriting else "-"
        if self.outcome is None and not self.finished:
            self.outcome = "client went away"
        self._log.info(
            "{method} {path} -> {status} via {key} for {client}: "
            "{bytes} bytes in {duration:.3f}s from {peer}{outcomeNote}",
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

    protocol = HermuxChannel
    requestFactory = HermuxRequest
    displayTracebacks = False
    noisy = False

    def __init__(self, root: Resource, *, maxBody: int, reactor=None, **kwargs):
        super().__init__(root, reactor=reactor, **kwargs)
        self.maxBody = maxBody
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
