"""
The upstream's agent: endpoints made once, TLS always verified.
"""

from __future__ import annotations

from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported

from hermux.upstream import Upstream, _UpstreamEndpoints


class EndpointTests(SynchronousTestCase):
    def setUp(self):
        self.endpoints = _UpstreamEndpoints(Clock(), BrowserLikePolicyForHTTPS(), 10.0)

    def test_madeOncePerHost(self):
        """
        Every request to the upstream gets the same endpoint, rather than a
        new one parsed and checked each time.
        """
        first = self.endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8080/api/v1/models"))
        again = self.endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8080/api/v1/chat"))
        other = self.endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8081/api/v1/models"))
        self.assertIs(first, again)
        self.assertIsNot(first, other)
        self.assertIsInstance(first, HostnameEndpoint)

    def test_httpsIsWrappedInTLS(self):
        endpoint = self.endpoints.endpointForURI(URI.fromBytes(b"https://openrouter.ai/api/v1/models"))
        self.assertNotIsInstance(endpoint, HostnameEndpoint)
        self.assertIsInstance(endpoint._wrappedEndpoint, HostnameEndpoint)

    def test_otherSchemes(self):
        self.assertRaises(
            SchemeNotSupported, self.endpoints.endpointForURI, URI.fromBytes(b"ftp://x/y")
        )


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
