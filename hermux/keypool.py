# -*- test-case-name: tests.test_keypool -*-
"""
The key pool: which upstream key serves the next request, and what is known
of each key's allowance today.

A key is ready, cooling (rate limited for a moment), exhausted (its daily
allowance is spent) or disabled (the upstream refused it).  Free-model and
paid requests draw on different allowances of an account (OpenRouter caps
free-model requests per day; paid ones spend credits), so a key may also be
kept from one of the two only (L{Scope}).  The pool hands out, for a
free-model request, the usable key with the fewest free-model requests
today (UTC); for a paid one, the key that spent the fewest credits today;
for a request that names no model, the key with the fewest requests.  A new
UTC day starts every key again at zero.  It knows nothing of HTTP: what an
upstream answer means for a key arrives as a L{Verdict}, and what it used
as a L{hermux.usage.Usage}.
"""

from __future__ import annotations

__all__ = [
    "SECONDS_PER_DAY",
    "NANOCREDITS",
    "dayOf",
    "isoTime",
    "nextMidnight",
    "creditsText",
    "State",
    "Kind",
    "Scope",
    "Verdict",
    "OK",
    "ERROR",
    "Use",
    "Attempt",
    "KeyStatus",
    "NoKeyAvailable",
    "KeyPool",
]

import random
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from enum import Enum
from typing import TYPE_CHECKING, NamedTuple

import attr
from twisted.application.service import Service
from twisted.logger import Logger

from hermux.config import Key
from hermux.ledger import UNKNOWN, Counts, ILedger, MemoryLedger

if TYPE_CHECKING:
    from hermux.usage import Usage

SECONDS_PER_DAY = 86400
# Costs are counted in nanocredits (integers), so that sums never drift.
NANOCREDITS = 10**9


def dayOf(when: float) -> int:
    """
    The UTC day (days since 1970-01-01) that the POSIX time C{when} falls on.
    """
    return int(when // SECONDS_PER_DAY)


def _untilText(when: float | None) -> str:
    """
    When a key is usable again, for a log line: a time, or what must happen.
    """
    if when is None:
        return "the configuration is reloaded or the prober finds it accepted again"
    return isoTime(when)


def isoTime(when: float) -> str:
    """
    C{when} (POSIX time) as ISO 8601 in UTC, to the second.
    """
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def nextMidnight(when: float) -> float:
    """
    The POSIX time of the UTC midnight after C{when}.
    """
    return (dayOf(when) + 1) * SECONDS_PER_DAY


def creditsText(nanocredits: int) -> str:
    """
    A count of nanocredits as credits, for people.
    """
    return f"{nanocredits / NANOCREDITS:g}"


class State(Enum):
    READY = "ready"
    COOLING = "cooling"
    EXHAUSTED = "exhausted"
    DISABLED = "disabled"


class Kind(Enum):
    """
    What an upstream answer says about the key that got it.
    """

    OK = "ok"
    ERROR = "error"  # the request failed, but not because of the key
    BUSY = "busy"  # rate limited for reasons that are not the key's
    # This request costs more than any one budget allows: not the key's
    # fault, but another account's budget may be larger (tried once).
    OVER_BUDGET = "over_budget"
    COOLING = "cooling"
    EXHAUSTED = "exhausted"
    DISABLED = "disabled"


class Scope(Enum):
    """
    Which requests a verdict keeps from a key: all, or only free-model or
    only paid ones (an account out of credits still serves free models; one
    whose free-model requests are used up still serves paid ones).
    """

    ALL = "all"
    FREE = "free"
    PAID = "paid"


@attr.frozen
class Verdict:
    """
    What an upstream answer means for a key.

    @ivar until: when a cooling, exhausted or disabled key is usable again
        (L{None} for a disabled key: until the configuration is reloaded).
    @ivar reason: for the log and C{/hermux/keys}: why.
    @ivar cause: a short name for what the answer said (C{"credits"},
        C{"key_limit"}, ...), by which the relay tells answers of the same
        kind apart from others.
    @ivar scope: which requests the key is kept from (exhausted or disabled
        for free-model or paid requests only, or for all).
    """

    kind: Kind
    until: float | None = None
    reason: str | None = None
    cause: str | None = None
    scope: Scope = Scope.ALL

    @property
    def penalizes(self) -> bool:
        """
        Whether the key cannot serve this request, so another key should.
        """
        return self.kind in (Kind.COOLING, Kind.EXHAUSTED, Kind.DISABLED)


OK = Verdict(Kind.OK)
ERROR = Verdict(Kind.ERROR)


class Use(NamedTuple):
    """
    What one client request is, for choosing its key and counting it.  (A
    named tuple: one is made for every request.)

    @ivar client: the label of the client it is made for (C{"-"}: none).
    @ivar model: the model the request names (C{"-"}: none).
    @ivar free: L{True} for a free-model request (every model it names is a
        C{:free} variant), L{False} for a paid one, L{None} when it names no
        model (C{GET /models}).
    @ivar keys: the names of the only keys that may serve it (the client's
        C{keys} in clients.csv), or L{None} for any key.
    """

    client: str = UNKNOWN
    model: str = UNKNOWN
    free: bool | None = None
    keys: frozenset[str] | None = None


@attr.frozen
class KeyStatus:
    """
    A key as C{/hermux/keys} and the metrics show it: never its token.

    @ivar freeReason: why the key serves no free-model request now, or
        L{None} if it does; C{paidReason} likewise for paid requests.
    """

    name: str
    state: State
    requestsToday: int
    dailyLimit: int | None
    rateLimitedToday: int
    errorsToday: int
    usableAt: float | None
    reason: str | None
    freeRequestsToday: int = 0
    costToday: int = 0
    dailyCost: int | None = None
    freeReason: str | None = None
    paidReason: str | None = None


class NoKeyAvailable(Exception):
    """
    No key can serve a request now.

    @ivar usableAt: when the first key becomes usable again, or L{None} if
        none will before the configuration changes.
    """

    def __init__(self, usableAt: float | None):
        super().__init__(usableAt)
        self.usableAt = usableAt


@attr.s(auto_attribs=True)
class _Account:
    """
    One key and what the pool knows of it today.  Free-model requests are
    capped by C{dailyLimit} (what OpenRouter caps), paid ones by
    C{dailyCost} (nanocredits a day); C{freeUntil} and C{paidUntil} keep the
    key from one kind of request only, after the upstream said so.

    The counts are this instance's; the C{other*} counts are what the other
    instances sharing the pool (L{hermux.shared}) counted today, and every
    choice and limit reads their sum.
    """

    key: Key
    dailyLimit: int | None
    requests: int = 0
    freeRequests: int = 0
    rateLimited: int = 0
    errors: int = 0
    cost: int = 0
    coolingUntil: float = 0.0
    coolingReason: str | None = None
    exhaustedUntil: float = 0.0
    exhaustedReason: str | None = None
    freeUntil: float = 0.0
    freeUntilReason: str | None = None
    paidUntil: float = 0.0
    paidUntilReason: str | None = None
    disabled: bool = False
    disabledUntil: float | None = None
    disabledReason: str | None = None
    otherRequests: int = 0
    otherFreeRequests: int = 0
    otherRateLimited: int = 0
    otherErrors: int = 0
    otherCost: int = 0

    @property
    def dailyCost(self) -> int | None:
        return self.key.dailyCost

    def takeCounts(self, counts) -> None:
        self.requests = counts.requests
        self.freeRequests = counts.freeRequests
        self.rateLimited = counts.rateLimited
        self.errors = counts.errors
        self.cost = counts.cost

    def counts(self) -> Counts:
        return Counts(
            requests=self.requests,
            freeRequests=self.freeRequests,
            rateLimited=self.rateLimited,
            errors=self.errors,
            cost=self.cost,
        )

    def resetDay(self) -> None:
        self.requests = self.freeRequests = self.rateLimited = self.errors = self.cost = 0
        self.takeElsewhere(_NO_COUNTS)

    def takeElsewhere(self, counts: tuple[int, int, int, int, int]) -> None:
        """
        Take the other instances' counts of today: requests, free-model
        requests, rate limited, errors and cost.
        """
        (
            self.otherRequests,
            self.otherFreeRequests,
            self.otherRateLimited,
            self.otherErrors,
            self.otherCost,
        ) = counts

    def ownCounts(self) -> tuple[int, int, int, int, int]:
        """
        This instance's counts, as L{takeElsewhere} takes another's.
        """
        return (self.requests, self.freeRequests, self.rateLimited, self.errors, self.cost)

    def _freeLimitReached(self) -> bool:
        return (
            self.dailyLimit is not None
            and self.freeRequests + self.otherFreeRequests >= self.dailyLimit
        )

    def _costLimitReached(self) -> bool:
        return self.dailyCost is not None and self.cost + self.otherCost >= self.dailyCost

    def freeUsableAt(self, now: float) -> float:
        """
        When free-model requests may go to this key again, as far as its
        free allowance goes: C{now} if they may.
        """
        until = self.freeUntil if now < self.freeUntil else now
        if self._freeLimitReached():
            until = max(until, nextMidnight(now))
        return until

    def paidUsableAt(self, now: float) -> float:
        until = self.paidUntil if now < self.paidUntil else now
        if self._costLimitReached():
            until = max(until, nextMidnight(now))
        return until

    def state(self, now: float) -> State:
        if self.disabled and (self.disabledUntil is None or now < self.disabledUntil):
            return State.DISABLED
        if now < self.exhaustedUntil:
            return State.EXHAUSTED
        if self.freeUsableAt(now) > now and self.paidUsableAt(now) > now:
            return State.EXHAUSTED
        if now < self.coolingUntil:
            return State.COOLING
        return State.READY

    def usableAt(self, now: float, free: bool | None = None) -> float | None:
        """
        When this key can serve again (a request of the kind C{free} says,
        see L{Use.free}): C{now} if it can, L{None} if not before the
        configuration is reloaded.
        """
        if self.disabled and (self.disabledUntil is None or now < self.disabledUntil):
            return self.disabledUntil
        until = max(now, self.exhaustedUntil, self.coolingUntil)
        if free is True:
            until = max(until, self.freeUsableAt(now))
        elif free is False:
            until = max(until, self.paidUsableAt(now))
        else:
            until = max(until, min(self.freeUsableAt(now), self.paidUsableAt(now)))
        return until

    def serves(self, free: bool | None, now: float) -> bool:
        """
        Whether this key can serve a request of the kind C{free} says now:
        C{usableAt(now, free) == now}, without working out when.
        """
        if self.disabled and (self.disabledUntil is None or now < self.disabledUntil):
            return False
        if now < self.exhaustedUntil or now < self.coolingUntil:
            return False
        if free is True:
            return now >= self.freeUntil and not self._freeLimitReached()
        if free is False:
            return now >= self.paidUntil and not self._costLimitReached()
        return (now >= self.freeUntil and not self._freeLimitReached()) or (
            now >= self.paidUntil and not self._costLimitReached()
        )

    def _freeReason(self, now: float) -> str | None:
        if now < self.freeUntil:
            return self.freeUntilReason
        if self._freeLimitReached():
            return f"its daily_limit of {self.dailyLimit} free-model requests is reached"
        return None

    def _paidReason(self, now: float) -> str | None:
        if now < self.paidUntil:
            return self.paidUntilReason
        if self._costLimitReached():
            return f"its daily_cost of {creditsText(self.dailyCost)} credits is spent"
        return None

    def reason(self, state: State, now: float) -> str | None:
        if state is State.DISABLED:
            return self.disabledReason
        if state is State.EXHAUSTED:
            if now < self.exhaustedUntil:
                return self.exhaustedReason
            return f"free-model requests: {self._freeReason(now)}; paid requests: {self._paidReason(now)}"
        if state is State.COOLING:
            return self.coolingReason
        return None

    def status(self, now: float) -> KeyStatus:
        state = self.state(now)
        return KeyStatus(
            name=self.key.name,
            state=state,
            requestsToday=self.requests + self.otherRequests,
            dailyLimit=self.dailyLimit,
            rateLimitedToday=self.rateLimited + self.otherRateLimited,
            errorsToday=self.errors + self.otherErrors,
            usableAt=None if state is State.READY else self.usableAt(now),
            reason=self.reason(state, now),
            freeRequestsToday=self.freeRequests + self.otherFreeRequests,
            costToday=self.cost + self.otherCost,
            dailyCost=self.dailyCost,
            freeReason=self._freeReason(now),
            paidReason=self._paidReason(now),
        )

    def prefers(self, free: bool | None):
        """
        The sort key by which the pool picks among usable keys for a request
        of the kind C{free} says: the fewest free-model requests for a free
        one, the fewest credits spent (then requests) for a paid one, the
        fewest requests otherwise.
        """
        if free is True:
            return self.freeRequests + self.otherFreeRequests
        if free is False:
            return (self.cost + self.otherCost, self.requests + self.otherRequests)
        return self.requests + self.otherRequests


class Attempt:
    """
    One request sent upstream with one key.  The pool counts it when it
    chooses the key (so that requests made at the same moment spread); what
    the answer meant and what it used are added as they are known, and the
    whole goes to the ledger in one row when the attempt is L{close}d, under
    the model the answer named (OpenRouter checked it), else the request's.
    """

    def __init__(self, pool: KeyPool, account: _Account, use: Use, day: int):
        self.key = account.key
        self.use = use
        self._pool = pool
        self._account = account
        self._day = day
        # The counters, in Counts' order: summed here, made a Counts once.
        self._row = [1, 1 if use.free else 0, 0, 0, 0, 0, 0, 0, 0]
        self._model: str | None = None
        self._closed = False

    def report(self, verdict: Verdict) -> None:
        """
        Learn what the upstream's answer to this attempt means for its key.
        """
        counted = self._pool._judge(self.key, verdict, self._day)
        if counted is None:
            return
        if self._closed:
            self._pool._ledger.add(self._day, self.key.name, self.use.client, self.model, counted)
        else:
            self._row[_RATE_LIMITED] += counted.rateLimited
            self._row[_ERRORS] += counted.errors

    def charge(self, usage: Usage) -> None:
        """
        Add what the answer says it used (tokens, cost) to this attempt.
        """
        if self._closed:
            return
        self._model = usage.model or self._model
        row = self._row
        row[4] += usage.promptTokens
        row[5] += usage.completionTokens
        row[6] += usage.reasoningTokens
        row[7] += usage.cachedTokens
        row[8] += usage.cost
        pool = self._pool
        if pool._day == self._day and pool._accounts.get(self.key.name) is self._account:
            self._account.cost += usage.cost

    @property
    def counts(self) -> Counts:
        return Counts(*self._row)

    @property
    def model(self) -> str:
        return self._model or self.use.model

    def close(self) -> None:
        """
        Write this attempt's counts to the ledger, once.
        """
        if self._closed:
            return
        self._closed = True
        self._pool._ledger.add(self._day, self.key.name, self.use.client, self.model, self.counts)


class KeyPool(Service):
    """
    Hands out the least-used usable key (see L{_Account.prefers}), counting
    each key when it is chosen so that requests made at the same moment
    spread evenly.  Ties are broken at random, so that no key is always
    first.

    Today's counts come from the C{ledger} at start, so that least-used
    carries on across restarts, and every count goes to it.
    """

    _log = Logger()

    def __init__(
        self,
        keys: Iterable[Key],
        *,
        ledger: ILedger | None = None,
        reactor=None,
        randomness: random.Random | None = None,
    ):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._ledger = ledger if ledger is not None else MemoryLedger()
        self._random = randomness or random.Random()
        self._accounts = {key.name: _Account(key, key.dailyLimit) for key in keys}
        self._day = dayOf(reactor.seconds())
        self._loadDay()
        # Told of each verdict this instance applies, and of each key the
        # prober reinstates (for the other instances, see hermux.shared).
        self.onVerdict: Callable[[str, Verdict], object] | None = None
        self.onReinstate: Callable[[str], object] | None = None

    @property
    def keys(self) -> tuple[Key, ...]:
        return tuple(account.key for account in self._accounts.values())

    def _loadDay(self):
        """
        Take today's counts from the ledger: at start only, since a day
        that begins later starts at zero.  Counts of names not configured
        now are kept aside, for a key of that name added later today.
        """
        usage = self._ledger.keyUsage(self._day)
        for name, account in self._accounts.items():
            counts = usage.pop(name, None)
            if counts is not None:
                account.takeCounts(counts)
        self._retired = usage

    def _now(self) -> float:
        """
        The time, after starting a new day if one began since last asked.
        """
        now = self._reactor.seconds()
        day = dayOf(now)
        if day != self._day:
            self._day = day
            self._retired = {}
            for account in self._accounts.values():
                account.resetDay()
            self._log.info("a new UTC day began: every key starts again at zero")
        return now

    def requestCounts(self) -> dict[str, int]:
        """
        How many requests each key (by name) has served today.
        """
        self._now()
        return {name: account.requests for name, account in self._accounts.items()}

    def freeRequestCounts(self) -> dict[str, int]:
        """
        How many free-model requests each key (by name) has served today.
        """
        self._now()
        return {name: account.freeRequests for name, account in self._accounts.items()}

    def acquire(self, exclude: Iterable[str] = (), use: Use = Use()) -> Attempt:
        """
        Choose the key for one request to the upstream, and count it.

        @param exclude: names of keys not to choose (already tried).
        @param use: what the request is: free-model, paid, or neither, and
            which keys may serve it.
        @raise NoKeyAvailable: if no key not excluded can serve it.
        """
        now = self._now()
        free, within = use.free, use.keys
        best = None
        candidates: list[_Account] = []
        for account in self._accounts.values():
            name = account.key.name
            if name in exclude or (within is not None and name not in within):
                continue
            if not account.serves(free, now):
                continue
            rank = account.prefers(free)
            if best is None or rank < best:
                best = rank
                candidates = [account]
            elif rank == best:
                candidates.append(account)
        if not candidates:
            raise NoKeyAvailable(self.usableAt(now, free, within))
        account = self._random.choice(candidates)
        account.requests += 1
        if free:
            account.freeRequests += 1
        return Attempt(self, account, use, self._day)

    def usableAt(
        self,
        now: float | None = None,
        free: bool | None = None,
        within: frozenset[str] | None = None,
    ) -> float | None:
        """
        When the first key (of those named C{within}, if given) becomes
        usable for a request of the kind C{free} says (see L{Use.free}), or
        L{None} if none will before the configuration changes.
        """
        if now is None:
            now = self._now()
        times = [
            account.usableAt(now, free)
            for name, account in self._accounts.items()
            if within is None or name in within
        ]
        known = [t for t in times if t is not None]
        return min(known) if known else None

    def report(self, key: Key, verdict: Verdict) -> None:
        """
        Learn what an upstream answer to a request made with C{key} outside
        any client request (the prober's) means.
        """
        counted = self._judge(key, verdict, self._day)
        if counted is not None:
            self._ledger.add(self._day, key.name, UNKNOWN, UNKNOWN, counted)

    def _judge(self, key: Key, verdict: Verdict, day: int) -> Counts | None:
        """
        Apply C{verdict} to C{key}'s state; return what it adds to the
        counts (a rate-limited answer, an error), or L{None}.
        """
        now = self._now()
        kind = verdict.kind
        if kind in (Kind.BUSY, Kind.COOLING, Kind.EXHAUSTED):
            counted = _ONE_RATE_LIMITED
        elif kind in (Kind.ERROR, Kind.OVER_BUDGET, Kind.DISABLED):
            counted = _ONE_ERROR
        else:
            return None
        account = self._accounts.get(key.name)
        if account is None or account.key != key or day != self._day:
            # A key removed or replaced by a reload, or an answer to a
            # request of an earlier day, changes no count of today.
            return counted
        account.rateLimited += counted.rateLimited
        account.errors += counted.errors
        if not self._apply(account, verdict, now):
            return counted
        self._logVerdict(account, verdict, now)
        if self.onVerdict is not None:
            self.onVerdict(key.name, _resolved(account, verdict))
        return counted

    def _logVerdict(self, account: _Account, verdict: Verdict, now: float, source: str = "") -> None:
        state = account.state(now)
        scope = verdict.scope
        self._log.warn(
            "key {key} is {state}{scopeNote} until {until}{source}: {reason}",
            key=account.key.name,
            state=state.value if scope is Scope.ALL else verdict.kind.value,
            scopeNote="" if scope is Scope.ALL else f" for {scope.value} requests",
            until=_untilText(account.usableAt(now, _SCOPE_FREE[scope])),
            source=source,
            reason=verdict.reason or account.reason(state, now) or "-",
        )

    def learn(self, name: str, verdict: Verdict, source: str) -> None:
        """
        Apply a verdict that another instance sharing the pool applied to
        the key named C{name} (see L{hermux.shared}); C{source} names that
        instance.  It counts nothing here: that instance counted it.
        """
        now = self._now()
        account = self._accounts.get(name)
        if account is None or not verdict.penalizes:
            return
        if verdict.until is not None and verdict.until <= now:
            return
        before = _stateOf(account)
        if self._apply(account, verdict, now) and _stateOf(account) != before:
            self._logVerdict(account, verdict, now, f" (as instance {source} found)")

    def learnReinstated(self, name: str, source: str) -> None:
        """
        Another instance's prober found the key named C{name} accepted
        again: undo a disabled-until-reload state here too.
        """
        account = self._accounts.get(name)
        if account is not None and account.key in self.disabledKeys():
            self._reinstate(account, f"instance {source} found it accepted again")

    def activeVerdicts(self) -> list[tuple[str, Verdict]]:
        """
        The states that keep keys from requests now, as verdicts: what an
        instance tells a Redis that lost them (see L{hermux.shared}).
        """
        now = self._now()
        verdicts = []
        for name, account in self._accounts.items():
            for verdict in _verdictsOf(account, now):
                verdicts.append((name, verdict))
        return verdicts

    def ownCounts(self) -> dict[str, tuple[int, int, int, int, int]]:
        """
        This instance's counts of today per key (by name): requests,
        free-model requests, rate limited, errors and cost.
        """
        self._now()
        return {name: account.ownCounts() for name, account in self._accounts.items()}

    def takeElsewhere(self, day: int, counts: Mapping[str, tuple[int, int, int, int, int]]) -> None:
        """
        Take the other instances' counts of C{day} per key, if it is today.
        """
        self._now()
        if day != self._day:
            return
        for name, account in self._accounts.items():
            account.takeElsewhere(counts.get(name, _NO_COUNTS))

    def _apply(self, account: _Account, verdict: Verdict, now: float) -> bool:
        """
        Change C{account}'s state as C{verdict} says; return whether it did.
        """
        kind, scope = verdict.kind, verdict.scope
        until = verdict.until
        if scope is Scope.FREE and kind in (Kind.EXHAUSTED, Kind.DISABLED):
            account.freeUntil = max(account.freeUntil, until or nextMidnight(now))
            account.freeUntilReason = verdict.reason
        elif scope is Scope.PAID and kind in (Kind.EXHAUSTED, Kind.DISABLED):
            account.paidUntil = max(account.paidUntil, until or nextMidnight(now))
            account.paidUntilReason = verdict.reason
        elif kind is Kind.COOLING:
            account.coolingUntil = max(account.coolingUntil, until or now)
            account.coolingReason = verdict.reason
        elif kind is Kind.EXHAUSTED:
            account.exhaustedUntil = max(account.exhaustedUntil, until or now)
            account.exhaustedReason = verdict.reason
        elif kind is Kind.DISABLED:
            account.disabled = True
            account.disabledUntil = until
            account.disabledReason = verdict.reason or "refused by the upstream"
        else:
            return False
        return True

    def seed(self, name: str, *, used: int | None = None, limit: int | None = None) -> None:
        """
        Take what the upstream says of a key's day: free-model requests
        already C{used} (if more than hermux counted) and its daily C{limit}
        of them (unless the configuration sets one).
        """
        self._now()
        account = self._accounts[name]
        if used is not None and used > account.freeRequests:
            more = used - account.freeRequests
            self._ledger.add(
                self._day, name, UNKNOWN, UNKNOWN, Counts(requests=more, freeRequests=more)
            )
            account.requests += more
            account.freeRequests = used
        if limit is not None and account.key.dailyLimit is None:
            account.dailyLimit = limit

    def replaceKeys(self, keys: Iterable[Key]) -> None:
        """
        Take a new configuration's keys.  Keys whose name stays keep their
        counts and their cooling or exhausted state; a key the upstream
        refused gets another chance; a key new to the pool starts at today's
        count for its name.  Requests in flight with a removed key finish,
        and what the upstream says of them is ignored.
        """
        self._now()
        old = self._accounts
        accounts = {}
        for key in keys:
            account = _Account(key, key.dailyLimit)
            before = old.get(key.name)
            if before is not None:
                for name in _CARRIED_STATE:
                    setattr(account, name, getattr(before, name))
                account.takeCounts(before.counts())
            else:
                counts = self._retired.pop(key.name, None)
                if counts is not None:
                    account.takeCounts(counts)
            accounts[key.name] = account
        for name, account in old.items():
            if name not in accounts:
                self._retired[name] = account.counts()
        self._accounts = accounts

    def statuses(self) -> list[KeyStatus]:
        """
        Every key's state, in configuration order.
        """
        now = self._now()
        return [account.status(now) for account in self._accounts.values()]

    # The key prober's (hermux.probe): keys refused until a reload, and
    # their coming back.

    def disabledKeys(self) -> dict[Key, str | None]:
        """
        The keys disabled until the configuration is reloaded (refused by
        the upstream: 401, 403), with why; not those disabled until a time
        (402, until midnight).
        """
        now = self._now()
        return {
            account.key: account.disabledReason
            for account in self._accounts.values()
            if account.state(now) is State.DISABLED and account.disabledUntil is None
        }

    def reinstate(self, key: Key, reason: str) -> bool:
        """
        Make C{key}, disabled until a reload, usable again because of
        C{reason} (the upstream accepts it again); its counts and any
        cooling or exhausted state stay.  Return whether it was reinstated:
        not if it is not disabled until a reload, or was removed or
        replaced by a reload meanwhile.
        """
        if key not in self.disabledKeys():
            return False
        self._reinstate(self._accounts[key.name], reason)
        if self.onReinstate is not None:
            self.onReinstate(key.name)
        return True

    def _reinstate(self, account: _Account, reason: str) -> None:
        account.disabled = False
        account.disabledUntil = None
        account.disabledReason = None
        self._log.info(
            "key {key} is {state} again: {reason}",
            key=account.key.name,
            state=account.state(self._now()).value,
            reason=reason,
        )


def _resolved(account: _Account, verdict: Verdict) -> Verdict:
    """
    C{verdict} as applied to C{account}: with the time its state ends.
    """
    kind, scope = verdict.kind, verdict.scope
    if kind is Kind.DISABLED and scope is Scope.ALL:
        until = account.disabledUntil
    elif scope is Scope.FREE:
        until = account.freeUntil
    elif scope is Scope.PAID:
        until = account.paidUntil
    elif kind is Kind.COOLING:
        until = account.coolingUntil
    else:
        until = account.exhaustedUntil
    return attr.evolve(verdict, until=until)


def _stateOf(account: _Account) -> tuple:
    return (
        account.coolingUntil,
        account.exhaustedUntil,
        account.freeUntil,
        account.paidUntil,
        account.disabled,
        account.disabledUntil,
    )


def _verdictsOf(account: _Account, now: float) -> list[Verdict]:
    """
    The verdicts that would put C{account} in the state it is in now.
    """
    verdicts = []
    if account.disabled and (account.disabledUntil is None or now < account.disabledUntil):
        verdicts.append(Verdict(Kind.DISABLED, account.disabledUntil, account.disabledReason))
    for until, kind, reason, scope in (
        (account.exhaustedUntil, Kind.EXHAUSTED, account.exhaustedReason, Scope.ALL),
        (account.coolingUntil, Kind.COOLING, account.coolingReason, Scope.ALL),
        (account.freeUntil, Kind.EXHAUSTED, account.freeUntilReason, Scope.FREE),
        (account.paidUntil, Kind.EXHAUSTED, account.paidUntilReason, Scope.PAID),
    ):
        if now < until:
            verdicts.append(Verdict(kind, until, reason, scope=scope))
    return verdicts


_NO_COUNTS = (0, 0, 0, 0, 0)
_ONE_RATE_LIMITED = Counts(rateLimited=1)
_ONE_ERROR = Counts(errors=1)
# Where Attempt's row holds these counters (Counts' order).
_RATE_LIMITED, _ERRORS = 2, 3

# Which kind of request (Use.free) a verdict of each scope is about.
_SCOPE_FREE = {Scope.ALL: None, Scope.FREE: True, Scope.PAID: False}

# What a key kept by a reload keeps of its state (not being disabled: a
# reload gives a refused key another chance).
_CARRIED_STATE = (
    "coolingUntil",
    "coolingReason",
    "exhaustedUntil",
    "exhaustedReason",
    "freeUntil",
    "freeUntilReason",
    "paidUntil",
    "paidUntilReason",
)
