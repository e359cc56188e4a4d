"""
The naive baseline: twisted.web.proxy.ReverseProxyResource in front of an
upstream, with no authentication and no keys, logging one access-log line
per request to stdout as hermux does.

It reconnects to the upstream for every request (HTTP/1.0), reads each
request body whole, and writes the upstream's answer to the client with no
flow control.

    python -m bench.naive_proxy --port 8081 --upstream-port 8080 [--no-log]
"""

from __future__ import annotations

import argparse
import resource
import sys


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--no-log", action="store_true", help="no access log")
    args = parser.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.web.proxy import ReverseProxyResource
    from twisted.web.server import Site

    if not args.no_log:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    site = Site(ReverseProxyResource("127.0.0.1", args.upstream_port, b""))
    if args.no_log:
        site.log = lambda request: None
    reactor.listenTCP(args.port, site, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
