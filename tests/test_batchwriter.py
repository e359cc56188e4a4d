"""
Tests for L{hermux.batchwriter}: batches written in a thread of their own,
one at a time, kept and retried when a write fails.

Time is a L{Clock} (the writer's interval and C{problemLogInterval}); the
writes happen in the writer's real thread, and their results come back
through the real reactor.
"""

from __future__ import annotations

import threading

from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from hermux.batchwriter import BatchWriter, IBatch, IBatchTarget
from tests.harness import waitUntil


class ThreadedClock(Clock):
    """
    A L{Clock} whose C{callFromThread} hands the call to the real reactor,
    which is how the writer's thread reports each write.
    """

    def callFromThread(self, f, *args, **kwargs):
        reactor.callFromThread(f, *args, **kwargs)


@implementer(IBatch)
class Items:
    """
    A batch of items, each of size 1.
    """

    def __init__(self, items=()):
        self.items = list(items)

    @property
    def size(self):
        return len(self.items)

    def extend(self, newer):
        self.items.extend(newer.items)

    def trim(self, size):
        dropped = max(0, len(self.items) - size)
        del self.items[:dropped]
        return dropped


@implementer(IBatchTarget)
class Target:
    """
    Keeps what it is given to write, in the thread the write ran in; fails
    the next C{failures} writes, and holds each write until C{gate} is set.

    @ivar said: what the target was told to say, in order: C{("failing",
        problem)} and C{("again", dropped)}.
    """

    def __init__(self):
        self.written: list[list] = []
        self.threads: list[str] = []
        self.failures = 0
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.said: list[tuple] = []

    def newBatch(self):
        return Items()

    def writeBatch(self, batch):
        self.started.set()
        self.gate.wait(5)
        self.threads.append(threading.current_thread().name)
        if self.failures:
            self.failures -= 1
            raise OSError(28, "No space left on device")
        self.written.append(list(batch.items))

    def writeFailing(self, problem):
        self.said.append(("failing", problem))

    def writingAgain(self, dropped):
        self.said.append(("again", dropped))


class BatchWriterTests(TestCase):
    def startWriter(self, **kwargs) -> BatchWriter:
        """
        A started writer of a new L{Target} (C{self.target}) on
        C{self.clock}, stopped with the test unless the test stopped it.
        """
        self.clock = ThreadedClock()
        self.target = Target()
        # Let a write held at the gate go on when the test ends.
        self.addCleanup(self.target.gate.set)
        kwargs.setdefault("interval", 3600.0)
        writer = BatchWriter(self.target, reactor=self.clock, **kwargs)
        writer.startService()
        self.addCleanup(lambda: writer.stopService() if writer.running else None)
        return writer

    def add(self, writer: BatchWriter, *items) -> None:
        writer.pending.items.extend(items)
        writer.added()

    def test_interfaces(self):
        """
        The test's batch and target provide the interfaces the writer
        needs.
        """
        self.assertTrue(verifyObject(IBatch, Items()))
        self.assertTrue(verifyObject(IBatchTarget, Target()))

    async def test_flushWritesInTheWritersThread(self):
        """
        L{BatchWriter.flush} writes what waits as one batch, in the thread
        pool named C{threadName}, and fires once it is written; with nothing
        waiting it writes nothing.
        """
        writer = self.startWriter(threadName="test-writer")
        self.add(writer, 1, 2, 3)
        await writer.flush()
        self.assertEqual(self.target.written, [[1, 2, 3]])
        self.assertEqual(self.target.threads, ["PoolThread-test-writer-0"])
        self.assertEqual(writer.pending.size, 0)
        await writer.flush()
        self.assertEqual(self.target.written, [[1, 2, 3]])

    async def test_writesEveryInterval(self):
        """
        While running, the writer writes every C{interval} seconds of its
        clock without being asked.
        """
        writer = self.startWriter(interval=1.0)
        self.add(writer, "a")
        self.clock.advance(0.5)
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.target.written, [])
        self.clock.advance(0.5)
        # The LoopingCall's flush is in progress: this one follows it.
        await writer.flush()
        self.assertEqual(self.target.written, [["a"]])

    async def test_flushWaitsForWriteInProgress(self):
        """
        A flush asked for while a write is in progress does not fire with
        it: it fires once a second write has written what came meanwhile.
        Every flush asked for meanwhile shares that second write.
        """
        writer = self.startWriter()
        self.target.gate.clear()
        self.add(writer, "a")
        first = writer.flush()
        self.assertTrue(self.target.started.wait(5))
        self.add(writer, "b")
        second = writer.flush()
        self.add(writer, "c")
        third = writer.flush()
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.target.gate.set()
        await first
        self.assertEqual(self.target.written, [["a"]])
        self.assertNoResult(second)
        await second
        await third
        self.assertEqual(self.target.written, [["a"], ["b", "c"]])

    async def test_unwrittenWhileWriting(self):
        """
        While a batch is in the writer's thread, L{BatchWriter.unwritten}
        has it, then what came since; once written, only what came since.
        """
        writer = self.startWriter()
        self.target.gate.clear()
        self.add(writer, "a")
        writing = writer.flush()
        self.assertTrue(self.target.started.wait(5))
        self.add(writer, "b")
        self.assertEqual([batch.items for batch in writer.unwritten()], [["a"], ["b"]])
        self.target.gate.set()
        await writing
        self.assertEqual([batch.items for batch in writer.unwritten()], [["b"]])

    async def test_failedBatchKeptAheadAndRetried(self):
        """
        A batch whose write failed is kept ahead of what came while it was
        being written, and written with it by the next flush; C{problem}
        says why while writes fail, and the target hears once that writing
        works again.
        """
        writer = self.startWriter()
        self.target.failures = 1
        self.target.gate.clear()
        self.add(writer, "a")
        failing = writer.flush()
        self.assertTrue(self.target.started.wait(5))
        self.add(writer, "b")
        self.target.gate.set()
        await failing
        self.assertEqual(self.target.written, [])
        problem = writer.problem
        self.assertIn("No space left on device", problem)
        self.assertEqual(writer.pending.items, ["a", "b"])
        self.assertEqual([batch.items for batch in writer.unwritten()], [["a", "b"]])
        self.add(writer, "c")
        await writer.flush()
        self.assertEqual(self.target.written, [["a", "b", "c"]])
        self.assertIsNone(writer.problem)
        self.assertEqual(self.target.said, [("failing", problem), ("again", 0)])
        self.add(writer, "d")
        await writer.flush()
        self.assertEqual(len(self.target.said), 2)

    async def test_backlogDropsOldestAndCounts(self):
        """
        Past C{backlog}, what failed writes keep loses its oldest items; the
        writer counts them, tells the target how many once writing works
        again, and starts counting anew.
        """
        writer = self.startWriter(backlog=3)
        self.target.failures = 2
        self.add(writer, 1, 2)
        await writer.flush()
        self.assertEqual(writer.dropped, 0)
        self.add(writer, 3, 4)
        await writer.flush()
        self.assertEqual(writer.pending.items, [2, 3, 4])
        self.assertEqual(writer.dropped, 1)
        await writer.flush()
        self.assertEqual(self.target.written, [[2, 3, 4]])
        self.assertEqual(writer.dropped, 0)
        self.assertEqual(self.target.said[-1], ("again", 1))

    async def test_withoutBacklogNothingIsDropped(self):
        """
        A writer without a C{backlog} keeps everything while writes fail.
        """
        writer = self.startWriter()
        self.target.failures = 3
        for item in range(3):
            self.add(writer, *range(item * 100, item * 100 + 100))
            await writer.flush()
        await writer.flush()
        self.assertEqual(self.target.written, [list(range(300))])
        self.assertEqual(self.target.said[-1], ("again", 0))

    async def test_problemSaidOnceAMinute(self):
        """
        While writes fail, the target is told so at most once every
        C{problemLogInterval} seconds, not once a try; after writes worked
        again, a new failure is told at once.
        """
        writer = self.startWriter()
        self.target.failures = 4
        self.add(writer, "a")

        def failings():
            return [said for said in self.target.said if said[0] == "failing"]

        await writer.flush()
        self.assertEqual(len(failings()), 1)
        self.clock.advance(writer.problemLogInterval / 2)
        await writer.flush()
        self.assertEqual(len(failings()), 1)
        self.assertIsNotNone(writer.problem)
        self.clock.advance(writer.problemLogInterval / 2)
        await writer.flush()
        self.assertEqual(len(failings()), 2)
        self.target.failures = 0
        await writer.flush()
        self.target.failures = 1
        self.add(writer, "b")
        await writer.flush()
        self.assertEqual(len(failings()), 3)

    async def test_batchSizeWritesAtOnce(self):
        """
        With a C{batchSize}, a batch is written as soon as that much waits;
        one that filled up during a write is written right after it.
        """
        writer = self.startWriter(batchSize=2)
        self.add(writer, "a")
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.target.written, [])
        self.target.gate.clear()
        self.add(writer, "b")
        self.assertTrue(self.target.started.wait(5))
        self.add(writer, "c")
        self.add(writer, "d")
        self.target.gate.set()
        await writer.flush()
        self.assertEqual(self.target.written, [["a", "b"], ["c", "d"]])

    async def test_fullBatchWaitsAfterAFailure(self):
        """
        A full batch whose write failed is not written again at once (which
        would retry a broken file as fast as it fails), but when next asked.
        """
        writer = self.startWriter(batchSize=2)
        self.target.failures = 1
        self.add(writer, "a")
        self.add(writer, "b")
        await waitUntil(lambda: writer.problem is not None)
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(self.target.threads), 1)
        self.assertEqual(writer.pending.items, ["a", "b"])
        await writer.flush()
        self.assertEqual(self.target.written, [["a", "b"]])

    async def test_targetFailingToSayIsLogged(self):
        """
        A target that raises while it is told about a failed write is
        logged, and the writer goes on: the flush fires, and the next one
        writes.
        """
        writer = self.startWriter()

        def cannotSay(problem):
            raise RuntimeError("no words")

        self.target.writeFailing = cannotSay
        self.target.failures = 1
        self.add(writer, "a")
        await writer.flush()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        await writer.flush()
        self.assertEqual(self.target.written, [["a"]])

    async def test_stopWritesTheRest(self):
        """
        Stopping writes what waits, then stops the thread; a flush after
        that has nothing to do.
        """
        writer = self.startWriter()
        self.add(writer, "a")
        await writer.stopService()
        self.assertFalse(writer.running)
        self.assertEqual(self.target.written, [["a"]])
        self.add(writer, "b")
        self.assertIsNone(self.successResultOf(writer.flush()))
        self.assertEqual(self.target.written, [["a"]])

    async def test_stopWaitsForWriteInProgress(self):
        """
        Stopping while a write is in progress waits for it, then writes
        what came meanwhile.
        """
        writer = self.startWriter()
        self.target.gate.clear()
        self.add(writer, "a")
        writer.flush()
        self.assertTrue(self.target.started.wait(5))
        self.add(writer, "b")
        stopping = writer.stopService()
        self.target.gate.set()
        await stopping
        self.assertEqual(self.target.written, [["a"], ["b"]])

    async def test_stopTriesStopAttemptsTimes(self):
        """
        Stopping while writes fail tries C{stopAttempts} times, then stops
        with the rest still pending.
        """
        writer = self.startWriter(stopAttempts=3)
        self.target.failures = 2
        self.add(writer, "a")
        await writer.stopService()
        self.assertEqual(self.target.written, [["a"]])

        writer = self.startWriter(stopAttempts=3)
        self.target.failures = 5
        self.add(writer, "a")
        await writer.stopService()
        self.assertEqual(len(self.target.threads), 3)
        self.assertEqual(writer.pending.items, ["a"])

    async def test_flushThen(self):
        """
        L{BatchWriter.flushThen} writes what waits, then runs the work in
        the writer's thread and fires with its result.
        """
        writer = self.startWriter(threadName="test-writer")
        self.add(writer, "a")

        def work():
            return (threading.current_thread().name, list(self.target.written))

        self.assertEqual(await writer.flushThen(work), ("PoolThread-test-writer-0", [["a"]]))

    def test_notRunning(self):
        """
        A writer that is not running writes nothing: its flush has already
        fired, and work asked of its thread is not done.
        """
        target = Target()
        writer = BatchWriter(target, reactor=Clock())
        writer.pending.items.append("a")
        writer.added()
        self.assertIsNone(self.successResultOf(writer.flush()))
        self.assertIsNone(self.successResultOf(writer.flushThen(lambda: 1 / 0)))
        self.assertEqual(target.written, [])
