"""
hermux's benchmark suite: hermux against a direct connection and against
twisted.web.proxy.ReverseProxyResource, in front of the same local upstreams.

Run it with C{bench/run} (or C{python -m bench}); see bench/README.md.
"""
