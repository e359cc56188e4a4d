# -*- test-case-name: tests.test_quota -*-
"""
What OpenRouter's answers say about the key that got them.

OpenRouter answers a rate-limited request with 429 and a body such as

    {"error": {"code": 429,
               "message": "Rate limit exceeded: free-models-per-day. ...",
               "metadata": {"headers": {"X-RateLimit-Limit": "50",
                                        "X-RateLimit-Remaining": "0",
                                        "X-RateLimit-Reset": "1743638400000"}}}}

where the reset time (epoch milliseconds) may also, or only, come as a
response header.  The message tells the per-day cap from the per-minute one;
C{metadata.limit_source} C{openrouter_shared_capacity} ("High demand for
...") means a popular model is busy for everyone, which is not the key's
fault.  401 means an invalid or disabled key, 402 a negative balance, and
403 either a refused key or, with moderation metadata, a flagged input.
"""

from __future__ import annotations

__all__ = ["KEY_STATUSES", "COOLING_DEFAULT", "COOLING_LONGEST", "EXHAUSTED_LONGEST", "classify"]

import json
import math
from email.utils import parsedate_to_datetime

from twisted.web.http_headers import Headers

from hermux.keypool import ERROR, OK, Kind, Verdict, nextMidnight

# Statuses whose body hermux reads before answering, since they may mean
# that another key should be tried.
KEY_STATUSES = frozenset({401, 402, 403, 429})

COOLING_DEFAULT = 60.0
COOLING_LONGEST = 3600.0
EXHAUSTED_LONGEST = 25 * 3600.0


def classify(status: int, headers: Headers, body: bytes, now: float) -> Verdict:
    """
    What an answer with C{status}, C{headers} and (for L{KEY_STATUSES}) its
    C{body} means for the key that got it, at POSIX time C{now}.
    """
    if status < 400:
        return OK
    if status not in KEY_STATUSES:
        return ERROR
    error = _errorObject(body)
    if status == 429:
        return _rateLimited(headers, error, now)
    if status == 401:
        return Verdict(Kind.DISABLED, None, "the upstream says the key is invalid or disabled (401)")
    if status == 402:
        return Verdict(
            Kind.DISABLED, nextMidnight(now), "the account is out of credits (402)"
        )
    metadata = _metadata(error)
    if "reasons" in metadata or "flagged_input" in metadata:
        return ERROR  # the client's input was flagged: any key would get the same
    return Verdict(Kind.DISABLED, None, "the upstream refused the key (403)")


def _errorObject(body: bytes) -> dict:
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return error if isinstance(error, dict) else {}


def _metadata(error: dict) -> dict:
    metadata = error.get("metadata")
    return metadata if isinstance(metadata, dict) else {}


def _rateLimited(headers: Headers, error: dict, now: float) -> Verdict:
    message = error.get("message")
    message = message if isinstance(message, str) else ""
    metadata = _metadata(error)
    if (
        metadata.get("limit_source") == "openrouter_shared_capacity"
        or "high demand" in message.lower()
    ):
        return Verdict(Kind.BUSY, None, "the model is in high demand (shared capacity)")
    reset = _resetTime(headers, metadata)
    if "free-models-per-day" in message:
        if reset is not None and reset > now:
            until = min(reset, now + EXHAUSTED_LONGEST)
        else:
            until = nextMidnight(now)
        return Verdict(Kind.EXHAUSTED, until, "the daily free-model requests are used up (429)")
    if reset is None or reset <= now:
        reset = _retryAfter(headers, now)
    if reset is None or reset <= now:
        reset = now + COOLING_DEFAULT
    limit = "per-minute" if "per-min" in message else "an unknown"
    return Verdict(
        Kind.COOLING,
        min(reset, now + COOLING_LONGEST),
        f"rate limited by {limit} limit (429)",
    )


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
