"""
What the end-to-end tests share: a fake OpenRouter and a hermux in front of
it, each on a loopback port of its own, clients for them, and a way to wait
for something to become true.  Everything is torn down with the test.
"""

from __future__ import annotations

import json
import os
import re
import sys

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.protocols.policies import WrappingFactory
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

import hermux
from hermux.config import Configuration, Key
from hermux.ledger import MemoryLedger
from hermux.tap import Options
from hermux.testing import FakeOpenRouter
from hermux.wiring import assemble

KEYS = (
    Key("alpha", "sk-or-v1-test-alpha-4f1c9e0b7d2a"),
    Key("beta", "sk-or-v1-test-beta-8e3d2c1b0a9f"),
    Key("gamma", "sk-or-v1-test-gamma-1a2b3c4d5e6f"),
)
ACCESS_TOKEN = "test-access-token-7Jx2mQ9vR4"
SECRETS = tuple(key.token for key in KEYS) + (ACCESS_TOKEN,)
CHAT = "/api/v1/chat/completions"


def chatBody(**extra) -> bytes:
    return json.dumps(
        {"model": "test/model", "messages": [{"role": "user", "content": "hi"}], **extra}
    ).encode()


async def waitUntil(predicate, timeout: float = 5.0, interval: float = 0.005):
    """
    Wait until C{predicate()} is true; fail after C{timeout} seconds.
    """
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError(f"still not true after {timeout}s: {predicate}")
        await deferLater(reactor, interval, lambda: None)
        waited += interval


async def sleep(seconds: float):
    await deferLater(reactor, seconds, lambda: None)


def hermuxOptions(
    *,
    upstream: bytes,
    trustRoot=None,
    connectTimeout: float,
    idleTimeout: float,
    maxBody: int,
    clientTimeout: float | None,
    maxConnections: int,
    authFailures: int,
    tokensPath: str,
    allowPath: str | None,
    clientsPath: str | None = None,
    redis: str | None = None,
    redisPrefix: str = "hermux",
    instanceName: str | None = None,
    redisPasswordFile: str | None = None,
) -> Options:
    """
    hermux's options with the values a test harness sets, and the defaults
    of L{Options} for the rest.
    """
    options = Options()
    options.update(
        {
            "redis": redis,
            "redis-prefix": redisPrefix,
            "instance-name": instanceName,
            "redis-password-file": redisPasswordFile,
            "upstream": upstream,
            "upstream-ca": trustRoot,
            "connect-timeout": connectTimeout,
            "idle-timeout": idleTimeout,
            "max-body": maxBody,
            "client-timeout": clientTimeout,
            "max-connections": maxConnections,
            "auth-failures": authFailures,
            "tokens": tokensPath,
            "allow": allowPath,
            "clients": clientsPath,
        }
    )
    if redis is not None:
        # As twistd checks them: the URL parsed, the password file read.
        options.checkRedis()
    return options


# What each harness exposes of the hermux it built, as attributes of its own.
COMPONENTS = (
    "site", "pool", "relay", "upstream", "metrics", "access", "throttle", "reloader", "ledger",
    "clients",
)


def assembleForTest(
    harness,
    *,
    keys,
    accessTokens,
    ledger,
    requestLog,
    reactor,
    probeKeys: bool = False,
    clients=(),
    **settings,
):
    """
    Build hermux with the real wiring for a test harness, from plain values
    (see L{hermuxOptions} for C{settings}), and set the parts named in
    L{COMPONENTS} as attributes of C{harness}.

    @return: what L{assemble} built.
    """
    options = hermuxOptions(**settings)
    options["probe-keys"] = probeKeys
    components = assemble(
        Configuration(tuple(keys), tuple(accessTokens), tuple(clients)),
        options,
        ledger=ledger if ledger is not None else MemoryLedger(),
        requestLog=requestLog,
        reactor=reactor,
    )
    for name in COMPONENTS:
        setattr(harness, name, getattr(components, name))
    # The pool shared through Redis, when --redis is given (else None).
    harness.shared = getattr(components, "shared", None)
    return components


def closedFreePort() -> int:
    """
    A loopback port with nothing listening on it.
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClientRequests:
    """
    Requests to a harness's hermux through its treq C{client}, with the
    test access token; a harness gives C{url(path)}.
    """

    def request(self, method, path, *, token=ACCESS_TOKEN, headers=None, data=None):
        """
        Send a request to hermux; the Deferred fires with the unbuffered
        treq response.
        """
        headers = dict(headers or {})
        if token is not None:
            headers.setdefault("Authorization", f"Bearer {token}")
        return self.client.request(
            method, self.url(path), headers=headers, data=data, unbuffered=True
        )

    def chat(self, **extra):
        return self.request(
            "POST", CHAT, headers={"Content-Type": "application/json"}, data=chatBody(**extra)
        )


class Proxy(ClientRequests):
    """
    A L{FakeOpenRouter} and a hermux in front of it, on 127.0.0.1.

    @ivar fake: the fake upstream.
    @ivar site: hermux's site.
    @ivar pool: hermux's key pool.
    @ivar access: its access list.
    @ivar metrics: its metrics.
    @ivar ledger: its ledger (in memory unless one is given).
    @ivar throttle: its throttle of failed access tokens.
    @ivar reloader: its configuration reloader, reading C{tokensPath},
        C{allowPath} and C{clientsPath}.
    @ivar clients: its clients' days and limits (a L{ClientBook}).
    @ivar components: everything L{assemble} built.
    @ivar shared: its pool shared through Redis (with C{redis}, a URL), or
        L{None}; started here and stopped with the test.

    With C{fake}, another L{Proxy}, this one relays to that one's fake
    upstream (on its port) instead of a fake of its own: several hermux
    instances in front of one upstream that counts what they all sent.
    C{syncInterval}, if given, replaces the shared pool's (set before it
    starts).
    """

    def __init__(
        self,
        testCase,
        *,
        keys=KEYS,
        accessTokens=(ACCESS_TOKEN,),
        upstreamBase: bytes | None = None,
        trustRoot=None,
        maxBody: int = 1024 * 1024,
        idleTimeout: float = 30.0,
        connectTimeout: float = 5.0,
        eventClock=None,
        eventInterval: float = 0.0,
        upstreamCertificate=None,
        ledger=None,
        clientTimeout: float | None = 60.0,
        maxConnections: int = 1024,
        authFailures: int = 10,
        requestLog=None,
        tokensPath: str = "tokens.csv",
        allowPath: str | None = "allow.txt",
        clients=(),
        clientsPath: str | None = None,
        redis: str | None = None,
        redisPrefix: str = "hermux",
        instanceName: str | None = None,
        redisPasswordFile: str | None = None,
        fake: Proxy | None = None,
        syncInterval: float | None = None,
    ):
        self._testCase = testCase
        if fake is not None:
            self.fake = fake.fake
            self.fakeSite = fake.fakeSite
            self._fakeConnections = fake._fakeConnections
            self.fakePort = fake.fakePort
            if upstreamBase is None:
                upstreamBase = fake.upstreamBase
        else:
            self.fake = FakeOpenRouter(
                [key.token for key in keys],
                reactor=eventClock or reactor,
                eventInterval=eventInterval,
            )
            self.fakeSite = _UnloggedSite(self.fake)
            self._fakeConnections = _Counted(self.fakeSite)
            if upstreamCertificate is None:
                self.fakePort = self._listen(self._fakeConnections, lambda: self.fakeConnections)
                scheme, host = b"http", b"127.0.0.1"
            else:
                self.fakePort = self._listen(
                    self._fakeConnections, lambda: self.fakeConnections, upstreamCertificate.options()
                )
                scheme, host = b"https", b"localhost"
            if upstreamBase is None:
                upstreamBase = b"%s://%s:%d" % (scheme, host, self.fakePort.getHost().port)
        self.upstreamBase = upstreamBase
        self.components = assembleForTest(
            self,
            keys=keys,
            accessTokens=accessTokens,
            ledger=ledger,
            requestLog=requestLog,
            reactor=reactor,
            upstream=upstreamBase,
            trustRoot=trustRoot,
            connectTimeout=connectTimeout,
            idleTimeout=idleTimeout,
            maxBody=maxBody,
            clientTimeout=clientTimeout,
            maxConnections=maxConnections,
            authFailures=authFailures,
            tokensPath=tokensPath,
            allowPath=allowPath,
            clients=clients,
            clientsPath=clientsPath,
            redis=redis,
            redisPrefix=redisPrefix,
            instanceName=instanceName,
            redisPasswordFile=redisPasswordFile,
        )
        testCase.addCleanup(self.upstream.stopService)
        if self.shared is not None:
            if syncInterval is not None:
                self.shared.syncInterval = syncInterval
            self.shared.startService()
            testCase.addCleanup(self.shared.stopService)
        self.port = self._listen(self.site, lambda: len(self.site.channels))
        clientPool = HTTPConnectionPool(reactor, persistent=False)
        testCase.addCleanup(clientPool.closeCachedConnections)
        self.client = HTTPClient(Agent(reactor, pool=clientPool))

    def _listen(self, factory, openConnections, tlsOptions=None):
        if tlsOptions is None:
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        else:
            port = reactor.listenSSL(0, factory, tlsOptions, interface="127.0.0.1")
        self._testCase.addCleanup(port.stopListening)
        # Cleanups run last-added first: connections close before ports.
        self._testCase.addCleanup(waitUntil, lambda: not openConnections())
        return port

    @property
    def fakeConnections(self) -> int:
        """
        How many connections to the fake upstream are open.
        """
        return len(self._fakeConnections.protocols)

    @property
    def portNumber(self) -> int:
        return self.port.getHost().port

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.portNumber}{path}"

    def raw(self, data: bytes) -> Deferred[bytes]:
        """
        Send raw bytes to hermux and collect everything it sends back until
        it closes the connection.
        """
        return rawExchange(self.portNumber, data)


class _UnloggedSite(Site):
    """
    A plain site for the fake upstream, without an access log line per
    request in the test log: hermux logs the requests it relays.
    """

    noisy = False

    def log(self, request):
        pass


class _Counted(WrappingFactory):
    """
    A factory's connections, kept in C{protocols} while they are open, so
    that a test can wait until they are closed.
    """

    noisy = False


class _Collect(Protocol):
    def __init__(self, data: bytes):
        self._data = data
        self.received = []
        self.done = Deferred()

    def connectionMade(self):
        self.transport.write(self._data)

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason):
        self.done.callback(b"".join(self.received))


async def rawExchange(port: int, data: bytes) -> bytes:
    protocol = _Collect(data)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
    return await protocol.done


def statusOf(rawResponse: bytes) -> int:
    return int(rawResponse.split(b" ", 2)[1])


def issueCertificates(hostname: str = "localhost"):
    """
    A throwaway certificate authority and a server certificate it signed for
    C{hostname} (and 127.0.0.1): C{(caCertificate, serverCertificate)} as a
    Twisted L{Certificate} and L{PrivateCertificate}.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from twisted.internet.ssl import Certificate, PrivateCertificate

    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject, issuer, publicKey, signingKey, extensions):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(publicKey)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signingKey, hashes.SHA256())

    caKey = ec.generate_private_key(ec.SECP256R1())
    ca = build(
        "hermux test CA",
        "hermux test CA",
        caKey.public_key(),
        caKey,
        [(x509.BasicConstraints(ca=True, path_length=None), True)],
    )
    serverKey = ec.generate_private_key(ec.SECP256R1())
    server = build(
        hostname,
        "hermux test CA",
        serverKey.public_key(),
        caKey,
        [
            (
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(hostname),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                False,
            )
        ],
    )
    pem = serialization.Encoding.PEM
    keyPem = serverKey.private_bytes(
        pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    return (
        Certificate.loadPEM(ca.public_bytes(pem)),
        PrivateCertificate.loadPEM(keyPem + server.public_bytes(pem)),
    )


CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(hermux.__file__)))
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
DEMO_TOKEN = "demo-access-token-change-me"


def twistdEnvironment() -> dict[str, str]:
    """
    The environment for a child twistd that finds this checkout's hermux.
    """
    return {**os.environ, "PYTHONPATH": CHECKOUT + os.pathsep + os.environ.get("PYTHONPATH", "")}


class Twistd(ProcessProtocol):
    """
    twistd in a child process, run from the checkout; its output (stdout and
    stderr) is collected as it comes.

    @ivar ended: fires with L{ProcessDone}, or fails with
        L{ProcessTerminated}, when it exits.
    """

    def __init__(self):
        self.output = b""
        self.ended = Deferred()

    def outReceived(self, data):
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason):
        if reason.check(ProcessDone):
            self.ended.callback(reason.value)
        else:
            self.ended.errback(reason)

    @property
    def pid(self):
        return self.transport.pid

    def kill(self, signal: str = "TERM"):
        self.transport.signalProcess(signal)

    async def port(self, tls: bool = False) -> int:
        """
        The port hermux listens on, once its log says so.
        """
        marker = rb"HermuxSite \(TLS\) starting on (\d+)" if tls else rb"HermuxSite starting on (\d+)"
        try:
            await waitUntil(lambda: re.search(marker, self.output), timeout=30)
        except AssertionError:
            raise AssertionError(f"twistd did not say it listens; its output: {self.output!r}")
        return int(re.search(marker, self.output).group(1))


def runTwistd(testCase, *args: str) -> Twistd:
    """
    Start twistd with C{args}; it is killed, if still running, when the test
    ends.  Without a C{--pidfile} of the test's own it writes none: twistd's
    default, twistd.pid in the checkout, would make two test runs at once
    refuse each other ("Another twistd server is running").
    """
    args = list(args)
    if not any(arg.startswith("--pidfile") for arg in args):
        args.insert(0, "--pidfile=")
    child = Twistd()
    reactor.spawnProcess(child, TWISTD[0], TWISTD + args, env=twistdEnvironment(), path=CHECKOUT)

    def stop():
        if child.transport.pid is not None:
            child.kill("KILL")
        return child.ended.addErrback(lambda _: None)

    testCase.addCleanup(stop)
    return child


def demoArguments(testCase, *extra: str) -> list[str]:
    """
    twistd's arguments for hermux in the foreground in demo mode, on the
    example files, with a state file of the test's own.
    """
    return [
        "-n", "hermux", "--demo", "--tokens", "tokens.csv.example",
        "--allow", "allow.txt.example", "--state", os.path.abspath(testCase.mktemp()),
        *extra,
    ]
