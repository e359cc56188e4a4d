# -*- test-case-name: tests.test_quota,tests.test_verdicts -*-
"""
What OpenRouter's answers say about the key that got them.

Only OpenRouter's own error shape, C{{"error": {"code": N, ...}}} with N
equal to the status, can say anything against a key: an HTML page from a
CDN or a firewall, an empty body or another JSON shape is passed to the
client as it is and changes no key's state.  Where OpenRouter types its
error (C{error.metadata.error_type}), the type must be the status's own
(L{ERROR_TYPES}); C{error.metadata.limit_source} then says whose limit it
is.  The verdicts, one per row of README's key-state table:

  - 429 with OpenRouter's C{X-RateLimit-*} headers (in the response or
    copied into C{metadata.headers}) is the platform's limit for the key's
    account: C{free-models-per-day} exhausts the key until the reset, any
    other cools it until the reset (else C{Retry-After}, else a minute).
  - 429 without them is the provider's limit or capacity (as is
    C{openrouter_shared_capacity}, "High demand for ..."): another key would
    meet the same provider, so no penalty and no retry.
  - 402 C{openrouter_in_flight_budget} cools the key until C{Retry-After}
    (else 10 s); 402 C{openrouter_credits} about this request's own
    estimated cost, larger than the whole budget, is L{Kind.OVER_BUDGET}
    (no penalty; one other key may try); any other 402 on a paid request
    (out of credits) keeps the key from paid requests until the next 00:00
    UTC, while it goes on serving free ones; a 402 that says the balance is
    negative, or one on a free-model request (which only a negative
    balance gives), disables it for everything until then.
  - 403 with C{limit_source} C{openrouter_key_limit},
    C{openrouter_guardrail_budget} or C{openrouter_workspace_budget}
    exhausts the key until C{resets_at}; any other 403 (moderation,
    C{permission_denied}) is the request's, passed through.
  - 401 disables the key until the configuration is reloaded.
"""

from __future__ import annotations

__all__ = [
    "KEY_STATUSES",
    "ERROR_TYPES",
    "KEY_LIMIT_SOURCES",
    "COOLING_DEFAULT",
    "IN_FLIGHT_COOLING_DEFAULT",
    "COOLING_LONGEST",
    "EXHAUSTED_LONGEST",
    "classify",
]

import json
import math
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

from twisted.web.http_headers import Headers

from hermux.keypool import ERROR, OK, Kind, Scope, Verdict, nextMidnight

# Statuses whose body hermux reads before answering, since they may mean
# that another key should be tried.
KEY_STATUSES = frozenset({401, 402, 403, 429})

# OpenRouter's error_type for each of them.
ERROR_TYPES = {
    401: "authentication",
    402: "payment_required",
    403: "permission_denied",
    429: "rate_limit_exceeded",
}

# 403 limit sources that are the key's own limits, and what each is.
KEY_LIMIT_SOURCES = {
    "openrouter_key_limit": "the key's credit limit",
    "openrouter_guardrail_budget": "the key's guardrail budget",
    "openrouter_workspace_budget": "the workspace's budget",
}

COOLING_DEFAULT = 60.0
IN_FLIGHT_COOLING_DEFAULT = 10.0
COOLING_LONGEST = 3600.0
EXHAUSTED_LONGEST = 25 * 3600.0

_RATE_LIMIT_HEADERS = frozenset({"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"})


def classify(
    status: int, headers: Headers, body: bytes, now: float, free: bool | None = None
) -> Verdict:
    """
    What an answer with C{status}, C{headers} and (for L{KEY_STATUSES}) its
    C{body} means for the key that got it, at POSIX time C{now}, for a
    request that was for free models only (C{free} L{True}), for a paid
    model (L{False}) or for none (L{None}; see L{hermux.keypool.Use}).
    """
    if status < 400:
        return OK
    if status not in KEY_STATUSES:
        return ERROR
    error = _openRouterError(status, body)
    if error is None:
        return ERROR  # not OpenRouter's own answer: nothing is known of the key
    metadata = _metadata(error)
    errorType = metadata.get("error_type")
    if errorType is not None and errorType != ERROR_TYPES[status]:
        return ERROR  # OpenRouter says it is something else than the status says
    if status == 429:
        return _rateLimited(headers, error, metadata, now)
    if status == 402:
        return _paymentRequired(headers, error, metadata, now, free)
    if status == 403:
        return _forbidden(metadata, now)
    # OpenRouter's own 401s ("User not found.", "No auth credentials found")
    # often carry no metadata at all: the error shape with code 401 is
    # enough, since an invalid key is the key's.
    return Verdict(
        Kind.DISABLED,
        None,
        "OpenRouter says the key is invalid or disabled (401)",
        cause="authentication",
    )


def _openRouterError(status: int, body: bytes) -> dict | None:
    """
    The C{error} object of an answer in OpenRouter's error shape for
    C{status}, or L{None} if the answer is in another shape.
    """
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict):
        return None
    code = error.get("code")
    if isinstance(code, bool) or not isinstance(code, int) or code != status:
        return None
    return error


def _metadata(error: dict) -> dict:
    metadata = error.get("metadata")
    return metadata if isinstance(metadata, dict) else {}


def _message(error: dict) -> str:
    message = error.get("message")
    return message if isinstance(message, str) else ""


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def _rateLimited(headers: Headers, error: dict, metadata: dict, now: float) -> Verdict:
    message = _message(error)
    if (
        _text(metadata.get("limit_source")) == "openrouter_shared_capacity"
        or "high demand" in message.lower()
    ):
        return Verdict(Kind.BUSY, None, "the model is in high demand (shared capacity)")
    if not _platformLimit(headers, metadata):
        # OpenRouter sends X-RateLimit-* with its own limits only: this is
        # the provider's limit or capacity, which any other key would meet.
        return Verdict(Kind.BUSY, None, "the provider's rate limit or capacity (429)")
    reset = _resetTime(headers, metadata)
    if "free-models-per-day" in message:
        if reset is not None and reset > now:
            until = min(reset, now + EXHAUSTED_LONGEST)
        else:
            until = nextMidnight(now)
        return Verdict(
            Kind.EXHAUSTED,
            until,
            "the daily free-model requests are used up (429)",
            cause="per_day",
            scope=Scope.FREE,
        )
    if reset is None or reset <= now:
        reset = _retryAfter(headers, now)
    if reset is None or reset <= now:
        reset = now + COOLING_DEFAULT
    limit = "per-minute" if "per-min" in message else "an unknown"
    return Verdict(
        Kind.COOLING,
        min(reset, now + COOLING_LONGEST),
        f"rate limited by {limit} limit (429)",
        cause="per_minute",
    )


def _platformLimit(headers: Headers, metadata: dict) -> bool:
    """
    Whether OpenRouter's X-RateLimit-* headers came with the answer, as
    response headers or copied into the error's metadata.
    """
    for name in _RATE_LIMIT_HEADERS:
        if headers.hasHeader(name.encode("ascii")):
            return True
    copied = metadata.get("headers")
    if isinstance(copied, dict):
        return any(str(name).lower() in _RATE_LIMIT_HEADERS for name in copied)
    return False


def _paymentRequired(
    headers: Headers, error: dict, metadata: dict, now: float, free: bool | None
) -> Verdict:
    source = _text(metadata.get("limit_source"))
    if source == "openrouter_in_flight_budget":
        until = _retryAfter(headers, now)
        if until is None or until <= now:
            until = now + IN_FLIGHT_COOLING_DEFAULT
        return Verdict(
            Kind.COOLING,
            min(until, now + COOLING_LONGEST),
            "the account's in-flight budget is taken for now (402 openrouter_in_flight_budget)",
            cause="in_flight_budget",
        )
    if source == "openrouter_credits" and _costExceedsBudget(error, metadata):
        return Verdict(
            Kind.OVER_BUDGET,
            None,
            "this request's estimated cost is larger than the whole budget (402)",
            cause="over_budget",
        )
    negative = _negativeBalance(error, metadata)
    if free is False and not negative:
        return Verdict(
            Kind.DISABLED,
            nextMidnight(now),
            "the account is out of credits for paid models (402)",
            cause="credits",
            scope=Scope.PAID,
        )
    return Verdict(
        Kind.DISABLED,
        nextMidnight(now),
        "the account's credit balance is negative (402)"
        if negative or free
        else "the account is out of credits or its balance is negative (402)",
        cause="credits",
    )


def _negativeBalance(error: dict, metadata: dict) -> bool:
    """
    Whether a 402 says the account's balance is below zero, which stops
    free models too: by C{metadata.reason}, a negative C{metadata.balance},
    or the word in its message.
    """
    if metadata.get("reason") == "negative_balance":
        return True
    balance = _number(metadata.get("balance"))
    if balance is not None and balance < 0:
        return True
    return "negative" in _message(error).lower()


def _costExceedsBudget(error: dict, metadata: dict) -> bool:
    """
    Whether a 402 is about this one request's estimated cost rather than
    the account's state.  OpenRouter's documentation (Limits, "In-flight
    spending budget") names the case C{metadata.reason}
    C{weight_exceeds_budget}; an older or other wording that says retrying
    will not help, or an estimated cost above the budget in the metadata,
    counts too.  Conservative: any doubt reads as the account's state.
    """
    if metadata.get("reason") == "weight_exceeds_budget":
        return True
    if "retrying will not help" in _message(error).lower():
        return True
    cost = _number(metadata.get("estimated_cost"))
    budget = _number(metadata.get("in_flight_budget", metadata.get("budget")))
    return cost is not None and budget is not None and cost > budget


def _forbidden(metadata: dict, now: float) -> Verdict:
    source = _text(metadata.get("limit_source"))
    if source not in KEY_LIMIT_SOURCES:
        # Moderation, permission_denied (a model or provider the account
        # may not use): any key would be refused the same request.
        return ERROR
    resets = _resetsAt(metadata.get("resets_at"))
    if resets is not None and resets > now:
        until = min(resets, now + EXHAUSTED_LONGEST)
    else:
        until = nextMidnight(now)
    return Verdict(
        Kind.EXHAUSTED,
        until,
        f"{KEY_LIMIT_SOURCES[source]} is reached (403 {source})",
        cause=source.removeprefix("openrouter_"),
    )


def _resetsAt(value) -> float | None:
    """
    A C{resets_at}, as ISO 8601 (UTC if it names no zone) or as epoch
    seconds or milliseconds, as POSIX time; L{None} if it is neither.
    """
    number = _number(value)
    if number is None and isinstance(value, str):
        number = _finite(value.strip()) if value.strip().isdigit() else None
        if number is None:
            try:
                when = datetime.fromisoformat(value.strip())
                if when.tzinfo is None:
                    when = when.replace(tzinfo=timezone.utc)
                number = when.timestamp()
            except (ValueError, OverflowError, OSError):
                return None
    if number is None:
        return None
    return number / 1000 if number > 1e11 else number


def _number(value) -> float | None:
    """
    A JSON number (not a boolean) as a finite float, else L{None}.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return _finite(value)


def _resetTime(headers: Headers, metadata: dict) -> float | None:
    """
    X-RateLimit-Reset, from the response headers or else from the error's
    metadata, as POSIX time.
    """
    values = headers.getRawHeaders(b"x-ratelimit-reset")
    if values:
        value = values[-1].decode("ascii", "replace")
    else:
        copied = metadata.get("headers")
        copied = copied if isinstance(copied, dict) else {}
        value = next(
            (v for k, v in copied.items() if str(k).lower() == "x-ratelimit-reset"), None
        )
    reset = _finite(value)
    if reset is None:
        return None
    # Documented as milliseconds; a value that small can only be seconds.
    return reset / 1000 if reset > 1e11 else reset


def _finite(value) -> float | None:
    """
    C{value} as a finite number, or L{None} if it is not one.
    """
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _retryAfter(headers: Headers, now: float) -> float | None:
    values = headers.getRawHeaders(b"retry-after")
    if not values:
        return None
    value = values[-1].decode("ascii", "replace").strip()
    if value.isascii() and value.isdigit():
        seconds = _finite(value)
        return None if seconds is None else now + seconds
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, OverflowError):
        return None
