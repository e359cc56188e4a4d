# -*- test-case-name: tests.test_batchwriter -*-
"""
Writing in batches, in a thread of one's own: what the usage ledger and the
request log share.

Both collect in memory what the reactor thread records and write it every
few seconds, off the reactor thread, one write at a time; a write that fails
keeps its batch for the next try, and the problem is logged once a minute,
not once a try.  L{BatchWriter} does all of that; an L{IBatchTarget} says how
one batch is written.
"""

from __future__ import annotations

__all__ = ["IBatch", "IBatchTarget", "BatchWriter", "writerSetting"]

import threading
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import Attribute, Interface


class IBatch(Interface):
    """
    What has been recorded and is not written yet.  Only the reactor thread
    adds to a batch; the writer's thread only reads the one it writes.
    """

    size = Attribute(
        "How much the batch holds, in the unit of the writer's backlog and "
        "batchSize (bytes, rows, ...); 0 when there is nothing to write."
    )

    def extend(newer: IBatch) -> None:
        """
        Add what C{newer} holds after what this batch holds: a failed batch
        is extended with what came while it was being written.
        """

    def trim(size: int) -> int:
        """
        Drop the oldest of what the batch holds until its C{size} is at
        most C{size}; return how many items were dropped.  Called only by a
        writer with a C{backlog}.
        """


class IBatchTarget(Interface):
    """
    Where a L{BatchWriter} writes: how one batch is written, and what to say
    when writing fails and works again.
    """

    def newBatch() -> IBatch:
        """
        An empty batch.
        """

    def writeBatch(batch: IBatch) -> None:
        """
        Write C{batch}, in the writer's thread.  Either all of it is written
        or, with an exception, none of it: the writer then keeps the batch
        and tries again.
        """

    def writeFailing(problem: str) -> None:
        """
        Say (in the log) that writing fails and why; called in the reactor
        thread, at most once every C{problemLogInterval} seconds.
        """

    def writingAgain(dropped: int) -> None:
        """
        Say that a write worked after writes failed, and how many items
        were dropped meanwhile; called in the reactor thread.
        """


class BatchWriter(Service):
    """
    Writes an L{IBatchTarget}'s batches in one thread of its own: every
    C{interval} seconds, as soon as C{batchSize} waits (if given), when asked
    (L{flush}) and, a last time, when the service stops.

    A batch whose write failed is kept, ahead of what came since, and
    written with the next one; past C{backlog} (if given) the oldest items
    are dropped and counted, and the target is told how many when writing
    works again.

    @ivar pending: the batch that collects what is recorded now; the
        reactor thread adds to it.
    @ivar problem: why the last write failed, while writes fail; L{None}
        when all is well.
    @ivar lock: held by the writer's thread while it writes a batch and
        marks it written.  A reader that holds it finds each batch either
        written or in L{unwritten}, never both and never neither.
    """

    _log = Logger()
    problemLogInterval = 60.0

    def __init__(
        self,
        target: IBatchTarget,
        *,
        interval: float = 1.0,
        reactor=None,
        backlog: int | None = None,
        batchSize: int | None = None,
        stopAttempts: int = 1,
        threadName: str = "hermux-batch-writer",
    ):
        if reactor is None:
            from twisted.internet import reactor
        self.backlog = backlog
        self.batchSize = batchSize
        self.stopAttempts = stopAttempts
        self.pending = target.newBatch()
        self.problem: str | None = None
        self.dropped = 0
        self.lock = threading.Lock()
        self._target = target
        self._interval = interval
        self._reactor = reactor
        self._threadName = threadName
        self._threads: ThreadPool | None = None
        self._loop: LoopingCall | None = None
        # The batch in the writer's thread, until it is written.
        self._writing: IBatch | None = None
        # Who waits for the write in progress (None when there is none),
        # and who waits for the one after it.
        self._current: list[Deferred[None]] | None = None
        self._next: list[Deferred[None]] = []
        self._lastProblemLogged: float | None = None

    def unwritten(self) -> tuple[IBatch, ...]:
        """
        The batches not written yet, oldest first.  Call it holding
        L{lock}.
        """
        if self._writing is None:
            return (self.pending,)
        return (self._writing, self.pending)

    def added(self) -> None:
        """
        Say that the reactor thread added to L{pending}: it is written at
        once if it holds C{batchSize} and no write is in progress.
        """
        if self._current is None and self._full():
            self.flush()

    def startService(self):
        super().startService()
        self._threads = ThreadPool(minthreads=1, maxthreads=1, name=self._threadName)
        self._threads.start()
        self._loop = LoopingCall(self.flush)
        self._loop.clock = self._reactor
        self._loop.start(self._interval, now=False)

    def stopService(self):
        super().stopService()
        return ensureDeferred(self._stop())

    async def _stop(self):
        self._loop.stop()
        for attempt in range(self.stopAttempts):
            await self.flush()
            if not self.pending.size:
                break
        self._threads.stop()
        self._threads = None

    def flush(self) -> Deferred[None]:
        """
        Write what has been recorded so far; fires once it is written (or
        the write failed and it waits for the next try).  One write runs at
        a time: a flush asked for meanwhile follows it.
        """
        if self._threads is None:
            return succeed(None)
        done: Deferred[None] = Deferred()
        if self._current is not None:
            self._next.append(done)
        elif self.pending.size:
            self._start([done])
        else:
            done.callback(None)
        return done

    def flushThen(self, work: Callable[[], Any]) -> Deferred:
        """
        Write what waits, then call C{work} in the writer's thread; fires
        with what it returns (with L{None}, not calling it, if the writer
        has stopped meanwhile).
        """

        def afterFlush(_):
            if self._threads is None:
                return None
            return deferToThreadPool(self._reactor, self._threads, work)

        return self.flush().addCallback(afterFlush)

    def _full(self) -> bool:
        return self.batchSize is not None and self.pending.size >= self.batchSize

    def _start(self, waiting: list[Deferred[None]]) -> None:
        self._current = waiting
        self._writing, self.pending = self.pending, self._target.newBatch()
        d = deferToThreadPool(self._reactor, self._threads, self._write, self._writing)
        d.addCallbacks(self._written, self._notWritten)
        d.addErrback(self._targetFailed)
        d.addCallback(self._finished)

    def _write(self, batch: IBatch) -> None:
        """
        In the writer's thread: write C{batch}, and mark it written only
        once the write returned.
        """
        with self.lock:
            self._target.writeBatch(batch)
            self._writing = None

    def _written(self, result) -> bool:
        if self.problem is not None:
            dropped, self.dropped = self.dropped, 0
            self.problem = None
            self._lastProblemLogged = None
            self._target.writingAgain(dropped)
        return True

    def _notWritten(self, failure) -> bool:
        # Keep the batch for the next try, ahead of what came meanwhile.
        kept, self._writing = self._writing, None
        kept.extend(self.pending)
        self.pending = kept
        if self.backlog is not None and kept.size > self.backlog:
            self.dropped += kept.trim(self.backlog)
        self.problem = failure.getErrorMessage()
        now = self._reactor.seconds()
        if (
            self._lastProblemLogged is None
            or now - self._lastProblemLogged >= self.problemLogInterval
        ):
            self._lastProblemLogged = now
            self._target.writeFailing(self.problem)
        return False

    def _targetFailed(self, failure) -> bool:
        # A bug in what the target says must not leave every later flush
        # waiting for this one.
        self._log.failure("the batch writer's target failed", failure)
        return False

    def _finished(self, written: bool) -> None:
        # Who asked meanwhile gets a write of their own; a full batch is
        # written at once, unless writes fail (then it waits for the loop).
        waiting, self._current = self._current, None
        following, self._next = self._next, []
        if self.pending.size and (following or (written and self._full())):
            self._start(following)
        else:
            for d in following:
                d.callback(None)
        for d in waiting:
            d.callback(None)


def writerSetting(name: str, doc: str) -> property:
    """
    A property, for a class that keeps its L{BatchWriter} as C{_writer},
    that reads and sets the writer's attribute C{name}: a setting of the
    writer under the name its owner gives it.
    """
    return property(
        lambda self: getattr(self._writer, name),
        lambda self, value: setattr(self._writer, name, value),
        doc=doc,
    )
