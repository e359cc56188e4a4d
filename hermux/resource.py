"""
hermux's resource tree, which authenticates and routes each request.

    /api/...      forwarded upstream as is
    /v1/...       forwarded as /api/v1/...
    /hermux/...   hermux's own: health
    anything else 404
"""

from __future__ import annotations

import json

from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from hermux.access import AccessList, AuthThrottle
from hermux.errors import ErrorResource, renderError
from hermux.hygiene import BadTarget, upstreamTarget
from hermux.keypool import KeyPool
from hermux.relay import Relay

_NOT_FOUND = ErrorResource(
    404, "not found; hermux serves /api/..., /v1/... and /hermux/health"
)

# The methods OpenRouter's API uses.  TRACE would echo the request, key
# included, back to the client from any upstream or middlebox that answers
# it; CONNECT and the rest have no use here.
FORWARDED_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS")


class _Directory(Resource):
    """
    A resource with named children that answers anything else with a JSON
    404.
    """

    def getChild(self, path, request):
        return _NOT_FOUND

    def render(self, request):
        return _NOT_FOUND.render(request)


class Forward(Resource):
    """
    Forwards authorized requests upstream with a key from the pool.

    @ivar prefix: what to put before the client's request target to make the
        upstream's (C{b"/api"} for the C{/v1} alias).
    """

    isLeaf = True
    _log = Logger()

    def __init__(
        self,
        prefix: bytes,
        pool: KeyPool,
        access: AccessList,
        relay: Relay,
        throttle: AuthThrottle | None = None,
    ):
        super().__init__()
        self.prefix = prefix
        self._pool = pool
        self._access = access
        self._relay = relay
        self._throttle = throttle

    def render(self, request):
        peer = request.getClientAddress()
        if self._throttle is not None:
            retryAfter = self._throttle.retryAfter(peer)
            if retryAfter is not None:
                request.setHeader(b"Retry-After", b"%d" % (retryAfter,))
                return renderError(
                    request, 429, "too many failed access tokens from this address; try again later"
                )
        authorization = request.requestHeaders.getRawHeaders(b"authorization", [])
        if len(authorization) > 1:
            return renderError(request, 400, "more than one Authorization header")
        client = self._access.authorize(authorization[0] if authorization else None)
        if client is None:
            if self._throttle is not None and self._throttle.failed(peer):
                self._log.warn(
                    "throttling {host}: {failures} failed access tokens within "
                    "{window:g} seconds",
                    host=getattr(peer, "host", "?"),
                    failures=self._throttle.failures,
                    window=self._throttle.window,
                )
            request.setHeader(b"WWW-Authenticate", b"Bearer")
            return renderError(request, 401, "missing or unknown access token")
        request.clientLabel = client.label
        if request.method not in FORWARDED_METHODS:
            request.setHeader(b"Allow", b", ".join(FORWARDED_METHODS))
            return renderError(request, 405, "hermux does not forward this method")
        try:
            target = upstreamTarget(self.prefix, request.uri)
        except BadTarget as e:
            return renderError(request, 400, str(e))
        key = self._pool.acquire()
        request.keyName = key.name
        self._relay.forward(request, target, key)
        return server.NOT_DONE_YET


class Health(Resource):
    """
    C{/hermux/health}: whether hermux is up, for anyone to ask.
    """

    isLeaf = True

    def __init__(self, pool: KeyPool):
        super().__init__()
        self._pool = pool

    def render(self, request):
        if request.postpath:
            return _NOT_FOUND.render(request)
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return renderError(request, 405, "use GET")
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps({"status": "ok", "keys": len(self._pool.keys)}).encode()


def buildRoot(
    pool: KeyPool, access: AccessList, relay: Relay, throttle: AuthThrottle | None = None
) -> Resource:
    """
    The resource tree of a hermux server.
    """
    root = _Directory()
    root.putChild(b"api", Forward(b"", pool, access, relay, throttle))
    root.putChild(b"v1", Forward(b"/api", pool, access, relay, throttle))
    own = _Directory()
    own.putChild(b"health", Health(pool))
    root.putChild(b"hermux", own)
    return root
