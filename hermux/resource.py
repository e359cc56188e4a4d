"""
hermux's resource tree, which authenticates and routes each request.

    /api/...      forwarded upstream as is
    /v1/...       forwarded as /api/v1/...
    /hermux/...   hermux's own: health, keys, metrics
    anything else 404
"""

from __future__ import annotations

import json

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.web import server
from twisted.web.resource import Resource

from hermux.access import AccessList, Client
from hermux.errors import ErrorResource, renderError
from hermux.hygiene import BadTarget, upstreamTarget
from hermux.keypool import KeyPool, KeyStatus, isoTime
from hermux.ledger import ILedger
from hermux.metrics import Metrics
from hermux.relay import Relay

_NOT_FOUND = ErrorResource(
    404, "not found; hermux serves /api/..., /v1/..., /hermux/health and /hermux/keys"
)


class _Directory(Resource):
    """
    A resource with named children that answers anything else with a JSON
    404.
    """

    def getChild(self, path, request):
        return _NOT_FOUND

    def render(self, request):
        return _NOT_FOUND.render(request)


def authorized(request, access: AccessList) -> Client | None:
    """
    The client a request comes from, or L{None} after setting the request
    up for a 401 answer.
    """
    client = access.authorize(request.getHeader(b"authorization"))
    if client is None:
        request.setHeader(b"WWW-Authenticate", b"Bearer")
    else:
        request.clientLabel = client.label
    return client


_UNAUTHORIZED = "missing or unknown access token"


class Forward(Resource):
    """
    Forwards authorized requests upstream.

    @ivar prefix: what to put before the client's request target to make the
        upstream's (C{b"/api"} for the C{/v1} alias).
    """

    isLeaf = True

    def __init__(self, prefix: bytes, pool: KeyPool, access: AccessList, relay: Relay):
        super().__init__()
        self.prefix = prefix
        self._pool = pool
        self._access = access
        self._relay = relay

    def render(self, request):
        client = authorized(request, self._access)
        if client is None:
            return renderError(request, 401, _UNAUTHORIZED)
        try:
            target = upstreamTarget(self.prefix, request.uri)
        except BadTarget as e:
            return renderError(request, 400, str(e))
        self._pool.countClient(client.label)
        self._relay.forward(request, target)
        return server.NOT_DONE_YET


def _json(request, payload) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(payload).encode("utf-8")


def _readOnly(render):
    """
    Answer only GET and HEAD, with a JSON error for anything else or for a
    path below the resource.
    """

    def guarded(self, request):
        if request.postpath:
            return _NOT_FOUND.render(request)
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return renderError(request, 405, "use GET")
        return render(self, request)

    return guarded


class Keys(Resource):
    """
    C{/hermux/keys}: each key's state and today's counts, for clients with
    an access token.  Never a key's token.
    """

    isLeaf = True

    def __init__(self, pool: KeyPool, access: AccessList):
        super().__init__()
        self._pool = pool
        self._access = access

    @_readOnly
    def render(self, request):
        if authorized(request, self._access) is None:
            return renderError(request, 401, _UNAUTHORIZED)
        return _json(request, {"keys": [_describe(status) for status in self._pool.statuses()]})


def _describe(status: KeyStatus) -> dict:
    return {
        "name": status.name,
        "state": status.state.value,
        "requests_today": status.requestsToday,
        "daily_limit": status.dailyLimit,
        "rate_limited_today": status.rateLimitedToday,
        "errors_today": status.errorsToday,
        "usable_again_at": None if status.usableAt is None else isoTime(status.usableAt),
        "reason": status.reason,
    }


class MetricsPage(Resource):
    """
    C{/hermux/metrics}: the Prometheus exposition, for clients with an
    access token (a scrape config's C{authorization: credentials:}).
    """

    isLeaf = True

    def __init__(self, metrics: Metrics, access: AccessList):
        super().__init__()
        self._metrics = metrics
        self._access = access

    @_readOnly
    def render(self, request):
        if authorized(request, self._access) is None:
            return renderError(request, 401, _UNAUTHORIZED)
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return generate_latest(self._metrics.registry)


class Health(Resource):
    """
    C{/hermux/health}: whether hermux is up, for anyone to ask.  It says
    "degraded" (still with 200: hermux still proxies) while usage counts
    cannot be written.
    """

    isLeaf = True

    def __init__(self, pool: KeyPool, ledger: ILedger | None = None):
        super().__init__()
        self._pool = pool
        self._ledger = ledger

    @_readOnly
    def render(self, request):
        health = {"status": "ok", "keys": len(self._pool.keys)}
        if self._ledger is not None and self._ledger.problem is not None:
            health.update(status="degraded", problem="usage counts cannot be written to the state file")
        return _json(request, health)


def buildRoot(
    pool: KeyPool,
    access: AccessList,
    relay: Relay,
    ledger: ILedger | None = None,
    metrics: Metrics | None = None,
) -> Resource:
    """
    The resource tree of a hermux server.
    """
    root = _Directory()
    root.putChild(b"api", Forward(b"", pool, access, relay))
    root.putChild(b"v1", Forward(b"/api", pool, access, relay))
    own = _Directory()
    own.putChild(b"health", Health(pool, ledger))
    own.putChild(b"keys", Keys(pool, access))
    if metrics is not None:
        own.putChild(b"metrics", MetricsPage(metrics, access))
    root.putChild(b"hermux", own)
    return root
