# -*- test-case-name: tests.test_keypool -*-
"""
The key pool: which upstream key serves the next request, and what is known
of each key's allowance today.

A key is ready, cooling (rate limited for a moment), exhausted (its daily
allowance is spent) or disabled (the upstream refused it).  The pool hands
out the ready key with the fewest requests today (UTC); a new UTC day starts
every key again at zero.  It knows nothing of HTTP: what an upstream answer
means for a key arrives as a L{Verdict}.
"""

from __future__ import annotations

__all__ = [
    "SECONDS_PER_DAY",
    "dayOf",
    "isoTime",
    "nextMidnight",
    "State",
    "Kind",
    "Verdict",
    "OK",
    "ERROR",
    "KeyStatus",
    "NoKeyAvailable",
    "KeyPool",
]

import random
from collections.abc import Iterable
from datetime import datetime, timezone
from enum import Enum

import attr
from twisted.application.service import Service
from twisted.logger import Logger

from hermux.config import Key
from hermux.ledger import ILedger, KeyUsage, MemoryLedger

SECONDS_PER_DAY = 86400


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
        return "the configuration is reloaded"
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
    """

    kind: Kind
    until: float | None = None
    reason: str | None = None
    cause: str | None = None

    @property
    def penalizes(self) -> bool:
        """
        Whether the key cannot serve this request, so another key should.
        """
        return self.kind in (Kind.COOLING, Kind.EXHAUSTED, Kind.DISABLED)


OK = Verdict(Kind.OK)
ERROR = Verdict(Kind.ERROR)


@attr.frozen
class KeyStatus:
    """
    A key as C{/hermux/keys} and the metrics show it: never its token.
    """

    name: str
    state: State
    requestsToday: int
    dailyLimit: int | None
    rateLimitedToday: int
    errorsToday: int
    usableAt: float | None
    reason: str | None


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
    One key and what the pool knows of it today.
    """

    key: Key
    dailyLimit: int | None
    requests: int = 0
    rateLimited: int = 0
    errors: int = 0
    coolingUntil: float = 0.0
    coolingReason: str | None = None
    exhaustedUntil: float = 0.0
    exhaustedReason: str | None = None
    disabled: bool = False
    disabledUntil: float | None = None
    disabledReason: str | None = None

    def _limitReached(self) -> bool:
        return self.dailyLimit is not None and self.requests >= self.dailyLimit

    def state(self, now: float) -> State:
        if self.disabled and (self.disabledUntil is None or now < self.disabledUntil):
            return State.DISABLED
        if now < self.exhaustedUntil or self._limitReached():
            return State.EXHAUSTED
        if now < self.coolingUntil:
            return State.COOLING
        return State.READY

    def usableAt(self, now: float) -> float | None:
        """
        When this key can serve again: C{now} if it can, L{None} if not
        before the configuration is reloaded.
        """
        state = self.state(now)
        if state is State.DISABLED:
            return self.disabledUntil
        if state is State.EXHAUSTED:
            if self._limitReached():
                return max(self.exhaustedUntil, nextMidnight(now))
            return self.exhaustedUntil
        if state is State.COOLING:
            return self.coolingUntil
        return now

    def reason(self, state: State) -> str | None:
        if state is State.DISABLED:
            return self.disabledReason
        if state is State.EXHAUSTED:
            if self._limitReached():
                return f"its daily_limit of {self.dailyLimit} requests is reached"
            return self.exhaustedReason
        if state is State.COOLING:
            return self.coolingReason
        return None

    def status(self, now: float) -> KeyStatus:
        state = self.state(now)
        return KeyStatus(
            name=self.key.name,
            state=state,
            requestsToday=self.requests,
            dailyLimit=self.dailyLimit,
            rateLimitedToday=self.rateLimited,
            errorsToday=self.errors,
            usableAt=None if state is State.READY else self.usableAt(now),
            reason=self.reason(state),
        )


class KeyPool(Service):
    """
    Hands out the least-used ready key, counting each key when it is chosen
    so that requests made at the same moment spread evenly.  Ties are broken
    at random, so that no key is always first.

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
                account.requests = counts.requests
                account.rateLimited = counts.rateLimited
                account.errors = counts.errors
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
                account.requests = account.rateLimited = account.errors = 0
            self._log.info("a new UTC day began: every key starts again at zero")
        return now

    def requestCounts(self) -> dict[str, int]:
        """
        How many requests each key (by name) has served today.
        """
        self._now()
        return {name: account.requests for name, account in self._accounts.items()}

    def acquire(self, exclude: Iterable[str] = ()) -> Key:
        """
        Choose the key for one request to the upstream, and count it.

        @param exclude: names of keys not to choose (already tried).
        @raise NoKeyAvailable: if no key not excluded is ready.
        """
        now = self._now()
        fewest = None
        candidates: list[_Account] = []
        for account in self._accounts.values():
            if account.key.name in exclude or account.state(now) is not State.READY:
                continue
            if fewest is None or account.requests < fewest:
                fewest = account.requests
                candidates = [account]
            elif account.requests == fewest:
                candidates.append(account)
        if not candidates:
            raise NoKeyAvailable(self.usableAt(now))
        account = self._random.choice(candidates)
        account.requests += 1
        self._ledger.record(self._day, account.key.name, requests=1)
        return account.key

    def usableAt(self, now: float | None = None) -> float | None:
        """
        When the first key becomes usable, or L{None} if none will before the
        configuration changes.
        """
        if now is None:
            now = self._now()
        times = [account.usableAt(now) for account in self._accounts.values()]
        known = [t for t in times if t is not None]
        return min(known) if known else None

    def report(self, key: Key, verdict: Verdict) -> None:
        """
        Learn what an upstream answer to a request made with C{key} means.
        """
        now = self._now()
        account = self._accounts.get(key.name)
        if account is None or account.key != key:
            return  # a key removed from the configuration meanwhile
        kind = verdict.kind
        if kind in (Kind.BUSY, Kind.COOLING, Kind.EXHAUSTED):
            account.rateLimited += 1
            self._ledger.record(self._day, key.name, rateLimited=1)
        elif kind in (Kind.ERROR, Kind.OVER_BUDGET, Kind.DISABLED):
            account.errors += 1
            self._ledger.record(self._day, key.name, errors=1)
        if kind is Kind.COOLING:
            account.coolingUntil = max(account.coolingUntil, verdict.until or now)
            account.coolingReason = verdict.reason
        elif kind is Kind.EXHAUSTED:
            account.exhaustedUntil = max(account.exhaustedUntil, verdict.until or now)
            account.exhaustedReason = verdict.reason
        elif kind is Kind.DISABLED:
            account.disabled = True
            account.disabledUntil = verdict.until
            account.disabledReason = verdict.reason or "refused by the upstream"
        else:
            return
        state = account.state(now)
        self._log.warn(
            "key {key} is {state} until {until}: {reason}",
            key=key.name,
            state=state.value,
            until=_untilText(account.usableAt(now)),
            reason=account.reason(state) or "-",
        )

    def seed(self, name: str, *, used: int | None = None, limit: int | None = None) -> None:
        """
        Take what the upstream says of a key's day: requests already C{used}
        (if more than hermux counted) and its daily C{limit} (unless the
        configuration sets one).
        """
        self._now()
        account = self._accounts[name]
        if used is not None and used > account.requests:
            self._ledger.record(self._day, name, requests=used - account.requests)
            account.requests = used
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
                account.coolingUntil = before.coolingUntil
                account.coolingReason = before.coolingReason
                account.exhaustedUntil = before.exhaustedUntil
                account.exhaustedReason = before.exhaustedReason
            counts = before or self._retired.pop(key.name, None)
            if counts is not None:
                account.requests = counts.requests
                account.rateLimited = counts.rateLimited
                account.errors = counts.errors
            accounts[key.name] = account
        for name, account in old.items():
            if name not in accounts:
                self._retired[name] = KeyUsage(account.requests, account.rateLimited, account.errors)
        self._accounts = accounts

    def countClient(self, label: str) -> None:
        """
        Count one request from the client labelled C{label} in today's usage.
        """
        self._now()
        self._ledger.recordClient(self._day, label)

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
        account = self._accounts[key.name]
        account.disabled = False
        account.disabledUntil = None
        account.disabledReason = None
        now = self._now()
        self._log.info(
            "key {key} is {state} again: {reason}",
            key=key.name,
            state=account.state(now).value,
            reason=reason,
        )
        return True
