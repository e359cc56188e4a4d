"""
The key pool: which upstream key serves the next request.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from twisted.application.service import Service

from hermux.config import Key


class NoKeyAvailable(Exception):
    """
    No key in the pool can serve a request now.
    """


class KeyPool(Service):
    """
    Hands out the least-used key, counting each key when it is chosen so
    that requests made at the same moment spread evenly.  Ties are broken at
    random, so that no key is always first.

    The pool knows nothing of HTTP; it is registered in the application as
    the service named C{keypool}.
    """

    def __init__(self, keys: Iterable[Key], *, randomness: random.Random | None = None):
        self._keys = tuple(keys)
        self._requests = {key.name: 0 for key in self._keys}
        self._random = randomness or random.Random()

    @property
    def keys(self) -> tuple[Key, ...]:
        return self._keys

    def requestCounts(self) -> dict[str, int]:
        """
        How many requests each key (by name) has been chosen for.
        """
        return dict(self._requests)

    def acquire(self) -> Key:
        """
        Choose the key for one request and count it.

        @raise NoKeyAvailable: if the pool has no key.
        """
        if not self._keys:
            raise NoKeyAvailable()
        fewest = min(self._requests.values())
        candidates = [key for key in self._keys if self._requests[key.name] == fewest]
        key = self._random.choice(candidates)
        self._requests[key.name] += 1
        return key
