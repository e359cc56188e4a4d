"""
Named clients end to end: hermux on the fake OpenRouter, with clients whose
limits, models and keys are checked before anything is forwarded.
"""

from __future__ import annotations

import json
import math
import os

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from hermux.config import ClientEntry, Role
from hermux.keypool import dayOf, nextMidnight
from tests.harness import CHAT, KEYS, Proxy, chatBody, waitUntil

ALPHA, BETA, GAMMA = KEYS
BOT_TOKEN = "hx-e2e-ci-bot-token-5c2a9d"
OTHER_TOKEN = "hx-e2e-other-token-8f1b3e"
TEAM_TOKEN = "hx-e2e-team-token-3d7e0a"
BOT = ClientEntry(name="ci-bot", token=BOT_TOKEN, dailyRequests=3)
OTHER = ClientEntry(name="other", token=OTHER_TOKEN)
TEAM = ClientEntry(name="team", token=TEAM_TOKEN, keys=("beta",), models=("*:free", "openai/*"))


def writeClients(path: str, lines: list[str]) -> None:
    with open(path, "w") as f:
        f.write("name,token,role,daily_requests,max_parallel\n")
        f.write("\n".join(lines) + "\n")


class ClientsEndToEndTests(TestCase):
    def setUp(self):
        self.proxy = Proxy(self, clients=(BOT, OTHER, TEAM))

    async def chat(self, token, **extra):
        response = await self.proxy.request(
            "POST", CHAT, token=token, headers={"Content-Type": "application/json"},
            data=chatBody(**extra),
        )
        body = await response.content()
        return response, body

    async def me(self, token) -> dict:
        response = await self.proxy.request("GET", "/hermux/me", token=token)
        self.assertEqual(response.code, 200)
        return json.loads(await response.content())

    async def test_dailyRequests(self):
        """
        A client with C{daily_requests=3} gets three answers, then 429 with a
        C{Retry-After} that ends at 00:00 UTC, forwarding nothing; another
        client is unaffected.  The ledger and C{/hermux/me} know the client
        by its name.
        """
        for _ in range(3):
            response, _ = await self.chat(BOT_TOKEN)
            self.assertEqual(response.code, 200)
        self.assertEqual(len(self.proxy.fake.received), 3)
        before = reactor.seconds()
        response, body = await self.chat(BOT_TOKEN)
        after = reactor.seconds()
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders("X-Hermux-Error"), ["429"])
        self.assertIn("daily_requests limit of 3", json.loads(body)["error"]["message"])
        [retryAfter] = response.headers.getRawHeaders("Retry-After")
        self.assertGreaterEqual(int(retryAfter), math.ceil(nextMidnight(after) - after))
        self.assertLessEqual(int(retryAfter), math.ceil(nextMidnight(before) - before))
        self.assertEqual(len(self.proxy.fake.received), 3)
        for _ in range(5):
            response, _ = await self.chat(OTHER_TOKEN)
            self.assertEqual(response.code, 200)
        self.assertEqual(len(self.proxy.fake.received), 8)
        me = await self.me(BOT_TOKEN)
        self.assertEqual((me["today"]["requests"], me["remaining"]["requests"]), (3, 0))
        self.assertGreater(me["today"]["prompt_tokens"], 0)
        usage = self.proxy.ledger.clientUsage(dayOf(reactor.seconds()))
        self.assertEqual((usage["ci-bot"].requests, usage["other"].requests), (3, 5))
        refused = self.proxy.metrics.registry.get_sample_value(
            "hermux_requests_total", {"key": "none", "status": "4xx"}
        )
        self.assertEqual(refused, 1)

    async def test_modelsAndKeys(self):
        """
        A client limited to some models gets 403 for another, forwarding
        nothing; one limited to some keys is served by those only, and when
        they cannot serve it gets the 429 it would get if they were the
        whole pool, while others are still served.
        """
        response, body = await self.chat(TEAM_TOKEN, model="anthropic/claude-3-opus")
        self.assertEqual(response.code, 403)
        self.assertEqual(
            json.loads(body),
            {"error": {"code": 403, "message": "model 'anthropic/claude-3-opus' is not allowed for this access token"}},
        )
        self.assertEqual(self.proxy.fake.received, [])
        for _ in range(3):
            response, _ = await self.chat(TEAM_TOKEN, model="openai/gpt-4o")
            self.assertEqual(response.headers.getRawHeaders("X-Token-Name"), ["beta"])
        self.proxy.fake.platformLimitNext(key=BETA.token, times=None)
        response, body = await self.chat(TEAM_TOKEN, model="meta-llama/llama-3.3-70b-instruct:free")
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders("X-Hermux-Error"), ["429"])
        self.assertEqual(len(self.proxy.fake.received), 4)
        response, _ = await self.chat(OTHER_TOKEN, model="meta-llama/llama-3.3-70b-instruct:free")
        self.assertEqual(response.code, 200)
        self.assertIn(response.headers.getRawHeaders("X-Token-Name")[0], ("alpha", "gamma"))

    async def test_userSeesOnlyItsOwn(self):
        """
        A user token is forwarded and sees its own usage, but not the keys.
        """
        await self.chat(BOT_TOKEN)
        await self.chat(OTHER_TOKEN)
        response = await self.proxy.request("GET", "/hermux/keys", token=BOT_TOKEN)
        self.assertEqual(response.code, 403)
        await response.content()
        response = await self.proxy.request("GET", "/hermux/usage?group_by=client", token=BOT_TOKEN)
        rows = json.loads(await response.content())["rows"]
        self.assertEqual([row["client"] for row in rows], ["ci-bot"])


class ClientsReloadTests(TestCase):
    def setUp(self):
        self.clientsPath = os.path.abspath(self.mktemp())
        writeClients(self.clientsPath, [f"ci-bot,{BOT_TOKEN},user,,1"])
        self.tokensPath = os.path.abspath(self.mktemp())
        with open(self.tokensPath, "w") as f:
            f.write("name,token\n" + "".join(f"{k.name},{k.token}\n" for k in KEYS))
        from hermux.config import loadClients

        self.proxy = Proxy(
            self,
            clients=loadClients(self.clientsPath),
            clientsPath=self.clientsPath,
            tokensPath=self.tokensPath,
            allowPath=None,
            accessTokens=(),
            eventInterval=0.05,
        )

    async def stream(self):
        response = await self.proxy.request(
            "POST", CHAT, token=BOT_TOKEN, headers={"Content-Type": "application/json"},
            data=chatBody(stream=True),
        )
        return response

    async def test_limitReloadedInFlight(self):
        """
        A reload that changes C{max_parallel} while requests are in flight
        applies to the next request, the ones in flight counting toward it;
        today's count stays with the client's name.
        """
        first = await self.stream()
        self.assertEqual(first.code, 200)
        refused = await self.stream()
        self.assertEqual(refused.code, 429)
        self.assertIn(b"max_parallel limit of 1", await refused.content())
        writeClients(self.clientsPath, [f"ci-bot,{BOT_TOKEN},user,5,2"])
        self.assertTrue(await self.proxy.reloader.reload())
        second = await self.stream()
        self.assertEqual(second.code, 200)
        third = await self.stream()
        self.assertEqual(third.code, 429)
        await third.content()
        await first.content()
        await second.content()
        await waitUntil(lambda: self.proxy.clients.today("ci-bot")[0] == 2)
        last = await self.stream()
        self.assertEqual(last.code, 200)
        await last.content()
        writeClients(self.clientsPath, [f"ci-bot,{BOT_TOKEN},user,3,2"])
        self.assertTrue(await self.proxy.reloader.reload())
        response = await self.stream()
        self.assertEqual(response.code, 429)
        self.assertIn(b"daily_requests limit of 3", await response.content())

    async def test_badReloadKeepsTheLimits(self):
        """
        A clients.csv with an error is rejected whole: the limits in force
        stay.
        """
        writeClients(self.clientsPath, [f"ci-bot,{BOT_TOKEN},user,5,many"])
        self.assertFalse(await self.proxy.reloader.reload())
        first = await self.stream()
        refused = await self.stream()
        self.assertEqual((first.code, refused.code), (200, 429))
        await refused.content()
        await first.content()


del Role
