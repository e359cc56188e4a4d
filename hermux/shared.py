# -*- test-case-name: tests.test_shared,tests.test_shared_endtoend -*-
"""
Several hermux instances sharing one pool through Redis (C{--redis}).

What is shared, and how:

  - Counts.  Each instance writes its own counts of today, absolute, in one
    field of a hash per day (a grow-only counter per instance), and reads
    the others'; the pool-wide figure is the sum.  A write is idempotent, a
    reconnection writes the absolutes again, and a Redis restarted empty
    has them all back at the next exchange: nothing is counted twice or
    lost, and each instance's SQLite ledger stays the durable history.
  - Key states.  Each verdict an instance applies goes into a stream that
    every instance reads from where it last stopped; applying one is
    idempotent (each state ends at the latest of its times).  An instance
    that reconnects, or finds Redis emptied, writes its states in force
    again.
  - Clients' C{daily_requests} and C{max_parallel}: exact, by a script that
    checks the pool-wide counts and counts the request in one step; the
    other limits read the summed counts, up to a moment behind.
  - Failed access tokens per address: each instance adds its failures to a
    sorted set of the last minute's, and takes the others'.

All of it happens in one exchange a quarter of a second (L{syncInterval}),
in a thread of its own with redis-py, which has timeouts and reconnects.
No client request waits on Redis, but a limited client's, for at most
L{CONFIRM_TIMEOUT}; when Redis cannot be reached, hermux serves on what it
knows, says so in C{/hermux/health} and once a minute in the log, keeps
trying (at most every L{BACKOFF_LIMIT} seconds) and sends what it counted
meanwhile once it can.
"""

from __future__ import annotations

__all__ = [
    "BACKOFF_LIMIT",
    "CONFIRM_TIMEOUT",
    "RedisTarget",
    "SharedPool",
    "defaultInstanceName",
    "parseRedisURL",
]

import json
import secrets
import socket
import urllib.parse
from collections import deque

import attr
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, TimeoutError as DeferredTimeout, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from hermux.clients import ClientDay, dailyRequestsRefusal, maxParallelRefusal
from hermux.keypool import Kind, Scope, Verdict, dayOf
from hermux.ledger import Counts, dayText

BACKOFF_LIMIT = 10.0
CONFIRM_TIMEOUT = 0.25
# How long Redis may take to answer once connected, and to connect.
_SOCKET_TIMEOUT = 0.5
_CONNECT_TIMEOUT = 1.0
# Counts of a day are kept a little past it, for instances whose clocks
# differ; an instance's requests in flight count while it renews them.
_DAY_KEPT = 3 * 86400
_IN_FLIGHT_KEPT = 10
_VERDICTS_KEPT = 10_000
_FAILURES_KEPT = 10_000
_DEGRADED_LOG_INTERVAL = 60.0
_DEFAULT_PORT = 6379


class _Unusable(ValueError):
    pass


@attr.frozen
class RedisTarget:
    """
    Where Redis is: a TCP host and port (C{tls} for C{rediss://}) or a UNIX
    socket, a database number and a password.  C{shown} is the URL without
    the password, for log lines and errors.
    """

    shown: str
    host: str | None = None
    port: int = _DEFAULT_PORT
    socket: str | None = None
    db: int = 0
    tls: bool = False
    username: str | None = None  # a Redis 6 ACL user; None: the default user
    password: str | None = attr.field(default=None, repr=False)
    # The PEM file of the only CA trusted for rediss:// (None: the system's).
    caFile: str | None = None

    def withPassword(self, password: str) -> RedisTarget:
        return attr.evolve(self, password=password)

    def withCA(self, path: str) -> RedisTarget:
        return attr.evolve(self, caFile=path)


def parseRedisURL(text: str) -> RedisTarget:
    """
    A L{RedisTarget} from C{redis://[[user]:password@]host[:port][/db]},
    C{rediss://...} (TLS) or C{unix:///path/redis.sock[?db=N]}.

    @raise ValueError: saying what is wrong, never quoting the password.
    """
    try:
        parts = urllib.parse.urlsplit(text)
        if parts.scheme == "unix":
            return _unixTarget(parts)
        if parts.scheme not in ("redis", "rediss"):
            raise _Unusable("expected redis://host:port/db, rediss://... or unix:///path")
        return _tcpTarget(parts)
    except _Unusable as e:
        raise ValueError(str(e)) from None
    except ValueError:
        raise ValueError("not a URL of the form redis://[:password@]host:port/db") from None


def _passwordOf(parts) -> str | None:
    if parts.password is None:
        if parts.username:
            raise _Unusable("give the password as redis://[user]:password@host")
        return None
    return urllib.parse.unquote(parts.password)


def _tcpTarget(parts) -> RedisTarget:
    if not parts.hostname:
        raise _Unusable("no host: expected redis://host:port/db")
    if parts.query or parts.fragment:
        raise _Unusable("no query or fragment is understood; the database is the path, /0")
    port = parts.port or _DEFAULT_PORT
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise _Unusable(f"the database must be a number, as in /0, not {path[:20]!r}")
    db = int(path or 0)
    host = parts.hostname
    shownHost = f"[{host}]" if ":" in host else host
    return RedisTarget(
        shown=f"{parts.scheme}://{shownHost}:{port}/{db}",
        host=host,
        port=port,
        db=db,
        tls=parts.scheme == "rediss",
        username=urllib.parse.unquote(parts.username) if parts.username else None,
        password=_passwordOf(parts),
    )


def _unixTarget(parts) -> RedisTarget:
    if parts.netloc or not parts.path.startswith("/"):
        raise _Unusable("expected unix:///absolute/path/redis.sock")
    query = urllib.parse.parse_qs(parts.query)
    db = query.get("db", ["0"])[-1]
    if not db.isdigit() or set(query) - {"db"}:
        raise _Unusable("the only parameter of a unix:// URL is db=N")
    return RedisTarget(shown=f"unix://{parts.path}?db={db}", socket=parts.path, db=int(db))


def defaultInstanceName(listen: list[str]) -> str:
    """
    An instance's name by default: the host name and its first listening
    port (or socket path), as C{--listen} descriptions give them.
    """
    description = listen[0] if listen else "tcp:3333"
    parts = description.split(":")
    where = parts[1] if len(parts) > 1 and parts[0] in ("tcp", "tcp6", "ssl", "unix") else description
    return f"{socket.gethostname()}:{where}"[:64]


def _problemOf(error: Exception, target: RedisTarget) -> str:
    """
    A sentence for an operator: what went wrong with Redis, without the
    password or the exception's own text (which may hold it).
    """
    if isinstance(error, redis.AuthenticationError) or "NOAUTH" in str(error) or (
        isinstance(error, redis.ResponseError) and "WRONGPASS" in str(error)
    ):
        return f"Redis at {target.shown} refused the password (check --redis or --redis-password-file)"
    if target.tls and "certificate" in str(error).lower():
        return f"the TLS certificate of Redis at {target.shown} could not be verified"
    if isinstance(error, redis.TimeoutError):
        return f"Redis at {target.shown} did not answer in time"
    if isinstance(error, redis.ConnectionError):
        return f"cannot connect to Redis at {target.shown}"
    return f"Redis at {target.shown} failed ({type(error).__name__})"


# The pool-wide check of a limited client's request: its day's admitted
# requests (one field per instance) against daily_requests, then its
# requests in flight ("count:time" per instance, counted while renewed)
# against max_parallel.  This instance's fields are set from its own
# counts before this request (ARGV), so that what it wrote meanwhile does
# not count the request twice.
_CONFIRM = """
local instance, daily, parallel = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local admitted, flying, now = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local total = admitted
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  if fields[i] ~= instance then total = total + tonumber(fields[i + 1]) end
end
if daily >= 0 and total >= daily then return 1 end
local inFlight = flying
fields = redis.call('HGETALL', KEYS[2])
for i = 1, #fields, 2 do
  if fields[i] ~= instance then
    local n, at = string.match(fields[i + 1], '^(%d+):(%d+)$')
    if n and tonumber(at) >= now - tonumber(ARGV[7]) then inFlight = inFlight + tonumber(n) end
  end
end
if parallel >= 0 and inFlight >= parallel then return 2 end
redis.call('HSET', KEYS[1], instance, admitted + 1)
redis.call('EXPIRE', KEYS[1], ARGV[8])
redis.call('HSET', KEYS[2], instance, (flying + 1) .. ':' .. math.floor(now))
redis.call('EXPIRE', KEYS[2], ARGV[8])
return 0
"""


def _verdictFields(instance: str, key: str, verdict: Verdict) -> dict[str, str]:
    return {
        "i": instance,
        "k": key,
        "v": verdict.kind.value,
        "s": verdict.scope.value,
        "u": "" if verdict.until is None else repr(verdict.until),
        "r": verdict.reason or "",
        "c": verdict.cause or "",
    }


def _verdictOf(fields: dict[str, str]) -> Verdict:
    return Verdict(
        Kind(fields["v"]),
        until=float(fields["u"]) if fields.get("u") else None,
        reason=fields.get("r") or None,
        cause=fields.get("c") or None,
        scope=Scope(fields.get("s", "all")),
    )


@attr.frozen
class _Outbound:
    """
    What one exchange sends: this instance's counts of a day, its new
    verdicts and failures, and where it stopped reading the stream.
    """

    day: int
    now: float
    keys: dict[str, tuple[int, int, int, int, int]]
    clients: dict[str, ClientDay]
    verdicts: list[tuple[str, Verdict | None]]  # None: reinstated
    failures: list[tuple[str, float]]
    lastId: str


@attr.frozen
class _Inbound:
    epoch: str
    counts: dict[str, str]
    events: list
    failures: list[tuple[str, float]]


class SharedPool(Service):
    """
    This instance's link to the others through Redis (see the module's
    docstring).

    @param target: where Redis is.
    @param instance: this instance's name (C{--instance-name}), unique in
        the pool.
    @param prefix: the beginning of every Redis key (C{--redis-prefix}), so
        that several pools can share one Redis.
    """

    _log = Logger()
    syncInterval = 0.25

    def __init__(self, target: RedisTarget, *, pool, book, throttle, instance: str, prefix: str, reactor):
        self.target = target
        self.instance = instance
        self._prefix = prefix
        self._pool = pool
        self._book = book
        self._throttle = throttle
        self._reactor = reactor
        self._threads = ThreadPool(1, 1, "hermux-redis")
        self._client: redis.Redis | None = None
        self._confirmScript = None
        self._seenEpoch: str | None = None
        self._lastId: str | None = None
        self._verdicts: deque = deque(maxlen=_VERDICTS_KEPT)
        self._failures: deque = deque(maxlen=_FAILURES_KEPT)
        self._republish = True
        self._problem: str | None = "not connected to Redis yet"
        self._lastWarned: float | None = None
        # The other instances' counts of the day, as last read.
        self._seenDay: int | None = None
        self._seen: dict[str, dict] = {}
        self._delay = self.syncInterval
        self._pending = None
        self._next = None
        pool.onVerdict = self._verdictApplied
        pool.onReinstate = self._reinstated
        book.confirmer = self.confirm
        throttle.onFailure = self._failed

    # What /hermux/health reads.

    def problem(self) -> str | None:
        """
        Why the pool is not shared right now, or L{None} when it is.
        """
        return self._problem

    # The service.

    def startService(self):
        super().startService()
        self._threads.start()
        self._schedule(0)

    def stopService(self):
        super().stopService()
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        # A last exchange, after the one under way: the others keep this
        # instance's final counts.
        d = self._pending if self._pending is not None else succeed(None)
        d.addBoth(lambda _: self._exchangeNow())
        d.addBoth(lambda _: self._threads.stop())
        return d

    def _schedule(self, delay: float) -> None:
        self._next = self._reactor.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._next = None
        self._exchangeNow().addBoth(self._afterExchange)

    def _afterExchange(self, _):
        if self.running:
            self._schedule(self._delay)

    def _exchangeNow(self):
        out = self._outbound()
        d = deferToThreadPool(self._reactor, self._threads, self._exchange, out)
        self._pending = d
        d.addCallbacks(self._received, self._failedExchange, callbackArgs=(out,), errbackArgs=(out,))

        def done(result):
            self._pending = None
            return result

        return d.addBoth(done)

    # The reactor's side of an exchange.

    def _outbound(self) -> _Outbound:
        now = self._reactor.seconds()
        verdicts = list(self._verdicts)
        self._verdicts.clear()
        if self._republish:
            self._republish = False
            verdicts = self._pool.activeVerdicts() + verdicts
        failures = list(self._failures)
        self._failures.clear()
        lastId = self._lastId
        if lastId is None:
            # First contact: the verdicts of the last 25 hours still matter.
            lastId = "%d-0" % (max(0, now - 90000) * 1000,)
        return _Outbound(
            day=dayOf(now),
            now=now,
            keys=self._pool.ownCounts(),
            clients=self._book.ownCounts(),
            verdicts=verdicts,
            failures=failures,
            lastId=lastId,
        )

    def _received(self, inbound: _Inbound, out: _Outbound) -> None:
        if self._seenEpoch is not None and inbound.epoch != self._seenEpoch:
            # Redis lost what it held (restarted empty): everything it had
            # from here is sent again at the next exchange.
            self._log.warn("Redis at {redis} was emptied; sending this instance's state again", redis=self.target.shown)
            self._republish = True
            self._lastId = "0-0"
        else:
            self._takeEvents(inbound.events)
        self._seenEpoch = inbound.epoch
        self._takeCounts(out.day, inbound.counts)
        self._takeFailures(inbound.failures)
        if self._problem is not None:
            self._log.info(
                "the pool is shared through Redis at {redis}{again}, as instance {instance}",
                redis=self.target.shown,
                again="" if self._lastWarned is None else " again",
                instance=self.instance,
            )
        self._problem = None
        self._lastWarned = None
        self._delay = self.syncInterval

    def _failedExchange(self, failure, out: _Outbound) -> None:
        # What could not be sent is sent again: the counts are absolute, the
        # states in force are written again, and the failures are kept.
        self._failures.extendleft(reversed(out.failures))
        self._republish = True
        if not failure.check(redis.RedisError, OSError):
            self._log.failure("exchanging with Redis failed", failure)
        self._problem = _problemOf(failure.value, self.target)
        now = self._reactor.seconds()
        if self._lastWarned is None or now - self._lastWarned >= _DEGRADED_LOG_INTERVAL:
            self._lastWarned = now
            self._log.warn(
                "degraded: {problem}; serving on this instance's own counts and states, "
                "and trying again",
                problem=self._problem,
            )
        self._delay = min(BACKOFF_LIMIT, max(self.syncInterval, self._delay * 2))

    def _takeEvents(self, events) -> None:
        for eventId, fields in events:
            self._lastId = eventId
            source = fields.get("i", "?")
            if source == self.instance:
                continue
            try:
                if fields.get("v") == "reinstated":
                    self._pool.learnReinstated(fields["k"], source)
                else:
                    self._pool.learn(fields["k"], _verdictOf(fields), source)
            except (KeyError, ValueError):
                self._log.warn("ignored a key state from instance {source} that hermux cannot read", source=source)

    def _takeCounts(self, day: int, counts: dict[str, str]) -> None:
        """
        Take the other instances' counts of C{day}.  Each is remembered:
        an instance missing from what is read (a Redis restarted empty,
        still waiting for its next write) keeps what it had, but its
        requests in flight.
        """
        if self._seenDay != day:
            self._seenDay, self._seen = day, {}
        seen = self._seen
        for theirs in seen.values():
            theirs["clients"] = {
                label: day._replace(inFlight=0) for label, day in theirs["clients"].items()
            }
        for instance, text in counts.items():
            if instance == self.instance:
                continue
            try:
                theirs = _countsOf(json.loads(text))
            except (ValueError, KeyError, TypeError):
                continue
            seen[instance] = theirs
        keys: dict[str, list[int]] = {}
        for theirs in seen.values():
            _addAll(keys, theirs["keys"])
        self._pool.takeElsewhere(day, {name: tuple(c) for name, c in keys.items()})
        self._book.takeElsewhere(day, _clientDays(seen.values()))

    def _takeFailures(self, failures: list[tuple[str, float]]) -> None:
        byHost: dict[str, list[float]] = {}
        for host, when in failures:
            byHost.setdefault(host, []).append(when)
        for host, times in byHost.items():
            self._throttle.merge(host, times)

    # What the pool, the book and the throttle tell.

    def _verdictApplied(self, key: str, verdict: Verdict) -> None:
        self._verdicts.append((key, verdict))

    def _reinstated(self, key: str) -> None:
        self._verdicts.append((key, None))

    def _failed(self, host: str, when: float) -> None:
        self._failures.append((host, when))

    def confirm(self, client, admission):
        """
        Check a limited client's request against the pool-wide
        C{daily_requests} and C{max_parallel}: a L{Deferred} that fires when
        Redis agrees, or fails with L{hermux.clients.LimitRefusal} (the
        admission withdrawn).  L{None} (no wait) for a client without those
        limits, or while Redis cannot be reached; after
        L{CONFIRM_TIMEOUT} without an answer the request goes out on this
        instance's view.
        """
        entry = client.entry
        if entry is None or (entry.dailyRequests is None and entry.maxParallel is None):
            return None
        if self._problem is not None:
            return None
        now = self._reactor.seconds()
        d = deferToThreadPool(
            self._reactor,
            self._threads,
            self._confirm,
            client.label,
            dayOf(now),
            now,
            -1 if entry.dailyRequests is None else entry.dailyRequests,
            -1 if entry.maxParallel is None else entry.maxParallel,
            admission.admittedBefore,
            admission.inFlightBefore,
        )
        d.addTimeout(CONFIRM_TIMEOUT, self._reactor)
        return d.addCallbacks(self._confirmed, self._unconfirmed, callbackArgs=(entry, admission, now))

    def _confirmed(self, answer: int, entry, admission, now: float) -> None:
        if answer == 0:
            return None
        admission.withdraw()
        if answer == 1:
            raise dailyRequestsRefusal(entry, now)
        raise maxParallelRefusal(entry)

    def _unconfirmed(self, failure) -> None:
        failure.trap(DeferredTimeout, CancelledError, redis.RedisError, OSError)
        # Redis is slow or gone: the request goes out on what this instance
        # knows, and the next exchange says whether Redis is gone.
        return None

    # In the thread.

    def _redis(self) -> redis.Redis:
        if self._client is None:
            target = self.target
            common = dict(
                db=target.db,
                username=target.username,
                password=target.password,
                socket_timeout=_SOCKET_TIMEOUT,
                socket_connect_timeout=_CONNECT_TIMEOUT,
                retry=Retry(NoBackoff(), 0),
                client_name=_clientName(self.instance),
                decode_responses=True,
                protocol=2,
            )
            if target.socket is not None:
                self._client = redis.Redis(unix_socket_path=target.socket, **common)
            else:
                self._client = redis.Redis(
                    host=target.host,
                    port=target.port,
                    ssl=target.tls,
                    ssl_cert_reqs="required",
                    ssl_check_hostname=target.tls,
                    ssl_ca_certs=target.caFile,
                    **common,
                )
            self._confirmScript = self._client.register_script(_CONFIRM)
        return self._client

    def _key(self, *parts: str) -> str:
        return ":".join((self._prefix, *parts))

    def _exchange(self, out: _Outbound) -> _Inbound:
        client = self._redis()
        day = dayText(out.day)
        countsKey = self._key("counts", day)
        failuresKey = self._key("auth-failures")
        verdictsKey = self._key("verdicts")
        pipe = client.pipeline(transaction=False)
        # A new value each time, which lands only where none is: a Redis
        # restarted empty gets a new one, and every instance sees it change.
        pipe.set(self._key("epoch"), secrets.token_hex(8), nx=True)
        pipe.get(self._key("epoch"))
        pipe.hset(countsKey, self.instance, _countsText(out))
        pipe.expire(countsKey, _DAY_KEPT)
        for label, clientDay in out.clients.items():
            admittedKey = self._key("admitted", day, label)
            pipe.hset(admittedKey, self.instance, clientDay.admitted)
            pipe.expire(admittedKey, _DAY_KEPT)
            inFlightKey = self._key("in-flight", label)
            pipe.hset(inFlightKey, self.instance, "%d:%d" % (clientDay.inFlight, out.now))
            pipe.expire(inFlightKey, _DAY_KEPT)
        for key, verdict in out.verdicts:
            if verdict is None:
                fields = {"i": self.instance, "k": key, "v": "reinstated"}
            else:
                fields = _verdictFields(self.instance, key, verdict)
            pipe.xadd(verdictsKey, fields, maxlen=_VERDICTS_KEPT, approximate=True)
        window = self._throttle.window
        for host, when in out.failures:
            pipe.zadd(failuresKey, {f"{host}|{self.instance}|{when!r}": when})
        pipe.zremrangebyscore(failuresKey, "-inf", out.now - window)
        pipe.zremrangebyrank(failuresKey, 0, -_FAILURES_KEPT - 1)
        pipe.expire(failuresKey, int(window * 2) + 1)
        pipe.zrange(failuresKey, 0, -1, withscores=True)
        pipe.hgetall(countsKey)
        pipe.xread({verdictsKey: out.lastId}, count=1000)
        results = pipe.execute()
        epoch = results[1]
        failures = [(member.split("|", 1)[0], score) for member, score in results[-3]]
        events = _streamEntries(results[-1])
        return _Inbound(epoch=epoch, counts=results[-2], events=events, failures=failures)

    def _confirm(self, label, day, now, daily, parallel, admitted, inFlight) -> int:
        self._redis()
        keys = [self._key("admitted", dayText(day), label), self._key("in-flight", label)]
        args = [self.instance, daily, parallel, admitted, inFlight, int(now), _IN_FLIGHT_KEPT, _DAY_KEPT]
        return int(self._confirmScript(keys=keys, args=args))


def _streamEntries(answer) -> list:
    """
    The entries of the one stream an XREAD answer (RESP2) holds.
    """
    return answer[0][1] if answer else []


def _countsText(out: _Outbound) -> str:
    """
    This instance's counts as the others read them (L{_countsOf}): JSON, 5
    counters per key and 13 per client.
    """
    clients = {
        label: [day.admitted, day.inFlight, day.lastMinute, day.firstInMinute, *day.counts]
        for label, day in out.clients.items()
    }
    return json.dumps({"keys": out.keys, "clients": clients}, separators=(",", ":"))


def _countsOf(counts: dict) -> dict:
    """
    Another instance's counts as written, checked: 5 counters per key, 13
    per client (whole numbers, but the time of the first request in the
    last minute).
    """
    keys = {str(name): [int(v) for v in c] for name, c in counts["keys"].items()}
    clients = {
        str(label): ClientDay(int(c[0]), int(c[1]), int(c[2]), float(c[3]), Counts(*map(int, c[4:])))
        for label, c in counts["clients"].items()
        if len(c) == 13
    }
    if any(len(c) != 5 for c in keys.values()) or len(clients) != len(counts["clients"]):
        raise ValueError("not hermux's counts")
    return {"keys": keys, "clients": clients}


def _clientDays(instances) -> dict[str, ClientDay]:
    """
    The instances' days of each client, summed; of the first requests in
    their last minutes, the earliest.
    """
    days: dict[str, ClientDay] = {}
    for theirs in instances:
        for label, day in theirs["clients"].items():
            sum_ = days.get(label)
            if sum_ is None:
                days[label] = day
                continue
            firsts = [t for t in (sum_.firstInMinute, day.firstInMinute) if t]
            days[label] = ClientDay(
                sum_.admitted + day.admitted,
                sum_.inFlight + day.inFlight,
                sum_.lastMinute + day.lastMinute,
                min(firsts) if firsts else 0.0,
                sum_.counts + day.counts,
            )
    return days


def _addAll(sums: dict[str, list[int]], theirs: dict) -> None:
    for name, counts in theirs.items():
        mine = sums.setdefault(name, [0] * len(counts))
        for i, value in enumerate(counts):
            mine[i] += value


def _clientName(instance: str) -> str:
    # Redis client names may not hold spaces; it only helps CLIENT LIST.
    return "hermux-" + "".join(c if c.isalnum() or c in "-_.:" else "_" for c in instance)[:64]
