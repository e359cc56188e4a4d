"""
Tests for the benchmark suite's own parsing: wrk's output, chunked bodies,
py-spy's collapsed stacks, callgrind's totals; that the names in hermux/
the profiler and the experiments rely on exist; and the command dispatch.
They need neither nginx nor wrk.
"""

import argparse
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from bench import __main__ as command
from bench import clients, experiments, names, patches, profile, wrk
from bench.instructions import callgrindTotal
from bench.profile import collapse, frameKey

WRK_TEXT = """\
Running 5s test @ http://127.0.0.1:41234/api/v1/chat/completions
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    15.02ms    4.71ms  45.38ms   71.22%
    Req/Sec     1.02k   101.37     1.20k    70.00%
  Latency Distribution
     50%   14.95ms
     75%   17.30ms
     90%   21.41ms
     99%  617.50us
  5085 requests in 5.01s, 3.95MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   1015.23
Transfer/sec:    807.99KB
"""

WRK_SUMMARY = (
    'WRKJSON {"requests": 5085, "duration_us": 5010000, "bytes": 4141875, '
    '"connect": 0, "read": 2, "write": 0, "status": 4, "timeout": 1, '
    '"p50_us": 14950, "p90_us": 21410, "p99_us": 38260, "mean_us": 15020.0}\n'
)


class WrkTests(SynchronousTestCase):
    def test_textReport(self):
        result = wrk.parseText(WRK_TEXT)
        self.assertEqual(result.requests, 5085)
        self.assertAlmostEqual(result.seconds, 5.01)
        self.assertEqual(result.bytes, int(3.95 * 1024**2))
        self.assertAlmostEqual(result.p50, 14950.0)
        self.assertAlmostEqual(result.p90, 21410.0)
        self.assertAlmostEqual(result.p99, 617.5)
        self.assertEqual(result.errors, 7)
        self.assertEqual(result.nonSuccess, 4)
        self.assertAlmostEqual(result.rate, 5085 / 5.01)

    def test_textReportUnitsAndNoErrors(self):
        text = (
            "  Latency Distribution\n     50%    1.00s\n     90%    1.50m\n     99%    2.00m\n"
            "  12 requests in 1.00m, 100.00B read\nRequests/sec:      0.20\n"
        )
        result = wrk.parseText(text)
        self.assertEqual((result.requests, result.seconds, result.bytes), (12, 60.0, 100))
        self.assertEqual((result.p50, result.p90, result.p99), (1e6, 90e6, 120e6))
        self.assertEqual(result.errors, 0)

    def test_textReportWithoutCount(self):
        self.assertRaises(ValueError, wrk.parseText, "unable to connect to 127.0.0.1:1\n")

    def test_summaryLineWins(self):
        result = wrk.parse(WRK_TEXT + WRK_SUMMARY)
        self.assertEqual(result.requests, 5085)
        self.assertEqual(result.bytes, 4141875)
        self.assertEqual(result.p99, 38260.0)
        self.assertEqual(result.errors, 7)

    def test_luaScript(self):
        script = wrk.luaScript(b'{"a": "b"}', "tok")
        self.assertIn('wrk.body = [==[{"a": "b"}]==]', script)
        self.assertIn('wrk.headers["Authorization"] = "Bearer tok"', script)
        self.assertNotIn("Authorization", wrk.luaScript(b"{}", None))
        self.assertRaises(ValueError, wrk.luaScript, b"]==]", None)


class ClientTests(SynchronousTestCase):
    def test_chunkCounterAnySplit(self):
        body = b"5\r\nhello\r\n3;ext=1\r\nabc\r\n10\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n"
        for size in (1, 2, 3, 7, len(body)):
            counter = clients.ChunkCounter()
            for start in range(0, len(body), size):
                counter.feed(body[start : start + size])
            self.assertEqual((counter.payload, counter.ended), (24, True))

    def test_chunkCounterUnfinished(self):
        counter = clients.ChunkCounter()
        counter.feed(b"a\r\n01234")
        self.assertEqual((counter.payload, counter.ended), (5, False))

    def test_heads(self):
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Token-Name: bob"
        self.assertEqual(clients.statusOf(head), 200)
        self.assertTrue(clients.isChunked(head))
        self.assertFalse(clients.isChunked(b"HTTP/1.1 200 OK\r\nContent-Length: 3"))
        self.assertEqual(clients.statusOf(b"garbage"), 0)

    def test_request(self):
        request = clients.requestBytes(8080, "/api/v1/x", b"{}", "tok")
        self.assertTrue(request.startswith(b"POST /api/v1/x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"))
        self.assertIn(b"\r\nContent-Length: 2\r\n", request)
        self.assertIn(b"\r\nAuthorization: Bearer tok\r\n", request)
        self.assertTrue(request.endswith(b"\r\n\r\n{}"))


class CollapseTests(SynchronousTestCase):
    def test_frameKey(self):
        self.assertEqual(
            frameKey("dataReceived (/v/lib/python3.11/site-packages/twisted/web/http.py:2345)"),
            ("dataReceived", "twisted/web/http.py"),
        )
        self.assertEqual(frameKey("<module> (<string>:1)"), ("<module>", "<string>"))

    def test_collapse(self):
        lines = [
            "run (a.py:1);loop (a.py:5);work (b.py:10) 3\n",
            "run (a.py:1);loop (a.py:6);work (b.py:11);work (b.py:12) 2\n",
            "run (a.py:2) 1\n",
            "not a stack line\n",
        ]
        summary = collapse(lines)
        self.assertEqual(summary["total"], 6)
        self.assertEqual(summary["own"][("work", "b.py")], 5)
        self.assertEqual(summary["own"][("run", "a.py")], 1)
        self.assertEqual(summary["cumulative"][("run", "a.py")], 6)
        self.assertEqual(summary["cumulative"][("work", "b.py")], 5)  # recursion counted once
        self.assertEqual(summary["files"], {"b.py": 5, "a.py": 1})

    def test_steps(self):
        lines = [
            "run (a.py:1);loop (a.py:5);work (b.py:10) 3\n",
            "run (a.py:1);loop (a.py:6);helper (c.py:3) 2\n",
            "run (a.py:1);helper (c.py:3);work (b.py:12) 4\n",
            "_bootstrap (threading.py:1);Condition.wait (threading.py:327) 7\n",
        ]
        summary = collapse(lines, {("loop", "a.py"): "looping", ("work", "b.py"): "working"})
        self.assertEqual(summary["idle"], 7)
        self.assertEqual(summary["total"], 9)
        self.assertEqual(summary["steps"], {"working": 7, "looping": 2})


class CallgrindTotalTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_totalsLine(self):
        path = self.write(
            "# callgrind format\nversion: 1\nevents: Ir\nsummary: 1234\n"
            "fn=(1) main\n16 500\ntotals: 123456789\n"
        )
        self.assertEqual(callgrindTotal(path), 123456789)

    def test_summaryWithoutTotals(self):
        self.assertEqual(callgrindTotal(self.write("events: Ir\nsummary: 987\n")), 987)


class _Defines:
    def method(self):
        pass

    @property
    def value(self):
        return 1


class _Inherits(_Defines):
    pass


class NameTests(SynchronousTestCase):
    """
    The names the profiler attributes samples to, and the names the
    experiments' patches replace, exist in hermux/ as the tables say:
    read from the tables themselves, so that a rename fails here, by name.
    """

    def test_profileSteps(self):
        """
        Every step of the hot path in L{profile.STEPS} names a function
        defined (not only inherited) in the file it gives.
        """
        problems = profile.staleSteps()
        self.assertEqual(problems, [], "\n".join(problems))
        inHermux = [function for (function, path), _ in profile.STEPS if path.startswith("hermux/")]
        self.assertGreater(len(inHermux), 10)

    def test_experimentVariants(self):
        """
        Every variant's patches are in bench/patches.py, every name in
        hermux/ they replace exists, and every log observer a variant uses.
        """
        problems = [p for variant in experiments.VARIANTS for p in experiments.variantProblems(variant)]
        self.assertEqual(problems, [], "\n".join(problems))
        for patch in patches.PATCHES.values():
            for dotted in patch.names:
                self.assertTrue(dotted.startswith("hermux."), dotted)

    def test_functionProblem(self):
        """
        A function is found by its qualified name in its file; one that is
        missing, only inherited, or in another file is reported by name.
        """
        here = "tests/test_bench.py"
        self.assertIsNone(names.functionProblem("_Defines.method", here))
        self.assertIsNone(names.functionProblem("_Defines.value", here))
        self.assertIsNone(names.functionProblem("NameTests.test_functionProblem", here))
        self.assertIn("_Defines.gone", names.functionProblem("_Defines.gone", here))
        self.assertIn("inherited", names.functionProblem("_Inherits.method", here))
        # Imported here from bench/profile.py, defined there.
        self.assertIn("defined in", names.functionProblem("collapse", here))
        self.assertIn("does not import", names.functionProblem("f", "bench/no_such_module.py"))

    def test_staleStepNamed(self):
        """
        A step that names a function no longer there makes L{profile.staleSteps} say which.
        """
        steps = [(("_Inherits.method", "tests/test_bench.py"), "a step")]
        [problem] = profile.staleSteps(steps)
        self.assertIn("_Inherits.method", problem)

    def test_attributeProblem(self):
        self.assertIsNone(names.attributeProblem("bench.quietlog.fastObserver"))
        self.assertIsNone(names.attributeProblem("tests.test_bench._Defines.method"))
        self.assertIn("no gone", names.attributeProblem("tests.test_bench._Defines.gone"))
        self.assertIn("no module", names.attributeProblem("nosuchpackage.x"))

    def test_variantWithMissingPatch(self):
        """
        A variant naming a patch that is not there, or a patch replacing a
        name that is gone, is reported before anything runs.
        """
        self.patch(patches, "PATCHES", {"gone": patches.Patch(lambda: None, ("bench.quietlog.noSuchObserver",))})
        variant = experiments.Variant("x", "a test", patches=("gone", "unknown"))
        problems = experiments.variantProblems(variant)
        self.assertEqual(len(problems), 2)
        self.assertIn("noSuchObserver", problems[0])
        self.assertIn("unknown", problems[1])


class DispatchTests(SynchronousTestCase):
    """
    bench/__main__.py hands the arguments after a command's name to that
    command's main, and all of them to the benchmark's without one.
    """

    def setUp(self):
        self.calls = []
        for module in ("bench.suite", "bench.profile", "bench.instructions", "bench.experiments"):
            __import__(module)
            self.patch(sys.modules[module], "main", lambda argv, m=module: self.calls.append((m, argv)) or 0)

    def test_commands(self):
        command.main(["profile", "--seconds", "1"])
        command.main(["experiments"])
        command.main(["instructions", "--only", "hermux"])
        command.main(["--quick"])
        command.main([])
        self.assertEqual(self.calls, [
            ("bench.profile", ["--seconds", "1"]),
            ("bench.experiments", []),
            ("bench.instructions", ["--only", "hermux"]),
            ("bench.suite", ["--quick"]),
            ("bench.suite", []),
        ])

    def test_suiteImportsNoCommand(self):
        """
        The benchmark's module does not import the other commands' modules
        (they import the modules it is made of).
        """
        code = "import sys, bench.suite; print(' '.join(sorted(sys.modules)))"
        loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        for module in ("bench.profile", "bench.instructions", "bench.experiments"):
            self.assertNotIn(module, loaded.stdout.split())
        self.assertIn("bench.loads", loaded.stdout.split())


class ExperimentsReportTests(SynchronousTestCase):
    """
    The experiments' report pairs each variant's rounds with the first's.
    """

    def wrkRun(self, cpu, requests=1000):
        return {"requests": requests, "seconds": 5.0, "bytes": 0, "errors": 0, "p50_ms": 1.0,
                "p90_ms": 2.0, "p99_ms": 3.0, "rate": requests / 5.0, "cpu": cpu, "upstreamCpu": 0.1}

    def test_beforeAndAfter(self):
        args = argparse.Namespace(rounds=2, duration=5.0, connections=16, baseline="abc1234", ttfb_samples=50)
        variants = [experiments.Variant("hermux@abc1234", "before", tree="/elsewhere"),
                    experiments.VARIANTS[0]]
        measured = {"chat": {"hermux@abc1234": [self.wrkRun(1.0), self.wrkRun(0.8)],
                             "hermux": [self.wrkRun(0.9), self.wrkRun(0.8)]}}
        text = experiments.reportText(args, variants, measured, {}, [],
                                      {"commit": "def5678", "loadavg": "0.1"})
        self.assertIn("Working tree: def5678", text)
        self.assertIn("paired: the median, over rounds, of the saving against hermux@abc1234", text)
        self.assertIn("Before and after: hermux@abc1234 0.900 ms CPU per request, the working tree's "
                      "hermux 0.850 ms (0.944x); per round 0.900x, 1.000x (sorted), median 0.950x", text)
        self.assertIn("Problems: none", text)

    def test_variantProcess(self):
        baseline = experiments.Variant("old", "before", tree="/elsewhere")
        self.assertEqual(baseline.environ()["PYTHONPATH"], "/elsewhere")
        self.assertEqual(baseline.argv("python", ["hermux"])[:2], ["python", "-c"])
        patched = experiments.Variant("new", "a patch", patches=("a", "b"))
        self.assertEqual(patched.environ()["BENCH_PATCHES"], "a,b")
        self.assertEqual(patched.argv("python", ["hermux"])[:3], ["python", "-m", "bench.patched_twistd"])
        self.assertNotEqual(experiments.VARIANTS[0].environ().get("PYTHONPATH"), "/elsewhere")
