"""
Tests for L{hermux.record}: the one record each request has, which the
gate and the relay fill in, for any twisted.web request.
"""

from __future__ import annotations

import json

import treq
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import server
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyChannel

from hermux.access import AccessList, Client, clientLabel
from hermux.config import Key
from hermux.keypool import KeyPool, Kind, Verdict
from hermux.record import RequestRecord, recordOf
from hermux.relay import Relay
from hermux.requestlog import REQUEST_LINE
from hermux.usage import Usage
from hermux.resource import buildRoot
from hermux.site import HermuxSite
from hermux.testing import FAKE_MODEL, FakeOpenRouter
from hermux.upstream import Upstream

KEY = Key("alpha", "sk-or-v1-record-test-key-4f2a")
ACCESS_TOKEN = "record-test-access-token-Hy7u"


def _plainRequest(method=b"GET", path=b"/v1/models") -> server.Request:
    request = server.Request(DummyChannel())
    request.method = method
    request.path = request.uri = path
    return request


class RecordOfTests(SynchronousTestCase):
    """
    Tests for L{recordOf}.
    """

    def test_hermuxRequestHasItsOwn(self):
        """
        A request of hermux's site has its record from the start.
        """
        site = HermuxSite(Resource(), maxBody=10, reactor=Clock())
        channel = site.buildProtocol(None)
        channel.makeConnection(StringTransport())
        request = site.requestFactory(channel)
        self.assertIs(recordOf(request), request.hermuxRecord)
        self.assertEqual(recordOf(request), RequestRecord())

    def test_plainRequestGetsOne(self):
        """
        Any other request gets an empty record the first time it is asked
        for, and the same record after.
        """
        request = _plainRequest()
        record = recordOf(request)
        self.assertEqual(record, RequestRecord())
        record.keyName = "alpha"
        self.assertIs(recordOf(request), record)
        self.assertIsNot(recordOf(_plainRequest()), record)


class LogFieldsTests(SynchronousTestCase):
    """
    Tests for L{RequestRecord.logFields}.
    """

    def test_beforeAnything(self):
        """
        A request that nobody filled in and that was not answered logs dashes
        and no outcome.
        """
        request = _plainRequest(b"POST", b"/api/v1/chat/completions")
        fields = RequestRecord(started=10.0).logFields(request, 12.5)
        self.assertEqual(
            fields,
            {
                "requestId": "-",
                "method": "POST",
                "path": "/api/v1/chat/completions",
                "status": "-",
                "key": "-",
                "client": "-",
                "bytes": 0,
                "duration": 2.5,
                "peer": "192.168.1.1:12344",
                "outcome": "complete",
                "outcomeNote": "",
                "model": "-",
                "usageNote": "",
                "usage": None,
            },
        )

    def test_filledIn(self):
        """
        What the record holds goes into the line: the request id, the key,
        the client's label (never a token) and the outcome.
        """
        request = _plainRequest()
        request.client = IPv4Address("TCP", "192.0.2.9", 40000)
        request.setResponseCode(502)
        request.write(b"")
        record = RequestRecord(
            requestId="0123456789abcdef",
            client=Client(clientLabel(ACCESS_TOKEN)),
            keyName="alpha",
            outcome="the upstream request failed",
            started=1.0,
        )
        line = REQUEST_LINE.format_map(record.logFields(request, 1.25))
        self.assertEqual(
            line,
            f"0123456789abcdef GET /v1/models -> 502 via alpha for {clientLabel(ACCESS_TOKEN)}: "
            "0 bytes in 0.250s from 192.0.2.9:40000 (the upstream request failed)",
        )
        self.assertNotIn(ACCESS_TOKEN, repr(record))

    def test_usage(self):
        """
        A request accounted under a model logs it with the tokens and cost
        its answer reported, also as fields of their own; a model a client
        named shows only printable ASCII, at most 128 characters.
        """
        request = _plainRequest()
        record = RequestRecord(
            keyName="alpha",
            model="openai/gpt-4o",
            usage=Usage(promptTokens=1234, completionTokens=567, reasoningTokens=8,
                        cachedTokens=90, cost=12_300_000),
        )
        fields = record.logFields(request, 0.0)
        line = REQUEST_LINE.format_map(fields)
        self.assertIn(
            "; model openai/gpt-4o, 1234+567 tokens (8 reasoning, 90 cached), cost 0.0123", line
        )
        self.assertEqual(
            fields["usage"], (1234, 567, 8, 90, 12_300_000)
        )
        record = RequestRecord(model="evil\nmodel\x1b[31m" + "x" * 200)
        fields = record.logFields(request, 0.0)
        self.assertEqual(fields["model"], "evil?model?[31m" + "x" * 113)
        self.assertIn("no usage reported", fields["usageNote"])
        self.assertNotIn("\n", REQUEST_LINE.format_map(fields))


class _Remembering(Resource):
    """
    A root over another that remembers the requests it routes.
    """

    def __init__(self, root: Resource):
        super().__init__()
        self.requests: list = []
        self._root = root

    def getChildWithDefault(self, name, request):
        self.requests.append(request)
        return self._root.getChildWithDefault(name, request)


class PlainRequestTests(SynchronousTestCase):
    """
    The relay serves a plain L{twisted.web.server.Request}, of a plain
    L{twisted.web.server.Site}, and fills in its record.
    """

    def setUp(self):
        clock = Clock()
        self.fake = FakeOpenRouter([KEY.token], reactor=clock)
        self.upstreamAgent = RequestTraversalAgent(self.fake)
        self.pool = KeyPool([KEY], reactor=clock)
        relay = Relay(Upstream(b"http://upstream.test", self.upstreamAgent), self.pool, reactor=clock)
        self.root = _Remembering(buildRoot(self.pool, AccessList([ACCESS_TOKEN]), relay))
        # StubTreq serves its resource with a plain Site, whose requests
        # are plain twisted.web.server.Request.
        self.stub = StubTreq(self.root)

    def flush(self):
        for _ in range(5):
            self.upstreamAgent.flush()
            self.stub.flush()

    def test_relayedAndRecorded(self):
        """
        The answer is the upstream's, and the request's record names the
        client and the key, with no outcome of note.
        """
        d = self.stub.get(
            "http://hermux.test/v1/models", headers={"Authorization": f"Bearer {ACCESS_TOKEN}"}
        )
        self.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(treq.content(response))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("X-Token-Name"), ["alpha"])
        self.assertEqual(json.loads(body)["data"][0]["id"], FAKE_MODEL)
        [received] = self.fake.received
        self.assertEqual(received.uri, b"/api/v1/models")

        request = self.root.requests[0]
        self.assertIs(type(request), server.Request)
        self.assertTrue(request.finished)
        record = recordOf(request)
        self.assertEqual(record.client, Client(clientLabel(ACCESS_TOKEN)))
        self.assertEqual(record.keyName, "alpha")
        self.assertIsNone(record.outcome)

    def test_outcomeIsRecorded(self):
        """
        An exchange that ends otherwise than normally says how in the
        record of the plain request.
        """
        self.pool.report(KEY, Verdict(Kind.DISABLED, None, "refused in a test"))
        d = self.stub.get(
            "http://hermux.test/v1/models", headers={"Authorization": f"Bearer {ACCESS_TOKEN}"}
        )
        self.flush()
        response = self.successResultOf(d)
        self.successResultOf(treq.content(response))
        self.assertEqual(response.code, 503)
        record = recordOf(self.root.requests[0])
        self.assertEqual(record.client, Client(clientLabel(ACCESS_TOKEN)))
        self.assertIsNone(record.keyName)
        self.assertEqual(record.outcome, "no usable key")
        self.assertEqual(self.fake.received, [])
