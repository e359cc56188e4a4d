"""
Access control: which clients may use hermux, by the secret access token they
send in their C{Authorization} header.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import attr


@attr.frozen
class Client:
    """
    An authorized client, known by a label that is safe to log and to count
    by: a short hash of its access token, never the token itself.
    """

    label: str


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
    C{Bearer <token>} or the bare token.
    """
    if authorization is None:
        return None
    scheme, _, rest = authorization.strip().partition(b" ")
    token = rest.strip() if scheme.lower() == b"bearer" else scheme
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
        before = set(getattr(self, "_clients", ()))
        self._clients = {
            _digest(token.encode("ascii")): Client(clientLabel(token))
            for token in tokens
        }
        return len(self._clients.keys() - before), len(before - self._clients.keys())

    def __len__(self) -> int:
        return len(self._clients)

    def authorize(self, authorization: bytes | None) -> Client | None:
        """
        The client that an C{Authorization} header value identifies, or
        L{None} if it names no allowed client.
        """
        token = presentedToken(authorization)
        if token is None:
            return None
        return self._clients.get(_digest(token))
