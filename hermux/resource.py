# -*- test-case-name: tests.test_resource,tests.test_site,tests.test_record -*-
"""
hermux's resource tree, which authenticates and routes each request.

    /api/...      forwarded upstream as is
    /v1/...       forwarded as /api/v1/...
    /hermux/...   hermux's own: the dashboard (/hermux/ and /hermux/static/),
                  health, keys, metrics, usage, me
    anything else 404

Admin access tokens (allow.txt's, and clients.csv's with the admin role)
may use everything; user tokens may forward, see their own usage and
C{/hermux/me}.
"""

from __future__ import annotations

__all__ = [
    "FORWARDED_METHODS",
    "Forward",
    "Gate",
    "Health",
    "Keys",
    "Me",
    "MetricsPage",
    "Refusal",
    "buildRoot",
]

import json

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from hermux import __version__, dashboard
from hermux.access import AccessList, AuthThrottle, Client
from hermux.clients import ClientBook, LimitRefusal, notAllowedModel
from hermux.errors import ErrorResource, renderError
from hermux.hygiene import BadTarget, upstreamTarget
from hermux.keypool import NANOCREDITS, KeyPool, KeyStatus, State, dayOf, isoTime
from hermux.ledger import COUNTERS, ILedger, MemoryLedger, TooManyRows
from hermux.metrics import Metrics
from hermux.record import printable, recordOf
from hermux.relay import Relay, requestedOf, useOf
from hermux.usagereport import UsageQueryError, parseUsageQuery, reportBody

_NOT_FOUND = ErrorResource(
    404,
    "not found; hermux serves /api/..., /v1/..., the dashboard at /hermux/, "
    "/hermux/health, /hermux/keys, /hermux/metrics, /hermux/usage and /hermux/me",
)
_ADMINS_ONLY = "this endpoint needs an admin access token"

# The methods OpenRouter's API uses.  TRACE would echo the request, key
# included, back to the client from any upstream or middlebox that answers
# it; CONNECT and the rest have no use here.
FORWARDED_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS")


class _Directory(Resource):
    """
    A resource with named children that answers anything else with a JSON
    404.
    """

    def getChild(self, path, request):
        return _NOT_FOUND

    def render(self, request):
        return _NOT_FOUND.render(request)


class _Own(_Directory):
    """
    C{/hermux/...}; C{/hermux} itself, without the slash, leads to the
    dashboard.
    """

    def render(self, request):
        if request.method in (b"GET", b"HEAD"):
            return dashboard.addSlash(request)
        return _NOT_FOUND.render(request)


class Refusal(Exception):
    """
    A request the L{Gate} turned away; C{body} is the answer to render, the
    request being set up for it already.
    """

    def __init__(self, body: bytes):
        super().__init__()
        self.body = body


class Gate:
    """
    Lets in requests with exactly one valid access token that has not
    expired, and throttles addresses that keep presenting wrong ones (see
    L{AuthThrottle}).
    """

    _log = Logger()

    def __init__(self, access: AccessList, throttle: AuthThrottle | None = None, *, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.access = access
        self.throttle = throttle
        self._reactor = reactor

    def admit(self, request) -> Client:
        """
        The client C{request} comes from, also noted in its record.  Its
        token is hashed only if the site has not looked it up already (see
        L{hermux.site.HermuxSite.wantsBody}).

        A throttled address gets 429 whatever its token, unless the token
        succeeded from that address before (see L{AuthThrottle}): the token
        is looked up first, but a valid new one and an invalid one get the
        same 429.  A 429 is not counted as a failure, so the throttle ends a
        window after the failures that began it, as if nothing had been
        tried since.

        @raise Refusal: if it may not come in.
        """
        record = recordOf(request)
        address = record.clientAddress
        if address is None:
            address = request.getClientAddress()
        authorization = request.requestHeaders.getRawHeaders(b"authorization", [])
        client = None
        if len(authorization) <= 1:
            record.tokenLookup = lookup = self.access.lookup(
                authorization[0] if authorization else None, record.tokenLookup
            )
            client = lookup.client
        if self.throttle is not None:
            retryAfter = self.throttle.retryAfter(address, client)
            if retryAfter is not None:
                request.setHeader(b"Retry-After", b"%d" % (retryAfter,))
                raise Refusal(
                    renderError(
                        request,
                        429,
                        "too many failed access tokens from this address; try again later",
                    )
                )
        if len(authorization) > 1:
            raise Refusal(renderError(request, 400, "more than one Authorization header"))
        if client is None:
            if self.throttle is not None and self.throttle.failed(address):
                self._log.warn(
                    "throttling {host}: {failures} failed access tokens within {window:g} seconds",
                    host=getattr(address, "host", "?"),
                    failures=self.throttle.failures,
                    window=self.throttle.window,
                )
            request.setHeader(b"WWW-Authenticate", b"Bearer")
            raise Refusal(renderError(request, 401, "missing or unknown access token"))
        if getattr(request, "discardBody", False):
            # The token was unknown when the head arrived, so the body was
            # dropped; a reload has allowed it since.  Forwarding now would
            # send an empty body.
            request.setHeader(b"Retry-After", b"1")
            raise Refusal(
                renderError(
                    request,
                    503,
                    "the access tokens were reloaded while this request arrived; send it again",
                )
            )
        record.client = client
        entry = client.entry
        if entry is not None and entry.expires is not None and self._reactor.seconds() > entry.expires:
            # Not a guess: the throttle neither counts it nor learns it.
            record.outcome = "access token expired"
            request.setHeader(b"WWW-Authenticate", b'Bearer error="invalid_token"')
            raise Refusal(renderError(request, 401, "this access token has expired"))
        if self.throttle is not None:
            self.throttle.succeeded(address, client)
        return client


class _TokenRequired(Resource):
    """
    A leaf for clients the L{Gate} lets in: subclasses answer them in
    C{renderFor}.
    """

    isLeaf = True

    def __init__(self, gate: Gate):
        super().__init__()
        self.gate = gate

    def render(self, request):
        try:
            client = self.gate.admit(request)
        except Refusal as refusal:
            return refusal.body
        return self.renderFor(request, client)

    def renderFor(self, request, client: Client):
        raise NotImplementedError()


class Forward(_TokenRequired):
    """
    Forwards requests upstream.

    @ivar prefix: what to put before the client's request target to make the
        upstream's (C{b"/api"} for the C{/v1} alias).
    """

    def __init__(self, prefix: bytes, gate: Gate, relay: Relay, book: ClientBook):
        super().__init__(gate)
        self.prefix = prefix
        self._relay = relay
        self._book = book

    def renderFor(self, request, client):
        if request.method not in FORWARDED_METHODS:
            request.setHeader(b"Allow", b", ".join(FORWARDED_METHODS))
            return renderError(request, 405, "hermux does not forward this method")
        try:
            target = upstreamTarget(self.prefix, request.uri)
        except BadTarget as e:
            return renderError(request, 400, str(e))
        asked = requestedOf(request)
        try:
            admission = self._admit(request, client, asked)
        except LimitRefusal as refusal:
            return _refused(request, refusal)
        use = useOf(client, asked)
        confirming = self._book.confirm(client, admission)
        if confirming is None:
            self._forward(request, target, use, admission)
        else:
            # Only for a limited client of a pool shared through Redis: a
            # moment (a quarter of a second at most) to hear the others.
            finished = []
            request.notifyFinish().addBoth(finished.append)
            confirming.addCallbacks(
                lambda _: self._confirmed(request, target, use, admission, finished),
                lambda failure: self._notConfirmed(failure, request, finished),
            )
        return server.NOT_DONE_YET

    def _forward(self, request, target: bytes, use, admission) -> None:
        d = self._relay.forward(request, target, use)
        d.addBoth(admission.release)

    def _confirmed(self, request, target, use, admission, finished: list) -> None:
        if finished:
            admission.release()  # the client went away meanwhile
            return
        self._forward(request, target, use, admission)

    def _notConfirmed(self, failure, request, finished: list) -> None:
        failure.trap(LimitRefusal)
        if not finished:
            request.write(_refused(request, failure.value))
            request.finish()

    def _admit(self, request, client: Client, asked):
        """
        Check the request against C{client}'s models and limits, in the
        order the README gives, and count it in.

        @raise LimitRefusal: if it may not go out.
        """
        entry = client.entry
        if entry is not None and entry.models is not None:
            request.content.seek(0, 2)
            why = notAllowedModel(entry, asked.names, request.content.tell() > 0)
            if why is not None:
                raise LimitRefusal(403, why, "models")
        return self._book.admit(client)


def _refused(request, refusal: LimitRefusal) -> bytes:
    """
    The answer to a request a client's limits keep out.
    """
    recordOf(request).outcome = f"refused: {refusal.limit}"
    if refusal.retryAfter is not None:
        request.setHeader(b"Retry-After", b"%d" % (refusal.retryAfter,))
    return renderError(request, refusal.code, refusal.message)


def _readOnly(request) -> bytes | None:
    """
    The error for anything but GET or HEAD, or for a path below the
    resource; L{None} if there is none.
    """
    if request.postpath:
        return _NOT_FOUND.render(request)
    if request.method not in (b"GET", b"HEAD"):
        request.setHeader(b"Allow", b"GET, HEAD")
        return renderError(request, 405, "use GET")
    return None


def _adminOnly(request, client: Client) -> bytes | None:
    """
    The error for a client that is not an admin; L{None} for an admin.
    """
    if client.admin:
        return None
    return renderError(request, 403, _ADMINS_ONLY)


def _jsonHeaders(request) -> None:
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")


def _json(request, payload) -> bytes:
    _jsonHeaders(request)
    return json.dumps(payload).encode("utf-8")


class Keys(_TokenRequired):
    """
    C{/hermux/keys}: each key's state and today's counts.  Never a key's
    token.
    """

    def __init__(self, pool: KeyPool, gate: Gate):
        super().__init__(gate)
        self._pool = pool

    def renderFor(self, request, client):
        return _readOnly(request) or _adminOnly(request, client) or _json(
            request, {"keys": [_describe(status) for status in self._pool.statuses()]}
        )


def _describe(status: KeyStatus) -> dict:
    return {
        "name": status.name,
        "state": status.state.value,
        "requests_today": status.requestsToday,
        "daily_limit": status.dailyLimit,
        "rate_limited_today": status.rateLimitedToday,
        "errors_today": status.errorsToday,
        "usable_again_at": None if status.usableAt is None else isoTime(status.usableAt),
        "reason": status.reason,
        "free_requests_today": status.freeRequestsToday,
        "cost_today": status.costToday / NANOCREDITS,
        "daily_cost": None if status.dailyCost is None else status.dailyCost / NANOCREDITS,
        "free_requests_reason": status.freeReason,
        "paid_requests_reason": status.paidReason,
    }


_USAGE_PARAMETERS = ("from", "to", "group_by", "client")


class UsagePage(_TokenRequired):
    """
    C{/hermux/usage}: the ledger's counts over a range of UTC days, grouped
    as the query asks (see L{hermux.usagereport}), read and written off the
    reactor thread.  A user access token sees only its own counts.
    """

    _log = Logger()

    def __init__(self, ledger: ILedger, gate: Gate, reactor):
        super().__init__(gate)
        self._ledger = ledger
        self._reactor = reactor

    def renderFor(self, request, client):
        refused = _readOnly(request)
        if refused is not None:
            return refused
        try:
            arguments = _queryArguments(request)
            if not client.admin:
                if arguments.setdefault("client", client.label) != client.label:
                    return renderError(
                        request, 403, "client: a user access token sees only its own usage"
                    )
            query = parseUsageQuery(arguments, dayOf(self._reactor.seconds()))
        except UsageQueryError as e:
            return renderError(request, 400, str(e))
        finished = []
        request.notifyFinish().addBoth(finished.append)
        d = self._ledger.usage(query.fromDay, query.toDay, query.groupBy, query.client)
        d.addCallback(self._body, request, query)
        d.addErrback(self._failed, request)
        d.addCallback(self._answer, request, finished)
        return server.NOT_DONE_YET

    def _body(self, rows, request, query):
        _jsonHeaders(request)
        if IReactorThreads.providedBy(self._reactor):
            # Writing thousands of rows takes tens of milliseconds: not in
            # the reactor's thread either.
            return deferToThreadPool(
                self._reactor, self._reactor.getThreadPool(), reportBody, query, rows
            )
        return reportBody(query, rows)

    def _failed(self, failure, request) -> bytes:
        if failure.check(TooManyRows):
            return renderError(request, 400, f"from, to, group_by: {failure.value}")
        self._log.failure("reading the usage ledger failed", failure)
        return renderError(request, 500, "the usage ledger could not be read")

    def _answer(self, body: bytes, request, finished: list) -> None:
        if finished:
            return  # the client went away meanwhile
        request.write(body)
        request.finish()


def _queryArguments(request) -> dict[str, str | None]:
    """
    The usage query's parameters, each the last value given, as text;
    another parameter is an error of its own.
    """
    arguments: dict[str, str | None] = {}
    for name, values in request.args.items():
        text = name.decode("utf-8", "replace")
        if text not in _USAGE_PARAMETERS:
            raise UsageQueryError(printable(text, 32), "is not a parameter of /hermux/usage")
        arguments[text] = values[-1].decode("utf-8", "replace")
    return arguments


class MetricsPage(_TokenRequired):
    """
    C{/hermux/metrics}: the Prometheus exposition (a scrape config sends the
    access token with C{authorization: credentials:}).
    """

    def __init__(self, metrics: Metrics, gate: Gate):
        super().__init__(gate)
        self._metrics = metrics

    def renderFor(self, request, client):
        refused = _readOnly(request) or _adminOnly(request, client)
        if refused is not None:
            return refused
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return generate_latest(self._metrics.registry)


class Me(_TokenRequired):
    """
    C{/hermux/me}: the caller's own name, role, limits, what it used today
    and what remains of its daily limits.
    """

    def __init__(self, book: ClientBook, gate: Gate):
        super().__init__(gate)
        self._book = book

    def renderFor(self, request, client):
        return _readOnly(request) or _json(request, _aboutClient(client, *self._book.today(client.label)))


def _credits(nanocredits: int | None) -> float | None:
    return None if nanocredits is None else nanocredits / NANOCREDITS


def _aboutClient(client: Client, admitted: int, counts) -> dict:
    entry = client.entry
    today = dict(zip(COUNTERS, counts))
    # A client's requests today are those admitted, as daily_requests counts.
    today.update(requests=admitted, cost=_credits(counts.cost))
    if entry is None:
        return {
            "name": client.label,
            "role": "admin",
            "limits": dict.fromkeys(_LIMITS),
            "today": today,
            "remaining": {"requests": None, "cost": None},
        }
    return {
        "name": client.label,
        "role": entry.role.value,
        "limits": {
            "daily_requests": entry.dailyRequests,
            "daily_cost": _credits(entry.dailyCost),
            "per_minute": entry.perMinute,
            "max_parallel": entry.maxParallel,
            "models": None if entry.models is None else list(entry.models),
            "keys": None if entry.keys is None else list(entry.keys),
            "expires": None if entry.expires is None else isoTime(entry.expires),
        },
        "today": today,
        "remaining": {
            "requests": None
            if entry.dailyRequests is None
            else max(0, entry.dailyRequests - admitted),
            "cost": None if entry.dailyCost is None else _credits(max(0, entry.dailyCost - counts.cost)),
        },
    }


_LIMITS = ("daily_requests", "daily_cost", "per_minute", "max_parallel", "models", "keys", "expires")


class Health(Resource):
    """
    C{/hermux/health}: whether hermux is up, for anyone to ask: its version,
    uptime and how many keys are ready.  It says "degraded" (still with
    200: hermux still proxies) with the problem while usage counts cannot
    be written, or while another of C{problems} (callables giving a
    sentence, or L{None} when all is well) has one.
    """

    isLeaf = True

    def __init__(self, pool: KeyPool, ledger: ILedger | None = None, *, reactor=None, problems=()):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self._pool = pool
        self._reactor = reactor
        self._started = reactor.seconds()
        self._problems = tuple(problems)
        if ledger is not None:
            self._problems = (_ledgerProblem(ledger), *self._problems)

    def render(self, request):
        refused = _readOnly(request)
        if refused is not None:
            return refused
        statuses = self._pool.statuses()
        health = {
            "status": "ok",
            "version": __version__,
            "uptime": int(self._reactor.seconds() - self._started),
            "keys": len(statuses),
            "keys_ready": sum(status.state is State.READY for status in statuses),
        }
        problems = [problem for problem in (check() for check in self._problems) if problem]
        if problems:
            health.update(status="degraded", problem="; ".join(problems))
        return _json(request, health)


def _ledgerProblem(ledger: ILedger):
    def problem() -> str | None:
        if ledger.problem is None:
            return None
        return "usage counts cannot be written to the state file"

    return problem


def buildRoot(
    pool: KeyPool,
    access: AccessList,
    relay: Relay,
    ledger: ILedger | None = None,
    metrics: Metrics | None = None,
    throttle: AuthThrottle | None = None,
    reactor=None,
    book: ClientBook | None = None,
    problems=(),
) -> Resource:
    """
    The resource tree of a hermux server.

    @param problems: more checks for C{/hermux/health} (see L{Health}).

    @param book: the clients' days and limits; by default a new one that
        starts from C{ledger}'s counts (a L{MemoryLedger}'s: none).
    """
    if reactor is None:
        from twisted.internet import reactor
    if book is None:
        book = ClientBook(ledger if ledger is not None else MemoryLedger(), reactor=reactor)
    gate = Gate(access, throttle, reactor=reactor)
    root = _Directory()
    root.putChild(b"api", Forward(b"", gate, relay, book))
    root.putChild(b"v1", Forward(b"/api", gate, relay, book))
    own = _Own()
    own.putChild(b"", dashboard.dashboardPage())
    own.putChild(b"static", dashboard.staticFiles())
    own.putChild(b"health", Health(pool, ledger, reactor=reactor, problems=problems))
    own.putChild(b"keys", Keys(pool, gate))
    own.putChild(b"me", Me(book, gate))
    if ledger is not None:
        own.putChild(b"usage", UsagePage(ledger, gate, reactor))
    if metrics is not None:
        own.putChild(b"metrics", MetricsPage(metrics, gate))
    root.putChild(b"hermux", own)
    return root
