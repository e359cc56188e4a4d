# -*- test-case-name: tests.test_resource -*-
"""
Errors hermux itself answers with, in OpenRouter's shape:
C{{"error": {"code": 401, "message": "..."}}}.

Messages are fixed sentences for the client: never an exception's text, a
path on disk, a key or an access token.
"""

from __future__ import annotations

__all__ = ["reasonPhrase", "errorBody", "renderError", "writeError", "ErrorResource"]

import json

from twisted.web import http
from twisted.web.resource import Resource

# Reason phrases Twisted does not know.
_PHRASES = {
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
}


def reasonPhrase(code: int) -> bytes:
    """
    The reason phrase for a status hermux answers with.
    """
    return _PHRASES.get(code) or http.RESPONSES.get(code, b"Error")


def errorBody(code: int, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode("utf-8")


def renderError(request, code: int, message: str) -> bytes:
    """
    Set up C{request} for an error response and return its body, for a
    C{render} method to return.
    """
    request.setResponseCode(code, reasonPhrase(code))
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"X-Hermux-Error", b"%d" % (code,))
    body = errorBody(code, message)
    request.setHeader(b"Content-Length", b"%d" % (len(body),))
    return body


def writeError(request, code: int, message: str) -> None:
    """
    Answer an asynchronous C{request} with an error and finish it.
    """
    request.write(renderError(request, code, message))
    request.finish()


class ErrorResource(Resource):
    """
    A leaf that answers every request with the same error.
    """

    isLeaf = True

    def __init__(self, code: int, message: str):
        super().__init__()
        self._code = code
        self._message = message

    def render(self, request):
        return renderError(request, self._code, self._message)
