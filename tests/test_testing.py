"""
The public fake OpenRouter of L{hermux.testing}, in memory: a L{StubTreq}
over the fake resource, and a L{Clock} to release streamed events; and the
demo mode that serves it.
"""

from __future__ import annotations

import json

import treq
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.web.server import Site

from hermux.demo import DemoUpstream
from hermux.keypool import ERROR, Kind
from hermux.quota import classify
from hermux.testing import FAKE_ANSWER, FAKE_MODEL, FakeOpenRouter, fakeSite
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
