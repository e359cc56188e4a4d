# -*- test-case-name: tests.test_probe,tests.test_failover -*-
"""
--probe-keys: at start, ask the upstream about each key (GET /api/v1/key, a
few keys at a time) and seed the pool with what it says: today's free-model
requests used and the daily limit, and which keys it refuses.
"""

from __future__ import annotations

__all__ = ["KeyProbe"]

from http.cookiejar import CookieJar, DefaultCookiePolicy

import treq
from twisted.application.service import Service
from twisted.internet.defer import DeferredList, DeferredSemaphore, ensureDeferred
from twisted.logger import Logger
from treq.client import HTTPClient

from hermux.config import Key
from hermux.keypool import Kind, KeyPool, Verdict
from hermux.upstream import Upstream


def _forgetfulClient(upstream: Upstream) -> HTTPClient:
    """
    A treq client over the upstream's agent whose cookie jar keeps nothing.
    """
    return HTTPClient(upstream.agent, cookiejar=CookieJar(DefaultCookiePolicy(allowed_domains=[])))


class KeyProbe(Service):
    """
    Probes every key of a L{KeyPool} when started, giving up on a key whose
    answer has not all arrived C{timeout} seconds after its probe was sent.

    @ivar done: fires when every probe is over (for tests).
    """

    _log = Logger()

    def __init__(
        self,
        pool: KeyPool,
        upstream: Upstream,
        *,
        concurrency: int = 3,
        timeout: float = 30.0,
        reactor=None,
    ):
        if reactor is None:
            from twisted.internet import reactor
        self._pool = pool
        self._upstream = upstream
        self._client = _forgetfulClient(upstream)
        self._concurrency = concurrency
        self._timeout = timeout
        self._reactor = reactor
        self.done = None

    def startService(self):
        super().startService()
        semaphore = DeferredSemaphore(self._concurrency)
        self.done = DeferredList(
            [semaphore.run(lambda key=key: ensureDeferred(self._probe(key))) for key in self._pool.keys],
            consumeErrors=True,
        )

    def stopService(self):
        super().stopService()
        if self.done is not None and not self.done.called:
            self.done.cancel()

    async def _probe(self, key: Key) -> None:
        try:
            daily = await ensureDeferred(self._ask(key)).addTimeout(self._timeout, self._reactor)
            if daily is None:
                return
            used, limit = int(daily["used"]), int(daily["limit"])
        except Exception as e:
            self._log.warn(
                "probing key {key} failed ({error}); counting from what hermux knows",
                key=key.name,
                error=type(e).__name__,
            )
            return
        self._pool.seed(key.name, used=used, limit=limit)
        self._log.info(
            "key {key}: {used} of {limit} free-model requests used today",
            key=key.name,
            used=used,
            limit=limit,
        )

    async def _ask(self, key: Key) -> dict | None:
        """
        The upstream's C{free_model_daily_requests} for C{key}; L{None} if
        it answered otherwise, which is dealt with here.
        """
        response = await self._client.get(
            self._upstream.base + b"/api/v1/key",
            headers={b"Authorization": [b"Bearer " + key.token.encode("ascii")]},
            allow_redirects=False,
        )
        if response.code in (401, 403):
            await response.content()
            self._pool.report(
                key,
                Verdict(Kind.DISABLED, None, f"the upstream refused the key at start ({response.code})"),
            )
            return None
        if response.code != 200:
            await response.content()
            self._log.warn(
                "probing key {key}: the upstream answered {status}; counting from what hermux knows",
                key=key.name,
                status=response.code,
            )
            return None
        return (await treq.json_content(response))["data"]["free_model_daily_requests"]
