# -*- test-case-name: tests.test_probe,tests.test_failover -*-
"""
Asking the upstream about keys (C{GET /api/v1/key}, which is not a model
request and costs no quota), a few keys at a time, beside the requests:

  - with C{--probe-keys}, at start, about every key;
  - every C{--probe-interval} seconds, about each key disabled until a
    reload (by a 401 or 403), so that a key the upstream accepts again
    becomes ready again;
  - every hour, about every key, so that a count the upstream has higher
    than hermux's (the account was used elsewhere) is taken.

An answer seeds the pool with today's free-model requests used and the
daily limit; a refusal (401, 403) disables the key; a probe that fails
otherwise (network, 5xx, timeout) changes nothing.
"""

from __future__ import annotations

__all__ = ["DRIFT_INTERVAL", "KeyProbe"]

from http.cookiejar import CookieJar, DefaultCookiePolicy

import treq
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, DeferredList, DeferredSemaphore, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from treq.client import HTTPClient

from hermux.config import Key
from hermux.keypool import Kind, KeyPool, Verdict
from hermux.upstream import Upstream

# Seconds between two probes of every key for counts made elsewhere.
DRIFT_INTERVAL = 3600.0


def _forgetfulClient(upstream: Upstream) -> HTTPClient:
    """
    A treq client over the upstream's agent whose cookie jar keeps nothing.
    """
    return HTTPClient(upstream.agent, cookiejar=CookieJar(DefaultCookiePolicy(allowed_domains=[])))


class KeyProbe(Service):
    """
    Probes the keys of a L{KeyPool}: every key when started if C{atStart};
    then, unless C{interval} is 0, the keys disabled until a reload every
    C{interval} seconds and every key every C{driftInterval} seconds.  At
    most C{concurrency} probes are in flight at once, and a probe whose
    answer has not all arrived C{timeout} seconds after it was sent is
    given up.

    @ivar atStart: whether every key is probed at start (C{--probe-keys}).
    @ivar interval: C{--probe-interval}.
    @ivar done: fires when every probe made at start is over (for tests).
    """

    _log = Logger()

    def __init__(
        self,
        pool: KeyPool,
        upstream: Upstream,
        *,
        atStart: bool = True,
        interval: float = 0.0,
        driftInterval: float = DRIFT_INTERVAL,
        concurrency: int = 3,
        timeout: float = 30.0,
        reactor=None,
    ):
        if reactor is None:
            from twisted.internet import reactor
        self._pool = pool
        self._upstream = upstream
        self._client = _forgetfulClient(upstream)
        self.atStart = atStart
        self.interval = interval
        self._driftInterval = driftInterval
        self._semaphore = DeferredSemaphore(concurrency)
        self._timeout = timeout
        self._reactor = reactor
        self._loops: list[LoopingCall] = []
        self._sweeps: set = set()
        self.done = None

    def startService(self):
        super().startService()
        if self.atStart:
            self.done = self._sweep(self._pool.keys, verbose=True)
        if self.interval > 0:
            for period, sweep in (
                (self.interval, self._disabledSweep),
                (self._driftInterval, self._driftSweep),
            ):
                loop = LoopingCall(sweep)
                loop.clock = self._reactor
                loop.start(period, now=False).addErrback(
                    lambda f: self._log.failure("the key prober stopped", f)
                )
                self._loops.append(loop)

    def stopService(self):
        super().stopService()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        for sweep in list(self._sweeps):
            sweep.cancel()

    def _disabledSweep(self):
        return self._sweep(self._pool.disabledKeys(), verbose=False)

    def _driftSweep(self):
        return self._sweep(self._pool.keys, verbose=False)

    def _sweep(self, keys, *, verbose: bool):
        """
        Probe each of C{keys}, at most C{concurrency} at a time over all
        sweeps; the result fires when all are over, and never fails.
        """
        sweep = DeferredList(
            [
                self._semaphore.run(lambda key=key: ensureDeferred(self._probe(key, verbose)))
                for key in keys
            ],
            consumeErrors=True,
        )
        self._sweeps.add(sweep)
        sweep.addBoth(self._swept, sweep)
        return sweep

    def _swept(self, result, sweep) -> None:
        self._sweeps.discard(sweep)

    async def _probe(self, key: Key, verbose: bool) -> None:
        try:
            daily = await ensureDeferred(self._ask(key)).addTimeout(self._timeout, self._reactor)
            if daily is None:
                return
            used, limit = int(daily["used"]), int(daily["limit"])
        except CancelledError:
            return  # the service is stopping
        except Exception as e:
            self._log.warn(
                "probing key {key} failed ({error}); counting from what hermux knows",
                key=key.name,
                error=type(e).__name__,
            )
            return
        if key not in self._pool.keys:
            return  # removed or replaced by a reload meanwhile
        counted = self._pool.freeRequestCounts().get(key.name, 0)
        self._pool.seed(key.name, used=used, limit=limit)
        if verbose or used > counted:
            self._log.info(
                "key {key}: {used} of {limit} free-model requests used today"
                " (hermux had counted {counted})",
                key=key.name,
                used=used,
                limit=limit,
                counted=counted,
            )
        self._pool.reinstate(key, "the upstream accepts the key again (GET /api/v1/key: 200)")

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
            if key in self._pool.disabledKeys():
                self._log.debug(
                    "key {key} is still refused by the upstream ({status})",
                    key=key.name,
                    status=response.code,
                )
            else:
                self._pool.report(
                    key,
                    Verdict(
                        Kind.DISABLED,
                        None,
                        f"the upstream refused the key when probed ({response.code})",
                    ),
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
