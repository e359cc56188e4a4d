"""
Tests for L{hermux.usage}: the side reader of answers (fed byte by byte, in
every split and in odd ones; oversized, malformed, compressed and bombing
answers), the upstream's Accept-Encoding, and the model a request names.
"""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib
from decimal import Decimal

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

import hermux.usage
from hermux.hygiene import upstreamAcceptEncoding
from hermux.keypool import ERROR, Kind
from hermux.streamwatch import verdictOf
from hermux.usage import (
    BODY_LIMIT,
    STREAM_LIMIT,
    AnswerWatch,
    RequestedModel,
    Usage,
    nanocredits,
    requestedModel,
    watchAnswer,
)
# The error events of the stream watch's own tests, and their time.
from tests.test_streamwatch import NOW, PLATFORM_LIMIT, PROVIDER_LIMIT, RESET, errorEvent


MODEL = "openai/gpt-4o-2024-11-20"

# usage as OpenRouter sends it in a chat or completions answer
CHAT_USAGE = {
    "prompt_tokens": 194,
    "completion_tokens": 52,
    "total_tokens": 246,
    "cost": 0.00097,
    "is_byok": False,
    "prompt_tokens_details": {"cached_tokens": 128, "cache_write_tokens": 0},
    "cost_details": {
        "upstream_inference_cost": 0.00095,
        "upstream_inference_prompt_cost": 0.0005,
        "upstream_inference_completions_cost": 0.00045,
    },
    "completion_tokens_details": {"reasoning_tokens": 17, "image_tokens": 0},
}
CHAT = Usage(MODEL, 194, 52, 17, 128, 970000)

# usage as the Responses API sends it
RESPONSES_USAGE = {
    "input_tokens": 321,
    "input_tokens_details": {"cached_tokens": 64},
    "output_tokens": 99,
    "output_tokens_details": {"reasoning_tokens": 40},
    "total_tokens": 420,
    "cost": 0.0021,
    "is_byok": False,
}
RESPONSES = Usage(MODEL, 321, 99, 40, 64, 2100000)


def sse(*events: dict, name: bool = False) -> bytes:
    """
    An event stream of C{events}, with C{event:} lines (as the Responses and
    Messages APIs send) if C{name}.
    """
    out = []
    for event in events:
        line = b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
        if name:
            line = b"event: " + event["type"].encode() + b"\n" + line
        out.append(line)
    return b"".join(out)


def chatChunk(content: str | None = "Hello", finish=None, usage=None, **extra) -> dict:
    chunk = {
        "id": "gen-1700000000-abcdefghij",
        "provider": "OpenAI",
        "model": MODEL,
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": content},
                "finish_reason": finish,
                "native_finish_reason": finish,
                "logprobs": None,
            }
        ],
    }
    if usage is not None:
        chunk["usage"] = usage
    chunk.update(extra)
    return chunk


CHAT_STREAM = (
    b": OPENROUTER PROCESSING\n\n"
    + sse(chatChunk("Hel"), chatChunk("lo"), chatChunk("", "stop"), chatChunk("", "stop", CHAT_USAGE))
    + b"data: [DONE]\n\n"
)

CHAT_JSON = json.dumps(
    {
        "id": "gen-1700000000-abcdefghij",
        "provider": "OpenAI",
        "model": MODEL,
        "object": "chat.completion",
        "created": 1700000000,
        "choices": [
            {
                "logprobs": None,
                "finish_reason": "stop",
                "native_finish_reason": "stop",
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!", "refusal": None, "reasoning": None},
            }
        ],
        "usage": CHAT_USAGE,
    }
).encode()

COMPLETIONS_STREAM = (
    sse(
        {"id": "gen-2", "provider": "OpenAI", "model": MODEL, "object": "text_completion",
         "created": 1700000000, "choices": [{"index": 0, "text": "Hi", "finish_reason": None}]},
        {"id": "gen-2", "provider": "OpenAI", "model": MODEL, "object": "text_completion",
         "created": 1700000000, "choices": [{"index": 0, "text": "", "finish_reason": "length"}],
         "usage": CHAT_USAGE},
    )
    + b"data: [DONE]\n\n"
)


def responseObject(usage, status="completed", text="Hello there.") -> dict:
    return {
        "id": "resp_abc",
        "object": "response",
        "created_at": 1700000000,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": MODEL,
        "output": [
            {
                "type": "message",
                "id": "msg_abc",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "usage": usage,
        "user": None,
        "metadata": {},
    }


def responsesStream(text="Hello there.") -> bytes:
    return sse(
        {"type": "response.created", "sequence_number": 0,
         "response": responseObject(None, "in_progress", "")},
        {"type": "response.in_progress", "sequence_number": 1,
         "response": responseObject(None, "in_progress", "")},
        {"type": "response.output_text.delta", "sequence_number": 2, "item_id": "msg_abc",
         "output_index": 0, "content_index": 0, "delta": "Hello"},
        {"type": "response.output_text.done", "sequence_number": 3, "item_id": "msg_abc",
         "output_index": 0, "content_index": 0, "text": text},
        {"type": "response.completed", "sequence_number": 4,
         "response": responseObject(RESPONSES_USAGE, text=text)},
        name=True,
    )


MESSAGES_JSON = json.dumps(
    {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "anthropic/claude-sonnet-4",
        "content": [{"type": "text", "text": "Hi!"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 25,
            "cache_creation_input_tokens": 10,
            "cache_read_input_tokens": 300,
            "output_tokens": 12,
            "cost": 0.000456,
        },
    }
).encode()

MESSAGES_STREAM = sse(
    {"type": "message_start", "message": {
        "id": "msg_01", "type": "message", "role": "assistant", "content": [],
        "model": "anthropic/claude-sonnet-4", "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 25, "cache_creation_input_tokens": 10,
                  "cache_read_input_tokens": 300, "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi!"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
     "usage": {"input_tokens": 26, "output_tokens": 12, "cost": 0.000456}},
    {"type": "message_stop"},
    name=True,
)
# input_tokens and the cache's read and written tokens: 26 + 300 + 10.
MESSAGES = Usage("anthropic/claude-sonnet-4", 336, 12, 0, 300, 456000)


def headersOf(contentType: bytes | None = b"text/event-stream", encoding: bytes | None = None) -> Headers:
    headers = Headers()
    if contentType is not None:
        headers.setRawHeaders(b"content-type", [contentType])
    if encoding is not None:
        headers.setRawHeaders(b"content-encoding", [encoding])
    return headers


class Watched:
    """
    An L{AnswerWatch} made by L{watchAnswer}, what it reported, and the
    most it held.
    """

    def __init__(self, contentType: bytes | None = b"text/event-stream", encoding: bytes | None = None):
        self.verdicts: list = []
        self.watch = watchAnswer(headersOf(contentType, encoding), report=self.verdicts.append, now=lambda: NOW)
        self.mostBuffered = 0

    def feed(self, *pieces: bytes) -> Watched:
        for piece in pieces:
            self.watch.dataReceived(piece)
            self.mostBuffered = max(self.mostBuffered, self.watch.buffered)
        return self

    def finish(self) -> Usage | None:
        return self.watch.finish()


def read(answer: bytes, *pieces: bytes, **kwargs) -> Usage | None:
    return Watched(**kwargs).feed(answer, *pieces).finish()


def byteByByte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def oddSplits(data: bytes) -> list[bytes]:
    pieces, at, size = [], 0, 1
    while at < len(data):
        pieces.append(data[at : at + size])
        at += size
        size = size * 7 % 251 + 1
    return pieces


def inReads(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


class CountingJSON:
    """
    Stands for the json module in L{hermux.usage}, counting the parses.
    """

    def __init__(self):
        self.parsed: list[bytes] = []

    def loads(self, data, **kwargs):
        self.parsed.append(data)
        return json.loads(data, **kwargs)

    def __getattr__(self, name):
        return getattr(json, name)


class ChatTests(SynchronousTestCase):
    def test_chatStream(self):
        """
        The last chunk's usage and model make the L{Usage}; the cost is in
        nanocredits, and BYOK's upstream_inference_cost is not added.
        """
        self.assertEqual(read(CHAT_STREAM), CHAT)

    def test_chatJSON(self):
        self.assertEqual(read(CHAT_JSON, contentType=b"application/json"), CHAT)

    def test_byteByByte(self):
        self.assertEqual(read(*byteByByte(CHAT_STREAM)), CHAT)
        self.assertEqual(read(*byteByByte(CHAT_JSON), contentType=b"application/json"), CHAT)

    def test_everySplit(self):
        """
        Split anywhere in two reads, or in three, the usage is found.
        """
        stream = sse(chatChunk("a"), chatChunk("", "stop", CHAT_USAGE)) + b"data: [DONE]\n\n"
        for at in range(len(stream) + 1):
            self.assertEqual(read(stream[:at], stream[at:]), CHAT, at)
        for at in range(0, len(stream) + 1, 7):
            for second in range(at, len(stream) + 1, 13):
                self.assertEqual(read(stream[:at], stream[at:second], stream[second:]), CHAT, (at, second))

    def test_oddSplits(self):
        self.assertEqual(read(*oddSplits(CHAT_STREAM * 3)), CHAT)
        self.assertEqual(read(*oddSplits(CHAT_JSON), contentType=b"application/json"), CHAT)

    def test_crlfLineEndings(self):
        stream = CHAT_STREAM.replace(b"\n", b"\r\n")
        self.assertEqual(read(stream), CHAT)
        self.assertEqual(read(*byteByByte(stream)), CHAT)

    def test_crLineEndings(self):
        stream = CHAT_STREAM.replace(b"\n", b"\r")
        self.assertEqual(read(stream), CHAT)
        self.assertEqual(read(*byteByByte(stream)), CHAT)

    def test_commentsAndOtherFields(self):
        stream = (
            b": OPENROUTER PROCESSING\n\n"
            b': {"usage": {"prompt_tokens": 1}}\n\n'
            b"event: message\nid: 7\nretry: 10\n" + sse(chatChunk("", "stop", CHAT_USAGE))
        )
        self.assertEqual(read(*byteByByte(stream)), CHAT)

    def test_multiLineData(self):
        stream = (
            b'data: {"model": "m",\r\ndata: "usage": {"prompt_tokens": 3,\r\n'
            b'data: "completion_tokens": 4}}\r\n\r\n'
        )
        self.assertEqual(read(*byteByByte(stream)), Usage("m", 3, 4))

    def test_lastEventWithoutBlankLine(self):
        stream = sse(chatChunk("a"), chatChunk("", "stop", CHAT_USAGE)).rstrip(b"\n")
        self.assertEqual(read(stream), CHAT)

    def test_laterUsageWins(self):
        stream = sse(
            chatChunk("", usage={"prompt_tokens": 1, "completion_tokens": 1}),
            chatChunk("", "stop", CHAT_USAGE),
        )
        self.assertEqual(read(stream), CHAT)

    def test_completions(self):
        self.assertEqual(read(COMPLETIONS_STREAM), CHAT)

    def test_noUsage(self):
        """
        A stream without a usage object says nothing: the request is still
        a request, with no usage.
        """
        stream = sse(chatChunk("a"), chatChunk("", "stop", usage=None)) + b"data: [DONE]\n\n"
        self.assertIsNone(read(stream))
        self.assertIsNone(read(b""))

    def test_usageNullIsNotParsed(self):
        """
        Only events that may hold a usage object (or an error) are parsed:
        not the chunks that carry C{"usage": null}, nor those whose content
        says "usage".
        """
        counting = CountingJSON()
        self.patch(hermux.usage, "json", counting)
        stream = (
            sse(*[chatChunk("a", usage=None) | {"usage": None} for _ in range(20)])
            + b'data: {"usage": null, "x": 1}\n\n'
            + b'data: {"choices": [{"delta": {"content": "the \\"usage\\": {} of it"}}]}\n\n'
            + b'data: ["usage"]\n\n'
            + sse(chatChunk("", "stop", CHAT_USAGE))
            + b"data: [DONE]\n\n"
        )
        self.assertEqual(read(stream), CHAT)
        self.assertEqual(len(counting.parsed), 1)
        self.assertIn(b'"cost":0.00097', counting.parsed[0])

    def test_modelMustBeAString(self):
        stream = sse(chatChunk("", "stop", {"prompt_tokens": 5}, model=["x"]))
        self.assertEqual(read(stream), Usage(None, 5))
        self.assertEqual(read(b'{"model": 12, "usage": {"prompt_tokens": 5}}', contentType=b"application/json"),
                         Usage(None, 5))

    def test_modelIsNotCut(self):
        model = "x/" + "m" * 1000
        self.assertEqual(read(sse(chatChunk("", "stop", {"prompt_tokens": 5}, model=model))), Usage(model, 5))

    def test_badTokenCounts(self):
        """
        Token counts that are not non-negative integers count as 0.
        """
        usage = {
            "prompt_tokens": True,
            "completion_tokens": -3,
            "prompt_tokens_details": {"cached_tokens": 2.5},
            "completion_tokens_details": {"reasoning_tokens": "7"},
            "cost": "0.1",
        }
        self.assertEqual(read(sse(chatChunk("", "stop", usage))), Usage(MODEL))
        self.assertEqual(read(sse(chatChunk("", "stop", {"prompt_tokens": 10**40}))), Usage(MODEL))
        self.assertEqual(
            read(sse(chatChunk("", "stop", {"prompt_tokens_details": [], "completion_tokens_details": None}))),
            Usage(MODEL),
        )


class NanocreditsTests(SynchronousTestCase):
    def test_numbers(self):
        self.assertEqual(nanocredits(0.00097), 970000)
        self.assertEqual(nanocredits(Decimal("0.000000123456789")), 123)
        self.assertEqual(nanocredits(2), 2 * 10**9)
        self.assertEqual(nanocredits(0), 0)
        self.assertEqual(nanocredits(1e-05), 10000)
        self.assertEqual(nanocredits(1000000), 10**15)

    def test_roundsHalfToEven(self):
        self.assertEqual(nanocredits(Decimal("0.0000000005")), 0)
        self.assertEqual(nanocredits(Decimal("0.0000000015")), 2)
        self.assertEqual(nanocredits(Decimal("0.0000000025")), 2)

    def test_nonsense(self):
        for value in (-0.001, float("nan"), float("inf"), float("-inf"), Decimal("NaN"), True, False,
                      "0.1", None, [], 1000000.5, 10**30):
            self.assertEqual(nanocredits(value), 0, value)

    def test_costFromJSON(self):
        """
        The cost as JSON has it: no binary floating point error creeps in.
        """
        body = b'{"model": "m", "usage": {"cost": 0.1234567891}}'
        self.assertEqual(read(body, contentType=b"application/json"), Usage("m", cost=123456789))
        body = b'{"model": "m", "usage": {"cost": NaN}}'
        self.assertEqual(read(body, contentType=b"application/json"), Usage("m"))


class ResponsesAndMessagesTests(SynchronousTestCase):
    def test_responsesJSON(self):
        body = json.dumps(responseObject(RESPONSES_USAGE)).encode()
        self.assertEqual(read(body, contentType=b"application/json"), RESPONSES)

    def test_responsesStream(self):
        self.assertEqual(read(responsesStream()), RESPONSES)
        self.assertEqual(read(*byteByByte(responsesStream())), RESPONSES)
        self.assertEqual(read(*oddSplits(responsesStream().replace(b"\n", b"\r\n"))), RESPONSES)

    def test_responsesStreamParsesOnlyTheCompletedEvent(self):
        """
        The events before C{response.completed} have C{"usage": null}, and
        C{"error": null}: only the error ones are parsed, as before.
        """
        counting = CountingJSON()
        self.patch(hermux.usage, "json", counting)
        self.assertEqual(read(responsesStream()), RESPONSES)
        self.assertEqual([b"response.completed" in p for p in counting.parsed], [False, False, True])

    def test_messagesJSON(self):
        self.assertEqual(read(MESSAGES_JSON, contentType=b"application/json"), Usage(
            "anthropic/claude-sonnet-4", 335, 12, 0, 300, 456000))

    def test_messagesStream(self):
        """
        C{message_start} gives the model and the input tokens,
        C{message_delta} the output tokens and the cost; later values win.
        """
        self.assertEqual(read(MESSAGES_STREAM), MESSAGES)
        self.assertEqual(read(*byteByByte(MESSAGES_STREAM)), MESSAGES)
        self.assertEqual(read(*oddSplits(MESSAGES_STREAM.replace(b"\n", b"\r"))), MESSAGES)

    def test_messagesStreamWithoutDelta(self):
        stream = MESSAGES_STREAM.split(b"event: message_delta")[0]
        self.assertEqual(read(stream), Usage("anthropic/claude-sonnet-4", 335, 1, 0, 300, 0))


class MalformedTests(SynchronousTestCase):
    def test_malformedEvents(self):
        stream = (
            b'data: {"usage": {"prompt_tokens": 500\n\n'
            b'data: "usage": {\xff\xfe\n\n'
            b'data: ["usage", {"usage": {}}]\n\n'
            b"data: " + b"[" * 20000 + b'{"usage": {}}\n\n'
            b'data: {"usage": [1, 2]}\n\n'
            b'data: {"usage": null}\n\n'
            b'data: {"usage": "lots"}\n\n'
        )
        self.assertIsNone(read(stream))
        self.assertEqual(read(stream, sse(chatChunk("", "stop", CHAT_USAGE))), CHAT)

    def test_truncatedStream(self):
        stream = sse(chatChunk("", "stop", CHAT_USAGE))
        self.assertIsNone(read(stream[:-20]))

    def test_malformedJSON(self):
        """
        Nothing is read from a body that is not JSON or whose usage is cut;
        only the usage object is parsed, so an answer cut after it still
        gives it.
        """
        self.assertEqual(read(CHAT_JSON[:-1], contentType=b"application/json"), CHAT)
        cut = CHAT_JSON[: CHAT_JSON.rindex(b'"usage"') + 30]
        self.assertEqual(read(cut, contentType=b"application/json"), Usage(CHAT.model))
        for body in (
            b"",
            b"null",
            b"[1, 2, 3]",
            b'"usage"',
            b'{"usage": null}',
            b'{"usage": [1]}',
            b"\xff\xfe\x00{",
            b"[" * 100000,
        ):
            self.assertIsNone(read(body, contentType=b"application/json"), body[:20])

    def test_usageNullWithModel(self):
        self.assertEqual(read(b'{"model": "m", "usage": null}', contentType=b"application/json"), Usage("m"))

    def test_notWatched(self):
        """
        Other content types, unknown or stacked content codings: a watch
        that holds nothing and finishes with nothing.
        """
        for contentType, encoding in (
            (b"text/plain", None),
            (None, None),
            (b"text/html", None),
            (b"text/event-stream", b"br"),
            (b"application/json", b"zstd"),
            (b"application/json", b"gzip, gzip"),
            (b"application/json", b"compress"),
        ):
            watched = Watched(contentType, encoding).feed(CHAT_JSON)
            self.assertEqual((watched.mostBuffered, watched.finish()), (0, None), (contentType, encoding))

    def test_mediaTypes(self):
        self.assertEqual(read(CHAT_JSON, contentType=b"Application/JSON; charset=utf-8"), CHAT)
        self.assertEqual(read(CHAT_JSON, contentType=b"application/vnd.openrouter+json"), CHAT)
        self.assertEqual(read(CHAT_STREAM, contentType=b"Text/Event-Stream; charset=utf-8"), CHAT)
        self.assertEqual(read(CHAT_JSON, contentType=b"application/json", encoding=b"identity"), CHAT)

    def test_finishTwice(self):
        watched = Watched().feed(CHAT_STREAM)
        self.assertEqual(watched.finish(), CHAT)
        self.assertEqual(watched.finish(), CHAT)
        watched.feed(sse(chatChunk("", "stop", {"prompt_tokens": 1})))
        self.assertEqual((watched.watch.buffered, watched.finish()), (0, CHAT))

    def test_aBugIsLoggedOnce(self):
        """
        Should the watch fail, it logs why once and stops watching; it
        never raises.
        """
        def broken(verdict):
            raise RuntimeError("broken")

        watch = watchAnswer(headersOf(), report=broken, now=lambda: NOW)
        watch.dataReceived(errorEvent())
        watch.dataReceived(errorEvent())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIsNone(watch.finish())

    def test_unwatchedAnswerWatch(self):
        watch = AnswerWatch()
        watch.dataReceived(CHAT_JSON)
        self.assertEqual((watch.buffered, watch.finish()), (0, None))


def bigText(size: int) -> str:
    # JSON escapes, multi-byte characters and words that look like keys
    return ("lorem \"usage\": {\"prompt_tokens\": 1} model ü€ \n" * (size // 40 + 1))[:size]


class OversizedTests(SynchronousTestCase):
    def test_hugeResponsesCompletedEvent(self):
        """
        A C{response.completed} event far longer than the event limit is
        held by its head and tail, within the limit; its usage (in the
        tail) and its model (in the head) are found, in one read or in
        many.
        """
        stream = responsesStream(bigText(1_000_000))
        self.assertGreater(len(stream), 20 * STREAM_LIMIT)
        for pieces in ([stream], inReads(stream, 16384), inReads(stream, 1000), oddSplits(stream)):
            watched = Watched().feed(*pieces)
            self.assertLessEqual(watched.mostBuffered, STREAM_LIMIT)
            self.assertEqual(watched.finish(), RESPONSES)

    def test_hugeEventWithoutBlankLine(self):
        stream = responsesStream(bigText(300_000)).rstrip(b"\n")
        watched = Watched().feed(*inReads(stream, 5000))
        self.assertEqual(watched.finish(), RESPONSES)

    def test_eventsAfterAHugeOneAreRead(self):
        stream = sse(chatChunk(bigText(200_000)), name=False)
        for pieces in (inReads(stream, 999), [stream]):
            watched = Watched().feed(*pieces)
            watched.feed(*byteByByte(errorEvent() + sse(chatChunk("", "stop", CHAT_USAGE))))
            self.assertLessEqual(watched.mostBuffered, STREAM_LIMIT)
            self.assertEqual(watched.finish(), CHAT)
            self.assertEqual(watched.verdicts, [ERROR])

    def test_blankLineStraddlesReads(self):
        big = sse(chatChunk(bigText(100_000)))
        for cut in (1, 2, 3):
            for ending in (b"\n", b"\r\n", b"\r"):
                stream = big.replace(b"\n\n", ending * 2) + sse(chatChunk("", "stop", CHAT_USAGE))
                at = len(big.replace(b"\n\n", ending * 2)) - cut
                watched = Watched().feed(stream[:at], stream[at:])
                self.assertEqual(watched.finish(), CHAT, (cut, ending))

    def test_usageNotInTheTail(self):
        """
        A huge event whose usage is not near its end gives nothing (and
        costs nothing), however it is read.
        """
        event = chatChunk("", "stop", CHAT_USAGE)
        event["extra"] = bigText(100_000)
        self.assertIsNone(read(*inReads(sse(event), 1000)))
        self.assertIsNone(read(sse(event)))

    def test_endlessEvent(self):
        watched = Watched()
        for _ in range(300):
            watched.feed(b"data: " + b"z" * 10000 + b"\n")
        self.assertLessEqual(watched.mostBuffered, STREAM_LIMIT)
        self.assertIsNone(watched.finish())

    def test_hugeJSONAnswer(self):
        body = json.loads(CHAT_JSON)
        body["choices"][0]["message"]["content"] = bigText(2_000_000)
        body = json.dumps(body).encode()
        for pieces in ([body], inReads(body, 16384), oddSplits(body)):
            watched = Watched(b"application/json").feed(*pieces)
            self.assertLessEqual(watched.mostBuffered, BODY_LIMIT)
            self.assertEqual(watched.finish(), CHAT)

    def test_hugeResponsesJSON(self):
        body = json.dumps(responseObject(RESPONSES_USAGE, text=bigText(BODY_LIMIT))).encode()
        watched = Watched(b"application/json").feed(*inReads(body, 4096))
        self.assertLessEqual(watched.mostBuffered, BODY_LIMIT)
        self.assertEqual(watched.finish(), RESPONSES)

    def test_jsonAtTheLimit(self):
        body = json.loads(CHAT_JSON)
        body["choices"][0]["message"]["content"] = ""
        pad = BODY_LIMIT - len(json.dumps(body))
        body["choices"][0]["message"]["content"] = "x" * pad
        body = json.dumps(body).encode()
        self.assertEqual(len(body), BODY_LIMIT)
        for extra in (b"", b" " * 10, b" " * (BODY_LIMIT * 2)):
            watched = Watched(b"application/json").feed(*inReads(body + extra, 1000))
            self.assertLessEqual(watched.mostBuffered, BODY_LIMIT)
            # Beyond the limit the usage must be in the tail: trailing space
            # longer than the tail hides it.
            expected = None if len(extra) > BODY_LIMIT else CHAT
            self.assertEqual(watched.finish(), expected, len(extra))

    def test_hugeMalformed(self):
        for body in (b"{" + b"x" * 1_000_000, b'{"usage": {' + b'"a": 1,' * 200_000,
                     b"x" * 500_000 + b'"usage": {"prompt_tokens": 1,'):
            watched = Watched(b"application/json").feed(*inReads(body, 10000))
            self.assertIsNone(watched.finish())
            watched = Watched().feed(b"data: " + body, b"\n\n")
            self.assertIsNone(watched.finish())


def deflated(data: bytes, wbits: int) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return compressor.compress(data) + compressor.flush()


class CompressedTests(SynchronousTestCase):
    def test_gzip(self):
        body = gzip.compress(CHAT_JSON)
        self.assertEqual(read(body, contentType=b"application/json", encoding=b"gzip"), CHAT)
        self.assertEqual(read(*byteByByte(body), contentType=b"application/json", encoding=b"GZip"), CHAT)

    def test_gzipStream(self):
        stream = gzip.compress(CHAT_STREAM + responsesStream(bigText(100_000)))
        expected = RESPONSES
        self.assertEqual(read(stream, encoding=b"gzip"), expected)
        self.assertEqual(read(*oddSplits(stream), encoding=b"x-gzip"), expected)
        self.assertEqual(read(*byteByByte(gzip.compress(CHAT_STREAM)), encoding=b"gzip"), CHAT)

    def test_gzipFlushedPerEvent(self):
        """
        A stream compressed as it goes, one flush per event, as a server
        that streams gzip sends it.
        """
        compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        reads = [compressor.compress(event + b"\n\n") + compressor.flush(zlib.Z_SYNC_FLUSH)
                 for event in CHAT_STREAM.split(b"\n\n")[:-1]]
        reads.append(compressor.flush())
        self.assertEqual(read(*reads, encoding=b"gzip"), CHAT)

    def test_errorInAGzipStream(self):
        watched = Watched(encoding=b"gzip").feed(*oddSplits(gzip.compress(CHAT_STREAM + errorEvent())))
        self.assertEqual(watched.verdicts, [ERROR])

    def test_gzipMembers(self):
        body = gzip.compress(CHAT_JSON[:100]) + gzip.compress(CHAT_JSON[100:])
        self.assertEqual(read(body, contentType=b"application/json", encoding=b"gzip"), CHAT)
        self.assertEqual(read(*byteByByte(body), contentType=b"application/json", encoding=b"gzip"), CHAT)

    def test_manyEmptyMembers(self):
        body = gzip.compress(b"") * 20000 + gzip.compress(CHAT_JSON)
        self.assertEqual(read(body, contentType=b"application/json", encoding=b"gzip"), CHAT)

    def test_garbageAfterTheEnd(self):
        for tail in (b"\x00", b"garbage" * 100, b"\n"):
            body = gzip.compress(CHAT_JSON) + tail
            self.assertEqual(read(body, contentType=b"application/json", encoding=b"gzip"), CHAT)
            body = deflated(CHAT_JSON, zlib.MAX_WBITS) + tail
            self.assertEqual(read(body, contentType=b"application/json", encoding=b"deflate"), CHAT)

    def test_deflate(self):
        """
        deflate is zlib-wrapped, or raw deflate as browsers accept too.
        """
        for wbits in (zlib.MAX_WBITS, -zlib.MAX_WBITS):
            body = deflated(CHAT_JSON, wbits)
            self.assertEqual(read(body, contentType=b"application/json", encoding=b"deflate"), CHAT)
            self.assertEqual(
                read(*byteByByte(body), contentType=b"application/json", encoding=b"deflate"), CHAT, wbits
            )
            stream = deflated(MESSAGES_STREAM, wbits)
            self.assertEqual(read(*oddSplits(stream), encoding=b"Deflate"), MESSAGES, wbits)

    def test_corrupt(self):
        """
        A corrupt body stops the watch, which finishes with nothing.
        """
        body = bytearray(gzip.compress(CHAT_JSON * 5))
        body[40:60] = b"\xff" * 20
        for pieces in ([bytes(body)], byteByByte(bytes(body))):
            self.assertIsNone(read(*pieces, contentType=b"application/json", encoding=b"gzip"))
        self.assertIsNone(read(b"not gzip at all", contentType=b"application/json", encoding=b"gzip"))
        self.assertIsNone(read(b"\xff\xff\xff\xff", encoding=b"deflate"))
        self.assertIsNone(read(CHAT_STREAM, encoding=b"deflate"))

    def test_empty(self):
        self.assertIsNone(read(b"", contentType=b"application/json", encoding=b"gzip"))
        self.assertIsNone(read(b"\x1f", contentType=b"application/json", encoding=b"gzip"))
        self.assertIsNone(read(b"x", encoding=b"deflate"))

    def bomb(self, size: int) -> list[bytes]:
        """
        C{size} bytes of zeros, gzipped, in 16 KiB reads.
        """
        compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        zeros = bytes(1 << 20)
        body = b"".join(compressor.compress(zeros) for _ in range(size >> 20)) + compressor.flush()
        return inReads(body, 16384)

    def test_gzipBomb(self):
        """
        200 MB of zeros in a 200 KB answer: it costs the time to expand it,
        but the watch's memory stays bounded, and it finishes.
        """
        reads = self.bomb(200 << 20)
        self.assertLess(sum(map(len, reads)), 300_000)
        for contentType, bound in ((b"application/json", BODY_LIMIT), (b"text/event-stream", STREAM_LIMIT)):
            watched = Watched(contentType, b"gzip").feed(*reads)
            self.assertLessEqual(watched.mostBuffered, bound)
            self.assertIsNone(watched.finish())

    def test_bombMemory(self):
        """
        Expanding a bomb never holds more than a few steps of its output,
        counting what zlib allocates.
        """
        reads = self.bomb(32 << 20)
        tracemalloc.start()
        try:
            watched = Watched(b"application/json", b"gzip")
            tracemalloc.reset_peak()
            start, _ = tracemalloc.get_traced_memory()
            watched.feed(*reads)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(peak - start, 2 * BODY_LIMIT + (1 << 20))
        self.assertIsNone(watched.finish())


class ErrorTests(SynchronousTestCase):
    """
    Mid-stream errors are judged as L{hermux.streamwatch} judges them, once.
    """

    def test_verdictsAsQuotaJudges(self):
        """
        The first error event of a stream is judged as
        L{hermux.streamwatch.verdictOf} judges it, however the stream is
        split; other events, comments and malformed events are not.
        """
        chunk = sse(chatChunk("a"))

        def verdictOfEvent(event: bytes):
            return verdictOf(json.loads(event[len(b"data: ") :]), NOW)

        for stream, expected in (
            (chunk * 3 + errorEvent(), [ERROR]),
            (chunk + errorEvent(502), [ERROR]),
            (chunk + PLATFORM_LIMIT + errorEvent(), [verdictOfEvent(PLATFORM_LIMIT)]),
            (chunk + PROVIDER_LIMIT, [verdictOfEvent(PROVIDER_LIMIT)]),
            (chunk + b'data: {"error": null}\n\n' + b'data: {"error": {"code": 500}\n\n', []),
            (chunk + errorEvent().rstrip(b"\n"), [ERROR]),
            (chunk + errorEvent().replace(b"\n", b"\r\n"), [ERROR]),
            (b': {"error": {"code": 500}}\n\n' + chunk, []),
            (CHAT_STREAM, []),
        ):
            self.assertNotIn(None, expected)
            for pieces in ([stream], byteByByte(stream), oddSplits(stream)):
                watched = Watched().feed(*pieces)
                watched.finish()
                self.assertEqual(watched.verdicts, expected, stream)

    def test_everySplit(self):
        stream = sse(chatChunk("a")) + errorEvent() + sse(chatChunk("", "error", CHAT_USAGE))
        for at in range(len(stream) + 1):
            watched = Watched().feed(stream[:at], stream[at:])
            self.assertEqual((watched.verdicts, watched.finish()), ([ERROR], CHAT), at)

    def test_reportedOnce(self):
        """
        The first error is reported, once; the usage after it is still read.
        """
        watched = Watched().feed(errorEvent(), PLATFORM_LIMIT, errorEvent(502))
        watched.feed(sse(chatChunk("", "error", CHAT_USAGE)))
        self.assertEqual((watched.verdicts, watched.finish()), ([ERROR], CHAT))

    def test_errorsAreNotParsedOnceReported(self):
        counting = CountingJSON()
        self.patch(hermux.usage, "json", counting)
        Watched().feed(*[errorEvent() for _ in range(10)]).finish()
        self.assertEqual(len(counting.parsed), 1)

    def test_platformLimit(self):
        (verdict,) = Watched().feed(*byteByByte(PLATFORM_LIMIT)).verdicts
        self.assertEqual((verdict.kind, verdict.until), (Kind.COOLING, RESET))

    def test_errorFromTheErrorEvent(self):
        """
        An error event's model is the answer's.
        """
        watched = Watched().feed(errorEvent())
        self.assertEqual(watched.finish(), Usage("openai/gpt-4o"))

    def test_messagesErrorEvent(self):
        stream = MESSAGES_STREAM.split(b"event: content_block_delta")[0] + (
            b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", '
            b'"message": "Overloaded"}}\n\n'
        )
        watched = Watched().feed(stream)
        self.assertEqual(watched.verdicts, [ERROR])

    def test_oversizedErrorIsSkipped(self):
        """
        As before, an error event longer than the limit is not judged; one
        after it is, when the stream ends.
        """
        watched = Watched().feed(*inReads(errorEvent(message="x" * (2 * STREAM_LIMIT)), 100))
        self.assertEqual(watched.verdicts, [])
        watched.feed(errorEvent())
        watched.finish()
        self.assertEqual(watched.verdicts, [ERROR])

    def test_noErrorsInJSON(self):
        watched = Watched(b"application/json").feed(errorEvent()[6:])
        watched.finish()
        self.assertEqual(watched.verdicts, [])


class AcceptEncodingTests(SynchronousTestCase):
    def assertUpstream(self, client, expected: bytes):
        self.assertEqual(upstreamAcceptEncoding(client), expected, client)

    def test_none(self):
        self.assertUpstream(None, b"identity")
        self.assertUpstream([], b"identity")
        self.assertUpstream([b""], b"identity")

    def test_onlyWhatZlibDecodes(self):
        self.assertUpstream([b"gzip, deflate, br, zstd"], b"gzip, deflate")
        self.assertUpstream([b"br"], b"identity")
        self.assertUpstream([b"br, zstd;q=1"], b"identity")
        self.assertUpstream([b"identity"], b"identity")
        self.assertUpstream([b"compress"], b"identity")

    def test_clientsOrder(self):
        self.assertUpstream([b"deflate, gzip"], b"deflate, gzip")
        self.assertUpstream([b"br", b"deflate", b"gzip"], b"deflate, gzip")

    def test_qualities(self):
        self.assertUpstream([b"gzip;q=0"], b"identity")
        self.assertUpstream([b"gzip; q=0.000, deflate;q=0.5"], b"deflate")
        self.assertUpstream([b"gzip;Q=0.001"], b"gzip")
        self.assertUpstream([b"gzip;q=nonsense, deflate"], b"deflate")
        self.assertUpstream([b"gzip;level=1;q=0"], b"identity")

    def test_star(self):
        self.assertUpstream([b"*"], b"gzip, deflate")
        self.assertUpstream([b"br, *;q=0.1"], b"gzip, deflate")
        self.assertUpstream([b"*, gzip;q=0"], b"deflate")
        self.assertUpstream([b"deflate, *"], b"deflate, gzip")
        self.assertUpstream([b"*;q=0"], b"identity")
        self.assertUpstream([b"gzip, *;q=0"], b"gzip")

    def test_caseAndSpace(self):
        self.assertUpstream([b"  GZip ;  q=0.8 ,\tDEFLATE  "], b"gzip, deflate")
        self.assertUpstream([b",,gzip,,"], b"gzip")

    def test_xGzipAndRepeats(self):
        self.assertUpstream([b"x-gzip"], b"gzip")
        self.assertUpstream([b"gzip, x-gzip, gzip"], b"gzip")
        self.assertUpstream([b"gzip;q=0, gzip"], b"identity")


class RequestedModelTests(SynchronousTestCase):
    def assertRequested(self, body, expected, contentType=b"application/json"):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        # Only what the pool reads; names has tests of its own.
        self.assertEqual(requestedModel(body, contentType)[:2], expected[:2], body[:80])

    def assertNames(self, body, names, contentType=b"application/json"):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self.assertEqual(requestedModel(body, contentType).names, names, body[:80])

    def test_names(self):
        """
        C{names} lists every model a JSON object names, C{model} first, and
        is empty when it names none.
        """
        self.assertNames({"model": "a"}, ("a",))
        self.assertNames({"model": "a", "models": ["b", "c:free"]}, ("a", "b", "c:free"))
        self.assertNames({"models": ["b", 7, None]}, ("b", "7", "null"))
        self.assertNames({"model": 12, "models": ["a:free"]}, ("a:free",))
        self.assertNames({"messages": []}, ())
        self.assertNames({"model": 12}, ())
        self.assertNames({"models": []}, ())

    def test_namesOfNoJSONObject(self):
        """
        A body that is not a JSON object names nothing hermux can read:
        L{None}, not an empty tuple.
        """
        self.assertNames(b"", None)
        self.assertNames(b'["model"]', None)
        self.assertNames(b"{", None)
        self.assertNames({"model": "a"}, None, b"text/plain")

    def test_paidAndFree(self):
        self.assertRequested({"model": "openai/gpt-4o", "messages": []}, RequestedModel("openai/gpt-4o", False))
        self.assertRequested({"model": "meta-llama/llama-3.3-70b-instruct:free"},
                             RequestedModel("meta-llama/llama-3.3-70b-instruct:free", True))
        self.assertRequested({"model": "x:FREE"}, RequestedModel("x:FREE", False))
        self.assertRequested({"model": "x:free-ish"}, RequestedModel("x:free-ish", False))

    def test_modelsList(self):
        self.assertRequested({"model": "a:free", "models": ["b:free", "c:free"]}, RequestedModel("a:free", True))
        self.assertRequested({"model": "a:free", "models": ["b:free", "c"]}, RequestedModel("a:free", False))
        self.assertRequested({"model": "a", "models": ["b:free"]}, RequestedModel("a", False))
        self.assertRequested({"models": ["b:free", "c:free"]}, RequestedModel(None, True))
        self.assertRequested({"models": ["b:free", "c"]}, RequestedModel(None, False))
        self.assertRequested({"models": ["b:free", 7]}, RequestedModel(None, False))
        self.assertRequested({"model": "a:free", "models": []}, RequestedModel("a:free", True))
        self.assertRequested({"model": "a:free", "models": "b"}, RequestedModel("a:free", True))
        self.assertRequested({"models": []}, RequestedModel())

    def test_noModel(self):
        self.assertRequested({"messages": [{"role": "user", "content": "hi"}]}, RequestedModel())
        self.assertRequested({"model": None}, RequestedModel())
        self.assertRequested({"model": 12}, RequestedModel())
        self.assertRequested({"model": ["a:free"]}, RequestedModel())
        self.assertRequested({"model": 12, "models": ["a:free"]}, RequestedModel(None, True))

    def test_contentTypes(self):
        body = {"model": "a:free"}
        self.assertRequested(body, RequestedModel("a:free", True), b"application/json; charset=utf-8")
        self.assertRequested(body, RequestedModel("a:free", True), b"Application/JSON")
        self.assertRequested(body, RequestedModel("a:free", True), b"application/merge-patch+json")
        self.assertRequested(body, RequestedModel("a:free", True), None)
        self.assertRequested(b' \n{"model": "a"}', RequestedModel("a", False), None)
        self.assertRequested(body, RequestedModel(), b"text/plain")
        self.assertRequested(body, RequestedModel(), b"multipart/form-data; boundary=x")
        self.assertRequested(body, RequestedModel(), b"application/x-www-form-urlencoded")
        self.assertRequested(b'["model"]', RequestedModel(), None)
        self.assertRequested(b"model=a:free", RequestedModel(), None)

    def test_malformed(self):
        for body in (b"", b"{", b'{"model": "a"', b"\xff\xfe{}", b"[" * 100000, b'"a:free"', b"null",
                     b'{"model": "a", "model": "b:free"} x', b"{" * 100000):
            self.assertRequested(body, RequestedModel())

    def test_encodings(self):
        body = json.dumps({"model": "a:free"}).encode("utf-16")
        self.assertRequested(body, RequestedModel("a:free", True))
        self.assertRequested(b'{"model": "\\u00e9:free"}', RequestedModel("\u00e9:free", True))
