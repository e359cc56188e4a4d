# -*- test-case-name: tests.test_relay,tests.test_relaycorrectness,tests.test_record,tests.test_failover -*-
"""
The relay: forwards one client request upstream with a chosen key and
streams the answer back as it arrives.

The client's connection paces the upstream's: the upstream transport is
registered as the producer for the client's request, so a client that reads
slowly stops hermux reading from the upstream, and a client that goes away
aborts the upstream request.

An answer that says the key cannot serve (see L{hermux.quota}) is read
whole, and the request is sent again with another key, while nothing has
reached the client yet; a breaker per request (L{_Breaker}) stops that after
two keys gave the same kind of answer, and passes the last one on.

The relay serves any twisted.web request, and notes in its record (see
L{hermux.record}) the key that served it and how the exchange ended.
"""

from __future__ import annotations

__all__ = ["BufferedBody", "Relay", "requestedOf", "useOf"]

import math
from typing import Callable

from OpenSSL.SSL import Error as TLSError
from service_identity import VerificationError
from twisted.internet import error
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    PotentialDataLoss,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from hermux.config import Key
from hermux.errors import writeError
from hermux.hygiene import copyResponseHeaders, upstreamHeaders
from hermux.keypool import ERROR, Attempt, KeyPool, Kind, NoKeyAvailable, Use, Verdict
from hermux.ledger import UNKNOWN
from hermux.metrics import Metrics
from hermux.quota import KEY_STATUSES, classify
from hermux.record import recordOf
from hermux.upstream import Upstream
from hermux.usage import RequestedModel, decodedBody, requestedModel, watchAnswer


@implementer(IBodyProducer)
class BufferedBody:
    """
    A request body that is already in memory, written upstream at once.

    Twisted has buffered the client's whole body before the request is
    rendered, so there is nothing to pace; the same bytes can be sent again.
    """

    def __init__(self, data: bytes):
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer):
        # Written once: a retry makes a new body from the request's.
        data, self._data = self._data, b""
        consumer.write(data)
        return succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


def _requestBody(request) -> IBodyProducer | None:
    """
    The body to send upstream: none if the client sent none, so that a GET
    stays without a Content-Length.
    """
    request.content.seek(0)
    data = request.content.read()
    if not data and not request.requestHeaders.hasHeader(b"content-length"):
        return None
    return BufferedBody(data)


def requestedOf(request) -> RequestedModel:
    """
    The model C{request}'s body names (the only thing hermux reads of a
    request body).
    """
    request.content.seek(0)
    contentType = request.requestHeaders.getRawHeaders(b"content-type")
    return requestedModel(request.content.read(), contentType[0] if contentType else None)


def useOf(client, asked: RequestedModel) -> Use:
    """
    What a request of C{client} (L{None}: none) that names C{asked} is for
    the pool.
    """
    model = asked.model if asked.model is not None else UNKNOWN
    if client is None:
        return Use(model=model, free=asked.free)
    return Use(client.label, model, asked.free, client.keys)


def _nothing():
    pass


class _Watchdog:
    """
    Calls C{onIdle} when C{kick} has not been called for C{timeout} seconds.
    """

    def __init__(self, reactor, timeout: float):
        self.fired = False
        self.onIdle: Callable[[], object] = _nothing
        self._timeout = timeout
        self._call = reactor.callLater(timeout, self._fire)

    def kick(self):
        if self._call.active():
            self._call.reset(self._timeout)

    def stop(self):
        if self._call.active():
            self._call.cancel()
        # onIdle refers to a body protocol that refers back to kick: free
        # them now rather than when the cyclic garbage collector runs.
        self.onIdle = _nothing

    def _fire(self):
        self.fired = True
        self.onIdle()


class _BodyReader(Protocol):
    """
    Reads an upstream response body.  C{done} fires with L{result} when the
    body is complete, fails if the upstream broke, and aborts the upstream
    read if it is cancelled.
    """

    def __init__(self, kick: Callable[[], None]):
        self._kick = kick
        self.done: Deferred = Deferred(lambda _: self.abort())

    def connectionLost(self, reason):
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(self.result())
        else:
            self.done.errback(reason)

    def abort(self):
        self.transport.stopProducing()

    def result(self):
        return None


class _BodyRelay(_BodyReader):
    """
    Writes an upstream response body to the client's request as it arrives.
    """

    def __init__(self, request, kick: Callable[[], None], watch=None):
        super().__init__(kick)
        self._request = request
        self._watch = watch  # a hermux.usage.AnswerWatch, or None
        self.usage = None  # what the answer said it used, once it ended

    def connectionMade(self):
        self._request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes):
        self._kick()
        self._request.write(data)
        if self._watch is not None:
            self._watch.dataReceived(data)

    def connectionLost(self, reason):
        if self._watch is not None:
            # Also when it broke: an error event, or the usage, may have
            # come before.
            self.usage = self._watch.finish()
        super().connectionLost(reason)


def _causes(failure):
    """
    The failures that an agent's L{ResponseFailed} wraps, or the failure.
    """
    if failure.check(ResponseFailed):
        return failure.value.reasons
    return [failure]


def _describeFailure(failure) -> tuple[int, str]:
    """
    The status and message for a client whose request never got an upstream
    answer.  The message is a fixed sentence: exception text can hold
    internals.
    """
    causes = _causes(failure)
    if any(cause.check(error.TimeoutError, error.TCPTimedOutError) for cause in causes):
        return 504, "timed out connecting to the upstream"
    if any(cause.check(error.DNSLookupError) for cause in causes):
        return 502, "the upstream host name does not resolve"
    if any(cause.check(TLSError, VerificationError) for cause in causes):
        return 502, "the upstream's TLS certificate could not be verified"
    if any(cause.check(error.ConnectError) for cause in causes):
        return 502, "could not connect to the upstream"
    if failure.check(ResponseNeverReceived):
        return 502, "the upstream closed the connection without answering"
    if failure.check(ResponseFailed):
        return 502, "the upstream sent an invalid response"
    return 502, "the upstream request failed"


class _BodyCollector(_BodyReader):
    """
    Reads a short upstream response body (an error answer) into memory; it
    fails if the body is longer than C{limit}.
    """

    def __init__(self, limit: int, kick: Callable[[], None]):
        super().__init__(kick)
        self._limit = limit
        self._parts: list[bytes] = []
        self._length = 0

    def dataReceived(self, data: bytes):
        if self.done.called:
            # It gave up (too long, or cancelled); the rest of the read that
            # delivered the last bytes still arrives, and goes nowhere.
            return
        self._kick()
        self._length += len(data)
        if self._length > self._limit:
            self.done.errback(_TooLong())
            self.abort()
            return
        self._parts.append(data)

    def result(self) -> bytes:
        return b"".join(self._parts)


class _TooLong(Exception):
    """
    An upstream error answer longer than hermux reads into memory.
    """


class _Breaker:
    """
    How far one client request may go through the pool: at most
    L{SAME_KIND_LIMIT} keys penalized for the same kind of answer (other
    than a 429, which is about each key's own account), and one more key
    for a request too costly for a budget.  However the answers are
    classified, one request cannot take the whole pool out of service.
    """

    SAME_KIND_LIMIT = 2

    def __init__(self):
        self._penalized: dict[tuple[int, str], int] = {}
        self._overBudget = 0

    def stops(self, status: int, verdict: Verdict) -> tuple[str, str] | None:
        """
        Count an answer that would have another key try; L{None} if one may,
        else the C{hermux_retries_total} reason and a sentence saying why not.
        """
        if verdict.kind is Kind.OVER_BUDGET:
            self._overBudget += 1
            if self._overBudget < 2:
                return None
            return "stopped_over_budget", "two keys found the request too costly for their budget"
        if status == 429:
            return None
        kind = (status, verdict.cause or verdict.kind.value)
        self._penalized[kind] = self._penalized.get(kind, 0) + 1
        if self._penalized[kind] < self.SAME_KIND_LIMIT:
            return None
        return (
            "stopped_breaker",
            f"{self._penalized[kind]} keys gave the same answer ({status} {kind[1]})",
        )


class Relay:
    """
    Forwards requests to an L{Upstream} with keys from a L{KeyPool}, and
    streams the answers back.

    When the upstream answers that the key cannot serve (rate limited, out
    of credits, refused) before any byte went to the client, the same
    request is sent again with the next best key, each key at most once,
    and at most two keys for the same kind of answer (see L{_Breaker}).

    @ivar idleTimeout: seconds without a byte from the upstream, from sending
        a request to the end of its response, after which hermux gives up.
    """

    errorBodyLimit = 64 * 1024

    def __init__(
        self,
        upstream: Upstream,
        pool: KeyPool,
        *,
        idleTimeout: float = 300.0,
        metrics: Metrics | None = None,
        reactor=None,
    ):
        if reactor is None:
            from twisted.internet import reactor
        self.upstream = upstream
        self.pool = pool
        self.reactor = reactor
        self.idleTimeout = idleTimeout
        self.metrics = metrics if metrics is not None else Metrics()

    def forward(self, request, target: bytes, use: Use | None = None) -> Deferred[None]:
        """
        Relay C{request} to the upstream's C{target}.  The returned Deferred
        fires when the exchange is over, however it ended.

        @param use: what the request is for the pool, if the caller has
            read it already (see L{useOf}).
        """
        if use is None:
            use = useOf(recordOf(request).client, requestedOf(request))
        exchange = _Exchange(self, request, target, use)
        d = ensureDeferred(exchange.run())
        request.notifyFinish().addErrback(exchange.clientWentAway, d)
        return d.addErrback(exchange.failed)


class _Exchange:
    """
    One client request and the upstream's answers to it.
    """

    _log = Logger()

    def __init__(self, relay: Relay, request, target: bytes, use: Use):
        self._relay = relay
        self._request = request
        self._record = recordOf(request)
        self._target = target
        self._clientGone = False
        self._watchdog: _Watchdog | None = None
        self._breaker = _Breaker()
        self._use = use
        self._attempt: Attempt | None = None

    def clientWentAway(self, reason, running: Deferred) -> None:
        # The request's own end says so in its record (see
        # HermuxRequest._over); here the exchange only stops.
        self._clientGone = True
        running.cancel()

    async def run(self) -> None:
        tried: set[str] = set()
        try:
            while await self._tryNextKey(tried):
                pass
        finally:
            if self._watchdog is not None:
                self._watchdog.stop()
            self._closeAttempt()

    def _closeAttempt(self) -> None:
        """
        The attempt with the current key is over: its counts go to the
        ledger.
        """
        if self._attempt is not None:
            self._attempt.close()
            self._attempt = None

    async def _tryNextKey(self, tried: set[str]) -> bool:
        """
        Send the request with the best key not tried yet, and answer the
        client, unless the answer says another key should try: then return
        C{True}.
        """
        self._closeAttempt()
        try:
            attempt = self._attempt = self._relay.pool.acquire(exclude=tried, use=self._use)
        except NoKeyAvailable as e:
            self._noKeyAvailable(e.usableAt)
            return False
        key = attempt.key
        tried.add(key.name)
        self._record.keyName = key.name
        self._record.model = attempt.model
        if self._watchdog is not None:
            self._watchdog.stop()
        self._watchdog = _Watchdog(self._relay.reactor, self._relay.idleTimeout)
        response = await self._open(key)
        if response is None:
            return False
        if response.code in KEY_STATUSES:
            return await self._settleKeyAnswer(response, key)
        attempt.report(self._classify(response, b""))
        self._sendHead(response, key, response.length)
        await self._relayBody(response, attempt)
        return False

    def _classify(self, response, body: bytes) -> Verdict:
        return classify(response.code, response.headers, body, self._now(), self._use.free)

    async def _settleKeyAnswer(self, response, key: Key) -> bool:
        """
        Read an answer that may be about the key (see L{KEY_STATUSES}) and
        learn from it; pass it to the client unless another key should try,
        and then return C{True}.
        """
        body = await self._readErrorBody(response, key)
        if body is None:
            return False
        # The judgement reads the answer as decoded; the client gets it as
        # the upstream sent it.
        decoded = decodedBody(response.headers, body, self._relay.errorBodyLimit)
        verdict = self._classify(response, b"" if decoded is None else decoded)
        self._attempt.report(verdict)
        if verdict.penalizes or verdict.kind is Kind.OVER_BUDGET:
            stopped = self._breaker.stops(response.code, verdict)
            if stopped is None:
                self._relay.metrics.retries.labels(verdict.kind.value).inc()
                self._log.info(
                    "{requestId} {method} {path}: key {key} cannot serve ({reason}); trying another",
                    **self._retryFields(key, verdict),
                )
                return True
            label, why = stopped
            self._relay.metrics.retries.labels(label).inc()
            self._record.outcome = f"retries stopped: {why}"
            self._log.warn(
                "{requestId} {method} {path}: key {key} cannot serve ({reason}); "
                "not trying another: {why}",
                why=why,
                **self._retryFields(key, verdict),
            )
        self._sendHead(response, key, len(body))
        self._request.write(body)
        self._request.finish()
        return False

    def _retryFields(self, key: Key, verdict) -> dict:
        """
        The fields of a log line about a key that could not serve this
        request: names only, never a token.
        """
        return {
            "requestId": self._record.requestId,
            "method": self._request.method.decode("ascii", "replace"),
            "path": self._request.path.decode("ascii", "replace"),
            "key": key.name,
            "reason": verdict.reason,
        }

    def _now(self) -> float:
        return self._relay.reactor.seconds()

    def _noKeyAvailable(self, usableAt: float | None) -> None:
        request = self._request
        if usableAt is None:
            self._record.outcome = "no usable key"
            writeError(
                request,
                503,
                "no key can serve: the upstream refused every key; "
                "check tokens.csv and reload hermux",
            )
            return
        wait = max(1, math.ceil(usableAt - self._now()))
        self._record.outcome = "every key rate limited or exhausted"
        request.setHeader(b"Retry-After", b"%d" % (wait,))
        writeError(
            request,
            429,
            f"every key is rate limited or has used up its daily requests; "
            f"retry in {wait} seconds",
        )

    async def _open(self, key: Key):
        """
        Send the request upstream and wait for the response head; answer the
        client with an error and return L{None} if there is none.
        """
        request = self._request
        headers = upstreamHeaders(request.requestHeaders, key.token.encode("ascii"))
        body = _requestBody(request)
        try:
            pending = self._relay.upstream.request(request.method, self._target, headers, body)
        except Exception:
            # An agent that raises instead of failing its Deferred failed to
            # send the request all the same.
            pending = fail()
        self._watchdog.onIdle = pending.cancel
        sent = self._now()
        try:
            response = await pending
        except Exception:
            if self._clientGone:
                raise
            if self._watchdog.fired:
                code, message = 504, "the upstream did not answer in time"
            else:
                code, message = _describeFailure(Failure())
            self._attempt.report(ERROR)
            self._answerError(key, code, message)
            return None
        self._relay.metrics.ttfb.observe(self._now() - sent)
        return response

    def _answerError(self, key: Key, code: int, message: str) -> None:
        self._record.outcome = message
        self._request.setHeader(b"X-Token-Name", key.name.encode("ascii"))
        writeError(self._request, code, message)

    async def _readErrorBody(self, response, key: Key) -> bytes | None:
        """
        Read a short error answer whole; answer the client with an error
        and return L{None} if that fails.
        """
        collector = _BodyCollector(self._relay.errorBodyLimit, self._watchdog.kick)
        self._watchdog.onIdle = collector.abort
        response.deliverBody(collector)
        try:
            return await collector.done
        except Exception:
            if self._clientGone:
                raise
            self._attempt.report(ERROR)
            self._answerError(key, 502, "the upstream's error answer could not be read")
            return None

    def _sendHead(self, response, key: Key, length) -> None:
        """
        Send the upstream's status and headers to the client, with the
        length of the body to follow if it is known (Twisted's client takes
        Content-Length out of the headers).
        """
        request = self._request
        request.setResponseCode(response.code, response.phrase)
        request.defaultContentType = None
        requestId = request.responseHeaders.getRawHeaders(b"X-Request-Id")
        copyResponseHeaders(response.headers, request.responseHeaders)
        if requestId is not None:
            request.responseHeaders.setRawHeaders(b"X-Request-Id", requestId)
        request.setHeader(b"X-Token-Name", key.name.encode("ascii"))
        if length is not UNKNOWN_LENGTH and request.method != b"HEAD" and response.code not in (204, 304):
            request.setHeader(b"Content-Length", b"%d" % (length,))
        # No retry once the answer has begun: the body can go.
        request.content = None
        # Send the head now: a streaming client sees it before the first event.
        request.write(b"")

    async def _relayBody(self, response, attempt: Attempt) -> None:
        request = self._request
        watch = watchAnswer(response.headers, report=attempt.report, now=self._now)
        body = _BodyRelay(request, self._watchdog.kick, watch)
        self._watchdog.onIdle = body.abort
        response.deliverBody(body)
        try:
            await body.done
        except Exception:
            if self._clientGone:
                raise
            self._charge(attempt, body.usage)
            # The upstream broke or stalled mid-body.  Close the client's
            # connection without a clean end, so that it sees a truncated
            # response rather than a complete-looking one.
            self._record.outcome = (
                "upstream stalled; response cut"
                if self._watchdog.fired
                else "upstream broke mid-body; response cut"
            )
            request.unregisterProducer()
            request.loseConnection()
            return
        self._charge(attempt, body.usage)
        request.unregisterProducer()
        request.finish()

    def _charge(self, attempt: Attempt, usage) -> None:
        """
        Add what the answer said it used to C{attempt} and to the record.
        """
        if usage is None:
            return
        attempt.charge(usage)
        self._record.usage = usage
        self._record.model = attempt.model

    def failed(self, failure) -> None:
        """
        The end of an exchange that raised: quietly if the client went away,
        otherwise logged as the bug it is, with whatever answer is still
        possible.
        """
        if self._clientGone:
            return
        request = self._request
        self._log.failure(
            "relaying {method} request failed",
            failure,
            method=request.method.decode("ascii", "replace"),
        )
        self._record.outcome = "internal error"
        if request.startedWriting:
            request.loseConnection()
        else:
            writeError(request, 500, "hermux failed to relay the request")
