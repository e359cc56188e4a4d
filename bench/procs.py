"""
The processes a benchmark runs, and what /proc says about them: CPU time,
resident memory, open file descriptors.

Every process started here is ended by its own pid when the benchmark is
over, whatever happens.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time

_TICKS = os.sysconf("SC_CLK_TCK")


def prepare(prefix: str) -> str:
    """
    Ready this process to run a benchmark: as many open files as it may
    have (its children inherit the limit), SIGTERM stopping the processes
    started so far as ^C does, and a new temporary directory, returned.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return tempfile.mkdtemp(prefix=prefix)


def cpuSeconds(pid: int) -> float:
    """
    User plus system CPU seconds used so far by process C{pid}, all threads
    included (fields 14 and 15 of /proc/<pid>/stat).
    """
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces; it ends at the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rssKiB(pid: int) -> int:
    """
    Resident memory of process C{pid} in KiB (VmRSS in /proc/<pid>/status).
    """
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    raise ValueError(f"no VmRSS for pid {pid}")


def openFiles(pid: int) -> int:
    """
    How many file descriptors process C{pid} has open.
    """
    return len(os.listdir(f"/proc/{pid}/fd"))


def childPids(pid: int) -> list[int]:
    """
    The pids of the direct children of C{pid} (for nginx's workers).
    """
    children = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[1]) == pid:
            children.append(int(name))
    return children


def freePort() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on right now.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """
    A child process of the benchmark, with its output going to a file.
    """

    def __init__(self, name: str, argv: list[str], logPath: str, *, env=None, cwd=None):
        self.name = name
        self.argv = argv
        self.logPath = logPath
        self._log = open(logPath, "wb")
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu(self) -> float:
        return cpuSeconds(self.pid)

    def rss(self) -> int:
        return rssKiB(self.pid)

    def files(self) -> int:
        return openFiles(self.pid)

    def waitForPort(self, port: int, timeout: float = 20.0) -> None:
        """
        Wait until something accepts connections on C{port}, or fail with
        the end of the process's log if it exits or takes too long.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with status {self.popen.returncode}:\n{self.tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not listen on {port} within {timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        self._log.flush()
        with open(self.logPath, "rb") as f:
            return b"".join(f.readlines()[-lines:]).decode("utf-8", "replace")

    def stop(self, timeout: float = 10.0) -> None:
        """
        End the process (SIGTERM, then SIGKILL) and close its log.
        """
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        self._log.close()


class Processes:
    """
    The processes of one benchmark run, stopped together (newest first).
    """

    def __init__(self):
        self._running: list[Process] = []

    def start(self, name, argv, logPath, **kwargs) -> Process:
        process = Process(name, argv, logPath, **kwargs)
        self._running.append(process)
        return process

    def find(self, pid: int) -> Process:
        """
        The running process whose pid is C{pid}.
        """
        return next(p for p in self._running if p.pid == pid)

    def stop(self, process: Process) -> None:
        process.stop()
        if process in self._running:
            self._running.remove(process)

    def stopAll(self) -> None:
        while self._running:
            process = self._running.pop()
            try:
                process.stop()
            except Exception as e:
                print(f"bench: could not stop {process.name}: {e}", file=sys.stderr)
