# -*- test-case-name: tests.test_record -*-
"""
What hermux learns about one request, in one record: its id, the client
the gate let in, the key that served it and how it ended.

The site's request makes it (L{hermux.site.HermuxRequest}); the gate, the
resources and the relay fill it in through L{recordOf}, which also gives
any other twisted.web request a record of its own; when the request is
over, its metrics and its line in the request log are read from it.  To
log something more, add a field here, give it to the line in
L{RequestRecord.logFields}, and name it in
L{hermux.requestlog.REQUEST_LINE}.
"""

from __future__ import annotations

__all__ = ["RequestRecord", "recordOf", "statusOf", "printable"]

import re

import attr

from hermux.access import Client, Lookup
from hermux.channel import peerText


def _addressText(address) -> str:
    # A client named by a proxy has no port hermux knows (port 0).
    if getattr(address, "host", None) is not None and not address.port:
        return address.host
    return peerText(address)


_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def printable(text: str, limit: int = 128) -> str:
    """
    C{text} (a model id a client sent, say) fit for one log line: at most
    C{limit} characters, anything but printable ASCII shown as C{?}.
    """
    text = text[:limit]
    if text.isascii() and text.isprintable():
        return text
    return _UNPRINTABLE.sub("?", text)


def _usageNote(model: str, usage) -> str:
    """
    What the request log line says of a request's model (shown already
    L{printable}) and usage.
    """
    if model == "-":
        return ""
    if usage is None:
        return f"; model {model}, no usage reported"
    return (
        f"; model {model}, {usage.promptTokens}+{usage.completionTokens} tokens"
        f" ({usage.reasoningTokens} reasoning, {usage.cachedTokens} cached),"
        f" cost {usage.cost / 10**9:.9f}".rstrip("0").rstrip(".")
    )


def statusOf(request):
    """
    The status C{request} was answered with, or C{"-"} if no status line
    was sent.
    """
    return request.code if request.startedWriting else "-"


@attr.define
class RequestRecord:
    """
    One request, as hermux's parts saw it.

    @ivar requestId: the client's C{X-Request-Id} if it sent a sane one, a
        new random one otherwise (see L{hermux.site.HermuxRequest}).
    @ivar client: the client the gate let in, once it did.
    @ivar keyName: the name of the key the request was last sent with.
    @ivar outcome: how the exchange ended, if not normally ("client went
        away", an upstream failure, ...).
    @ivar started: when the request was complete and began to be answered,
        in the site's reactor's seconds.
    @ivar tokenLookup: what the C{Authorization} header was found to name,
        once it was looked up: the token is hashed once per request.
    @ivar clientAddress: the client's address, the peer's or, behind a
        trusted proxy, the one the proxy names (see
        L{hermux.access.TrustedProxies}); the throttle counts by it and the
        log line shows it.  L{None} until the site has found it: the peer's
        is used then.
    @ivar model: the model the request was accounted under (the answer's,
        else the request's), once it was sent upstream.
    @ivar usage: what the answer said it used (a L{hermux.usage.Usage}),
        if it said.
    """

    requestId: str = "-"
    client: Client | None = None
    keyName: str | None = None
    outcome: str | None = None
    started: float = 0.0
    tokenLookup: Lookup | None = attr.field(default=None, repr=False)
    clientAddress: object = None
    model: str | None = None
    usage: object = None

    def logFields(self, request, now: float) -> dict:
        """
        The fields of C{request}'s line in the request log (see
        L{hermux.requestlog.REQUEST_LINE}), now that it is over.
        """
        outcome = self.outcome
        model = "-" if self.model is None else printable(self.model)
        address = self.clientAddress
        if address is None:
            address = request.getClientAddress()
        return {
            "requestId": self.requestId,
            "method": request.method.decode("ascii", "replace"),
            "path": request.path.decode("ascii", "replace"),
            "status": statusOf(request),
            "key": self.keyName or "-",
            "client": "-" if self.client is None else self.client.label,
            "bytes": request.sentLength,
            "duration": now - self.started,
            "peer": _addressText(address),
            "outcome": outcome or "complete",
            "outcomeNote": f" ({outcome})" if outcome else "",
            "model": model,
            "usageNote": _usageNote(model, self.usage),
            # Prompt, completion, reasoning and cached tokens and cost (in
            # nanocredits), or None.
            "usage": None if self.usage is None else tuple(self.usage)[1:],
        }


def recordOf(request) -> RequestRecord:
    """
    The record of C{request}: the one a L{hermux.site.HermuxRequest} made,
    or, for any other request (a plain L{twisted.web.server.Request}), one
    made at the first call.
    """
    try:
        return request.hermuxRecord
    except AttributeError:
        record = request.hermuxRecord = RequestRecord()
        return record
