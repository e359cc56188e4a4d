# -*- test-case-name: tests.test_requestlog -*-
"""
Where the line each request logs goes: by default into twistd's log as a
twisted.logger event; with C{--access-log}, into a file of its own, written
in batches, which costs a busy hermux far less than an event per request.
"""

from __future__ import annotations

__all__ = ["REQUEST_LINE", "IRequestLog", "RequestLogEvents", "RequestLogFile"]

import signal
import time

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.logfile import LogFile
from zope.interface import Interface, implementer

from hermux.batchwriter import BatchWriter, IBatch, IBatchTarget, writerSetting

# Both destinations format the same fields the same way; str.format reads
# this format as twisted.logger does.
REQUEST_LINE = (
    "{requestId} {method} {path} -> {status} via {key} for {client}: "
    "{bytes} bytes in {duration:.3f}s from {peer}{usageNote}{outcomeNote}"
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


@implementer(IBatch)
class _Lines:
    """
    Request lines not written yet: a batch of L{RequestLogFile}'s writer,
    whose C{size} is in bytes.
    """

    def __init__(self):
        self.lines: list[str] = []
        self.size = 0

    def append(self, line: str) -> None:
        self.lines.append(line)
        self.size += len(line)

    def extend(self, newer: _Lines) -> None:
        self.lines.extend(newer.lines)
        self.size += newer.size

    def trim(self, size: int) -> int:
        dropped = 0
        while self.size > size:
            self.size -= len(self.lines[dropped])
            dropped += 1
        del self.lines[:dropped]
        return dropped


@implementer(IRequestLog, IBatchTarget)
class RequestLogFile(Service):
    """
    Request lines in a file of their own, one per request, each starting
    with twistd's timestamp.

    Lines wait in memory and are written by a L{BatchWriter} of the log's
    own, in one batch every C{interval} seconds or as soon as C{batchBytes}
    wait, and when the service stops; a crash loses at most the last
    C{interval} seconds of lines.  The file is rotated like twistd's log: to
    C{.1}, C{.2}, ... when it reaches C{rotateLength} bytes, and on SIGUSR1.

    A failed write keeps its lines for the next try, up to C{keepBytes};
    past that the oldest are dropped and the log says how many.
    """

    _log = Logger()

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
        # Opening now lets a bad path stop hermux before it serves.
        self._file = LogFile.fromFullPath(path, rotateLength=rotateLength)
        self._writer = BatchWriter(
            self,
            interval=interval,
            reactor=reactor,
            backlog=4 * 1024 * 1024,
            batchSize=64 * 1024,
            threadName="hermux-access-log",
        )
        self._second: int | None = None
        self._stamp = ""
        self._previousUSR1 = None

    batchBytes = writerSetting("batchSize", "Bytes of lines written at once, without waiting.")
    keepBytes = writerSetting("backlog", "Bytes of lines kept while writes fail.")
    problemLogInterval = writerSetting(
        "problemLogInterval", "How often, at most, a write problem is logged, in seconds."
    )

    def record(self, fields):
        second = int(self._reactor.seconds())
        if second != self._second:
            self._second = second
            self._stamp = time.strftime(_TIME_FORMAT, time.localtime(second))
        self._writer.pending.append(f"{self._stamp} {REQUEST_LINE.format_map(fields)}\n")
        self._writer.added()

    def startService(self):
        super().startService()
        self._writer.startService()
        self._previousUSR1 = signal.signal(signal.SIGUSR1, self._rotateOnSignal)

    def stopService(self):
        super().stopService()
        return ensureDeferred(self._stop())

    async def _stop(self):
        signal.signal(signal.SIGUSR1, self._previousUSR1 or signal.SIG_DFL)
        await self._writer.stopService()
        if self._writer.pending.size:
            self._log.error(
                "stopping with {count} request lines that could not be written to {path}",
                count=len(self._writer.pending.lines),
                path=self.path,
            )
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
        ones up by one) and start a new one, in the writer's thread.
        """
        return self._writer.flushThen(self._file.rotate)

    def flush(self) -> Deferred:
        """
        Write the lines waiting; fires once they are written or the write
        failed.
        """
        return self._writer.flush()

    # IBatchTarget: how the writer writes a batch of lines.

    def newBatch(self) -> _Lines:
        return _Lines()

    def writeBatch(self, batch: _Lines) -> None:
        self._file.write("".join(batch.lines))

    def writeFailing(self, problem: str) -> None:
        self._log.error(
            "cannot write request lines to {path}: {problem}; keeping up to "
            "{keepBytes} bytes of them for the next try",
            path=self.path,
            problem=problem,
            keepBytes=self.keepBytes,
        )

    def writingAgain(self, dropped: int) -> None:
        if dropped:
            self._log.warn(
                "{path} is written again; {count} request lines were dropped meanwhile",
                path=self.path,
                count=dropped,
            )
