"""
Tests for L{hermux.access}: which C{Authorization} header values let a client
in, and how a client is named without naming its token.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from hermux import access as access_module
from hermux.access import (
    AccessList,
    AuthThrottle,
    Client,
    TrustedProxies,
    clientLabel,
    presentedToken,
)

TOKEN_A = "hx-ACCESS-alpha-5e1c77"
TOKEN_B = "hx-ACCESS-bravo-0a93fd"


class AuthorizeTests(SynchronousTestCase):
    """
    Tests for L{AccessList.authorize}.
    """

    def setUp(self):
        self.access = AccessList([TOKEN_A, TOKEN_B])

    def assertAuthorizes(self, value: bytes, token: str):
        client = self.access.authorize(value)
        self.assertEqual(client, Client(clientLabel(token)), value)

    def test_bearer(self):
        """
        C{Bearer <token>} authorizes the client holding the token.
        """
        self.assertAuthorizes(b"Bearer " + TOKEN_A.encode(), TOKEN_A)
        self.assertAuthorizes(b"Bearer " + TOKEN_B.encode(), TOKEN_B)

    def test_bearerAnyCase(self):
        """
        The C{Bearer} scheme is matched without regard to case.
        """
        for scheme in (b"bearer", b"BEARER", b"BeArEr"):
            self.assertAuthorizes(scheme + b" " + TOKEN_A.encode(), TOKEN_A)

    def test_extraWhitespace(self):
        """
        Extra spaces around the scheme and the token are tolerated.
        """
        for value in (
            b"Bearer   " + TOKEN_A.encode(),
            b"  Bearer " + TOKEN_A.encode() + b"  ",
            b"Bearer " + TOKEN_A.encode() + b"\t",
            b" " + TOKEN_A.encode() + b" ",
        ):
            self.assertAuthorizes(value, TOKEN_A)

    def test_bareToken(self):
        """
        The token on its own, with no scheme, authorizes too.
        """
        self.assertAuthorizes(TOKEN_B.encode(), TOKEN_B)

    def test_missingHeader(self):
        """
        No C{Authorization} header authorizes nobody.
        """
        self.assertIsNone(self.access.authorize(None))

    def test_emptyValue(self):
        """
        An empty or blank header value authorizes nobody.
        """
        for value in (b"", b"   ", b"\t"):
            self.assertIsNone(self.access.authorize(value), value)

    def test_bearerAlone(self):
        """
        C{Bearer} with no token authorizes nobody.
        """
        for value in (b"Bearer", b"Bearer ", b"bearer    ", b"  BEARER"):
            self.assertIsNone(self.access.authorize(value), value)

    def test_unknownToken(self):
        """
        A token that is not in the list authorizes nobody, bare or with
        C{Bearer}.
        """
        self.assertIsNone(self.access.authorize(b"Bearer hx-ACCESS-unknown"))
        self.assertIsNone(self.access.authorize(b"hx-ACCESS-unknown"))

    def test_prefixOfToken(self):
        """
        A prefix of a valid token is no token.
        """
        for end in (1, 5, len(TOKEN_A) - 1):
            value = b"Bearer " + TOKEN_A.encode()[:end]
            self.assertIsNone(self.access.authorize(value), value)

    def test_extensionOfToken(self):
        """
        A valid token with more characters after it is no token.
        """
        for extra in (b"x", b"0", TOKEN_B.encode()):
            value = b"Bearer " + TOKEN_A.encode() + extra
            self.assertIsNone(self.access.authorize(value), value)

    def test_tokenWithTrailingWord(self):
        """
        A valid token followed by another word is not that token.
        """
        value = b"Bearer " + TOKEN_A.encode() + b" extra"
        self.assertIsNone(self.access.authorize(value))

    def test_bareTokenWithTrailingWord(self):
        """
        A bare valid token followed by another word is not that token.
        """
        for value in (
            TOKEN_A.encode() + b" Bearer",
            TOKEN_A.encode() + b" " + TOKEN_A.encode(),
            TOKEN_A.encode() + b"\tx",
        ):
            self.assertIsNone(self.access.authorize(value), value)

    def test_otherScheme(self):
        """
        A token under another scheme, such as C{Basic}, is not accepted.
        """
        self.assertIsNone(self.access.authorize(b"Basic " + TOKEN_A.encode()))

    def test_caseOfTokenMatters(self):
        """
        Tokens are compared exactly: changing a letter's case makes another
        token.
        """
        self.assertIsNone(self.access.authorize(b"Bearer " + TOKEN_A.upper().encode()))

    def test_nonASCIIValue(self):
        """
        A header value that is not ASCII authorizes nobody (and does not
        raise).
        """
        self.assertIsNone(self.access.authorize(b"Bearer \xff\xfe"))

    def test_emptyList(self):
        """
        An empty access list authorizes nobody and has no length.
        """
        access = AccessList([])
        self.assertEqual(len(access), 0)
        self.assertIsNone(access.authorize(b"Bearer " + TOKEN_A.encode()))

    def test_length(self):
        """
        The length of the list is the number of tokens.
        """
        self.assertEqual(len(self.access), 2)


class LookupTests(SynchronousTestCase):
    """
    Tests for L{AccessList.lookup}.
    """

    def setUp(self):
        self.access = AccessList([TOKEN_A, TOKEN_B])
        self.digested: list[bytes] = []
        real = access_module._digest

        def digest(token):
            self.digested.append(token)
            return real(token)

        self.patch(access_module, "_digest", digest)

    def test_asAuthorize(self):
        """
        A first lookup answers what L{AccessList.authorize} answers.
        """
        for value in (b"Bearer " + TOKEN_A.encode(), TOKEN_B.encode(), b"Bearer wrong", b"", None):
            self.assertEqual(self.access.lookup(value).client, self.access.authorize(value), value)

    def test_earlierAnswerStands(self):
        """
        Given its own earlier answer, the list gives it again without
        hashing the token again, whether it named a client or not.
        """
        for value in (b"Bearer " + TOKEN_A.encode(), b"Bearer wrong"):
            del self.digested[:]
            earlier = self.access.lookup(value)
            self.assertIs(self.access.lookup(value, earlier), earlier)
            self.assertEqual(len(self.digested), 1)

    def test_replacedListLooksAgain(self):
        """
        Once the list is replaced, an earlier answer no longer stands.
        """
        value = b"Bearer " + TOKEN_A.encode()
        earlier = self.access.lookup(value)
        self.access.replace([TOKEN_B])
        self.assertIsNone(self.access.lookup(value, earlier).client)
        self.access.replace([TOKEN_A])
        self.assertEqual(self.access.lookup(value, earlier).client, Client(clientLabel(TOKEN_A)))

    def test_anotherListLooksAgain(self):
        """
        An answer of another access list does not stand for this one.
        """
        value = b"Bearer " + TOKEN_A.encode()
        earlier = AccessList([TOKEN_B]).lookup(value)
        self.assertEqual(self.access.lookup(value, earlier).client, Client(clientLabel(TOKEN_A)))

    def test_lookupHidesToken(self):
        self.assertNotIn(TOKEN_A, repr(self.access.lookup(TOKEN_A.encode())))


class PresentedTokenTests(SynchronousTestCase):
    """
    Tests for L{presentedToken}.
    """

    def test_bearer(self):
        """
        The token after C{Bearer} is the presented token.
        """
        self.assertEqual(presentedToken(b"Bearer abc"), b"abc")

    def test_bare(self):
        """
        A value with no scheme is the token itself.
        """
        self.assertEqual(presentedToken(b" abc "), b"abc")

    def test_nothing(self):
        """
        No header, an empty one and C{Bearer} alone present no token.
        """
        for value in (None, b"", b"Bearer", b"bearer  "):
            self.assertIsNone(presentedToken(value), value)


class ClientLabelTests(SynchronousTestCase):
    """
    Tests for L{clientLabel} and the labels L{AccessList} gives.
    """

    def test_stable(self):
        """
        The same token always gets the same label, also from different
        access lists.
        """
        self.assertEqual(clientLabel(TOKEN_A), clientLabel(TOKEN_A))
        first = AccessList([TOKEN_A]).authorize(b"Bearer " + TOKEN_A.encode())
        second = AccessList([TOKEN_B, TOKEN_A]).authorize(TOKEN_A.encode())
        self.assertEqual(first, second)

    def test_different(self):
        """
        Different tokens, even ones that differ in one character, get
        different labels.
        """
        tokens = [TOKEN_A, TOKEN_B, TOKEN_A + "x", TOKEN_A[:-1] + "8"]
        self.assertEqual(len({clientLabel(token) for token in tokens}), len(tokens))

    def test_labelHidesToken(self):
        """
        A label contains neither the token nor any long part of it.
        """
        for token in (TOKEN_A, TOKEN_B, "client-1234abcd"):
            label = clientLabel(token)
            self.assertNotIn(token, label)
            self.assertNotIn(token[-8:], label)

    def test_labelIsPrintable(self):
        """
        A label is short printable ASCII, fit for a log line or a metric.
        """
        label = clientLabel(TOKEN_A)
        self.assertTrue(label.isascii() and label.isprintable(), label)
        self.assertLessEqual(len(label), 32)
        self.assertNotIn(" ", label)


class StorageTests(SynchronousTestCase):
    """
    The access list keeps digests of the tokens, not the tokens.
    """

    def test_tokensNotStored(self):
        """
        No token appears among the list's stored keys or values, nor in
        their C{repr}.
        """
        access = AccessList([TOKEN_A, TOKEN_B])
        stored = access._lookups
        self.assertEqual(len(stored), 2)
        everything = repr(stored) + repr(vars(access)) + repr(access)
        for token in (TOKEN_A, TOKEN_B):
            self.assertNotIn(token.encode(), stored)
            self.assertNotIn(token, stored)
            self.assertNotIn(token, everything)
            for key in stored:
                self.assertNotIn(token.encode(), key)

    def test_clientReprHidesToken(self):
        """
        An authorized client's C{repr} does not show its token.
        """
        client = AccessList([TOKEN_A]).authorize(TOKEN_A.encode())
        self.assertNotIn(TOKEN_A, repr(client))


def _address(host: str, port: int = 40000):
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


class AuthThrottleTests(SynchronousTestCase):
    """
    Tests for L{AuthThrottle}: failed access tokens per address and minute.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.throttle = AuthThrottle(3, reactor=self.clock)

    def fail(self, host: str, times: int = 1, port: int = 40000):
        for _ in range(times):
            self.throttle.failed(_address(host, port))

    def test_underTheLimit(self):
        """
        Fewer failures than the limit throttle nothing.
        """
        self.fail("192.0.2.1", 2)
        self.assertIsNone(self.throttle.retryAfter(_address("192.0.2.1")))

    def test_atTheLimit(self):
        """
        The limit's worth of failures within a minute throttles the
        address until a minute after the first of them.
        """
        self.fail("192.0.2.1")
        self.clock.advance(10)
        self.assertFalse(self.throttle.failed(_address("192.0.2.1")))
        self.assertTrue(self.throttle.failed(_address("192.0.2.1")))
        self.assertEqual(self.throttle.retryAfter(_address("192.0.2.1")), 50)
        self.clock.advance(49.5)
        self.assertEqual(self.throttle.retryAfter(_address("192.0.2.1")), 1)
        self.clock.advance(0.5)
        self.assertIsNone(self.throttle.retryAfter(_address("192.0.2.1")))

    def test_slidingWindow(self):
        """
        Failures spread over more than a minute never add up to the limit.
        """
        for _ in range(10):
            self.fail("192.0.2.1")
            self.assertIsNone(self.throttle.retryAfter(_address("192.0.2.1")))
            self.clock.advance(21)

    def test_anyPortOfTheAddress(self):
        """
        Failures count per address, whatever the source port.
        """
        for port in (1, 2, 3):
            self.fail("192.0.2.1", port=port)
        self.assertIsNotNone(self.throttle.retryAfter(_address("192.0.2.1", 4)))

    def test_otherAddressesUnaffected(self):
        self.fail("192.0.2.1", 3)
        self.fail("192.0.2.2", 2)
        self.assertIsNone(self.throttle.retryAfter(_address("192.0.2.2")))
        self.assertIsNone(self.throttle.retryAfter(_address("2001:db8::1")))

    def test_IPv6(self):
        self.fail("2001:db8::1", 3)
        self.assertIsNotNone(self.throttle.retryAfter(_address("2001:db8::1")))
        self.assertIsNone(self.throttle.retryAfter(_address("2001:db8::2")))

    def test_UNIXSocketsAreNotThrottled(self):
        """
        Clients on a UNIX socket have no address to tell them apart, and
        are never throttled.
        """
        for _ in range(10):
            self.throttle.failed(UNIXAddress(b"/run/hermux.sock"))
        self.assertIsNone(self.throttle.retryAfter(UNIXAddress(b"/run/hermux.sock")))
        self.assertEqual(len(self.throttle), 0)

    def test_zeroTurnsItOff(self):
        throttle = AuthThrottle(0, reactor=self.clock)
        for _ in range(100):
            throttle.failed(_address("192.0.2.1"))
        self.assertIsNone(throttle.retryAfter(_address("192.0.2.1")))
        self.assertEqual(len(throttle), 0)

    def test_memoryIsBounded(self):
        """
        At most C{maxAddresses} addresses are remembered, each with at most
        the limit's worth of failure times; the oldest is forgotten first.
        """
        throttle = AuthThrottle(3, maxAddresses=100, reactor=self.clock)
        for n in range(1000):
            for _ in range(5):
                throttle.failed(_address(f"10.0.{n // 256}.{n % 256}"))
        self.assertEqual(len(throttle), 100)
        self.assertTrue(all(len(times) <= 3 for times in throttle._failed.values()))
        self.assertIsNone(throttle.retryAfter(_address("10.0.0.0")))
        self.assertIsNotNone(throttle.retryAfter(_address("10.0.3.231")))


class KnownClientTests(SynchronousTestCase):
    """
    Tests for the allowance of L{AuthThrottle}: a client whose token
    succeeded from an address before the address was throttled still gets
    in; no other does.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.throttle = AuthThrottle(3, reactor=self.clock)
        self.address = _address("192.0.2.1")
        self.alpha = Client(clientLabel(TOKEN_A))
        self.bravo = Client(clientLabel(TOKEN_B))

    def throttleIt(self, address=None):
        for _ in range(3):
            self.throttle.failed(address or self.address)

    def test_knownClientPasses(self):
        """
        A client that succeeded from the address before it was throttled is
        not throttled; the address still is for a client it does not know,
        and for no client.
        """
        self.throttle.succeeded(self.address, self.alpha)
        self.throttleIt()
        self.assertIsNone(self.throttle.retryAfter(self.address, self.alpha))
        self.assertEqual(self.throttle.retryAfter(self.address, self.bravo), 60)
        self.assertEqual(self.throttle.retryAfter(self.address, None), 60)
        self.assertEqual(self.throttle.retryAfter(self.address), 60)

    def test_notLearntWhileThrottled(self):
        """
        A success while the address is throttled does not make a client
        known, then or later in the same throttle.
        """
        self.throttleIt()
        self.throttle.succeeded(self.address, self.bravo)
        self.assertEqual(self.throttle.retryAfter(self.address, self.bravo), 60)
        self.throttle.succeeded(self.address, self.alpha)
        self.assertEqual(self.throttle.retryAfter(self.address, self.alpha), 60)

    def test_knownAfterTheThrottle(self):
        """
        Once the throttle is over, a success makes the client known for the
        next one.
        """
        self.throttleIt()
        self.clock.advance(60)
        self.throttle.succeeded(self.address, self.bravo)
        self.throttleIt()
        self.assertIsNone(self.throttle.retryAfter(self.address, self.bravo))

    def test_knownPerAddress(self):
        """
        A client known from one address is not known from another.
        """
        other = _address("192.0.2.2")
        self.throttle.succeeded(self.address, self.alpha)
        self.throttleIt(other)
        self.assertIsNotNone(self.throttle.retryAfter(other, self.alpha))

    def test_knownByLabel(self):
        """
        The throttle keeps the clients' labels, never a token.
        """
        self.throttle.succeeded(self.address, self.alpha)
        self.assertEqual(list(self.throttle._known["192.0.2.1"]), [self.alpha.label])
        self.assertNotIn(TOKEN_A, repr(vars(self.throttle)))

    def test_offOrUNIX(self):
        """
        With throttling off, or for a UNIX socket, nothing is remembered.
        """
        throttle = AuthThrottle(0, reactor=self.clock)
        throttle.succeeded(self.address, self.alpha)
        self.throttle.succeeded(UNIXAddress(b"/run/hermux.sock"), self.alpha)
        self.assertEqual(len(throttle._known) + len(self.throttle._known), 0)

    def test_boundedPerAddress(self):
        """
        At most C{knownPerAddress} clients are known per address; the one
        seen least recently is forgotten first.
        """
        throttle = AuthThrottle(3, knownPerAddress=4, reactor=self.clock)
        clients = [Client(f"client-{n}") for n in range(6)]
        for client in clients:
            throttle.succeeded(self.address, client)
        throttle.succeeded(self.address, clients[2])
        for _ in range(3):
            throttle.failed(self.address)
        passing = [c for c in clients if throttle.retryAfter(self.address, c) is None]
        self.assertEqual(passing, clients[2:])

    def test_boundedAddresses(self):
        """
        At most C{maxAddresses} addresses have known clients; the one seen
        least recently is forgotten first.
        """
        throttle = AuthThrottle(3, maxAddresses=10, reactor=self.clock)
        addresses = [_address(f"10.0.0.{n}") for n in range(20)]
        for address in addresses:
            throttle.succeeded(address, self.alpha)
        throttle.succeeded(addresses[0], self.alpha)
        self.assertEqual(len(throttle._known), 10)
        self.assertEqual(
            set(throttle._known), {"10.0.0.0"} | {f"10.0.0.{n}" for n in range(11, 20)}
        )


class TrustedProxiesTests(SynchronousTestCase):
    """
    Tests for L{TrustedProxies.clientAddress}: the client address behind a
    trusted proxy.
    """

    def setUp(self):
        self.proxies = TrustedProxies(["10.0.0.0/8", "fd00::/8", "127.0.0.1"])
        self.proxy = _address("10.1.2.3")

    def client(self, peer, **headers):
        values = Headers()
        for name, value in headers.items():
            values.setRawHeaders(
                name.replace("_", "-"), value if isinstance(value, list) else [value]
            )
        return self.proxies.clientAddress(peer, values)

    def assertClient(self, peer, host, **headers):
        address = self.client(peer, **headers)
        expected = _address(host, 0)
        self.assertEqual((type(address), address.host, address.port), (type(expected), host, 0))

    def test_untrustedPeer(self):
        """
        From a peer that is not a trusted proxy, the headers are ignored.
        """
        peer = _address("192.0.2.9")
        self.assertIs(self.client(peer, x_forwarded_for=b"203.0.113.5"), peer)
        self.assertIs(self.client(peer, forwarded=b"for=203.0.113.5"), peer)

    def test_noneTrusted(self):
        peer = _address("10.1.2.3")
        headers = Headers({b"x-forwarded-for": [b"203.0.113.5"]})
        self.assertIs(TrustedProxies().clientAddress(peer, headers), peer)

    def test_UNIXPeer(self):
        peer = UNIXAddress(b"/run/hermux.sock")
        self.assertIs(self.client(peer, x_forwarded_for=b"203.0.113.5"), peer)

    def test_trustedPeerWithoutHeaders(self):
        self.assertIs(self.client(self.proxy), self.proxy)

    def test_forwardedFor(self):
        """
        From a trusted proxy, the right-most address of X-Forwarded-For that
        is not a trusted proxy's is the client's; those left of it, which
        the client may have written, are not looked at.
        """
        self.assertClient(self.proxy, "203.0.113.5", x_forwarded_for=b"203.0.113.5")
        self.assertClient(
            self.proxy,
            "203.0.113.5",
            x_forwarded_for=b"garbage, 198.51.100.1,203.0.113.5 , 10.9.9.9",
        )
        self.assertClient(
            self.proxy, "203.0.113.5", x_forwarded_for=[b"198.51.100.1", b"203.0.113.5, 10.9.9.9"]
        )

    def test_allTrusted(self):
        """
        When every address is a trusted proxy's, the left-most is the
        client's.
        """
        self.assertClient(self.proxy, "127.0.0.1", x_forwarded_for=b"127.0.0.1, 10.9.9.9")

    def test_IPv6(self):
        peer = _address("fd00::1")
        self.assertClient(peer, "2001:db8::5", x_forwarded_for=b"2001:db8::5")
        self.assertClient(peer, "2001:db8::5", x_forwarded_for=b"[2001:db8::5]:4711")
        self.assertClient(peer, "192.0.2.5", forwarded=b'for="192.0.2.5:4711"')
        self.assertClient(self.proxy, "2001:db8::5", forwarded=b'For="[2001:db8::5]:4711"')

    def test_IPv4MappedPeer(self):
        """
        A trusted IPv4 proxy reaching a tcp6 listener, as ::ffff:10.1.2.3,
        is trusted.
        """
        peer = _address("::ffff:10.1.2.3")
        self.assertClient(peer, "203.0.113.5", x_forwarded_for=b"203.0.113.5")

    def test_forwarded(self):
        """
        C{Forwarded} (RFC 7239) is read like X-Forwarded-For, by its
        C{for=} parameters.
        """
        self.assertClient(
            self.proxy,
            "203.0.113.5",
            forwarded=b"for=198.51.100.1;proto=http, for=203.0.113.5;by=10.1.2.3;proto=https",
        )
        self.assertClient(
            self.proxy, "203.0.113.5", forwarded=[b"for=203.0.113.5", b"for=10.9.9.9"]
        )

    def test_bothAgree(self):
        self.assertClient(
            self.proxy, "203.0.113.5", x_forwarded_for=b"203.0.113.5", forwarded=b"for=203.0.113.5"
        )

    def test_bothDisagree(self):
        """
        When X-Forwarded-For and Forwarded name different clients (a proxy
        sets one and passes on the client's own other), the peer is used.
        """
        self.assertIs(
            self.client(self.proxy, x_forwarded_for=b"203.0.113.5", forwarded=b"for=198.51.100.1"),
            self.proxy,
        )

    def test_malformed(self):
        """
        When the entry that would name the client is not an address, the
        peer is used.
        """
        for headers in (
            {"x_forwarded_for": b""},
            {"x_forwarded_for": b"203.0.113.5,"},
            {"x_forwarded_for": b"203.0.113.5, not-an-address"},
            {"x_forwarded_for": b"203.0.113.5:http"},
            {"x_forwarded_for": b"[2001:db8::5"},
            {"x_forwarded_for": b"[2001:db8::5]x"},
            {"x_forwarded_for": b"203.0.113.5/24"},
            {"x_forwarded_for": b"\xff"},
            {"forwarded": b"for=unknown"},
            {"forwarded": b"for=_hidden"},
            {"forwarded": b"for=203.0.113.5, proto=https"},
            {"forwarded": b"by=10.1.2.3"},
        ):
            self.assertIs(self.client(self.proxy, **headers), self.proxy, headers)

    def test_networks(self):
        """
        Addresses and networks, as text or L{ipaddress} networks, both
        families.
        """
        proxies = TrustedProxies([ipaddress.ip_network("192.0.2.0/24"), "2001:db8::1"])
        self.assertTrue(proxies.trusts(ipaddress.ip_address("192.0.2.200")))
        self.assertTrue(proxies.trusts(ipaddress.ip_address("2001:db8::1")))
        self.assertFalse(proxies.trusts(ipaddress.ip_address("2001:db8::2")))
        self.assertFalse(proxies.trusts(ipaddress.ip_address("192.0.3.1")))
