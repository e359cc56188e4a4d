"""
Tests for L{hermux.usagereport}: the usage query's parameters, the JSON
report and the text table.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from hermux.ledger import Counts, UsageRow, dayNumber
from hermux.usagereport import (
    reportBody,
    MAX_DAYS,
    UsageQuery,
    UsageQueryError,
    formatTable,
    parseUsageQuery,
    usageReport,
)

TODAY = dayNumber("2026-12-01")


class ParseUsageQueryTests(SynchronousTestCase):
    """
    Tests for L{parseUsageQuery}.
    """

    def assertBad(self, args: dict, parameter: str) -> str:
        error = self.assertRaises(UsageQueryError, parseUsageQuery, args, TODAY)
        self.assertEqual(error.parameter, parameter)
        message = str(error)
        self.assertTrue(message.startswith(f"{parameter}: "), message)
        self.assertNotIn("\n", message)
        return message

    def test_defaults(self):
        """
        Without arguments (or with L{None} for each): today, by day and key.
        """
        expected = UsageQuery(TODAY, TODAY, ("day", "key"))
        self.assertEqual(parseUsageQuery({}, TODAY), expected)
        self.assertEqual(
            parseUsageQuery({"from": None, "to": None, "group_by": None, "client": None}, TODAY),
            expected,
        )
        self.assertIsNone(expected.client)

    def test_range(self):
        """
        C{from} and C{to} are ISO dates, both included.
        """
        self.assertEqual(
            parseUsageQuery({"from": "2026-11-01", "to": "2026-11-30"}, TODAY),
            UsageQuery(dayNumber("2026-11-01"), dayNumber("2026-11-30"), ("day", "key")),
        )
        self.assertEqual(
            parseUsageQuery({"from": "2026-11-25"}, TODAY).toDay, TODAY
        )

    def test_groupBy(self):
        """
        C{group_by} is a comma list of day, key, client and model, kept in
        its order; spaces around the names are ignored.
        """
        self.assertEqual(
            parseUsageQuery({"group_by": "model, client"}, TODAY).groupBy, ("model", "client")
        )
        self.assertEqual(
            parseUsageQuery({"group_by": "day,key,client,model"}, TODAY).groupBy,
            ("day", "key", "client", "model"),
        )

    def test_badDates(self):
        """
        A date that is not YYYY-MM-DD, or no such day, is refused, naming
        the parameter.
        """
        for value in ["", "yesterday", "2026-12-1", "20261201", "2026-W48-1", "2026-02-30", "2026-13-01"]:
            self.assertIn(repr(value), self.assertBad({"from": value}, "from"))
            self.assertBad({"to": value}, "to")

    def test_longValueShortened(self):
        """
        What the message quotes of a bad value is kept short.
        """
        message = self.assertBad({"from": "x" * 10000}, "from")
        self.assertLess(len(message), 120)

    def test_fromAfterTo(self):
        """
        C{from} after C{to} is refused.
        """
        self.assertIn(
            "after", self.assertBad({"from": "2026-12-02", "to": "2026-12-01"}, "from")
        )

    def test_atMost400Days(self):
        """
        At most L{MAX_DAYS} (400) days: 400 are fine, 401 are not.
        """
        self.assertEqual(MAX_DAYS, 400)
        query = parseUsageQuery({"from": "2025-10-28", "to": "2026-12-01"}, TODAY)
        self.assertEqual(query.toDay - query.fromDay + 1, 400)
        self.assertIn("400", self.assertBad({"from": "2025-10-27", "to": "2026-12-01"}, "from"))

    def test_badGroupBy(self):
        """
        An unknown column, a column named twice, an empty list or an empty
        entry are refused, naming C{group_by}.
        """
        self.assertIn("'token'", self.assertBad({"group_by": "day,token"}, "group_by"))
        self.assertIn("twice", self.assertBad({"group_by": "day,key,day"}, "group_by"))
        self.assertBad({"group_by": ""}, "group_by")
        self.assertBad({"group_by": "day,,key"}, "group_by")
        self.assertBad({"group_by": "Day"}, "group_by")

    def test_client(self):
        """
        C{client} is the label of the one client whose counts are wanted,
        kept as it is: 1 to 64 printable ASCII characters, spaces too.
        """
        for name in ["alice", "-", "client-0123abcd", "a b", "x" * 64, "caf\"e'~"]:
            self.assertEqual(
                parseUsageQuery({"client": name, "group_by": "model"}, TODAY),
                UsageQuery(TODAY, TODAY, ("model",), name),
            )

    def test_badClient(self):
        """
        An empty C{client}, a longer one, or one with a character that is
        not printable ASCII is refused, naming C{client}; the message
        quotes it short.
        """
        self.assertIn("''", self.assertBad({"client": ""}, "client"))
        self.assertBad({"client": "x" * 65}, "client")
        for name in ["caf\u00e9", "a\tb", "a\nb", "nul\x00", "del\x7f"]:
            self.assertBad({"client": name}, "client")
        self.assertLess(len(self.assertBad({"client": "\u00e9" * 10000}, "client")), 140)


ROWS = [
    UsageRow(
        ("2026-12-01", "bob"),
        Counts(3, 0, 0, 1, 100, 20, 0, 0, 1_500_000),
    ),
    UsageRow(
        ("2026-12-01", "alice"),
        Counts(12, 10, 1, 0, 1234, 567, 0, 0, 12_300_000),
    ),
]
QUERY = UsageQuery(TODAY, TODAY, ("day", "key"))


class UsageReportTests(SynchronousTestCase):
    """
    Tests for L{usageReport}.
    """

    def test_report(self):
        """
        The report has the query, the rows sorted by group with their
        columns and counters, and the totals; cost in credits.
        """
        report = usageReport(QUERY, ROWS)
        self.assertEqual(
            report,
            {
                "from": "2026-12-01",
                "to": "2026-12-01",
                "group_by": ["day", "key"],
                "client": None,
                "rows": [
                    {
                        "day": "2026-12-01",
                        "key": "alice",
                        "requests": 12,
                        "free_requests": 10,
                        "rate_limited": 1,
                        "errors": 0,
                        "prompt_tokens": 1234,
                        "completion_tokens": 567,
                        "reasoning_tokens": 0,
                        "cached_tokens": 0,
                        "cost": 0.0123,
                    },
                    {
                        "day": "2026-12-01",
                        "key": "bob",
                        "requests": 3,
                        "free_requests": 0,
                        "rate_limited": 0,
                        "errors": 1,
                        "prompt_tokens": 100,
                        "completion_tokens": 20,
                        "reasoning_tokens": 0,
                        "cached_tokens": 0,
                        "cost": 0.0015,
                    },
                ],
                "totals": {
                    "requests": 15,
                    "free_requests": 10,
                    "rate_limited": 1,
                    "errors": 1,
                    "prompt_tokens": 1334,
                    "completion_tokens": 587,
                    "reasoning_tokens": 0,
                    "cached_tokens": 0,
                    "cost": 0.0138,
                },
            },
        )
        self.assertEqual(json.loads(json.dumps(report)), report)
        self.assertEqual(list(report)[:4], ["from", "to", "group_by", "client"])

    def test_reportClient(self):
        """
        A report of one client's counts names it after C{group_by}.
        """
        query = UsageQuery(TODAY, TODAY, ("day", "key"), "alice")
        report = usageReport(query, ROWS)
        self.assertEqual(report["client"], "alice")
        self.assertEqual(list(report)[:4], ["from", "to", "group_by", "client"])
        self.assertEqual(report["rows"], usageReport(QUERY, ROWS)["rows"])

    def test_costExact(self):
        """
        Cost is summed in nanocredits, so that many small costs add up
        exactly, and shown as the nearest JSON number.
        """
        rows = [UsageRow((str(i),), Counts(cost=100)) for i in range(1000)]
        report = usageReport(UsageQuery(TODAY, TODAY, ("key",)), rows)
        self.assertEqual(report["totals"]["cost"], 0.0001)
        self.assertEqual(report["rows"][0]["cost"], 1e-7)

    def test_empty(self):
        """
        No rows: totals of zero.
        """
        report = usageReport(QUERY, [])
        self.assertEqual(report["rows"], [])
        self.assertEqual(set(report["totals"].values()), {0})


class ReportBodyTests(SynchronousTestCase):
    """
    L{reportBody}, the body of GET /hermux/usage, is L{usageReport} as JSON,
    however it is grouped: rows from a template, the rest from json.dumps.
    """

    def assertSameAsReport(self, query, rows):
        body = reportBody(query, rows)
        self.assertEqual(json.loads(body), json.loads(json.dumps(usageReport(query, rows))))

    def test_groupings(self):
        rows = [
            UsageRow(("2026-12-01", "alice", "caf\u00e9 \"client\"", "m:free"), Counts(3, 3, 1, 0, 10, 5, 0, 2, 0)),
            UsageRow(("2026-11-30", "bob", "c\\2", "openai/gpt-4o"), Counts(1, 0, 0, 1, 7, 9, 3, 0, 1_230_000)),
        ]
        day = dayNumber("2026-12-01")
        for groupBy in (("day", "key", "client", "model"), ("client",), ()):
            width = len(groupBy)
            grouped = [UsageRow(row.group[:width], row.counts) for row in rows] if width else [
                UsageRow((), rows[0].counts + rows[1].counts)
            ]
            self.assertSameAsReport(UsageQuery(day - 1, day, groupBy), grouped)

    def test_noRows(self):
        self.assertSameAsReport(UsageQuery(1, 2, ("day", "key")), [])

    def test_client(self):
        """
        The client asked for is in the body as in the report, after
        C{group_by}, or null; a name that looks like JSON stays a string.
        """
        rows = [UsageRow(("m",), Counts(2, cost=5))]
        for client in [None, "alice", '"rows":[]', 'x"}],"rows":[{', "\\"]:
            query = UsageQuery(1, 1, ("model",), client)
            self.assertSameAsReport(query, rows)
            report = json.loads(reportBody(query, rows), object_pairs_hook=list)
            self.assertEqual(report[2:4], [("group_by", ["model"]), ("client", client)])

    def test_costIsCredits(self):
        body = reportBody(UsageQuery(1, 1, ("key",)), [UsageRow(("a",), Counts(cost=12_345))])
        self.assertEqual(json.loads(body)["rows"][0]["cost"], 0.000012345)


class FormatTableTests(SynchronousTestCase):
    """
    Tests for L{formatTable}.
    """

    def test_table(self):
        """
        Grouping columns left-aligned, counters right-aligned, a rule
        before the totals.
        """
        self.assertEqual(
            formatTable(usageReport(QUERY, ROWS)),
            "day         key    requests  free_requests  rate_limited  errors  prompt_tokens"
            "  completion_tokens  reasoning_tokens  cached_tokens      cost\n"
            "----------  -----  --------  -------------  ------------  ------  -------------"
            "  -----------------  ----------------  -------------  --------\n"
            "2026-12-01  alice        12             10             1       0           1234"
            "                567                 0              0  0.012300\n"
            "2026-12-01  bob           3              0             0       1            100"
            "                 20                 0              0  0.001500\n"
            "----------  -----  --------  -------------  ------------  ------  -------------"
            "  -----------------  ----------------  -------------  --------\n"
            "total                    15             10             1       1           1334"
            "                587                 0              0  0.013800\n",
        )

    def test_empty(self):
        """
        With no rows, the header and a line of zeros.
        """
        table = formatTable(usageReport(UsageQuery(TODAY, TODAY, ("model",)), []))
        lines = table.splitlines()
        self.assertEqual(len(lines), 3)
        self.assertTrue(lines[0].startswith("model  requests"))
        self.assertTrue(lines[2].startswith("total"))
        self.assertTrue(lines[2].endswith("0.000000"))
