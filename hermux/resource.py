"""
hermux's resource tree, which authenticates and routes each request.

    /api/...      forwarded upstream as is
    /v1/...       forwarded as /api/v1/...
    /hermux/...   hermux's own: health
    anything else 404
"""

from __future__ import annotations

import json

from twisted.web import server
from twisted.web.resource import Resource

from hermux.access import AccessList
from hermux.errors import ErrorResource, renderError
from hermux.hygiene import BadTarget, upstreamTarget
from hermux.keypool import KeyPool
from hermux.relay import Relay

_NOT_FOUND = ErrorResource(
    404, "not found; hermux serves /api/..., /v1/... and /hermux/health"
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


class Forward(Resource):
    """
    Forwards authorized requests upstream with a key from the pool.

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
        client = self._access.authorize(request.getHeader(b"authorization"))
        if client is None:
            request.setHeader(b"WWW-Authenticate", b"Bearer")
            return renderError(request, 401, "missing or unknown access token")
        request.clientLabel = client.label
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


def buildRoot(pool: KeyPool, access: AccessList, relay: Relay) -> Resource:
    """
    The resource tree of a hermux server.
    """
    root = _Directory()
    root.putChild(b"api", Forward(b"", pool, access, relay))
    root.putChild(b"v1", Forward(b"/api", pool, access, relay))
    own = _Directory()
    own.putChild(b"health", Health(pool))
    root.putChild(b"hermux", own)
    return root
