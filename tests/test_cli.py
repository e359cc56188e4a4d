"""
Tests for L{hermux.cli}: the C{hermux usage} command on a known state file.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import sys

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hermux import cli
from hermux.ledger import COUNTERS, SQLiteLedger, dayNumber
from hermux.tap import Options

SCHEMA1 = os.path.join(os.path.dirname(__file__), "data", "state-schema1.sqlite")
# 2026-12-01T12:00:00Z
NOW = dayNumber("2026-12-01") * 86400 + 43200.0

# day, key, client, model, requests, free_requests, rate_limited, errors,
# prompt_tokens, completion_tokens, reasoning_tokens, cached_tokens, cost
# (nanocredits)
DETAIL = [
    ("2026-11-30", "alice", "team-a", "openai/gpt-4o", 10, 0, 1, 0, 1000, 500, 0, 100, 12_345_678),
    ("2026-11-30", "bob", "laptop", "meta-llama/llama-3.3-70b-instruct:free", 5, 5, 0, 1, 50, 20, 0, 0, 0),
    ("2026-12-01", "alice", "team-a", "openai/gpt-4o", 2, 0, 0, 0, 200, 100, 30, 0, 2_000_000),
    ("2026-12-01", "alice", "laptop", "openai/gpt-4o", 1, 0, 0, 0, 100, 10, 0, 0, 1_000_000),
    ("2026-12-01", "bob", "-", "-", 1, 0, 0, 0, 0, 0, 0, 0, 0),
]


def makeStateFile(path: str) -> None:
    """
    A schema-2 state file at C{path} holding L{DETAIL}, its sums in the
    tables that keep them.
    """
    SQLiteLedger(path, reactor=Clock())
    connection = sqlite3.connect(path)
    columns = ", ".join(COUNTERS)
    sums = ", ".join(f"sum({c})" for c in COUNTERS)
    connection.executemany(
        f"INSERT INTO usage VALUES ({', '.join('?' * 13)})", DETAIL
    )
    for table, names in [
        ("key_usage", "day, key"),
        ("client_usage", "day, client"),
        ("model_usage", "day, model"),
    ]:
        connection.execute(
            f"INSERT INTO {table} ({names}, {columns}) SELECT {names}, {sums} FROM usage GROUP BY {names}"
        )
    connection.commit()
    connection.close()


class UsageCommandTests(SynchronousTestCase):
    """
    Tests for C{hermux usage}.
    """

    def setUp(self):
        self.path = os.path.abspath(self.mktemp())
        makeStateFile(self.path)
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def command(self, *argv: str) -> tuple[int, str]:
        out = io.StringIO()
        status = cli.main(["usage", *argv], out=out, now=NOW)
        return status, out.getvalue()

    def runFailing(self, *argv: str) -> str:
        """
        Run the command, which fails: exit status 2, nothing on standard
        output, one line on standard error (returned).
        """
        status, output = self.command(*argv)
        self.assertEqual(status, 2)
        self.assertEqual(output, "")
        message = self.stderr.getvalue()
        self.assertTrue(message.endswith("\n"))
        self.assertEqual(message.count("\n"), 1, message)
        return message

    def test_table(self):
        """
        By default: today's counts by day and key, with totals.
        """
        self.assertEqual(
            self.command("--state", self.path),
            (
                0,
                "day         key    requests  free_requests  rate_limited  errors  prompt_tokens"
                "  completion_tokens  reasoning_tokens  cached_tokens      cost\n"
                "----------  -----  --------  -------------  ------------  ------  -------------"
                "  -----------------  ----------------  -------------  --------\n"
                "2026-12-01  alice         3              0             0       0            300"
                "                110                30              0  0.003000\n"
                "2026-12-01  bob           1              0             0       0              0"
                "                  0                 0              0  0.000000\n"
                "----------  -----  --------  -------------  ------------  ------  -------------"
                "  -----------------  ----------------  -------------  --------\n"
                "total                     4              0             0       0            300"
                "                110                30              0  0.003000\n",
            ),
        )

    def test_tableByClientAndModel(self):
        """
        --from, --to and --by choose the days and the grouping.
        """
        status, output = self.command(
            "--state", self.path, "--from", "2026-11-30", "--to", "2026-12-01", "--by", "client,model"
        )
        self.assertEqual(status, 0)
        self.assertEqual(
            [line.split()[:3] for line in output.splitlines()],
            [
                ["client", "model", "requests"],
                ["------", "--------------------------------------", "--------"],
                ["-", "-", "1"],
                ["laptop", "meta-llama/llama-3.3-70b-instruct:free", "5"],
                ["laptop", "openai/gpt-4o", "1"],
                ["team-a", "openai/gpt-4o", "12"],
                ["------", "--------------------------------------", "--------"],
                ["total", "19", "5"],
            ],
        )
        self.assertTrue(output.splitlines()[-1].endswith("0.015346"))

    def test_json(self):
        """
        --json prints what GET /hermux/usage answers.
        """
        status, output = self.command("--state", self.path, "--from", "2026-11-30", "--by", "key", "--json")
        self.assertEqual(status, 0)
        report = json.loads(output)
        self.assertEqual(
            (report["from"], report["to"], report["group_by"]), ("2026-11-30", "2026-12-01", ["key"])
        )
        self.assertEqual(
            [(row["key"], row["requests"], row["cost"]) for row in report["rows"]],
            [("alice", 13, 0.015345678), ("bob", 6, 0.0)],
        )
        self.assertEqual(report["totals"]["requests"], 19)
        self.assertEqual(report["totals"]["free_requests"], 5)
        self.assertEqual(report["totals"]["cost"], 0.015345678)
        self.assertIsNone(report["client"])

    def test_client(self):
        """
        --client NAME shows that client's counts only, however they are
        grouped; a client with none has a line of zeros.
        """
        dates = ("--from", "2026-11-30", "--to", "2026-12-01")
        status, output = self.command("--state", self.path, *dates, "--by", "day,key", "--client", "laptop")
        self.assertEqual(status, 0)
        self.assertEqual(
            [line.split()[:3] for line in output.splitlines()[2:-2]],
            [["2026-11-30", "bob", "5"], ["2026-12-01", "alice", "1"]],
        )
        self.assertTrue(output.splitlines()[-1].startswith("total                     6"))
        status, output = self.command("--state", self.path, *dates, "--by", "day", "--client", "team-a")
        self.assertEqual(
            [line.split()[:2] for line in output.splitlines()[2:-2]],
            [["2026-11-30", "10"], ["2026-12-01", "2"]],
        )
        status, output = self.command("--state", self.path, *dates, "--client", "nobody")
        self.assertEqual(status, 0)
        self.assertEqual(len(output.splitlines()), 3)
        self.assertTrue(output.splitlines()[-1].endswith("0.000000"))

    def test_clientJSON(self):
        """
        With --json, the report names the client.
        """
        status, output = self.command(
            "--state", self.path, "--from", "2026-11-30", "--by", "model", "--client", "team-a", "--json"
        )
        self.assertEqual(status, 0)
        report = json.loads(output)
        self.assertEqual(report["client"], "team-a")
        self.assertEqual(
            [(row["model"], row["requests"], row["cost"]) for row in report["rows"]],
            [("openai/gpt-4o", 12, 0.014345678)],
        )
        self.assertEqual(report["totals"]["requests"], 12)

    def test_badClient(self):
        """
        A client name that cannot be a label is one line naming --client.
        """
        self.assertIn("hermux usage: --client: ", self.runFailing("--state", self.path, "--client", ""))
        self.stderr.truncate(0)
        self.stderr.seek(0)
        self.assertIn("--client", self.runFailing("--state", self.path, "--client", "x" * 65))

    def test_badDates(self):
        """
        A bad date, or --from after --to, is one line naming the option.
        """
        self.assertIn("--from: not a date", self.runFailing("--state", self.path, "--from", "1.12.2026"))
        self.stderr.truncate(0)
        self.stderr.seek(0)
        self.assertIn("--to: no such date", self.runFailing("--state", self.path, "--to", "2026-02-30"))
        self.stderr.truncate(0)
        self.stderr.seek(0)
        self.assertIn("--from", self.runFailing("--state", self.path, "--from", "2026-12-02"))
        self.stderr.truncate(0)
        self.stderr.seek(0)
        self.assertIn("--by", self.runFailing("--state", self.path, "--by", "day,colour"))

    def test_missingFile(self):
        """
        A state file that does not exist is one line, and is not created.
        """
        path = os.path.abspath(self.mktemp())
        message = self.runFailing("--state", path)
        self.assertIn(path, message)
        self.assertIn("no such state file", message)
        self.assertFalse(os.path.exists(path))

    def test_schema1(self):
        """
        A state file of schema 1 is left as it is, and the message says that
        hermux migrates it when it starts.
        """
        path = self.mktemp()
        shutil.copyfile(SCHEMA1, path)
        self.assertIn("start hermux once", self.runFailing("--state", path))
        with open(path, "rb") as f, open(SCHEMA1, "rb") as g:
            self.assertEqual(f.read(), g.read())

    def test_notAStateFile(self):
        """
        A file that is not a database is one line.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not sqlite\n" * 100)
        self.assertIn(path, self.runFailing("--state", path))

    def test_readOnly(self):
        """
        Reading changes nothing in the file.
        """
        with open(self.path, "rb") as f:
            before = f.read()
        self.command("--state", self.path, "--by", "day,key,client,model")
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_whileHermuxWrites(self):
        """
        While hermux writes (WAL mode, a write transaction open), the
        command reads what is committed, without waiting.
        """
        ledger = SQLiteLedger(self.path, reactor=Clock())
        del ledger
        writer = sqlite3.connect(self.path, isolation_level=None)
        self.addCleanup(writer.close)
        writer.execute("PRAGMA journal_mode = WAL")
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE key_usage SET requests = requests + 100")
        status, output = self.command("--state", self.path, "--json")
        self.assertEqual(status, 0)
        self.assertEqual(json.loads(output)["totals"]["requests"], 4)
        writer.execute("COMMIT")
        status, output = self.command("--state", self.path, "--json")
        self.assertEqual(json.loads(output)["totals"]["requests"], 204)

    def test_defaultState(self):
        """
        Without --state, the command reads the file twistd's hermux uses
        without --state.
        """
        options = Options()
        self.assertEqual(cli.DEFAULT_STATE, options["state"])
        directory = self.mktemp()
        os.mkdir(directory)
        shutil.copyfile(self.path, os.path.join(directory, cli.DEFAULT_STATE))
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(directory)
        status, output = self.command()
        self.assertEqual(status, 0)
        self.assertIn("total                     4", output)

    def test_badArguments(self):
        """
        An unknown option, or no command, exits with status 2.
        """
        self.assertEqual(self.command("--colour")[0], 2)
        self.assertEqual(cli.main([], out=io.StringIO(), now=NOW), 2)
