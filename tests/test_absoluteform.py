"""
Absolute-form request targets (RFC 9112 section 3.2.2), which a server must
accept: routed by their path and query exactly as the origin form; their
host, like the Host header, never decides where a request goes.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from hermux.hygiene import originForm
from tests.harness import CHAT
from tests.memory import MemoryProxy
from tests.test_relay import rawRequest, splitHead


class OriginFormTests(SynchronousTestCase):
    def test_absoluteForm(self):
        for target, expected in (
            (b"http://any.host/api/v1/chat/completions", b"/api/v1/chat/completions"),
            (b"https://any.host:8443/v1/models?a=1&b=2", b"/v1/models?a=1&b=2"),
            (b"HTTP://Any.Host/api/v1/key", b"/api/v1/key"),
            (b"http://user@evil.test/api/v1/models", b"/api/v1/models"),
            (b"http://any.host", b"/"),
            (b"http://any.host?x=1", b"/?x=1"),
        ):
            self.assertEqual(originForm(target), expected, target)

    def test_otherFormsUnchanged(self):
        for target in (b"/api/v1/models", b"/v1/models?x=http://a/b", b"*", b"ftp://h/x", b"@h/api"):
            self.assertIs(originForm(target), target)


class RoutingTests(SynchronousTestCase):
    def exchange(self, target: bytes, extra: bytes = b""):
        proxy = MemoryProxy(self)
        client = proxy.connect(rawRequest(method=b"GET", target=target, body=b"", extra=extra))
        head, body = splitHead(client.received)
        return proxy, head, body

    def test_routedByPathAndQuery(self):
        """
        An absolute-form target reaches the upstream as its path and query,
        under the configured upstream, whatever host it names.
        """
        proxy, head, _ = self.exchange(b"http://elsewhere.test/api/v1/models?x=1")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        [received] = proxy.fake.received
        self.assertEqual(received.uri, b"/api/v1/models?x=1")
        self.assertEqual(received.headers.getRawHeaders(b"host"), [proxy.upstream.host])

    def test_aliasRouted(self):
        proxy, head, _ = self.exchange(b"https://elsewhere.test/v1/models")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertEqual([r.uri for r in proxy.fake.received], [b"/api/v1/models"])

    def test_chat(self):
        proxy = MemoryProxy(self)
        client = proxy.connect(rawRequest(target=b"http://any.host" + CHAT.encode()))
        head, _ = splitHead(client.received)
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertEqual([r.uri for r in proxy.fake.received], [CHAT.encode()])

    def test_unknownPathStill404(self):
        proxy, head, _ = self.exchange(b"http://any.host/elsewhere")
        self.assertTrue(head.startswith(b"HTTP/1.1 404 "), head)
        self.assertEqual(proxy.fake.received, [])
