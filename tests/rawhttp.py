"""
Raw HTTP over loopback for the hostile tests: an upstream that writes
exactly the bytes a test wants and records exactly the bytes it receives,
a strict parser for what it receives, and clients that send raw bytes.
"""

from __future__ import annotations

import re
import socket
import struct

import attr
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol

from tests.harness import waitUntil

# RFC 9110 field-name (a token) and field-value, as hermux must send them.
_FIELD_LINE = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*((?:[\x21-\x7e\x80-\xff](?:[ \t]*[\x21-\x7e\x80-\xff])*)?)[ \t]*"
)
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) (/[\x21-\x7e]*) HTTP/1\.1")

OK_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b"Content-Length: 2\r\n\r\n{}"
)


class MalformedUpstreamRequest(Exception):
    """
    What hermux sent upstream is not one well-formed HTTP/1.1 request.
    """


@attr.s(auto_attribs=True)
class UpstreamRequest:
    """
    One request as the raw upstream received it, parsed strictly.
    """

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw: bytes

    def values(self, name: bytes) -> list[bytes]:
        return [value for n, value in self.headers if n.lower() == name.lower()]


def parseUpstreamRequest(data: bytes) -> tuple[UpstreamRequest | None, bytes]:
    """
    Parse one request from the start of C{data}: C{(request, rest)}, or
    C{(None, data)} if it is not complete yet.

    @raise MalformedUpstreamRequest: if it is not strictly well-formed.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if b"\n\n" in data or b"\r\r" in data:
            raise MalformedUpstreamRequest(data[:200])
        return None, data
    head = data[:end]
    lines = head.split(b"\r\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise MalformedUpstreamRequest(lines[0])
    headers = []
    for line in lines[1:]:
        field = _FIELD_LINE.fullmatch(line)
        if field is None:
            raise MalformedUpstreamRequest(line)
        headers.append((field.group(1), field.group(2)))
    names = [name.lower() for name, _ in headers]
    if b"transfer-encoding" in names or names.count(b"content-length") > 1:
        raise MalformedUpstreamRequest(head)
    length = 0
    if b"content-length" in names:
        text = dict((name.lower(), value) for name, value in headers)[b"content-length"]
        if not text.isdigit():
            raise MalformedUpstreamRequest(head)
        length = int(text)
    start = end + 4
    if len(data) < start + length:
        return None, data
    request = UpstreamRequest(
        method=match.group(1),
        target=match.group(2),
        headers=headers,
        body=data[start : start + length],
        raw=data[: start + length],
    )
    return request, data[start + length :]


class RawConnection(Protocol):
    """
    One connection to the raw upstream: hands each complete request to the
    upstream's C{answer}, which writes whatever it wants.
    """

    def __init__(self, upstream: RawUpstream):
        self.upstream = upstream
        self.buffer = b""
        self.received = b""
        self.requests: list[UpstreamRequest] = []
        self.lost = Deferred()

    def connectionMade(self):
        self.upstream.connections.append(self)

    def dataReceived(self, data):
        self.received += data
        self.buffer += data
        while self.buffer:
            try:
                request, self.buffer = parseUpstreamRequest(self.buffer)
            except MalformedUpstreamRequest as e:
                self.upstream.malformed.append(e.args[0])
                self.buffer = b""
                self.reset()
                return
            if request is None:
                return
            self.requests.append(request)
            self.upstream.requests.append(request)
            self.upstream.answer(self, request)

    def write(self, data: bytes):
        self.transport.write(data)

    def reset(self):
        """
        Close with a TCP reset rather than a clean end.
        """
        handle = self.transport.getHandle()
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self.upstream.open.discard(self)
        self.lost.callback(None)


class RawUpstream(Factory):
    """
    A raw HTTP upstream on 127.0.0.1 whose C{answer(connection, request)}
    writes exactly the bytes a test wants (by default a small 200), and
    that records every request, strictly parsed, and anything malformed.
    """

    noisy = False

    def __init__(self, testCase, answer=None):
        self.answer = answer or (lambda connection, request: connection.write(OK_ANSWER))
        self.requests: list[UpstreamRequest] = []
        self.malformed: list[bytes] = []
        self.connections: list[RawConnection] = []
        self.open: set[RawConnection] = set()
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")
        testCase.addCleanup(self.port.stopListening)
        testCase.addCleanup(self._closeAll)

    def buildProtocol(self, addr):
        connection = RawConnection(self)
        self.open.add(connection)
        return connection

    async def _closeAll(self):
        for connection in list(self.open):
            connection.transport.abortConnection()
        await waitUntil(lambda: not self.open)

    @property
    def base(self) -> bytes:
        return b"http://127.0.0.1:%d" % (self.port.getHost().port,)


class RawClient(Protocol):
    """
    Sends raw bytes (all at once, or later with C{send}) and collects
    everything that comes back until the connection closes.
    """

    def __init__(self, data: bytes = b""):
        self._data = data
        self.received = b""
        self.closed = Deferred()
        self.reason = None

    def connectionMade(self):
        if self._data:
            self.transport.write(self._data)

    def send(self, data: bytes):
        self.transport.write(data)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.reason = reason
        self.closed.callback(self.received)


async def connectRaw(port: int, data: bytes = b"", *, bindAddress=None) -> RawClient:
    """
    Connect a L{RawClient} to hermux on C{port}, from C{bindAddress} if
    given (any of 127.0.0.0/8 on Linux).
    """
    client = RawClient(data)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=bindAddress)
    await connectProtocol(endpoint, client)
    return client


def splitResponse(data: bytes) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    """
    The status, headers (lower-case names) and body of the first response
    in C{data}, which must be a complete, well-formed HTTP/1.1 response
    head.
    """
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator:
        raise AssertionError(f"no complete response head in {data[:200]!r}")
    lines = head.split(b"\r\n")
    match = re.fullmatch(rb"HTTP/1\.[01] ([1-5][0-9][0-9]) [\t\x20-\x7e]*", lines[0])
    if match is None:
        raise AssertionError(f"not a status line: {lines[0]!r}")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        field = _FIELD_LINE.fullmatch(line)
        if field is None:
            raise AssertionError(f"not a header line: {line!r}")
        headers.setdefault(field.group(1).lower(), []).append(field.group(2))
    return int(match.group(1)), headers, body
