"""
hermux in memory: the real wiring (L{hermux.wiring.assemble}) on a
L{MemoryReactorClock}, in front of a L{FakeOpenRouter} served by a plain
L{Site}, with treq clients over Twisted's own L{Agent}.  Every connection,
the clients' to hermux and hermux's to the fake, is a pair of in-memory
transports that L{MemoryNetwork} moves bytes between; they pause what
writes to them when their buffer is full and stop delivering when their
reader pauses, as TCP does, so the relay's producers and consumers work
as they do over sockets.  Nothing moves and no time passes until a test
calls L{MemoryProxy.flush} or L{MemoryProxy.advance}: timeouts, cooling
periods and Retry-After are asserted exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from treq.client import HTTPClient
from twisted.internet.address import IPv4Address
from twisted.internet.error import (
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    TimeoutError,
)
from twisted.internet.interfaces import (
    IConsumer,
    IHostnameResolver,
    IHostResolution,
    IPushProducer,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site
from zope.interface import implementer

from hermux.relay import BufferedBody
from hermux.testing import FakeOpenRouter
from tests.harness import ACCESS_TOKEN, KEYS, ClientRequests, assembleForTest

__all__ = [
    "HERMUX_PORT",
    "NOW",
    "UPSTREAM",
    "UPSTREAM_PORT",
    "MemoryConnection",
    "MemoryNetwork",
    "MemoryProxy",
    "MemoryTransport",
    "RawClient",
    "ScriptedUpstream",
]

# 2027-01-15T08:20:34.5Z: a time of day well away from midnight UTC.
NOW = 1_800_001_234.5
HERMUX_PORT = 3333
UPSTREAM_PORT = 8080
UPSTREAM = b"http://openrouter.test:%d" % (UPSTREAM_PORT,)

# What a transport holds before it pauses the producer writing to it, like
# a FileDescriptor's bufferSize; and the most one delivery hands a reader.
BUFFER_SIZE = 65536


@implementer(ITCPTransport, IPushProducer, IConsumer)
class MemoryTransport:
    """
    One end of an in-memory TCP connection.

    @ivar producerState: whether this end reads what its peer sends:
        C{"producing"}, C{"paused"} or C{"stopped"}, as
        L{twisted.internet.testing.StringTransport} says it.
    @ivar written: every byte written to this end so far.
    """

    disconnecting = False
    aborted = False

    def __init__(self, protocol, host, peer, bufferSize: int = BUFFER_SIZE):
        self.protocol = protocol
        self._host = host
        self._peer = peer
        self.bufferSize = bufferSize
        self.connected = True
        self.producerState = "producing"
        self.producer = None
        self.streaming = False
        self.producerPaused = False
        self.written = 0
        self._outgoing: list[bytes] = []
        self._buffered = 0

    # ITransport

    def write(self, data: bytes) -> None:
        if self.disconnecting or not self.connected or not data:
            return
        self._outgoing.append(data)
        self._buffered += len(data)
        self.written += len(data)
        if (
            self.producer is not None
            and self.streaming
            and not self.producerPaused
            and self._buffered > self.bufferSize
        ):
            self.producerPaused = True
            self.producer.pauseProducing()

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        self.disconnecting = True

    def abortConnection(self) -> None:
        self.disconnecting = self.aborted = True
        self._outgoing, self._buffered = [], 0

    def getPeer(self):
        return self._peer

    def getHost(self):
        return self._host

    # ITCPTransport

    def loseWriteConnection(self) -> None:
        self.loseConnection()

    def getTcpNoDelay(self) -> bool:
        return True

    def setTcpNoDelay(self, enabled) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def setTcpKeepAlive(self, enabled) -> None:
        pass

    # IConsumer, as abstract.FileDescriptor is one.

    def registerProducer(self, producer, streaming) -> None:
        if self.producer is not None:
            raise RuntimeError(f"{producer!r} registered while {self.producer!r} is")
        if not self.connected:
            producer.stopProducing()
            return
        self.producer = producer
        self.streaming = streaming
        self.producerPaused = False
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self.producer = None

    # IPushProducer: whether this end reads.

    def pauseProducing(self) -> None:
        if self.producerState == "producing":
            self.producerState = "paused"

    def resumeProducing(self) -> None:
        if self.producerState == "paused":
            self.producerState = "producing"

    def stopProducing(self) -> None:
        self.producerState = "stopped"
        self.loseConnection()

    # For the network.

    @property
    def pending(self) -> int:
        """
        Bytes written to this end that its peer has not read yet.
        """
        return self._buffered

    def take(self, most: int) -> bytes:
        """
        Take up to C{most} bytes written so far, for the peer; resume the
        producer writing here once nothing is left, as a FileDescriptor
        does once its buffer is sent.
        """
        data = b"".join(self._outgoing)
        taken, rest = data[:most], data[most:]
        self._outgoing = [rest] if rest else []
        self._buffered = len(rest)
        if not rest and self.producer is not None and (self.producerPaused or not self.streaming):
            self.producerPaused = False
            self.producer.resumeProducing()
        return taken


class MemoryConnection:
    """
    Two L{MemoryTransport}s, the client's end and the server's.
    """

    def __init__(self, client: MemoryTransport, server: MemoryTransport):
        self.client = client
        self.server = server
        self.closed = False

    def pump(self) -> bool:
        """
        Deliver what each end wrote to the other, if that one reads, and
        close the connection if an end asked to and has nothing left to
        send.  Return whether anything happened.
        """
        moved = False
        for sender, receiver in ((self.client, self.server), (self.server, self.client)):
            if self.closed:
                return moved
            if sender.pending and receiver.producerState == "producing":
                receiver.protocol.dataReceived(sender.take(receiver.bufferSize))
                moved = True
        for end in (self.client, self.server):
            if self.closed:
                break
            if end.aborted or (end.disconnecting and not end.pending):
                self.close(end)
                moved = True
        return moved

    def close(self, closer: MemoryTransport) -> None:
        """
        Close the connection as C{closer} asked: both ends learn it, the
        other end as a reset if C{closer} aborted.
        """
        self.closed = True
        other = self.server if closer is self.client else self.client
        if closer.aborted:
            reasons = ((closer, ConnectionAborted()), (other, ConnectionLost()))
        else:
            reasons = ((closer, ConnectionDone()), (other, ConnectionDone()))
        for end, _ in reasons:
            end.connected = False
            end.disconnecting = True
            end.producer = None
        for end, reason in reasons:
            end.protocol.connectionLost(Failure(reason))


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str):
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class _Resolver:
    """
    Every name is 127.0.0.1, but for names under C{.invalid}, which resolve
    to nothing (RFC 2606).
    """

    def resolveHostName(
        self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"
    ):
        resolution = _Resolution(hostName)
        receiver.resolutionBegan(resolution)
        if not hostName.endswith(".invalid"):
            receiver.addressResolved(IPv4Address("TCP", "127.0.0.1", portNumber))
        receiver.resolutionComplete()
        return resolution


class MemoryNetwork:
    """
    Connects what a L{MemoryReactorClock} was asked to connect (with
    C{connectTCP}) to what it listens on (with C{listenTCP}), by port, and
    moves bytes over those connections when it is pumped.  A port nothing
    listens on refuses connections; one in L{unreachable} lets them time
    out, after the timeout given to C{connectTCP}.
    """

    def __init__(self, reactor: MemoryReactorClock):
        self.reactor = reactor
        reactor.installNameResolver(_Resolver())
        self.connections: list[MemoryConnection] = []
        self.unreachable: set[int] = set()
        self._clientPorts = itertools.count(40000)

    def listener(self, port: int):
        for listening, factory, _, _ in self.reactor.tcpServers:
            if listening == port:
                return factory
        return None

    def connect(self, clientProtocol, port: int, host: str = "127.0.0.1") -> MemoryConnection:
        """
        Connect C{clientProtocol} to what listens on C{port} now.
        """
        clientAddress = IPv4Address("TCP", "127.0.0.1", next(self._clientPorts))
        serverAddress = IPv4Address("TCP", host, port)
        serverProtocol = self.listener(port).buildProtocol(clientAddress)
        connection = MemoryConnection(
            MemoryTransport(clientProtocol, clientAddress, serverAddress),
            MemoryTransport(serverProtocol, serverAddress, clientAddress),
        )
        self.connections.append(connection)
        serverProtocol.makeConnection(connection.server)
        clientProtocol.makeConnection(connection.client)
        return connection

    def _completeConnections(self) -> bool:
        done = False
        while self.reactor.tcpClients:
            host, port, factory, timeout, _ = self.reactor.tcpClients.pop(0)
            connector = self.reactor.connectors.pop(0)
            done = True
            if connector.stoppedConnecting:
                continue
            if port in self.unreachable:
                self.reactor.callLater(timeout, self._timedOut, factory, connector)
            elif self.listener(port) is None:
                factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
            else:
                protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
                self.connect(protocol, port, host)
        return done

    @staticmethod
    def _timedOut(factory, connector):
        if not connector.stoppedConnecting:
            factory.clientConnectionFailed(connector, Failure(TimeoutError()))

    def step(self) -> bool:
        """
        Run what is due now, complete the connections asked for and move
        one round of bytes; return whether anything happened.
        """
        self.reactor.advance(0)
        moved = self._completeConnections()
        for connection in list(self.connections):
            moved = connection.pump() or moved
        self.connections = [c for c in self.connections if not c.closed]
        now = self.reactor.seconds()
        return moved or any(call.getTime() <= now for call in self.reactor.getDelayedCalls())

    def flush(self, most: int = 10_000) -> None:
        """
        Step until nothing happens; fail if that takes more than C{most}
        steps (a body without end, read as fast as it comes).
        """
        for _ in range(most):
            if not self.step():
                return
        raise AssertionError(f"the memory network still busy after {most} steps")


class RawClient(Protocol):
    """
    A client that writes raw bytes and keeps everything it receives.
    """

    def __init__(self):
        self.received = b""
        self.reason = None

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.reason = reason

    @property
    def closed(self) -> bool:
        return self.reason is not None

    def send(self, data: bytes) -> None:
        self.transport.write(data)


class MemoryProxy(ClientRequests):
    """
    A L{FakeOpenRouter} and a hermux in front of it, as L{hermux.wiring.assemble} builds
    it, all on one L{MemoryReactorClock} that starts at L{NOW}.  Its
    keyword arguments are those of L{tests.harness.Proxy} that make sense in
    memory, and: C{upstreamFactory}, what serves on L{UPSTREAM_PORT} instead
    of the fake (a L{ScriptedUpstream}, say); C{probeKeys}, for
    C{--probe-keys}; C{now}, where the clock starts.

    @ivar clock: the reactor of hermux, the fake and the clients.
    @ivar network: their connections.
    @ivar fake: the fake upstream, paced by C{clock}, served by a plain
        L{Site} on L{UPSTREAM_PORT}.
    @ivar components: everything L{hermux.wiring.assemble} built; C{site}, C{pool},
        C{relay}, C{upstream}, C{metrics}, C{access}, C{throttle},
        C{reloader} and C{ledger} are its parts.
    """

    def __init__(
        self,
        testCase,
        *,
        keys: Sequence = KEYS,
        accessTokens: Sequence[str] = (ACCESS_TOKEN,),
        upstreamBase: bytes = UPSTREAM,
        maxBody: int = 1024 * 1024,
        idleTimeout: float = 30.0,
        connectTimeout: float = 5.0,
        eventInterval: float = 0.0,
        ledger=None,
        clientTimeout: float | None = 60.0,
        maxConnections: int = 1024,
        authFailures: int = 10,
        requestLog=None,
        tokensPath: str = "tokens.csv",
        allowPath: str = "allow.txt",
        upstreamFactory: Factory | None = None,
        probeKeys: bool = False,
        now: float = NOW,
    ):
        self._testCase = testCase
        self.clock = MemoryReactorClock()
        self.clock.advance(now)
        self.network = MemoryNetwork(self.clock)
        self.fake = FakeOpenRouter(
            [key.token for key in keys], reactor=self.clock, eventInterval=eventInterval
        )
        if upstreamFactory is None:
            upstreamFactory = Site(self.fake, reactor=self.clock)
        self.clock.listenTCP(UPSTREAM_PORT, upstreamFactory)
        self.components = assembleForTest(
            self,
            keys=keys,
            accessTokens=accessTokens,
            ledger=ledger,
            requestLog=requestLog,
            reactor=self.clock,
            probeKeys=probeKeys,
            upstream=upstreamBase,
            connectTimeout=connectTimeout,
            idleTimeout=idleTimeout,
            maxBody=maxBody,
            clientTimeout=clientTimeout,
            maxConnections=maxConnections,
            authFailures=authFailures,
            tokensPath=tokensPath,
            allowPath=allowPath,
        )
        self.clock.listenTCP(HERMUX_PORT, self.site)
        agent = Agent(self.clock, pool=HTTPConnectionPool(self.clock, persistent=False))
        self.client = HTTPClient(agent, data_to_body_producer=BufferedBody)

    # Time and bytes.

    def flush(self) -> None:
        """
        Move every byte that can move now, without letting time pass.
        """
        self.network.flush()

    def advance(self, seconds: float) -> None:
        """
        Let exactly C{seconds} pass: one due call after another, each at
        its time, with what it set off moved before the next.
        """
        self.flush()
        end = self.clock.seconds() + seconds
        while True:
            due = [call.getTime() for call in self.clock.getDelayedCalls() if call.getTime() <= end]
            if not due:
                break
            self.clock.advance(min(due) - self.clock.seconds())
            self.flush()
        self.clock.advance(end - self.clock.seconds())
        self.flush()

    def resultOf(self, d):
        """
        What C{d} fired with, once everything that can move now has.
        """
        self.flush()
        return self._testCase.successResultOf(d)

    def failureOf(self, d, *types):
        """
        The failure C{d} fired with, once everything that can move now has.
        """
        self.flush()
        return self._testCase.failureResultOf(d, *types)

    # Clients.

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{HERMUX_PORT}{path}"

    def respond(self, method, path, **kwargs):
        """
        Send a request, and return its response and whole body.
        """
        response = self.resultOf(self.request(method, path, **kwargs))
        return response, self.resultOf(response.content())

    def chatted(self, **extra):
        """
        A chat completion's response and whole body.
        """
        response = self.resultOf(self.chat(**extra))
        return response, self.resultOf(response.content())

    def connect(self, data: bytes = b"") -> RawClient:
        """
        A raw connection to hermux that has sent C{data}.
        """
        client = RawClient()
        self.network.connect(client, HERMUX_PORT)
        client.send(data)
        self.flush()
        return client

    def upstreamConnections(self) -> list[MemoryConnection]:
        """
        hermux's open connections to the upstream.
        """
        return [c for c in self.network.connections if c.server.getHost().port == UPSTREAM_PORT]


class ScriptedUpstream(Factory):
    """
    An upstream that answers each request, once its head has arrived, with
    exactly the bytes of C{answer}, and then closes the connection if
    C{close}: for answers a real server would not give.

    @ivar received: what each connection received, in order of connection.
    """

    def __init__(self, answer: bytes, *, close: bool = True):
        self.answer = answer
        self.close = close
        self.received: list[bytes] = []

    def buildProtocol(self, addr):
        protocol = _Scripted()
        protocol.factory = self
        return protocol


class _Scripted(Protocol):
    _answered = False

    def connectionMade(self):
        self._index = len(self.factory.received)
        self.factory.received.append(b"")

    def dataReceived(self, data):
        received = self.factory.received[self._index] + data
        self.factory.received[self._index] = received
        if not self._answered and b"\r\n\r\n" in received:
            self._answered = True
            self.transport.write(self.factory.answer)
            if self.factory.close:
                self.transport.loseConnection()
