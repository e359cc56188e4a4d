# -*- test-case-name: tests.test_accounting -*-
"""
Usage accounting end to end, over loopback, against the fake OpenRouter:
what hermux counts per key, client and model equals what the upstream
reported, in every API shape, compressed or not, and after a restart.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from decimal import Decimal

from twisted.internet import reactor
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import TestCase

from hermux.keypool import NANOCREDITS, dayOf
from hermux.ledger import SQLiteLedger, dayText
from tests.harness import ACCESS_TOKEN, KEYS, Proxy, waitUntil

PAID = "openai/gpt-4o-mini"
FREE = "meta-llama/llama-3.3-70b-instruct:free"
JSON = {"Content-Type": "application/json"}


def nanocredits(cost: Decimal) -> int:
    return int((cost * NANOCREDITS).to_integral_value())


class AccountingTests(TestCase):
    def setUp(self):
        self.path = os.path.abspath(self.mktemp())

    def startLedger(self) -> SQLiteLedger:
        ledger = SQLiteLedger(self.path, interval=0.05)
        ledger.startService()
        self.addCleanup(lambda: ledger.running and ledger.stopService())
        return ledger

    async def send(self, proxy, path, body, headers=JSON) -> bytes:
        response = await proxy.request("POST", path, headers=headers, data=json.dumps(body).encode())
        content = await response.content()
        self.assertEqual(response.code, 200, content[:200])
        return content

    async def sendEveryShape(self, proxy) -> None:
        """
        One request of each API shape, streamed and not, free and paid, one
        of them compressed.
        """
        for stream in (False, True):
            for model in (PAID, FREE):
                await self.send(proxy, "/api/v1/chat/completions", {
                    "model": model, "stream": stream,
                    "messages": [{"role": "user", "content": "Hi"}],
                })
            await self.send(proxy, "/v1/completions", {"model": PAID, "prompt": "Hi", "stream": stream})
            await self.send(proxy, "/api/v1/responses", {"model": PAID, "input": "Hi", "stream": stream})
            await self.send(proxy, "/api/v1/messages", {
                "model": "anthropic/claude-sonnet-4", "max_tokens": 20, "stream": stream,
                "messages": [{"role": "user", "content": "Hi"}],
            })
        # The same request four times over three keys: at least one key
        # sends it twice, and its second answer reads tokens from the cache.
        for _ in range(4):
            await self.send(proxy, "/api/v1/chat/completions", {
                "model": PAID, "messages": [{"role": "user", "content": "Hi"}],
            })
        # treq asks for gzip and decodes it; the fake compresses what it may.
        decoded = await self.send(
            proxy, "/api/v1/chat/completions",
            {"model": PAID, "stream": True, "messages": [{"role": "user", "content": "Hi"}]},
            headers={**JSON, "Accept-Encoding": "gzip"},
        )
        self.assertIn(b"data: [DONE]", decoded)
        self.assertEqual(proxy.fake.received[-1].headers.getRawHeaders(b"accept-encoding"), [b"gzip"])

    def reportedTotals(self, proxy) -> dict:
        reported = proxy.fake.reported
        return {
            "prompt_tokens": sum(r.promptTokens for r in reported),
            "completion_tokens": sum(r.completionTokens for r in reported),
            "reasoning_tokens": sum(r.reasoningTokens for r in reported),
            "cached_tokens": sum(r.cachedTokens for r in reported),
            "cost": nanocredits(sum((r.cost for r in reported), Decimal(0))),
        }

    async def usage(self, proxy, query="group_by=key,client,model") -> dict:
        response = await proxy.request("GET", "/hermux/usage?" + query)
        self.assertEqual(response.code, 200)
        return json.loads(await response.content())

    def assertTotalsMatch(self, report, expected, requests):
        totals = report["totals"]
        for name, value in expected.items():
            if name == "cost":
                self.assertEqual(round(totals["cost"] * NANOCREDITS), value)
            else:
                self.assertEqual(totals[name], value, name)
        self.assertEqual(totals["requests"], requests)

    async def test_totalsEqualWhatTheUpstreamReported(self):
        """
        After requests in every shape, /hermux/usage's totals equal the sum
        of what the fake reported, by key and by model too, and again after
        hermux restarts on the same state file.
        """
        ledger = self.startLedger()
        proxy = Proxy(self, ledger=ledger)
        await self.sendEveryShape(proxy)
        expected = self.reportedTotals(proxy)
        self.assertEqual(len(proxy.fake.reported), 15)
        self.assertGreater(expected["cost"], 0)
        self.assertGreater(expected["reasoning_tokens"], 0)
        self.assertGreater(expected["cached_tokens"], 0)

        report = await self.usage(proxy)
        self.assertTotalsMatch(report, expected, requests=15)
        nameOf = {key.token: key.name for key in KEYS}
        byKey = Counter()
        for r in proxy.fake.reported:
            byKey[nameOf[r.key]] += nanocredits(r.cost)
        for status in proxy.pool.statuses():
            self.assertEqual(status.costToday, byKey[status.name], status.name)
        models = {row["model"] for row in report["rows"]}
        self.assertEqual(models, {r.model for r in proxy.fake.reported})
        free = sum(row["free_requests"] for row in report["rows"])
        self.assertEqual(free, 2)

        await ledger.stopService()
        restarted = Proxy(self, ledger=self.startLedger())
        self.assertTotalsMatch(await self.usage(restarted), expected, requests=15)
        self.assertEqual(
            {s.name: s.costToday for s in restarted.pool.statuses()},
            {s.name: s.costToday for s in proxy.pool.statuses()},
        )

    async def test_groupingsAgree(self):
        """
        Whatever the grouping, the totals are the same, and the rows are
        sorted by the grouping columns.
        """
        proxy = Proxy(self, ledger=self.startLedger())
        await self.sendEveryShape(proxy)
        reports = [
            await self.usage(proxy, "group_by=" + groupBy)
            for groupBy in ("day,key", "key", "client", "model", "day", "model,key")
        ]
        for report in reports[1:]:
            self.assertEqual(report["totals"], reports[0]["totals"])
        today = dayText(dayOf(reactor.seconds()))
        self.assertEqual((reports[0]["from"], reports[0]["to"]), (today, today))
        byModelKey = [(row["model"], row["key"]) for row in reports[-1]["rows"]]
        self.assertEqual(byModelKey, sorted(byModelKey))

    async def test_clientCostInMetricsAndLog(self):
        """
        Tokens and cost appear in the metrics by key and by client, and in
        the request's log line, never with the access token.
        """
        proxy = Proxy(self)
        with capturedLogs() as events:
            await self.send(proxy, "/api/v1/chat/completions", {
                "model": PAID, "messages": [{"role": "user", "content": "Hi"}],
            })
            await waitUntil(lambda: any("requestId" in e for e in events))
        [reported] = proxy.fake.reported
        response = await proxy.request("GET", "/hermux/metrics")
        metrics = (await response.content()).decode()
        client = proxy.access.lookup(f"Bearer {ACCESS_TOKEN}".encode()).client.label
        self.assertIn(f'hermux_client_requests_total{{client="{client}"}} 1.0', metrics)
        self.assertIn(f'hermux_client_cost_total{{client="{client}"}} {float(reported.cost)}', metrics)
        self.assertIn(f'kind="prompt"}} {float(reported.promptTokens)}', metrics)
        self.assertNotIn(PAID, metrics)
        [line] = [formatEvent(e) for e in events if "requestId" in e]
        self.assertIn(f"model {PAID}, {reported.promptTokens}+{reported.completionTokens} tokens", line)
        self.assertIn(f"cost {reported.cost.normalize()}", line)
        self.assertNotIn(ACCESS_TOKEN, line)
