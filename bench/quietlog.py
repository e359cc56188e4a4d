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


def fastObserver():
    """
    The same lines as twistd's text log, made cheaply: C{str.format} on the
    event's format string instead of twisted.logger's flattening formatter,
    the timestamp formatted once per second, and the lines written in one
    batch every 50 ms instead of one write and flush per line.
    C{twistd --logger=bench.quietlog.fastObserver ...}.
    """
    import atexit
    import time

    from twisted.logger import formatEventAsClassicLogText

    out = sys.stdout
    pending: list[str] = []
    state = {"scheduled": False, "second": None, "stamp": ""}

    def flush():
        state["scheduled"] = False
        if pending:
            out.write("".join(pending))
            pending.clear()
            out.flush()

    atexit.register(flush)

    @provider(ILogObserver)
    def observe(event):
        text = None
        form = event.get("log_format")
        if form is not None and "log_failure" not in event:
            try:
                text = form.format(**event)
            except Exception:
                text = None
        if text is None:
            line = formatEventAsClassicLogText(event)
            if not line:
                return
        else:
            stamp = event.get("log_timestamp") or time.time()
            second = int(stamp)
            if second != state["second"]:
                state["second"] = second
                state["stamp"] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(stamp))
            system = event.get("log_system")
            if system is None:
                level = event.get("log_level")
                system = f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
            line = f"{state['stamp']} [{system}] {text}\n"
        pending.append(line)
        if not state["scheduled"]:
            from twisted.internet import reactor

            state["scheduled"] = True
            reactor.callLater(0.05, flush)

    return observe
