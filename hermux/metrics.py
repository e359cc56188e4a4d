# -*- test-case-name: tests.test_operations,tests.test_site -*-
"""
hermux's Prometheus metrics, served at C{/hermux/metrics} to clients with an
access token.  Labels name keys, never their tokens.
"""

from __future__ import annotations

__all__ = ["TTFB_BUCKETS", "Metrics", "statusClass"]

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

from hermux.keypool import NANOCREDITS, KeyPool, State
from hermux.record import RequestRecord

# Time to first byte from OpenRouter ranges from milliseconds (an error) to
# a minute (a long reasoning model).
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


_TOKEN_KINDS = ("prompt", "completion", "reasoning", "cached")


def statusClass(status) -> str:
    """
    "2xx" for 200 and so on; "none" when no status line was sent.
    """
    return f"{status // 100}xx" if isinstance(status, int) else "none"


class _KeyCollector:
    """
    Each key's state and today's counts, read from the pool at scrape time.
    """

    def __init__(self, pool: KeyPool):
        self._pool = pool

    def collect(self):
        state = GaugeMetricFamily(
            "hermux_key_state", "1 for the state each key is in, 0 for the others.", labels=["key", "state"]
        )
        requests = GaugeMetricFamily(
            "hermux_key_requests_today", "Requests sent with each key today (UTC).", labels=["key"]
        )
        limited = GaugeMetricFamily(
            "hermux_key_rate_limited_today", "Rate-limited answers for each key today (UTC).", labels=["key"]
        )
        errors = GaugeMetricFamily(
            "hermux_key_errors_today", "Other failed requests for each key today (UTC).", labels=["key"]
        )
        for status in self._pool.statuses():
            for each in State:
                state.add_metric([status.name, each.value], 1 if status.state is each else 0)
            requests.add_metric([status.name], status.requestsToday)
            limited.add_metric([status.name], status.rateLimitedToday)
            errors.add_metric([status.name], status.errorsToday)
        return [state, requests, limited, errors]


class _UsageCollector:
    """
    What the answers said they used, by key and by client, counted in plain
    integers (a Prometheus counter's inc() takes a lock, and a request
    would take several) and read at scrape time.  Keys and clients are
    named by the configuration, never by a client: the series are bounded.
    """

    def __init__(self):
        # key -> [prompt, completion, reasoning, cached tokens, nanocredits]
        self._keys: dict[str, list[int]] = {}
        # client label -> [requests, nanocredits]
        self._clients: dict[str, list[int]] = {}

    def count(self, key: str, client: str | None, usage) -> None:
        """
        Count one request answered for C{client} (its label, or L{None}),
        and what its answer said it used (a L{hermux.usage.Usage}, or
        L{None}) for C{key}.
        """
        clientCounts = None
        if client is not None:
            clientCounts = self._clients.get(client)
            if clientCounts is None:
                clientCounts = self._clients[client] = [0, 0]
            clientCounts[0] += 1
        if usage is None:
            return
        keyCounts = self._keys.get(key)
        if keyCounts is None:
            keyCounts = self._keys[key] = [0, 0, 0, 0, 0]
        keyCounts[0] += usage.promptTokens
        keyCounts[1] += usage.completionTokens
        keyCounts[2] += usage.reasoningTokens
        keyCounts[3] += usage.cachedTokens
        keyCounts[4] += usage.cost
        if clientCounts is not None:
            clientCounts[1] += usage.cost

    def collect(self):
        tokens = CounterMetricFamily(
            "hermux_tokens",
            "Tokens the upstream's answers said they used, by key and kind "
            "(prompt, completion, reasoning, cached).",
            labels=["key", "kind"],
        )
        cost = CounterMetricFamily(
            "hermux_cost", "Credits the upstream's answers said they cost, by key.", labels=["key"]
        )
        clientRequests = CounterMetricFamily(
            "hermux_client_requests",
            "Client requests answered, by client (its name in clients.csv, its label for allow.txt).",
            labels=["client"],
        )
        clientCost = CounterMetricFamily(
            "hermux_client_cost",
            "Credits the upstream's answers said they cost, by client.",
            labels=["client"],
        )
        for key, counts in self._keys.items():
            for kind, count in zip(_TOKEN_KINDS, counts):
                tokens.add_metric([key, kind], count)
            cost.add_metric([key], counts[4] / NANOCREDITS)
        for client, (requests, nanocredits) in self._clients.items():
            clientRequests.add_metric([client], requests)
            clientCost.add_metric([client], nanocredits / NANOCREDITS)
        return [tokens, cost, clientRequests, clientCost]


class Metrics:
    """
    The metrics, in a registry of their own (so that tests and several
    hermux in one process never share one).
    """

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hermux_requests",
            "Client requests answered, by the key that served them and the status class.",
            ["key", "status"],
            registry=self.registry,
        )
        self.retries = Counter(
            "hermux_retries",
            "Requests sent again with another key, by what the key's answer meant "
            "(cooling, exhausted, disabled, over_budget); and requests not sent again "
            "though the answer asked for it (stopped_breaker: two keys gave the same "
            "kind of answer; stopped_over_budget: two keys found the request too costly).",
            ["reason"],
            registry=self.registry,
        )
        self.ttfb = Histogram(
            "hermux_upstream_ttfb_seconds",
            "Seconds from sending a request upstream to receiving its response head.",
            buckets=TTFB_BUCKETS,
            registry=self.registry,
        )
        self.inFlight = Gauge(
            "hermux_requests_in_flight", "Client requests being answered now.", registry=self.registry
        )
        self.relayedBytes = Counter(
            "hermux_relayed_bytes", "Response body bytes sent to clients.", registry=self.registry
        )
        self.reloads = Counter(
            "hermux_config_reloads",
            "Configuration reloads, by result (ok or rejected).",
            ["result"],
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)
        self.usage = _UsageCollector()
        self.registry.register(self.usage)

    def watch(self, pool: KeyPool) -> None:
        """
        Report C{pool}'s keys too.
        """
        self.registry.register(_KeyCollector(pool))

    def requestDone(self, record: RequestRecord, status, bodyBytes: int) -> None:
        """
        Count a request that is over, from its record, the status it was
        answered with (see L{statusClass}) and the body bytes it was sent.
        """
        key = record.keyName or "none"
        self.requests.labels(key, statusClass(status)).inc()
        self.relayedBytes.inc(bodyBytes)
        self.usage.count(key, None if record.client is None else record.client.label, record.usage)

    def reloaded(self, succeeded: bool) -> None:
        self.reloads.labels("ok" if succeeded else "rejected").inc()
