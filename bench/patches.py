"""
Candidate optimizations of hermux, applied as patches when hermux starts
(see bench/patched_twistd.py), so that their gain can be measured before
anyone changes hermux/ itself.  Each names the change it stands for.
"""

from __future__ import annotations


def noFormParse() -> None:
    """
    C{HermuxSite} passes C{parsePOSTFormSubmission=False} to C{Site}: Twisted
    then stops parsing the Content-Type of every POST with the C{email}
    package (and stops decoding form bodies into C{request.args}).
    """
    from hermux.site import HermuxSite

    original = HermuxSite.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._parsePOSTFormSubmission = False

    HermuxSite.__init__ = __init__


def directAgent() -> None:
    """
    C{Upstream} parses its base URL, builds its endpoint, pool key and Host
    header once, and sends each request with them, instead of
    C{Agent.request} parsing the URL, building a C{HostnameEndpoint} (with
    IDNA checks) and copying the headers to add Host, every time.  (Agent's
    C{_requestWithEndpoint} is private; a real change would use a small
    IAgent of hermux's own or an endpoint factory that caches.)
    """
    from twisted.web.client import URI

    from hermux.upstream import Upstream

    def request(self, method, target, headers, bodyProducer):
        cached = self.__dict__.get("_fixed")
        if cached is None or cached[0] != self.base:
            parsed = URI.fromBytes(self.base)
            agent = self.agent
            cached = self._fixed = (
                self.base,
                parsed,
                agent._getEndpoint(parsed),
                (parsed.scheme, parsed.host, parsed.port),
                agent._computeHostValue(parsed.scheme, parsed.host, parsed.port),
            )
        base, parsed, endpoint, key, host = cached
        headers.setRawHeaders(b"Host", [host])
        return self.agent._requestWithEndpoint(
            key, endpoint, method, parsed, headers, bodyProducer, target
        )

    Upstream.request = request


def contentLength() -> None:
    """
    The response head keeps the upstream's Content-Length (Twisted's client
    moves it out of C{response.headers} into C{response.length}), so the
    body goes to the client as is instead of re-framed as chunks.  Not for
    HEAD, whose length describes a body that is not sent.
    """
    from twisted.web.iweb import UNKNOWN_LENGTH

    from hermux.relay import _Exchange

    original = _Exchange._sendHead

    def _sendHead(self, response):
        if response.length is not UNKNOWN_LENGTH and self._request.method != b"HEAD":
            self._request.setHeader(b"Content-Length", b"%d" % (response.length,))
        original(self, response)

    _Exchange._sendHead = _sendHead


def breakCycle() -> None:
    """
    At the end of an exchange, the watchdog forgets its C{onIdle} callback.
    C{_Watchdog.onIdle} is the body relay's C{abort} and the body relay's
    C{_kick} is the watchdog's C{kick}: a reference cycle that keeps every
    finished request (its Headers, Deferreds, addresses, ...) alive until the
    cyclic garbage collector runs.
    """
    from hermux.relay import _Exchange

    original = _Exchange.run

    async def run(self):
        try:
            await original(self)
        finally:
            self._watchdog.onIdle = _nothing

    _Exchange.run = run


def _nothing():
    pass


PATCHES = {
    "noformparse": noFormParse,
    "directagent": directAgent,
    "contentlength": contentLength,
    "breakcycle": breakCycle,
}


def apply(names: str) -> None:
    for name in filter(None, (n.strip() for n in names.split(","))):
        PATCHES[name]()
