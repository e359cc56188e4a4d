"""
The dashboard's resources without a browser: the page and its files, their
headers, entity tags and 304s, the list of files (nothing else is served),
the size budget, and that the page has no inline script or style.
"""

from __future__ import annotations

import hashlib
import json
import re
from html.parser import HTMLParser
from importlib.resources import files

import treq
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hermux.access import AccessList
from hermux.dashboard import CONTENT_SECURITY_POLICY, PAGE, STATIC_FILES
from hermux.keypool import KeyPool
from hermux.resource import buildRoot
from tests.test_resource import ACCESS_TOKEN, KEYS

ISSUE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
FILES = {
    "/hermux/": (PAGE, "text/html; charset=utf-8", "no-cache"),
    **{
        f"/hermux/static/{name}": (name, contentType.decode(), "public, max-age=3600")
        for name, contentType in STATIC_FILES.items()
    },
}


def packaged(name: str) -> bytes:
    return files("hermux").joinpath("dashboard", name).read_bytes()


class DashboardTestCase(SynchronousTestCase):
    def setUp(self):
        clock = Clock()
        pool = KeyPool(KEYS, reactor=clock)
        self.stub = StubTreq(buildRoot(pool, AccessList([ACCESS_TOKEN]), relay=None, reactor=clock))

    def respond(self, method, path, headers=None):
        response = self.successResultOf(
            self.stub.request(
                method, "http://hermux.test" + path, headers=headers or {}, allow_redirects=False
            )
        )
        response.body = self.successResultOf(treq.content(response))
        return response

    def header(self, response, name):
        [value] = response.headers.getRawHeaders(name)
        return value

    def assertSecure(self, response):
        self.assertEqual(self.header(response, "Content-Security-Policy"), ISSUE_POLICY)
        self.assertEqual(self.header(response, "X-Content-Type-Options"), "nosniff")
        self.assertEqual(self.header(response, "Referrer-Policy"), "no-referrer")


class ServingTests(DashboardTestCase):
    def test_policy(self):
        """
        The policy is the issue's, word for word.
        """
        self.assertEqual(CONTENT_SECURITY_POLICY.decode(), ISSUE_POLICY)

    def test_files(self):
        """
        The page and each of its files is served without a token, as the
        package has it, with its type and charset, its caching, a strong
        ETag (the SHA-256 of its bytes) and the security headers.
        """
        for path, (name, contentType, caching) in FILES.items():
            for headers in ({}, {"Authorization": "Bearer not-a-token"}):
                response = self.respond("GET", path, headers)
                self.assertEqual(response.code, 200, path)
                self.assertEqual(response.body, packaged(name))
                self.assertEqual(self.header(response, "Content-Type"), contentType)
                self.assertEqual(self.header(response, "Cache-Control"), caching)
                self.assertEqual(
                    self.header(response, "ETag"), '"%s"' % hashlib.sha256(packaged(name)).hexdigest()
                )
                self.assertSecure(response)

    def test_head(self):
        """
        HEAD answers GET's headers without a body.
        """
        for path in FILES:
            response = self.respond("HEAD", path)
            self.assertEqual((response.code, response.body), (200, b""))
            self.assertSecure(response)

    def test_notModified(self):
        """
        A client whose copy is current (If-None-Match names its ETag, weakly
        or in a list, or is *) gets 304 without a body, with the ETag, the
        caching and the security headers; another ETag gets the file.
        """
        for path in FILES:
            etag = self.header(self.respond("GET", path), "ETag")
            for ifNoneMatch in (etag, f"W/{etag}", f'"other", {etag}', "*"):
                response = self.respond("GET", path, {"If-None-Match": ifNoneMatch})
                self.assertEqual((response.code, response.body), (304, b""), ifNoneMatch)
                self.assertEqual(self.header(response, "ETag"), etag)
                self.assertEqual(self.header(response, "Cache-Control"), FILES[path][2])
                self.assertSecure(response)
            response = self.respond("GET", path, {"If-None-Match": '"other"'})
            self.assertEqual(response.code, 200)
            self.assertTrue(response.body)

    def test_onlyListedFiles(self):
        """
        Below /hermux/static/ only the listed files are served: any other
        name, path traversal included, gets a JSON 404 that still carries
        the security headers.
        """
        for path in (
            "/hermux/static/",
            "/hermux/static",
            "/hermux/static/index.html",
            "/hermux/static/..%2fdashboard.py",
            "/hermux/static/%2e%2e/dashboard.py",
            "/hermux/static/..%2f..%2fsetup.py",
            "/hermux/static/%2fetc%2fpasswd",
            "/hermux/static/dashboard.js%00",
            "/hermux/static/DASHBOARD.JS",
            "/hermux/static/dashboard.js/",
            "/hermux/static/dashboard.js/x",
            "/hermux/static/__init__.py",
            "/hermux//",
            "/hermux//static/dashboard.js",
        ):
            response = self.respond("GET", path)
            self.assertEqual(response.code, 404, path)
            self.assertEqual(self.header(response, "Content-Type"), "application/json")
            self.assertEqual(json.loads(response.body)["error"]["code"], 404)
            self.assertSecure(response)

    def test_methods(self):
        """
        The page and its files are read with GET or HEAD only.
        """
        for path in FILES:
            response = self.respond("POST", path)
            self.assertEqual(response.code, 405)
            self.assertEqual(self.header(response, "Allow"), "GET, HEAD")
            self.assertSecure(response)

    def test_redirect(self):
        """
        /hermux, without its slash, leads to the page (relatively, for a
        proxy serving hermux below a prefix); other methods get 404.
        """
        response = self.respond("GET", "/hermux")
        self.assertEqual(response.code, 301)
        self.assertEqual(self.header(response, "Location"), "hermux/")
        self.assertEqual(self.respond("POST", "/hermux").code, 404)

    def test_dataNeedsToken(self):
        """
        The page's files need no token, but its data still does.
        """
        for path in ("/hermux/keys", "/hermux/me"):
            self.assertEqual(self.respond("GET", path).code, 401)


class _Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.elements = []  # (tag, attributes, text inside)

    def handle_starttag(self, tag, attrs):
        self.elements.append([tag, dict(attrs), ""])

    def handle_data(self, data):
        if self.elements:
            self.elements[-1][2] += data


class ContentTests(SynchronousTestCase):
    def test_sizeBudget(self):
        """
        The page with its files stays under 200 KB.
        """
        total = sum(len(packaged(name)) for name in (PAGE, *STATIC_FILES))
        self.assertLess(total, 200 * 1000)

    def test_noInlineScriptOrStyle(self):
        """
        The page has no inline script, style, event handler or
        javascript: URL (the policy would refuse them), and loads only its
        own files, by relative URLs.
        """
        parser = _Elements()
        parser.feed(packaged(PAGE).decode("utf-8"))
        loaded = []
        for tag, attributes, inside in parser.elements:
            self.assertNotEqual(tag, "style")
            for name, value in attributes.items():
                self.assertFalse(name.startswith("on"), (tag, name))
                self.assertNotEqual(name, "style", tag)
                self.assertFalse((value or "").strip().lower().startswith("javascript:"), (tag, name))
            if tag == "script":
                self.assertEqual(inside.strip(), "")
                loaded.append(attributes["src"])
            if tag == "link" and attributes.get("rel") == "stylesheet":
                loaded.append(attributes["href"])
        self.assertEqual(sorted(loaded), sorted(f"static/{name}" for name in STATIC_FILES))

    def test_scriptWritesNoHTML(self):
        """
        The script never parses data as HTML nor writes inline styles (the
        policy refuses them); the style sheet loads nothing.
        """
        script = packaged("dashboard.js").decode("utf-8")
        for forbidden in (
            "innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
            "new Function", ".style.", 'setAttribute("style"', "localStorage", "document.cookie",
        ):
            self.assertNotIn(forbidden, script)
        style = packaged("dashboard.css").decode("utf-8")
        self.assertNotIn("@import", style)
        self.assertIsNone(re.search(r"url\(", style))
