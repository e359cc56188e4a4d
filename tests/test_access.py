"""
Tests for L{hermux.access}: which C{Authorization} header values let a client
in, and how a client is named without naming its token.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hermux import access as access_module
from hermux.access import AccessList, AuthThrottle, Client, clientLabel, presentedToken

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
