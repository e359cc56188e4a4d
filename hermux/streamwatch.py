# -*- test-case-name: tests.test_streamwatch -*-
"""
Errors inside a relayed event stream.

Once OpenRouter has sent the first byte of a streamed answer its status
(200) can no longer change, so an error that happens later comes as one
more server-sent event, with a top-level C{error} and C{finish_reason}
C{"error"}:

    data: {"id": "...", "error": {"code": "server_error", "message": "..."},
           "choices": [{"index": 0, "delta": {"content": ""},
                        "finish_reason": "error"}]}

L{verdictOf} tells what such an event means for the key that streamed it;
L{hermux.usage.AnswerWatch} finds the events, with the boundaries here,
in the same pass that reads the answer's usage.
"""

from __future__ import annotations

__all__ = ["firstBoundary", "lastBoundary", "verdictOf"]

import json
from twisted.web.http_headers import Headers

from hermux.keypool import ERROR, Kind, Verdict
from hermux.quota import classify



def verdictOf(event, now: float) -> Verdict | None:
    """
    What the parsed SSE C{event} means for the key whose stream it came
    in, at POSIX time C{now}: L{None} if it is not an error.  A rate limit that copies the platform's X-RateLimit-* headers is
    the key's, and is judged as a 429 is (L{hermux.quota.classify}); without
    them it is the provider's, counted but not held against the key.
    """
    if not isinstance(event, dict):
        return None
    error = event.get("error")
    if not error:
        return None
    if not isinstance(error, dict):
        error = {}
    metadata = error.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    code = error.get("code")
    if (
        str(code) in ("429", "rate_limit_exceeded")
        or metadata.get("error_type") == "rate_limit_exceeded"
    ):
        copied = metadata.get("headers")
        if isinstance(copied, dict) and any(
            str(name).lower().startswith("x-ratelimit-") for name in copied
        ):
            # As OpenRouter's own 429 answer with this error would be.
            answer = json.dumps({"error": dict(error, code=429)}).encode()
            return classify(429, Headers(), answer, now)
        return Verdict(Kind.BUSY, None, "rate limited by the provider mid-stream")
    return ERROR


def lastBoundary(text: bytes) -> int:
    """
    Where the last complete event in C{text} ends (after its blank line),
    or -1.  Each pattern is a line end followed by an empty line.
    """
    end = text.rfind(b"\n\n")
    end = end + 2 if end >= 0 else -1
    # A later boundary with a CR can only end after this one: look for one
    # in what follows (little, in a stream of LF lines) rather than in all.
    start = max(end - 1, 0)
    if text.find(b"\r", start) >= 0:
        crlf = text.rfind(b"\n\r\n", start)
        if crlf >= 0:
            end = max(end, crlf + 3)
        cr = text.rfind(b"\r\r", start)
        if cr >= 0:
            end = max(end, cr + 2)
    return end


def firstBoundary(text: bytes) -> int:
    """
    Where the first event in C{text} ends (after its blank line), or -1.
    """
    ends = []
    for pattern in (b"\n\n", b"\n\r\n", b"\r\r"):
        at = text.find(pattern)
        if at >= 0:
            ends.append(at + len(pattern))
    return min(ends) if ends else -1
