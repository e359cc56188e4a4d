"""
Tests for L{hermux.probe.KeyProbe} in memory: an upstream that answers (the
fake OpenRouter over L{RequestTraversalAgent}) or never does, and a
L{Clock} for the timeout.
"""

from __future__ import annotations

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent
from zope.interface import implementer

from hermux.config import Key
from hermux.keypool import KeyPool, State
from hermux.probe import KeyProbe
from hermux.testing import FakeOpenRouter
from hermux.upstream import Upstream

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
