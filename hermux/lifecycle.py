# -*- test-case-name: tests.test_operations -*-
"""
How hermux stops: on SIGTERM (twistd's normal stop) it stops accepting
connections, lets the requests in flight finish for up to the drain timeout,
aborts the rest, then stops everything else, the ledger last so that the
final counts are written, and exits with status 0.
"""

from __future__ import annotations

__all__ = ["HermuxService"]

import gc
import signal

from twisted.application.service import IService, MultiService
from twisted.internet.defer import DeferredList, ensureDeferred, maybeDeferred
from twisted.logger import Logger

from hermux.site import HermuxSite


class HermuxService(MultiService):
    """
    hermux's top service.  Its listeners (added with L{addListener}) stop
    first, then the site drains, then the other services stop one by one,
    last added first.
    """

    _log = Logger()

    def __init__(self, site: HermuxSite, *, drainTimeout: float = 30.0, reactor=None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.site = site
        self.drainTimeout = drainTimeout
        self._reactor = reactor
        self._listeners: list[IService] = []
        self._previousTermHandler = None

    def addListener(self, listener: IService) -> None:
        self._listeners.append(listener)
        listener.setServiceParent(self)

    def startService(self):
        super().startService()
        # What startup made lives as long as hermux: the cyclic garbage
        # collector need never look at it again.
        gc.freeze()
        # After the reactor's own signal handlers, which this one replaces.
        self._reactor.callWhenRunning(self._handleSIGTERM)

    def _handleSIGTERM(self):
        if self.running:
            self._previousTermHandler = signal.signal(signal.SIGTERM, self._terminate)

    def _terminate(self, signum, frame):
        # Like the reactor's own handler, except that twistd then exits with
        # status 0 rather than ending itself with SIGTERM again: a drained,
        # orderly stop is a success.
        self._reactor.callFromThread(self._log.info, "Received SIGTERM, draining and stopping.")
        self._reactor.callFromThread(self._reactor.stop)

    def stopService(self):
        if self._previousTermHandler is not None:
            signal.signal(signal.SIGTERM, self._previousTermHandler)
            self._previousTermHandler = None
        gc.unfreeze()
        return ensureDeferred(self._stop())

    async def _stop(self):
        self.running = False
        await DeferredList(
            [maybeDeferred(listener.stopService) for listener in self._listeners if listener.running],
            consumeErrors=True,
        )
        inFlight = self.site.requestsInFlight()
        if inFlight:
            self._log.info(
                "waiting up to {timeout}s for {count} requests in flight",
                timeout=self.drainTimeout,
                count=inFlight,
            )
        await self.site.drain(self.drainTimeout)
        for service in reversed(list(self)):
            if service.running:
                try:
                    await maybeDeferred(service.stopService)
                except Exception:
                    self._log.failure("stopping {service} failed", service=service.name or service)
