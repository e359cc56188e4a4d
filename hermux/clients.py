# -*- test-case-name: tests.test_clients -*-
"""
The limits of named clients (clients.csv), applied before a request is
forwarded, and what each client used today.

L{ClientBook} keeps, per client label, the requests it was admitted today,
the requests it has in flight, the times of its admissions in the last
minute (only for a client with C{per_minute}, and at most that many), and
the counts the ledger was given for it today (tokens, credits).  It learns
the last through L{TalliedLedger}, the ledger the key pool writes to.
Labels come from the configuration, never from a client, so what it keeps
is bounded by the configuration; a new UTC day starts everyone at zero.
With several instances sharing the pool (L{hermux.shared}), it also keeps
what the others counted, and every limit reads the sum.
"""

from __future__ import annotations

__all__ = [
    "Admission",
    "ClientBook",
    "ClientDay",
    "LimitRefusal",
    "TalliedLedger",
    "dailyRequestsRefusal",
    "maxParallelRefusal",
    "notAllowedModel",
]

import math
from collections import deque
from typing import NamedTuple
from fnmatch import fnmatchcase

import attr
from zope.interface import implementer

from hermux.access import Client
from hermux.config import ClientEntry
from hermux.keypool import creditsText, dayOf, nextMidnight
from hermux.ledger import Counts, ILedger
from hermux.record import printable

_MINUTE = 60.0
_NOTHING = Counts()


class ClientDay(NamedTuple):
    """
    One instance's day of a client, as the instances sharing a pool tell
    each other: requests admitted and in flight, those admitted in the last
    minute and when the first of them was (0: none), and the ledger's
    counts.
    """

    admitted: int = 0
    inFlight: int = 0
    lastMinute: int = 0
    firstInMinute: float = 0.0
    counts: Counts = _NOTHING


_NONE_ELSEWHERE = ClientDay()


class LimitRefusal(Exception):
    """
    A client's request that its limits keep from being forwarded.

    @ivar code: the status to answer with (403 or 429).
    @ivar message: the error message, naming the limit.
    @ivar retryAfter: whole seconds for C{Retry-After}, or L{None}.
    @ivar limit: the limit's name, for the request log.
    """

    def __init__(self, code: int, message: str, limit: str, retryAfter: int | None = None):
        super().__init__(code, message, limit, retryAfter)
        self.code = code
        self.message = message
        self.limit = limit
        self.retryAfter = retryAfter


def dailyRequestsRefusal(entry: ClientEntry, now: float) -> LimitRefusal:
    """
    The refusal of a request past C{entry}'s C{daily_requests}, at C{now}.
    """
    return LimitRefusal(
        429,
        f"this access token's daily_requests limit of {entry.dailyRequests} "
        f"is reached; it resets at 00:00 UTC",
        "daily_requests",
        max(1, math.ceil(nextMidnight(now) - now)),
    )


def maxParallelRefusal(entry: ClientEntry) -> LimitRefusal:
    """
    The refusal of a request past C{entry}'s C{max_parallel}.
    """
    return LimitRefusal(
        429,
        f"this access token's max_parallel limit of {entry.maxParallel} requests "
        f"in flight is reached",
        "max_parallel",
        1,
    )


def notAllowedModel(entry: ClientEntry, names: tuple[str, ...] | None, hasBody: bool) -> str | None:
    """
    Why a request naming the models C{names} (see
    L{hermux.usage.RequestedModel.names}) may not go out for a client
    limited to C{entry.models}, or L{None} if it may.  A request without a
    body names no model and may (C{GET /models}); one whose body is a JSON
    object naming none may not, since OpenRouter would choose the account's
    default model; nor one whose body hermux cannot read a model from.
    """
    patterns = entry.models
    if patterns is None:
        return None
    if names is None:
        if not hasBody:
            return None
        return (
            "this access token may use only some models, and the model of this "
            "request cannot be read: send a JSON body that names it"
        )
    if not names:
        return "this access token may use only some models: name one in 'model'"
    for name in names:
        if not any(fnmatchcase(name, pattern) for pattern in patterns):
            return f"model {printable(name)!r} is not allowed for this access token"
    return None


@attr.s(auto_attribs=True, slots=True)
class _Today:
    """
    One client's day so far.
    """

    admitted: int = 0
    inFlight: int = 0
    counts: Counts = _NOTHING
    recent: deque | None = None  # admission times, for per_minute
    # What the other instances sharing the pool counted.
    otherAdmitted: int = 0
    otherInFlight: int = 0
    otherLastMinute: int = 0
    otherFirstInMinute: float = 0.0
    elsewhere: Counts = _NOTHING


class Admission:
    """
    A request admitted for a client, counted in its day: in flight until
    L{release}d.
    """

    __slots__ = ("_today", "admittedBefore", "inFlightBefore")

    def __init__(self, today: _Today):
        self._today = today
        # This instance's counts before this request, for a pool-wide check.
        self.admittedBefore = today.admitted
        self.inFlightBefore = today.inFlight
        today.admitted += 1
        today.inFlight += 1

    def release(self, ignored=None):
        """
        The request is over: it no longer counts toward C{max_parallel}.
        Only the first call counts.
        """
        today, self._today = self._today, None
        if today is not None:
            today.inFlight -= 1
        return ignored

    def withdraw(self) -> None:
        """
        The request was not admitted after all (the pool-wide check said
        so): it counts toward nothing.
        """
        today = self._today
        if today is not None:
            today.admitted -= 1
            self.release()


class ClientBook:
    """
    Each client's day, and the checks of C{daily_requests}, C{daily_cost},
    C{per_minute} and C{max_parallel} (in that order) before a request is
    admitted.

    Today's counts come from the ledger at start, so that a restart keeps
    them; there, a client's requests are those sent upstream (a request
    that failed over to a second key counts twice), so a restart may count
    a few more requests than were admitted, never fewer.

    @param ledger: the ledger to read today's counts from, at start.
    """

    def __init__(self, ledger: ILedger, *, reactor):
        self._reactor = reactor
        # Asks the other instances whether a request may be admitted (see
        # hermux.shared.SharedPool.confirm); None for one instance alone.
        self.confirmer = None
        self._day = dayOf(reactor.seconds())
        self._clients: dict[str, _Today] = {}
        for label, counts in ledger.clientUsage(self._day).items():
            self._clients[label] = _Today(admitted=counts.requests, counts=counts)

    def _rollover(self, now: float) -> None:
        """
        Start a new UTC day if one began since last asked.
        """
        day = dayOf(now)
        if day == self._day:
            return
        self._day = day
        # Reset in place: requests in flight at midnight stay in flight,
        # and their admissions hold on to these.
        kept = {}
        for name, today in self._clients.items():
            if today.inFlight or today.recent:
                today.admitted, today.counts = 0, _NOTHING
                today.otherAdmitted, today.elsewhere = 0, _NOTHING
                kept[name] = today
        self._clients = kept

    def _todayOf(self, label: str, now: float) -> _Today:
        self._rollover(now)
        today = self._clients.get(label)
        if today is None:
            today = self._clients[label] = _Today()
        return today

    def admit(self, client: Client) -> Admission:
        """
        Admit a request of C{client} now, counting it, unless one of its
        limits is reached.

        @raise LimitRefusal: naming the limit, with its C{Retry-After}.
        """
        now = self._reactor.seconds()
        today = self._todayOf(client.label, now)
        entry = client.entry
        if entry is not None and entry.limited():
            recent = self._check(entry, today, now)
            if recent is not None:
                recent.append(now)
        return Admission(today)

    def _check(self, entry: ClientEntry, today: _Today, now: float) -> deque | None:
        """
        Refuse a request that a limit of C{entry} keeps out; return the
        admission times to add this one to, for C{per_minute}.
        """
        untilMidnight = max(1, math.ceil(nextMidnight(now) - now))
        admitted = today.admitted + today.otherAdmitted
        if entry.dailyRequests is not None and admitted >= entry.dailyRequests:
            raise dailyRequestsRefusal(entry, now)
        if entry.dailyCost is not None and today.counts.cost + today.elsewhere.cost >= entry.dailyCost:
            raise LimitRefusal(
                429,
                f"this access token's daily_cost of {creditsText(entry.dailyCost)} "
                f"credits is spent; it resets at 00:00 UTC",
                "daily_cost",
                untilMidnight,
            )
        recent = None
        if entry.perMinute is not None:
            recent = today.recent
            if recent is None or recent.maxlen != entry.perMinute:
                # New, or its limit was reloaded: keep the latest times.
                recent = today.recent = deque(recent or (), maxlen=entry.perMinute)
            while recent and recent[0] <= now - _MINUTE:
                recent.popleft()
            others = today.otherLastMinute if today.otherFirstInMinute > now - _MINUTE else 0
            if len(recent) + others >= entry.perMinute:
                firsts = [t for t in (recent[0] if recent else 0.0, today.otherFirstInMinute) if t > now - _MINUTE]
                wait = max(1, math.ceil(min(firsts) + _MINUTE - now))
                raise LimitRefusal(
                    429,
                    f"this access token's per_minute limit of {entry.perMinute} "
                    f"requests is reached; retry in {wait} seconds",
                    "per_minute",
                    wait,
                )
        if entry.maxParallel is not None and today.inFlight + today.otherInFlight >= entry.maxParallel:
            raise maxParallelRefusal(entry)
        return recent

    def confirm(self, client: Client, admission: Admission):
        """
        L{None} if C{admission} stands as it is; else a L{Deferred} that
        fires when the other instances sharing the pool agree, or fails
        with L{LimitRefusal} (the admission withdrawn) if they do not.
        """
        if self.confirmer is None:
            return None
        return self.confirmer(client, admission)

    def today(self, label: str) -> tuple[int, Counts]:
        """
        The requests admitted today for the client labelled C{label}, and
        the ledger's counts of it today, pool-wide.
        """
        today = self._todayOf(label, self._reactor.seconds())
        return today.admitted + today.otherAdmitted, today.counts + today.elsewhere

    def ownCounts(self) -> dict[str, ClientDay]:
        """
        This instance's day of each client.
        """
        now = self._reactor.seconds()
        self._rollover(now)
        return {label: _dayOf(today, now) for label, today in self._clients.items()}

    def takeElsewhere(self, day: int, days: dict[str, ClientDay]) -> None:
        """
        Take the other instances' day of each client (summed), if C{day}
        is today.
        """
        now = self._reactor.seconds()
        if day != dayOf(now):
            return
        for label in days.keys() - self._clients.keys():
            self._todayOf(label, now)
        for label, today in self._clients.items():
            theirs = days.get(label, _NONE_ELSEWHERE)
            today.otherAdmitted = theirs.admitted
            today.otherInFlight = theirs.inFlight
            today.otherLastMinute = theirs.lastMinute
            today.otherFirstInMinute = theirs.firstInMinute
            today.elsewhere = theirs.counts

    def counted(self, day: int, label: str, counts: Counts) -> None:
        """
        Add C{counts}, given to the ledger for C{label} on C{day}, to its
        day, if that is today.
        """
        now = self._reactor.seconds()
        if day == dayOf(now):
            today = self._todayOf(label, now)
            today.counts = today.counts + counts


def _dayOf(today: _Today, now: float) -> ClientDay:
    recent = [t for t in today.recent or () if t > now - _MINUTE]
    return ClientDay(today.admitted, today.inFlight, len(recent), recent[0] if recent else 0.0, today.counts)


@implementer(ILedger)
class TalliedLedger:
    """
    A ledger that also tells a L{ClientBook} what it was given, so that
    each client's credits today are known without reading the state file.
    """

    def __init__(self, ledger: ILedger, book: ClientBook):
        self._ledger = ledger
        self._book = book

    @property
    def problem(self):
        return self._ledger.problem

    def add(self, day, key, client, model, counts):
        self._ledger.add(day, key, client, model, counts)
        self._book.counted(day, client, counts)

    def keyUsage(self, day):
        return self._ledger.keyUsage(day)

    def clientUsage(self, day):
        return self._ledger.clientUsage(day)

    def usage(self, fromDay, toDay, groupBy, client=None):
        return self._ledger.usage(fromDay, toDay, groupBy, client)

    def flush(self):
        return self._ledger.flush()
