"""
hermux end to end, over real loopback sockets, against the fake OpenRouter.
"""

from __future__ import annotations

import json
import os
import socket

import treq
from twisted.internet import reactor
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseFailed

from hermux.requestlog import RequestLogFile
from hermux.testing import FAKE_ANSWER
from tests.harness import (
    ACCESS_TOKEN,
    CHAT,
    KEYS,
    SECRETS,
    Proxy,
    chatBody,
    closedFreePort,
    issueCertificates,
    sleep,
    statusOf,
    waitUntil,
)

KEY_NAMES = {key.name for key in KEYS}
TOKEN_BY_NAME = {key.name: key.token for key in KEYS}


class RelayTests(TestCase):
    """
    Requests and their answers pass through hermux with the key swapped.
    """

    async def test_chatCompletionIsRelayed(self):
        """
        A non-streaming chat completion comes back as the upstream sent it,
        with the name of the key that served it.
        """
        proxy = Proxy(self)
        response = await proxy.chat()
        body = json.loads(await response.content())
        self.assertEqual(response.code, 200)
        self.assertEqual(body["choices"][0]["message"]["content"], FAKE_ANSWER)
        [name] = response.headers.getRawHeaders("X-Token-Name")
        self.assertIn(name, KEY_NAMES)
        self.assertEqual(
            response.headers.getRawHeaders("Content-Type"), ["application/json"]
        )

    async def test_upstreamSeesOnlyTheKey(self):
        """
        The upstream gets the chosen key as the only credential: never the
        client's access token or cookies.
        """
        proxy = Proxy(self)
        response = await proxy.request(
            "POST",
            CHAT,
            headers={
                "Content-Type": "application/json",
                "Cookie": "session=abc",
                "HTTP-Referer": "https://example.test/app",
                "X-Title": "hermux tests",
            },
            data=chatBody(),
        )
        await response.content()
        [received] = proxy.fake.received
        name = response.headers.getRawHeaders("X-Token-Name")[0]
        self.assertEqual(
            received.headers.getRawHeaders(b"Authorization"),
            [f"Bearer {TOKEN_BY_NAME[name]}".encode()],
        )
        everything = repr(list(received.headers.getAllRawHeaders())).encode()
        self.assertNotIn(ACCESS_TOKEN.encode(), everything)
        self.assertIsNone(received.headers.getRawHeaders(b"Cookie"))
        self.assertEqual(
            received.headers.getRawHeaders(b"HTTP-Referer"), [b"https://example.test/app"]
        )
        self.assertEqual(received.headers.getRawHeaders(b"X-Title"), [b"hermux tests"])
        self.assertEqual(received.body, chatBody())

    async def test_keysRotate(self):
        """
        Consecutive requests are spread over all keys, least-used first.
        """
        proxy = Proxy(self)
        names = []
        for _ in range(6):
            response = await proxy.request("GET", "/api/v1/models")
            await response.content()
            names.extend(response.headers.getRawHeaders("X-Token-Name"))
        self.assertEqual(sorted(names), sorted(2 * list(KEY_NAMES)))
        self.assertEqual(set(names[:3]), KEY_NAMES)

    async def test_v1Alias(self):
        """
        /v1/... is forwarded as /api/v1/..., with the query string as sent.
        """
        proxy = Proxy(self)
        response = await proxy.request("GET", "/v1/models?supported_parameters=tools&x=%20y")
        await response.content()
        self.assertEqual(response.code, 200)
        [received] = proxy.fake.received
        self.assertEqual(received.uri, b"/api/v1/models?supported_parameters=tools&x=%20y")

    async def test_upstreamErrorsPassThrough(self):
        """
        An upstream error status and body reach the client unchanged, with
        X-Token-Name; the upstream's cookies do not.
        """
        proxy = Proxy(self)
        proxy.fake.answerNext(
            400,
            {"error": {"code": 400, "message": "bad model"}},
            headers={"Set-Cookie": "__cf_bm=tracking", "X-Upstream": "yes"},
        )
        response = await proxy.chat()
        self.assertEqual(response.code, 400)
        self.assertEqual(
            json.loads(await response.content()),
            {"error": {"code": 400, "message": "bad model"}},
        )
        self.assertEqual(response.headers.getRawHeaders("X-Upstream"), ["yes"])
        self.assertIsNone(response.headers.getRawHeaders("Set-Cookie"))
        self.assertIn(response.headers.getRawHeaders("X-Token-Name")[0], KEY_NAMES)

    async def test_upstreamConnectionsAreReused(self):
        """
        Sequential requests travel over one persistent upstream connection.
        """
        proxy = Proxy(self)
        for _ in range(4):
            response = await proxy.chat()
            await response.content()
        self.assertEqual(len({received.peer for received in proxy.fake.received}), 1)

    async def test_healthNeedsNoToken(self):
        proxy = Proxy(self)
        response = await proxy.request("GET", "/hermux/health", token=None)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("Server"), ["hermux"])
        health = json.loads(await response.content())
        self.assertEqual(
            {name: health[name] for name in ("status", "keys", "keys_ready")},
            {"status": "ok", "keys": 3, "keys_ready": 3},
        )


class StreamingTests(TestCase):
    """
    Server-sent events are relayed one by one as they arrive.
    """

    async def test_eventsArriveOneByOne(self):
        """
        Each event reaches the client before the upstream has produced the
        next one: nothing is buffered on the way.
        """
        clock = Clock()
        proxy = Proxy(self, eventClock=clock, eventInterval=1.0)
        response = await proxy.chat(stream=True)
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["text/event-stream"])
        received = []
        done = treq.collect(response, received.append)

        def events():
            return b"".join(received).count(b"\n\n")

        await waitUntil(lambda: events() == 1)
        for produced in range(2, 20):
            clock.advance(1.0)
            if done.called:
                break
            await waitUntil(lambda: events() == produced or done.called)
        await done
        stream = b"".join(received)
        self.assertTrue(stream.startswith(b": OPENROUTER PROCESSING\n\n"))
        self.assertTrue(stream.endswith(b"data: [DONE]\n\n"))
        words = [
            json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            for line in stream.split(b"\n\n")
            if line.startswith(b"data: {")
        ]
        self.assertEqual("".join(words), FAKE_ANSWER)

    async def test_midStreamDropIsVisible(self):
        """
        An upstream that dies mid-stream leaves the client with a truncated
        response that fails to complete, never a complete-looking one.
        """
        proxy = Proxy(self)
        proxy.fake.dropNext(afterEvents=3)
        response = await proxy.chat(stream=True)
        self.assertEqual(response.code, 200)
        received = []
        failure = await self.assertFailure(treq.collect(response, received.append), ResponseFailed)
        self.assertTrue(failure)
        stream = b"".join(received)
        self.assertEqual(stream.count(b"\n\n"), 3)
        self.assertNotIn(b"[DONE]", stream)


class _Reader(Protocol):
    """
    Reads a response body, or not: C{transport} pauses and resumes it.
    """

    def __init__(self):
        self.received = 0
        self.finished = None

    def dataReceived(self, data):
        self.received += len(data)

    def connectionLost(self, reason):
        self.finished = reason


class FlowTests(TestCase):
    """
    A slow client slows the upstream down; a client that leaves aborts it.
    """

    async def test_slowClientPausesUpstream(self):
        """
        While the client reads nothing, the upstream is paused after at most
        a few socket buffers' worth, and it resumes when the client does.
        """
        proxy = Proxy(self)
        proxy.fake.floodNext(None)
        response = await proxy.chat()
        reader = _Reader()
        response.deliverBody(reader)
        # Not in connectionMade: the agent resumes the transport after it.
        reader.transport.pauseProducing()
        last = -1
        for _ in range(20):
            if proxy.fake.flooded == last:
                break
            last = proxy.fake.flooded
            await sleep(0.3)
        else:
            self.fail(f"the upstream never paused: {last} bytes sent and counting")
        # The chain holds a few socket buffers, not the whole (endless) body.
        self.assertLess(proxy.fake.flooded, 64 * 1024 * 1024)
        # A paused client receives nothing (beyond what was read before the
        # pause took effect) and the upstream stays paused.
        heldAt = reader.received
        await sleep(0.3)
        self.assertEqual(reader.received, heldAt)
        self.assertEqual(proxy.fake.flooded, last)
        reader.transport.resumeProducing()
        await waitUntil(lambda: proxy.fake.flooded > last + 8 * 1024 * 1024)
        self.assertGreater(reader.received, heldAt)
        [received] = proxy.fake.received
        reader.transport.stopProducing()
        await received.lost

    async def test_clientLeavingMidBodyAbortsUpstream(self):
        """
        A client that disconnects mid-response makes hermux abort the
        upstream request within a second.
        """
        proxy = Proxy(self)
        proxy.fake.floodNext(None)
        response = await proxy.chat()
        reader = _Reader()
        response.deliverBody(reader)
        await waitUntil(lambda: reader.received > 100_000)
        [received] = proxy.fake.received
        left = reactor.seconds()
        reader.transport.stopProducing()
        await received.lost
        self.assertLess(reactor.seconds() - left, 1.0)

    async def test_clientLeavingBeforeAnswerAbortsUpstream(self):
        """
        A client that gives up before the upstream answers makes hermux
        abort the upstream request within a second.
        """
        proxy = Proxy(self)
        proxy.fake.stallNext()
        pending = proxy.chat()
        await waitUntil(lambda: proxy.fake.received)
        left = reactor.seconds()
        pending.addErrback(lambda _: None)
        pending.cancel()
        await proxy.fake.received[0].lost
        self.assertLess(reactor.seconds() - left, 1.0)


class RefusalTests(TestCase):
    """
    What hermux refuses is never sent upstream.
    """

    async def test_missingToken(self):
        proxy = Proxy(self)
        response = await proxy.request("GET", "/api/v1/models", token=None)
        self.assertEqual(response.code, 401)
        self.assertEqual(response.headers.getRawHeaders("WWW-Authenticate"), ["Bearer"])
        body = json.loads(await response.content())
        self.assertEqual(body["error"]["code"], 401)
        self.assertEqual(proxy.fake.received, [])

    async def test_unknownToken(self):
        proxy = Proxy(self)
        response = await proxy.request("POST", CHAT, token=ACCESS_TOKEN + "x", data=chatBody())
        self.assertEqual(response.code, 401)
        body = await response.content()
        self.assertNotIn(ACCESS_TOKEN.encode(), body)
        self.assertEqual(proxy.fake.received, [])

    async def test_bareTokenIsAccepted(self):
        proxy = Proxy(self)
        response = await proxy.request(
            "GET", "/api/v1/models", token=None, headers={"Authorization": ACCESS_TOKEN}
        )
        await response.content()
        self.assertEqual(response.code, 200)

    async def test_otherPathsAreNotFound(self):
        proxy = Proxy(self)
        for path in ("/", "/openai/v1/models", "/hermux/nothing", "/hermux/static/nothing.js", "/apiv1"):
            response = await proxy.request("GET", path)
            self.assertEqual(response.code, 404, path)
            self.assertEqual(json.loads(await response.content())["error"]["code"], 404)
        self.assertEqual(proxy.fake.received, [])

    async def test_bodyOverLimit(self):
        """
        A body over --max-body gets 413 before anything is sent upstream.
        """
        proxy = Proxy(self, maxBody=1000)
        response = await proxy.request("POST", CHAT, data=b"x" * 1001)
        self.assertEqual(response.code, 413)
        self.assertEqual(json.loads(await response.content())["error"]["code"], 413)
        response = await proxy.request("POST", CHAT, data=b"x" * 1000)
        await response.content()
        self.assertEqual(response.code, 400)  # the fake's answer to a non-JSON body
        self.assertEqual(len(proxy.fake.received), 1)

    async def test_chunkedBodyOverLimit(self):
        """
        A chunked body is cut off at --max-body too.
        """
        proxy = Proxy(self, maxBody=1000)
        chunk = b"x" * 600
        answer = await proxy.raw(
            b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: h\r\n"
            b"Authorization: Bearer " + ACCESS_TOKEN.encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            + (b"258\r\n" + chunk + b"\r\n") * 2
            + b"0\r\n\r\n"
        )
        self.assertEqual(statusOf(answer), 413)
        self.assertEqual(proxy.fake.received, [])


class TargetTests(TestCase):
    """
    Nothing a client sends changes where a request goes.
    """

    async def _raw(self, proxy, target: bytes, extra: bytes = b"") -> bytes:
        return await proxy.raw(
            b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer " + ACCESS_TOKEN.encode() + b"\r\n"
            + extra + b"Connection: close\r\n\r\n"
        )

    async def test_absoluteFormTarget(self):
        """
        An absolute-form target is routed by its path, to the configured
        upstream: its host decides nothing.
        """
        proxy = Proxy(self)
        answer = await self._raw(proxy, b"http://evil.example/api/v1/models")
        self.assertEqual(statusOf(answer), 200)
        self.assertEqual([r.uri for r in proxy.fake.received], [b"/api/v1/models"])

    async def test_hostHeader(self):
        """
        A Host header naming another host is not used: the request still
        goes to the configured upstream, with its own Host.
        """
        proxy = Proxy(self)
        answer = await proxy.raw(
            b"GET /api/v1/models HTTP/1.1\r\nHost: evil.example\r\n"
            b"Authorization: Bearer " + ACCESS_TOKEN.encode() + b"\r\n"
            b"Connection: close\r\n\r\n"
        )
        self.assertEqual(statusOf(answer), 200)
        [received] = proxy.fake.received
        self.assertEqual(
            received.headers.getRawHeaders(b"Host"),
            [b"127.0.0.1:%d" % (proxy.fakePort.getHost().port,)],
        )

    async def test_trickyTargets(self):
        """
        Targets that try to leave /api/ or to smuggle a host or a header are
        refused (400) or not found (404), and never forwarded.
        """
        proxy = Proxy(self)
        for target in (
            b"//evil.example/api/v1/models",
            b"/api/../hermux/health",
            b"/api/v1/%2e%2e/%2e%2e/admin",
            b"/v1/..%2f..%2fadmin",
            b"/api%2fv1/models",
            b"/api/v1/models%0d%0aX-Injected:%20yes",
            b"/api/v1//models",
            b"/api/v1/models\\..\\..\\x",
            b"@evil.example/api/v1/models",
        ):
            answer = await self._raw(proxy, target)
            self.assertIn(statusOf(answer), (400, 404), target)
        self.assertEqual(proxy.fake.received, [])

    async def test_atSignStaysInThePath(self):
        """
        An '@' in the path is only a path character: the request goes to the
        configured upstream.
        """
        proxy = Proxy(self)
        answer = await self._raw(proxy, b"/api/v1/models/@evil.example")
        self.assertEqual(statusOf(answer), 404)  # the fake knows no such model path
        [received] = proxy.fake.received
        self.assertEqual(received.uri, b"/api/v1/models/@evil.example")

    async def test_headerInjection(self):
        """
        CR or LF inside a header value cannot add a header upstream.
        """
        proxy = Proxy(self)
        answer = await self._raw(proxy, b"/api/v1/models", b"X-Title: a\rX-Injected: yes\r\n")
        self.assertEqual(statusOf(answer), 400)
        self.assertEqual(proxy.fake.received, [])


class UpstreamFaultTests(TestCase):
    """
    Upstream faults reach the client as OpenRouter-shaped errors without
    internals.
    """

    def assertCleanError(self, body: bytes, code: int):
        error = json.loads(body)["error"]
        self.assertEqual(error["code"], code)
        for word in ("Traceback", "twisted", "Error(", "127.0.0.1", "sk-or"):
            self.assertNotIn(word, error["message"])

    async def test_refused(self):
        proxy = Proxy(self, upstreamBase=b"http://127.0.0.1:%d" % (closedFreePort(),))
        response = await proxy.chat()
        self.assertEqual(response.code, 502)
        self.assertCleanError(await response.content(), 502)
        self.assertIn(response.headers.getRawHeaders("X-Token-Name")[0], KEY_NAMES)

    async def test_connectTimeout(self):
        """
        An upstream that never accepts the connection gets 504 after
        --connect-timeout.
        """
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        # Fill the accept queue, so that further connection attempts hang.
        for _ in range(3):
            filler = socket.socket()
            self.addCleanup(filler.close)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        proxy = Proxy(self, upstreamBase=b"http://127.0.0.1:%d" % (port,), connectTimeout=0.3)
        started = reactor.seconds()
        response = await proxy.chat()
        self.assertEqual(response.code, 504)
        self.assertCleanError(await response.content(), 504)
        self.assertLess(reactor.seconds() - started, 3.0)

    async def test_stalledUpstream(self):
        """
        An upstream that accepts the request but sends nothing for
        --idle-timeout gets 504.
        """
        proxy = Proxy(self, idleTimeout=0.3)
        proxy.fake.stallNext()
        response = await proxy.chat()
        self.assertEqual(response.code, 504)
        self.assertCleanError(await response.content(), 504)
        await proxy.fake.received[0].lost


class LogTests(TestCase):
    """
    hermux logs one line per request, and never a secret.
    """

    async def test_oneLinePerRequestWithoutSecrets(self):
        with capturedLogs() as events:
            proxy = Proxy(self)
            response = await proxy.chat()
            await response.content()
            response = await proxy.request("GET", "/api/v1/models", token="wrong-" + ACCESS_TOKEN)
            await response.content()
            response = await proxy.chat(stream=True)
            await response.content()
            proxy.fake.answerNext(401, {"error": {"code": 401, "message": "User not found."}})
            response = await proxy.chat()
            await response.content()
        requestLines = [
            event for event in events if event.get("log_namespace") == "hermux.site.HermuxRequest"
        ]
        self.assertEqual(len(requestLines), 4)
        first = requestLines[0]
        self.assertEqual(first["method"], "POST")
        self.assertEqual(first["path"], CHAT)
        self.assertEqual(first["status"], 200)
        self.assertIn(first["key"], KEY_NAMES)
        self.assertTrue(first["client"].startswith("client-"))
        self.assertGreater(first["bytes"], 0)
        self.assertTrue(first["peer"].startswith("127.0.0.1:"))
        self.assertEqual(requestLines[1]["status"], 401)
        everything = "\n".join(formatEvent(event) + repr(event) for event in events)
        for secret in SECRETS:
            self.assertNotIn(secret, everything)


    async def test_accessLogFileInstead(self):
        """
        With an access log file, the same lines go there, none to twistd's
        log, and no secret either.
        """
        accessLog = RequestLogFile(os.path.abspath(self.mktemp()))
        accessLog.startService()
        with capturedLogs() as events:
            proxy = Proxy(self, requestLog=accessLog)
            response = await proxy.chat()
            await response.content()
            response = await proxy.request("GET", "/api/v1/models", token="wrong-" + ACCESS_TOKEN)
            await response.content()
            await accessLog.stopService()
        self.assertEqual(
            [e for e in events if e.get("log_namespace") == "hermux.site.HermuxRequest"], []
        )
        with open(accessLog.path) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertRegex(lines[0], rf" POST {CHAT} -> 200 via ({'|'.join(KEY_NAMES)}) for client-")
        self.assertRegex(lines[1], r" GET /api/v1/models -> 401 via - for -: \d+ bytes in ")
        for secret in SECRETS:
            self.assertNotIn(secret, "\n".join(lines))


class UpstreamTLSTests(TestCase):
    """
    The upstream's certificate is always verified: against --upstream-ca
    when given, against the system's trust store otherwise.
    """

    async def test_trustedWithUpstreamCA(self):
        ca, server = issueCertificates("localhost")
        proxy = Proxy(self, upstreamCertificate=server, trustRoot=ca)
        response = await proxy.chat()
        self.assertEqual(response.code, 200)
        self.assertEqual(
            json.loads(await response.content())["choices"][0]["message"]["content"],
            FAKE_ANSWER,
        )
        self.assertTrue(proxy.upstreamBase.startswith(b"https://localhost:"))

    async def test_rejectedWithoutUpstreamCA(self):
        ca, server = issueCertificates("localhost")
        proxy = Proxy(self, upstreamCertificate=server)
        response = await proxy.chat()
        self.assertEqual(response.code, 502)
        message = json.loads(await response.content())["error"]["message"]
        self.assertIn("TLS certificate", message)
        self.assertEqual(proxy.fake.received, [])

    async def test_rejectedForAnotherHost(self):
        """
        A certificate from the trusted CA but for another host name is
        refused too.
        """
        ca, server = issueCertificates("other.example")
        proxy = Proxy(self, upstreamCertificate=server, trustRoot=ca)
        response = await proxy.chat()
        self.assertEqual(response.code, 502)
        message = json.loads(await response.content())["error"]["message"]
        self.assertIn("TLS certificate", message)
        self.assertEqual(proxy.fake.received, [])


class FramingTests(TestCase):
    async def test_lengthOrChunks(self):
        """
        An answer of known length keeps its Content-Length through hermux;
        a stream of unknown length is chunked.
        """
        proxy = Proxy(self)
        head = lambda raw: raw.split(b"\r\n\r\n", 1)[0].lower()
        answer = await proxy.raw(
            b"GET /api/v1/models HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer "
            + ACCESS_TOKEN.encode() + b"\r\nConnection: close\r\n\r\n"
        )
        self.assertIn(b"content-length:", head(answer))
        self.assertNotIn(b"transfer-encoding", head(answer))
        body = chatBody(stream=True)
        answer = await proxy.raw(
            b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer "
            + ACCESS_TOKEN.encode() + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            + body
        )
        self.assertIn(b"transfer-encoding: chunked", head(answer))
