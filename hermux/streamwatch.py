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

L{StreamWatch} is fed the bytes of such a stream after the relay wrote them
to the client, and tells what the first error event means for the key (see
L{verdictOf}).  It only watches: it never changes, delays or holds the
stream, keeps at most L{EVENT_LIMIT} bytes of the current event (a longer
event is skipped), and parses JSON only for events that contain C{"error"}.
The relay now watches answers through L{hermux.usage.AnswerWatch}, which
judges error events the same way (L{verdictOf}, the same boundaries) in the
pass that also reads the answer's usage.
"""

from __future__ import annotations

__all__ = ["EVENT_LIMIT", "StreamWatch", "firstBoundary", "lastBoundary", "verdictOf", "watchStream"]

import json
from typing import Callable

from twisted.logger import Logger
from twisted.web.http_headers import Headers

from hermux.keypool import ERROR, Kind, Verdict
from hermux.quota import classify

EVENT_LIMIT = 64 * 1024

_ERROR = b'"error"'


def watchStream(
    headers: Headers, report: Callable[[Verdict], None], now: Callable[[], float]
) -> StreamWatch | None:
    """
    A L{StreamWatch} for an answer with C{headers}, if it is an event stream
    the watch can read (not compressed); otherwise L{None}.
    """
    contentType = headers.getRawHeaders(b"content-type")
    if not contentType:
        return None
    if contentType[0].split(b";", 1)[0].strip().lower() != b"text/event-stream":
        return None
    encodings = headers.getRawHeaders(b"content-encoding", [])
    if any(e.strip().lower() not in (b"", b"identity") for e in encodings):
        return None
    return StreamWatch(report, now)


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


class StreamWatch:
    """
    An incremental scanner of a server-sent event stream that calls
    C{report} with the L{Verdict} of the first error event it sees, and
    then stops looking.

    @ivar buffered: how many bytes of the current event it holds; never
        more than C{limit}.
    """

    _log = Logger()

    def __init__(
        self,
        report: Callable[[Verdict], None],
        now: Callable[[], float],
        limit: int = EVENT_LIMIT,
    ):
        self._report = report
        self._now = now
        self._limit = limit
        self._tail = b""  # the current event, incomplete
        self._skipping = False  # the current event is longer than the limit
        self._done = False

    @property
    def buffered(self) -> int:
        return len(self._tail)

    def dataReceived(self, data: bytes) -> None:
        """
        Scan the next bytes of the stream.  Never raises: the stream must
        reach the client whatever the watch makes of it.
        """
        if self._done:
            return
        try:
            self._scan(data)
        except Exception:
            self._done = True
            self._tail = b""
            self._log.failure("watching an event stream failed; not watching it further")

    def finish(self) -> None:
        """
        The stream ended cleanly: judge a last event that had no blank line
        after it.  Never raises, like L{dataReceived}.
        """
        if self._done or self._skipping or not self._tail:
            return
        tail, self._tail = self._tail, b""
        if _ERROR not in tail:
            return
        try:
            self._events(tail + b"\n\n")
        except Exception:
            self._log.failure("watching an event stream failed at its end")
        self._done = True

    def _scan(self, data: bytes) -> None:
        if self._skipping:
            # Keep the last two bytes: a blank line may straddle two reads.
            text = self._tail + data
            end = firstBoundary(text)
            if end < 0:
                self._tail = text[-2:]
                return
            self._skipping = False
            self._tail = b""
            data = text[end:]
        text = self._tail + data if self._tail else data
        end = lastBoundary(text)
        if end >= 0:
            if text.find(_ERROR, 0, end) >= 0:
                self._events(text[:end])
                if self._done:
                    self._tail = b""
                    return
            rest = text[end:]
        else:
            rest = text
        if len(rest) > self._limit:
            self._skipping = True
            self._tail = rest[-2:]
        else:
            self._tail = rest

    def _events(self, block: bytes) -> None:
        """
        Parse the complete events of C{block} (SSE: fields by line, data
        lines joined, comments and other fields ignored) and judge those
        that may be errors.
        """
        lines: list[bytes] = []
        for line in block.splitlines():
            if not line:
                if lines:
                    self._event(b"\n".join(lines))
                    if self._done:
                        return
                    lines = []
                continue
            name, _, value = line.partition(b":")
            if name != b"data":
                continue  # a comment (empty name) or another field
            if value[:1] == b" ":
                value = value[1:]
            lines.append(value)

    def _event(self, data: bytes) -> None:
        if _ERROR not in data:
            return
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):
            return
        verdict = verdictOf(event, self._now())
        if verdict is not None:
            self._done = True
            self._report(verdict)
