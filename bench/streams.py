"""
Holds many streaming chat completions open through a proxy, for measuring
what each open stream costs it.

Opens C{--count} connections (at most C{--open-concurrency} being opened at
a time), sends a streaming chat request on each, waits for the answer's
head and first event, and then keeps reading and discarding what arrives.
It reports on stdout, one JSON object per line:

    {"event": "progress", "opened": 1200, "failed": 0}
    {"event": "opened", "opened": 1000, "failed": 0, "failures": {}, "seconds": 3.1}
    {"event": "closed", "endedEarly": 0, "bytes": 123456, "seconds": 0.2}

It closes every connection when it reads a line on stdin, or at
C{--deadline} seconds after it started, whichever comes first, and exits.

    python -m bench.streams --port 8083 --token T --count 1000
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import resource
import sys
import threading
import time

from bench.clients import requestBytes, statusOf


def report(**fields) -> None:
    print(json.dumps(fields), flush=True)


class Streams:
    def __init__(self, args):
        self.args = args
        self.request = requestBytes(
            args.port,
            args.path,
            json.dumps(
                {
                    "model": "meta-llama/llama-3.3-70b-instruct:free",
                    "messages": [{"role": "user", "content": "Write a long story. "
                                  + "Lorem ipsum dolor sit amet. " * (args.prompt_kb * 1024 // 28)}],
                    "stream": True,
                    "max_tokens": args.max_tokens,
                }
            ).encode(),
            args.token,
        ).replace(b"Connection: close\r\n", b"")
        self.opened = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.endedEarly = 0
        self.bytes = 0
        self.transports = []
        self.closing = False

    async def stream(self, opening: asyncio.Semaphore) -> None:
        async with opening:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.args.port), 30
                )
            except (OSError, asyncio.TimeoutError) as e:
                self.failures[f"connect: {type(e).__name__}"] += 1
                return
            self.transports.append(writer.transport)
            try:
                writer.write(self.request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
                status = statusOf(head)
                if status != 200:
                    self.failures[f"status {status}"] += 1
                    writer.transport.abort()
                    return
                first = await asyncio.wait_for(reader.read(65536), 60)
                if not first:
                    self.failures["closed before the first event"] += 1
                    return
                self.bytes += len(first)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                self.failures[type(e).__name__] += 1
                writer.transport.abort()
                return
            self.opened += 1
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    if not self.closing:
                        self.endedEarly += 1
                    return
                self.bytes += len(data)
        except OSError:
            if not self.closing:
                self.endedEarly += 1

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        stop = asyncio.Event()

        def waitForStdin():
            sys.stdin.readline()
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=waitForStdin, daemon=True).start()
        loop.call_later(self.args.deadline, stop.set)

        opening = asyncio.Semaphore(self.args.open_concurrency)
        tasks = [asyncio.create_task(self.stream(opening)) for _ in range(self.args.count)]

        async def progress():
            while True:
                await asyncio.sleep(2)
                report(event="progress", opened=self.opened, failed=sum(self.failures.values()))

        ticker = asyncio.create_task(progress())
        waiting = asyncio.create_task(stop.wait())
        while self.opened + sum(self.failures.values()) < self.args.count and not stop.is_set():
            await asyncio.wait([waiting], timeout=0.05)
        ticker.cancel()
        report(
            event="opened",
            opened=self.opened,
            failed=sum(self.failures.values()),
            failures=dict(self.failures),
            seconds=round(time.monotonic() - started, 3),
        )
        await stop.wait()
        closing = time.monotonic()
        self.closing = True
        for transport in self.transports:
            transport.abort()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        report(
            event="closed",
            endedEarly=self.endedEarly,
            bytes=self.bytes,
            seconds=round(time.monotonic() - closing, 3),
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/api/v1/chat/completions")
    parser.add_argument("--token", default=None)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--prompt-kb", type=int, default=0, help="make each request about this much larger")
    parser.add_argument("--open-concurrency", type=int, default=32)
    parser.add_argument("--deadline", type=float, default=300.0)
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.count + 100:
        report(event="error", message=f"the file-descriptor limit {hard} is too low")
        sys.exit(1)
    asyncio.run(Streams(args).run())


if __name__ == "__main__":
    main()
