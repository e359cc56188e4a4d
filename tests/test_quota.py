"""
Tests for L{hermux.quota}: what OpenRouter's answers say about the key that
got them.
"""

from __future__ import annotations

import json
import math
from datetime import timezone
from email.utils import format_datetime, formatdate

from hypothesis import given, settings
from hypothesis import strategies as st

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from hermux.keypool import ERROR, OK, Kind, Verdict, nextMidnight
from hermux.quota import (
    COOLING_DEFAULT,
    COOLING_LONGEST,
    EXHAUSTED_LONGEST,
    ERROR_TYPES,
    KEY_STATUSES,
    classify,
)

NOW = 1_800_000_000.0 + 1234.5  # 2027-01-15T08:20:34.5Z
MIDNIGHT = 1_800_057_600  # 2027-01-16T00:00:00Z
HOUR = 3600.0

PER_DAY = (
    "Rate limit exceeded: free-models-per-day. "
    "Add 10 credits to unlock 1000 free model requests per day"
)
PER_DAY_HIGH_BALANCE = "Rate limit exceeded: free-models-per-day-high-balance"
PER_MINUTE = "Rate limit exceeded: free-models-per-min."
HIGH_DEMAND = (
    "High demand for deepseek/deepseek-r1:free on OpenRouter - "
    "limited to 1 request per minute. Please retry shortly."
)


def errorBody(code: int, message: object = None, metadata: object = None) -> bytes:
    """
    An OpenRouter error body.
    """
    error: dict = {"code": code}
    if message is not None:
        error["message"] = message
    if metadata is not None:
        error["metadata"] = metadata
    return json.dumps({"error": error}).encode("utf-8")


def rateLimitBody(message: str, reset: object = None, name: str = "X-RateLimit-Reset") -> bytes:
    """
    A 429 body as OpenRouter sends it for its own limits, with the rate
    limit headers copied into the error's metadata (the reset time when
    C{reset} is given).
    """
    headers = {"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0"}
    if reset is not None:
        headers[name] = reset
    return errorBody(429, message, {"headers": headers})


def headers(**values: str) -> Headers:
    """
    Response headers; C{X_RateLimit_Reset="1"} is C{X-RateLimit-Reset: 1}.
    """
    return Headers({name.replace("_", "-").encode(): [v.encode()] for name, v in values.items()})


def milliseconds(when: float) -> str:
    return str(int(when * 1000))


class StatusTests(SynchronousTestCase):
    """
    Answers that say nothing about the key.
    """

    def test_successIsOK(self):
        """
        Any status below 400 is L{OK}, whatever the body.
        """
        for status in (100, 200, 201, 204, 206, 301, 304, 399):
            verdict = classify(status, Headers(), rateLimitBody(PER_DAY), NOW)
            self.assertEqual(verdict, OK, status)
            self.assertFalse(verdict.penalizes)

    def test_otherErrorsAreErrors(self):
        """
        Errors that are not about the key are L{ERROR}, which does not
        penalize it, even with a body that looks like a rate limit.
        """
        for status in (400, 404, 408, 413, 500, 502, 503, 504):
            for body in (b"", rateLimitBody(PER_DAY, milliseconds(NOW + HOUR))):
                verdict = classify(status, Headers(), body, NOW)
                self.assertEqual(verdict, ERROR, status)
                self.assertFalse(verdict.penalizes)

    def test_keyStatuses(self):
        """
        The statuses that may concern the key are 401, 402, 403 and 429.
        """
        self.assertEqual(KEY_STATUSES, {401, 402, 403, 429})


class PerDayTests(SynchronousTestCase):
    """
    429 for the daily free-model allowance: the key is exhausted.
    """

    def assertExhausted(self, verdict: Verdict, until: float):
        self.assertIsInstance(verdict, Verdict)
        self.assertEqual(verdict.kind, Kind.EXHAUSTED)
        self.assertEqual(verdict.until, until)
        self.assertTrue(verdict.penalizes)
        self.assertTrue(verdict.reason)

    def test_untilResetHeader(self):
        """
        The key is exhausted until the X-RateLimit-Reset response header
        (epoch milliseconds).
        """
        reset = NOW + 3 * HOUR
        verdict = classify(
            429, headers(X_RateLimit_Reset=milliseconds(reset)), rateLimitBody(PER_DAY), NOW
        )
        self.assertExhausted(verdict, reset)

    def test_highBalance(self):
        """
        The per-day limit of accounts with credits
        (C{free-models-per-day-high-balance}) exhausts the key too.
        """
        reset = NOW + 2 * HOUR
        verdict = classify(
            429,
            headers(X_RateLimit_Reset=milliseconds(reset)),
            rateLimitBody(PER_DAY_HIGH_BALANCE),
            NOW,
        )
        self.assertExhausted(verdict, reset)

    def test_untilResetInBody(self):
        """
        Without the response header, the reset time comes from the headers
        copied into the error's metadata.
        """
        reset = NOW + 5 * HOUR
        verdict = classify(429, Headers(), rateLimitBody(PER_DAY, milliseconds(reset)), NOW)
        self.assertExhausted(verdict, reset)

    def test_resetInBodyAnyCase(self):
        """
        The header name in the metadata is matched whatever its case.
        """
        reset = NOW + 5 * HOUR
        for name in ("x-ratelimit-reset", "X-RATELIMIT-RESET", "x-RateLimit-reset"):
            body = rateLimitBody(PER_DAY, milliseconds(reset), name=name)
            self.assertExhausted(classify(429, Headers(), body, NOW), reset)

    def test_resetNumberInBody(self):
        """
        A reset time given as a JSON number rather than a string serves as
        well.
        """
        reset = NOW + 5 * HOUR
        body = rateLimitBody(PER_DAY, int(reset * 1000))
        self.assertExhausted(classify(429, Headers(), body, NOW), reset)

    def test_headerBeforeBody(self):
        """
        When both give a reset time, the response header's is used.
        """
        verdict = classify(
            429,
            headers(X_RateLimit_Reset=milliseconds(NOW + 2 * HOUR)),
            rateLimitBody(PER_DAY, milliseconds(NOW + 7 * HOUR)),
            NOW,
        )
        self.assertExhausted(verdict, NOW + 2 * HOUR)

    def test_resetInSeconds(self):
        """
        A reset time too small to be milliseconds (at most 1e11) is taken
        as seconds.
        """
        reset = NOW + 4 * HOUR
        verdict = classify(
            429, headers(X_RateLimit_Reset=str(int(reset))), rateLimitBody(PER_DAY), NOW
        )
        self.assertExhausted(verdict, int(reset))

    def test_capped(self):
        """
        A reset time more than 25 hours away is cut to 25 hours.
        """
        for reset in (NOW + 48 * HOUR, NOW + 10_000 * HOUR):
            verdict = classify(
                429, headers(X_RateLimit_Reset=milliseconds(reset)), rateLimitBody(PER_DAY), NOW
            )
            self.assertExhausted(verdict, NOW + EXHAUSTED_LONGEST)
        self.assertEqual(EXHAUSTED_LONGEST, 25 * HOUR)

    def test_untilMidnightWithoutReset(self):
        """
        Without a reset time the key is exhausted until the next midnight
        UTC, when OpenRouter's daily counts start again.
        """
        self.assertEqual(nextMidnight(NOW), MIDNIGHT)
        verdict = classify(429, Headers(), rateLimitBody(PER_DAY), NOW)
        self.assertExhausted(verdict, MIDNIGHT)

    def test_untilMidnightAfterPastReset(self):
        """
        A reset time already past (here the one in OpenRouter's
        documentation, from 2025) counts as none: next midnight UTC.
        """
        body = rateLimitBody(PER_DAY)
        for verdict in (
            classify(429, headers(X_RateLimit_Reset="1743638400000"), body, NOW),
            classify(429, Headers(), rateLimitBody(PER_DAY, "1743638400000"), NOW),
            classify(429, headers(X_RateLimit_Reset=milliseconds(NOW)), body, NOW),
        ):
            self.assertExhausted(verdict, MIDNIGHT)

    def test_garbageResetUntilMidnight(self):
        """
        A reset time that is not a number counts as none.
        """
        for value in ("", "soon", "0x1F", "12:00", "1,5", "null"):
            verdict = classify(
                429, headers(X_RateLimit_Reset=value), rateLimitBody(PER_DAY), NOW
            )
            self.assertExhausted(verdict, MIDNIGHT)
        for value in ([1], {"at": 1}, None, "tomorrow"):
            body = errorBody(429, PER_DAY, {"headers": {"X-RateLimit-Reset": value}})
            self.assertExhausted(classify(429, Headers(), body, NOW), MIDNIGHT)


class PerMinuteTests(SynchronousTestCase):
    """
    429 for the per-minute limit, or an unknown one: the key cools down.
    """

    def assertCooling(self, verdict: Verdict, until: float):
        self.assertIsInstance(verdict, Verdict)
        self.assertEqual(verdict.kind, Kind.COOLING)
        self.assertEqual(verdict.until, until)
        self.assertTrue(verdict.penalizes)
        self.assertTrue(verdict.reason)

    def test_untilResetHeader(self):
        """
        The key cools until the X-RateLimit-Reset response header.
        """
        reset = NOW + 20
        verdict = classify(
            429, headers(X_RateLimit_Reset=milliseconds(reset)), rateLimitBody(PER_MINUTE), NOW
        )
        self.assertCooling(verdict, reset)

    def test_untilResetInBody(self):
        """
        Without the response header, the reset time in the error's metadata
        is used.
        """
        reset = NOW + 42
        verdict = classify(429, Headers(), rateLimitBody(PER_MINUTE, milliseconds(reset)), NOW)
        self.assertCooling(verdict, reset)

    def test_resetInSeconds(self):
        """
        A reset time given in seconds is taken as seconds.
        """
        verdict = classify(
            429, headers(X_RateLimit_Reset=str(int(NOW) + 30)), rateLimitBody(PER_MINUTE), NOW
        )
        self.assertCooling(verdict, int(NOW) + 30)

    def test_retryAfterSeconds(self):
        """
        Without a reset time, Retry-After in seconds says how long.
        """
        verdict = classify(429, headers(Retry_After="30"), rateLimitBody(PER_MINUTE), NOW)
        self.assertCooling(verdict, NOW + 30)

    def test_retryAfterDate(self):
        """
        Retry-After may also be an HTTP date.
        """
        when = int(NOW) + 120
        verdict = classify(
            429, headers(Retry_After=formatdate(when, usegmt=True)), rateLimitBody(PER_MINUTE), NOW
        )
        self.assertCooling(verdict, when)

    def test_resetBeforeRetryAfter(self):
        """
        A reset time wins over Retry-After.
        """
        verdict = classify(
            429,
            headers(X_RateLimit_Reset=milliseconds(NOW + 15), Retry_After="50"),
            rateLimitBody(PER_MINUTE),
            NOW,
        )
        self.assertCooling(verdict, NOW + 15)

    def test_pastResetFallsBackToRetryAfter(self):
        """
        A reset time already past gives way to Retry-After.
        """
        verdict = classify(
            429,
            headers(X_RateLimit_Reset=milliseconds(NOW - 5), Retry_After="50"),
            rateLimitBody(PER_MINUTE),
            NOW,
        )
        self.assertCooling(verdict, NOW + 50)

    def test_default(self):
        """
        With neither a reset time nor Retry-After (or only past or garbage
        ones) the key cools for a minute.
        """
        self.assertEqual(COOLING_DEFAULT, 60.0)
        for answerHeaders in (
            Headers(),
            headers(X_RateLimit_Reset=milliseconds(NOW - 60)),
            headers(Retry_After="0"),
            headers(Retry_After="-5"),
            headers(Retry_After="soon"),
            headers(Retry_After=formatdate(NOW - 600, usegmt=True)),
            headers(X_RateLimit_Reset="soon", Retry_After="Mon, 32 Foo 2030 99:00:00 GMT"),
        ):
            verdict = classify(429, answerHeaders, rateLimitBody(PER_MINUTE), NOW)
            self.assertCooling(verdict, NOW + COOLING_DEFAULT)

    def test_capped(self):
        """
        However long the upstream asks for, a key cools for at most
        C{COOLING_LONGEST} seconds.
        """
        for answerHeaders in (
            headers(X_RateLimit_Reset=milliseconds(NOW + 5 * HOUR)),
            headers(Retry_After="100000"),
            headers(Retry_After=formatdate(NOW + 48 * HOUR, usegmt=True)),
        ):
            verdict = classify(429, answerHeaders, rateLimitBody(PER_MINUTE), NOW)
            self.assertCooling(verdict, NOW + COOLING_LONGEST)

    def test_unknownLimitCools(self):
        """
        A platform 429 (with X-RateLimit-*) whose message names no known
        limit cools the key as a per-minute limit would.  Without
        X-RateLimit-* it is the provider's limit, which is not the key's;
        without OpenRouter's error shape, it says nothing of the key.
        """
        platform = {"X_RateLimit_Limit": "20", "X_RateLimit_Remaining": "0"}
        for body in (
            errorBody(429, "Rate limit exceeded"),
            errorBody(429, "Too Many Requests"),
            errorBody(429),
        ):
            self.assertCooling(
                classify(429, headers(Retry_After="7", **platform), body, NOW), NOW + 7
            )
            self.assertCooling(classify(429, headers(**platform), body, NOW), NOW + COOLING_DEFAULT)
            for answerHeaders in (headers(Retry_After="7"), Headers()):
                verdict = classify(429, answerHeaders, body, NOW)
                self.assertEqual(verdict.kind, Kind.BUSY)
                self.assertFalse(verdict.penalizes)
        for body in (b"", b"Too Many Requests"):
            self.assertEqual(classify(429, headers(Retry_After="7", **platform), body, NOW), ERROR)


class BusyTests(SynchronousTestCase):
    """
    429 because a popular model is busy for everyone: not the key's fault.
    """

    def assertBusy(self, verdict: Verdict):
        self.assertIsInstance(verdict, Verdict)
        self.assertEqual(verdict.kind, Kind.BUSY)
        self.assertFalse(verdict.penalizes)

    def test_sharedCapacity(self):
        """
        C{limit_source} C{openrouter_shared_capacity} in the metadata means
        the model is busy.
        """
        body = errorBody(
            429,
            "Provider returned error",
            {"limit_source": "openrouter_shared_capacity", "provider_name": "Chutes"},
        )
        self.assertBusy(classify(429, headers(Retry_After="30"), body, NOW))

    def test_highDemandMessage(self):
        """
        A "High demand for ..." message means the model is busy.
        """
        self.assertBusy(classify(429, Headers(), errorBody(429, HIGH_DEMAND), NOW))

    def test_sharedCapacityWithReset(self):
        """
        A shared-capacity answer does not penalize the key even when it
        carries the usual rate limit headers.
        """
        body = errorBody(
            429,
            HIGH_DEMAND,
            {
                "limit_source": "openrouter_shared_capacity",
                "headers": {"X-RateLimit-Reset": milliseconds(NOW + 30)},
            },
        )
        verdict = classify(
            429, headers(X_RateLimit_Reset=milliseconds(NOW + 30)), body, NOW
        )
        self.assertBusy(verdict)


class KeyRefusedTests(SynchronousTestCase):
    """
    401, 402 and 403: the key cannot be used.
    """

    def test_unauthorized(self):
        """
        401 (invalid or disabled key) disables the key until the
        configuration is reloaded.
        """
        body = errorBody(401, "No auth credentials found")
        verdict = classify(401, Headers(), body, NOW)
        self.assertEqual(verdict.kind, Kind.DISABLED)
        self.assertIsNone(verdict.until)
        self.assertTrue(verdict.penalizes)
        self.assertTrue(verdict.reason)

    def test_paymentRequired(self):
        """
        402 (negative balance) disables the key until the next midnight UTC.
        """
        body = errorBody(402, "Insufficient credits. Add more using https://openrouter.ai/credits")
        verdict = classify(402, Headers(), body, NOW)
        self.assertEqual(verdict.kind, Kind.DISABLED)
        self.assertEqual(verdict.until, MIDNIGHT)
        self.assertTrue(verdict.penalizes)

    def test_forbidden(self):
        """
        403 without a key limit's C{limit_source} (see L{tests.test_verdicts})
        says nothing against the key: L{ERROR}, no penalty.
        """
        for body in (errorBody(403, "Key is disabled"), errorBody(403, "Forbidden", {}), b""):
            verdict = classify(403, Headers(), body, NOW)
            self.assertEqual(verdict, ERROR)
            self.assertFalse(verdict.penalizes)

    def test_moderation(self):
        """
        403 with moderation metadata (C{reasons} or C{flagged_input}) is
        about the client's input, not the key: L{ERROR}, no penalty.
        """
        for metadata in (
            {"reasons": ["harassment"], "flagged_input": "...", "provider_name": "OpenAI"},
            {"reasons": []},
            {"flagged_input": "..."},
        ):
            body = errorBody(403, "Input was flagged by moderation", metadata)
            verdict = classify(403, Headers(), body, NOW)
            self.assertEqual(verdict, ERROR)
            self.assertFalse(verdict.penalizes)


class RobustnessTests(SynchronousTestCase):
    """
    Whatever the upstream sends, L{classify} answers and never raises.
    """

    def assertSane(self, verdict: Verdict, now: float = NOW):
        self.assertIsInstance(verdict, Verdict)
        if verdict.until is not None:
            self.assertFalse(math.isnan(verdict.until), verdict)
            self.assertGreaterEqual(verdict.until, now, verdict)
            self.assertLessEqual(verdict.until, now + EXHAUSTED_LONGEST, verdict)

    def test_notJSON(self):
        """
        Bodies that are not JSON (HTML, binary, truncated, empty) are not
        OpenRouter's: they say nothing of the key.
        """
        expected = {401: Kind.ERROR, 402: Kind.ERROR, 403: Kind.ERROR, 429: Kind.ERROR}
        for body in (
            b"",
            b"<html><body>502 Bad Gateway</body></html>",
            b"\xff\xfe\x00garbage\x80",
            b'{"error": {"code": 429, "message": "free-models-per-day',
            b"\xef\xbb\xbf",
        ):
            for status, kind in expected.items():
                verdict = classify(status, Headers(), body, NOW)
                self.assertSane(verdict)
                self.assertEqual(verdict.kind, kind, (status, body))

    def test_notAnObject(self):
        """
        JSON that is not an object (a list, a string, a number, null) is
        not OpenRouter's error: it says nothing of the key.
        """
        for body in (
            json.dumps([{"error": {"message": PER_DAY}}]).encode(),
            b'"free-models-per-day"',
            b"429",
            b"null",
            b"true",
        ):
            verdict = classify(429, Headers(), body, NOW)
            self.assertSane(verdict)
            self.assertEqual(verdict.kind, Kind.ERROR, body)

    def test_errorNotAnObject(self):
        """
        An C{error} that is not an object is read as saying nothing.
        """
        for error in ("free-models-per-day", ["free-models-per-day"], None, 429, True):
            body = json.dumps({"error": error}).encode()
            for status in sorted(KEY_STATUSES):
                self.assertSane(classify(status, Headers(), body, NOW))
            self.assertEqual(classify(429, Headers(), body, NOW).kind, Kind.ERROR)

    def test_metadataNotAnObject(self):
        """
        A C{metadata}, or C{metadata.headers}, that is not an object is
        ignored.
        """
        bodies = [
            errorBody(code, PER_DAY, metadata)
            for code in (403, 429)
            for metadata in ("reasons", ["reasons", "flagged_input"], 42, True)
        ]
        bodies += [
            errorBody(429, PER_DAY, {"headers": value})
            for value in ("X-RateLimit-Reset: 1", [["X-RateLimit-Reset", "1"]], 7, None)
        ]
        for body in bodies:
            for status in sorted(KEY_STATUSES):
                self.assertSane(classify(status, Headers(), body, NOW))
        self.assertEqual(
            classify(403, Headers(), errorBody(403, "x", ["reasons"]), NOW).kind, Kind.ERROR
        )
        # Headers that are not an object are no X-RateLimit-*: the provider's.
        self.assertEqual(
            classify(429, Headers(), errorBody(429, PER_DAY, {"headers": 7}), NOW).kind, Kind.BUSY
        )

    def test_messageNotAString(self):
        """
        A C{message} that is not a string is read as an unknown limit.
        """
        for message in (42, ["free-models-per-day"], {"text": "High demand"}, True):
            verdict = classify(
                429, headers(X_RateLimit_Limit="20"), errorBody(429, message), NOW
            )
            self.assertSane(verdict)
            self.assertEqual(verdict.kind, Kind.COOLING)

    def test_nonFiniteReset(self):
        """
        Reset times that are not finite numbers (C{nan}, C{inf}), in the
        headers or (as JSON's NaN and Infinity, which Python reads) in the
        body, still give a time within bounds.
        """
        for message in (PER_DAY, PER_MINUTE):
            for value in ("nan", "NaN", "inf", "-inf", "Infinity"):
                answerHeaders = headers(X_RateLimit_Reset=value)
                self.assertSane(classify(429, answerHeaders, errorBody(429, message), NOW))
            for literal in (b"NaN", b"Infinity", b"-Infinity"):
                body = (
                    b'{"error": {"message": "' + message.encode() + b'", "metadata": '
                    b'{"headers": {"X-RateLimit-Reset": ' + literal + b"}}}}"
                )
                self.assertSane(classify(429, Headers(), body, NOW))

    def test_hugeReset(self):
        """
        A reset time too large for a float (a JSON integer of 400 digits)
        does not raise.
        """
        for message in (PER_DAY, PER_MINUTE):
            body = errorBody(429, message, {"headers": {"X-RateLimit-Reset": 10**400}})
            self.assertSane(classify(429, Headers(), body, NOW))
            answerHeaders = headers(X_RateLimit_Reset="1" + "0" * 400)
            self.assertSane(classify(429, answerHeaders, errorBody(429, message), NOW))

    def test_hugeRetryAfter(self):
        """
        A Retry-After of more seconds than a float can hold does not raise:
        the key cools for the longest time.
        """
        verdict = classify(429, headers(Retry_After="9" * 400), rateLimitBody(PER_MINUTE), NOW)
        self.assertSane(verdict)
        self.assertEqual(verdict.kind, Kind.COOLING)

    def test_oddRetryAfterDates(self):
        """
        Retry-After dates that are malformed, out of range or in an odd
        zone do not raise.
        """
        for value in (
            "Mon, 01 Jan 0000 00:00:00 GMT",
            "Mon, 01 Jan 99999 00:00:00 GMT",
            "Fri, 31 Dec 9999 23:59:59 -2359",
            "Mon, 01 Jan 0001 00:00:00 +2359",
            "Mon, 32 Jan 2030 00:00:00 GMT",
            "Mon, 01 Jan 2030 25:00:00 GMT",
            "Wed, 21 Oct 2015 07:28:00 XYZ",
            "01 Jan 2030 00:00:00 +9999",
            "1e3",
            "",
        ):
            verdict = classify(429, headers(Retry_After=value), rateLimitBody(PER_MINUTE), NOW)
            self.assertSane(verdict)
            self.assertEqual(verdict.kind, Kind.COOLING)

    def test_deeplyNestedBody(self):
        """
        A body nested too deeply for Python's JSON parser is read as saying
        nothing, not raised as a RecursionError.
        """
        for body in (b"[" * 100_000, b'{"error": ' * 100_000):
            for status in sorted(KEY_STATUSES):
                self.assertSane(classify(status, Headers(), body, NOW))


# Strategies for the property test below.

_headerText = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40
)
# Values at the edges of what a float holds, which random integers and
# floats reach too rarely to rely on.
_edgeNumbers = st.sampled_from(
    ["", "0", "-1", "1e11", "nan", "inf", "-inf", "1e400", "9" * 400, "-" + "9" * 400]
)
_resetValues = st.one_of(
    _edgeNumbers,
    st.integers().map(str),
    st.floats().map(str),
    st.floats(min_value=1.7e12, max_value=2.1e12).map(lambda f: str(int(f))),
    _headerText,
)
_retryAfterValues = st.one_of(
    _edgeNumbers,
    st.integers().map(str),
    st.datetimes(timezones=st.just(timezone.utc)).map(lambda d: format_datetime(d, usegmt=True)),
    _headerText,
)
_headerValue = {
    b"X-RateLimit-Reset": _resetValues,
    b"x-ratelimit-reset": _resetValues,
    b"Retry-After": _retryAfterValues,
    b"Content-Type": st.sampled_from(["application/json", "text/html"]),
}


@st.composite
def _headers(draw) -> Headers:
    names = draw(st.lists(st.sampled_from(sorted(_headerValue)), max_size=4))
    raw: dict[bytes, list[bytes]] = {}
    for name in names:
        raw.setdefault(name, []).append(draw(_headerValue[name]).encode("ascii"))
    return Headers(raw)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=6,
)
_messages = st.one_of(
    st.sampled_from(
        [PER_DAY, PER_DAY_HIGH_BALANCE, PER_MINUTE, HIGH_DEMAND, "Rate limit exceeded"]
    ),
    _json,
)
_metadata = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "headers": st.one_of(
                st.dictionaries(
                    st.sampled_from(
                        ["X-RateLimit-Reset", "x-ratelimit-reset", "X-RateLimit-Limit"]
                    ),
                    st.one_of(_resetValues, _json),
                ),
                _json,
            ),
            "limit_source": st.one_of(
                st.sampled_from(
                    [
                        "openrouter_shared_capacity",
                        "openrouter_in_flight_budget",
                        "openrouter_credits",
                        "openrouter_key_limit",
                        "openrouter_guardrail_budget",
                        "openrouter_workspace_budget",
                    ]
                ),
                _json,
            ),
            "error_type": st.one_of(st.sampled_from(sorted(ERROR_TYPES.values())), _json),
            "resets_at": st.one_of(_resetValues, _json),
            "estimated_cost": _json,
            "in_flight_budget": _json,
            "reasons": _json,
            "flagged_input": _json,
        },
    ),
    _json,
)
_error = st.one_of(
    st.fixed_dictionaries(
        {}, optional={"code": _json, "message": _messages, "metadata": _metadata}
    ),
    _json,
)
_bodies = st.one_of(
    st.binary(max_size=200),
    st.fixed_dictionaries({"error": _error}).map(lambda body: json.dumps(body).encode("utf-8")),
    st.builds(
        lambda code, rest: {"error": {**rest, "code": code}} if isinstance(rest, dict) else rest,
        st.sampled_from(sorted(KEY_STATUSES)),
        _error,
    ).map(lambda body: json.dumps(body).encode("utf-8")),
    _json.map(lambda body: json.dumps(body).encode("utf-8")),
)
_statuses = st.one_of(st.sampled_from(sorted(KEY_STATUSES)), st.integers(100, 599))


class PropertyTests(SynchronousTestCase):
    """
    Properties of L{classify} over generated answers.
    """

    @settings(max_examples=1000, deadline=None)
    @given(
        status=_statuses,
        answerHeaders=_headers(),
        body=_bodies,
        now=st.floats(min_value=1_700_000_000.0, max_value=2_000_000_000.0),
    )
    def test_alwaysAVerdictWithinBounds(self, status, answerHeaders, body, now):
        """
        For any status from 100 to 599, any of the headers that matter and
        any body, L{classify} returns a L{Verdict} without raising, and any
        time it sets lies between C{now} and 25 hours later.
        """
        verdict = classify(status, answerHeaders, body, now)
        self.assertIsInstance(verdict, Verdict)
        self.assertIsInstance(verdict.kind, Kind)
        if verdict.until is not None:
            self.assertGreaterEqual(verdict.until, now, verdict)
            self.assertLessEqual(verdict.until, now + EXHAUSTED_LONGEST, verdict)
