"""
Candidate optimizations of hermux, applied as patches when hermux starts
(see bench/patched_twistd.py), so that their gain can be measured before
anyone changes hermux/ itself.  Each names the change it stands for.
"""

from __future__ import annotations


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


def gcFreeze() -> None:
    """
    Once hermux serves, C{gc.freeze()} moves what startup made out of the
    collector's sight, and the youngest generation is collected after
    10,000 allocations rather than 700: each request allocates a few hundred
    containers that reference counting frees anyway.
    """
    import gc

    from twisted.internet import reactor

    def tune():
        gc.freeze()
        gc.set_threshold(10_000, 20, 20)

    reactor.callWhenRunning(tune)


def cheapId() -> None:
    """
    Request ids from a pseudo-random generator seeded once, instead of
    C{secrets.token_hex}, which asks the kernel for bytes every time.
    """
    import random

    from hermux import site

    generator = random.Random()

    class Secrets:
        @staticmethod
        def token_hex(n):
            return "%0*x" % (2 * n, generator.getrandbits(8 * n))

    site.secrets = Secrets


PATCHES = {
    "directagent": directAgent,
    "gcfreeze": gcFreeze,
    "cheapid": cheapId,
}


def apply(names: str) -> None:
    for name in filter(None, (n.strip() for n in names.split(","))):
        PATCHES[name]()
