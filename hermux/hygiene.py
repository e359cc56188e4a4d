# -*- test-case-name: tests.test_hygiene -*-
"""
What of a client's request may reach the upstream, and what of the upstream's
answer may reach the client.

Headers are filtered as an HTTP proxy must (RFC 9110 section 7.6.1): the
hop-by-hop ones stay on their own connection.  The client's credentials and
cookies never go upstream; the upstream's cookies never reach a client.
"""

from __future__ import annotations

__all__ = [
    "BadTarget",
    "DECODABLE_CODINGS",
    "originForm",
    "upstreamAcceptEncoding",
    "upstreamHeaders",
    "copyResponseHeaders",
    "upstreamTarget",
]

import re
from urllib.parse import unquote_to_bytes

from twisted.web.http_headers import Headers

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Content-Length and Expect are about the client's connection too: the body
# is already buffered, and the upstream request states its own length.
# Accept-Encoding is hermux's own choice (upstreamAcceptEncoding).
_CLIENT_ONLY = frozenset(
    {b"host", b"authorization", b"cookie", b"content-length", b"expect", b"accept-encoding"}
)
_UPSTREAM_ONLY = frozenset({b"set-cookie"})

# RFC 9112 section 3.2.2: a request target in absolute form, as a client
# talking to a proxy sends it.  The scheme is case-insensitive.
_ABSOLUTE_FORM = re.compile(rb"[hH][tT][tT][pP][sS]?://[^/?#]*")
_UNSAFE_TARGET_BYTE = re.compile(rb"[^\x21-\x7e]|#")
_UNSAFE_SEGMENT_BYTE = re.compile(rb"[\x00-\x20\x7f/\\]")


class BadTarget(ValueError):
    """
    A request target that hermux will not forward; C{str()} says why.
    """


def _connectionOptions(headers: Headers) -> frozenset[bytes]:
    """
    The header names that the C{Connection} header declares hop-by-hop.
    """
    values = headers.getRawHeaders(b"connection") or ()
    return frozenset(
        token.strip().lower() for value in values for token in value.split(b",")
    )


def _passing(headers: Headers, dropped: frozenset[bytes]):
    named = _connectionOptions(headers)
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if (
            lower in dropped
            or lower in HOP_BY_HOP
            or lower.startswith(b"proxy-")
            or lower in named
        ):
            continue
        yield name, values


def upstreamHeaders(clientHeaders: Headers, keyToken: bytes) -> Headers:
    """
    The headers to send upstream for a client's request: the client's
    end-to-end headers, less its credentials and cookies, with the upstream
    key as the only credential, and asking only for content codings hermux
    can read (L{upstreamAcceptEncoding}).
    """
    headers = Headers()
    for name, values in _passing(clientHeaders, _CLIENT_ONLY):
        headers.setRawHeaders(name, values)
    headers.setRawHeaders(b"Authorization", [b"Bearer " + keyToken])
    headers.setRawHeaders(
        b"Accept-Encoding", [upstreamAcceptEncoding(clientHeaders.getRawHeaders(b"accept-encoding"))]
    )
    return headers


def copyResponseHeaders(upstream: Headers, client: Headers) -> None:
    """
    Copy the upstream's end-to-end response headers onto the client's
    response, replacing any default of the same name.
    """
    for name, values in _passing(upstream, _UPSTREAM_ONLY):
        client.setRawHeaders(name, values)


def originForm(target: bytes) -> bytes:
    """
    A request target in origin form: an absolute-form C{target}
    (C{http://any.host/api/v1/...?q}) without its scheme and authority, so
    that it is routed by its path and query alone, like the origin form;
    its host, like the C{Host} header, never decides where a request goes.
    Any other target is returned as it is.
    """
    match = _ABSOLUTE_FORM.match(target)
    if match is None:
        return target
    rest = target[match.end():]
    if not rest.startswith(b"/"):
        rest = b"/" + rest
    return rest


def upstreamTarget(prefix: bytes, uri: bytes) -> bytes:
    """
    The request target to send upstream for a client's target C{uri}, which
    the resource tree routed to a forwarding resource that adds C{prefix}
    (C{b""} for C{/api/...}, C{b"/api"} for the C{/v1/...} alias).

    The target is relayed byte for byte, query string included, but only if
    it stays below the path it was routed to: no dot segments and no encoded
    slashes, backslashes, control characters or empty segments that an
    upstream might read differently.

    @raise BadTarget: if it does not.
    """
    if not uri.startswith(b"/"):
        # Twisted routes "@host/api/..." like "/api/...": drop it, or the
        # upstream URL would read "https://openrouter.ai@host/api/...".
        raise BadTarget("the request target must be a path starting with '/'")
    if _UNSAFE_TARGET_BYTE.search(uri):
        raise BadTarget(
            "the request target contains spaces, control or non-ASCII characters"
        )
    path = uri.partition(b"?")[0]
    segments = path.split(b"/")[1:]
    for position, segment in enumerate(segments, start=1):
        if not segment:
            if position == len(segments):
                continue
            raise BadTarget("the path contains an empty segment ('//')")
        decoded = unquote_to_bytes(segment)
        if decoded in (b".", b".."):
            raise BadTarget("the path contains a '.' or '..' segment")
        if _UNSAFE_SEGMENT_BYTE.search(decoded):
            raise BadTarget(
                "the path contains an encoded slash, backslash or control character"
            )
    return prefix + uri


# hermux asks the upstream only for codings it can read on the side with the
# standard library: zlib decodes gzip and deflate, in bounded steps, as the
# answer passes.  br and zstd would need libraries outside the standard one,
# and an answer in them could not be read: its usage would go uncounted.
# The client still gets the answer as the upstream encoded it.  (The names
# of each coding, as hermux.usage decodes them.)
DECODABLE_CODINGS = {b"gzip": b"gzip", b"x-gzip": b"gzip", b"deflate": b"deflate"}


def _quality(params: list[bytes]) -> float:
    """
    The q value among an Accept-Encoding entry's parameters (1 if none);
    0 if it is not a number from 0 to 1.
    """
    for param in params:
        name, _, value = param.partition(b"=")
        if name.strip().lower() == b"q":
            try:
                q = float(value.strip())
            except ValueError:
                return 0.0
            return q if 0 < q <= 1 else 0.0
    return 1.0


_chosenEncodings: dict[tuple[bytes, ...], bytes] = {}


def upstreamAcceptEncoding(clientValues: list[bytes] | None) -> bytes:
    """
    What hermux asks the upstream for, given the client's Accept-Encoding
    values (see L{_chooseEncoding}); remembered for the few distinct values
    clients send, at most 256 of them.
    """
    if not clientValues:
        return b"identity"
    values = tuple(clientValues)
    chosen = _chosenEncodings.get(values)
    if chosen is None:
        chosen = _chooseEncoding(clientValues)
        if sum(map(len, values)) <= 128:
            if len(_chosenEncodings) >= 256:
                _chosenEncodings.clear()
            _chosenEncodings[values] = chosen
    return chosen


def _chooseEncoding(clientValues: list[bytes] | None) -> bytes:
    """
    The Accept-Encoding hermux sends upstream, given the client's
    C{clientValues} (L{None} if it sent none): the codings the client
    accepts (q > 0, named or by C{*}) among gzip and deflate, in the
    client's order, or C{b"identity"}.
    """
    accepted: dict[bytes, bool] = {}  # coding -> accepted, in the client's order
    star = None
    for value in clientValues or ():
        for entry in value.split(b","):
            name, *params = entry.split(b";")
            name = name.strip().lower()
            q = _quality(params)
            if name == b"*":
                if star is None:
                    star = q > 0
            elif name in DECODABLE_CODINGS:
                accepted.setdefault(DECODABLE_CODINGS[name], q > 0)
    if star:
        for coding in (b"gzip", b"deflate"):
            accepted.setdefault(coding, True)
    chosen = [coding for coding, yes in accepted.items() if yes]
    return b", ".join(chosen) if chosen else b"identity"
