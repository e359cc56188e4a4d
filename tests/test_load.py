"""
hermux under load, over real loopback sockets: many concurrent streaming
clients, and many short connections one after another.  Every client
must get every event, and afterwards the process's open file descriptors
and resident memory must be back within 10% of where they were: nothing
leaks per connection.

hermux runs in this process, so the process's own numbers
(/proc/self/fd, /proc/self/status) are hermux's, plus the clients' and the
fake upstream's, which must come back down too.  "Before" is measured
after a first, warm-up round of the same size: the upstream connection
pool keeps up to 64 idle connections by design, and Python keeps the
memory arenas a first round needed; only growth beyond that is a leak.

The default run uses reduced sizes (200 concurrent streams, 1000
sequential connections: a few seconds); HERMUX_SLOW_TESTS=1 runs the full
sizes (1000 and 10,000).
"""

from __future__ import annotations

import gc
import json
import os
import resource

from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, TestCase

from hermux.testing import FAKE_ANSWER
from tests.harness import ACCESS_TOKEN, CHAT, Proxy, chatBody, sleep, waitUntil
from tests.rawhttp import connectRaw, splitResponse

SLOW = os.environ.get("HERMUX_SLOW_TESTS") == "1"
CONCURRENT = 1000 if SLOW else 200
SEQUENTIAL = 10_000 if SLOW else 1000
TOKEN = ACCESS_TOKEN.encode()
STREAM_REQUEST = (
    b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: hermux\r\n"
    b"Authorization: Bearer " + TOKEN + b"\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
) % (len(chatBody(stream=True)), chatBody(stream=True))
SHORT_REQUEST = (
    b"GET /api/v1/models HTTP/1.1\r\nHost: hermux\r\n"
    b"Authorization: Bearer " + TOKEN + b"\r\nConnection: close\r\n\r\n"
)


def openFileDescriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def residentBytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def dechunk(body: bytes) -> bytes:
    """
    The content of a complete chunked body; fails if it is not complete.
    """
    content = b""
    while True:
        size, _, rest = body.partition(b"\r\n")
        length = int(size, 16)
        if length == 0:
            if rest != b"\r\n":
                raise AssertionError(f"no clean end: {rest[:100]!r}")
            return content
        content += rest[:length]
        if rest[length : length + 2] != b"\r\n":
            raise AssertionError("chunk without its CRLF")
        body = rest[length + 2 :]


class LoadTestCase(TestCase):
    timeout = 900 if SLOW else 120

    def setUp(self):
        if not os.path.isdir("/proc/self/fd"):
            raise SkipTest("needs /proc")

    def raiseFileLimit(self, needed: int):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft >= needed:
            return
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise SkipTest(f"needs {needed} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))

    async def settle(self, proxy: Proxy):
        """
        Wait until every client connection is gone and the upstream keeps
        no more than its pool of idle connections.
        """
        await waitUntil(lambda: not proxy.site.channels, timeout=30)
        await waitUntil(lambda: proxy.fakeConnections <= 64, timeout=30)
        gc.collect()

    def assertNoGrowth(self, before: tuple[int, int], after: tuple[int, int]):
        (fdsBefore, rssBefore), (fdsAfter, rssAfter) = before, after
        self.assertLessEqual(fdsAfter, fdsBefore * 1.1, f"fds {fdsBefore} -> {fdsAfter}")
        self.assertLessEqual(rssAfter, rssBefore * 1.1, f"RSS {rssBefore} -> {rssAfter}")

    def measure(self) -> tuple[int, int]:
        return openFileDescriptors(), residentBytes()


class ConcurrentStreamsTests(LoadTestCase):
    async def streamRound(self, proxy: Proxy, clock: Clock, count: int):
        """
        Open C{count} streaming chat completions at once, hold them all
        open until every one has its first event, then release the rest of
        the events to all of them together; check every stream is whole.
        """
        clients = [await connectRaw(proxy.portNumber, STREAM_REQUEST) for _ in range(count)]
        await waitUntil(
            lambda: all(b"OPENROUTER PROCESSING" in c.received for c in clients), timeout=60
        )
        self.assertEqual(len(proxy.site.channels), count)
        while not all(c.closed.called for c in clients):
            clock.advance(1.0)
            await sleep(0.02)
        for client in clients:
            status, headers, body = splitResponse(client.received)
            self.assertEqual(status, 200)
            stream = dechunk(body)
            events = [event for event in stream.split(b"\n\n") if event]
            data = [event[len(b"data: ") :] for event in events if event.startswith(b"data: ")]
            self.assertEqual(data[-1], b"[DONE]")
            words = [json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-1]]
            # The words, the finish chunk, the usage chunk and [DONE].
            self.assertEqual(len(data), len(FAKE_ANSWER.split()) + 3)
            self.assertEqual("".join(words), FAKE_ANSWER)

    async def test_concurrentStreamingClients(self):
        self.raiseFileLimit(4 * CONCURRENT + 512)
        clock = Clock()
        proxy = Proxy(self, eventClock=clock, eventInterval=1.0, maxConnections=CONCURRENT + 10)
        await self.streamRound(proxy, clock, CONCURRENT)
        await self.settle(proxy)
        before = self.measure()
        await self.streamRound(proxy, clock, CONCURRENT)
        await self.settle(proxy)
        self.assertNoGrowth(before, self.measure())


class SequentialConnectionsTests(LoadTestCase):
    async def shortRound(self, proxy: Proxy, count: int):
        for _ in range(count):
            client = await connectRaw(proxy.portNumber, SHORT_REQUEST)
            await client.closed
            status, _, body = splitResponse(client.received)
            self.assertEqual(status, 200, client.received[:300])

    async def test_sequentialShortConnections(self):
        proxy = Proxy(self)
        await self.shortRound(proxy, SEQUENTIAL // 10)
        await self.settle(proxy)
        before = self.measure()
        await self.shortRound(proxy, SEQUENTIAL)
        await self.settle(proxy)
        self.assertNoGrowth(before, self.measure())
        self.assertEqual(len(proxy.fake.received), SEQUENTIAL + SEQUENTIAL // 10)
