# -*- test-case-name: tests.test_tap -*-
"""
The twistd plugin's options and service wiring: C{twistd hermux --help}.
"""

from __future__ import annotations

__all__ = ["DEFAULT_LISTEN", "Options", "makeService"]

import ipaddress
import re

from twisted.application import strports
from twisted.python import usage

from hermux.config import ConfigError, loadConfiguration
from hermux.ledger import LedgerError, SQLiteLedger
from hermux.lifecycle import HermuxService
from hermux.requestlog import RequestLogFile
from hermux.shared import defaultInstanceName, parseRedisURL
from hermux.site import ensureFileLimit
from hermux.upstream import loadTrustRoot, parseUpstreamURL
from hermux.wiring import assemble

DEFAULT_LISTEN = "tcp:3333:interface=127.0.0.1"
_INSTANCE_NAME = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,63}")


def _positive(kind):
    def coerce(text):
        value = kind(text)
        if value <= 0:
            raise ValueError("must be greater than zero")
        return value

    coerce.coerceDoc = "Must be greater than zero."
    return coerce


def _notNegative(text):
    value = int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


_notNegative.coerceDoc = "A whole number, 0 or more."


def _notNegativeSeconds(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ValueError("must be a number of seconds, 0 or more")
    return value


_notNegativeSeconds.coerceDoc = "Seconds, 0 or more."


def _network(text):
    try:
        return ipaddress.ip_network(text)
    except ValueError as e:
        raise usage.UsageError(
            f"--trusted-proxy {text!r}: {e}; give an IPv4 or IPv6 address or a "
            f"network with no host bits set, such as 10.0.0.0/8 or fd00::/8"
        )


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "A reverse proxy in front of OpenRouter that spreads requests over "
        "several API keys.  Clients send 'Authorization: Bearer <access "
        "token>' (a token from --allow); hermux forwards each request with the "
        "least-used key from --tokens and names it in an X-Token-Name header."
    )

    optFlags = [
        [
            "demo",
            None,
            "Serve a fake OpenRouter in-process and use it as the upstream "
            "(nothing leaves the machine; every answer is fake).",
        ],
        [
            "probe-keys",
            None,
            "At start, ask the upstream about each key (GET /api/v1/key) and "
            "seed today's counts and daily limits; refused keys start disabled.",
        ],
    ]

    optParameters = [
        ["tokens", None, "tokens.csv", "CSV file of upstream keys: name,token[,daily_limit]."],
        [
            "allow",
            None,
            None,
            "File of access tokens, one per line, for admins without limits "
            "(default: allow.txt, unless --clients is given).",
        ],
        [
            "clients",
            None,
            None,
            "CSV file of named clients with roles and limits: "
            "name,token[,role,daily_requests,daily_cost,per_minute,max_parallel,models,keys,expires].",
        ],
        [
            "state",
            None,
            "hermux.sqlite3",
            "SQLite file where daily usage counts are kept across restarts.",
        ],
        [
            "retention-days",
            None,
            400,
            "Days of usage counts the state file keeps (today included); older "
            "days are deleted once a day.",
            _positive(int),
        ],
        [
            "redis",
            None,
            None,
            "Share the pool with other instances through Redis: redis://[:password@]host:port/db, "
            "rediss://... (TLS, verified) or unix:///path/redis.sock (default: no sharing).",
        ],
        [
            "redis-password-file",
            None,
            None,
            "File holding the Redis password, instead of one in --redis.",
        ],
        [
            "redis-ca",
            None,
            None,
            "PEM file of the CA certificate to trust for a rediss:// Redis "
            "(default: the system's trust store).",
        ],
        [
            "redis-prefix",
            None,
            "hermux",
            "The beginning of every Redis key, so that several pools can share one Redis.",
        ],
        [
            "instance-name",
            None,
            None,
            "This instance's name in the shared pool (default: the host name and the first "
            "listening port).",
        ],
        [
            "access-log",
            None,
            None,
            "File for the one line each request logs, written in batches once a "
            "second and rotated at 10 MB and on SIGUSR1 (default: twistd's log).",
        ],
        [
            "upstream",
            None,
            "https://openrouter.ai",
            "Upstream base URL: scheme and host[:port] only.",
        ],
        [
            "upstream-ca",
            None,
            None,
            "PEM file of the CA certificate to trust for the upstream "
            "(default: the system's trust store).",
        ],
        [
            "max-body",
            None,
            32 * 1024 * 1024,
            "Largest request body accepted, in bytes.",
            _positive(int),
        ],
        [
            "connect-timeout",
            None,
            10.0,
            "Seconds to wait for a connection to the upstream.",
            _positive(float),
        ],
        [
            "idle-timeout",
            None,
            300.0,
            "Seconds without a byte from the upstream before a request is aborted.",
            _positive(float),
        ],
        [
            "drain-timeout",
            None,
            30.0,
            "On stop, seconds to let requests in flight finish before aborting them.",
            _positive(float),
        ],
        [
            "client-timeout",
            None,
            60.0,
            "Seconds a client may take to send a request (head and body), "
            "and may stay idle between requests, before it gets 408 or is "
            "disconnected.",
            _positive(float),
        ],
        [
            "max-connections",
            None,
            1024,
            "Most client connections open at once; more get 503.",
            _positive(int),
        ],
        [
            "auth-failures",
            None,
            10,
            "Failed access tokens allowed per client address per minute "
            "before that address gets 429 (0: no limit).",
            _notNegative,
        ],
        [
            "probe-interval",
            None,
            900.0,
            "Seconds between asking the upstream (GET /api/v1/key, no quota) "
            "whether keys it refused are accepted again; every key's count is "
            "also checked hourly (0: neither).",
            _notNegativeSeconds,
        ],
    ]

    def __init__(self):
        super().__init__()
        self["listen"] = []
        self["trusted-proxy"] = []

    def opt_listen(self, description):
        """Where to listen, as a strports description; repeatable (default tcp:3333:interface=127.0.0.1). Examples: tcp:8080, tcp6:3333, unix:/run/hermux.sock, ssl:8443:privateKey=key.pem:certKey=cert.pem."""  # noqa: E501 (twistd --help keeps a docstring's line breaks and indentation)
        self["listen"].append(description)

    def opt_trusted_proxy(self, network):
        """A reverse proxy's address or network (10.0.0.0/8, ::1), repeatable: only from these peers, X-Forwarded-For or Forwarded name the client address that --auth-failures counts by and the log shows (default: none; the headers are ignored)."""  # noqa: E501 (twistd --help keeps a docstring's line breaks and indentation)
        self["trusted-proxy"].append(network)

    def checkRedis(self):
        """
        Check --redis, --redis-password-file and --instance-name; the
        password never appears in an error.
        """
        if self["redis"] is None:
            for option in ("redis-password-file", "redis-ca"):
                if self[option] is not None:
                    raise usage.UsageError(f"--{option} needs --redis")
            return
        try:
            target = parseRedisURL(self["redis"])
        except ValueError as e:
            raise usage.UsageError(f"--redis: {e}")
        path = self["redis-password-file"]
        if path is not None:
            if target.password is not None:
                raise usage.UsageError("--redis-password-file: --redis has a password already")
            try:
                with open(path, encoding="utf-8") as f:
                    password = f.read().strip()
            except (OSError, UnicodeDecodeError) as e:
                raise usage.UsageError(
                    f"--redis-password-file {path}: cannot read it ({getattr(e, 'strerror', None) or 'not UTF-8'})"
                )
            if not password:
                raise usage.UsageError(f"--redis-password-file {path}: the file is empty")
            target = target.withPassword(password)
        if self["redis-ca"] is not None:
            if not target.tls:
                raise usage.UsageError("--redis-ca is for a rediss:// (TLS) --redis")
            try:
                loadTrustRoot(self["redis-ca"])
            except ValueError as e:
                raise usage.UsageError(f"--redis-ca: {e}")
            target = target.withCA(self["redis-ca"])
        self["redis"] = target
        if self["instance-name"] is None:
            self["instance-name"] = defaultInstanceName(self["listen"])
        elif not _INSTANCE_NAME.fullmatch(self["instance-name"]):
            raise usage.UsageError("--instance-name: printable ASCII, at most 64 characters")

    def postOptions(self):
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        self["trusted-proxy"] = [_network(text) for text in self["trusted-proxy"]]
        try:
            self["upstream"] = parseUpstreamURL(self["upstream"])
        except ValueError as e:
            raise usage.UsageError(f"--upstream: {e}")
        if self["upstream-ca"] is not None:
            try:
                self["upstream-ca"] = loadTrustRoot(self["upstream-ca"])
            except ValueError as e:
                raise usage.UsageError(f"--upstream-ca: {e}")
        self.checkRedis()
        if self["allow"] is None and self["clients"] is None:
            self["allow"] = "allow.txt"
        try:
            self["configuration"] = loadConfiguration(self["tokens"], self["allow"], self["clients"])
        except ConfigError as e:
            raise usage.UsageError(str(e))


def _openLedger(options, reactor) -> SQLiteLedger:
    try:
        return SQLiteLedger(
            options["state"], reactor=reactor, retentionDays=options["retention-days"]
        )
    except LedgerError as e:
        raise SystemExit(f"hermux: {e}")


def _openRequestLog(options, reactor) -> RequestLogFile | None:
    if options["access-log"] is None:
        return None
    try:
        return RequestLogFile(options["access-log"], reactor=reactor)
    except OSError as e:
        raise SystemExit(f"hermux: --access-log {options['access-log']}: {e.strerror}")


def makeService(options, reactor=None) -> HermuxService:
    """
    Build hermux's service tree from parsed L{Options}.
    """
    if reactor is None:
        from twisted.internet import reactor
    hermux = assemble(
        options["configuration"],
        options,
        ledger=_openLedger(options, reactor),
        requestLog=_openRequestLog(options, reactor),
        reactor=reactor,
    )
    ensureFileLimit(options["max-connections"])
    service = HermuxService(hermux.site, drainTimeout=options["drain-timeout"], reactor=reactor)
    for name, child in hermux.services:
        child.setName(name)
        child.setServiceParent(service)
    for description in options["listen"]:
        try:
            listener = strports.service(description, hermux.site, reactor=reactor)
        except Exception as e:
            raise SystemExit(f"hermux: --listen {description!r}: {e}")
        service.addListener(listener)
    return service
