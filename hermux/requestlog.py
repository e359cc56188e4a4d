"""
Where the line each request logs goes: by default into twistd's log as a
twisted.logger event; with C{--access-log}, into a file of its own, written
in batches, which costs a busy hermux far less than an event per request.
"""

from __future__ import annotations

import signal
import time

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.logfile import LogFile
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

# Both destinations format the same fields the same way; str.format reads
# this format as twisted.logger does.
REQUEST_LINE = (
    "{requestId} {method} {path} -> {status} via {key} for {client}: "
    "{bytes} bytes in {duration:.3f}s from {peer}{outcomeNote}"
)

# twistd's own timestamps, so that both logs read alike.
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


class IRequestLog(Interface):
    def record(fields: dict) -> None:
        """
        Log one request's line, made of C{fields} (see L{REQUEST_LINE}).
        """


@implementer(IRequestLog)
class RequestLogEvents:
    """
    Each request's line as a twisted.logger event, to wherever twistd logs.
    """

    def __init__(self):
        # The namespace twistd's log shows, as before the lines could go
        # elsewhere: a class attribute would be named after this class.
        self._log = Logger(namespace="hermux.site.HermuxRequest")

    def record(self, fields):
        # The text is made here with str.format: twisted.logger's own
        # formatting of the same fields costs several times as much, on
        # every request.  The fields stay in the event for other observers.
        self._log.info("{text}", text=REQUEST_LINE.format_map(fields), **fields)


@implementer(IRequestLog)
class RequestLogFile(Service):
    """
    Request lines in a file of their own, one per request, each starting
    with twistd's timestamp.

    Lines wait in memory and are written by a thread of the log's own, in
    one batch every C{interval} seconds or as soon as C{batchBytes} wait, and
    when the service stops; a crash loses at most the last C{interval}
    seconds of lines.  The file is rotated like twistd's log: to C{.1},
    C{.2}, ... when it reaches C{rotateLength} bytes, and on SIGUSR1.

    A failed write keeps its lines for the next try, up to C{keepBytes};
    past that they are dropped and the log says how many.
    """

    _log = Logger()
    batchBytes = 64 * 1024
    keepBytes = 4 * 1024 * 1024
    problemLogInterval = 60.0

    def __init__(
        self,
        path: str,
        *,
        reactor=None,
        interval: float = 1.0,
        rotateLength: int = 10_000_000,
    ):
        if reactor is None:
            from twisted.internet import reactor
        self.path = path
        self._reactor = reactor
        self._interval = interval
        # Opening now lets a bad path stop hermux before it serves.
        self._file = LogFile.fromFullPath(path, rotateLength=rotateLength)
        self._pending: list[str] = []
        self._pendingBytes = 0
        self._second: int | None = None
        self._stamp = ""
        self._threads: ThreadPool | None = None
        self._loop: LoopingCall | None = None
        self._flushing: Deferred | None = None
        self._previousUSR1 = None
        self._dropped = 0
        self._lastProblemLogged: float | None = None

    def record(self, fields):
        second = int(self._reactor.seconds())
        if second != self._second:
            self._second = second
            self._stamp = time.strftime(_TIME_FORMAT, time.localtime(second))
        line = f"{self._stamp} {REQUEST_LINE.format_map(fields)}\n"
        self._pending.append(line)
        self._pendingBytes += len(line)
        if self._pendingBytes >= self.batchBytes and self._flushing is None:
            self.flush()

    def startService(self):
        super().startService()
        self._threads = ThreadPool(minthreads=1, maxthreads=1, name="hermux-access-log")
        self._threads.start()
        self._loop = LoopingCall(self.flush)
        self._loop.clock = self._reactor
        self._loop.start(self._interval, now=False)
        self._previousUSR1 = signal.signal(signal.SIGUSR1, self._rotateOnSignal)

    def stopService(self):
        super().stopService()
        return ensureDeferred(self._stop())

    async def _stop(self):
        signal.signal(signal.SIGUSR1, self._previousUSR1 or signal.SIG_DFL)
        self._loop.stop()
        await self.flush()
        if self._pending:
            self._log.error(
                "stopping with {count} request lines that could not be written to {path}",
                count=len(self._pending),
                path=self.path,
            )
        self._threads.stop()
        self._threads = None
        self._file.close()

    def _rotateOnSignal(self, signum, frame):
        self._reactor.callFromThread(self._rotateOrSay)
        # twistd rotates its own log on SIGUSR1 too.
        if callable(self._previousUSR1):
            self._previousUSR1(signum, frame)

    def _rotateOrSay(self):
        self.rotate().addErrback(
            lambda failure: self._log.failure("rotating {path} failed", failure, path=self.path)
        )

    def rotate(self) -> Deferred:
        """
        Write what waits, then move the file aside to C{.1} (and the older
        ones up by one) and start a new one.
        """
        return self._inThread(self._file.rotate)

    def flush(self) -> Deferred:
        """
        Write the lines waiting; fires once they are written or the write
        failed.  One write runs at a time: a flush asked for meanwhile
        follows it.
        """
        if self._flushing is not None:
            after: Deferred[None] = Deferred()
            self._flushing.addBoth(lambda _: self.flush().chainDeferred(after))
            return after
        if not self._pending or self._threads is None:
            return succeed(None)
        batch = self._pending
        self._pending, self._pendingBytes = [], 0
        d = deferToThreadPool(self._reactor, self._threads, self._file.write, "".join(batch))
        d.addCallbacks(self._written, self._notWritten, errbackArgs=(batch,))
        self._flushing = d
        return d

    def _inThread(self, work) -> Deferred:
        def afterFlush(_):
            if self._threads is None:
                return None
            return deferToThreadPool(self._reactor, self._threads, work)

        return self.flush().addCallback(afterFlush)

    def _written(self, result):
        self._flushing = None
        if self._pendingBytes >= self.batchBytes:
            self.flush()
        if self._dropped:
            self._log.warn(
                "{path} is written again; {count} request lines were dropped meanwhile",
                path=self.path,
                count=self._dropped,
            )
            self._dropped = 0
        self._lastProblemLogged = None

    def _notWritten(self, failure, batch):
        self._flushing = None
        kept = sum(map(len, batch)) + self._pendingBytes
        if kept <= self.keepBytes:
            self._pending[:0] = batch
            self._pendingBytes = kept
        else:
            self._dropped += len(batch)
        now = self._reactor.seconds()
        if self._lastProblemLogged is None or now - self._lastProblemLogged >= self.problemLogInterval:
            self._lastProblemLogged = now
            self._log.error(
                "cannot write request lines to {path}: {problem}; keeping up to "
                "{keepBytes} bytes of them for the next try",
                path=self.path,
                problem=failure.getErrorMessage(),
                keepBytes=self.keepBytes,
            )
