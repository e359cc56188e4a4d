"""
The upstream's agent: an origin worked out once, TLS always verified.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers

from hermux.upstream import Upstream, _splitOrigin, _UpstreamAgent, _UpstreamEndpoints


class EndpointTests(SynchronousTestCase):
    def setUp(self):
        self.endpoints = _UpstreamEndpoints(Clock(), BrowserLikePolicyForHTTPS(), 10.0)

    def test_http(self):
        endpoint = self.endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8080/api"))
        self.assertIsInstance(endpoint, HostnameEndpoint)

    def test_httpsIsWrappedInTLS(self):
        endpoint = self.endpoints.endpointForURI(URI.fromBytes(b"https://openrouter.ai/api/v1/models"))
        self.assertNotIsInstance(endpoint, HostnameEndpoint)
        self.assertIsInstance(endpoint._wrappedEndpoint, HostnameEndpoint)

    def test_otherSchemes(self):
        self.assertRaises(
            SchemeNotSupported, self.endpoints.endpointForURI, URI.fromBytes(b"ftp://x/y")
        )


class _CountingEndpoints:
    def __init__(self):
        self.asked = []

    def endpointForURI(self, uri):
        self.asked.append(uri.toBytes())
        if uri.scheme != b"http":
            raise SchemeNotSupported(uri.scheme)
        return object()


class _RecordingProtocol:
    def __init__(self):
        self.requests = []

    def request(self, request):
        self.requests.append(request)
        return Deferred()


class _RecordingPool:
    persistent = True

    def __init__(self):
        self.connections = []
        self.protocol = _RecordingProtocol()

    def getConnection(self, key, endpoint):
        self.connections.append((key, endpoint))
        return succeed(self.protocol)


class AgentTests(SynchronousTestCase):
    """
    The agent works out an origin's endpoint and pool key once, and sends
    the rest of each URI as the request target.
    """

    def setUp(self):
        self.endpoints = _CountingEndpoints()
        self.pool = _RecordingPool()
        self.agent = _UpstreamAgent(self.pool, self.endpoints)

    def test_originWorkedOutOnce(self):
        headers = Headers({b"Host": [b"127.0.0.1:8080"]})
        self.agent.request(b"GET", b"http://127.0.0.1:8080/api/v1/models", headers)
        self.agent.request(b"POST", b"http://127.0.0.1:8080/api/v1/chat/completions", headers)
        self.agent.request(b"GET", b"http://127.0.0.1:8081/api/v1/models", headers)
        self.assertEqual(
            self.endpoints.asked, [b"http://127.0.0.1:8080", b"http://127.0.0.1:8081"]
        )
        [(key1, endpoint1), (key2, endpoint2), (key3, endpoint3)] = self.pool.connections
        self.assertEqual(key1, (b"http", b"127.0.0.1", 8080))
        self.assertEqual((key2, endpoint2), (key1, endpoint1))
        self.assertEqual(key3, (b"http", b"127.0.0.1", 8081))
        self.assertIsNot(endpoint3, endpoint1)

    def test_targetAndHeaders(self):
        """
        The target is the URI's path and query byte for byte; the caller's
        headers are sent as they are when they name the Host, and a copy
        with the origin's Host otherwise.
        """
        headers = Headers({b"Host": [b"upstream.test:8080"], b"X-One": [b"1"]})
        self.agent.request(b"POST", b"http://127.0.0.1:8080/api/v1/chat?x=%2F&y", headers)
        bare = Headers({b"X-Two": [b"2"]})
        self.agent.request(b"GET", b"http://127.0.0.1:8080", bare)
        first, second = self.pool.protocol.requests
        self.assertEqual((first.method, first.uri), (b"POST", b"/api/v1/chat?x=%2F&y"))
        self.assertIs(first.headers, headers)
        self.assertTrue(first.persistent)
        self.assertEqual((second.method, second.uri), (b"GET", b"/"))
        self.assertEqual(second.headers.getRawHeaders(b"host"), [b"127.0.0.1:8080"])
        self.assertEqual(second.headers.getRawHeaders(b"x-two"), [b"2"])
        self.assertFalse(bare.hasHeader(b"host"))

    def test_unsendableRequestsFail(self):
        """
        A method or target that cannot be sent, or an origin with no
        endpoint, fails the request before any connection is asked for.
        """
        for method, uri, error in (
            (b"GE T", b"http://127.0.0.1:8080/x", ValueError),
            (b"GET", b"http://127.0.0.1:8080/x y", ValueError),
            (b"GET", b"http://127.0.0.1:8080/x\r\nEvil: 1", ValueError),
            (b"GET", b"ftp://127.0.0.1/x", SchemeNotSupported),
        ):
            self.failureResultOf(self.agent.request(method, uri, Headers()), error)
        self.assertEqual(self.pool.connections, [])


class SplitOriginTests(SynchronousTestCase):
    def test_split(self):
        for uri, expected in (
            (b"https://openrouter.ai/api/v1/models", (b"https://openrouter.ai", b"/api/v1/models")),
            (b"http://127.0.0.1:81/a?b=/c", (b"http://127.0.0.1:81", b"/a?b=/c")),
            (b"http://[::1]:81/x", (b"http://[::1]:81", b"/x")),
            (b"https://openrouter.ai", (b"https://openrouter.ai", b"/")),
        ):
            self.assertEqual(_splitOrigin(uri), expected)


class HostTests(SynchronousTestCase):
    def test_hostFollowsTheBase(self):
        """
        The Host sent upstream is the base URL's host and port, also when
        the base changes (as the demo's does when it starts).
        """
        upstream = Upstream(b"https://openrouter.ai", object())
        self.assertEqual(upstream.host, b"openrouter.ai")
        upstream.base = b"http://127.0.0.1:4321"
        self.assertEqual(upstream.host, b"127.0.0.1:4321")
        upstream.base = b"http://[::1]:81"
        self.assertEqual(upstream.host, b"[::1]:81")
