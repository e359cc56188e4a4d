"""
Tests for L{hermux.probe.KeyProbe} in memory: an upstream that answers (the
fake OpenRouter over L{RequestTraversalAgent}), never does or cannot be
reached, and a L{Clock} for the timeout and the background probing.
"""

from __future__ import annotations

import json

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent
from zope.interface import implementer

from hermux.config import Key
from hermux.keypool import (
    SECONDS_PER_DAY,
    Kind,
    KeyPool,
    KeyStatus,
    NoKeyAvailable,
    State,
    Use,
    Verdict,
    nextMidnight,
)
from hermux.probe import DRIFT_INTERVAL, KeyProbe
from hermux.testing import FakeOpenRouter
from hermux.upstream import Upstream
from tests.harness import KEYS
from tests.memory import NOW, MemoryProxy

ALPHA = Key("alpha", "sk-or-v1-probe-test-alpha-1b2c")
BETA = Key("beta", "sk-or-v1-probe-test-beta-3d4e")
TIMEOUT = 30.0


@implementer(IAgent)
class _SilentAgent:
    """
    An agent whose requests never get an answer, and that notes which were
    cancelled.
    """

    def __init__(self):
        self.uris: list[bytes] = []
        self.cancelled = 0

    def request(self, method, uri, headers=None, bodyProducer=None):
        self.uris.append(uri)
        return Deferred(self._cancel)

    def _cancel(self, d):
        self.cancelled += 1


class KeyProbeTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.pool = KeyPool([ALPHA, BETA], reactor=self.clock)

    def probe(self, agent) -> KeyProbe:
        probe = KeyProbe(
            self.pool, Upstream(b"https://upstream.test", agent), timeout=TIMEOUT, reactor=self.clock
        )
        probe.startService()
        self.addCleanup(probe.stopService)
        return probe

    def test_answersSeedThePool(self):
        """
        Each key's used requests and daily limit come from the upstream's
        answer; a key it refuses is disabled.
        """
        fake = FakeOpenRouter([ALPHA.token], reactor=self.clock, dailyLimit=200)
        fake.usedToday[ALPHA.token] = 7
        probe = self.probe(RequestTraversalAgent(fake))
        self.successResultOf(probe.done)
        states = {status.name: status for status in self.pool.statuses()}
        self.assertEqual((states["alpha"].requestsToday, states["alpha"].dailyLimit), (7, 200))
        self.assertEqual(states["beta"].state, State.DISABLED)

    def test_silentUpstreamIsGivenUp(self):
        """
        A probe that gets no answer is given up after the timeout, on the
        reactor the probe was given: its request is cancelled, the failure
        logged, and the key counted from what hermux knows.
        """
        agent = _SilentAgent()
        with capturedLogs() as events:
            probe = self.probe(agent)
            self.clock.advance(TIMEOUT - 1)
            self.assertNoResult(probe.done)
            self.clock.advance(1)
            self.successResultOf(probe.done)
        self.assertEqual(agent.uris, [b"https://upstream.test/api/v1/key"] * 2)
        self.assertEqual(agent.cancelled, 2)
        self.assertEqual(
            sorted(formatEvent(event) for event in events if event["log_level"].name == "warn"),
            [
                f"probing key {name} failed (TimeoutError); counting from what hermux knows"
                for name in ("alpha", "beta")
            ],
        )
        for status in self.pool.statuses():
            self.assertEqual((status.state, status.requestsToday, status.dailyLimit), (State.READY, 0, None))
        self.assertEqual(self.clock.getDelayedCalls(), [])


@implementer(IAgent)
class _RefusingAgent:
    """
    An agent that cannot connect.
    """

    def __init__(self):
        self.uris: list[bytes] = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        self.uris.append(uri)
        return fail(ConnectionRefusedError())


REFUSED = Verdict(Kind.DISABLED, None, "the upstream says the key is invalid or disabled (401)")
INTERVAL = 900.0


class BackgroundProbeTests(SynchronousTestCase):
    """
    The prober that runs beside the requests: keys refused until a reload
    every C{--probe-interval} seconds, every key every hour; on a L{Clock}.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.pool = KeyPool([ALPHA, BETA], reactor=self.clock)
        self.fake = FakeOpenRouter([ALPHA.token], reactor=self.clock, dailyLimit=200)

    def probe(self, agent=None, *, interval=INTERVAL, atStart=False) -> KeyProbe:
        if agent is None:
            agent = RequestTraversalAgent(self.fake)
        probe = KeyProbe(
            self.pool,
            Upstream(b"https://upstream.test", agent),
            atStart=atStart,
            interval=interval,
            timeout=TIMEOUT,
            reactor=self.clock,
        )
        probe.startService()
        self.addCleanup(probe.stopService)
        return probe

    def states(self) -> dict[str, KeyStatus]:
        return {status.name: status for status in self.pool.statuses()}

    def probed(self) -> list[str]:
        return [received.key for received in self.fake.received]

    def test_refusedKeyComesBack(self):
        """
        A key disabled by a 401 is asked about every interval, and only it;
        it stays disabled (and counts no more errors) while the upstream
        refuses it, and becomes ready when the upstream accepts it; the log
        says so, without a token.
        """
        self.pool.report(BETA, REFUSED)
        self.probe()
        self.clock.advance(INTERVAL - 1)
        self.assertEqual(self.probed(), [])
        self.clock.advance(1)
        self.assertEqual(self.probed(), [BETA.token])
        self.assertEqual(
            (self.states()["beta"].state, self.states()["beta"].errorsToday), (State.DISABLED, 1)
        )
        self.fake.keys = frozenset({ALPHA.token, BETA.token})
        with capturedLogs() as events:
            self.clock.advance(INTERVAL)
        self.assertEqual(self.probed(), [BETA.token] * 2)
        beta = self.states()["beta"]
        self.assertEqual((beta.state, beta.reason, beta.dailyLimit), (State.READY, None, 200))
        lines = [formatEvent(event) for event in events]
        self.assertIn(
            "key beta is ready again: the upstream accepts the key again (GET /api/v1/key: 200)",
            lines,
        )
        for line in lines:
            self.assertNotIn(BETA.token, line)
        self.assertEqual(self.pool.acquire(exclude=["alpha"]).key, BETA)
        self.clock.advance(INTERVAL)
        self.assertEqual(self.probed(), [BETA.token] * 2)

    def test_keyDisabledUntilATimeIsNotProbed(self):
        """
        A key disabled until a time (402, until midnight) is left to come
        back by itself: it is not asked about.
        """
        self.pool.report(BETA, Verdict(Kind.DISABLED, nextMidnight(NOW), "out of credits (402)"))
        self.assertEqual(self.pool.disabledKeys(), {})
        self.probe()
        self.clock.advance(INTERVAL)
        self.assertEqual(self.probed(), [])
        self.assertEqual(self.states()["beta"].state, State.DISABLED)

    def test_failedProbeChangesNothing(self):
        """
        A probe answered with a 5xx, or that cannot connect, changes nothing
        and is logged.
        """
        self.pool.report(ALPHA, REFUSED)
        self.fake.answerNext(502, {"error": {"code": 502, "message": "bad gateway"}}, key=ALPHA.token)
        self.probe()
        with capturedLogs() as events:
            self.clock.advance(INTERVAL)
        self.assertEqual(self.probed(), [ALPHA.token])
        self.assertEqual(self.states()["alpha"].state, State.DISABLED)
        self.assertIn(
            "probing key alpha: the upstream answered 502; counting from what hermux knows",
            [formatEvent(event) for event in events],
        )

    def test_unreachableUpstreamChangesNothing(self):
        """
        A probe that cannot reach the upstream changes nothing, for keys
        refused as for the hourly count.
        """
        self.pool.report(ALPHA, REFUSED)
        agent = _RefusingAgent()
        self.probe(agent)
        with capturedLogs() as events:
            for _ in range(4):
                self.clock.advance(INTERVAL)
        # alpha every interval (4), and every key at the hour (2).
        self.assertEqual(len(agent.uris), 6)
        states = self.states()
        self.assertEqual(states["alpha"].state, State.DISABLED)
        self.assertEqual((states["beta"].state, states["beta"].requestsToday), (State.READY, 0))
        self.assertIn(
            "probing key beta failed (ConnectionRefusedError); counting from what hermux knows",
            [formatEvent(event) for event in events],
        )

    def test_driftCorrectedHourly(self):
        """
        Every hour every key is asked about: a count of free-model requests
        the upstream has higher than hermux's (the account was used
        elsewhere) is taken, so that least-used and the daily limits follow
        it; a lower one is not.
        """
        self.fake.keys = None
        free = Use(model="m:free", free=True)
        self.pool.acquire(exclude=["beta"], use=free)
        self.pool.acquire(exclude=["beta"], use=free)
        self.fake.usedToday[BETA.token] = 9
        self.probe()
        self.clock.advance(DRIFT_INTERVAL - 1)
        self.assertEqual(self.probed(), [])
        self.assertEqual(self.pool.freeRequestCounts(), {"alpha": 2, "beta": 0})
        with capturedLogs() as events:
            self.clock.advance(1)
        self.assertEqual(sorted(self.probed()), sorted([ALPHA.token, BETA.token]))
        self.assertEqual(self.pool.freeRequestCounts(), {"alpha": 2, "beta": 9})
        self.assertEqual(self.states()["beta"].dailyLimit, 200)
        self.assertEqual(
            [formatEvent(event) for event in events if event["log_level"].name == "info"],
            ["key beta: 9 of 200 free-model requests used today (hermux had counted 0)"],
        )
        self.assertEqual(self.pool.acquire(use=free).key, ALPHA)
        self.fake.usedToday[ALPHA.token] = 200
        self.clock.advance(DRIFT_INTERVAL)
        self.assertIsNotNone(self.states()["alpha"].freeReason)
        self.assertRaises(NoKeyAvailable, self.pool.acquire, exclude=["beta"], use=free)

    def test_refusalOnHourlyProbeDisables(self):
        """
        A key the upstream refuses (401) when asked hourly is disabled.
        """
        self.probe()
        self.clock.advance(DRIFT_INTERVAL)
        beta = self.states()["beta"]
        self.assertEqual(beta.state, State.DISABLED)
        self.assertEqual(beta.reason, "the upstream refused the key when probed (401)")
        self.assertEqual(list(self.pool.disabledKeys()), [BETA])

    def test_intervalZeroProbesNothing(self):
        """
        With an interval of 0 nothing is probed in the background, and no
        call is left waiting.
        """
        self.pool.report(BETA, REFUSED)
        self.probe(interval=0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(SECONDS_PER_DAY)
        self.assertEqual(self.probed(), [])

    def test_atStartThenInBackground(self):
        """
        With C{atStart}, every key is probed at start, then the background
        probing goes on.
        """
        self.fake.keys = None
        self.fake.usedToday[ALPHA.token] = 3
        probe = self.probe(atStart=True)
        self.successResultOf(probe.done)
        self.assertEqual(self.pool.requestCounts(), {"alpha": 3, "beta": 0})
        self.fake.usedToday[ALPHA.token] = 5
        self.clock.advance(DRIFT_INTERVAL)
        self.assertEqual(self.pool.requestCounts(), {"alpha": 5, "beta": 0})
        self.assertEqual(len(self.fake.received), 4)

    def test_atMostThreeInFlight(self):
        """
        At most three probes are in flight at once; the next start as those
        end (here, given up after the timeout).
        """
        keys = [Key(f"key{i}", f"sk-or-v1-probe-test-{i}-5f6a") for i in range(5)]
        self.pool = KeyPool(keys, reactor=self.clock)
        for key in keys:
            self.pool.report(key, REFUSED)
        agent = _SilentAgent()
        self.probe(agent)
        self.clock.advance(INTERVAL)
        self.assertEqual(len(agent.uris), 3)
        self.clock.advance(TIMEOUT)
        self.assertEqual(len(agent.uris), 5)
        self.assertEqual(agent.cancelled, 3)

    def test_stopStopsProbing(self):
        """
        Stopping the service cancels the probes in flight and leaves no call
        waiting.
        """
        self.pool.report(BETA, REFUSED)
        agent = _SilentAgent()
        probe = KeyProbe(
            self.pool, Upstream(b"https://upstream.test", agent), atStart=False,
            interval=INTERVAL, timeout=TIMEOUT, reactor=self.clock,
        )
        probe.startService()
        self.clock.advance(INTERVAL)
        self.assertEqual(len(agent.uris), 1)
        probe.stopService()
        self.assertEqual(agent.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.states()["beta"].state, State.DISABLED)


class BackgroundProbeInMemoryTests(SynchronousTestCase):
    """
    The prober hermux's wiring builds, on the memory network.
    """

    def test_refusedKeyComesBackInKeysPage(self):
        """
        With the default --probe-interval, a key disabled by a 401 is shown
        ready again by /hermux/keys once the upstream accepts it.
        """
        proxy = MemoryProxy(self)
        alpha, beta, gamma = KEYS
        probe = dict(proxy.components.services)["probe"]
        probe.startService()
        self.addCleanup(probe.stopService)
        self.assertEqual(proxy.fake.received, [])
        proxy.pool.report(gamma, REFUSED)
        self.assertEqual(self.keyStates(proxy)["gamma"], "disabled")
        proxy.advance(INTERVAL)
        self.assertEqual(self.keyStates(proxy)["gamma"], "ready")
        self.assertEqual([r.uri for r in proxy.fake.received], [b"/api/v1/key"])

    def keyStates(self, proxy) -> dict[str, str]:
        response, body = proxy.respond("GET", "/hermux/keys")
        self.assertEqual(response.code, 200)
        return {key["name"]: key["state"] for key in json.loads(body)["keys"]}
