"""
The slow upstream: hermux's fake OpenRouter (any key accepted) streaming
chat completions one event every C{--interval} seconds, for the
time-to-first-byte and held-stream measurements.

C{GET /bench-status} answers how many connections are open, so the
benchmark can see that streams a proxy dropped were really closed upstream.

    python -m bench.slow_upstream --port 8082 --interval 5
"""

from __future__ import annotations

import argparse
import json
import resource


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interval", type=float, required=True)
    args = parser.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    from twisted.internet import reactor, task
    from twisted.web.resource import Resource

    from hermux.testing import FakeOpenRouter, fakeSite

    fake = FakeOpenRouter(keys=None, eventInterval=args.interval)

    class Status(Resource):
        isLeaf = True

        def render_GET(self, request):
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps({"open": len(site.channels)}).encode()

    class Root(Resource):
        def getChildWithDefault(self, name, request):
            if name == b"bench-status":
                return Status()
            return fake  # a leaf that routes on the whole request.path

    site = fakeSite(fake)
    site.resource = Root()
    # The fake records every request it receives; the benchmark sends tens
    # of thousands, so forget them now and then.
    task.LoopingCall(fake.received.clear).start(5.0, now=False)
    reactor.listenTCP(args.port, site, interface="127.0.0.1", backlog=1024)
    reactor.run()


if __name__ == "__main__":
    main()
