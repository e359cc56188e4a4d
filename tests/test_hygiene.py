"""
Tests for L{hermux.hygiene}: the headers and request target that pass
between client and upstream.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from hypothesis import example, given, settings
from hypothesis import strategies as st

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from hermux.hygiene import (
    BadTarget,
    copyResponseHeaders,
    upstreamHeaders,
    upstreamTarget,
)

KEY = b"sk-or-v1-UPSTREAM-KEY-6d2f0a"
CLIENT_SECRET = b"hx-CLIENT-SECRET-91be4c"


def allBytes(headers: Headers) -> bytes:
    """
    Every header name and value in C{headers}, as one byte string to search.
    """
    return b"\n".join(
        name + b": " + value
        for name, values in headers.getAllRawHeaders()
        for value in values
    )


# The headers hermux itself sets upstream.
HERMUX_ADDS = {b"authorization", b"accept-encoding"}


def lowerNames(headers: Headers) -> set[bytes]:
    return {name.lower() for name, _ in headers.getAllRawHeaders()}


class UpstreamHeadersTests(SynchronousTestCase):
    """
    Tests for L{upstreamHeaders}.
    """

    def test_addsKey(self):
        """
        The result has exactly one C{Authorization} header, which carries the
        upstream key as a bearer token.
        """
        headers = upstreamHeaders(Headers(), KEY)
        self.assertEqual(headers.getRawHeaders(b"authorization"), [b"Bearer " + KEY])

    def test_replacesClientAuthorization(self):
        """
        The client's C{Authorization} header is replaced by the key's, and
        the client's secret appears nowhere in the result.
        """
        client = Headers(
            {
                b"Authorization": [b"Bearer " + CLIENT_SECRET, CLIENT_SECRET],
                b"Content-Type": [b"application/json"],
            }
        )
        headers = upstreamHeaders(client, KEY)
        self.assertEqual(headers.getRawHeaders(b"authorization"), [b"Bearer " + KEY])
        self.assertNotIn(CLIENT_SECRET, allBytes(headers))

    def test_clientSecretInProxyAuthorizationDropped(self):
        """
        The client's secret sent as C{Proxy-Authorization} does not go
        upstream either.
        """
        client = Headers(
            {
                b"authorization": [b"bearer " + CLIENT_SECRET],
                b"proxy-authorization": [b"Bearer " + CLIENT_SECRET],
            }
        )
        self.assertNotIn(CLIENT_SECRET, allBytes(upstreamHeaders(client, KEY)))

    def test_keepsEndToEnd(self):
        """
        End-to-end headers pass unchanged, several values in their order.
        """
        passing = {
            b"Content-Type": [b"application/json"],
            b"HTTP-Referer": [b"https://example.com/app"],
            b"X-Title": [b"My App"],
            b"Accept": [b"text/event-stream", b"application/json"],
            b"User-Agent": [b"OpenAI/Python 1.30.0"],
            b"X-Custom": [b"one", b"two", b"three"],
        }
        headers = upstreamHeaders(Headers(passing), KEY)
        for name, values in passing.items():
            self.assertEqual(headers.getRawHeaders(name), values, name)

    def test_acceptEncodingIsHermuxsChoice(self):
        """
        Accept-Encoding upstream names only the codings hermux can read on
        the side that the client accepts, else identity (see
        L{hermux.hygiene.upstreamAcceptEncoding}).
        """
        for client, upstream in [
            ([b"gzip, br"], [b"gzip"]),
            ([b"br, zstd"], [b"identity"]),
            (None, [b"identity"]),
        ]:
            headers = Headers({} if client is None else {b"Accept-Encoding": client})
            self.assertEqual(upstreamHeaders(headers, KEY).getRawHeaders(b"accept-encoding"), upstream)

    def test_dropsHopByHop(self):
        """
        The hop-by-hop headers of RFC 9110 stay on the client's connection.
        """
        hopByHop = [
            b"Connection",
            b"Keep-Alive",
            b"Proxy-Connection",
            b"TE",
            b"Trailer",
            b"Transfer-Encoding",
            b"Upgrade",
        ]
        client = Headers({name: [b"x"] for name in hopByHop})
        client.setRawHeaders(b"Content-Type", [b"application/json"])
        headers = upstreamHeaders(client, KEY)
        self.assertEqual(lowerNames(headers), {b"content-type"} | HERMUX_ADDS)

    def test_dropsAnyProxyHeader(self):
        """
        Every header whose name starts with C{Proxy-}, in any case, is
        dropped.
        """
        client = Headers(
            {
                b"Proxy-Authorization": [b"Basic abc"],
                b"proxy-foo": [b"bar"],
                b"PROXY-Bar": [b"baz"],
                b"Proxy-Connection": [b"keep-alive"],
            }
        )
        self.assertEqual(lowerNames(upstreamHeaders(client, KEY)), HERMUX_ADDS)

    def test_dropsConnectionNamed(self):
        """
        Headers that the C{Connection} header names, in any case and spacing,
        are hop-by-hop and dropped.
        """
        client = Headers(
            {
                b"Connection": [b"close,  X-Hop-One ", b"x-hop-two"],
                b"X-Hop-One": [b"1"],
                b"X-HOP-TWO": [b"2"],
                b"X-Kept": [b"3"],
            }
        )
        headers = upstreamHeaders(client, KEY)
        self.assertEqual(lowerNames(headers), {b"x-kept"} | HERMUX_ADDS)

    def test_dropsClientOnly(self):
        """
        C{Host}, C{Cookie}, C{Content-Length} and C{Expect} are about the
        client's connection to hermux and do not go upstream.
        """
        client = Headers(
            {
                b"Host": [b"hermux.local:8080"],
                b"Cookie": [b"session=" + CLIENT_SECRET],
                b"Content-Length": [b"42"],
                b"Expect": [b"100-continue"],
                b"Accept": [b"*/*"],
            }
        )
        headers = upstreamHeaders(client, KEY)
        self.assertEqual(lowerNames(headers), {b"accept"} | HERMUX_ADDS)
        self.assertNotIn(CLIENT_SECRET, allBytes(headers))

    def test_connectionCannotDropKey(self):
        """
        A client's C{Connection: Authorization} does not remove the upstream
        key from the result.
        """
        client = Headers({b"Connection": [b"Authorization"]})
        headers = upstreamHeaders(client, KEY)
        self.assertEqual(headers.getRawHeaders(b"authorization"), [b"Bearer " + KEY])

    def test_clientHeadersUnchanged(self):
        """
        The client's headers are not changed.
        """
        client = Headers(
            {b"Authorization": [b"Bearer " + CLIENT_SECRET], b"Connection": [b"close"]}
        )
        upstreamHeaders(client, KEY)
        self.assertEqual(
            client.getRawHeaders(b"authorization"), [b"Bearer " + CLIENT_SECRET]
        )
        self.assertEqual(client.getRawHeaders(b"connection"), [b"close"])


class CopyResponseHeadersTests(SynchronousTestCase):
    """
    Tests for L{copyResponseHeaders}.
    """

    def test_copiesEndToEnd(self):
        """
        End-to-end response headers are copied, several values in order.
        """
        copied = {
            b"Content-Type": [b"text/event-stream"],
            b"Content-Length": [b"1234"],
            b"Content-Encoding": [b"gzip"],
            b"Cache-Control": [b"no-cache"],
            b"X-Request-Id": [b"req-1"],
            b"Vary": [b"Accept", b"Origin"],
        }
        client = Headers()
        copyResponseHeaders(Headers(copied), client)
        for name, values in copied.items():
            self.assertEqual(client.getRawHeaders(name), values, name)

    def test_dropsHopByHop(self):
        """
        Hop-by-hop response headers stay on the upstream connection.
        """
        upstream = Headers(
            {
                b"Connection": [b"keep-alive"],
                b"Keep-Alive": [b"timeout=5"],
                b"Transfer-Encoding": [b"chunked"],
                b"Trailer": [b"X-Checksum"],
                b"Upgrade": [b"h2c"],
                b"TE": [b"trailers"],
                b"Proxy-Authenticate": [b"Basic"],
                b"Proxy-Connection": [b"close"],
                b"Content-Type": [b"application/json"],
            }
        )
        client = Headers()
        copyResponseHeaders(upstream, client)
        self.assertEqual(lowerNames(client), {b"content-type"})

    def test_dropsConnectionNamed(self):
        """
        Response headers the upstream's C{Connection} header names are not
        copied.
        """
        upstream = Headers(
            {
                b"Connection": [b"X-Upstream-Hop, close"],
                b"X-Upstream-Hop": [b"1"],
                b"X-Kept": [b"2"],
            }
        )
        client = Headers()
        copyResponseHeaders(upstream, client)
        self.assertEqual(lowerNames(client), {b"x-kept"})

    def test_dropsSetCookie(self):
        """
        The upstream's cookies never reach a client.
        """
        upstream = Headers(
            {
                b"Set-Cookie": [b"__cf_bm=abc; Path=/", b"other=1"],
                b"Content-Type": [b"application/json"],
            }
        )
        client = Headers()
        copyResponseHeaders(upstream, client)
        self.assertEqual(lowerNames(client), {b"content-type"})

    def test_replacesClientValue(self):
        """
        A header the client's response already has (a default such as
        C{Content-Type}) is replaced by the upstream's value, not added to.
        """
        client = Headers(
            {b"Content-Type": [b"text/html"], b"Server": [b"TwistedWeb"]}
        )
        upstream = Headers({b"content-type": [b"application/json"]})
        copyResponseHeaders(upstream, client)
        self.assertEqual(client.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(client.getRawHeaders(b"server"), [b"TwistedWeb"])


def assertTarget(testCase, prefix: bytes, target: bytes) -> None:
    """
    Assert that C{target} is a request target hermux may send upstream: it
    starts with C{prefix + b"/"}, has only visible ASCII bytes and no
    fragment, and its path has no dot segment, no encoded slash, backslash
    or control character and no empty segment except a final one.
    """
    testCase.assertTrue(target.startswith(prefix + b"/"), target)
    testCase.assertTrue(all(0x21 <= byte <= 0x7E for byte in target), target)
    testCase.assertNotIn(b"#", target)
    path = target[len(prefix) :].partition(b"?")[0]
    segments = path.split(b"/")[1:]
    for position, segment in enumerate(segments, start=1):
        decoded = unquote_to_bytes(segment)
        testCase.assertNotIn(decoded, (b".", b".."), target)
        if position < len(segments):
            testCase.assertNotEqual(segment, b"", target)
        testCase.assertFalse(
            any(byte < 0x21 or byte in b"/\\\x7f" for byte in decoded), target
        )


class UpstreamTargetTests(SynchronousTestCase):
    """
    Tests for L{upstreamTarget}.
    """

    def assertBad(self, uri: bytes, prefix: bytes = b"") -> None:
        self.assertRaises(BadTarget, upstreamTarget, prefix, uri)

    def test_apiPathUnchanged(self):
        """
        An C{/api/...} target goes upstream unchanged.
        """
        self.assertEqual(
            upstreamTarget(b"", b"/api/v1/chat/completions"),
            b"/api/v1/chat/completions",
        )

    def test_v1Alias(self):
        """
        With the C{/api} prefix, C{/v1/models} goes upstream as
        C{/api/v1/models}.
        """
        self.assertEqual(upstreamTarget(b"/api", b"/v1/models"), b"/api/v1/models")

    def test_queryByteForByte(self):
        """
        The query string passes byte for byte, percent-encodings, slashes
        and dots included.
        """
        uri = b"/api/v1/models?supported_parameters=tools&q=%2F..%2e/a%20b&&x=%41"
        self.assertEqual(upstreamTarget(b"", uri), uri)
        self.assertEqual(
            upstreamTarget(b"/api", b"/v1/models?a=1&b=%7e"),
            b"/api/v1/models?a=1&b=%7e",
        )

    def test_trailingSlash(self):
        """
        A trailing slash is kept and is no error.
        """
        self.assertEqual(upstreamTarget(b"", b"/api/v1/models/"), b"/api/v1/models/")
        self.assertEqual(
            upstreamTarget(b"/api", b"/v1/models/?x=1"), b"/api/v1/models/?x=1"
        )

    def test_harmlessEncodingsPass(self):
        """
        Percent-encodings of ordinary characters pass unchanged.
        """
        uri = b"/api/v1/generation%3Fid/caf%C3%A9/%41"
        self.assertEqual(upstreamTarget(b"", uri), uri)

    def test_space(self):
        """
        A raw space is refused.
        """
        self.assertBad(b"/api/v1/chat completions")
        self.assertBad(b"/v1/models?q=a b", b"/api")

    def test_tab(self):
        """
        A raw tab is refused.
        """
        self.assertBad(b"/api/v1/\tmodels")

    def test_carriageReturnAndLineFeed(self):
        """
        Raw CR and LF, which could split the upstream request, are refused.
        """
        for uri in (
            b"/api/v1/models\r\nX-Injected: 1",
            b"/api/v1/models\r",
            b"/api/v1/models\n",
            b"/api/v1/models?a=\r\n",
        ):
            self.assertRaises(BadTarget, upstreamTarget, b"", uri)

    def test_nul(self):
        """
        A raw NUL is refused.
        """
        self.assertBad(b"/api/v1/mod\x00els")

    def test_delete(self):
        """
        A raw DEL is refused.
        """
        self.assertBad(b"/api/v1/models\x7f")

    def test_otherControlCharacters(self):
        """
        Every control byte is refused, in the path or the query.
        """
        for byte in list(range(0x00, 0x20)) + [0x7F]:
            uri = b"/api/v1/models?x=" + bytes([byte])
            self.assertRaises(BadTarget, upstreamTarget, b"", uri)

    def test_nonASCII(self):
        """
        Bytes above 0x7f (raw UTF-8, say) are refused.
        """
        self.assertBad(b"/api/v1/caf\xc3\xa9")
        self.assertBad(b"/api/v1/models?q=\xff")
        self.assertBad(b"/api/v1/\x80")

    def test_fragment(self):
        """
        A C{#} (a fragment has no place in a request target) is refused.
        """
        self.assertBad(b"/api/v1/models#frag")
        self.assertBad(b"/api/v1/models?a=1#frag")

    def test_dotSegments(self):
        """
        C{.} and C{..} segments, anywhere in the path, are refused.
        """
        for uri in (
            b"/api/../admin",
            b"/api/v1/..",
            b"/api/v1/../",
            b"/api/./v1/models",
            b"/api/v1/.",
            b"/../api",
            b"/./api",
        ):
            self.assertRaises(BadTarget, upstreamTarget, b"", uri)
        self.assertBad(b"/v1/../../internal", b"/api")

    def test_encodedDotSegments(self):
        """
        Dot segments written with percent-encodings, in either case or
        mixed with a plain dot, are refused.
        """
        encodings = (b"%2e", b"%2E", b"%2e%2e", b"%2E%2e", b"%2e%2E", b".%2e", b"%2E.")
        for segment in encodings:
            uri = b"/api/v1/" + segment + b"/models"
            self.assertRaises(BadTarget, upstreamTarget, b"", uri)
            self.assertRaises(BadTarget, upstreamTarget, b"/api", b"/v1/" + segment)

    def test_dotsInsideSegmentsPass(self):
        """
        Dots that are part of a longer segment are no dot segments.
        """
        for uri in (
            b"/api/v1/a.b",
            b"/api/v1/...",
            b"/api/v1/.well-known",
            b"/api/v1/x..",
        ):
            self.assertEqual(upstreamTarget(b"", uri), uri)

    def test_encodedSlash(self):
        """
        An encoded slash, which an upstream might decode into another path,
        is refused in either case.
        """
        self.assertBad(b"/api/v1/models%2f..%2fadmin")
        self.assertBad(b"/api/v1/models%2F")
        self.assertBad(b"/v1/a%2Fb", b"/api")

    def test_encodedBackslash(self):
        """
        An encoded backslash is refused in either case.
        """
        self.assertBad(b"/api/v1/%5c..%5cadmin")
        self.assertBad(b"/api/v1/%5Cx")

    def test_rawBackslash(self):
        """
        A raw backslash is refused.
        """
        self.assertBad(b"/api/v1\\..\\admin")
        self.assertBad(b"/api/v1/a\\b")

    def test_encodedControlCharacters(self):
        """
        Encoded control characters are refused in the path.
        """
        for encoded in (b"%00", b"%0d", b"%0D", b"%0a", b"%0A", b"%09", b"%7f", b"%1b"):
            uri = b"/api/v1/models" + encoded
            self.assertRaises(BadTarget, upstreamTarget, b"", uri)

    def test_emptySegment(self):
        """
        An empty segment (C{//}) in the middle of the path is refused.
        """
        self.assertBad(b"/api//v1/models")
        self.assertBad(b"/api/v1//models")
        self.assertBad(b"//api/v1/models")
        self.assertBad(b"/v1//models", b"/api")
        self.assertBad(b"/api/v1/models//")

    def test_noLeadingSlash(self):
        """
        A target that does not start with C{/} (Twisted routes by the path
        after its first byte whatever that byte is) is refused: appended to
        the upstream's base URL it would change the host, as C{@api/...}
        would turn C{https://openrouter.ai} into a user name.
        """
        for uri in (
            b"@api/v1/models",
            b"xapi/v1/models",
            b"api/v1/models",
            b"",
            b"?a=1",
            b"..",
            b"*",
        ):
            self.assertRaises(BadTarget, upstreamTarget, b"", uri)
        self.assertBad(b"@v1/models", b"/api")

    def test_badTargetIsValueError(self):
        """
        L{BadTarget} is a L{ValueError} whose message says what is wrong.
        """
        error = self.assertRaises(BadTarget, upstreamTarget, b"", b"/api/../x")
        self.assertIsInstance(error, ValueError)
        self.assertTrue(str(error))


_SEGMENT = (
    st.text(
        alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~",
        min_size=1,
        max_size=12,
    )
    .filter(lambda s: s not in (".", ".."))
    .map(lambda s: s.encode("ascii"))
)
_QUERY = st.binary().map(
    lambda b: bytes(byte for byte in b if 0x21 <= byte <= 0x7E and byte != ord("#"))
)
_PREFIX = st.sampled_from([b"", b"/api"])
_PIECES = st.sampled_from(
    [
        b"/",
        b"/",
        b"v1",
        b"api",
        b".",
        b"..",
        b"%2e",
        b"%2E",
        b"%2f",
        b"%5c",
        b"\\",
        b"%00",
        b"%0a",
        b"%",
        b"?",
        b"#",
        b"@",
        b" ",
        b"\x7f",
        b"\xc3\xa9",
    ]
)
_TRICKY = st.one_of(
    st.binary(max_size=40),
    st.binary(max_size=40).map(lambda b: b"/" + b),
    st.lists(_PIECES, max_size=12).map(b"".join),
)


class UpstreamTargetPropertyTests(SynchronousTestCase):
    """
    Properties of L{upstreamTarget} over generated targets.
    """

    @settings(database=None)
    @given(
        prefix=_PREFIX,
        segments=st.lists(_SEGMENT, min_size=1, max_size=6),
        trailingSlash=st.booleans(),
        query=st.none() | _QUERY,
    )
    def test_ordinaryTargetsPass(self, prefix, segments, trailingSlash, query):
        """
        Any path of ordinary segments, with or without a trailing slash and a
        query, is forwarded as the prefix followed by the client's target,
        byte for byte.
        """
        uri = b"/" + b"/".join(segments) + (b"/" if trailingSlash else b"")
        if query is not None:
            uri += b"?" + query
        target = upstreamTarget(prefix, uri)
        self.assertEqual(target, prefix + uri)
        assertTarget(self, prefix, target)

    @settings(database=None, max_examples=500)
    @given(prefix=_PREFIX, uri=_TRICKY)
    @example(prefix=b"", uri=b"/api/v1/models")
    @example(prefix=b"", uri=b"@api/v1/models")
    def test_anyBytes(self, prefix, uri):
        """
        For any bytes, L{upstreamTarget} either raises L{BadTarget} or
        returns the prefix followed by the target, which stays below the
        prefix and holds only visible ASCII.
        """
        try:
            target = upstreamTarget(prefix, uri)
        except BadTarget:
            return
        self.assertEqual(target, prefix + uri)
        assertTarget(self, prefix, target)
