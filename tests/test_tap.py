"""
The twistd plugin: its options, the service it builds, and twistd itself
running it in a child process.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import tempfile

from twisted.application.service import Application, IService, IServiceCollection
from twisted.internet import reactor
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ProcessDone
from twisted.internet.ssl import Certificate
from twisted.internet.utils import getProcessOutputAndValue
from twisted.plugin import IPlugin, getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from treq.client import HTTPClient
from zope.interface import implementer

from hermux.keypool import KeyPool
from hermux.probe import KeyProbe
from hermux.requestlog import RequestLogFile, RequestLogEvents
from hermux.tap import DEFAULT_LISTEN, Options, makeService
from hermux.testing import FakeOpenRouter, fakeSite
from tests.harness import (
    ACCESS_TOKEN,
    CHECKOUT,
    DEMO_TOKEN,
    KEYS,
    TWISTD,
    demoArguments,
    issueCertificates,
    runTwistd,
    twistdEnvironment,
    waitUntil,
)



def writeConfiguration(testCase, keys=KEYS, accessTokens=(ACCESS_TOKEN,)):
    """
    Write a tokens.csv and an allow.txt; return their paths.
    """
    tokens = os.path.abspath(testCase.mktemp())
    with open(tokens, "w") as f:
        f.write("name,token\n")
        f.writelines(f'{key.name},"{key.token}"\n' for key in keys)
    allow = os.path.abspath(testCase.mktemp())
    with open(allow, "w") as f:
        f.write("# clients\n" + "\n".join(accessTokens) + "\n")
    return tokens, allow


def parseOptions(*args) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def inDirectoryWithConfiguration(testCase) -> None:
    """
    Run the rest of the test in a new directory holding a tokens.csv and an
    allow.txt, where the options' defaults find them.
    """
    directory = os.path.abspath(testCase.mktemp())
    os.makedirs(directory)
    tokens, allow = writeConfiguration(testCase)
    shutil.copy(tokens, os.path.join(directory, "tokens.csv"))
    shutil.copy(allow, os.path.join(directory, "allow.txt"))
    testCase.addCleanup(os.chdir, os.getcwd())
    os.chdir(directory)


class OptionsTests(SynchronousTestCase):
    def setUp(self):
        inDirectoryWithConfiguration(self)

    def parse(self, *args) -> Options:
        return parseOptions(*args)

    def test_defaults(self):
        options = self.parse()
        self.assertEqual(options["listen"], [DEFAULT_LISTEN])
        self.assertEqual(DEFAULT_LISTEN, "tcp:3333:interface=127.0.0.1")
        self.assertEqual(options["tokens"], "tokens.csv")
        self.assertEqual(options["allow"], "allow.txt")
        self.assertEqual(options["upstream"], b"https://openrouter.ai")
        self.assertIsNone(options["upstream-ca"])
        self.assertEqual(options["max-body"], 32 * 1024 * 1024)
        self.assertEqual(options["connect-timeout"], 10.0)
        self.assertEqual(options["idle-timeout"], 300.0)
        self.assertFalse(options["demo"])

    def test_listenRepeats(self):
        options = self.parse("--listen", "tcp:8080", "--listen", "unix:/tmp/h.sock")
        self.assertEqual(options["listen"], ["tcp:8080", "unix:/tmp/h.sock"])

    def test_upstreamCanonical(self):
        self.assertEqual(self.parse("--upstream", "http://127.0.0.1:8080")["upstream"], b"http://127.0.0.1:8080")
        self.assertEqual(self.parse("--upstream", "https://openrouter.ai:443/")["upstream"], b"https://openrouter.ai")
        self.assertEqual(self.parse("--upstream", "http://[::1]:81")["upstream"], b"http://[::1]:81")

    def test_upstreamMustBeSchemeAndHost(self):
        for bad in (
            "ftp://openrouter.ai",
            "openrouter.ai",
            "https://openrouter.ai/api/v1",
            "https://openrouter.ai?x=1",
            "https://openrouter.ai#frag",
            "https://user:pw@openrouter.ai",
            "https://openrouter.ai:99999",
            "https://",
        ):
            self.assertRaises(usage.UsageError, self.parse, "--upstream", bad)

    def test_numbersMustBePositive(self):
        for option in ("--max-body", "--connect-timeout", "--idle-timeout"):
            self.assertRaises(usage.UsageError, self.parse, option, "0")
            self.assertRaises(usage.UsageError, self.parse, option, "-1")
            self.assertRaises(usage.UsageError, self.parse, option, "many")
        self.assertEqual(self.parse("--max-body", "1000")["max-body"], 1000)
        self.assertEqual(self.parse("--idle-timeout", "2.5")["idle-timeout"], 2.5)

    def test_upstreamCA(self):
        ca, _ = issueCertificates()
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(ca.dumpPEM())
        loaded = self.parse("--upstream-ca", path)["upstream-ca"]
        self.assertIsInstance(loaded, Certificate)
        self.assertEqual(loaded.digest(), ca.digest())

    def test_upstreamCAUnusable(self):
        self.assertRaises(usage.UsageError, self.parse, "--upstream-ca", self.mktemp())
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a certificate")
        self.assertRaises(usage.UsageError, self.parse, "--upstream-ca", path)


class HostileOptionsTests(SynchronousTestCase):
    """
    The options that bound what clients can make hermux do.
    """

    def setUp(self):
        inDirectoryWithConfiguration(self)

    def parse(self, *args) -> Options:
        return parseOptions(*args)

    def test_defaults(self):
        options = self.parse()
        self.assertEqual(options["client-timeout"], 60.0)
        self.assertEqual(options["max-connections"], 1024)
        self.assertEqual(options["auth-failures"], 10)

    def test_values(self):
        options = self.parse(
            "--client-timeout", "2.5", "--max-connections", "10", "--auth-failures", "0"
        )
        self.assertEqual(options["client-timeout"], 2.5)
        self.assertEqual(options["max-connections"], 10)
        self.assertEqual(options["auth-failures"], 0)

    def test_bad(self):
        for option, value in (
            ("--client-timeout", "0"),
            ("--client-timeout", "soon"),
            ("--max-connections", "0"),
            ("--max-connections", "1.5"),
            ("--auth-failures", "-1"),
            ("--auth-failures", "few"),
        ):
            self.assertRaises(usage.UsageError, self.parse, option, value)

    def test_wired(self):
        """
        The options reach the site that serves each --listen.
        """
        tokens, allow = writeConfiguration(self)
        options = self.parse(
            "--tokens", tokens, "--allow", allow, "--listen", "tcp:0",
            "--client-timeout", "7", "--max-connections", "9", "--auth-failures", "3",
            "--state", self.mktemp(),
        )
        service = makeService(options)
        [listener] = [s for s in service if hasattr(s, "factory")]
        site = listener.factory
        self.assertEqual(site.timeOut, 7)
        self.assertEqual(site.maxConnections, 9)
        throttle = site.resource.children[b"api"].gate.throttle
        self.assertEqual(throttle.failures, 3)
        self.assertIs(site.resource.children[b"v1"].gate.throttle, throttle)


class TrustedProxyOptionTests(SynchronousTestCase):
    """
    --trusted-proxy: the peers whose X-Forwarded-For and Forwarded name the
    client's address.
    """

    def setUp(self):
        inDirectoryWithConfiguration(self)

    def test_defaultIsNone(self):
        self.assertEqual(parseOptions()["trusted-proxy"], [])
        self.assertEqual(Options()["trusted-proxy"], [])

    def test_repeatable(self):
        """
        Each --trusted-proxy adds an address or a network, IPv4 or IPv6.
        """
        options = parseOptions(
            "--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "::1", "--trusted-proxy", "fd00::/8"
        )
        self.assertEqual(
            options["trusted-proxy"],
            [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "::1/128", "fd00::/8")],
        )

    def test_bad(self):
        """
        What is not an address or a network, or has host bits set, is a
        usage error that names the option and the value.
        """
        for value in ("proxy.local", "10.0.0.1/8", "10.0.0.0/33", "", "10.0.0.0/8,10.1.0.0/16"):
            error = self.assertRaises(usage.UsageError, parseOptions, "--trusted-proxy", value)
            self.assertIn(f"--trusted-proxy {value!r}", str(error))
            self.assertIn("10.0.0.0/8", str(error))

    def test_wired(self):
        """
        The networks reach the site, which finds the client address with
        them.
        """
        tokens, allow = writeConfiguration(self)
        options = parseOptions(
            "--tokens", tokens, "--allow", allow, "--state", self.mktemp(),
            "--trusted-proxy", "10.0.0.0/8",
        )
        site = makeService(options).site
        self.assertTrue(site.trustedProxies.trusts(ipaddress.ip_address("10.1.2.3")))
        self.assertFalse(site.trustedProxies.trusts(ipaddress.ip_address("192.0.2.1")))


class AccessLogOptionTests(SynchronousTestCase):
    """
    --access-log moves the request lines from twistd's log to a file.
    """

    def test_defaultIsTwistdsLog(self):
        tokens, allow = writeConfiguration(self)
        options = parseOptions("--tokens", tokens, "--allow", allow, "--state", self.mktemp())
        self.assertIsNone(options["access-log"])
        service = makeService(options)
        self.assertIsInstance(service.site.requestLog, RequestLogEvents)
        self.assertNotIn("access-log", [s.name for s in service])

    def test_wired(self):
        """
        The access log is the site's request log, and the service that
        stops last, after the ledger: the lines of requests aborted while
        draining are written too.
        """
        tokens, allow = writeConfiguration(self)
        path = os.path.abspath(self.mktemp())
        options = parseOptions(
            "--tokens", tokens, "--allow", allow, "--state", self.mktemp(), "--access-log", path
        )
        service = makeService(options)
        accessLog = service.getServiceNamed("access-log")
        self.assertIsInstance(accessLog, RequestLogFile)
        self.assertIs(service.site.requestLog, accessLog)
        self.assertEqual(accessLog.path, path)
        self.assertTrue(os.path.exists(path))
        named = [s.name for s in service if s.name]
        self.assertEqual(named[:2], ["access-log", "ledger"])

    def test_unusablePathStopsWithOneLine(self):
        tokens, allow = writeConfiguration(self)
        path = os.path.join(os.path.abspath(self.mktemp()), "access.log")
        options = parseOptions(
            "--tokens", tokens, "--allow", allow, "--state", self.mktemp(), "--access-log", path
        )
        stop = self.assertRaises(SystemExit, makeService, options)
        self.assertEqual(str(stop.code), f"hermux: --access-log {path}: No such file or directory")


class ProbeIntervalOptionTests(SynchronousTestCase):
    """
    --probe-interval: how often the keys the upstream refused are asked
    about again (and every key's count hourly); 0 turns that off.
    """

    def service(self, *args):
        tokens, allow = writeConfiguration(self)
        options = parseOptions("--tokens", tokens, "--allow", allow, "--state", self.mktemp(), *args)
        return options, makeService(options)

    def test_default(self):
        options, service = self.service()
        self.assertEqual(options["probe-interval"], 900.0)
        probe = service.getServiceNamed("probe")
        self.assertIsInstance(probe, KeyProbe)
        self.assertEqual((probe.interval, probe.atStart), (900.0, False))

    def test_value(self):
        options, service = self.service("--probe-interval", "60.5", "--probe-keys")
        probe = service.getServiceNamed("probe")
        self.assertEqual((probe.interval, probe.atStart), (60.5, True))

    def test_zeroTurnsItOff(self):
        options, service = self.service("--probe-interval", "0")
        self.assertEqual(options["probe-interval"], 0.0)
        self.assertNotIn("probe", [s.name for s in service])
        options, service = self.service("--probe-interval", "0", "--probe-keys")
        self.assertEqual(service.getServiceNamed("probe").interval, 0.0)

    def test_bad(self):
        inDirectoryWithConfiguration(self)
        for value in ("-1", "often", "nan", "inf"):
            error = self.assertRaises(usage.UsageError, parseOptions, "--probe-interval", value)
            self.assertEqual(
                str(error), "Parameter type enforcement failed: must be a number of seconds, 0 or more"
            )


class RetentionOptionTests(SynchronousTestCase):
    """
    --retention-days: how many days of usage the state file keeps.
    """

    def ledger(self, *args):
        tokens, allow = writeConfiguration(self)
        options = parseOptions("--tokens", tokens, "--allow", allow, "--state", self.mktemp(), *args)
        return options, makeService(options).getServiceNamed("ledger")

    def test_default(self):
        options, ledger = self.ledger()
        self.assertEqual(options["retention-days"], 400)
        self.assertEqual(ledger.retentionDays, 400)

    def test_value(self):
        options, ledger = self.ledger("--retention-days", "30")
        self.assertEqual(ledger.retentionDays, 30)

    def test_bad(self):
        inDirectoryWithConfiguration(self)
        for value in ("0", "-3", "many", "1.5"):
            self.assertRaises(usage.UsageError, parseOptions, "--retention-days", value)


class ServiceTests(SynchronousTestCase):
    def test_pluginIsFound(self):
        """
        twistd finds the hermux plugin, whose options are L{Options}.
        """
        from twisted.application.service import IServiceMaker

        [maker] = [p for p in getPlugins(IServiceMaker) if p.tapname == "hermux"]
        self.assertTrue(IPlugin.providedBy(maker))
        self.assertIsInstance(maker.options(), Options)

    def test_builtLikeTwistdDoes(self):
        """
        The service built from parsed options, set in an application as
        twistd does, holds the key pool under the name 'keypool'.
        """
        from twisted.plugins.hermux_plugin import hermux as maker

        tokens, allow = writeConfiguration(self)
        options = maker.options()
        options.parseOptions(
            ["--tokens", tokens, "--allow", allow, "--listen", "tcp:0", "--state", self.mktemp()]
        )
        application = Application("hermux")
        maker.makeService(options).setServiceParent(application)
        [top] = list(IServiceCollection(application))
        pool = top.getServiceNamed("keypool")
        self.assertIsInstance(pool, KeyPool)
        self.assertEqual([key.name for key in pool.keys], [key.name for key in KEYS])
        self.assertTrue(IService.providedBy(top.getServiceNamed("upstream")))

    def test_badConfigurationStopsWithOneLine(self):
        tokens, allow = writeConfiguration(self)
        with open(tokens, "w") as f:
            f.write("name,token\nalpha,sk-one\nalpha,sk-two\n")
        options = Options()
        error = self.assertRaises(
            usage.UsageError,
            options.parseOptions,
            ["--tokens", tokens, "--allow", allow, "--state", self.mktemp()],
        )
        self.assertEqual(str(error), f"{tokens}, line 3: duplicate name 'alpha' (first on line 2)")

    def test_accessTokenThatIsAKeyIsRefused(self):
        tokens, allow = writeConfiguration(self, accessTokens=(KEYS[0].token,))
        options = Options()
        error = self.assertRaises(
            usage.UsageError,
            options.parseOptions,
            ["--tokens", tokens, "--allow", allow, "--state", self.mktemp()],
        )
        self.assertIn("an access token is also an upstream key", str(error))
        self.assertNotIn(KEYS[0].token, str(error))

    def test_clientsAlone(self):
        """
        With C{--clients} and no C{--allow}, allow.txt is not read (here
        there is none), and the clients are the configuration's.
        """
        tokens, _ = writeConfiguration(self)
        clients = os.path.abspath(self.mktemp())
        with open(clients, "w") as f:
            f.write("name,token,daily_requests\nci-bot,hx-tap-ci-bot-token-77,5\n")
        os.chdir(os.path.dirname(clients))
        options = parseOptions("--tokens", tokens, "--clients", clients, "--state", self.mktemp())
        self.assertIsNone(options["allow"])
        configuration = options["configuration"]
        self.assertEqual(configuration.accessTokens, ())
        self.assertEqual([(c.name, c.dailyRequests) for c in configuration.clients], [("ci-bot", 5)])

    def test_clientsWithAllow(self):
        """
        Both files may be given; a token in both stops hermux with one line
        naming clients.csv, never quoting the token.
        """
        tokens, allow = writeConfiguration(self)
        clients = os.path.abspath(self.mktemp())
        with open(clients, "w") as f:
            f.write(f"name,token\nci-bot,hx-tap-ci-bot-token-77\nboth,{ACCESS_TOKEN}\n")
        arguments = ["--tokens", tokens, "--allow", allow, "--clients", clients]
        error = self.assertRaises(usage.UsageError, parseOptions, *arguments, "--state", self.mktemp())
        self.assertIn(f"{clients}, line 3", str(error))
        self.assertNotIn(ACCESS_TOKEN, str(error))
        with open(clients, "w") as f:
            f.write("name,token\nci-bot,hx-tap-ci-bot-token-77\n")
        configuration = parseOptions(*arguments, "--state", self.mktemp())["configuration"]
        self.assertEqual((len(configuration.accessTokens), len(configuration.clients)), (1, 1))

    def test_badListenStopsWithOneLine(self):
        tokens, allow = writeConfiguration(self)
        options = Options()
        options.parseOptions(
            ["--tokens", tokens, "--allow", allow, "--listen", "nonsense:1", "--state", self.mktemp()]
        )
        stop = self.assertRaises(SystemExit, makeService, options)
        self.assertIn("--listen 'nonsense:1'", str(stop.code))


@implementer(IAgentEndpointFactory)
class _UNIXEndpoints:
    def __init__(self, path):
        self._path = path

    def endpointForURI(self, uri):
        return UNIXClientEndpoint(reactor, self._path)


def getOverUNIX(testCase, socketPath: str, path: str, token: str):
    """
    GET C{path} from the hermux listening on the UNIX socket C{socketPath}.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    testCase.addCleanup(pool.closeCachedConnections)
    client = HTTPClient(Agent.usingEndpointFactory(reactor, _UNIXEndpoints(socketPath), pool))
    return client.get(f"http://hermux{path}", headers={"Authorization": f"Bearer {token}"})


class RunningServiceTests(TestCase):
    async def test_servesOnUNIXSocket(self):
        """
        The service from L{makeService} serves on every --listen, here a UNIX
        socket, in front of the --upstream.
        """
        fake = FakeOpenRouter([key.token for key in KEYS])
        fakePort = reactor.listenTCP(0, fakeSite(fake), interface="127.0.0.1")
        self.addCleanup(fakePort.stopListening)
        directory = tempfile.mkdtemp(prefix="hermux-test-")
        self.addCleanup(os.rmdir, directory)
        socketPath = os.path.join(directory, "hermux.sock")
        tokens, allow = writeConfiguration(self)
        options = Options()
        options.parseOptions([
            "--tokens", tokens, "--allow", allow,
            "--upstream", f"http://127.0.0.1:{fakePort.getHost().port}",
            "--listen", f"unix:{socketPath}", "--state", self.mktemp(),
        ])
        service = makeService(options)
        service.startService()
        self.addCleanup(service.stopService)
        response = await getOverUNIX(self, socketPath, "/api/v1/models", ACCESS_TOKEN)
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(await response.content())["data"][0]["id"], "hermux/fake-model")
        self.assertIn(response.headers.getRawHeaders("X-Token-Name")[0], {k.name for k in KEYS})


class TwistdTests(TestCase):
    """
    twistd itself, in a child process, as a user runs it.
    """

    timeout = 60

    def statePath(self) -> str:
        return os.path.abspath(self.mktemp())

    async def get(self, port, path="/api/v1/models"):
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        client = HTTPClient(Agent(reactor, pool=pool))
        response = await client.get(
            f"http://127.0.0.1:{port}{path}",
            headers={"Authorization": f"Bearer {DEMO_TOKEN}"},
        )
        return response, await response.content()

    async def test_badConfigurationIsOneLine(self):
        """
        A broken tokens.csv is a usage error, as twistd reports them: its
        usage text, then one line naming the file and line; no traceback,
        and a non-zero status.
        """
        tokens, allow = writeConfiguration(self)
        with open(tokens, "w") as f:
            f.write("name,token\nalpha,\n")
        out, err, code = await getProcessOutputAndValue(
            TWISTD[0],
            TWISTD[1:] + ["-n", "hermux", "--tokens", tokens, "--allow", allow, "--state", self.statePath()],
            env=twistdEnvironment(), path=CHECKOUT,
        )
        self.assertNotEqual(code, 0)
        self.assertEqual(err, b"")
        lastLine = out.decode().strip().splitlines()[-1]
        self.assertTrue(
            lastLine.endswith(f": {tokens}, line 2: empty token for 'alpha'"), lastLine
        )
        self.assertNotIn("Traceback", out.decode())

    async def test_demoInForeground(self):
        """
        'twistd -n hermux --demo' on the example files answers with fake
        completions, rotates keys, and stops cleanly on SIGTERM.
        """
        child = runTwistd(self, *demoArguments(self, "--listen", "tcp:0:interface=127.0.0.1"))
        port = await child.port()
        # twistd opens hermux's port (privilegedStartService) before it
        # starts the demo upstream, so the banner may come a moment later.
        await waitUntil(lambda: b"DEMO MODE" in child.output)
        names = set()
        for _ in range(3):
            response, body = await self.get(port)
            self.assertEqual(response.code, 200)
            names.update(response.headers.getRawHeaders("X-Token-Name"))
        self.assertEqual(names, {"alice", "bob", "carol"})
        child.kill("TERM")
        ended = await child.ended
        self.assertIsInstance(ended, ProcessDone)
        self.assertEqual(ended.exitCode, 0)
        self.assertIn(b"Received SIGTERM, draining and stopping.", child.output)
        self.assertIn(b"Main loop terminated.", child.output)
        self.assertIn(b"Server Shut Down.", child.output)

    async def test_daemon(self):
        """
        'twistd --logfile --pidfile hermux' runs in the background, logs to
        the file and removes its pid file when stopped.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        logfile = os.path.join(directory, "hermux.log")
        pidfile = os.path.join(directory, "hermux.pid")
        out, err, code = await getProcessOutputAndValue(
            TWISTD[0],
            TWISTD[1:] + [
                "--logfile", logfile, "--pidfile", pidfile,
                "hermux", "--demo", "--tokens", "tokens.csv.example",
                "--allow", "allow.txt.example", "--listen", "tcp:0:interface=127.0.0.1",
                "--state", self.statePath(),
            ],
            env=twistdEnvironment(), path=CHECKOUT,
        )
        self.assertEqual(code, 0, err)
        await waitUntil(lambda: os.path.exists(pidfile), timeout=30)
        with open(pidfile) as f:
            pid = int(f.read())
        self.addCleanup(lambda: os.path.exists(pidfile) and os.kill(pid, signal.SIGKILL))

        def log():
            with open(logfile, "rb") as f:
                return f.read()

        await waitUntil(lambda: b"HermuxSite starting on" in log(), timeout=30)
        port = int(re.search(rb"HermuxSite starting on (\d+)", log()).group(1))
        response, body = await self.get(port)
        self.assertEqual(response.code, 200)
        await waitUntil(lambda: b"GET /api/v1/models -> 200" in log())
        os.kill(pid, signal.SIGTERM)
        await waitUntil(lambda: not os.path.exists(pidfile), timeout=30)
        self.assertNotIn(DEMO_TOKEN.encode(), log())

    async def test_accessLogRotatesWithTwistdsLog(self):
        """
        With --logfile and --access-log, requests are logged to the access
        log only, and SIGUSR1 rotates both files.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        logfile = os.path.join(directory, "hermux.log")
        accessLog = os.path.join(directory, "access.log")
        child = runTwistd(
            self, "--logfile", logfile,
            *demoArguments(self, "--listen", "tcp:0:interface=127.0.0.1", "--access-log", accessLog),
        )

        def read(path):
            if not os.path.exists(path):
                return b""
            with open(path, "rb") as f:
                return f.read()

        await waitUntil(lambda: b"HermuxSite starting on" in read(logfile), timeout=30)
        await waitUntil(lambda: b"DEMO MODE" in read(logfile))
        port = int(re.search(rb"HermuxSite starting on (\d+)", read(logfile)).group(1))
        response, _ = await self.get(port)
        self.assertEqual(response.code, 200)
        await waitUntil(lambda: b"GET /api/v1/models -> 200" in read(accessLog))
        child.kill(signal.SIGUSR1)
        await waitUntil(
            lambda: os.path.exists(logfile + ".1") and os.path.exists(accessLog + ".1")
        )
        response, _ = await self.get(port, "/api/v1/nothing-here")
        child.kill("TERM")
        self.assertEqual((await child.ended).exitCode, 0)
        self.assertIn(b"GET /api/v1/models -> 200", read(accessLog + ".1"))
        self.assertIn(b"GET /api/v1/nothing-here -> ", read(accessLog))
        everything = read(logfile) + read(logfile + ".1")
        self.assertNotIn(b"GET /api/v1/models -> 200", everything)
        self.assertNotIn(DEMO_TOKEN.encode(), everything + read(accessLog))

    async def test_syslog(self):
        """
        With twistd's --syslog, hermux runs and serves as usual (here on a
        UNIX socket, since its log does not come back to this test).
        """
        directory = tempfile.mkdtemp(prefix="hermux-test-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        socketPath = os.path.join(directory, "hermux.sock")
        child = runTwistd(
            self, "--syslog", "--prefix", "hermux-test",
            *demoArguments(self, "--listen", f"unix:{socketPath}"),
        )
        await waitUntil(lambda: os.path.exists(socketPath), timeout=30)
        response = await getOverUNIX(self, socketPath, "/v1/models", DEMO_TOKEN)
        self.assertEqual(response.code, 200)
        await response.content()
        child.kill("TERM")
        self.assertEqual((await child.ended).exitCode, 0)


class RedisOptionTests(TestCase):
    """
    C{--redis}, C{--redis-password-file}: whatever goes wrong, no message,
    nor C{--help}, ever shows the password.
    """

    password = "s3cret-redis-pw-5e1d"

    def setUp(self):
        inDirectoryWithConfiguration(self)

    def refusal(self, *args) -> str:
        """
        The one-line message hermux stops with for C{args}: a usage error
        while parsing them, or an exit while building the service.
        """
        options = Options()
        try:
            options.parseOptions(list(args) + ["--state", self.mktemp()])
        except usage.UsageError as error:
            return str(error)
        stop = self.assertRaises(SystemExit, makeService, options)
        return str(stop.code)

    def test_defaults(self):
        options = parseOptions()
        self.assertIsNone(options["redis"])
        self.assertIsNone(options["redis-password-file"])
        self.assertEqual(options["redis-prefix"], "hermux")

    def test_badURLNeverEchoesThePassword(self):
        for bad in (
            f"redis://:{self.password}@host:notaport/0",
            f"redis://:{self.password}@host:99999/0",
            f"redis://:{self.password}@host:1/notadb",
            f"redis://:{self.password}@:1/0",
            f"http://:{self.password}@host:1/0",
            f"{self.password}",
            f"redis//:{self.password}@host:1/0",
            f"redis://host:{self.password}/0",
            f"redis://:{self.password}@host:1/0?password={self.password}",
        ):
            message = self.refusal("--redis", bad)
            self.assertNotIn("not recognized", message)
            self.assertNotIn(self.password, message, bad)
            self.assertNotIn("\n", message, bad)
            self.assertTrue(message, bad)

    def test_helpShowsNoPassword(self):
        import io
        import sys

        out = io.StringIO()
        self.patch(sys, "stdout", out)
        options = Options()
        self.assertRaises(
            SystemExit, options.parseOptions,
            ["--redis", f"redis://:{self.password}@127.0.0.1:6379/0", "--help"],
        )
        text = out.getvalue()
        self.assertIn("--redis", text)
        self.assertIn("--redis-password-file", text)
        self.assertIn("--redis-prefix", text)
        self.assertIn("--instance-name", text)
        self.assertNotIn(self.password, text)

    async def test_helpOfTwistdShowsNoPassword(self):
        """
        The same through twistd itself, in a child process.
        """
        out, err, code = await getProcessOutputAndValue(
            TWISTD[0],
            TWISTD[1:] + ["hermux", "--redis", f"redis://:{self.password}@127.0.0.1:6379/0", "--help"],
            env=twistdEnvironment(), path=CHECKOUT,
        )
        self.assertEqual(code, 0, out + err)
        self.assertIn(b"--redis-password-file", out)
        self.assertNotIn(self.password.encode(), out + err)

    def test_passwordFileMissingIsOneLine(self):
        path = os.path.abspath(self.mktemp())
        message = self.refusal(
            "--redis", "redis://127.0.0.1:6379/0", "--redis-password-file", path
        )
        self.assertIn(path, message)
        self.assertNotIn("\n", message)
        self.assertNotIn("Traceback", message)


class RedisCAOptionTests(SynchronousTestCase):
    """
    C{--redis-ca}: the CA trusted for a rediss:// Redis.
    """

    def setUp(self):
        inDirectoryWithConfiguration(self)

    def test_taken(self):
        from tests.harness import issueCertificates

        ca, _ = issueCertificates()
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(ca.dumpPEM())
        options = parseOptions("--redis", "rediss://redis.example:6380/0", "--redis-ca", path)
        self.assertEqual(options["redis"].caFile, path)

    def test_refused(self):
        """
        Without --redis, with a plain redis:// URL, or a file that is not a
        PEM certificate: one line saying so.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("not a certificate\n")
        for args, words in (
            (["--redis-ca", path], "--redis-ca needs --redis"),
            (["--redis", "redis://h:1/0", "--redis-ca", path], "rediss://"),
            (["--redis", "rediss://h:1/0", "--redis-ca", path], "not a PEM certificate"),
            (["--redis", "rediss://h:1/0", "--redis-ca", path + "-missing"], "cannot read"),
        ):
            error = self.assertRaises(usage.UsageError, parseOptions, *args)
            self.assertIn(words, str(error))
