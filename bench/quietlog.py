"""
A twistd log observer that drops everything but errors, for measuring
hermux with its per-request log line emitted but neither formatted nor
written: C{twistd --logger=bench.quietlog.observer ...}.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, LogLevel, formatEventAsClassicLogText
from zope.interface import provider

_LOUD = (LogLevel.warn, LogLevel.error, LogLevel.critical)


def observer():
    @provider(ILogObserver)
    def dropAllButErrors(event):
        if event.get("log_level") in _LOUD or event.get("isError"):
            sys.stderr.write(formatEventAsClassicLogText(event))
            sys.stderr.flush()

    return dropAllButErrors
