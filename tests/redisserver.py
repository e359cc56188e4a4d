"""
A real C{redis-server} for the tests (Debian's package), on a free loopback
port in a temporary directory of its own, with nothing saved to disk.  It is
stopped with the test, whatever happens, so that no process is left behind;
a test may also kill it (SIGKILL) and start it again, empty, on the same
port.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet import reactor as _globalReactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import deferLater

from tests.harness import closedFreePort
from tests.programs import requireProgram


class _RedisProcess(ProcessProtocol):
    """
    One run of redis-server: its output, collected, and C{ended}, which
    fires (with the reason) when it exits.
    """

    def __init__(self):
        self.output = b""
        self.ended = Deferred()
        self.exited = False

    def outReceived(self, data):
        # Bounded: redis-server says little, but a loop must not eat memory.
        self.output = (self.output + data)[-64 * 1024:]

    errReceived = outReceived

    def processEnded(self, reason):
        self.exited = True
        self.reason = reason
        self.ended.callback(None)


class _FirstLine(Protocol):
    """
    Send one inline command and collect the first line of the answer.
    """

    def __init__(self, command: bytes):
        self._command = command
        self._received = b""
        self.line = Deferred()
        self.lost = Deferred()

    def connectionMade(self):
        self.transport.write(self._command + b"\r\n")

    def dataReceived(self, data):
        self._received += data
        if b"\r\n" in self._received and not self.line.called:
            self.line.callback(self._received.split(b"\r\n", 1)[0])
            self.transport.loseConnection()

    def connectionLost(self, reason):
        if not self.line.called:
            self.line.errback(reason)
        self.lost.callback(None)


class RedisServer:
    """
    C{redis-server} on C{127.0.0.1:port}, started by L{start}.

    @ivar port: its port, the same across restarts.
    @ivar password: what C{--requirepass} it is started with, if any.
    @ivar directory: its working directory (removed with the test).
    """

    def __init__(self, testCase, *, password: str | None = None, port: int | None = None, reactor=None):
        self.program = requireProgram(testCase, "redis-server", "redis-server")
        self._reactor = _globalReactor if reactor is None else reactor
        self.port = closedFreePort() if port is None else port
        self.password = password
        self.directory = tempfile.mkdtemp(prefix="hermux-redis-")
        self._process: _RedisProcess | None = None
        self._transport = None
        testCase.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)
        # Cleanups run last-added first: this one, added before any hermux
        # of the test is built, runs after they are stopped.
        testCase.addCleanup(self.stop)

    @property
    def url(self) -> str:
        """
        The URL that reaches it (without the password).
        """
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and not self._process.exited

    @property
    def output(self) -> bytes:
        """
        What the latest run wrote (its log), for a failure message.
        """
        return b"" if self._process is None else self._process.output

    def arguments(self) -> list[str]:
        arguments = [
            self.program,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self.directory,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--protected-mode", "no",
        ]
        if self.password is not None:
            arguments += ["--requirepass", self.password]
        return arguments

    async def start(self, timeout: float = 10.0) -> None:
        """
        Start it (again, empty, on the same port after L{kill} or L{stop})
        and wait until it answers C{PING}.
        """
        if self.running:
            raise RuntimeError("redis-server is already running")
        if await self.answers():
            raise AssertionError(f"port {self.port} is taken: something answers PING there")
        process = _RedisProcess()
        self._process = process
        self._transport = self._reactor.spawnProcess(
            process, self.program, self.arguments(), env={"PATH": os.environ.get("PATH", "")},
            path=self.directory,
        )
        waited = 0.0
        while True:
            if process.exited:
                raise AssertionError(
                    f"redis-server on port {self.port} exited at start: {process.output!r}"
                )
            if await self.answers() and not process.exited:
                return
            if waited >= timeout:
                await self.kill()
                raise AssertionError(
                    f"redis-server on port {self.port} did not answer PING in {timeout}s: "
                    f"{process.output!r}"
                )
            await deferLater(self._reactor, 0.02, lambda: None)
            waited += 0.02

    async def answers(self) -> bool:
        """
        Whether something on its port answers C{PING} as Redis does (with
        C{+PONG}, or C{-NOAUTH} when a password is required).
        """
        line = await self.command(b"PING")
        return line is not None and (line.startswith(b"+PONG") or line.startswith(b"-NOAUTH"))

    async def command(self, command: bytes, timeout: float = 1.0) -> bytes | None:
        """
        Send one inline command on a new connection; the first line of the
        answer, or L{None} if there is none within C{timeout} seconds.
        """
        endpoint = TCP4ClientEndpoint(self._reactor, "127.0.0.1", self.port, timeout=timeout)
        protocol = _FirstLine(command)
        try:
            connecting = connectProtocol(endpoint, protocol)
            connecting.addTimeout(timeout, self._reactor)
            await connecting
        except Exception:
            return None
        protocol.line.addTimeout(timeout, self._reactor)
        try:
            return await protocol.line
        except Exception:
            return None
        finally:
            # Closed before the test ends, or trial finds it open.
            protocol.transport.loseConnection()
            await protocol.lost

    async def _signal(self, signal: str, wait: float) -> bool:
        """
        Send C{signal} to the running process, if any, and wait up to
        C{wait} seconds for it to exit; whether it did.
        """
        process = self._process
        if process is None or process.exited:
            return True
        try:
            self._transport.signalProcess(signal)
        except ProcessExitedAlready:
            pass
        waited = 0.0
        while not process.exited and waited < wait:
            await deferLater(self._reactor, 0.01, lambda: None)
            waited += 0.01
        return process.exited

    async def kill(self) -> None:
        """
        Kill it with SIGKILL, as a crash would, and wait until it is gone.
        """
        if not await self._signal("KILL", 10.0):
            raise AssertionError(f"redis-server (port {self.port}) survived SIGKILL")

    async def stop(self) -> None:
        """
        Stop it with SIGTERM, or SIGKILL if it does not exit within 5 s.
        """
        if not await self._signal("TERM", 5.0):
            await self.kill()
