"""
The throttle of failed access tokens, through hermux's site in memory: a
client whose token succeeded from an address before it was throttled keeps
working, no other gets in or learns anything, and behind a C{--trusted-proxy}
the client address is the one the proxy names.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from hermux.access import AccessList, AuthThrottle, TrustedProxies
from hermux.config import Key
from hermux.keypool import KeyPool
from hermux.relay import Relay
from hermux.resource import buildRoot
from hermux.site import HermuxSite
from hermux.upstream import Upstream
from tests.rawhttp import splitResponse
from tests.test_site import PendingAgent

KEY = Key("alpha", "sk-or-v1-throttle-test-key-41c2")
ALICE = b"throttle-test-token-alice-Q2m8"
BOB = b"throttle-test-token-bob-Vn4z"
CAROL = b"throttle-test-token-carol-Hd7x"
SHARED = "192.0.2.7"
PROXY = "10.0.0.2"
_CLOSED = Failure(ConnectionDone())


class _Lines:
    def __init__(self):
        self.lines: list[dict] = []

    def record(self, fields):
        self.lines.append(fields)


class ThrottleTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.agent = PendingAgent()
        pool = KeyPool([KEY], reactor=self.clock)
        relay = Relay(Upstream(b"https://upstream.test", self.agent), pool, reactor=self.clock)
        access = AccessList([ALICE.decode(), BOB.decode(), CAROL.decode()])
        self.throttle = AuthThrottle(3, reactor=self.clock)
        self.log = _Lines()
        self.site = HermuxSite(
            buildRoot(pool, access, relay, throttle=self.throttle),
            maxBody=1000,
            access=access,
            trustedProxies=TrustedProxies([PROXY, "fd00::/8"]),
            requestLog=self.log,
            reactor=self.clock,
        )

    def ask(self, token: bytes, host: str = SHARED, headers: bytes = b""):
        """
        Send one request with C{token} from C{host}, and return its status,
        headers and body; a forwarded request's status is L{None} (the
        agent never answers).
        """
        forwarded = len(self.agent.requests)
        channel = self.site.buildProtocol(None)
        kind = IPv6Address if ":" in host else IPv4Address
        client = StringTransport(peerAddress=kind("TCP", host, 40000))
        channel.makeConnection(client)
        channel.dataReceived(
            b"GET /api/v1/models HTTP/1.1\r\nAuthorization: Bearer "
            + token
            + b"\r\n"
            + headers
            + b"\r\n"
        )
        answer = client.value()
        channel.connectionLost(_CLOSED)
        if not answer:
            self.assertEqual(len(self.agent.requests), forwarded + 1)
            return None, {}, b""
        self.assertEqual(len(self.agent.requests), forwarded)
        return splitResponse(answer)

    def status(self, token: bytes, host: str = SHARED, headers: bytes = b""):
        return self.ask(token, host, headers)[0]

    def guess(self, times: int = 3, host: str = SHARED, headers: bytes = b""):
        for _ in range(times):
            self.status(b"wrong-guess", host, headers)


class KnownClientTests(ThrottleTestCase):
    def test_knownTokenPasses(self):
        """
        While an address is throttled, a token that succeeded from it before
        is forwarded; a valid token new to it and an invalid one get 429.
        """
        self.assertIsNone(self.status(ALICE))
        self.guess()
        self.assertEqual(self.status(b"wrong-guess"), 429)
        self.assertIsNone(self.status(ALICE))
        self.assertEqual(self.status(BOB), 429)
        self.assertEqual(self.status(b"another-guess"), 429)
        self.assertIsNone(self.status(ALICE))

    def test_sameAnswerForValidAndInvalid(self):
        """
        A throttled guesser learns nothing: a valid new token and an invalid
        one get the same answer, byte for byte but for the request id.
        """
        self.guess()
        answers = []
        for token in (BOB, b"wrong-guess", b"", CAROL[:-1]):
            status, headers, body = self.ask(token)
            del headers[b"x-request-id"]
            answers.append((status, headers, body))
        self.assertEqual(answers[0][0], 429)
        self.assertEqual(answers[0][1][b"retry-after"], [b"60"])
        self.assertEqual(json.loads(answers[0][2])["error"]["code"], 429)
        for answer in answers[1:]:
            self.assertEqual(answer, answers[0])

    def test_knownOnlyBeforeTheThrottle(self):
        """
        A valid token refused while the address is throttled does not
        become known: it is refused until the throttle is over.
        """
        self.guess()
        self.assertEqual(self.status(BOB), 429)
        self.clock.advance(30)
        self.assertEqual(self.status(BOB), 429)

    def test_throttledRequestsAreNotCounted(self):
        """
        Requests refused with 429 are not failures: the throttle ends a
        minute after the failures that began it, however much was tried
        since, and a known client's requests change nothing either.
        """
        self.status(ALICE)
        self.guess()
        for _ in range(10):
            self.clock.advance(5)
            self.assertEqual(self.status(b"wrong-guess"), 429)
            self.assertIsNone(self.status(ALICE))
        self.clock.advance(10)
        self.assertIsNone(self.status(BOB))
        self.assertEqual(self.status(b"wrong-guess"), 401)

    def test_otherAddressesUnaffected(self):
        self.status(ALICE, host="192.0.2.8")
        self.guess()
        self.assertEqual(self.status(ALICE), 429)
        self.assertIsNone(self.status(BOB, host="192.0.2.8"))


class TrustedProxyTests(ThrottleTestCase):
    def forwardedFor(self, client: str) -> bytes:
        return b"X-Forwarded-For: 198.51.100.1, " + client.encode() + b"\r\n"

    def test_clientsBehindTheProxy(self):
        """
        Behind a trusted proxy each client named in X-Forwarded-For is
        throttled on its own, not the proxy.
        """
        guesser = self.forwardedFor("203.0.113.5")
        other = self.forwardedFor("203.0.113.6")
        self.guess(host=PROXY, headers=guesser)
        self.assertEqual(self.status(BOB, PROXY, guesser), 429)
        self.assertIsNone(self.status(BOB, PROXY, other))
        self.assertIsNone(self.status(BOB, PROXY))

    def test_forwardedHeader(self):
        guesser = b"Forwarded: for=203.0.113.5;proto=https\r\n"
        self.guess(host=PROXY, headers=guesser)
        self.assertEqual(self.status(BOB, PROXY, guesser), 429)
        self.assertIsNone(self.status(BOB, PROXY, b"Forwarded: for=203.0.113.6\r\n"))

    def test_IPv6Proxy(self):
        guesser = b'Forwarded: for="[2001:db8::5]:4711"\r\n'
        self.guess(host="fd00::2", headers=guesser)
        self.assertEqual(self.status(BOB, "fd00::2", guesser), 429)
        self.assertIsNone(self.status(BOB, "fd00::2", self.forwardedFor("2001:db8::6")))

    def test_headersIgnoredFromOthers(self):
        """
        From a peer that is not a trusted proxy, X-Forwarded-For and
        Forwarded are ignored: a guesser cannot escape its throttle by
        naming other addresses.
        """
        for n in range(3):
            self.status(b"wrong-guess", headers=self.forwardedFor(f"203.0.113.{n}"))
        self.assertEqual(self.status(BOB, headers=self.forwardedFor("203.0.113.9")), 429)
        self.assertEqual(self.status(BOB, headers=b"Forwarded: for=203.0.113.9\r\n"), 429)

    def test_logLine(self):
        """
        The log line's peer is the client the trusted proxy names; from
        anyone else, the peer itself.
        """
        self.status(ALICE, PROXY, self.forwardedFor("203.0.113.5"))
        self.status(ALICE, PROXY, self.forwardedFor("2001:db8::5"))
        self.status(ALICE, PROXY)
        self.status(ALICE, headers=self.forwardedFor("203.0.113.5"))
        self.assertEqual(
            [line["peer"] for line in self.log.lines],
            ["203.0.113.5", "2001:db8::5", PROXY + ":40000", SHARED + ":40000"],
        )

    def test_throttlingLogNamesTheClient(self):
        with capturedLogs() as events:
            self.guess(host=PROXY, headers=self.forwardedFor("203.0.113.5"))
        [warning] = [e for e in events if "throttling" in e.get("log_format", "")]
        self.assertEqual(
            formatEvent(warning), "throttling 203.0.113.5: 3 failed access tokens within 60 seconds"
        )
