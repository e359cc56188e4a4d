"""
The public fake OpenRouter of L{hermux.testing}, in memory: a L{StubTreq}
over the fake resource, and a L{Clock} to release streamed events; and the
demo mode that serves it.
"""

from __future__ import annotations

import json
import re
import zlib
from decimal import Decimal

import treq
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.web.server import Site

from hermux.demo import DemoUpstream
from hermux.keypool import ERROR, Kind
from hermux.quota import classify
from hermux.relay import BufferedBody
from hermux.testing import (
    FAKE_ANSWER,
    FAKE_MODEL,
    FakeOpenRouter,
    FakePrice,
    ReportedUsage,
    fakeSite,
)
from hermux.upstream import Upstream
from tests.memory import MemoryNetwork, RawClient

KEYS = ("sk-test-one-1a2b", "sk-test-two-3c4d")
CHAT = "/api/v1/chat/completions"
FREE = "test/model:free"
WORDS = FAKE_ANSWER.split()


def chatBody(**extra) -> bytes:
    return json.dumps(
        {"model": "test/model", "messages": [{"role": "user", "content": "hi"}], **extra}
    ).encode()


def splitEvents(stream: bytes) -> list[bytes]:
    """
    The server-sent events in C{stream}, without their blank-line ends.
    """
    return [event for event in stream.split(b"\n\n") if event]


def dataOf(event: bytes):
    """
    The JSON payload of a C{data:} event.
    """
    return json.loads(event[len(b"data: ") :])


class _Collector(Protocol):
    """
    Collects a response body and how it ended.
    """

    def __init__(self):
        self.received = []
        self.reason = None

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason):
        self.reason = reason

    def value(self) -> bytes:
        return b"".join(self.received)


class FakeTestCase(SynchronousTestCase):
    """
    A fake that accepts L{KEYS}, paced by a L{Clock}, behind a L{StubTreq}.
    """

    def setUp(self):
        self.clock = Clock()
        self.useFake(FakeOpenRouter(KEYS, reactor=self.clock))

    def useFake(self, fake: FakeOpenRouter):
        self.fake = fake
        self.stub = StubTreq(fake)

    def send(self, method, path, *, key=KEYS[0], data=None, headers=None, unbuffered=False):
        """
        Send a request to the fake; the Deferred fires with the response.
        """
        headers = dict(headers or {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return self.stub.request(
            method, "http://openrouter.test" + path, headers=headers, data=data,
            unbuffered=unbuffered,
        )

    def respond(self, method, path, **kwargs):
        """
        Send a request that is answered at once, and return its response.
        """
        return self.successResultOf(self.send(method, path, **kwargs))

    def chat(self, key=KEYS[0], **extra):
        return self.respond("POST", CHAT, key=key, data=chatBody(**extra))

    def content(self, response) -> bytes:
        return self.successResultOf(treq.content(response))

    def json(self, response):
        return json.loads(self.content(response))

    def assertJSONError(self, response, code):
        self.assertEqual(response.code, code)
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["application/json"])
        body = self.json(response)
        self.assertEqual(body["error"]["code"], code)
        self.assertIsInstance(body["error"]["message"], str)


class KeyCheckTests(FakeTestCase):
    """
    The fake checks the Bearer key as OpenRouter does.
    """

    def test_missingKeyIsRefused(self):
        """
        A request without an Authorization header gets a 401 JSON error.
        """
        self.assertJSONError(self.respond("GET", "/api/v1/models", key=None), 401)

    def test_nonBearerCredentialsAreRefused(self):
        """
        Credentials in another scheme than Bearer count as no key.
        """
        response = self.respond(
            "GET", "/api/v1/models", key=None, headers={"Authorization": f"Basic {KEYS[0]}"}
        )
        self.assertJSONError(response, 401)

    def test_unknownKeyIsRefused(self):
        """
        A key that is not among those the fake was given gets a 401.
        """
        self.assertJSONError(self.chat(key="sk-test-unknown"), 401)
        self.assertEqual(self.fake.usedToday["sk-test-unknown"], 0)

    def test_everyGivenKeyIsAccepted(self):
        """
        Each of the keys the fake was given is accepted.
        """
        for key in KEYS:
            self.assertEqual(self.chat(key=key).code, 200)

    def test_anyKeyWithoutKeyList(self):
        """
        With C{keys=None} the fake accepts any Bearer key.
        """
        self.useFake(FakeOpenRouter(None, reactor=self.clock))
        response = self.chat(key="sk-whatever", model=FREE)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.fake.usedToday["sk-whatever"], 1)


class ChatCompletionTests(FakeTestCase):
    """
    POST /api/v1/chat/completions answers with the fake answer.
    """

    def test_answerShape(self):
        """
        A chat completion is a JSON object in OpenAI's shape: the fake
        answer as the assistant's message, usage, and the model asked for.
        """
        response = self.chat()
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["application/json"])
        body = self.json(response)
        self.assertEqual(body["object"], "chat.completion")
        self.assertEqual(body["model"], "test/model")
        self.assertIsInstance(body["id"], str)
        [choice] = body["choices"]
        self.assertEqual(choice["message"], {"role": "assistant", "content": FAKE_ANSWER})
        self.assertEqual(choice["finish_reason"], "stop")
        usage = body["usage"]
        self.assertEqual(usage["completion_tokens"], len(WORDS))
        self.assertEqual(
            usage["total_tokens"], usage["prompt_tokens"] + usage["completion_tokens"]
        )

    def test_modelDefaultsToFakeModel(self):
        """
        A request that names no model is answered by L{FAKE_MODEL}.
        """
        response = self.respond(
            "POST", CHAT, data=json.dumps({"messages": []}).encode()
        )
        self.assertEqual(self.json(response)["model"], FAKE_MODEL)

    def test_idsDiffer(self):
        """
        Each completion has its own id.
        """
        first = self.json(self.chat())["id"]
        second = self.json(self.chat())["id"]
        self.assertNotEqual(first, second)

    def test_maxTokensFewerWords(self):
        """
        C{max_tokens} smaller than the answer cuts it to that many words.
        """
        body = self.json(self.chat(max_tokens=3))
        self.assertEqual(body["choices"][0]["message"]["content"], " ".join(WORDS[:3]))
        self.assertEqual(body["usage"]["completion_tokens"], 3)

    def test_maxTokensMoreWords(self):
        """
        C{max_tokens} larger than the answer repeats its words to that count.
        """
        count = 2 * len(WORDS) + 1
        body = self.json(self.chat(max_tokens=count))
        words = body["choices"][0]["message"]["content"].split(" ")
        self.assertEqual(len(words), count)
        self.assertEqual(words, (WORDS * 3)[:count])
        self.assertEqual(body["usage"]["completion_tokens"], count)

    def test_nonJSONBodyIsRefused(self):
        """
        A chat body that is not JSON gets a 400 JSON error and is not
        counted as a completion.
        """
        response = self.respond("POST", CHAT, data=b"not json at all")
        self.assertJSONError(response, 400)
        self.assertEqual(self.fake.usedToday[KEYS[0]], 0)

    def test_nonObjectBodyIsRefused(self):
        """
        A chat body that is JSON but not an object gets a 400 JSON error.
        """
        self.assertJSONError(self.respond("POST", CHAT, data=b"[1, 2]"), 400)


class StreamingTests(FakeTestCase):
    """
    With C{"stream": true} the answer comes as server-sent events, a word
    at a time.
    """

    def test_eventStreamShape(self):
        """
        A stream is a processing comment, one data event per word, a final
        event with C{finish_reason} "stop", and C{data: [DONE]}.
        """
        response = self.chat(stream=True)
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders("Content-Type"), ["text/event-stream"]
        )
        stream = self.content(response)
        events = splitEvents(stream)
        self.assertEqual(events[0], b": OPENROUTER PROCESSING")
        self.assertEqual(events[-1], b"data: [DONE]")
        chunks = [dataOf(event) for event in events[1:-1]]
        self.assertEqual(len(chunks), len(WORDS) + 2)
        for chunk in chunks:
            self.assertEqual(chunk["object"], "chat.completion.chunk")
            self.assertEqual(chunk["model"], "test/model")
        deltas = [chunk["choices"][0]["delta"]["content"] for chunk in chunks[:-2]]
        self.assertEqual(len(deltas), len(WORDS))
        self.assertEqual("".join(deltas), FAKE_ANSWER)
        self.assertEqual(
            [chunk["choices"][0]["finish_reason"] for chunk in chunks[:-2]],
            [None] * len(WORDS),
        )
        finish, accounting = chunks[-2:]
        self.assertEqual(finish["choices"][0]["finish_reason"], "stop")
        self.assertNotIn("usage", finish)
        self.assertEqual(accounting["choices"][0]["finish_reason"], "stop")
        self.assertEqual(accounting["usage"]["completion_tokens"], len(WORDS))
        self.assertEqual([chunk for chunk in chunks if "usage" in chunk], [accounting])
        self.assertTrue(stream.endswith(b"data: [DONE]\n\n"))

    def test_streamHonoursMaxTokens(self):
        """
        C{max_tokens} sets the number of word events in a stream too.
        """
        events = splitEvents(self.content(self.chat(stream=True, max_tokens=4)))
        # The comment, four words, the finish and usage events, [DONE].
        self.assertEqual(len(events), 1 + 4 + 2 + 1)
        deltas = [dataOf(event)["choices"][0]["delta"]["content"] for event in events[1:5]]
        self.assertEqual("".join(deltas), " ".join(WORDS[:4]))

    def test_eventsComeOnePerInterval(self):
        """
        With C{eventInterval}, the fake writes one event, then the next one
        each time that interval has passed, and ends the response after the
        last.
        """
        self.useFake(FakeOpenRouter(KEYS, reactor=self.clock, eventInterval=2.0))
        response = self.successResultOf(
            self.send("POST", CHAT, data=chatBody(stream=True), unbuffered=True)
        )
        self.assertEqual(
            response.headers.getRawHeaders("Content-Type"), ["text/event-stream"]
        )
        body = _Collector()
        response.deliverBody(body)
        self.stub.flush()
        self.assertEqual(splitEvents(body.value()), [b": OPENROUTER PROCESSING"])
        total = 1 + len(WORDS) + 2 + 1
        for seen in range(2, total + 1):
            self.clock.advance(1.9)
            self.stub.flush()
            self.assertEqual(len(splitEvents(body.value())), seen - 1)
            self.clock.advance(0.1)
            self.stub.flush()
            self.assertEqual(len(splitEvents(body.value())), seen)
        self.clock.advance(2.0)
        self.stub.flush()
        body.reason.trap(ResponseDone)
        self.assertTrue(body.value().endswith(b"data: [DONE]\n\n"))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class OtherEndpointTests(FakeTestCase):
    """
    /api/v1/models, /api/v1/key and anything else.
    """

    def test_models(self):
        """
        GET /api/v1/models lists the fake model.
        """
        response = self.respond("GET", "/api/v1/models")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["application/json"])
        [model] = self.json(response)["data"]
        self.assertEqual(model["id"], FAKE_MODEL)

    def keyUsage(self, key):
        response = self.respond("GET", "/api/v1/key", key=key)
        self.assertEqual(response.code, 200)
        return self.json(response)["data"]["free_model_daily_requests"]

    def test_keyUsageBeforeAnyRequest(self):
        """
        GET /api/v1/key reports the daily limit, all of it remaining.
        """
        self.assertEqual(self.keyUsage(KEYS[0]), {"limit": 50, "remaining": 50, "used": 0})

    def test_keyUsageCountsFreeModelRequestsPerKey(self):
        """
        GET /api/v1/key counts the free-model requests (model ids ending
        with C{:free}), streamed or not, of any shape, made with the key
        asking, and nothing else: paid models are not limited by a count.
        """
        self.useFake(FakeOpenRouter(KEYS, reactor=self.clock, dailyLimit=5))
        self.content(self.chat(key=KEYS[0], model=FREE))
        self.content(self.chat(key=KEYS[0], model=FREE, stream=True))
        self.content(self.chat(key=KEYS[0]))
        self.content(self.chat(key=KEYS[0], model="test/free"))
        self.content(self.respond("POST", "/api/v1/responses", key=KEYS[1],
                                  data=json.dumps({"model": FREE, "input": "hi"}).encode()))
        self.content(self.respond("GET", "/api/v1/models", key=KEYS[0]))
        self.assertEqual(self.keyUsage(KEYS[0]), {"limit": 5, "remaining": 3, "used": 2})
        self.assertEqual(self.keyUsage(KEYS[1]), {"limit": 5, "remaining": 4, "used": 1})
        self.assertEqual(self.fake.usedToday, {KEYS[0]: 2, KEYS[1]: 1})

    def test_keyUsageRemainingStopsAtZero(self):
        """
        Past the daily limit, C{remaining} stays at zero while C{used} goes
        on counting.
        """
        self.useFake(FakeOpenRouter(KEYS, reactor=self.clock, dailyLimit=1))
        self.content(self.chat(model=FREE))
        self.content(self.chat(model=FREE))
        self.assertEqual(self.keyUsage(KEYS[0]), {"limit": 1, "remaining": 0, "used": 2})

    def test_unknownPathIsNotFound(self):
        """
        A path the fake does not serve gets a 404 JSON error.
        """
        self.assertJSONError(self.respond("GET", "/api/v1/nothing-here"), 404)

    def test_wrongMethodIsNotFound(self):
        """
        A known path with the wrong method gets a 404 JSON error.
        """
        self.assertJSONError(self.respond("GET", CHAT), 404)
        self.assertJSONError(self.respond("POST", "/api/v1/models", data=b"{}"), 404)


class ReceivedTests(FakeTestCase):
    """
    The fake records every request it receives.
    """

    def test_requestIsRecorded(self):
        """
        C{received} holds the method, target, headers, body and key of each
        request, in order.
        """
        self.content(
            self.respond(
                "POST",
                CHAT + "?trace=1",
                data=chatBody(),
                headers={"X-Title": "hermux tests"},
            )
        )
        self.content(self.respond("GET", "/api/v1/models", key=KEYS[1]))
        first, second = self.fake.received
        self.assertEqual(first.method, b"POST")
        self.assertEqual(first.uri, b"/api/v1/chat/completions?trace=1")
        self.assertEqual(first.headers.getRawHeaders(b"X-Title"), [b"hermux tests"])
        self.assertEqual(first.body, chatBody())
        self.assertEqual(first.key, KEYS[0])
        self.assertEqual(second.method, b"GET")
        self.assertEqual(second.uri, b"/api/v1/models")
        self.assertEqual(second.body, b"")
        self.assertEqual(second.key, KEYS[1])
        self.assertEqual(first.peer, "127.0.0.1:31337")

    def test_refusedRequestIsRecorded(self):
        """
        A request refused for its key is recorded too, with no key.
        """
        self.content(self.respond("GET", "/api/v1/models", key=None))
        [received] = self.fake.received
        self.assertIsNone(received.key)
        self.assertIsNone(received.headers.getRawHeaders(b"Authorization"))

    def test_lostFiresWhenClientLeaves(self):
        """
        C{lost} fires when the client goes away before the answer is
        complete.
        """
        self.fake.stallNext()
        pending = self.send("POST", CHAT, data=chatBody())
        [received] = self.fake.received
        self.assertNoResult(received.lost)
        pending.cancel()
        self.stub.flush()
        self.failureResultOf(pending)
        self.assertIsNone(self.successResultOf(received.lost))

    def test_lostFiresWhenClientLeavesMidStream(self):
        """
        C{lost} fires when the client goes away midway through a stream, and
        the fake writes no more events.
        """
        self.useFake(FakeOpenRouter(KEYS, reactor=self.clock, eventInterval=1.0))
        response = self.successResultOf(
            self.send("POST", CHAT, data=chatBody(stream=True), unbuffered=True)
        )
        body = _Collector()
        response.deliverBody(body)
        self.clock.advance(1.0)
        self.stub.flush()
        [received] = self.fake.received
        self.assertNoResult(received.lost)
        body.transport.stopProducing()
        self.stub.flush()
        self.successResultOf(received.lost)
        seen = body.value()
        self.assertEqual(len(splitEvents(seen)), 2)
        self.clock.advance(1.0)
        self.stub.flush()
        self.assertEqual(body.value(), seen)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lostDoesNotFireWhenAnswered(self):
        """
        C{lost} does not fire for a request that was answered in full.
        """
        self.content(self.chat())
        self.stub.flush()
        [received] = self.fake.received
        self.assertNoResult(received.lost)


class AnswerNextTests(FakeTestCase):
    """
    C{answerNext} makes the fake answer whatever the test says.
    """

    def test_answersOnce(self):
        """
        The next request gets the status, JSON body and headers given; the
        one after is answered normally.
        """
        error = {"error": {"code": 429, "message": "slow down"}}
        self.fake.answerNext(429, error, {"Retry-After": "7"})
        response = self.chat()
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders("Retry-After"), ["7"])
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["application/json"])
        self.assertEqual(self.json(response), error)
        self.assertEqual(self.chat().code, 200)

    def test_bytesBodyAsIs(self):
        """
        A body given as bytes is sent exactly as given, whatever the path.
        """
        self.fake.answerNext(502, b"<html>bad gateway</html>")
        response = self.respond("GET", "/api/v1/models")
        self.assertEqual(response.code, 502)
        self.assertEqual(self.content(response), b"<html>bad gateway</html>")

    def test_onlyForItsKey(self):
        """
        An answer scripted for one key leaves requests with other keys
        alone and waits for a request with that key.
        """
        self.fake.answerNext(503, {"error": {"code": 503}}, key=KEYS[1])
        self.assertEqual(self.chat(key=KEYS[0]).code, 200)
        self.assertEqual(self.chat(key=KEYS[0]).code, 200)
        self.assertEqual(self.chat(key=KEYS[1]).code, 503)
        self.assertEqual(self.chat(key=KEYS[1]).code, 200)

    def test_foreverWithTimesNone(self):
        """
        With C{times=None} the scripted answer never runs out.
        """
        self.fake.answerNext(429, {"error": {"code": 429}}, key=KEYS[0], times=None)
        for _ in range(5):
            self.assertEqual(self.chat(key=KEYS[0]).code, 429)
        self.assertEqual(self.chat(key=KEYS[1]).code, 200)

    def test_exactlyTimes(self):
        """
        With C{times=2} the scripted answer is given exactly twice.
        """
        self.fake.answerNext(500, {"error": {"code": 500}}, times=2)
        codes = [self.chat().code for _ in range(4)]
        self.assertEqual(codes, [500, 500, 200, 200])

    def test_scriptsApplyInOrder(self):
        """
        Scripted answers are given in the order they were scripted.
        """
        self.fake.answerNext(500, {})
        self.fake.answerNext(502, {})
        codes = [self.chat().code for _ in range(3)]
        self.assertEqual(codes, [500, 502, 200])


class RefusalTests(FakeTestCase):
    """
    OpenRouter's own refusals, as the fake words them, and what
    L{hermux.quota.classify} makes of each.
    """

    def setUp(self):
        super().setUp()
        self.clock.advance(1_800_001_234.5)

    def refusal(self, script, *args, **kwargs):
        """
        Script the next answer with the fake's method C{script}; return the
        response, its JSON body (or raw bytes) and its verdict.
        """
        getattr(self.fake, script)(*args, **kwargs)
        response = self.chat()
        raw = self.content(response)
        verdict = classify(response.code, response.headers, raw, self.clock.seconds())
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
        else:
            self.assertEqual(body["error"]["code"], response.code)
            self.assertIsInstance(body["error"]["message"], str)
        self.assertEqual(self.chat().code, 200)  # once only, by default
        return response, body, verdict

    def test_platformLimit(self):
        now = self.clock.seconds()
        response, body, verdict = self.refusal("platformLimitNext", perDay=True)
        self.assertEqual(response.code, 429)
        self.assertIn("free-models-per-day", body["error"]["message"])
        self.assertEqual(response.headers.getRawHeaders("X-RateLimit-Remaining"), ["0"])
        self.assertEqual(
            body["error"]["metadata"]["headers"]["X-RateLimit-Reset"],
            str((int(now // 86400) + 1) * 86400 * 1000),
        )
        self.assertEqual(verdict.kind, Kind.EXHAUSTED)
        response, body, verdict = self.refusal("platformLimitNext", perDay=False, resetIn=30, inBody=False)
        self.assertNotIn("headers", body["error"]["metadata"])
        self.assertEqual((verdict.kind, verdict.until), (Kind.COOLING, now + 30))

    def test_providerLimit(self):
        response, body, verdict = self.refusal("providerLimitNext", retryAfter=9)
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders("Retry-After"), ["9"])
        self.assertIsNone(response.headers.getRawHeaders("X-RateLimit-Limit"))
        self.assertEqual(body["error"]["metadata"]["provider_name"], "Chutes")
        self.assertEqual(verdict.kind, Kind.BUSY)
        response, _, _ = self.refusal("providerLimitNext")
        self.assertIsNone(response.headers.getRawHeaders("Retry-After"))

    def test_paymentRequired(self):
        expected = {
            "in_flight_budget": Kind.COOLING,
            "request_too_costly": Kind.OVER_BUDGET,
            "credits": Kind.DISABLED,
            "negative_balance": Kind.DISABLED,
            "negative": Kind.DISABLED,
        }
        self.assertEqual(set(expected), set(self.fake.PAYMENT_KINDS))
        for kind, verdictKind in expected.items():
            response, body, verdict = self.refusal("paymentRequiredNext", kind, retryAfter=5)
            self.assertEqual(response.code, 402)
            self.assertEqual(body["error"]["metadata"]["error_type"], "payment_required")
            self.assertEqual(verdict.kind, verdictKind, kind)
        self.assertRaises(ValueError, self.fake.paymentRequiredNext, "broke")

    def test_forbidden(self):
        now = self.clock.seconds()
        expected = {
            "key_limit": Kind.EXHAUSTED,
            "guardrail_budget": Kind.EXHAUSTED,
            "workspace_budget": Kind.EXHAUSTED,
            "permission_denied": Kind.ERROR,
            "moderation": Kind.ERROR,
        }
        self.assertEqual(set(expected), set(self.fake.FORBIDDEN_KINDS))
        for kind, verdictKind in expected.items():
            response, body, verdict = self.refusal("forbiddenNext", kind, resetsIn=600)
            self.assertEqual(response.code, 403)
            self.assertEqual(verdict.kind, verdictKind, kind)
            if verdictKind is Kind.EXHAUSTED:
                self.assertEqual(body["error"]["metadata"]["limit_source"], "openrouter_" + kind)
                self.assertTrue(body["error"]["metadata"]["resets_at"].endswith("Z"))
                self.assertEqual(verdict.until, now + 600)
        _, body, verdict = self.refusal("forbiddenNext", "key_limit", resetsIn=600, epoch=True)
        self.assertEqual(body["error"]["metadata"]["resets_at"], int(now + 600))
        self.assertRaises(ValueError, self.fake.forbiddenNext, "banned")

    def test_htmlForbidden(self):
        response, body, verdict = self.refusal("htmlForbiddenNext")
        self.assertEqual(response.code, 403)
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["text/html; charset=UTF-8"])
        self.assertTrue(body.startswith(b"<!DOCTYPE html>"))
        self.assertEqual(verdict, ERROR)


class MisbehaviourTests(FakeTestCase):
    """
    C{stallNext}, C{dropNext} and C{floodNext}.
    """

    def test_stallNextNeverAnswers(self):
        """
        After C{stallNext} the next request gets no answer at all, however
        long one waits; the one after is answered normally.
        """
        self.fake.stallNext()
        stalled = self.send("POST", CHAT, data=chatBody())
        self.clock.advance(3600)
        self.stub.flush()
        self.assertNoResult(stalled)
        self.assertEqual(self.chat().code, 200)
        self.assertEqual(len(self.fake.received), 2)
        stalled.cancel()
        self.stub.flush()
        self.failureResultOf(stalled)

    def test_dropNextClosesAfterEvents(self):
        """
        After C{dropNext(afterEvents=3)} the fake streams three events, then
        closes the connection: the client sees a body that failed, not a
        complete one.
        """
        self.fake.dropNext(afterEvents=3)
        response = self.successResultOf(
            self.send("POST", CHAT, data=chatBody(stream=True), unbuffered=True)
        )
        self.assertEqual(response.code, 200)
        received = []
        self.stub.flush()
        collected = treq.collect(response, received.append)
        self.stub.flush()
        self.failureResultOf(collected, ResponseFailed)
        stream = b"".join(received)
        events = splitEvents(stream)
        self.assertEqual(len(events), 3)
        self.assertEqual(events[0], b": OPENROUTER PROCESSING")
        self.assertNotIn(b"[DONE]", stream)
        self.assertNotIn(b'"finish_reason": "stop"', stream)
        self.successResultOf(self.fake.received[0].lost)

    def test_dropNextPacedByInterval(self):
        """
        A dropped stream is paced like any other: the connection closes when
        the event after the last one would have been due.
        """
        self.useFake(FakeOpenRouter(KEYS, reactor=self.clock, eventInterval=1.0))
        self.fake.dropNext(afterEvents=2)
        response = self.successResultOf(
            self.send("POST", CHAT, data=chatBody(stream=True), unbuffered=True)
        )
        body = _Collector()
        response.deliverBody(body)
        self.stub.flush()
        self.assertEqual(len(splitEvents(body.value())), 1)
        self.clock.advance(1.0)
        self.stub.flush()
        self.assertEqual(len(splitEvents(body.value())), 2)
        self.assertIsNone(body.reason)
        self.clock.advance(1.0)
        self.stub.flush()
        self.assertEqual(len(splitEvents(body.value())), 2)
        body.reason.trap(ResponseFailed)

    def test_dropNextThenNormal(self):
        """
        C{dropNext} applies to one request only.
        """
        self.fake.dropNext(afterEvents=1)
        dropped = self.successResultOf(
            self.send("POST", CHAT, data=chatBody(stream=True), unbuffered=True)
        )
        self.failureResultOf(treq.collect(dropped, lambda data: None), ResponseFailed)
        self.assertEqual(self.json(self.chat())["choices"][0]["message"]["content"], FAKE_ANSWER)

    def test_floodNextSendsExactlySize(self):
        """
        After C{floodNext(size)} the next request gets exactly C{size} bytes
        of event stream and a clean end; C{flooded} counts them.
        """
        size = 100_003
        self.fake.floodNext(size)
        response = self.chat()
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders("Content-Type"), ["text/event-stream"]
        )
        body = self.content(response)
        self.assertEqual(len(body), size)
        self.assertTrue(body.startswith(b": xxx"))
        self.assertEqual(self.fake.flooded, size)
        self.assertEqual(self.chat().code, 200)
        self.assertEqual(self.fake.flooded, size)

    def test_floodNextCountsAcrossAnswers(self):
        """
        C{flooded} adds up the bytes of every flood answer.
        """
        self.fake.floodNext(1000, times=2)
        self.assertEqual(len(self.content(self.chat())), 1000)
        self.assertEqual(len(self.content(self.chat())), 1000)
        self.assertEqual(self.fake.flooded, 2000)

    def test_floodNextZero(self):
        """
        C{floodNext(0)} answers with an empty body that ends cleanly.
        """
        self.fake.floodNext(0)
        self.assertEqual(self.content(self.chat()), b"")
        self.assertEqual(self.fake.flooded, 0)


PATHS = {
    "chat": CHAT,
    "completions": "/api/v1/completions",
    "responses": "/api/v1/responses",
    "messages": "/api/v1/messages",
}
PROMPTS = {
    "chat": {"messages": [{"role": "user", "content": "hi"}]},
    "completions": {"prompt": "Say hi."},
    "responses": {"input": "Say hi."},
    "messages": {"messages": [{"role": "user", "content": "hi"}]},
}


def shapeBody(shape: str, model="test/model", **extra) -> bytes:
    return json.dumps({"model": model, **PROMPTS[shape], **extra}).encode()


def expectedTokens(body: bytes, model="test/model", repeat=False, words=len(WORDS)):
    """
    The usage the module's docstring promises for a request with C{body}:
    prompt, completion, reasoning, cached and cache-write tokens, and the
    cost in credits.
    """
    prompt = 10 + len(body) // 4
    cached, written = (prompt // 2, 0) if repeat else (0, prompt // 2)
    price = FakeOpenRouter.priceOf(model)
    nanos = (prompt - cached) * price.prompt + cached * price.cached + words * price.completion
    return prompt, words, words // 4, cached, written, Decimal(nanos) / 10**9


def sseEvents(stream: bytes) -> list:
    """
    The events of C{stream}: (C{event:} name or L{None}, the parsed
    C{data:} JSON, C{b"[DONE]"}, or a comment line as bytes).
    """
    events = []
    for block in splitEvents(stream):
        if block.startswith(b":"):
            events.append((None, block))
            continue
        name, data = None, None
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[len(b"event: "):].decode()
            elif line.startswith(b"data: "):
                data = line[len(b"data: "):]
        events.append((name, data if data == b"[DONE]" else json.loads(data, parse_float=Decimal)))
    return events


def gunzip(data: bytes) -> bytes:
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    decoded = decoder.decompress(data)
    assert decoder.eof, "the gzip stream did not end"
    return decoded


class RawFakeTestCase(SynchronousTestCase):
    """
    The fake behind an agent that neither adds C{Accept-Encoding} nor
    decodes (treq does both), so that tests see the bytes as sent.
    """

    def setUp(self):
        self.clock = Clock()
        self.useFake(FakeOpenRouter(KEYS, reactor=self.clock))

    def useFake(self, fake):
        self.fake = fake
        self.agent = RequestTraversalAgent(fake)

    def open(self, method, path, body=b"", *, key=KEYS[0], acceptEncoding=None):
        """
        Send a request; return its response and a collector of its body.
        """
        headers = Headers({"Content-Type": ["application/json"]})
        if key is not None:
            headers.setRawHeaders("Authorization", [f"Bearer {key}"])
        if acceptEncoding is not None:
            headers.setRawHeaders("Accept-Encoding", [acceptEncoding])
        pending = self.agent.request(
            method.encode(), b"http://openrouter.test" + path.encode(), headers,
            BufferedBody(body) if body else None,
        )
        self.agent.flush()
        response = self.successResultOf(pending)
        collector = _Collector()
        response.deliverBody(collector)
        self.agent.flush()
        return response, collector

    def post(self, shape, body=None, **kwargs):
        """
        POST C{body} (the shape's default one if L{None}) to the path of
        C{shape}, answered at once; return the response and its raw body.
        """
        response, collector = self.open(
            "POST", PATHS[shape], shapeBody(shape) if body is None else body, **kwargs
        )
        collector.reason.trap(ResponseDone)
        return response, collector.value()

    def decoded(self, response, raw: bytes) -> bytes:
        if response.headers.getRawHeaders("Content-Encoding") == ["gzip"]:
            return gunzip(raw)
        self.assertIsNone(response.headers.getRawHeaders("Content-Encoding"))
        return raw

    def assertDecimalCost(self, text: bytes, cost: Decimal):
        """
        C{text} writes C{cost} as a plain decimal number, with no exponent.
        """
        written = re.findall(rb'"cost": ([-0-9.eE+]+)', text)
        self.assertTrue(written, text)
        for number in written:
            self.assertRegex(number, rb"^(0|0\.[0-9]*[1-9]|[1-9][0-9]*(\.[0-9]*[1-9])?)$")
        self.assertEqual(Decimal(written[-1].decode()), cost)


class UsageShapeTests(RawFakeTestCase):
    """
    Every completion carries usage as OpenRouter sends it, in the shape of
    its API, as JSON and as server-sent events.
    """

    def reportedLast(self) -> ReportedUsage:
        return self.fake.reported[-1]

    def test_chatJSON(self):
        body = shapeBody("chat")
        response, raw = self.post("chat", body)
        self.assertEqual(response.code, 200)
        answer = json.loads(raw, parse_float=Decimal)
        self.assertEqual(answer["choices"][0]["message"]["content"], FAKE_ANSWER)
        prompt, completion, reasoning, cached, written, cost = expectedTokens(body)
        self.assertEqual(answer["usage"], {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "cost": cost,
            "is_byok": False,
            "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": written, "audio_tokens": 0},
            "cost_details": {"upstream_inference_cost": cost * 20},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        })
        self.assertGreater(reasoning, 0)
        self.assertDecimalCost(raw, cost)
        self.assertEqual(self.fake.reported, [ReportedUsage(
            key=KEYS[0], model="test/model", promptTokens=prompt, completionTokens=completion,
            reasoningTokens=reasoning, cachedTokens=0, cost=cost, free=False)])

    def test_chatSSE(self):
        body = shapeBody("chat", stream=True)
        response, raw = self.post("chat", body)
        events = sseEvents(raw)
        self.assertEqual(events[0], (None, b": OPENROUTER PROCESSING"))
        self.assertEqual(events[-1], (None, b"[DONE]"))
        chunks = [data for _, data in events[1:-1]]
        withUsage = [chunk for chunk in chunks if "usage" in chunk]
        self.assertEqual(withUsage, [chunks[-1]])
        self.assertEqual([c["choices"][0]["finish_reason"] for c in chunks[-2:]], ["stop", "stop"])
        self.assertEqual("".join(c["choices"][0]["delta"].get("content", "") for c in chunks), FAKE_ANSWER)
        prompt, completion, reasoning, cached, written, cost = expectedTokens(body)
        usage = chunks[-1]["usage"]
        self.assertEqual(
            (usage["prompt_tokens"], usage["completion_tokens"], usage["cost"],
             usage["completion_tokens_details"]["reasoning_tokens"],
             usage["prompt_tokens_details"]["cache_write_tokens"]),
            (prompt, completion, cost, reasoning, written),
        )
        self.assertDecimalCost(raw, cost)
        self.assertEqual(self.reportedLast().cost, cost)
        self.assertEqual(len(self.fake.reported), 1)

    def test_completionsJSON(self):
        body = shapeBody("completions")
        response, raw = self.post("completions", body)
        answer = json.loads(raw, parse_float=Decimal)
        self.assertEqual(answer["object"], "text_completion")
        self.assertEqual(answer["choices"][0]["text"], FAKE_ANSWER)
        prompt, completion, reasoning, _, _, cost = expectedTokens(body)
        self.assertEqual(
            (answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"], answer["usage"]["cost"]),
            (prompt, completion, cost),
        )
        self.assertEqual(self.reportedLast(), ReportedUsage(
            KEYS[0], "test/model", prompt, completion, reasoning, 0, cost, False))

    def test_completionsSSE(self):
        body = shapeBody("completions", stream=True, max_tokens=5)
        _, raw = self.post("completions", body)
        events = sseEvents(raw)
        self.assertEqual(events[-1], (None, b"[DONE]"))
        chunks = [data for _, data in events[1:-1]]
        self.assertEqual("".join(c["choices"][0]["text"] for c in chunks), " ".join(WORDS[:5]))
        self.assertEqual([c for c in chunks if "usage" in c], [chunks[-1]])
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "stop")
        prompt, completion, reasoning, _, _, cost = expectedTokens(body, words=5)
        self.assertEqual(chunks[-1]["usage"]["completion_tokens"], 5)
        self.assertEqual(self.reportedLast(), ReportedUsage(
            KEYS[0], "test/model", prompt, 5, 1, 0, cost, False))

    def test_responsesJSON(self):
        body = shapeBody("responses")
        _, raw = self.post("responses", body)
        answer = json.loads(raw, parse_float=Decimal)
        self.assertEqual((answer["object"], answer["status"], answer["model"]),
                         ("response", "completed", "test/model"))
        [message] = answer["output"]
        self.assertEqual(message["type"], "message")
        self.assertEqual(message["content"][0]["type"], "output_text")
        self.assertEqual(message["content"][0]["text"], FAKE_ANSWER)
        prompt, completion, reasoning, _, _, cost = expectedTokens(body)
        self.assertEqual(answer["usage"], {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + completion,
            "cost": cost,
            "is_byok": False,
            "cost_details": {"upstream_inference_cost": cost * 20},
        })
        self.assertEqual(self.reportedLast(), ReportedUsage(
            KEYS[0], "test/model", prompt, completion, reasoning, 0, cost, False))

    def test_responsesSSE(self):
        body = shapeBody("responses", stream=True, max_output_tokens=4)
        _, raw = self.post("responses", body)
        events = sseEvents(raw)[1:]
        names = [name for name, _ in events]
        self.assertEqual(names, ["response.created"] + ["response.output_text.delta"] * 4
                         + ["response.output_text.done", "response.completed"])
        for name, data in events:
            self.assertEqual(data["type"], name)
        self.assertEqual("".join(data["delta"] for _, data in events[1:5]), " ".join(WORDS[:4]))
        self.assertIsNone(events[0][1]["response"]["usage"])
        completed = events[-1][1]["response"]
        self.assertEqual(completed["status"], "completed")
        self.assertEqual(completed["output"][0]["content"][0]["text"], " ".join(WORDS[:4]))
        prompt, completion, reasoning, _, _, cost = expectedTokens(body, words=4)
        self.assertEqual(
            (completed["usage"]["input_tokens"], completed["usage"]["output_tokens"],
             completed["usage"]["output_tokens_details"]["reasoning_tokens"], completed["usage"]["cost"]),
            (prompt, 4, 1, cost),
        )
        self.assertNotIn(b"[DONE]", raw)
        self.assertEqual(self.reportedLast(), ReportedUsage(KEYS[0], "test/model", prompt, 4, 1, 0, cost, False))

    def test_messagesJSON(self):
        body = shapeBody("messages")
        _, raw = self.post("messages", body)
        answer = json.loads(raw, parse_float=Decimal)
        self.assertEqual((answer["type"], answer["role"], answer["model"], answer["stop_reason"]),
                         ("message", "assistant", "test/model", "end_turn"))
        self.assertEqual(answer["content"], [{"type": "text", "text": FAKE_ANSWER}])
        prompt, completion, _, _, written, cost = expectedTokens(body)
        usage = answer["usage"]
        self.assertEqual(
            {name: usage[name] for name in ("input_tokens", "output_tokens", "cache_read_input_tokens",
                                            "cache_creation_input_tokens", "cost")},
            {"input_tokens": prompt - written, "output_tokens": completion,
             "cache_read_input_tokens": 0, "cache_creation_input_tokens": written, "cost": cost},
        )
        # The prompt's tokens are input_tokens and the cache's, as chat counts them.
        self.assertEqual(self.reportedLast(), ReportedUsage(
            KEYS[0], "test/model", prompt, completion, 0, 0, cost, False))

    def test_messagesSSE(self):
        body = shapeBody("messages", stream=True)
        _, raw = self.post("messages", body)
        events = sseEvents(raw)[1:]
        names = [name for name, _ in events]
        self.assertEqual(
            names,
            ["message_start", "content_block_start", "ping"]
            + ["content_block_delta"] * len(WORDS)
            + ["content_block_stop", "message_delta", "message_stop"],
        )
        for name, data in events:
            self.assertEqual(data["type"], name)
        self.assertTrue(all(block.startswith(b"event: ") for block in splitEvents(raw)[1:]))
        prompt, completion, _, _, written, cost = expectedTokens(body)
        start = events[0][1]["message"]
        self.assertEqual((start["model"], start["usage"]["input_tokens"]), ("test/model", prompt - written))
        self.assertNotIn("cost", start["usage"])
        text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
        self.assertEqual(text, FAKE_ANSWER)
        delta = events[-2][1]
        self.assertEqual(delta["delta"]["stop_reason"], "end_turn")
        self.assertEqual((delta["usage"]["output_tokens"], delta["usage"]["cost"]), (completion, cost))
        # The prompt's tokens are input_tokens and the cache's, as chat counts them.
        self.assertEqual(self.reportedLast(), ReportedUsage(
            KEYS[0], "test/model", prompt, completion, 0, 0, cost, False))

    def test_repeatedBodyReadsTheCache(self):
        """
        The same body sent again by the same key to the same path reads
        half its prompt from the cache, which costs less; another key, path
        or body writes to the cache instead.
        """
        body = shapeBody("chat")
        first = json.loads(self.post("chat", body)[1], parse_float=Decimal)["usage"]
        again = json.loads(self.post("chat", body)[1], parse_float=Decimal)["usage"]
        other = json.loads(self.post("chat", body, key=KEYS[1])[1], parse_float=Decimal)["usage"]
        prompt, _, _, cached, _, cost = expectedTokens(body, repeat=True)
        self.assertGreater(cached, 0)
        self.assertEqual(again["prompt_tokens_details"], {"cached_tokens": cached, "cache_write_tokens": 0, "audio_tokens": 0})
        self.assertEqual(again["cost"], cost)
        self.assertLess(again["cost"], first["cost"])
        self.assertEqual(first["prompt_tokens_details"]["cached_tokens"], 0)
        self.assertEqual(other["prompt_tokens_details"]["cached_tokens"], 0)
        self.assertEqual([usage.cachedTokens for usage in self.fake.reported], [0, cached, 0])
        _, raw = self.post("messages", shapeBody("messages"))
        _, raw = self.post("messages", shapeBody("messages"))
        usage = json.loads(raw)["usage"]
        self.assertEqual(usage["cache_read_input_tokens"], self.fake.reported[-1].cachedTokens)
        self.assertGreater(usage["cache_read_input_tokens"], 0)
        self.assertEqual(usage["cache_creation_input_tokens"], 0)

    def test_freeModelCostsNothing(self):
        """
        A free variant's answers cost 0, with no upstream cost, and are
        reported as free.
        """
        for shape in PATHS:
            _, raw = self.post(shape, shapeBody(shape, model=FREE))
            self.assertIn(b'"cost": 0,', raw)
            self.assertIn(b'"upstream_inference_cost": null', raw)
        self.assertEqual(len(self.fake.reported), 4)
        for usage in self.fake.reported:
            self.assertEqual((usage.model, usage.cost, usage.free), (FREE, Decimal(0), True))
            self.assertGreater(usage.completionTokens, 0)
        self.assertEqual(self.fake.usedToday[KEYS[0]], 4)

    def test_priceOf(self):
        """
        The price of a model is fixed by its id.
        """
        self.assertEqual(FakeOpenRouter.priceOf("test/model"), FakePrice(200, 50, 800))
        self.assertEqual(FakeOpenRouter.priceOf(FAKE_MODEL), FakePrice(400, 100, 1600))
        self.assertEqual(FakeOpenRouter.priceOf(FREE), FakePrice(0, 0, 0))

    def test_reportedSums(self):
        """
        C{reported} holds one entry per answer that carried usage, of every
        shape and key; their costs add up to the costs in the answers.
        """
        written = Decimal(0)
        for index, shape in enumerate(PATHS):
            for stream in (False, True):
                key = KEYS[index % 2]
                _, raw = self.post(shape, shapeBody(shape, stream=stream), key=key)
                costs = re.findall(rb'"cost": ([0-9.]+)', raw)
                written += Decimal(costs[-1].decode())
        self.post("chat", b"not json")
        self.open("GET", "/api/v1/models")
        self.assertEqual(len(self.fake.reported), 8)
        self.assertEqual(sum(usage.cost for usage in self.fake.reported), written)
        self.assertEqual({usage.key for usage in self.fake.reported}, set(KEYS))
        for usage in self.fake.reported:
            self.assertIsInstance(usage.cost, Decimal)
        response, raw = self.open("GET", "/api/v1/key")
        spent = json.loads(self.decoded(response, raw.value()))["data"]["usage"]
        self.assertAlmostEqual(
            spent, float(sum(u.cost for u in self.fake.reported if u.key == KEYS[0])))

    def test_modelDefaultsToFakeModel(self):
        self.post("messages", b'{"messages": []}')
        self.assertEqual(self.fake.reported[-1].model, FAKE_MODEL)

    def test_otherShapesRefuseNonJSON(self):
        for shape in ("completions", "responses", "messages"):
            response, _ = self.post(shape, b"[1]")
            self.assertEqual(response.code, 400)
        self.assertEqual(self.fake.reported, [])


class GzipTests(RawFakeTestCase):
    """
    Answers are gzip-compressed when the request's C{Accept-Encoding}
    allows it; a stream event by event.
    """

    def test_jsonCompressed(self):
        response, raw = self.post("chat", acceptEncoding="gzip, deflate")
        self.assertEqual(response.headers.getRawHeaders("Content-Encoding"), ["gzip"])
        self.assertEqual(response.headers.getRawHeaders("Vary"), ["Accept-Encoding"])
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["application/json"])
        answer = json.loads(gunzip(raw))
        self.assertEqual(answer["choices"][0]["message"]["content"], FAKE_ANSWER)

    def test_whatAllowsGzip(self):
        """
        gzip (or x-gzip, or *) with a quality above 0 allows it; q=0, other
        codings only, or no header at all do not.
        """
        allowed = ["gzip", "GZIP;q=0.5", "br, gzip", "x-gzip", "*", "br;q=1, *;q=0.1", "deflate, gzip;q=1.0"]
        refused = [None, "identity", "br", "deflate", "gzip;q=0", "gzip; q=0.000", "*;q=0",
                   "br, gzip;q=0, *", ""]
        for value in allowed:
            response, raw = self.post("chat", acceptEncoding=value)
            self.assertEqual(response.headers.getRawHeaders("Content-Encoding"), ["gzip"], value)
            json.loads(gunzip(raw))
        for value in refused:
            response, raw = self.post("chat", acceptEncoding=value)
            self.assertIsNone(response.headers.getRawHeaders("Content-Encoding"), value)
            json.loads(raw)

    def test_errorsCompressedToo(self):
        for path, key in ((CHAT, None), ("/api/v1/nothing", KEYS[0])):
            response, collector = self.open("GET", path, key=key, acceptEncoding="gzip")
            self.assertEqual(response.headers.getRawHeaders("Content-Encoding"), ["gzip"])
            self.assertIn("error", json.loads(gunzip(collector.value())))

    def test_compressOff(self):
        """
        C{compress=False} answers in identity whatever the request accepts.
        """
        self.useFake(FakeOpenRouter(KEYS, reactor=self.clock, compress=False))
        for stream in (False, True):
            response, raw = self.post("chat", shapeBody("chat", stream=stream), acceptEncoding="gzip")
            self.assertIsNone(response.headers.getRawHeaders("Content-Encoding"))
            self.assertIn(FAKE_ANSWER.split()[0].encode(), raw)

    def test_identityStreams(self):
        """
        Without gzip, each shape's stream is plain text.
        """
        for shape in PATHS:
            response, raw = self.post(shape, shapeBody(shape, stream=True), acceptEncoding="identity")
            self.assertIsNone(response.headers.getRawHeaders("Content-Encoding"))
            self.assertTrue(raw.startswith(b": OPENROUTER PROCESSING\n\n"), shape)

    def test_everyShapeStreamsCompressed(self):
        """
        A compressed stream decodes to the same events as an identity one.
        """
        for shape in PATHS:
            body = shapeBody(shape, stream=True)
            _, plain = self.post(shape, body, acceptEncoding="identity")
            response, raw = self.post(shape, body, key=KEYS[1], acceptEncoding="gzip")
            self.assertEqual(response.headers.getRawHeaders("Content-Encoding"), ["gzip"])
            self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["text/event-stream"])
            decoded = gunzip(raw)
            self.assertEqual(
                [name for name, _ in sseEvents(decoded)], [name for name, _ in sseEvents(plain)], shape
            )
            self.assertEqual(len(splitEvents(decoded)), len(splitEvents(plain)))

    def test_eventsArriveOneByOne(self):
        """
        Each event of a compressed stream is flushed when it is written:
        what has arrived decodes to every event so far, whole.
        """
        self.useFake(FakeOpenRouter(KEYS, reactor=self.clock, eventInterval=1.0))
        for shape in PATHS:
            response, collector = self.open(
                "POST", PATHS[shape], shapeBody(shape, stream=True), acceptEncoding="gzip"
            )
            self.assertEqual(response.headers.getRawHeaders("Content-Encoding"), ["gzip"])
            decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
            decoded = b""
            seen = 0
            while collector.reason is None:
                fresh = b"".join(collector.received)
                del collector.received[:]
                decoded += decoder.decompress(fresh)
                if fresh:
                    seen += 1
                    self.assertTrue(decoded.endswith(b"\n\n"), (shape, decoded[-40:]))
                    self.assertEqual(len(splitEvents(decoded)), seen, shape)
                self.clock.advance(1.0)
                self.agent.flush()
            collector.reason.trap(ResponseDone)
            decoded += decoder.decompress(b"".join(collector.received))
            self.assertTrue(decoder.eof)
            self.assertEqual(len(splitEvents(decoded)), seen)
            self.assertEqual([name for name, _ in sseEvents(decoded)][-1],
                             {"chat": None, "completions": None, "responses": "response.completed",
                              "messages": "message_stop"}[shape])

    def test_floodIsNeverCompressed(self):
        self.fake.floodNext(1000)
        response, raw = self.post("chat", acceptEncoding="gzip")
        self.assertIsNone(response.headers.getRawHeaders("Content-Encoding"))
        self.assertEqual(len(raw), 1000)
        self.assertEqual(self.fake.flooded, 1000)


class GenerationIdTests(RawFakeTestCase):
    """
    Every answer, errors too, has an C{X-Generation-Id}.
    """

    def test_everyAnswer(self):
        self.fake.answerNext(503, {"error": {"code": 503}})
        answers = [
            self.post("chat"),
            self.post("chat"),
            self.post("chat", shapeBody("chat", stream=True)),
            self.post("responses", key="sk-unknown"),
            self.post("messages", b"nope"),
        ]
        answers.append(self.open("GET", "/api/v1/models")[:1])
        answers.append(self.open("GET", "/api/v1/nowhere")[:1])
        ids = []
        for response, *_ in answers:
            [value] = response.headers.getRawHeaders("X-Generation-Id")
            self.assertTrue(value.startswith("gen-"), value)
            ids.append(value)
        self.assertEqual(len(set(ids)), len(ids))
        self.assertEqual([received.generationId for received in self.fake.received], ids)
        self.assertEqual([response.code for response, *_ in answers], [503, 200, 200, 401, 400, 200, 404])

    def test_idIsTheCompletionsId(self):
        response, raw = self.post("chat")
        [value] = response.headers.getRawHeaders("X-Generation-Id")
        self.assertEqual(json.loads(raw)["id"], value)
        response, raw = self.post("chat", shapeBody("chat", stream=True))
        [value] = response.headers.getRawHeaders("X-Generation-Id")
        chunks = [data for _, data in sseEvents(raw)[1:-1]]
        self.assertEqual({chunk["id"] for chunk in chunks}, {value})

    def test_uniqueAcrossFakes(self):
        first, _ = self.post("chat")
        self.useFake(FakeOpenRouter(KEYS, reactor=self.clock))
        second, _ = self.post("chat")
        self.assertNotEqual(first.headers.getRawHeaders("X-Generation-Id"),
                            second.headers.getRawHeaders("X-Generation-Id"))


class UsageMisbehaviourTests(RawFakeTestCase):
    """
    Streams that do not end cleanly report usage only if they sent it.
    """

    def test_midStreamErrorHasNoUsage(self):
        self.fake.midStreamErrorNext(afterEvents=3)
        _, raw = self.post("chat", shapeBody("chat", stream=True))
        events = sseEvents(raw)
        self.assertEqual(len(events), 4)
        self.assertEqual(events[-1][1]["choices"][0]["finish_reason"], "error")
        self.assertNotIn(b"usage", raw)
        self.assertNotIn(b"[DONE]", raw)
        self.assertEqual(self.fake.reported, [])

    def test_midStreamErrorLateHasNoUsage(self):
        self.fake.midStreamErrorNext(afterEvents=100)
        _, raw = self.post("chat", shapeBody("chat", stream=True))
        self.assertNotIn(b"usage", raw)
        self.assertEqual(self.fake.reported, [])

    def test_droppedBeforeUsageReportsNothing(self):
        for shape in PATHS:
            self.fake.dropNext(afterEvents=3)
            _, collector = self.open("POST", PATHS[shape], shapeBody(shape, stream=True))
            collector.reason.trap(ResponseFailed)
            self.assertEqual(len(splitEvents(collector.value())), 3)
        self.assertEqual(self.fake.reported, [])

    def test_droppedAfterUsageReports(self):
        """
        A stream cut after its usage frame (before C{[DONE]}) did report it.
        """
        events = 1 + len(WORDS) + 2
        self.fake.dropNext(afterEvents=events)
        _, collector = self.open("POST", CHAT, shapeBody("chat", stream=True))
        collector.reason.trap(ResponseFailed)
        self.assertNotIn(b"[DONE]", collector.value())
        self.assertIn(b'"usage"', collector.value())
        self.assertEqual(len(self.fake.reported), 1)

    def test_clientGoneBeforeUsage(self):
        self.useFake(FakeOpenRouter(KEYS, reactor=self.clock, eventInterval=1.0))
        _, collector = self.open("POST", CHAT, shapeBody("chat", stream=True))
        self.clock.advance(1.0)
        self.agent.flush()
        collector.transport.stopProducing()
        self.agent.flush()
        self.clock.advance(100)
        self.agent.flush()
        self.assertEqual(self.fake.reported, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class NegativeBalanceTests(FakeTestCase):
    def test_negativeBalance402(self):
        """
        C{paymentRequiredNext("negative")} is OpenRouter's 402 for an
        account whose balance is below zero, which disables the key.
        """
        self.fake.paymentRequiredNext("negative")
        response = self.chat()
        raw = self.content(response)
        self.assertEqual(response.code, 402)
        error = json.loads(raw)["error"]
        self.assertEqual(error["code"], 402)
        self.assertIn("negative credit balance", error["message"])
        self.assertEqual(error["metadata"]["reason"], "negative_balance")
        self.assertEqual(error["metadata"]["limit_source"], "openrouter_credits")
        self.assertEqual(classify(response.code, response.headers, raw, 0.0).kind, Kind.DISABLED)
        self.assertEqual(self.fake.reported, [])
        self.assertEqual(self.chat().code, 200)


class FakeSiteTests(SynchronousTestCase):
    """
    L{fakeSite} serves the fake and keeps count of its connections.
    """

    def test_servesTheFakeAndTracksChannels(self):
        """
        A connection to the site is in C{channels} while it is open, gets
        the fake's answers, and leaves C{channels} when it closes.
        """
        clock = Clock()
        fake = FakeOpenRouter(KEYS, reactor=clock)
        site = fakeSite(fake, reactor=clock)
        self.assertEqual(site.channels, set())
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        channel.makeConnection(transport)
        self.assertEqual(site.channels, {channel})
        channel.dataReceived(
            b"GET /api/v1/models HTTP/1.1\r\nHost: openrouter.test\r\n"
            b"Authorization: Bearer " + KEYS[0].encode() + b"\r\n\r\n"
        )
        answer = transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "))
        self.assertIn(FAKE_MODEL.encode(), answer)
        [received] = fake.received
        self.assertEqual(received.peer, "127.0.0.1:40000")
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(site.channels, set())


def modelsOver(network: MemoryNetwork, port: int, key: str) -> RawClient:
    """
    A raw GET /api/v1/models with C{key}, to what listens on C{port}.
    """
    client = RawClient()
    network.connect(client, port)
    client.send(
        b"GET /api/v1/models HTTP/1.1\r\nHost: openrouter.test\r\nConnection: close\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\n\r\n"
    )
    network.flush()
    return client


class PlainSiteTests(SynchronousTestCase):
    def test_servedByAPlainSite(self):
        """
        Twisted's own L{Site} serves the fake: nothing it does needs more
        of the connection than twisted.web gives.
        """
        reactor = MemoryReactorClock()
        network = MemoryNetwork(reactor)
        fake = FakeOpenRouter(KEYS, reactor=reactor)
        reactor.listenTCP(80, Site(fake, reactor=reactor))
        client = modelsOver(network, 80, KEYS[0])
        self.assertTrue(client.received.startswith(b"HTTP/1.1 200 "))
        self.assertIn(FAKE_MODEL.encode(), client.received)
        self.assertTrue(client.closed)
        [received] = fake.received
        self.assertEqual(received.peer, "127.0.0.1:40000")


class DemoUpstreamTests(SynchronousTestCase):
    """
    L{DemoUpstream} serves the fake with Twisted's own site, on loopback.
    """

    def test_servesTheFakeOnLoopback(self):
        """
        Started, it listens on a free port of 127.0.0.1 with a site whose
        connections are Twisted's own, serving a fake that accepts the
        configured keys, and points the upstream there.
        """
        reactor = MemoryReactorClock()
        upstream = Upstream(b"https://openrouter.ai", agent=None)
        demo = DemoUpstream(upstream, KEYS, reactor=reactor)
        demo.startService()
        [(port, site, _, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (0, "127.0.0.1"))
        self.assertEqual(upstream.base, b"http://127.0.0.1:0")
        self.assertIsInstance(site, Site)
        self.assertIs(type(site).protocol, Site.protocol)
        self.assertIs(site.resource, demo.fake)
        network = MemoryNetwork(reactor)
        self.assertTrue(modelsOver(network, 0, KEYS[1]).received.startswith(b"HTTP/1.1 200 "))
        self.assertTrue(
            modelsOver(network, 0, "sk-not-configured").received.startswith(b"HTTP/1.1 401 ")
        )
        demo.stopService()

    def test_noLogLinePerRequest(self):
        """
        The fake's site writes no log line for the requests it answers:
        hermux logs the ones it relays.
        """
        reactor = MemoryReactorClock()
        demo = DemoUpstream(Upstream(b"https://openrouter.ai", agent=None), KEYS, reactor=reactor)
        demo.startService()
        [(_, site, _, _)] = reactor.tcpServers
        site.doStart()
        self.addCleanup(site.doStop)
        with capturedLogs() as events:
            client = modelsOver(MemoryNetwork(reactor), 0, KEYS[0])
        self.assertTrue(client.received.startswith(b"HTTP/1.1 200 "))
        self.assertEqual(
            [formatEvent(e) for e in events if "/api/v1/models" in formatEvent(e)], []
        )
