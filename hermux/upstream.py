# -*- test-case-name: tests.test_upstream,tests.test_hostile_upstream -*-
"""
The upstream: where hermux sends requests, and the one HTTP agent that
reaches it over persistent, verified connections.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import Certificate
from twisted.web.client import URI, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer

from hermux._twistedinternals import HeadCheckingClientProtocol, clientRequest, connectPoolWith

__all__ = [
    "MAX_UPSTREAM_HEAD_BYTES",
    "Upstream",
    "connectToUpstream",
    "loadTrustRoot",
    "parseUpstreamURL",
]

# The most of a response head hermux reads from the upstream: nginx's
# default for a proxied response head is 4 or 8 KiB.
MAX_UPSTREAM_HEAD_BYTES = 65536

# A status line hermux can relay as it is: Twisted's parser takes any
# integer as a status code (12345, -1, 2_00) and any bytes as the reason
# phrase, a bare CR included, and the server side writes both back out.
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] [1-5][0-9][0-9](?: [\t\x20-\x7e\x80-\xff]*)?")


def parseUpstreamURL(text: str) -> bytes:
    """
    Check an upstream URL given on the command line and return its canonical
    form: scheme and host, with the port only where it is not the default.

    @raise ValueError: with a message for the user, if it is anything more or
        less than C{http(s)://host[:port]}.
    """
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"not a valid URL: {e}")
    if parts.scheme not in ("http", "https"):
        raise ValueError("the scheme must be http or https")
    if not parts.hostname:
        raise ValueError("a host is required, as in https://openrouter.ai")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials do not belong in the upstream URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            "give only scheme and host[:port]; hermux adds the path of each request"
        )
    try:
        host = parts.hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError("the host name is not valid")
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}[parts.scheme]
    netloc = host if port in (None, default) else f"{host}:{port}"
    return f"{parts.scheme}://{netloc}".encode("ascii")


def loadTrustRoot(path: str) -> Certificate:
    """
    Load the CA certificate that alone is trusted to vouch for the upstream.

    @raise ValueError: with a message for the user, if it cannot be used.
    """
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror}")
    try:
        return Certificate.loadPEM(pem)
    except Exception:
        raise ValueError(f"{path}: not a PEM certificate")


class Upstream(Service):
    """
    The upstream hermux forwards to: its base URL and the agent that reaches
    it.  As a service it closes the pooled connections when hermux stops.

    C{base} may be set until the service starts (the demo upstream learns its
    port only then).
    """

    def __init__(self, base: bytes, agent: IAgent, pool: HTTPConnectionPool | None = None):
        self.base = base
        self.agent = agent
        self._pool = pool

    @property
    def base(self) -> bytes:
        return self._base

    @base.setter
    def base(self, base: bytes) -> None:
        self._base = base
        # The base is scheme://host[:port] with the port only where it is
        # not the default: its netloc is exactly the Host header to send.
        self.host = base.partition(b"://")[2]

    def stopService(self):
        super().stopService()
        if self._pool is not None:
            return self._pool.closeCachedConnections()

    def request(self, method: bytes, target: bytes, headers, bodyProducer):
        """
        Send one request; C{target} is the path and query to append to the
        base URL.  C{headers} get the upstream's Host (so that the agent
        need not copy them to add it).
        """
        headers.setRawHeaders(b"Host", [self.host])
        return self.agent.request(method, self.base + target, headers, bodyProducer)


@implementer(IAgentEndpointFactory)
class _UpstreamEndpoints:
    """
    Endpoints as an L{Agent} makes them by default: TCP, and TLS verified by
    C{policy} for https.
    """

    def __init__(self, reactor, policy: BrowserLikePolicyForHTTPS, connectTimeout: float):
        self._reactor = reactor
        self._policy = policy
        self._connectTimeout = connectTimeout

    def endpointForURI(self, uri) -> IStreamClientEndpoint:
        if uri.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
        endpoint = HostnameEndpoint(
            self._reactor, uri.host.decode("ascii"), uri.port, timeout=self._connectTimeout
        )
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


def _splitOrigin(uri: bytes) -> tuple[bytes, bytes]:
    """
    C{b"https://host:port/path?query"} as its origin and its target.
    """
    slash = uri.find(b"/", uri.find(b"//") + 2)
    if slash < 0:
        return uri, b"/"
    return uri[:slash], uri[slash:]


@implementer(IAgent)
class _UpstreamAgent:
    """
    What L{Agent} does for hermux's requests, without the work that is the
    same for each of them.  Agent parses every URI, rebuilds its target,
    and finds its endpoint and connection-pool key; hermux sends every
    request to one origin, so this agent works those out once per origin
    and sends the rest of the URI as the target.  It shares Agent's pool
    (L{HTTPConnectionPool}), connections and client protocol, and builds
    the request Agent would (L{clientRequest}); a method or target that
    cannot be sent fails the request before any connection is asked for.

    L{Agent.usingEndpointFactory}, even with an endpoint factory that makes
    each origin's endpoint once, costs 5.6% more instructions per relayed
    request (callgrind: 1.764 M against 1.670 M).
    """

    def __init__(self, pool: HTTPConnectionPool, endpoints: IAgentEndpointFactory):
        self._pool = pool
        self._endpoints = endpoints
        self._origins: dict[bytes, tuple] = {}

    def _route(self, origin: bytes) -> tuple:
        parsed = URI.fromBytes(origin)
        key = (parsed.scheme, parsed.host, parsed.port)
        return key, self._endpoints.endpointForURI(parsed), origin.partition(b"://")[2]

    def request(self, method, uri, headers=None, bodyProducer=None) -> Deferred:
        origin, target = _splitOrigin(uri)
        try:
            key, endpoint, host = self._origins[origin]
        except KeyError:
            try:
                key, endpoint, host = self._origins[origin] = self._route(origin)
            except SchemeNotSupported:
                return fail()
        if headers is None:
            headers = Headers()
        if not headers.hasHeader(b"host"):
            headers = headers.copy()
            headers.addRawHeader(b"Host", host)
        try:
            request = clientRequest(method, target, headers, bodyProducer, self._pool.persistent)
        except ValueError:
            return fail()
        return self._pool.getConnection(key, endpoint).addCallback(
            lambda protocol: protocol.request(request)
        )


def connectToUpstream(
    base: bytes,
    *,
    reactor,
    trustRoot: Certificate | None = None,
    connectTimeout: float = 10.0,
    maxIdleConnections: int = 64,
) -> Upstream:
    """
    An L{Upstream} whose agent keeps connections alive and verifies TLS
    certificates, against C{trustRoot} if given and the system's trust store
    otherwise.  Verification is never turned off.

    A response head that could not be relayed as it is fails the request as
    an invalid response: a status line other than C{HTTP/1.x}, a status of
    three digits from 100 to 599 and a reason phrase of visible characters;
    a NUL anywhere (RFC 9110 section 5.5: reject it or replace it; Twisted
    would relay it); or more than L{MAX_UPSTREAM_HEAD_BYTES} of it, which
    Twisted would buffer without limit.  No connection it opens or closes is
    logged.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = maxIdleConnections
    connectPoolWith(
        pool,
        lambda quiescentCallback: HeadCheckingClientProtocol(
            quiescentCallback, MAX_UPSTREAM_HEAD_BYTES, _STATUS_LINE
        ),
    )
    endpoints = _UpstreamEndpoints(
        reactor, BrowserLikePolicyForHTTPS(trustRoot=trustRoot), connectTimeout
    )
    return Upstream(base, _UpstreamAgent(pool, endpoints), pool)
