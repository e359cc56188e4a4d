# -*- test-case-name: tests.test_usagereport -*-
"""
Usage reports: what C{GET /hermux/usage} and the C{hermux usage} command
ask the ledger for (L{parseUsageQuery}), and how they show its answer (the
JSON of L{usageReport}, the table of L{formatTable}).
"""

from __future__ import annotations

__all__ = [
    "MAX_DAYS",
    "DEFAULT_GROUP_BY",
    "UsageQuery",
    "UsageQueryError",
    "parseUsageQuery",
    "usageReport",
    "reportBody",
    "formatTable",
]

import json
import re
from typing import Iterable, Mapping

import attr

from hermux.ledger import COUNTERS, GROUP_COLUMNS, UsageRow, dayNumber, dayText

# The longest report, in days: what the state file keeps by default.
MAX_DAYS = 400
DEFAULT_GROUP_BY = ("day", "key")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
# A client's label: printable ASCII, as the ledger keeps it.
_CLIENT = re.compile(r"[\x20-\x7e]{1,64}")
_NANOCREDITS = 10**9
# A JSON string, as json.dumps writes one.
_quoted = json.encoder.encode_basestring_ascii


@attr.frozen
class UsageQuery:
    """
    Which days (UTC day numbers, both included), how to group them, and
    whose counts: one client's (its label), or every client's (L{None}).
    """

    fromDay: int
    toDay: int
    groupBy: tuple[str, ...]
    client: str | None = None


class UsageQueryError(ValueError):
    """
    A parameter of a usage query is wrong; C{str()} names it and says why,
    in one line a user can act on.
    """

    def __init__(self, parameter: str, message: str):
        super().__init__(parameter, message)
        self.parameter = parameter
        self.message = message

    def __str__(self) -> str:
        return f"{self.parameter}: {self.message}"


def _shown(value: str) -> str:
    # What the user sent, quoted and kept short.
    return repr(value if len(value) <= 40 else value[:40] + "...")


def _day(parameter: str, value: str | None, today: int) -> int:
    if value is None:
        return today
    if not _DATE.fullmatch(value):
        raise UsageQueryError(parameter, f"not a date (YYYY-MM-DD, UTC): {_shown(value)}")
    try:
        return dayNumber(value)
    except ValueError:
        raise UsageQueryError(parameter, f"no such date: {_shown(value)}")


def _groupBy(value: str | None) -> tuple[str, ...]:
    if value is None:
        return DEFAULT_GROUP_BY
    names = tuple(name.strip() for name in value.split(","))
    choices = ", ".join(GROUP_COLUMNS)
    for name in names:
        if not name:
            raise UsageQueryError("group_by", f"a comma list of {choices}: got {_shown(value)}")
        if name not in GROUP_COLUMNS:
            raise UsageQueryError("group_by", f"{_shown(name)} is not one of {choices}")
    if len(set(names)) != len(names):
        raise UsageQueryError("group_by", f"a column named twice: {_shown(value)}")
    return names


def _client(value: str | None) -> str | None:
    if value is None:
        return None
    if not _CLIENT.fullmatch(value):
        raise UsageQueryError(
            "client", f"a client's name, 1 to 64 printable ASCII characters: got {_shown(value)}"
        )
    return value


def parseUsageQuery(args: Mapping[str, str | None], today: int) -> UsageQuery:
    """
    The query that C{args} asks for: C{from} and C{to}, ISO dates (UTC,
    both included, today by default, at most L{MAX_DAYS} days);
    C{group_by}, a comma list of day, key, client and model (day,key by
    default); and C{client}, the label of the one client whose counts are
    wanted (every client's by default).  An argument that is absent or
    L{None} takes its default.

    @param today: the UTC day number of today.
    @raise UsageQueryError: naming the parameter that is wrong.
    """
    fromDay = _day("from", args.get("from"), today)
    toDay = _day("to", args.get("to"), today)
    if fromDay > toDay:
        raise UsageQueryError("from", f"{dayText(fromDay)} is after to ({dayText(toDay)})")
    if toDay - fromDay + 1 > MAX_DAYS:
        raise UsageQueryError(
            "from", f"at most {MAX_DAYS} days, from and to included; asked for {toDay - fromDay + 1}"
        )
    return UsageQuery(
        fromDay, toDay, _groupBy(args.get("group_by")), _client(args.get("client"))
    )


def _credits(nanocredits: int) -> float:
    # int / int is correctly rounded in Python: the float nearest to the
    # exact number of credits, as float(Decimal(nanocredits) / 10**9).
    return nanocredits / _NANOCREDITS


def usageReport(query: UsageQuery, rows: Iterable[UsageRow]) -> dict:
    """
    The JSON object of C{GET /hermux/usage}: the query (C{from}, C{to},
    C{group_by}, C{client}: a label or null), one row per group (its
    columns, then the counters, in L{COUNTERS}' names), sorted by the
    grouping columns, and the totals.
    Cost is in credits, a JSON number.
    """
    rows = sorted(rows, key=lambda row: row.group)
    columns = (*query.groupBy, *COUNTERS)
    # Counts are tuples in COUNTERS' order, cost last.
    shown = [
        dict(zip(columns, (*row.group, *row.counts[:-1], row.counts[-1] / _NANOCREDITS)))
        for row in rows
    ]
    totals = dict(zip(COUNTERS, (sum(column) for column in zip(*(row.counts for row in rows)))))
    if not rows:
        totals = dict.fromkeys(COUNTERS, 0)
    totals["cost"] = _credits(totals["cost"])
    return {
        "from": dayText(query.fromDay),
        "to": dayText(query.toDay),
        "group_by": list(query.groupBy),
        "client": query.client,
        "rows": shown,
        "totals": totals,
    }


def reportBody(query: UsageQuery, rows: Iterable[UsageRow]) -> bytes:
    """
    The body of C{GET /hermux/usage}: L{usageReport} as compact JSON.  The
    rows, thousands over a long range, are written from a template rather
    than built as objects for L{json.dumps}, which takes three times as
    long.
    """
    rows = sorted(rows, key=lambda row: row.group)
    report = usageReport(query, [])
    if rows:
        totals = [sum(column) for column in zip(*(row.counts for row in rows))]
        report["totals"] = dict(zip(COUNTERS, totals))
        report["totals"]["cost"] = _credits(totals[-1])
    template = (
        "{"
        + ",".join([f'"{column}":%s' for column in query.groupBy] + [f'"{c}":%d' for c in COUNTERS[:-1]])
        + ',"cost":%r}'
    )
    if not query.groupBy:
        template = template.replace("{,", "{", 1)
    quoted = _quoted
    shown = ",".join(
        [
            template % (*map(quoted, row.group), *row.counts[:-1], row.counts[-1] / _NANOCREDITS)
            for row in rows
        ]
    )
    head = json.dumps(report, separators=(",", ":"))
    # The report without rows ends with "rows":[],"totals":{...}}.
    at = head.index('"rows":[]') + len('"rows":[')
    return (head[:at] + shown + head[at:]).encode("ascii")


def _cell(column: str, value) -> str:
    if column == "cost":
        return f"{value:.6f}"
    return str(value)


def formatTable(report: dict) -> str:
    """
    A L{usageReport} as an aligned text table for a terminal: a header, one
    line per row (grouping columns left-aligned, counters right-aligned), a
    rule and a line of totals.  Cost is in credits, to six decimals.  Ends
    with a newline.
    """
    groupBy = list(report["group_by"])
    columns = groupBy + list(COUNTERS)
    lines = [[_cell(c, row[c]) for c in columns] for row in report["rows"]]
    totals = [""] * len(groupBy) + [_cell(c, report["totals"][c]) for c in COUNTERS]
    if groupBy:
        totals[0] = "total"
    widths = [len(c) for c in columns]
    for line in [*lines, totals]:
        widths = [max(w, len(cell)) for w, cell in zip(widths, line)]

    def render(cells) -> str:
        return "  ".join(
            cell.ljust(w) if i < len(groupBy) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [render(columns), rule, *(render(line) for line in lines)]
    if lines:
        out.append(rule)
    out.append(render(totals))
    return "\n".join(out) + "\n"
