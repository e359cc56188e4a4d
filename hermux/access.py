# -*- test-case-name: tests.test_access -*-
"""
Access control: which clients may use hermux, by the secret access token they
send in their C{Authorization} header.
"""

from __future__ import annotations

__all__ = ["AccessList", "AuthThrottle", "Client", "Lookup", "clientLabel", "presentedToken"]

import hashlib
import math
from collections import OrderedDict, deque
from collections.abc import Iterable

import attr
from twisted.internet.address import IPv4Address, IPv6Address


@attr.frozen
class Client:
    """
    An authorized client, known by a label that is safe to log and to count
    by: a short hash of its access token, never the token itself.
    """

    label: str


@attr.frozen
class Lookup:
    """
    The client an C{Authorization} header value names (L{None} for none),
    as one version of an L{AccessList} found it: while the list is not
    replaced, the answer stands, and the token need not be hashed again.
    """

    client: Client | None
    _version: object = attr.field(eq=False, repr=False)


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def clientLabel(token: str) -> str:
    """
    The non-secret label of the client holding C{token}.
    """
    digest = hashlib.sha256(b"hermux client label\0" + token.encode("ascii"))
    return "client-" + digest.hexdigest()[:8]


def presentedToken(authorization: bytes | None) -> bytes | None:
    """
    The token in an C{Authorization} header value, which is either
    C{Bearer <token>} or the bare token, alone.
    """
    if authorization is None:
        return None
    scheme, _, rest = authorization.strip().partition(b" ")
    if scheme.lower() == b"bearer":
        token = rest.strip()
    elif rest.strip():
        # A bare token followed by anything else is not a bare token.
        return None
    else:
        token = scheme
    return token or None


class AccessList:
    """
    The set of access tokens that may use hermux.

    Tokens are looked up by their SHA-256 digest, so how long a check takes
    says nothing about how close a wrong token came to a right one.
    """

    def __init__(self, tokens: Iterable[str]):
        self.replace(tokens)

    def replace(self, tokens: Iterable[str]) -> tuple[int, int]:
        """
        Allow exactly C{tokens} from now on.

        @return: how many tokens were added and how many removed.
        """
        before = set(getattr(self, "_lookups", ()))
        # The answers this version of the list gives, made once: a lookup
        # per request makes nothing.
        self._version = version = object()
        self._nobody = Lookup(None, version)
        self._lookups = {
            _digest(token.encode("ascii")): Lookup(Client(clientLabel(token)), version)
            for token in tokens
        }
        return len(self._lookups.keys() - before), len(before - self._lookups.keys())

    def __len__(self) -> int:
        return len(self._lookups)

    def authorize(self, authorization: bytes | None) -> Client | None:
        """
        The client that an C{Authorization} header value identifies, or
        L{None} if it names no allowed client.
        """
        return self.lookup(authorization).client

    def lookup(self, authorization: bytes | None, earlier: Lookup | None = None) -> Lookup:
        """
        What L{authorize} says of C{authorization}, or C{earlier} if that is
        this list's own answer, given since the list was last replaced.
        """
        if earlier is not None and earlier._version is self._version:
            return earlier
        token = presentedToken(authorization)
        if token is None:
            return self._nobody
        return self._lookups.get(_digest(token), self._nobody)


class AuthThrottle:
    """
    Counts failed access tokens per client address and throttles an
    address with C{failures} failures within the last C{window} seconds.

    A throttled address is refused without its token being looked at,
    valid or not: otherwise a throttled guesser would still learn which of
    its guesses is right.  Other addresses are not affected.  Connections
    without an IP address (UNIX sockets) are never throttled.  At most
    C{maxAddresses} addresses are remembered, the least recently failed
    being forgotten first.

    @param failures: failures allowed per window; 0 turns throttling off.
    """

    def __init__(
        self,
        failures: int,
        window: float = 60.0,
        *,
        maxAddresses: int = 10_000,
        reactor=None,
    ):
        if reactor is None:
            from twisted.internet import reactor
        self.failures = failures
        self.window = window
        self._maxAddresses = maxAddresses
        self._reactor = reactor
        self._failed: OrderedDict[str, deque[float]] = OrderedDict()

    @staticmethod
    def _addressKey(address) -> str | None:
        if isinstance(address, (IPv4Address, IPv6Address)):
            return address.host
        return None

    def retryAfter(self, address) -> int | None:
        """
        The whole number of seconds until C{address} may try again, or
        L{None} if it is not throttled.
        """
        key = self._addressKey(address)
        if not self.failures or key is None:
            return None
        times = self._failed.get(key)
        if times is None or len(times) < self.failures:
            return None
        wait = times[0] + self.window - self._reactor.seconds()
        if wait <= 0:
            return None
        return max(1, math.ceil(wait))

    def failed(self, address) -> bool:
        """
        Count a failed access token from C{address}.

        @return: whether this failure is the one that throttles it.
        """
        key = self._addressKey(address)
        if not self.failures or key is None:
            return False
        times = self._failed.pop(key, None)
        if times is None:
            times = deque(maxlen=self.failures)
        times.append(self._reactor.seconds())
        self._failed[key] = times
        while len(self._failed) > self._maxAddresses:
            self._failed.popitem(last=False)
        return self.retryAfter(address) is not None

    def __len__(self) -> int:
        """
        How many addresses are remembered.
        """
        return len(self._failed)
