# -*- test-case-name: tests.test_dashboard,tests.test_browser -*-
"""
The dashboard: one page at C{/hermux/} and its script and style at
C{/hermux/static/<name>}, files of the package (C{hermux/dashboard/}) read
once when hermux starts.  They need no token; the page asks for one and
sends it to the JSON endpoints, which do.

Every response of the page and its files carries L{SECURITY_HEADERS}: no
inline script or style, nothing loaded from elsewhere, no framing.
"""

from __future__ import annotations

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "SECURITY_HEADERS",
    "STATIC_FILES",
    "StaticFile",
    "addSlash",
    "dashboardPage",
    "staticFiles",
]

import hashlib
from importlib.resources import files

import attr
from twisted.web.resource import Resource

from hermux.errors import ErrorResource, renderError

CONTENT_SECURITY_POLICY = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
SECURITY_HEADERS = (
    (b"Content-Security-Policy", CONTENT_SECURITY_POLICY),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"no-referrer"),
)

PAGE = "index.html"
# The files below /hermux/static/, and nothing else: a name is looked up
# here, never on disk.
STATIC_FILES = {
    "dashboard.js": b"text/javascript; charset=utf-8",
    "dashboard.css": b"text/css; charset=utf-8",
}
# The page always revalidates (a new hermux may ship a new one); its files
# are named by it and revalidated hourly by their ETag.
_PAGE_CACHING = b"no-cache"
_FILE_CACHING = b"public, max-age=3600"


@attr.frozen
class StaticFile:
    """
    One file of the dashboard, in memory, with its strong entity tag (the
    SHA-256 of its bytes, quoted).
    """

    body: bytes
    contentType: bytes
    cacheControl: bytes
    etag: bytes

    @classmethod
    def load(cls, name: str, contentType: bytes, cacheControl: bytes) -> StaticFile:
        body = files("hermux").joinpath("dashboard", name).read_bytes()
        return cls(body, contentType, cacheControl, b'"%s"' % (hashlib.sha256(body).hexdigest().encode(),))


def _matches(ifNoneMatch: bytes, etag: bytes) -> bool:
    """
    Whether an C{If-None-Match} header names C{etag} (weak comparison, as
    RFC 9110 asks for this header) or is C{*}.
    """
    for tag in ifNoneMatch.split(b","):
        tag = tag.strip()
        if tag == b"*" or tag.removeprefix(b"W/") == etag:
            return True
    return False


class _File(Resource):
    """
    A leaf serving one L{StaticFile}: 304 when the client's copy is current.
    """

    isLeaf = True

    def __init__(self, static: StaticFile):
        super().__init__()
        self._static = static

    def render(self, request):
        if request.postpath:
            return _NOT_FOUND.render(request)
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return renderError(request, 405, "use GET")
        static = self._static
        request.setHeader(b"Content-Type", static.contentType)
        request.setHeader(b"Cache-Control", static.cacheControl)
        request.setHeader(b"ETag", static.etag)
        if _matches(request.getHeader(b"if-none-match") or b"", static.etag):
            request.setResponseCode(304)
            return b""
        return static.body


_HTML = b"text/html; charset=utf-8"
_NOT_FOUND = ErrorResource(404, "not found; the dashboard is at /hermux/")


class _Directory(Resource):
    """
    The files of L{STATIC_FILES} by name; anything else is a JSON 404.
    """

    def __init__(self, children: dict[str, Resource]):
        super().__init__()
        for name, child in children.items():
            self.putChild(name.encode("ascii"), child)

    def getChild(self, path, request):
        return _NOT_FOUND

    def render(self, request):
        return _NOT_FOUND.render(request)


class _SecurityHeaders(Resource):
    """
    Adds L{SECURITY_HEADERS} to every response of the resource it wraps
    and of its children (as C{twisted.web.tap}'s C{_AddHeadersResource}).
    """

    def __init__(self, wrapped: Resource):
        super().__init__()
        self._wrapped = wrapped
        self.isLeaf = wrapped.isLeaf

    @staticmethod
    def _add(request) -> None:
        for name, value in SECURITY_HEADERS:
            request.setHeader(name, value)

    def getChildWithDefault(self, name, request):
        self._add(request)
        return self._wrapped.getChildWithDefault(name, request)

    def render(self, request):
        self._add(request)
        return self._wrapped.render(request)


def dashboardPage() -> Resource:
    """
    The page, for C{/hermux/}.
    """
    return _SecurityHeaders(_File(StaticFile.load(PAGE, _HTML, _PAGE_CACHING)))


def staticFiles() -> Resource:
    """
    The page's script and style, for C{/hermux/static/}.
    """
    return _SecurityHeaders(
        _Directory(
            {
                name: _File(StaticFile.load(name, contentType, _FILE_CACHING))
                for name, contentType in STATIC_FILES.items()
            }
        )
    )


def addSlash(request) -> bytes:
    """
    Send C{/hermux}, without its slash, to the page at C{/hermux/}.
    """
    request.setResponseCode(301)
    # Relative, so that it holds behind a proxy that serves hermux under a
    # prefix of its own.
    request.setHeader(b"Location", b"hermux/")
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return b"the dashboard is at /hermux/\n"
