# -*- test-case-name: tests.test_access -*-
"""
Access control: which clients may use hermux, by the secret access token they
send in their C{Authorization} header.
"""

from __future__ import annotations

__all__ = [
    "AccessList",
    "AuthThrottle",
    "Client",
    "Lookup",
    "TrustedProxies",
    "clientLabel",
    "presentedToken",
]

import hashlib
import ipaddress
import math
from collections import OrderedDict, deque
from collections.abc import Iterable

import attr
from twisted.internet.address import IPv4Address, IPv6Address

from hermux.config import ClientEntry, Role


@attr.frozen
class Client:
    """
    An authorized client, known by a label that is safe to log and to count
    by: its name in clients.csv, or for a token of allow.txt a short hash of
    it, never the token itself.

    @ivar entry: its line of clients.csv (role and limits), or L{None} for
        a token of allow.txt: an admin without limits.
    """

    label: str
    entry: ClientEntry | None = attr.field(default=None, eq=False, repr=False)
    # The entry's keys, as the pool takes them.
    keys: frozenset[str] | None = attr.field(default=None, eq=False, repr=False)

    @property
    def admin(self) -> bool:
        return self.entry is None or self.entry.role is Role.ADMIN


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
    The access tokens that may use hermux: those of allow.txt and those of
    the clients in clients.csv.

    Tokens are looked up by their SHA-256 digest, so how long a check takes
    says nothing about how close a wrong token came to a right one.
    """

    def __init__(self, tokens: Iterable[str], clients: Iterable[ClientEntry] = ()):
        self.replace(tokens, clients)

    def replace(self, tokens: Iterable[str], clients: Iterable[ClientEntry] = ()) -> tuple[int, int]:
        """
        Allow exactly C{tokens} and C{clients} from now on.

        @return: how many tokens were added and how many removed.
        """
        before = set(getattr(self, "_lookups", ()))
        # The answers this version of the list gives, made once: a lookup
        # per request makes nothing.
        self._version = version = object()
        self._nobody = Lookup(None, version)
        lookups = {
            _digest(token.encode("ascii")): Lookup(Client(clientLabel(token)), version)
            for token in tokens
        }
        for entry in clients:
            keys = None if entry.keys is None else frozenset(entry.keys)
            client = Client(entry.name, entry, keys)
            lookups[_digest(entry.token.encode("ascii"))] = Lookup(client, version)
        self._lookups = lookups
        return len(lookups.keys() - before), len(before - lookups.keys())

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

    A throttled address is refused whatever token it sends, valid or not,
    unless that token already succeeded from the address before the
    throttle began (an OWASP "device cookie" allowance): other clients
    sharing the address (one machine, a Docker bridge, a proxy) keep
    working while one of them guesses, and the guesser still learns
    nothing of its new guesses, a valid new one being refused exactly as
    an invalid one is.  Other addresses are not affected.  Connections
    without an IP address (UNIX sockets) are never throttled.

    Memory is bounded: at most C{maxAddresses} addresses with failures are
    remembered, the least recently failed being forgotten first, and at
    most C{maxAddresses} addresses with clients known from them, each with
    at most C{knownPerAddress} clients (by their label, never the token),
    the least recently seen being forgotten first.

    @param failures: failures allowed per window; 0 turns throttling off.
    """

    def __init__(
        self,
        failures: int,
        window: float = 60.0,
        *,
        maxAddresses: int = 10_000,
        knownPerAddress: int = 16,
        reactor=None,
    ):
        if reactor is None:
            from twisted.internet import reactor
        self.failures = failures
        self.window = window
        self._maxAddresses = maxAddresses
        self._knownPerAddress = knownPerAddress
        self._reactor = reactor
        self._failed: OrderedDict[str, deque[float]] = OrderedDict()
        self._known: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()
        # Told of each failure, by address and time, for the other
        # instances sharing the pool (see hermux.shared).
        self.onFailure = None

    @staticmethod
    def _addressKey(address) -> str | None:
        if isinstance(address, (IPv4Address, IPv6Address)):
            return address.host
        return None

    def _wait(self, key: str) -> float:
        times = self._failed.get(key)
        if times is None or len(times) < self.failures:
            return 0.0
        return times[0] + self.window - self._reactor.seconds()

    def retryAfter(self, address, client: Client | None = None) -> int | None:
        """
        The whole number of seconds until C{address} may try again, or
        L{None} if it is not throttled, or if C{client} (the one the
        request's token names, L{None} for none) succeeded from it before.
        """
        key = self._addressKey(address)
        if not self.failures or key is None:
            return None
        wait = self._wait(key)
        if wait <= 0:
            return None
        # Looked up for any token, valid or not, so that a valid new one
        # takes the path an invalid one takes.
        label = "" if client is None else client.label
        if label in self._known.get(key, ()):
            return None
        return max(1, math.ceil(wait))

    def succeeded(self, address, client: Client) -> None:
        """
        Note that C{client}'s token was accepted from C{address}, which
        then lets it in while the address is throttled.  A client is not
        learnt while its address is throttled: only one known before the
        throttle began gets in then.
        """
        key = self._addressKey(address)
        if not self.failures or key is None:
            return
        known = self._known.get(key)
        if known is None:
            if self._wait(key) > 0:
                return
            known = self._known[key] = OrderedDict()
            while len(self._known) > self._maxAddresses:
                self._known.popitem(last=False)
        elif client.label not in known and self._wait(key) > 0:
            return
        self._known.move_to_end(key)
        known[client.label] = None
        known.move_to_end(client.label)
        while len(known) > self._knownPerAddress:
            known.popitem(last=False)

    def failed(self, address) -> bool:
        """
        Count a failed access token from C{address}.

        @return: whether this failure is the one that throttles it.
        """
        key = self._addressKey(address)
        if not self.failures or key is None:
            return False
        now = self._reactor.seconds()
        times = self._failed.pop(key, None)
        if times is None:
            times = deque(maxlen=self.failures)
        times.append(now)
        self._remember(key, times)
        if self.onFailure is not None:
            self.onFailure(key, now)
        return self._wait(key) > 0

    def _remember(self, key: str, times: deque) -> None:
        self._failed[key] = times
        while len(self._failed) > self._maxAddresses:
            self._failed.popitem(last=False)

    def merge(self, host: str, times: Iterable[float]) -> None:
        """
        Take the times of failures from C{host} (an IP address as text)
        that other instances counted; those already known here are not
        counted twice.
        """
        if not self.failures:
            return
        known = self._failed.pop(host, ())
        merged = sorted({*known, *times})[-self.failures :]
        self._remember(host, deque(merged, maxlen=self.failures))

    def __len__(self) -> int:
        """
        How many addresses with failures are remembered.
        """
        return len(self._failed)


def _ipOf(text: str | None):
    """
    The IP address in one entry of C{X-Forwarded-For} or one C{for=} of
    C{Forwarded}: C{192.0.2.1}, C{2001:db8::1}, C{[2001:db8::1]}, each
    maybe with a C{:port}, and maybe quoted; L{None} for anything else
    (C{unknown}, an obfuscated name, garbage).
    """
    if text is None:
        return None
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    if text.startswith("["):
        text, bracket, port = text[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and port[1:].isdigit())):
            return None
    elif text.count(":") == 1:
        text, _, port = text.partition(":")
        if not port.isdigit():
            return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _forwardedForEntries(value: str) -> list[str]:
    return value.split(",")


def _forwardedEntries(value: str) -> list[str | None]:
    """
    The C{for=} of each element of a C{Forwarded} value (RFC 7239), L{None}
    for an element without one.
    """
    entries: list[str | None] = []
    for element in value.split(","):
        found = None
        for pair in element.split(";"):
            name, _, text = pair.partition("=")
            if name.strip().lower() == "for":
                found = text
        entries.append(found)
    return entries


class TrustedProxies:
    """
    The reverse proxies whose word is taken for the address of the client
    behind them (C{--trusted-proxy}), and the client address that follows
    for each request: the one the throttle counts by and the log shows.

    @param networks: the proxies' networks, as text (C{10.0.0.0/8},
        C{::1}) or L{ipaddress} networks.
    """

    _HEADERS = ((b"x-forwarded-for", _forwardedForEntries), (b"forwarded", _forwardedEntries))

    def __init__(self, networks: Iterable = ()):
        self._networks = tuple(ipaddress.ip_network(network) for network in networks)

    def trusts(self, ip) -> bool:
        """
        Whether C{ip}, an L{ipaddress} address, is a trusted proxy's.
        """
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self._networks)

    def _client(self, entries: list[str | None]):
        # The right-most entry that is not a trusted proxy's is the one the
        # first trusted proxy saw; those left of it are the client's word.
        # When all are trusted, the left-most is the client.
        ip = None
        for entry in reversed(entries):
            ip = _ipOf(entry)
            if ip is None or not self.trusts(ip):
                return ip
        return ip

    def clientAddress(self, peer, headers):
        """
        The address of the client whose request has C{headers} (twisted.web
        L{Headers}) and came from C{peer}: C{peer} itself, unless it is a
        trusted proxy; then the client C{X-Forwarded-For} or C{Forwarded}
        names, as an address with port 0.  A malformed header, or the two
        headers naming different clients, give C{peer}.
        """
        if not self._networks or not isinstance(peer, (IPv4Address, IPv6Address)):
            return peer
        try:
            if not self.trusts(ipaddress.ip_address(peer.host)):
                return peer
        except ValueError:
            return peer
        named = set()
        for name, entries in self._HEADERS:
            values = headers.getRawHeaders(name)
            if values is None:
                continue
            try:
                value = b",".join(values).decode("ascii")
            except UnicodeDecodeError:
                return peer
            named.add(self._client(entries(value)))
        if len(named) != 1 or None in named:
            return peer
        [ip] = named
        kind = IPv6Address if ip.version == 6 else IPv4Address
        return kind("TCP", str(ip), 0)
