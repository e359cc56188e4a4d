# -*- test-case-name: tests.test_usage -*-
"""
What an answer says it used, read on the side; and what a request asks for.

OpenRouter puts a C{usage} object in every answer: at the end of a JSON
answer, and in an event near the end of a stream (the last chunk before
C{data: [DONE]} of a chat or completions stream, C{response.completed} of a
Responses API stream, C{message_start} and C{message_delta} of a Messages API
stream).  L{watchAnswer} makes an L{AnswerWatch}, which the relay feeds the
bytes of an answer after it wrote them to the client: it never changes,
delays or holds them, keeps a bounded amount whatever the answer's size,
decodes a compressed answer on the side with bounded output per step, and,
in an event stream, also reports OpenRouter's mid-stream error events as
L{hermux.streamwatch} judges them, in the same single pass.

L{requestedModel} is the one parse of a request body: its C{model} (and a
C{models} fallback list), which tells free-model requests from paid ones.
"""

from __future__ import annotations

__all__ = [
    "BODY_LIMIT",
    "STREAM_LIMIT",
    "AnswerWatch",
    "RequestedModel",
    "Usage",
    "decodedBody",
    "nanocredits",
    "requestedModel",
    "watchAnswer",
]

import json
import zlib
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Callable, NamedTuple

from twisted.logger import Logger
from twisted.web.http_headers import Headers

from hermux.hygiene import DECODABLE_CODINGS
from hermux.keypool import Verdict
from hermux.streamwatch import firstBoundary, lastBoundary, verdictOf

BODY_LIMIT = 256 * 1024  # a JSON answer up to this size is kept whole and parsed at its end
_HEAD = 4 * 1024  # of a longer answer or event: its first bytes, for "model"
_TAIL = 16 * 1024  # and at least its last bytes, for "usage"
_MODEL_TEXT = 1024  # the most a model id (quoted, escaped) is read as
_STREAM_HEAD = 4 * 1024  # of an event stream: the first bytes, read as they come
_STREAM_TAIL = 2 * 1024  # and at least the last, read at its end
# The most of an event stream a watch holds at once.
STREAM_LIMIT = _STREAM_HEAD + 2 * _STREAM_TAIL
_STEP = 64 * 1024  # the most a compressed answer expands to in one step

_ERROR = b'"error"'
_USAGE = b'"usage"'
_MODEL = b'"model"'
_SPACE = b" \t\r\n"

_NANOS = 10**9
_MOST_CREDITS = 10**6  # a cost above this, in credits, is nonsense
_MOST_TOKENS = 10**12  # so is a token count above this


class Usage(NamedTuple):
    """
    What one answer says it used.  (A named tuple: one is made for every
    answer, and a tuple is made fastest.)

    @ivar model: the answer's C{model}, as sent; L{None} if it had none.
    @ivar promptTokens: C{prompt_tokens}, or C{input_tokens} (Responses and
        Messages APIs).
    @ivar completionTokens: C{completion_tokens} or C{output_tokens}.
    @ivar reasoningTokens: the C{reasoning_tokens} of the completion's (or
        output's) details.
    @ivar cachedTokens: the C{cached_tokens} of the prompt's (or input's)
        details, or C{cache_read_input_tokens} (Messages API).
    @ivar cost: C{usage.cost}, in nanocredits (1e-9 credits).  Never
        C{cost_details.upstream_inference_cost}: for a BYOK request that is
        what the provider charged, and adding it would count it twice.
    """

    model: str | None = None
    promptTokens: int = 0
    completionTokens: int = 0
    reasoningTokens: int = 0
    cachedTokens: int = 0
    cost: int = 0


def nanocredits(value) -> int:
    """
    A cost in credits, as a JSON number, in nanocredits, rounded half to
    even; 0 for anything that is not a sensible cost (negative, not finite,
    a boolean, not a number, more than a million credits).
    """
    if type(value) is float and 0 <= value <= _MOST_CREDITS:
        # The float nearest a decimal of up to 10**15 nanocredits, scaled,
        # is within 0.25 of the decimal's own: unless that is near a tie,
        # rounding it is exact, and far cheaper than Decimal.
        scaled = value * _NANOS
        rounded = round(scaled)
        if abs(scaled - rounded) < 0.25:
            return rounded
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        return 0
    try:
        amount = Decimal(str(value))
        if not amount.is_finite() or amount < 0 or amount > _MOST_CREDITS:
            return 0
        return int((amount * _NANOS).to_integral_value(rounding=ROUND_HALF_EVEN))
    except (ValueError, InvalidOperation):
        return 0


def _tokens(value) -> int:
    # Not a bool (whose type is not int), not negative, not absurd.
    if type(value) is int and 0 <= value <= _MOST_TOKENS:
        return value
    return 0


def _detail(details, name: str):
    """
    C{details[name]} if C{details} is an object, else L{None}.
    """
    return details.get(name) if type(details) is dict else None


class _Found:
    """
    What the parsed parts of one answer said: its model and its counts,
    later values winning (a Messages stream sends input tokens at its start
    and output tokens at its end).
    """

    def __init__(self):
        self.model: str | None = None
        self.counts: dict[str, int] = {}
        self._anthropic = False  # cache tokens in Anthropic's terms were seen
        self._cacheWritten = 0

    def take(self, thing) -> None:
        """
        Take the model and usage of a parsed answer or event: at its top
        (chat, completions, a Responses or Messages JSON answer, a Messages
        C{message_delta}), or in its C{response} (a Responses event) or its
        C{message} (a Messages C{message_start}).
        """
        if not isinstance(thing, dict):
            return
        holders = (thing, thing.get("response"), thing.get("message"))
        for holder in holders:
            if isinstance(holder, dict) and isinstance(holder.get("model"), str):
                self.model = holder["model"]
                break
        for holder in holders:
            if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
                self.takeUsage(holder["usage"])
                break

    def takeUsage(self, usage: dict) -> None:
        """
        Take the counts of a usage object, in any of the APIs' names: for
        each count the first name present (not null) is taken.
        """
        counts = self.counts
        get = usage.get
        value = get("prompt_tokens")
        if value is None:
            value = get("input_tokens")
        if value is not None:
            counts["promptTokens"] = _tokens(value)
        value = get("completion_tokens")
        if value is None:
            value = get("output_tokens")
        if value is not None:
            counts["completionTokens"] = _tokens(value)
        value = _detail(get("completion_tokens_details"), "reasoning_tokens")
        if value is None:
            value = _detail(get("output_tokens_details"), "reasoning_tokens")
        if value is not None:
            counts["reasoningTokens"] = _tokens(value)
        value = _detail(get("prompt_tokens_details"), "cached_tokens")
        if value is None:
            value = _detail(get("input_tokens_details"), "cached_tokens")
        if value is None:
            value = get("cache_read_input_tokens")
        if value is not None:
            counts["cachedTokens"] = _tokens(value)
        if "cache_creation_input_tokens" in usage:
            self._cacheWritten = _tokens(usage["cache_creation_input_tokens"])
            self._anthropic = True
        if "cache_read_input_tokens" in usage:
            self._anthropic = True
        if self._anthropic and "input_tokens" in usage:
            # Anthropic's input_tokens (the Messages API) leave out the
            # tokens read from and written to the cache, which the other
            # APIs' prompt and input tokens include: count them all.
            self.counts["promptTokens"] = (
                _tokens(usage["input_tokens"])
                + self.counts.get("cachedTokens", 0)
                + self._cacheWritten
            )
        if usage.get("cost") is not None:
            self.counts["cost"] = nanocredits(usage["cost"])

    def result(self) -> Usage | None:
        if self.model is None and not self.counts:
            return None
        return Usage(self.model, **self.counts)


def _valueAt(text: bytes, at: int) -> int:
    """
    Where the value of a JSON member whose name ends just before C{at}
    starts (after the colon and any space), or -1 if C{at} is not followed
    by a colon.
    """
    end = len(text)
    while at < end and text[at] in _SPACE:
        at += 1
    if text[at : at + 1] != b":":
        return -1
    at += 1
    while at < end and text[at] in _SPACE:
        at += 1
    return at


def _usageAt(text: bytes, start: int, end: int) -> int:
    """
    Where in C{text[start:end]} the first member C{"usage"} is whose value
    may be a usage object (not plainly something else: C{null}, most
    often), or -1.  Cheap: a stream that sends C{"usage":null} in every
    chunk is not parsed.
    """
    at = text.find(_USAGE, start, end)
    while at >= 0:
        after = at + len(_USAGE)
        if not text.startswith(b":null", after):
            value = _valueAt(text, after)
            if value >= 0 and text[value : value + 1] in (b"{", b""):
                return at
        at = text.find(_USAGE, after, end)
    return -1


def _hasUsage(text: bytes, start: int, end: int) -> bool:
    return _usageAt(text, start, end) >= 0


def _eventStart(text: bytes, at: int) -> int:
    """
    Where the event that holds position C{at} of C{text} starts: after the
    last blank line before it, or at 0.
    """
    start = 0
    for pattern in (b"\n\n", b"\n\r\n", b"\r\r"):
        found = text.rfind(pattern, 0, at)
        if found >= 0:
            start = max(start, found + len(pattern))
    return start


_DECODER = json.JSONDecoder()


def _decodeAt(text: bytes, at: int):
    """
    The JSON value that starts at C{at} in C{text}, which may go on with
    anything after it; L{None} if there is none.
    """
    try:
        value, _ = _DECODER.raw_decode(text[at:].decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return None
    return value


def _usageIn(tail: bytes) -> dict | None:
    """
    The last usage object in C{tail}, the end of an answer or event too
    long to keep whole.
    """
    at = len(tail)
    while True:
        at = tail.rfind(_USAGE, 0, at)
        if at < 0:
            return None
        value = _valueAt(tail, at + len(_USAGE))
        if value >= 0 and tail[value : value + 1] == b"{":
            usage = _decodeAt(tail, value)
            if isinstance(usage, dict):
                return usage


def _modelIn(head: bytes) -> str | None:
    """
    The first model named in C{head}, the start of an answer or event too
    long to keep whole.
    """
    at = head.find(_MODEL)
    while at >= 0:
        value = _valueAt(head, at + len(_MODEL))
        if value >= 0 and head[value : value + 1] == b'"':
            end = head.find(b'"', value + 1)
            if end >= 0 and head.find(b"\\", value + 1, end) < 0:
                # No escape in it: the bytes between the quotes are the id.
                return head[value + 1 : end].decode("utf-8", "replace")
            # A model id is short: decode no more than it could be.
            model = _decodeAt(head[: value + _MODEL_TEXT], value)
            if isinstance(model, str):
                return model
        at = head.find(_MODEL, at + len(_MODEL))
    return None


class _Tail:
    """
    The last bytes of something, in bounded memory: at least the last
    C{limit} bytes (all, while there are fewer) and at most twice that.
    Keeping them costs a few list operations a read, and a copy of about
    1.5 times the bytes over the whole.
    """

    def __init__(self, limit: int):
        self._limit = limit
        self._pieces: list[bytes] = []
        self.kept = 0

    def add(self, data: bytes) -> None:
        if len(data) >= self._limit:
            self._pieces = [data[-self._limit :]]
            self.kept = self._limit
            return
        self._pieces.append(data)
        self.kept += len(data)
        if self.kept > 2 * self._limit:
            tail = b"".join(self._pieces)[-self._limit :]
            self._pieces = [tail]
            self.kept = len(tail)

    def text(self) -> bytes:
        return b"".join(self._pieces)


class _Fragments:
    """
    The head and the tail of something too long to keep whole, held in
    bounded memory: the first L{_HEAD} bytes and between L{_TAIL} and twice
    that of the last ones.
    """

    def __init__(self, start: bytes):
        self.head = start[:_HEAD]
        self._tail = _Tail(_TAIL)
        self._tail.add(start[-_TAIL:])

    @property
    def buffered(self) -> int:
        return len(self.head) + self._tail.kept

    def add(self, data: bytes) -> None:
        self._tail.add(data)

    def tellTo(self, found: _Found) -> None:
        """
        Give C{found} the usage in the tail, and then the model in the head.
        """
        usage = _usageIn(self._tail.text())
        if usage is not None:
            found.takeUsage(usage)
            model = _modelIn(self.head)
            if model is not None:
                found.model = model


class _BodyScanner:
    """
    A JSON answer: kept whole up to L{BODY_LIMIT} and parsed at its end; a
    longer one by its head and tail.
    """

    def __init__(self, found: _Found):
        self._found = found
        self._pieces: list[bytes] = []
        self._size = 0
        self._long: _Fragments | None = None

    @property
    def buffered(self) -> int:
        return self._long.buffered if self._long is not None else self._size

    def feed(self, data: bytes) -> None:
        if self._long is not None:
            self._long.add(data)
            return
        self._pieces.append(data)
        self._size += len(data)
        if self._size > BODY_LIMIT:
            self._long = _Fragments(b"".join(self._pieces))
            self._pieces = []
            self._size = 0

    def finish(self) -> None:
        if self._long is not None:
            self._long.tellTo(self._found)
            return
        body, self._pieces = b"".join(self._pieces), []
        # Only the usage object and the model are parsed, not the whole
        # answer: in OpenRouter's answers (chat, completions, Responses,
        # Messages) the usage comes last and the model first.
        usage = _usageIn(body)
        if usage is not None:
            self._found.takeUsage(usage)
        model = _modelIn(body[:_HEAD])
        if model is not None:
            self._found.model = model


class _EventScanner:
    """
    A server-sent event stream, read by its two ends.  What hermux looks
    for comes there: the usage in the last events (a chat stream's last
    chunk, a Responses C{response.completed}, a Messages C{message_delta})
    and the model and input tokens of a Messages stream in its first
    (C{message_start}); an error event is the last one OpenRouter sends.

    The stream's first L{_STREAM_HEAD} bytes are read as they come (an
    early error is reported at once); after that, a read costs a few list
    operations and no search: only the last L{_STREAM_TAIL} bytes (at most
    twice that) are kept, and read when the stream ends.  An event longer
    than that (a Responses C{response.completed} carries the whole output)
    gives its usage from its tail (L{_usageIn}).
    """

    def __init__(self, found: _Found, judge: Callable[[object], bool]):
        self._found = found
        self._judge: Callable[[object], bool] | None = judge
        self._seen = 0  # bytes of the stream so far
        self._pending = b""  # in the head: the current event, incomplete
        self._headRead = 0  # where the events read in the head end, in the stream
        self._tail = _Tail(_STREAM_TAIL)

    @property
    def buffered(self) -> int:
        return len(self._pending) + self._tail.kept

    def feed(self, data: bytes) -> None:
        if self._seen < _STREAM_HEAD:
            self._readHead(data[: _STREAM_HEAD - self._seen])
        self._seen += len(data)
        self._tail.add(data)

    def _readHead(self, data: bytes) -> None:
        text = self._pending + data if self._pending else data
        end = lastBoundary(text)
        if end >= 0:
            self._readEvents(text, end)
            self._headRead = self._seen + len(data) - len(text) + end
            text = text[end:]
        # Past the head, what matters is in the tail.
        self._pending = text if self._seen + len(data) < _STREAM_HEAD else b""

    def _readEvents(self, text: bytes, end: int) -> None:
        """
        Read the complete events of C{text[:end]}, from the first that may
        be an error or hold a usage.
        """
        first = _usageAt(text, 0, end)
        if self._judge is not None:
            error = text.find(_ERROR, 0, end if first < 0 else first)
            if error >= 0:
                first = error
        if first >= 0:
            self._events(text[_eventStart(text, first) : end])

    def finish(self) -> None:
        """
        The stream ended (cleanly or not): read its last events, and a last
        one that had no blank line after it.
        """
        self._pending = b""
        tail = self._tail.text()
        self._tail = _Tail(_STREAM_TAIL)
        tailStart = self._seen - len(tail)
        if self._headRead >= tailStart:
            # What the head read is in the tail: read on from there.
            tail = tail[self._headRead - tailStart :]
        elif tailStart > 0:
            # The tail starts inside an event: the end of a long one may
            # hold a usage.
            start = firstBoundary(tail)
            partial = tail if start < 0 else tail[:start]
            if _hasUsage(partial, 0, len(partial)):
                usage = _usageIn(partial)
                if usage is not None:
                    self._found.takeUsage(usage)
            if start < 0:
                return
            tail = tail[start:]
        if lastBoundary(tail) != len(tail):
            tail += b"\n\n"
        self._readEvents(tail, len(tail))

    def _events(self, block: bytes) -> None:
        """
        Read the complete events of C{block} (SSE: fields by line, data
        lines joined, comments and other fields ignored).
        """
        lines: list[bytes] = []
        for line in block.splitlines():
            if not line:
                if lines:
                    self._event(b"\n".join(lines))
                    lines = []
                continue
            name, _, value = line.partition(b":")
            if name != b"data":
                continue  # a comment (empty name) or another field
            if value[:1] == b" ":
                value = value[1:]
            lines.append(value)

    def _event(self, data: bytes) -> None:
        judging = self._judge is not None and _ERROR in data
        if not (judging or _hasUsage(data, 0, len(data))):
            return
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):
            return
        if judging and self._judge(event):
            self._judge = None
        self._found.take(event)

_GZIP = 16 + zlib.MAX_WBITS
_GZIP_MAGIC = b"\x1f\x8b"


class _Decoder:
    """
    Decodes a gzip or deflate body for a scanner, C{_STEP} bytes of output
    at a time: a small body that expands enormously (a decompression bomb)
    costs time in proportion to what it expands to, never memory.  A deflate
    body is zlib-wrapped, as RFC 9110 says, or raw deflate, as some servers
    send and browsers accept.  Several gzip members follow one another, as
    gzip itself allows; anything else after the end is ignored.
    """

    def __init__(self, coding: bytes, sink: Callable[[bytes], None]):
        self._sink = sink
        self._gzip = coding == b"gzip"
        self._zlib = None  # until the first bytes (of each gzip member) are in
        self._start = b""
        self._ended = False

    @property
    def buffered(self) -> int:
        return len(self._start)

    def feed(self, data: bytes) -> None:
        while data and not self._ended:
            if self._zlib is None:
                data = self._start + data
                if len(data) < 2:
                    self._start = data
                    return
                self._start = b""
                self._zlib = self._begin(data[:2])
                if self._zlib is None:
                    self._ended = True  # not a gzip member: the end, or nothing readable
                    return
            data = self._inflate(data)

    def _begin(self, start: bytes):
        """
        The decompressor for a body (or gzip member) that starts with the
        two bytes C{start}, or L{None} if it is not one.
        """
        if self._gzip:
            return zlib.decompressobj(_GZIP) if start == _GZIP_MAGIC else None
        try:
            zlib.decompressobj(zlib.MAX_WBITS).decompress(start)
        except zlib.error:
            return zlib.decompressobj(-zlib.MAX_WBITS)
        return zlib.decompressobj(zlib.MAX_WBITS)

    def _inflate(self, data: bytes) -> bytes:
        """
        Decode C{data}, at most C{_STEP} bytes of output at a time; return
        what follows the end of the body (or member), if it ended.
        """
        decoder = self._zlib
        while True:
            out = decoder.decompress(data, _STEP)
            if out:
                self._sink(out)
            if decoder.eof:
                self._zlib = None
                if not self._gzip:
                    self._ended = True
                return decoder.unused_data
            data = decoder.unconsumed_tail
            if not data and len(out) < _STEP:
                return b""


class AnswerWatch:
    """
    Watches one answer on the side: fed its bytes as they are relayed
    (L{dataReceived}), it tells at the end what the answer said it used
    (L{finish}), and meanwhile reports the first mid-stream error of an
    event stream.  Made by L{watchAnswer}.

    @ivar buffered: how many bytes of the answer it holds now; bounded
        whatever the answer's size: for an event stream, its current event
        while in its first L{_STREAM_HEAD} bytes and then at most twice
        L{_STREAM_TAIL}; for a JSON answer, L{BODY_LIMIT} (a longer one by
        its head and tail).
    """

    _log = Logger()

    def __init__(
        self,
        kind: str | None = None,
        coding: bytes | None = None,
        report: Callable[[Verdict], None] | None = None,
        now: Callable[[], float] | None = None,
    ):
        """
        @param kind: C{"events"} for an event stream, C{"body"} for a JSON
            answer, L{None} for an answer not watched.
        @param coding: C{b"gzip"} or C{b"deflate"} if the answer is so
            encoded.
        """
        self._report = report
        self._now = now
        self._found = _Found()
        self._scanner: _EventScanner | _BodyScanner | None = None
        if kind == "events":
            self._scanner = _EventScanner(self._found, self._judge)
        elif kind == "body":
            self._scanner = _BodyScanner(self._found)
        self._decoder: _Decoder | None = None
        self._feed: Callable[[bytes], None] | None = None
        if self._scanner is not None:
            self._feed = self._scanner.feed
            if coding:
                self._decoder = _Decoder(coding, self._scanner.feed)
                self._feed = self._decoder.feed
        self._finished = False
        self._result: Usage | None = None

    @property
    def buffered(self) -> int:
        if self._feed is None:
            return 0
        held = self._scanner.buffered
        if self._decoder is not None:
            held += self._decoder.buffered
        return held

    def dataReceived(self, data: bytes) -> None:
        """
        Read the next bytes of the answer.  Never raises: the answer must
        reach the client whatever the watch makes of it.
        """
        if self._feed is None:
            return
        try:
            self._feed(data)
        except zlib.error:
            self._stop()
            self._log.warn("an answer's compressed body is corrupt; not watching it further")
        except Exception:
            self._stop()
            self._log.failure("watching an answer failed; not watching it further")

    def finish(self) -> Usage | None:
        """
        The answer ended cleanly: what it said it used, or L{None} if it
        said nothing (or the watch gave up on it).  Never raises; finishing
        again gives the same.
        """
        if self._finished:
            return self._result
        self._finished = True
        if self._feed is None:
            return None
        try:
            self._scanner.finish()
            self._result = self._found.result()
        except Exception:
            self._log.failure("watching an answer failed at its end")
        self._stop()
        return self._result

    def _stop(self) -> None:
        self._feed = None
        self._scanner = None
        self._decoder = None

    def _judge(self, event) -> bool:
        """
        Report C{event}'s verdict if it is an error; tell whether it was.
        """
        verdict = verdictOf(event, self._now())
        if verdict is None:
            return False
        self._report(verdict)
        return True


def _mediaType(headers: Headers) -> bytes:
    contentType = headers.getRawHeaders(b"content-type")
    if not contentType:
        return b""
    return contentType[0].split(b";", 1)[0].strip().lower()


def _isJSON(mediaType: bytes) -> bool:
    return mediaType == b"application/json" or (mediaType.startswith(b"application/") and mediaType.endswith(b"+json"))


def _coding(headers: Headers) -> bytes | None:
    """
    The one content coding of an answer, if the watch can decode it
    (C{b"gzip"} or C{b"deflate"}); C{b""} for none; L{None} for any other,
    or for several stacked.
    """
    values = headers.getRawHeaders(b"content-encoding")
    if not values:
        return b""
    codings = [coding.strip().lower() for value in values for coding in value.split(b",")]
    codings = [coding for coding in codings if coding not in (b"", b"identity")]
    if not codings:
        return b""
    if len(codings) > 1:
        return None
    return DECODABLE_CODINGS.get(codings[0])


class _Full(Exception):
    """
    A decoded body reached its limit.
    """


def decodedBody(headers: Headers, body: bytes, limit: int) -> bytes | None:
    """
    A short answer's whole C{body} (an error answer hermux reads to judge
    it), decoded from its content coding as C{headers} give it: at most its
    first C{limit} bytes; L{None} if it is in a coding hermux cannot decode,
    or corrupt.  Decoding stops at the limit, so that a small body that
    expands enormously costs nothing more.
    """
    coding = _coding(headers)
    if coding == b"":
        return body
    if coding is None:
        return None
    parts: list[bytes] = []
    size = 0

    def keep(out: bytes) -> None:
        nonlocal size
        parts.append(out)
        size += len(out)
        if size >= limit:
            raise _Full()

    try:
        _Decoder(coding, keep).feed(body)
    except _Full:
        pass
    except zlib.error:
        return None
    return b"".join(parts)[:limit]


def watchAnswer(
    headers: Headers, *, report: Callable[[Verdict], None], now: Callable[[], float]
) -> AnswerWatch:
    """
    An L{AnswerWatch} for the answer whose (upstream) response headers are
    C{headers}: a JSON answer is read at its end, an event stream as it
    goes, its first mid-stream error reported through C{report} with
    C{now} as the time; anything else, or in a content coding other than
    gzip and deflate, is not watched (the watch finishes with L{None}).
    """
    mediaType = _mediaType(headers)
    coding = _coding(headers)
    if coding is None:
        return AnswerWatch()
    if mediaType == b"text/event-stream":
        return AnswerWatch("events", coding, report, now)
    if _isJSON(mediaType):
        return AnswerWatch("body", coding)
    return AnswerWatch()


class RequestedModel(NamedTuple):
    """
    The model a request names.

    @ivar model: the body's C{model}, if it is a string.
    @ivar free: C{True} for a free variant (C{model} ends with C{":free"},
        and so does every entry of a C{models} fallback list if there is
        one), C{False} for a paid request (some model named, not all free),
        L{None} if no model is named at all.
    @ivar names: every model the request names, C{model} then the entries
        of C{models} (one that is not a string as its JSON text), for the
        clients limited to some models; L{None} when the body is not a JSON
        object, so that it names nothing hermux can read.
    """

    model: str | None = None
    free: bool | None = None
    names: tuple[str, ...] | None = None


_FREE = ":free"


def _isJSONRequest(body: bytes, contentType: bytes | None) -> bool:
    if not contentType:
        return body.lstrip()[:1] == b"{"
    return _isJSON(contentType.split(b";", 1)[0].strip().lower())


def requestedModel(body: bytes, contentType: bytes | None) -> RequestedModel:
    """
    The model that a request with C{body}, of C{contentType} (L{None} if it
    has none), names.  Only a JSON body is parsed; anything else, or
    malformed JSON, names none.  Never raises.
    """
    try:
        if not body or not _isJSONRequest(body, contentType):
            return RequestedModel()
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return RequestedModel()
    if not isinstance(parsed, dict):
        return RequestedModel()
    model = parsed.get("model")
    model = model if isinstance(model, str) else None
    models = parsed.get("models")
    if models is None and model is not None:
        return RequestedModel(model, model.endswith(_FREE), (model,))
    names = [model] if model is not None else []
    if isinstance(models, list):
        names.extend(models)
    if not names:
        return RequestedModel(names=())
    free = all(isinstance(name, str) and name.endswith(_FREE) for name in names)
    return RequestedModel(model, free, tuple(map(_modelText, names)))


def _modelText(name) -> str:
    return name if isinstance(name, str) else json.dumps(name)
