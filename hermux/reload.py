# -*- test-case-name: tests.test_operations -*-
"""
Reloading the configuration while hermux runs: C{kill -HUP <pid>} re-reads
tokens.csv, allow.txt and clients.csv, and applies them whole, or not at
all if any has an error.
"""

from __future__ import annotations

__all__ = ["describeKeyChanges", "describeClientChanges", "ConfigReloader"]

import signal

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from hermux.access import AccessList
from hermux.config import ClientEntry, ConfigError, Configuration, Key, loadConfiguration
from hermux.keypool import KeyPool


def describeKeyChanges(old: tuple[Key, ...], new: tuple[Key, ...]) -> list[str]:
    """
    What changed between two sets of keys, by name only.
    """
    before = {key.name: key for key in old}
    after = {key.name: key for key in new}
    changes = []
    added = [name for name in after if name not in before]
    removed = [name for name in before if name not in after]
    changed = [
        name for name in after
        if name in before and before[name].token != after[name].token
    ]
    limited = [
        name for name in after
        if name in before and before[name].dailyLimit != after[name].dailyLimit
    ]
    for words, names in (
        ("keys added", added),
        ("keys removed", removed),
        ("keys with a new token", changed),
        ("keys with a new daily_limit", limited),
    ):
        if names:
            changes.append(f"{words}: {', '.join(names)}")
    return changes


def describeClientChanges(old: tuple[ClientEntry, ...], new: tuple[ClientEntry, ...]) -> list[str]:
    """
    What changed between two sets of clients, by name only.
    """
    before = {entry.name: entry for entry in old}
    after = {entry.name: entry for entry in new}
    changes = []
    for words, names in (
        ("clients added", [name for name in after if name not in before]),
        ("clients removed", [name for name in before if name not in after]),
        ("clients changed", [n for n in after if n in before and before[n] != after[n]]),
    ):
        if names:
            changes.append(f"{words}: {', '.join(names)}")
    return changes


class ConfigReloader(Service):
    """
    Re-reads the configuration files on SIGHUP (or when L{reload} is
    called), off the reactor thread, and applies them to the key pool and
    the access list.

    @ivar onReload: called with C{True} or C{False} after each reload, for
        the metrics.
    """

    _log = Logger()

    def __init__(
        self,
        tokensPath: str,
        allowPath: str | None,
        pool: KeyPool,
        access: AccessList,
        *,
        clientsPath: str | None = None,
        clients: tuple[ClientEntry, ...] = (),
        reactor=None,
    ):
        if reactor is None:
            from twisted.internet import reactor
        self._tokensPath = tokensPath
        self._allowPath = allowPath
        self._clientsPath = clientsPath
        self._clients = clients  # those in use now, to tell what a reload changes
        self._pool = pool
        self._access = access
        self._reactor = reactor
        self._previousHandler = None
        self.onReload = lambda succeeded: None

    def startService(self):
        super().startService()
        self._previousHandler = signal.signal(signal.SIGHUP, self._hangUp)

    def stopService(self):
        super().stopService()
        if self._previousHandler is not None:
            signal.signal(signal.SIGHUP, self._previousHandler)
            self._previousHandler = None

    def _hangUp(self, signum, frame):
        self._reactor.callFromThread(self.reload)

    def reload(self) -> Deferred[bool]:
        """
        Read and apply the configuration files; fires with whether they were
        applied.
        """
        paths = [p for p in (self._tokensPath, self._allowPath, self._clientsPath) if p is not None]
        self._log.info("reloading {files}", files=", ".join(paths))
        d = deferToThread(loadConfiguration, self._tokensPath, self._allowPath, self._clientsPath)
        return d.addCallbacks(self._apply, self._reject)

    def _apply(self, configuration: Configuration) -> bool:
        changes = describeKeyChanges(self._pool.keys, configuration.keys)
        changes += describeClientChanges(self._clients, configuration.clients)
        self._clients = configuration.clients
        self._pool.replaceKeys(configuration.keys)
        added, removed = self._access.replace(configuration.accessTokens, configuration.clients)
        if added or removed:
            changes.append(f"access tokens: {added} added, {removed} removed")
        self._log.info(
            "configuration reloaded: {changes}",
            changes="; ".join(changes) or "nothing changed",
        )
        self.onReload(True)
        return True

    def _reject(self, failure) -> bool:
        if failure.check(ConfigError):
            self._log.error(
                "configuration not reloaded, the current one stays: {error}",
                error=str(failure.value),
            )
        else:
            self._log.failure("configuration not reloaded, the current one stays", failure)
        self.onReload(False)
        return False
