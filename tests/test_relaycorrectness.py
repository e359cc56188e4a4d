"""
The relay when the upstream misbehaves in ways that once got past it: an
error answer that runs past its limit within one read, and an agent that
raises instead of failing its Deferred.  In memory: a real HTTP channel
over a L{StringTransport} for the client, a stub agent, and a L{Clock}.
"""

from __future__ import annotations

import json

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent
from zope.interface import implementer

from hermux.access import AccessList
from hermux.config import Key
from hermux.keypool import KeyPool
from hermux.relay import Relay
from hermux.resource import buildRoot
from hermux.site import HermuxSite
from hermux.upstream import Upstream
from tests.rawhttp import splitResponse

KEY = Key("alpha", "sk-or-v1-correctness-test-key-77c1")
ACCESS_TOKEN = b"correctness-test-access-token-Pq3z"


@implementer(IAgent)
class _Agent:
    """
    An agent whose requests wait for the test to answer them, or that
    raises C{raises} when asked, if it is set.
    """

    def __init__(self, raises: Exception | None = None):
        self.raises = raises
        self.requests: list[Deferred] = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        if self.raises is not None:
            raise self.raises
        d = Deferred()
        self.requests.append(d)
        return d


class _Response:
    """
    A response head whose body the test delivers to the protocol it was
    given, over a L{StringTransport}.
    """

    version = (b"HTTP", 1, 1)
    length = UNKNOWN_LENGTH

    def __init__(self, code: int):
        self.code = code
        self.phrase = b"Whatever"
        self.headers = Headers({b"content-type": [b"application/json"]})
        self.transport = StringTransport()
        self.protocol = None

    def deliverBody(self, protocol):
        self.protocol = protocol
        protocol.makeConnection(self.transport)


class _Lines:
    """
    A request log that keeps the fields of each line.
    """

    def __init__(self):
        self.lines: list[dict] = []

    def record(self, fields):
        self.lines.append(fields)


class CorrectnessTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.agent = _Agent()
        self.pool = KeyPool([KEY], reactor=self.clock)
        self.relay = Relay(Upstream(b"https://upstream.test", self.agent), self.pool, reactor=self.clock)
        self.log = _Lines()
        access = AccessList([ACCESS_TOKEN.decode()])
        site = HermuxSite(
            buildRoot(self.pool, access, self.relay),
            maxBody=1000,
            access=access,
            requestLog=self.log,
            reactor=self.clock,
        )
        self.channel = site.buildProtocol(None)
        self.client = StringTransport()
        self.channel.makeConnection(self.client)

    def send(self):
        body = b'{"model": "m"}'
        self.channel.dataReceived(
            b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: hermux.test\r\n"
            b"Authorization: Bearer " + ACCESS_TOKEN + b"\r\n"
            b"Content-Length: %d\r\n\r\n" % (len(body),) + body
        )

    def assertAnswered502(self, message: str):
        """
        The client got one answer: hermux's 502 with C{message}, naming the
        key; the key counted one error; nothing was logged as a failure;
        the request's line says what happened.
        """
        self.assertEqual(self.client.value().count(b"HTTP/1.1 "), 1)
        status, headers, body = splitResponse(self.client.value())
        self.assertEqual(status, 502)
        self.assertEqual(headers[b"x-hermux-error"], [b"502"])
        self.assertEqual(headers[b"x-token-name"], [b"alpha"])
        self.assertEqual(json.loads(body), {"error": {"code": 502, "message": message}})
        [status] = self.pool.statuses()
        self.assertEqual((status.requestsToday, status.errorsToday), (1, 1))
        self.assertEqual(self.flushLoggedErrors(), [])
        [line] = self.log.lines
        self.assertEqual((line["status"], line["key"], line["outcome"]), (502, "alpha", message))


class ErrorAnswerTooLongTests(CorrectnessTestCase):
    def test_moreChunksAfterTheLimit(self):
        """
        When an error answer passes the limit, the read is stopped and the
        client gets one 502; the chunks that still arrive from the same
        read are ignored, not a second failure.
        """
        self.relay.errorBodyLimit = 10
        self.send()
        response = _Response(429)
        self.agent.requests[0].callback(response)
        response.protocol.dataReceived(b'{"error": "this is long"')
        self.assertEqual(response.transport.producerState, "stopped")
        response.protocol.dataReceived(b'and there is more}')
        response.protocol.dataReceived(b"\n")
        self.assertAnswered502("the upstream's error answer could not be read")
        self.assertEqual(len(self.agent.requests), 1)


class AgentRaisesTests(CorrectnessTestCase):
    def test_raisingAgentIsAnUpstreamFailure(self):
        """
        An agent that raises rather than returning a failed Deferred failed
        to reach the upstream: the key counts an error, and the client gets
        the 502 of a failed upstream request, not hermux's 500.
        """
        self.agent.raises = RuntimeError("the agent broke")
        self.send()
        self.assertAnswered502("the upstream request failed")
        self.assertNotIn(b"the agent broke", self.client.value())
