"""
Where request lines go: twisted.logger events by default, or a file of
their own (--access-log) written in batches and rotated like twistd's log.
"""

from __future__ import annotations

import os
import re
import signal
from datetime import datetime

from twisted.logger import LogLevel, capturedLogs, formatEvent, formatTime
from twisted.trial.unittest import TestCase

from hermux.requestlog import REQUEST_LINE, RequestLogFile, RequestLogEvents
from tests.harness import waitUntil

FIELDS = {
    "requestId": "0123456789abcdef",
    "method": "POST",
    "path": "/api/v1/chat/completions",
    "status": 200,
    "key": "alpha",
    "client": "client-1",
    "bytes": 612,
    "duration": 0.01234,
    "peer": "127.0.0.1:40000",
    "outcome": "complete",
    "outcomeNote": "",
    "model": "-",
    "usageNote": "",
}

# twistd's timestamps: 2026-11-26T10:00:00+0000
_LINE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}) (.*)\n")


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


class RequestLogEventsTests(TestCase):
    def test_oneEventWithTheFields(self):
        """
        By default each request's line is a twisted.logger event in the
        namespace twistd's log shows, with every field.
        """
        with capturedLogs() as events:
            RequestLogEvents().record(dict(FIELDS))
        [event] = events
        self.assertEqual(event["log_namespace"], "hermux.site.HermuxRequest")
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual({name: event[name] for name in FIELDS}, FIELDS)
        self.assertEqual(
            formatEvent(event),
            "0123456789abcdef POST /api/v1/chat/completions -> 200 via alpha for "
            "client-1: 612 bytes in 0.012s from 127.0.0.1:40000",
        )


class RequestLogFileTests(TestCase):
    def accessLog(self, *, interval: float = 3600.0, path: str | None = None) -> RequestLogFile:
        """
        A started access log, stopped with the test (unless the test stops it).
        """
        if path is None:
            path = os.path.abspath(self.mktemp())
        log = RequestLogFile(path, interval=interval)
        log.startService()
        self.addCleanup(lambda: log.running and log.stopService())
        return log

    async def test_linesWaitForTheBatch(self):
        """
        Lines are held until the batch is written, then written together,
        each as twistd's log would show the same event: its timestamp, then
        the same text.
        """
        log = self.accessLog()
        log.record(FIELDS)
        log.record({**FIELDS, "status": 502, "outcome": "upstream broke",
                    "outcomeNote": " (upstream broke)"})
        self.assertEqual(read(log.path), "")
        await log.flush()
        lines = read(log.path).splitlines(keepends=True)
        self.assertEqual(len(lines), 2)
        stamp = _LINE.fullmatch(lines[0]).group(1)
        second = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z").timestamp()
        self.assertEqual(stamp, formatTime(second))
        texts = [_LINE.fullmatch(line).group(2) for line in lines]
        with capturedLogs() as events:
            RequestLogEvents().record(FIELDS)
        self.assertEqual(texts[0], formatEvent(events[0]))
        self.assertEqual(texts[1], REQUEST_LINE.format_map(
            {**FIELDS, "status": 502, "outcomeNote": " (upstream broke)"}))
        self.assertTrue(texts[1].endswith("from 127.0.0.1:40000 (upstream broke)"))

    async def test_writtenEveryInterval(self):
        log = self.accessLog(interval=0.05)
        log.record(FIELDS)
        await waitUntil(lambda: read(log.path).count("\n") == 1)

    async def test_fullBatchIsWrittenAtOnce(self):
        log = self.accessLog()
        log.batchBytes = 300
        log.record(FIELDS)
        await log.flush()
        log.record(FIELDS)
        log.record(FIELDS)
        self.assertEqual(read(log.path).count("\n"), 1)
        log.record(FIELDS)
        await waitUntil(lambda: read(log.path).count("\n") == 4)

    async def test_stopWritesTheRest(self):
        log = self.accessLog()
        for _ in range(3):
            log.record(FIELDS)
        await log.stopService()
        self.assertEqual(read(log.path).count("\n"), 3)

    async def test_rotate(self):
        """
        Rotating writes what waits to the old file, moves it to .1, and
        starts a new one.
        """
        log = self.accessLog()
        log.record(FIELDS)
        await log.rotate()
        log.record({**FIELDS, "status": 404})
        await log.stopService()
        self.assertIn("-> 200", read(log.path + ".1"))
        self.assertNotIn("-> 404", read(log.path + ".1"))
        self.assertIn("-> 404", read(log.path))

    async def test_rotatedAtItsLength(self):
        log = RequestLogFile(os.path.abspath(self.mktemp()), rotateLength=500)
        log.startService()
        for _ in range(6):
            log.record(FIELDS)
            await log.flush()
        await log.stopService()
        self.assertTrue(os.path.exists(log.path + ".1"))
        self.assertEqual((read(log.path) + read(log.path + ".1")).count("\n"), 6)

    async def test_SIGUSR1RotatesAndStillReachesTheHandlerBefore(self):
        """
        SIGUSR1 rotates the access log and then calls the handler that was
        there before (twistd's, which rotates its own log); stopping puts
        that handler back.
        """
        signals = []

        def before(signum, frame):
            signals.append(signum)

        original = signal.signal(signal.SIGUSR1, before)
        self.addCleanup(signal.signal, signal.SIGUSR1, original)
        log = self.accessLog()
        log.record(FIELDS)
        os.kill(os.getpid(), signal.SIGUSR1)
        await waitUntil(lambda: os.path.exists(log.path + ".1") and signals)
        await waitUntil(lambda: "-> 200" in read(log.path + ".1"))
        self.assertEqual(signals, [signal.SIGUSR1])
        await log.stopService()
        self.assertIs(signal.getsignal(signal.SIGUSR1), before)

    async def test_failedWritesAreKeptAndRetried(self):
        """
        While the file cannot be written (here it is /dev/full: ENOSPC), its
        lines are kept for the next try and the problem is logged once a
        minute, not once a try; once it is written again, the kept lines go
        first.
        """
        path = os.path.abspath(self.mktemp())
        os.symlink("/dev/full", path)
        log = self.accessLog(path=path)
        with capturedLogs() as events:
            log.record(FIELDS)
            failing = log.flush()
            # A line that comes while the failing write is in flight stays
            # after the kept ones.
            log.record({**FIELDS, "status": 201})
            await failing
            log.record({**FIELDS, "status": 202})
            await log.flush()
        problems = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(problems), 1)
        self.assertIn("No space left on device", formatEvent(problems[0]))
        self.assertIn(path, formatEvent(problems[0]))
        # Rotating moves the link aside: the new file is a real one.
        await log.rotate()
        await log.flush()
        self.assertEqual(
            [line.split(" -> ")[1][:3] for line in read(path).splitlines()], ["200", "201", "202"]
        )

    async def test_pastWhatMayBeKeptLinesAreDroppedAndCounted(self):
        path = os.path.abspath(self.mktemp())
        os.symlink("/dev/full", path)
        log = self.accessLog(path=path)
        log.keepBytes = 250
        with capturedLogs() as events:
            for _ in range(3):
                log.record(FIELDS)
                await log.flush()
            await log.rotate()
            await log.flush()
            self.assertEqual(read(path).count("\n"), 1)
            log.record(FIELDS)
            await log.flush()
        self.assertEqual(read(path).count("\n"), 2)
        [recovered] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertIn("2 request lines were dropped", formatEvent(recovered))

    async def test_pastWhatMayBeKeptTheOldestGo(self):
        """
        When what failed writes keep grows past C{keepBytes}, the oldest
        lines are dropped, not the newest.
        """
        path = os.path.abspath(self.mktemp())
        os.symlink("/dev/full", path)
        log = self.accessLog(path=path)
        log.keepBytes = 250
        with capturedLogs() as events:
            log.record({**FIELDS, "status": 200})
            log.record({**FIELDS, "status": 201})
            await log.flush()
            await log.rotate()
            await log.flush()
        self.assertEqual([line.split(" -> ")[1][:3] for line in read(path).splitlines()], ["201"])
        [recovered] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertIn("1 request lines were dropped", formatEvent(recovered))

    async def test_failedRotationOnSignalIsLogged(self):
        """
        A rotation that SIGUSR1 asked for and that failed is logged, and the
        log goes on in its file.
        """
        log = self.accessLog()

        def cannotRotate():
            raise OSError(13, "Permission denied")

        log._file.rotate = cannotRotate
        with capturedLogs() as events:
            log._rotateOrSay()
            await waitUntil(lambda: any(e.get("log_failure") for e in events))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        log.record(FIELDS)
        await log.flush()
        self.assertEqual(read(log.path).count("\n"), 1)
