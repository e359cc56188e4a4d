# -*- test-case-name: tests.test_tap -*-
"""
The one place where hermux's components are made and connected: the key
pool, the access list and throttle, the upstream and the relay, the
resource tree and the site, and the services that run beside them.

L{makeService} (twistd), the test harness and the benchmarks all build
hermux with L{assemble}, so that what is tested is what runs.
"""

from __future__ import annotations

__all__ = ["Components", "assemble"]

from collections.abc import Mapping

import attr
from twisted.application.service import IService
from twisted.web.resource import Resource

from hermux.access import AccessList, AuthThrottle, TrustedProxies
from hermux.clients import ClientBook, TalliedLedger
from hermux.config import Configuration
from hermux.demo import DemoUpstream
from hermux.keypool import KeyPool
from hermux.ledger import ILedger
from hermux.metrics import Metrics
from hermux.probe import KeyProbe
from hermux.relay import Relay
from hermux.reload import ConfigReloader
from hermux.requestlog import IRequestLog
from hermux.resource import buildRoot
from hermux.shared import SharedPool, defaultInstanceName, parseRedisURL
from hermux.site import HermuxSite
from hermux.upstream import Upstream, connectToUpstream


@attr.frozen
class Components:
    """
    A hermux, built but not started.

    @ivar services: the services that must run beside the site, by name, in
        the order they start (they stop in the reverse order: the request
        log and the ledger, first, stop last and write the final lines and
        counts).
    """

    configuration: Configuration
    metrics: Metrics
    ledger: ILedger
    requestLog: IRequestLog | None
    pool: KeyPool
    clients: ClientBook
    access: AccessList
    throttle: AuthThrottle
    shared: SharedPool | None
    upstream: Upstream
    relay: Relay
    root: Resource
    site: HermuxSite
    reloader: ConfigReloader
    services: tuple[tuple[str, IService], ...]


def assemble(
    configuration: Configuration,
    options: Mapping,
    *,
    ledger: ILedger,
    requestLog: IRequestLog | None = None,
    reactor,
) -> Components:
    """
    Build hermux from its loaded C{configuration} and its C{options} (a
    parsed L{hermux.tap.Options}, or one with some values set by a test).

    The ledger and the request log are opened by the caller: opening them
    touches the disk, and what to do when that fails is the caller's.
    """
    metrics = Metrics()
    clients = ClientBook(ledger, reactor=reactor)
    pool = KeyPool(configuration.keys, ledger=TalliedLedger(ledger, clients), reactor=reactor)
    metrics.watch(pool)
    access = AccessList(configuration.accessTokens, configuration.clients)
    throttle = AuthThrottle(options["auth-failures"], reactor=reactor)
    shared = None
    if options.get("redis") is not None:
        target = options["redis"]
        if isinstance(target, str):
            target = parseRedisURL(target)
        shared = SharedPool(
            target,
            pool=pool,
            book=clients,
            throttle=throttle,
            instance=options.get("instance-name") or defaultInstanceName(options["listen"]),
            prefix=options.get("redis-prefix") or "hermux",
            reactor=reactor,
        )
    upstream = connectToUpstream(
        options["upstream"],
        reactor=reactor,
        trustRoot=options["upstream-ca"],
        connectTimeout=options["connect-timeout"],
    )
    relay = Relay(
        upstream, pool, idleTimeout=options["idle-timeout"], metrics=metrics, reactor=reactor
    )
    root = buildRoot(
        pool,
        access,
        relay,
        ledger,
        metrics,
        throttle,
        reactor=reactor,
        book=clients,
        problems=() if shared is None else (shared.problem,),
    )
    site = HermuxSite(
        root,
        maxBody=options["max-body"],
        clientTimeout=options["client-timeout"],
        maxConnections=options["max-connections"],
        access=access,
        trustedProxies=TrustedProxies(options["trusted-proxy"]),
        metrics=metrics,
        requestLog=requestLog,
        reactor=reactor,
    )
    reloader = ConfigReloader(
        options["tokens"],
        options["allow"],
        pool,
        access,
        clientsPath=options.get("clients"),
        clients=configuration.clients,
        reactor=reactor,
    )
    reloader.onReload = metrics.reloaded

    services: list[tuple[str, IService]] = [
        (name, service)
        for name, service in (("access-log", requestLog), ("ledger", ledger))
        if IService.providedBy(service)
    ]
    services += [("keypool", pool), ("upstream", upstream)]
    if shared is not None:
        services.append(("redis", shared))
    if options["demo"]:
        demo = DemoUpstream(upstream, [key.token for key in configuration.keys], reactor=reactor)
        services.append(("demo", demo))
    if options["probe-keys"] or options["probe-interval"]:
        probe = KeyProbe(
            pool, upstream, atStart=options["probe-keys"], interval=options["probe-interval"],
            reactor=reactor,
        )
        services.append(("probe", probe))
    services.append(("reloader", reloader))

    return Components(
        configuration=configuration,
        metrics=metrics,
        ledger=ledger,
        requestLog=requestLog,
        pool=pool,
        clients=clients,
        access=access,
        throttle=throttle,
        shared=shared,
        upstream=upstream,
        relay=relay,
        root=root,
        site=site,
        reloader=reloader,
        services=tuple(services),
    )
