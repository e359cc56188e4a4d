"""
The tests' own redis-server (L{tests.redisserver}): it starts and answers,
a password is required when one is set, a kill leaves the port free and a
restart on it is empty, and nothing is left running after the test.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import TestCase

from tests.redisserver import RedisServer


def processExists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class RedisServerTests(TestCase):
    timeout = 30

    async def test_startsAndAnswers(self):
        """
        Started, it answers C{PING} on its port and keeps what it is given
        (in memory: nothing is saved in its directory).
        """
        server = RedisServer(self)
        self.assertEqual(server.url, f"redis://127.0.0.1:{server.port}/0")
        self.assertFalse(server.running)
        self.assertFalse(await server.answers())
        await server.start()
        self.assertTrue(server.running)
        self.assertEqual(await server.command(b"PING"), b"+PONG")
        self.assertEqual(await server.command(b"SET hermux-test 7"), b"+OK")
        self.assertEqual(await server.command(b"GET hermux-test"), b"$1")
        self.assertEqual(await server.command(b"CONFIG GET save"), b"*2")

    async def test_killAndRestartEmpty(self):
        """
        SIGKILL ends it at once (the port answers nothing); started again it
        is on the same port, empty.
        """
        server = RedisServer(self)
        await server.start()
        port = server.port
        pid = server._transport.pid
        self.assertEqual(await server.command(b"SET hermux-test 7"), b"+OK")
        await server.kill()
        self.assertFalse(server.running)
        self.assertFalse(processExists(pid))
        self.assertIsNone(await server.command(b"PING", timeout=0.5))
        await server.start()
        self.assertEqual(server.port, port)
        self.assertEqual(await server.command(b"GET hermux-test"), b"$-1")
        self.assertEqual(await server.command(b"DBSIZE"), b":0")

    async def test_password(self):
        """
        With a password, it answers C{-NOAUTH} until one authenticates.
        """
        server = RedisServer(self, password="fixture-pass-9d1c")
        await server.start()
        self.assertTrue((await server.command(b"GET x")).startswith(b"-NOAUTH"))
        self.assertEqual(await server.command(b"AUTH fixture-pass-9d1c"), b"+OK")
        self.assertTrue((await server.command(b"AUTH wrong")).startswith(b"-WRONGPASS"))

    async def test_stoppedWithTheTest(self):
        """
        Its cleanup stops it (SIGTERM) and removes its directory; stopping
        twice, or one never started, is harmless.
        """
        server = RedisServer(self)
        await server.start()
        pid = server._transport.pid
        directory = server.directory
        await server.stop()
        self.assertFalse(processExists(pid))
        await server.stop()
        await server.kill()
        self.assertTrue(os.path.isdir(directory))
        await RedisServer(self).stop()

    async def test_portInUse(self):
        """
        A port already taken (here by another redis-server) makes L{start}
        fail with redis-server's own words, leaving nothing running.
        """
        first = RedisServer(self)
        await first.start()
        second = RedisServer(self, port=first.port)
        error = None
        try:
            await second.start()
        except AssertionError as e:
            error = e
        self.assertIsNotNone(error)
        self.assertIn(f"port {first.port} is taken", str(error))
        self.assertFalse(second.running)
