# -*- test-case-name: tests.test_testing -*-
"""
A fake OpenRouter, for tests, benchmarks and the demo mode: a twisted.web
resource that answers chat completions, text completions, the Responses
API and the Messages API (as JSON, or as server-sent events a few words at
a time), C{/api/v1/models} and C{/api/v1/key}; checks the Bearer key;
records every request it receives and the usage every answer reported;
and misbehaves on demand (stalls, drops a stream midway, floods, or
answers whatever a test says).  Like OpenRouter, every answer carries an
C{X-Generation-Id} header, a completion's C{usage} has tokens and a
C{cost}, and answers are gzip-compressed when the request accepts gzip.
Any L{twisted.web.server.Site} serves it:

    fake = FakeOpenRouter(["sk-test-1", "sk-test-2"])
    reactor.listenTCP(0, Site(fake), interface="127.0.0.1")
    fake.stallNext()                      # the next request never gets an answer
    fake.answerNext(429, {"error": ...}, key="sk-test-1", times=None)
    fake.platformLimitNext(perDay=True)   # OpenRouter's own refusals, as it
    fake.paymentRequiredNext("credits")   # words them (and forbiddenNext,
                                          # providerLimitNext, htmlForbiddenNext)
    sum(usage.cost for usage in fake.reported)   # the credits it billed

The usage is deterministic.  For a request with body C{body} (bytes) to a
completion path: C{prompt = 10 + len(body) // 4} tokens; C{completion} =
the words of the answer (L{FAKE_ANSWER}'s 11, or C{max_tokens} /
C{max_output_tokens}), of which C{completion // 4} are reasoning tokens.
The first time a key sends a body to a path, C{prompt // 2} tokens are
written to the cache (C{cache_write_tokens}) and none read; each later
time the same key sends the same bytes to the same path, C{prompt // 2}
are read from it (C{cached_tokens}) and none written.  The cost, in
credits, is C{((prompt - cached) * p + cached * c + completion * o) / 1e9}
with the model's L{FakePrice} C{(p, c, o)} (L{FakeOpenRouter.priceOf}):
always a whole number of nanocredits, 0 for a free variant.
"""

from __future__ import annotations

__all__ = [
    "FAKE_ANSWER",
    "FAKE_MODEL",
    "FakeOpenRouter",
    "FakePrice",
    "ReceivedRequest",
    "ReportedUsage",
    "fakeSite",
]

import itertools
import json
import re
import zlib
from collections import Counter
from datetime import datetime, timezone
from decimal import Decimal
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
_PROVIDER = "hermux-fake"
_PROCESSING = b": OPENROUTER PROCESSING\n\n"

# Generation ids are unique in the process, across fakes.
_generations = itertools.count(1)


@attr.s(auto_attribs=True, eq=False)
class ReceivedRequest:
    """
    A request as the fake OpenRouter received it.

    @ivar peer: the address and port it came from, which tells connections
        apart.
    @ivar lost: fires if the connection closed before the fake finished
        answering (for example because hermux aborted it).
    @ivar generationId: the C{X-Generation-Id} the fake answered with
        (also the C{id} of a chat or text completion).
    """

    method: bytes
    uri: bytes
    headers: Headers
    body: bytes
    peer: str
    lost: Deferred = attr.Factory(Deferred)
    generationId: str = ""

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


@attr.frozen
class ReportedUsage:
    """
    The usage one answer of the fake reported, as the fields hermux reads
    give it.  C{promptTokens} includes the cached tokens: for the Messages
    API, whose C{input_tokens} (as Anthropic counts) leave out the tokens
    read from or written to the cache, it is their sum; C{reasoningTokens}
    is 0 there (that shape has no such field).

    @ivar key: the upstream key the request used (L{ReceivedRequest.key}).
    @ivar model: the answer's C{model}.
    @ivar cost: credits, exactly the number written in the answer.
    @ivar free: whether the model is a free variant (its id ends with
        C{:free}); its cost is then 0.
    """

    key: str | None
    model: str
    promptTokens: int
    completionTokens: int
    reasoningTokens: int
    cachedTokens: int
    cost: Decimal
    free: bool


@attr.frozen
class FakePrice:
    """
    What the fake charges for a model, in nanocredits (1e-9 credits) per
    token: C{prompt} per prompt token not read from the cache, C{cached}
    per prompt token read from it, C{completion} per completion token
    (reasoning included).
    """

    prompt: int
    cached: int
    completion: int


@attr.frozen
class _Tokens:
    """
    What one answer used, in every shape's terms.
    """

    prompt: int
    completion: int
    reasoning: int
    cached: int
    cacheWrite: int
    cost: Decimal
    upstreamCost: Decimal | None


@attr.frozen
class _Answer:
    """
    What a completion of any shape says.
    """

    generationId: str
    created: int
    model: str
    words: list
    tokens: _Tokens


@attr.s(auto_attribs=True)
class _Script:
    behave: object
    key: str | None
    times: int | None

    def matches(self, key: str | None) -> bool:
        return self.key is None or self.key == key


def _dumps(payload) -> bytes:
    """
    C{payload} as JSON, with L{Decimal} values written as plain decimal
    numbers (C{0.0000234}: neither a float's repr nor an exponent).
    """
    numbers = []

    def placeholder(value):
        if isinstance(value, Decimal):
            numbers.append(value)
            return f"\x00{len(numbers) - 1}\x00"
        raise TypeError(f"{type(value).__name__} is not JSON serializable")

    text = json.dumps(payload, default=placeholder)
    if numbers:
        text = re.sub(
            r'"\\u0000(\d+)\\u0000"', lambda match: _decimalText(numbers[int(match[1])]), text
        )
    return text.encode("utf-8")


def _decimalText(value: Decimal) -> str:
    if not value:
        return "0"
    return format(value.normalize(), "f")


def _json(request, status: int, payload) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return _dumps(payload)


def _error(request, status: int, message: str) -> bytes:
    return _json(request, status, {"error": {"code": status, "message": message}})


def _acceptsGzip(headers: Headers) -> bool:
    """
    Whether C{Accept-Encoding} allows gzip: C{gzip} (or C{x-gzip}, or else
    C{*}) with a quality above 0.
    """
    qualities = {}
    for value in headers.getRawHeaders(b"accept-encoding", []):
        for item in value.split(b","):
            coding, *parameters = item.split(b";")
            coding = coding.strip().lower()
            if not coding:
                continue
            quality = 1.0
            for parameter in parameters:
                name, _, number = parameter.partition(b"=")
                if name.strip().lower() == b"q":
                    try:
                        quality = float(number.strip())
                    except ValueError:
                        quality = 0.0
            qualities[coding] = quality
    for coding in (b"gzip", b"x-gzip", b"*"):
        if coding in qualities:
            return qualities[coding] > 0
    return False


class _Body:
    """
    Where a streamed answer goes: the request, through a streaming gzip
    compressor if C{compress}, flushed after every write (C{Z_SYNC_FLUSH})
    so that each event can be decoded as soon as it arrives.
    """

    def __init__(self, request, compress: bool):
        self._request = request
        self._compressor = None
        if compress:
            request.setHeader(b"Content-Encoding", b"gzip")
            request.setHeader(b"Vary", b"Accept-Encoding")
            self._compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)

    def write(self, data: bytes) -> None:
        if self._compressor is not None:
            data = self._compressor.compress(data) + self._compressor.flush(zlib.Z_SYNC_FLUSH)
        self._request.write(data)

    def finish(self) -> None:
        if self._compressor is not None:
            self._request.write(self._compressor.flush())
        self._request.finish()

    def loseConnection(self) -> None:
        self._request.loseConnection()


class FakeOpenRouter(Resource):
    """
    The fake.  C{keys} are the tokens it accepts (any Bearer token if
    L{None}).  C{reactor} paces streamed events, C{eventInterval} seconds
    apart: pass a L{twisted.internet.task.Clock} to release them one by one.

    With C{compress} (the default), an answer is gzip-compressed when the
    request's C{Accept-Encoding} allows it (a stream event by event), as
    OpenRouter does; floods never are.

    @ivar received: every request, in order of arrival.
    @ivar reported: the usage of every answer that carried one (a stream's
        once its usage frame was written), in order.
    @ivar usedToday: free-model requests (model ids ending with C{:free})
        answered per key, what C{GET /api/v1/key} reports as
        C{free_model_daily_requests.used}; a test may set it.
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
        compress: bool = True,
    ):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.keys = None if keys is None else frozenset(keys)
        self.eventInterval = eventInterval
        self.dailyLimit = dailyLimit
        self.compress = compress
        self.received: list[ReceivedRequest] = []
        self.reported: list[ReportedUsage] = []
        self.usedToday: Counter[str] = Counter()
        self.flooded = 0
        self._reactor = reactor
        self._scripts: list[_Script] = []
        self._prompts: set[tuple] = set()

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

    PAYMENT_KINDS = (
        "in_flight_budget", "request_too_costly", "credits", "negative_balance", "negative",
    )

    def paymentRequiredNext(self, kind="credits", *, retryAfter=None, key=None, times=1):
        """
        402 of one of OpenRouter's kinds (L{PAYMENT_KINDS}):
        C{in_flight_budget} (transient, with C{Retry-After: retryAfter} if
        given), C{request_too_costly} (this request's estimated cost is more
        than the whole budget), C{credits} (out of credits),
        C{negative_balance} (by its message only) or C{negative} (the
        account's balance is below zero, by its message and
        C{metadata.reason}).
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
            elif kind == "negative":
                message = "Your account has a negative credit balance. Add credits to continue."
                metadata.update(limit_source="openrouter_credits", reason="negative_balance")
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
        Stream a completion (in the shape of the request's path), then close
        the connection after C{afterEvents} events, as a crashing upstream
        would.
        """

        def drop(request, received):
            return self._scriptedStream(request, received, dropAfter=afterEvents)

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
        C{X-RateLimit-*} values in its metadata).  Such a stream has no usage
        frame and no C{[DONE]}.
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
            return self._scriptedStream(request, received, errorAfter=(afterEvents, error))

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

    @staticmethod
    def priceOf(model: str) -> FakePrice:
        """
        What the fake charges for C{model}: nothing for a free variant (an
        id ending with C{:free}); otherwise C{(100, 25, 400)} nanocredits
        per prompt, cached and completion token times a step from 1 to 5,
        C{zlib.crc32(model) % 5 + 1} (2 for C{test/model}, 4 for
        L{FAKE_MODEL}).
        """
        if model.endswith(":free"):
            return FakePrice(0, 0, 0)
        step = zlib.crc32(model.encode("utf-8")) % 5 + 1
        return FakePrice(100 * step, 25 * step, 400 * step)

    def render(self, request):
        received = ReceivedRequest(
            method=request.method,
            uri=request.uri,
            headers=request.requestHeaders.copy(),
            body=request.content.read(),
            peer=peerText(request.getClientAddress()),
            generationId=f"gen-{int(self._reactor.seconds())}-{next(_generations):08d}",
        )
        self.received.append(received)
        request.notifyFinish().addErrback(lambda _: received.lost.callback(None))
        request.setHeader(b"X-Generation-Id", received.generationId.encode("ascii"))
        answer = self._answer(request, received)
        if (
            isinstance(answer, bytes)
            and answer
            and self._compresses(request)
            and not request.responseHeaders.hasHeader(b"content-encoding")
        ):
            request.setHeader(b"Content-Encoding", b"gzip")
            request.setHeader(b"Vary", b"Accept-Encoding")
            compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            answer = compressor.compress(answer) + compressor.flush()
        return answer

    def _compresses(self, request) -> bool:
        return self.compress and _acceptsGzip(request.requestHeaders)

    def _answer(self, request, received):
        key = received.key
        if key is None:
            return _error(request, 401, "No auth credentials found")
        if self.keys is not None and key not in self.keys:
            return _error(request, 401, "User not found.")
        scripted = self._scripted(key)
        if scripted is not None:
            return scripted(request, received)
        if request.method == b"POST" and request.path in _SHAPES:
            return self._complete(request, received, _SHAPES[request.path])
        route = (request.method, request.path)
        if route == (b"GET", b"/api/v1/models"):
            return self._models(request)
        if route == (b"GET", b"/api/v1/key"):
            return self._keyInfo(request, key)
        return _error(request, 404, "Not Found")

    def _complete(self, request, received, shape):
        try:
            asked = json.loads(received.body)
            if not isinstance(asked, dict):
                raise ValueError()
        except ValueError:
            return _error(request, 400, "the body must be a JSON object")
        answer = self._answerTo(request, received, asked, shape)
        if answer.model.endswith(":free"):
            self.usedToday[received.key] += 1
        if asked.get("stream"):
            return self._stream(request, received, shape.events(answer), answer, shape)
        self._report(received.key, answer, shape)
        return _json(request, 200, shape.json(answer))

    def _answerTo(self, request, received, asked, shape) -> _Answer:
        """
        The answer to C{asked}, with its usage (see the module's
        docstring).
        """
        model = asked.get("model")
        if not isinstance(model, str) or not model:
            model = FAKE_MODEL
        words = _words(asked.get(shape.maxTokens))
        prompt = 10 + len(received.body) // 4
        seen = (received.key, request.path, received.body)
        cached, cacheWrite = (prompt // 2, 0) if seen in self._prompts else (0, prompt // 2)
        self._prompts.add(seen)
        price = self.priceOf(model)
        nanos = (
            (prompt - cached) * price.prompt + cached * price.cached + len(words) * price.completion
        )
        cost = Decimal(_decimalText(Decimal(nanos).scaleb(-9)))
        tokens = _Tokens(
            prompt=prompt,
            completion=len(words),
            reasoning=len(words) // 4,
            cached=cached,
            cacheWrite=cacheWrite,
            cost=cost,
            # What the provider charged, which OpenRouter gives apart: a
            # reader that adds it to the cost counts twenty times too much.
            upstreamCost=None if not nanos else Decimal(_decimalText(cost * 20)),
        )
        return _Answer(
            generationId=received.generationId,
            created=int(self._reactor.seconds()),
            model=model,
            words=words,
            tokens=tokens,
        )

    def _report(self, key, answer: _Answer, shape) -> None:
        """
        Record the usage C{answer} reported, as C{shape} gives it.
        """
        tokens = answer.tokens
        prompt, reasoning = tokens.prompt, tokens.reasoning
        if shape is _Messages:
            # input_tokens plus the cache's read and written tokens: all of
            # the prompt, as chat counts it.
            reasoning = 0
        self.reported.append(
            ReportedUsage(
                key=key,
                model=answer.model,
                promptTokens=prompt,
                completionTokens=tokens.completion,
                reasoningTokens=reasoning,
                cachedTokens=tokens.cached,
                cost=tokens.cost,
                free=answer.model.endswith(":free"),
            )
        )

    def _stream(self, request, received, events, answer=None, shape=None, dropAfter=None):
        """
        Send C{events} (bytes, each with whether it is the usage frame of
        C{answer}), C{eventInterval} apart.
        """
        def report():
            self._report(received.key, answer, shape)

        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")
        body = _Body(request, self._compresses(request))
        _EventSender(
            self._reactor, self.eventInterval, request, body, events, dropAfter,
            None if answer is None else report,
        ).start()
        return NOT_DONE_YET

    def _scriptedStream(self, request, received, dropAfter=None, errorAfter=None):
        """
        A stream for C{dropNext} and C{midStreamErrorNext}: the shape of the
        request's path (chat for any other), cut after C{dropAfter} events,
        or ended after C{errorAfter[0]} events by the error event
        C{errorAfter[1]} (with no usage frame).
        """
        try:
            asked = json.loads(received.body or b"{}")
        except ValueError:
            asked = {}
        if not isinstance(asked, dict):
            asked = {}
        shape = _SHAPES.get(request.path, _Chat)
        if errorAfter is not None:
            shape = _Chat
        answer = self._answerTo(request, received, asked, shape)
        events = shape.events(answer)
        if errorAfter is None:
            return self._stream(request, received, events, answer, shape, dropAfter=dropAfter)
        count, error = errorAfter
        events = [event for event in events if not event[1] and b"[DONE]" not in event[0]]
        del events[count:]
        events.append((_event({**_chatHead(answer, "chat.completion.chunk"), "error": error, "choices": [
            {"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]}), False))
        return self._stream(request, received, events)

    def _models(self, request):
        price = self.priceOf(FAKE_MODEL)
        return _json(request, 200, {"data": [{
            "id": FAKE_MODEL,
            "name": "hermux fake model",
            "context_length": 8192,
            "pricing": {
                "prompt": _decimalText(Decimal(price.prompt).scaleb(-9)),
                "completion": _decimalText(Decimal(price.completion).scaleb(-9)),
                "input_cache_read": _decimalText(Decimal(price.cached).scaleb(-9)),
            },
        }]})

    def _keyInfo(self, request, key):
        used = self.usedToday[key]
        spent = float(sum((usage.cost for usage in self.reported if usage.key == key), Decimal(0)))
        return _json(request, 200, {"data": {
            "label": f"{key[:6]}...{key[-3:]}",
            "limit": None,
            "limit_remaining": None,
            "usage": spent,
            "usage_daily": spent,
            "is_free_tier": True,
            "free_model_daily_requests": {
                "limit": self.dailyLimit,
                "remaining": max(0, self.dailyLimit - used),
                "used": used,
            },
        }})


# The four shapes of a completion.


def _chatUsage(tokens: _Tokens) -> dict:
    """
    C{usage} as chat and text completions give it.
    """
    return {
        "prompt_tokens": tokens.prompt,
        "completion_tokens": tokens.completion,
        "total_tokens": tokens.prompt + tokens.completion,
        "cost": tokens.cost,
        "is_byok": False,
        "prompt_tokens_details": {
            "cached_tokens": tokens.cached,
            "cache_write_tokens": tokens.cacheWrite,
            "audio_tokens": 0,
        },
        "cost_details": {"upstream_inference_cost": tokens.upstreamCost},
        "completion_tokens_details": {"reasoning_tokens": tokens.reasoning},
    }


def _chatHead(answer: _Answer, kind: str) -> dict:
    return {
        "id": answer.generationId,
        "object": kind,
        "created": answer.created,
        "model": answer.model,
        "provider": _PROVIDER,
    }


class _Chat:
    """
    POST /api/v1/chat/completions.
    """

    maxTokens = "max_tokens"

    @staticmethod
    def json(answer: _Answer) -> dict:
        return {
            **_chatHead(answer, "chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": " ".join(answer.words)},
                    "finish_reason": "stop",
                    "native_finish_reason": "stop",
                }
            ],
            "usage": _chatUsage(answer.tokens),
        }

    @staticmethod
    def events(answer: _Answer) -> list:
        head = _chatHead(answer, "chat.completion.chunk")

        def chunk(delta, finish, **extra):
            return _event({**head, "choices": [
                {"index": 0, "delta": delta, "finish_reason": finish, "native_finish_reason": finish}
            ], **extra})

        events = [(_PROCESSING, False)]
        for index, word in enumerate(answer.words):
            delta = {"role": "assistant", "content": word if index == 0 else " " + word}
            events.append((chunk(delta, None), False))
        events.append((chunk({}, "stop"), False))
        # The accounting frame: it repeats finish_reason.
        usage = chunk({}, "stop", usage=_chatUsage(answer.tokens))
        events.append((usage, True))
        events.append((b"data: [DONE]\n\n", False))
        return events


class _TextCompletions:
    """
    POST /api/v1/completions: text completions.
    """

    maxTokens = "max_tokens"

    @staticmethod
    def json(answer: _Answer) -> dict:
        return {
            **_chatHead(answer, "text_completion"),
            "choices": [
                {"index": 0, "text": " ".join(answer.words), "finish_reason": "stop",
                 "native_finish_reason": "stop", "logprobs": None}
            ],
            "usage": _chatUsage(answer.tokens),
        }

    @staticmethod
    def events(answer: _Answer) -> list:
        head = _chatHead(answer, "text_completion")

        def chunk(text, finish, **extra):
            return _event({**head, "choices": [
                {"index": 0, "text": text, "finish_reason": finish, "native_finish_reason": finish,
                 "logprobs": None}
            ], **extra})

        events = [(_PROCESSING, False)]
        for index, word in enumerate(answer.words):
            events.append((chunk(word if index == 0 else " " + word, None), False))
        events.append((chunk("", "stop"), False))
        events.append((chunk("", "stop", usage=_chatUsage(answer.tokens)), True))
        events.append((b"data: [DONE]\n\n", False))
        return events


class _Responses:
    """
    POST /api/v1/responses: the Responses API.
    """

    maxTokens = "max_output_tokens"

    @staticmethod
    def _response(answer: _Answer, done: bool) -> dict:
        tokens = answer.tokens
        text = " ".join(answer.words)
        return {
            "id": "resp-" + answer.generationId,
            "object": "response",
            "created_at": answer.created,
            "model": answer.model,
            "status": "completed" if done else "in_progress",
            "error": None,
            "output": [
                {
                    "type": "message",
                    "id": "msg-" + answer.generationId,
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ] if done else [],
            "usage": {
                "input_tokens": tokens.prompt,
                "input_tokens_details": {"cached_tokens": tokens.cached},
                "output_tokens": tokens.completion,
                "output_tokens_details": {"reasoning_tokens": tokens.reasoning},
                "total_tokens": tokens.prompt + tokens.completion,
                "cost": tokens.cost,
                "is_byok": False,
                "cost_details": {"upstream_inference_cost": tokens.upstreamCost},
            } if done else None,
        }

    @classmethod
    def json(cls, answer: _Answer) -> dict:
        return cls._response(answer, True)

    @classmethod
    def events(cls, answer: _Answer) -> list:
        sequence = itertools.count()
        item = "msg-" + answer.generationId

        def event(kind, **payload):
            return _event({"type": kind, "sequence_number": next(sequence), **payload}, kind)

        events = [
            (_PROCESSING, False),
            (event("response.created", response=cls._response(answer, False)), False),
        ]
        for index, word in enumerate(answer.words):
            delta = word if index == 0 else " " + word
            events.append((event("response.output_text.delta", item_id=item, output_index=0,
                                 content_index=0, delta=delta), False))
        events.append((event("response.output_text.done", item_id=item, output_index=0,
                             content_index=0, text=" ".join(answer.words)), False))
        events.append((event("response.completed", response=cls._response(answer, True)), True))
        return events


class _Messages:
    """
    POST /api/v1/messages: the Messages API, in Anthropic's shape, where
    C{input_tokens} leaves out the tokens read from or written to the cache.
    """

    maxTokens = "max_tokens"

    @staticmethod
    def _usage(tokens: _Tokens, final: bool) -> dict:
        usage = {
            "input_tokens": tokens.prompt - tokens.cached - tokens.cacheWrite,
            "cache_creation_input_tokens": tokens.cacheWrite,
            "cache_read_input_tokens": tokens.cached,
            # message_start counts the first output token, as Anthropic's
            # does; message_delta gives the whole count.
            "output_tokens": tokens.completion if final else 1,
        }
        if final:
            usage.update(
                cost=tokens.cost,
                is_byok=False,
                cost_details={"upstream_inference_cost": tokens.upstreamCost},
            )
        return usage

    @classmethod
    def _message(cls, answer: _Answer, done: bool) -> dict:
        return {
            "id": "msg-" + answer.generationId,
            "type": "message",
            "role": "assistant",
            "model": answer.model,
            "content": [{"type": "text", "text": " ".join(answer.words)}] if done else [],
            "stop_reason": "end_turn" if done else None,
            "stop_sequence": None,
            "usage": cls._usage(answer.tokens, done),
        }

    @classmethod
    def json(cls, answer: _Answer) -> dict:
        return cls._message(answer, True)

    @classmethod
    def events(cls, answer: _Answer) -> list:
        def event(kind, **payload):
            return _event({"type": kind, **payload}, kind)

        events = [
            (_PROCESSING, False),
            (event("message_start", message=cls._message(answer, False)), False),
            (event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
             False),
            (event("ping"), False),
        ]
        for index, word in enumerate(answer.words):
            text = word if index == 0 else " " + word
            events.append((event("content_block_delta", index=0,
                                 delta={"type": "text_delta", "text": text}), False))
        events.append((event("content_block_stop", index=0), False))
        events.append((event("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None},
                             usage=cls._usage(answer.tokens, True)), True))
        events.append((event("message_stop"), False))
        return events


_SHAPES = {
    b"/api/v1/chat/completions": _Chat,
    b"/api/v1/completions": _TextCompletions,
    b"/api/v1/responses": _Responses,
    b"/api/v1/messages": _Messages,
}


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
    if isinstance(maxTokens, int) and not isinstance(maxTokens, bool) and maxTokens > 0:
        return list(itertools.islice(itertools.cycle(words), maxTokens))
    return words


def _event(payload, name: str | None = None) -> bytes:
    """
    A server-sent event: C{data:} with C{payload} as JSON, after an
    C{event:} line if C{name} is given.
    """
    data = b"data: " + _dumps(payload) + b"\n\n"
    if name is None:
        return data
    return b"event: " + name.encode("ascii") + b"\n" + data


class _EventSender:
    """
    Writes server-sent events to C{body}, C{interval} seconds apart,
    optionally closing the connection after C{dropAfter} of them; calls
    C{report} when it has written the event that carries the usage.
    """

    def __init__(self, reactor, interval, request, body, events, dropAfter, report):
        self._reactor = reactor
        self._interval = interval
        self._body = body
        self._events = iter(events)
        self._left = dropAfter
        self._report = report
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
                    self._body.loseConnection()
                    return
                self._left -= 1
            event, usage = next(self._events, (None, False))
            if event is None:
                self._body.finish()
                return
            self._body.write(event)
            if usage and self._report is not None:
                self._report()
            if self._interval:
                self._reactor.callLater(self._interval, self._send)
                return


@implementer(IPushProducer)
class _Flood:
    """
    Writes event-stream comments to a request for as long as it takes them
    (never compressed: a flood is about bytes on the wire).
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
