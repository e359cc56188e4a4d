"""
Usage counts survive what a long-running daemon meets: being killed with
SIGKILL under load, and a state file that stops taking writes.
"""

from __future__ import annotations

import json
import os
import sqlite3

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.logger import capturedLogs
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from hermux.keypool import dayOf
from hermux.ledger import SQLiteLedger
from tests.harness import DEMO_TOKEN, Proxy, runTwistd, sleep, waitUntil


class KillTests(TestCase):
    timeout = 120

    def spawn(self, state: str):
        return runTwistd(
            self,
            "-n", "hermux", "--demo", "--tokens", "tokens.csv.example",
            "--allow", "allow.txt.example", "--state", state,
            "--listen", "tcp:0:interface=127.0.0.1",
        )

    async def port(self, child) -> int:
        port = await child.port()
        await waitUntil(lambda: b"DEMO MODE" in child.output, timeout=30)
        return port

    def client(self) -> HTTPClient:
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        return HTTPClient(Agent(reactor, pool=pool))

    async def test_killedUnderLoad(self):
        """
        After SIGKILL in the middle of a load, the restarted hermux opens the
        same state file, which is intact, with every request answered more
        than a second (and a half, for scheduling slack) before the kill
        counted, and none counted twice.
        """
        state = os.path.abspath(self.mktemp())
        child = self.spawn(state)
        port = await self.port(child)
        client = self.client()
        answeredAt = []
        headers = {"Authorization": f"Bearer {DEMO_TOKEN}"}

        async def load():
            while child.pid is not None:
                try:
                    response = await client.get(f"http://127.0.0.1:{port}/v1/models", headers=headers)
                    await response.content()
                except Exception:
                    return
                if response.code == 200:
                    answeredAt.append(reactor.seconds())

        from twisted.internet.defer import ensureDeferred

        loads = [ensureDeferred(load()) for _ in range(4)]
        await waitUntil(lambda: answeredAt, timeout=30)
        await sleep(3.0)
        killedAt = reactor.seconds()
        child.kill("KILL")
        await child.ended.addErrback(lambda _: None)
        for d in loads:
            await d
        check = sqlite3.connect(state)
        self.assertEqual(check.execute("PRAGMA integrity_check").fetchone()[0], "ok")
        check.close()

        child = self.spawn(state)
        port = await self.port(child)
        response = await client.get(f"http://127.0.0.1:{port}/hermux/keys", headers=headers)
        keys = json.loads(await response.content())["keys"]
        counted = sum(key["requests_today"] for key in keys)
        surelyWritten = sum(1 for t in answeredAt if t < killedAt - 1.5)
        self.assertGreater(surelyWritten, 100)
        self.assertGreaterEqual(counted, surelyWritten)
        self.assertLessEqual(counted, len(answeredAt) + 4)
        child.kill("TERM")
        await child.ended


class UnwritableStateTests(TestCase):
    async def test_keepsProxyingAndReportsIt(self):
        """
        While the state file takes no writes, hermux keeps proxying and
        counting, logs the error once a minute at most, says "degraded" in
        /hermux/health, and writes everything once it can again.
        """
        ledger = SQLiteLedger(os.path.abspath(self.mktemp()), interval=0.05)
        ledger.startService()
        self.addCleanup(ledger.stopService)
        proxy = Proxy(self, ledger=ledger)
        ledger._connection.execute("PRAGMA query_only = ON")
        with capturedLogs() as events:
            for _ in range(5):
                response = await proxy.chat()
                await response.content()
                self.assertEqual(response.code, 200)
                await sleep(0.1)
        errors = [e for e in events if "cannot write the state file" in str(e.get("problem"))]
        self.assertEqual(len(errors), 1)
        response = await proxy.request("GET", "/hermux/health", token=None)
        health = json.loads(await response.content())
        self.assertEqual(response.code, 200)
        self.assertEqual(health["status"], "degraded")
        self.assertNotIn(ledger.path, json.dumps(health))

        ledger._connection.execute("PRAGMA query_only = OFF")
        await waitUntil(lambda: ledger.problem is None)
        response = await proxy.request("GET", "/hermux/health", token=None)
        self.assertEqual(json.loads(await response.content())["status"], "ok")
        check = sqlite3.connect(ledger.path)
        self.addCleanup(check.close)
        for table in ("key_usage", "client_usage", "model_usage", "usage"):
            stored = check.execute(f"SELECT sum(requests) FROM {table}").fetchone()[0]
            self.assertEqual(stored, 5, table)
        self.assertEqual(sum(u.requests for u in ledger.keyUsage(dayOf(reactor.seconds())).values()), 5)
