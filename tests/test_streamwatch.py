"""
Tests for L{hermux.streamwatch}: the scanner on its own, fed in every split,
and in memory behind the relay, where a mid-stream error counts against the
key that streamed it and the stream reaches the client unchanged.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from hermux.config import Key
from hermux.keypool import ERROR, Kind, State
from hermux.quota import COOLING_DEFAULT
from hermux.streamwatch import verdictOf
from hermux.usage import STREAM_LIMIT, watchAnswer
from tests.harness import ACCESS_TOKEN
from tests.memory import NOW, MemoryProxy, ScriptedUpstream

RESET = NOW + 40  # when the key's platform rate limit ends

CHUNK = (
    b'data: {"id":"cmpl-abc","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"openai/gpt-4o","provider":"openai","choices":[{"index":0,'
    b'"delta":{"content":"Hello"},"finish_reason":null}]}\n\n'
)


def errorEvent(code="server_error", metadata=None, message="Provider disconnected unexpectedly") -> bytes:
    """
    An SSE event as OpenRouter sends an error after the first byte.
    """
    error = {"code": code, "message": message}
    if metadata is not None:
        error["metadata"] = metadata
    event = {
        "id": "cmpl-abc",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "openai/gpt-4o",
        "provider": "openai",
        "error": error,
        "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


PLATFORM_LIMIT = errorEvent(
    429,
    {
        "error_type": "rate_limit_exceeded",
        "headers": {
            "X-RateLimit-Limit": "20",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(int(RESET * 1000)),
        },
    },
    "Rate limit exceeded: free-models-per-min.",
)
PROVIDER_LIMIT = errorEvent(429, {"error_type": "rate_limit_exceeded"}, "Rate limited upstream")


class Watched:
    """
    The watch of an event stream (L{hermux.usage.watchAnswer}) and what it
    reported.  It reads the stream's first 4 KiB as they come, the rest
    when the stream ends (L{finish}).
    """

    def __init__(self):
        self.verdicts = []
        self.watch = watchAnswer(
            Headers({b"content-type": [b"text/event-stream"]}),
            report=self.verdicts.append,
            now=lambda: NOW,
        )
        self.mostBuffered = 0

    def finish(self) -> list:
        self.watch.finish()
        return self.verdicts

    def feed(self, *pieces: bytes) -> list:
        for piece in pieces:
            self.watch.dataReceived(piece)
            self.mostBuffered = max(self.mostBuffered, self.watch.buffered)
        return self.verdicts


def byteByByte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


class ScannerTests(SynchronousTestCase):
    def test_errorEventIsReported(self):
        self.assertEqual(Watched().feed(CHUNK, CHUNK, errorEvent()), [ERROR])

    def test_numericCodeIsAnError(self):
        self.assertEqual(Watched().feed(CHUNK, errorEvent(502)), [ERROR])

    def test_byteByByte(self):
        stream = CHUNK + errorEvent() + b"data: [DONE]\n\n"
        self.assertEqual(Watched().feed(*byteByByte(stream)), [ERROR])

    def test_everySplit(self):
        """
        Split anywhere in two reads, the error event is found once.
        """
        stream = CHUNK + errorEvent()
        for at in range(len(stream) + 1):
            self.assertEqual(Watched().feed(stream[:at], stream[at:]), [ERROR], at)

    def test_oddSplits(self):
        stream = (CHUNK * 3 + errorEvent()) * 1
        pieces, at, size = [], 0, 1
        while at < len(stream):
            pieces.append(stream[at : at + size])
            at += size
            size = size * 3 % 97 + 1
        self.assertEqual(Watched().feed(*pieces), [ERROR])

    def test_crlfLineEndings(self):
        stream = (CHUNK + errorEvent()).replace(b"\n", b"\r\n")
        self.assertEqual(Watched().feed(*byteByByte(stream)), [ERROR])

    def test_crLineEndings(self):
        stream = (CHUNK + errorEvent()).replace(b"\n", b"\r")
        self.assertEqual(Watched().feed(stream), [ERROR])

    def test_commentsAndOtherFields(self):
        stream = (
            b": OPENROUTER PROCESSING\n\n"
            b': "error" in a comment\n\n'
            b"event: message\nid: 7\nretry: 10\n" + errorEvent()
        )
        self.assertEqual(Watched().feed(*byteByByte(stream)), [ERROR])

    def test_commentAloneIsNothing(self):
        self.assertEqual(Watched().feed(b': {"error": {"code": 500}}\n\n'), [])

    def test_multiLineData(self):
        """
        The data lines of one event are joined with line feeds before they
        are parsed.
        """
        stream = (
            b'data: {"error":\r\ndata: {"code": "server_error"},\r\n'
            b'data:"choices": []}\r\n\r\n'
        )
        self.assertEqual(Watched().feed(*byteByByte(stream)), [ERROR])

    def test_nonErrorEvents(self):
        content = b'data: {"choices":[{"delta":{"content":"say \\"error\\" twice"}}]}\n\n'
        stream = CHUNK * 5 + content + b'data: {"error": null}\n\n' + b"data: [DONE]\n\n"
        self.assertEqual(Watched().feed(stream), [])
        self.assertEqual(Watched().feed(*byteByByte(stream)), [])

    def test_malformedJSON(self):
        stream = (
            b'data: {"error": {"code": 500\n\n'
            b'data: "error"\xff\xfe\n\n'
            b'data: ["error"]\n\n'
            b'data: ' + b"[" * 100000 + b'"error"\n\n'
        )
        watched = Watched()
        self.assertEqual(watched.feed(stream), [])
        watched.feed(errorEvent())
        self.assertEqual(watched.finish(), [ERROR])

    def test_finishJudgesAnUnterminatedEvent(self):
        watched = Watched()
        watched.feed(CHUNK, errorEvent().rstrip(b"\n"))
        self.assertEqual(watched.verdicts, [])
        watched.watch.finish()
        self.assertEqual(watched.verdicts, [ERROR])
        watched.watch.finish()
        self.assertEqual(watched.verdicts, [ERROR])

    def test_finishAfterACleanStream(self):
        watched = Watched()
        watched.feed(CHUNK, b"data: [DONE]")
        watched.watch.finish()
        self.assertEqual(watched.verdicts, [])

    def test_reportsOnce(self):
        self.assertEqual(Watched().feed(errorEvent(), errorEvent(502), errorEvent()), [ERROR])

    def test_oversizedEventIsSkipped(self):
        """
        An event longer than what the watch keeps is skipped, never held:
        the watch's buffer stays bounded, and the events after it are read.
        """
        big = errorEvent(message="x" * (2 * STREAM_LIMIT))
        watched = Watched()
        pieces = [big[i : i + 100] for i in range(0, len(big), 100)]
        self.assertEqual(watched.feed(*pieces), [])
        self.assertLessEqual(watched.mostBuffered, STREAM_LIMIT)
        watched.feed(*byteByByte(CHUNK + errorEvent()))
        self.assertEqual(watched.finish(), [ERROR])
        self.assertLessEqual(watched.mostBuffered, STREAM_LIMIT)

    def test_oversizedInOneRead(self):
        watched = Watched()
        watched.feed(b"data: " + b"y" * (5 * STREAM_LIMIT))
        self.assertLessEqual(watched.mostBuffered, STREAM_LIMIT)
        watched.feed(b"\r\n", b"\r\n" + errorEvent())
        self.assertEqual(watched.finish(), [ERROR])

    def test_endlessStreamWithoutBlankLines(self):
        watched = Watched()
        for _ in range(100):
            watched.feed(b"data: " + b"z" * 10000 + b"\n")
        self.assertLessEqual(watched.mostBuffered, STREAM_LIMIT)
        self.assertEqual(watched.finish(), [])



class VerdictTests(SynchronousTestCase):
    def test_notAnError(self):
        for event in ({}, [], "error", {"error": None}, {"choices": []}):
            self.assertIsNone(verdictOf(event, NOW), event)

    def test_platformRateLimitCools(self):
        verdict = Watched().feed(PLATFORM_LIMIT)[0]
        self.assertEqual((verdict.kind, verdict.until), (Kind.COOLING, RESET))

    def test_platformLimitWithoutReset(self):
        event = errorEvent(
            "rate_limit_exceeded", {"headers": {"X-RateLimit-Remaining": "0"}}, "Rate limit exceeded"
        )
        verdict = Watched().feed(event)[0]
        self.assertEqual((verdict.kind, verdict.until), (Kind.COOLING, NOW + COOLING_DEFAULT))

    def test_dailyPlatformLimitExhausts(self):
        event = errorEvent(
            429,
            {"error_type": "rate_limit_exceeded", "headers": {"X-RateLimit-Reset": "1800050000000"}},
            "Rate limit exceeded: free-models-per-day.",
        )
        self.assertEqual(Watched().feed(event)[0].kind, Kind.EXHAUSTED)

    def test_providerRateLimitIsBusy(self):
        verdict = Watched().feed(PROVIDER_LIMIT)[0]
        self.assertEqual(verdict.kind, Kind.BUSY)
        self.assertFalse(verdict.penalizes)


KEY = Key("alpha", "sk-or-v1-test-alpha-4f1c9e0b7d2a")


def sseAnswer(body: bytes, length: bool = True) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    if length:
        head += b"Content-Length: %d\r\n" % (len(body),)
    return head + b"\r\n" + body


class RelayTests(SynchronousTestCase):
    """
    A mid-stream error behind the relay, from an upstream that streams it.
    """

    def relayed(self, body: bytes, length: bool = True):
        proxy = MemoryProxy(
            self,
            keys=(KEY,),
            accessTokens=(ACCESS_TOKEN,),
            upstreamFactory=ScriptedUpstream(sseAnswer(body, length)),
        )
        response, received = proxy.chatted(stream=True)
        self.assertEqual(response.code, 200)
        self.assertEqual(received, body)
        (status,) = proxy.pool.statuses()
        return proxy, status

    def test_midStreamErrorCountsAgainstTheKey(self):
        _, status = self.relayed(CHUNK * 3 + errorEvent())
        self.assertEqual((status.errorsToday, status.rateLimitedToday), (1, 0))
        self.assertEqual(status.state, State.READY)

    def test_cleanStreamCountsNothing(self):
        _, status = self.relayed(CHUNK * 3 + b"data: [DONE]\n\n", length=False)
        self.assertEqual((status.errorsToday, status.rateLimitedToday), (0, 0))

    def test_midStreamPlatformLimitCoolsTheKey(self):
        proxy, status = self.relayed(CHUNK + PLATFORM_LIMIT, length=False)
        self.assertEqual((status.errorsToday, status.rateLimitedToday), (0, 1))
        self.assertEqual((status.state, status.usableAt), (State.COOLING, RESET))
        proxy.advance(RESET - proxy.clock.seconds())
        self.assertEqual(proxy.pool.statuses()[0].state, State.READY)

    def test_midStreamProviderLimitIsCountedOnly(self):
        _, status = self.relayed(CHUNK + PROVIDER_LIMIT)
        self.assertEqual((status.errorsToday, status.rateLimitedToday), (0, 1))
        self.assertEqual(status.state, State.READY)

    def test_lastEventWithoutBlankLine(self):
        """
        An error event that ends the stream without its blank line is
        judged when the stream ends cleanly.
        """
        _, status = self.relayed(CHUNK + errorEvent().rstrip(b"\n"))
        self.assertEqual((status.errorsToday, status.rateLimitedToday), (1, 0))

    def test_fakeMidStreamError(self):
        """
        The fake OpenRouter's mid-stream error, after a few events, counts
        as an error of the key that streamed it; the client gets the stream
        as it was sent.
        """
        proxy = MemoryProxy(self, keys=(KEY,), accessTokens=(ACCESS_TOKEN,))
        proxy.fake.midStreamErrorNext(afterEvents=3)
        response, received = proxy.chatted(stream=True)
        self.assertEqual(response.code, 200)
        self.assertIn(b'"finish_reason": "error"', received)
        self.assertEqual(received.count(b"\n\n"), 4)
        self.assertEqual(proxy.pool.statuses()[0].errorsToday, 1)

    def test_fakeMidStreamRateLimit(self):
        proxy = MemoryProxy(self, keys=(KEY,), accessTokens=(ACCESS_TOKEN,))
        proxy.fake.midStreamErrorNext(rateLimitReset=RESET)
        response, _ = proxy.chatted(stream=True)
        (status,) = proxy.pool.statuses()
        self.assertEqual((status.state, status.usableAt, status.rateLimitedToday), (State.COOLING, RESET, 1))

    def test_notAnEventStream(self):
        """
        Only event streams are watched.
        """
        body = errorEvent()
        proxy = MemoryProxy(
            self,
            keys=(KEY,),
            accessTokens=(ACCESS_TOKEN,),
            upstreamFactory=ScriptedUpstream(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % (len(body),) + body
            ),
        )
        _, received = proxy.chatted()
        self.assertEqual(received, body)
        self.assertEqual(proxy.pool.statuses()[0].errorsToday, 0)
