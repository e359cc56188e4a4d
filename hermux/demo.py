# -*- test-case-name: tests.test_testing, tests.test_tap -*-
"""
Demo mode: hermux's fake OpenRouter served in-process on a private loopback
port, as the upstream, so that hermux can be tried without an account.
"""

from __future__ import annotations

__all__ = ["DemoUpstream"]

from collections.abc import Iterable

from twisted.application.service import Service
from twisted.logger import Logger
from twisted.web.server import Site

from hermux.testing import FakeOpenRouter
from hermux.upstream import Upstream


class _FakeOpenRouterSite(Site):
    """
    Twisted's site, without a log line per request: hermux logs each of the
    requests it relays to the fake already.
    """

    noisy = False

    def log(self, request):
        pass


class DemoUpstream(Service):
    """
    Serves a L{FakeOpenRouter} that accepts C{keys} on 127.0.0.1 and points
    C{upstream} at it.  Start it before the listening ports.
    """

    _log = Logger()

    def __init__(self, upstream: Upstream, keys: Iterable[str], *, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self._upstream = upstream
        self._reactor = reactor
        self.fake = FakeOpenRouter(keys, reactor=reactor, eventInterval=0.05)
        self._port = None

    def startService(self):
        super().startService()
        site = _FakeOpenRouterSite(self.fake, reactor=self._reactor)
        self._port = self._reactor.listenTCP(0, site, interface="127.0.0.1")
        port = self._port.getHost().port
        self._upstream.base = b"http://127.0.0.1:%d" % (port,)
        self._log.warn(
            "DEMO MODE: the upstream is hermux's fake OpenRouter on 127.0.0.1:{port}; "
            "every answer is fake and no request leaves this machine",
            port=port,
        )

    def stopService(self):
        super().stopService()
        return self._port.stopListening()
