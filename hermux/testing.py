# -*- test-case-name: tests.test_testing -*-
"""
A fake OpenRouter, for tests, benchmarks and the demo mode: a twisted.web
resource that answers chat completions (as JSON, or as server-sent events a
few words at a time), C{/api/v1/models} and C{/api/v1/key}; checks the
Bearer key; records every request it receives; and misbehaves on demand
(stalls, drops a stream midway, floods, or answers whatever a test says).
Any L{twisted.web.server.Site} serves it:

    fake = FakeOpenRouter(["sk-test-1", "sk-test-2"])
    reactor.listenTCP(0, Site(fake), interface="127.0.0.1")
    fake.stallNext()                      # the next request never gets an answer
    fake.answerNext(429, {"error": ...}, key="sk-test-1", times=None)
    fake.platformLimitNext(perDay=True)   # OpenRouter's own refusals, as it
    fake.paymentRequiredNext("credits")   # words them (and forbiddenNext,
                                          # providerLimitNext, htmlForbiddenNext)
"""

from __future__ import annotations

__all__ = ["FAKE_ANSWER", "FAKE_MODEL", "FakeOpenRouter", "ReceivedRequest", "fakeSite"]

import itertools
import json
from collections import Counter
from datetime import datetime, timezone
from collections.abc import Iterable

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from hermux.channel import peerText

FAKE_MODEL = "hermux/fake-model"
FAKE_ANSWER = "This is a fake answer from hermux.testing, not from a model."


@attr.s(auto_attribs=True, eq=False)
class ReceivedRequest:
    """
    A request as the fake OpenRouter received it.

    @ivar peer: the address and port it came from, which tells connections
        apart.
    @ivar lost: fires if the connection closed before the fake finished
        answering (for example because hermux aborted it).
    """

    method: bytes
    uri: bytes
    headers: Headers
    body: bytes
    peer: str
    lost: Deferred = attr.Factory(Deferred)

    @property
    def key(self) -> str | None:
        """
        The Bearer token the request carried, if any.
        """
        value = self.headers.getRawHeaders(b"authorization", [b""])[-1]
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return None
        return token.decode("ascii", "replace")


@attr.s(auto_attribs=True)
class _Script:
    behave: object
    key: str | None
    times: int | None

    def matches(self, key: str | None) -> bool:
        return self.key is None or self.key == key


def _json(request, status: int, payload) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(payload).encode("utf-8")


def _error(request, status: int, message: str) -> bytes:
    return _json(request, status, {"error": {"code": status, "message": message}})


class FakeOpenRouter(Resource):
    """
    The fake.  C{keys} are the tokens it accepts (any Bearer token if
    L{None}).  C{reactor} paces streamed events, C{eventInterval} seconds
    apart: pass a L{twisted.internet.task.Clock} to release them one by one.

    @ivar received: every request, in order of arrival.
    @ivar usedToday: chat completions answered per key.
    @ivar flooded: bytes written by C{floodNext} answers so far.
    """

    isLeaf = True

    def __init__(
        self,
        keys: Iterable[str] | None = None,
        *,
        reactor=None,
        eventInterval: float = 0.0,
        dailyLimit: int = 50,
    ):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.keys = None if keys is None else frozenset(keys)
        self.eventInterval = eventInterval
        self.dailyLimit = dailyLimit
        self.received: list[ReceivedRequest] = []
        self.usedToday: Counter[str] = Counter()
        self.flooded = 0
        self._reactor = reactor
        self._scripts: list[_Script] = []
        self._ids = itertools.count(1)

    # Misbehaviour on demand.  Each applies to the next `times` requests
    # (forever if None) carrying `key` (any key if None).

    def answerNext(self, status: int, body, headers=None, *, key=None, times=1):
        """
        Answer with C{status}, C{body} (bytes, or anything JSON can encode)
        and C{headers} (a dict of str to str).
        """
        if not isinstance(body, bytes):
            body = json.dumps(body).encode("utf-8")

        def answer(request, received):
            request.setResponseCode(status)
            request.setHeader(b"Content-Type", b"application/json")
            for name, value in (headers or {}).items():
                request.setHeader(name.encode("ascii"), value.encode("ascii"))
            return body

        self._script(answer, key, times)

    # OpenRouter's own refusals, with the bodies and headers it sends (see
    # hermux.quota).  Times are relative to the fake's reactor when answered.

    def _answerAt(self, build, key, times):
        """
        Answer with C{build(now)}: a status, a JSON-encodable body and a
        dict of headers.
        """

        def answer(request, received):
            status, body, headers = build(self._reactor.seconds())
            request.setResponseCode(status)
            request.setHeader(b"Content-Type", b"application/json")
            for name, value in headers.items():
                request.setHeader(name.encode("ascii"), value.encode("ascii"))
            return json.dumps(body).encode("utf-8")

        self._script(answer, key, times)

    def platformLimitNext(self, *, perDay=True, resetIn=None, inBody=True, key=None, times=1):
        """
        OpenRouter's own rate limit: 429 C{free-models-per-day} (or
        C{free-models-per-min} if not C{perDay}) with C{X-RateLimit-*}, both
        as response headers and (if C{inBody}) copied into the error's
        metadata.  The reset is C{resetIn} seconds away (the next 00:00 UTC
        for a daily limit, a minute's end otherwise, if L{None}).
        """

        def build(now):
            if resetIn is not None:
                reset = now + resetIn
            elif perDay:
                reset = (int(now // 86400) + 1) * 86400
            else:
                reset = (int(now // 60) + 1) * 60
            limits = {
                "X-RateLimit-Limit": "50" if perDay else "20",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": str(int(reset * 1000)),
            }
            message = (
                "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock "
                "1000 free model requests per day"
                if perDay
                else "Rate limit exceeded: free-models-per-min."
            )
            metadata = {"error_type": "rate_limit_exceeded"}
            if inBody:
                metadata["headers"] = limits
            error = {"code": 429, "message": message, "metadata": metadata}
            return 429, {"error": error}, limits

        self._answerAt(build, key, times)

    def providerLimitNext(self, *, retryAfter=None, key=None, times=1):
        """
        The upstream provider's rate limit or capacity, relayed by
        OpenRouter: 429 without C{X-RateLimit-*}, naming the provider, with
        C{Retry-After: retryAfter} if given.
        """

        def build(now):
            error = {
                "code": 429,
                "message": "Provider returned error",
                "metadata": {
                    "raw": "hermux/fake-model is temporarily rate-limited upstream. "
                    "Please retry shortly, or add your own key to accumulate your "
                    "rate limits: https://openrouter.ai/settings/integrations",
                    "provider_name": "Chutes",
                    "provider_code": 429,
                    "is_byok": False,
                },
            }
            headers = {} if retryAfter is None else {"Retry-After": str(retryAfter)}
            return 429, {"error": error}, headers

        self._answerAt(build, key, times)

    PAYMENT_KINDS = ("in_flight_budget", "request_too_costly", "credits", "negative_balance")

    def paymentRequiredNext(self, kind="credits", *, retryAfter=None, key=None, times=1):
        """
        402 of one of OpenRouter's kinds (L{PAYMENT_KINDS}):
        C{in_flight_budget} (transient, with C{Retry-After: retryAfter} if
        given), C{request_too_costly} (this request's estimated cost is more
        than the whole budget), C{credits} (out of credits) or
        C{negative_balance}.
        """
        if kind not in self.PAYMENT_KINDS:
            raise ValueError(f"no 402 of kind {kind!r}")

        def build(now):
            metadata = {"error_type": "payment_required"}
            headers = {}
            if kind == "in_flight_budget":
                message = (
                    "This request would exceed your available credits given your "
                    "current in-flight requests. Retry after in-flight requests "
                    "settle, or add credits."
                )
                metadata.update(
                    reason="in_flight_budget_exhausted", limit_source="openrouter_in_flight_budget"
                )
                if retryAfter is not None:
                    headers["Retry-After"] = str(retryAfter)
            elif kind == "request_too_costly":
                message = (
                    "This request's estimated cost is larger than your in-flight "
                    "spending budget. Lower max_tokens or the prompt size, or add credits."
                )
                metadata.update(reason="weight_exceeds_budget", limit_source="openrouter_credits")
            elif kind == "credits":
                message = (
                    "Insufficient credits. This account never purchased credits. "
                    "Make sure your key is on the correct account or org, and if so, "
                    "purchase more at https://openrouter.ai/settings/credits"
                )
                metadata["limit_source"] = "openrouter_credits"
            else:
                message = (
                    "Your account or API key has a negative credit balance. Add credits "
                    "at https://openrouter.ai/settings/credits"
                )
            return 402, {"error": {"code": 402, "message": message, "metadata": metadata}}, headers

        self._answerAt(build, key, times)

    FORBIDDEN_KINDS = (
        "key_limit", "guardrail_budget", "workspace_budget", "permission_denied", "moderation",
    )

    def forbiddenNext(self, kind="key_limit", *, resetsIn=3600.0, epoch=False, key=None, times=1):
        """
        403 of one of OpenRouter's kinds (L{FORBIDDEN_KINDS}): the key's
        credit limit, its guardrail or its workspace budget reached (with
        C{resets_at} C{resetsIn} seconds away, ISO 8601, or epoch seconds if
        C{epoch}), C{permission_denied}, or flagged input (moderation).
        """
        if kind not in self.FORBIDDEN_KINDS:
            raise ValueError(f"no 403 of kind {kind!r}")

        def build(now):
            if kind == "moderation":
                error = {
                    "code": 403,
                    "message": "hermux/fake-model requires moderation on OpenAI. "
                    "Your input was flagged for \"harassment\".",
                    "metadata": {
                        "reasons": ["harassment"],
                        "flagged_input": "...",
                        "provider_name": "OpenAI",
                        "model_slug": FAKE_MODEL,
                    },
                }
                return 403, {"error": error}, {}
            metadata = {"error_type": "permission_denied"}
            if kind == "permission_denied":
                message = "This model is not available to your account or in your region."
            else:
                resets = now + resetsIn
                message = {
                    "key_limit": "Key limit exceeded (daily limit). Manage it using "
                    "https://openrouter.ai/settings/keys",
                    "guardrail_budget": "Guardrail budget exceeded for this key.",
                    "workspace_budget": "Workspace budget exceeded.",
                }[kind]
                metadata["limit_source"] = "openrouter_" + kind
                metadata["resets_at"] = (
                    int(resets)
                    if epoch
                    else datetime.fromtimestamp(resets, timezone.utc).isoformat().replace("+00:00", "Z")
                )
            return 403, {"error": {"code": 403, "message": message, "metadata": metadata}}, {}

        self._answerAt(build, key, times)

    def htmlForbiddenNext(self, *, key=None, times=1):
        """
        A 403 that is not OpenRouter's: a CDN's or firewall's HTML page.
        """

        def answer(request, received):
            request.setResponseCode(403)
            request.setHeader(b"Content-Type", b"text/html; charset=UTF-8")
            request.setHeader(b"Server", b"cloudflare")
            return (
                b"<!DOCTYPE html>\n<html><head><title>Attention Required! | Cloudflare"
                b"</title></head><body><h1>Sorry, you have been blocked</h1><p>You are "
                b"unable to access openrouter.ai</p></body></html>\n"
            )

        self._script(answer, key, times)

    def stallNext(self, *, key=None, times=1):
        """
        Never answer: no status line, no byte.
        """
        self._script(lambda request, received: NOT_DONE_YET, key, times)

    def dropNext(self, afterEvents: int = 1, *, key=None, times=1):
        """
        Stream a chat completion, then close the connection after
        C{afterEvents} events, as a crashing upstream would.
        """

        def drop(request, received):
            return self._stream(request, received, dropAfter=afterEvents)

        self._script(drop, key, times)

    def midStreamErrorNext(
        self, afterEvents: int = 1, *, code=502, rateLimitReset: float | None = None, key=None, times=1
    ):
        """
        Stream a chat completion (status 200) and, after C{afterEvents}
        events, end it with an error event as OpenRouter sends an error
        after the first byte: a top-level C{error} and C{finish_reason}
        C{"error"}.  With C{rateLimitReset} (POSIX time), the error is a
        platform rate limit (429, C{rate_limit_exceeded}, with the
        C{X-RateLimit-*} values in its metadata).
        """

        def error(request, received):
            error = {"code": code, "message": "Provider disconnected unexpectedly"}
            if rateLimitReset is not None:
                error = {
                    "code": 429,
                    "message": "Rate limit exceeded: free-models-per-min.",
                    "metadata": {
                        "error_type": "rate_limit_exceeded",
                        "headers": {
                            "X-RateLimit-Limit": "20",
                            "X-RateLimit-Remaining": "0",
                            "X-RateLimit-Reset": str(int(rateLimitReset * 1000)),
                        },
                    },
                }
            return self._stream(request, received, errorAfter=(afterEvents, error))

        self._script(error, key, times)

    def floodNext(self, size: int | None = None, *, key=None, times=1):
        """
        Answer with C{size} bytes of event-stream comments (without end if
        L{None}), written only as fast as the reader takes them.
        """

        def flood(request, received):
            request.setHeader(b"Content-Type", b"text/event-stream")
            _Flood(self, request, size).start()
            return NOT_DONE_YET

        self._script(flood, key, times)

    def _script(self, behave, key, times):
        self._scripts.append(_Script(behave, key, times))

    def _scripted(self, key):
        for script in self._scripts:
            if script.matches(key):
                if script.times is not None:
                    script.times -= 1
                    if script.times == 0:
                        self._scripts.remove(script)
                return script.behave
        return None

    # The API.

    def render(self, request):
        received = ReceivedRequest(
            method=request.method,
            uri=request.uri,
            headers=request.requestHeaders.copy(),
            body=request.content.read(),
            peer=peerText(request.getClientAddress()),
        )
        self.received.append(received)
        request.notifyFinish().addErrback(lambda _: received.lost.callback(None))
        key = received.key
        if key is None:
            return _error(request, 401, "No auth credentials found")
        if self.keys is not None and key not in self.keys:
            return _error(request, 401, "User not found.")
        scripted = self._scripted(key)
        if scripted is not None:
            return scripted(request, received)
        route = (request.method, request.path)
        if route == (b"POST", b"/api/v1/chat/completions"):
            return self._chat(request, received)
        if route == (b"GET", b"/api/v1/models"):
            return self._models(request)
        if route == (b"GET", b"/api/v1/key"):
            return self._keyInfo(request, key)
        return _error(request, 404, "Not Found")

    def _chat(self, request, received):
        try:
            asked = json.loads(received.body)
            if not isinstance(asked, dict):
                raise ValueError()
        except ValueError:
            return _error(request, 400, "the body must be a JSON object")
        self.usedToday[received.key] += 1
        if asked.get("stream"):
            return self._stream(request, received)
        words = _words(asked.get("max_tokens"))
        return _json(
            request,
            200,
            {
                **self._completionHead(asked, "chat.completion"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": " ".join(words)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": _usage(words),
            },
        )

    def _completionHead(self, asked, kind):
        return {
            "id": f"gen-fake-{next(self._ids)}",
            "object": kind,
            "created": int(self._reactor.seconds()),
            "model": asked.get("model") or FAKE_MODEL,
            "provider": "hermux-fake",
        }

    def _stream(self, request, received, dropAfter=None, errorAfter=None):
        asked = json.loads(received.body or b"{}")
        words = _words(asked.get("max_tokens"))
        head = self._completionHead(asked, "chat.completion.chunk")
        events = [b": OPENROUTER PROCESSING\n\n"]
        for index, word in enumerate(words):
            delta = {"role": "assistant", "content": word if index == 0 else " " + word}
            events.append(_event({**head, "choices": [
                {"index": 0, "delta": delta, "finish_reason": None}]}))
        if errorAfter is not None:
            count, error = errorAfter
            del events[count:]
            events.append(_event({**head, "error": error, "choices": [
                {"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]}))
        else:
            events.append(_event({**head, "choices": [
                {"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": _usage(words)}))
            events.append(b"data: [DONE]\n\n")
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")
        _EventSender(self._reactor, self.eventInterval, request, events, dropAfter).start()
        return NOT_DONE_YET

    def _models(self, request):
        return _json(request, 200, {"data": [{
            "id": FAKE_MODEL,
            "name": "hermux fake model",
            "context_length": 8192,
            "pricing": {"prompt": "0", "completion": "0"},
        }]})

    def _keyInfo(self, request, key):
        used = self.usedToday[key]
        return _json(request, 200, {"data": {
            "label": f"{key[:6]}...{key[-3:]}",
            "limit": None,
            "limit_remaining": None,
            "usage": 0,
            "is_free_tier": True,
            "free_model_daily_requests": {
                "limit": self.dailyLimit,
                "remaining": max(0, self.dailyLimit - used),
                "used": used,
            },
        }})


class _CountedChannel(HTTPChannel):
    """
    Twisted's HTTP connection, in its site's C{channels} while it is open.
    """

    def connectionMade(self):
        super().connectionMade()
        self.site.channels.add(self)

    def connectionLost(self, reason):
        self.site.channels.discard(self)
        super().connectionLost(reason)


class _FakeSite(Site):
    protocol = _CountedChannel
    noisy = False

    def __init__(self, fake, reactor=None):
        super().__init__(fake, reactor=reactor)
        self.channels = set()

    def log(self, request):
        pass


def fakeSite(fake: FakeOpenRouter, reactor=None) -> Site:
    """
    A site serving C{fake}, for a benchmark's upstream: it writes no access
    log line per request, and keeps its open connections in C{channels}.
    A plain L{Site} serves the fake as well.
    """
    return _FakeSite(fake, reactor=reactor)


def _words(maxTokens) -> list[str]:
    words = FAKE_ANSWER.split()
    if isinstance(maxTokens, int) and maxTokens > 0:
        return list(itertools.islice(itertools.cycle(words), maxTokens))
    return words


def _usage(words) -> dict:
    return {"prompt_tokens": 8, "completion_tokens": len(words),
            "total_tokens": 8 + len(words)}


def _event(payload) -> bytes:
    return b"data: " + json.dumps(payload).encode("utf-8") + b"\n\n"


class _EventSender:
    """
    Writes server-sent events to a request, C{interval} seconds apart,
    optionally closing the connection after C{dropAfter} of them.
    """

    def __init__(self, reactor, interval, request, events, dropAfter):
        self._reactor = reactor
        self._interval = interval
        self._request = request
        self._events = iter(events)
        self._left = dropAfter
        self._lost = False
        request.notifyFinish().addErrback(self._connectionLost)

    def _connectionLost(self, reason):
        self._lost = True

    def start(self):
        self._send()

    def _send(self):
        while not self._lost:
            if self._left is not None:
                if self._left == 0:
                    self._request.loseConnection()
                    return
                self._left -= 1
            event = next(self._events, None)
            if event is None:
                self._request.finish()
                return
            self._request.write(event)
            if self._interval:
                self._reactor.callLater(self._interval, self._send)
                return


@implementer(IPushProducer)
class _Flood:
    """
    Writes event-stream comments to a request for as long as it takes them.
    """

    _CHUNK = b": " + b"x" * 16380 + b"\n\n"

    def __init__(self, fake, request, size):
        self._fake = fake
        self._request = request
        self._left = size
        self._paused = False
        self._stopped = False

    def start(self):
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._produce()

    def _produce(self):
        while not (self._paused or self._stopped):
            chunk = self._CHUNK
            if self._left is not None:
                if self._left <= 0:
                    self._stopped = True
                    self._request.unregisterProducer()
                    self._request.finish()
                    return
                chunk = chunk[: self._left]
                self._left -= len(chunk)
            self._fake.flooded += len(chunk)
            self._request.write(chunk)

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        self._produce()

    def stopProducing(self):
        self._stopped = True
