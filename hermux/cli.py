# -*- test-case-name: tests.test_cli -*-
"""
The C{hermux} command for the shell (hermux itself runs under C{twistd
hermux}): C{hermux usage} prints the usage counts of a state file.

It opens the file read-only: it never creates, migrates or writes it, and
it is safe while hermux runs (SQLite's WAL lets a reader see the last
committed batch).  A file of schema 1 is not read: hermux migrates it when
it next starts.
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import json
import sys
import time

from hermux.ledger import LedgerError, TooManyRows, openReadOnly, readUsage
from hermux.usagereport import UsageQueryError, formatTable, parseUsageQuery, usageReport

# What twistd's hermux plugin uses when --state is not given (hermux.tap).
DEFAULT_STATE = "hermux.sqlite3"


class _Failed(Exception):
    """
    The command cannot do what it was asked; C{str()} says why, in one line.
    """


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hermux", description="hermux's commands for the shell.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    usage = commands.add_parser(
        "usage",
        help="print the usage counts of a state file",
        description=(
            "Print the usage counts of hermux's state file, read-only (safe "
            "while hermux runs): per UTC day, key, client or model, with totals. "
            "Cost is in credits."
        ),
    )
    usage.add_argument(
        "--state", default=DEFAULT_STATE, metavar="PATH",
        help=f"the state file, as given to twistd hermux --state (default: {DEFAULT_STATE})",
    )
    usage.add_argument(
        "--from", dest="from_", metavar="DATE", help="first day, YYYY-MM-DD, UTC (default: today)"
    )
    usage.add_argument("--to", metavar="DATE", help="last day, included (default: today)")
    usage.add_argument(
        "--by", metavar="COLUMNS",
        help="a comma list of day, key, client, model (default: day,key)",
    )
    usage.add_argument(
        "--client", metavar="NAME",
        help="only this client's counts, by its label (default: every client's)",
    )
    usage.add_argument("--json", action="store_true", help="print JSON, as GET /hermux/usage answers")
    return parser


def _usage(arguments, out, now: float) -> None:
    today = int(now // 86400)
    try:
        query = parseUsageQuery(
            {
                "from": arguments.from_,
                "to": arguments.to,
                "group_by": arguments.by,
                "client": arguments.client,
            },
            today,
        )
    except UsageQueryError as e:
        name = {"from": "--from", "to": "--to", "group_by": "--by", "client": "--client"}[
            e.parameter
        ]
        raise _Failed(f"hermux usage: {name}: {e.message}")
    try:
        connection = openReadOnly(arguments.state)
        try:
            rows = readUsage(
                connection, query.fromDay, query.toDay, query.groupBy, query.client
            )
        finally:
            connection.close()
    except (LedgerError, TooManyRows) as e:
        raise _Failed(f"hermux usage: {e}")
    except Exception as e:  # sqlite3 errors: a damaged or locked file
        raise _Failed(f"hermux usage: {arguments.state}: cannot read the state file: {e}")
    report = usageReport(query, rows)
    if arguments.json:
        out.write(json.dumps(report, indent=2) + "\n")
    else:
        out.write(formatTable(report))


def main(argv: list[str] | None = None, *, out=None, now: float | None = None) -> int:
    """
    Run the C{hermux} command with C{argv} (default: the process's
    arguments); return its exit status.  Errors are one line on standard
    error and exit status 2.
    """
    if out is None:
        out = sys.stdout
    if now is None:
        now = time.time()
    try:
        arguments = _parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a bad argument (2)
        return 0 if e.code is None else e.code
    try:
        _usage(arguments, out, now)
    except _Failed as e:
        sys.stderr.write(f"{e}\n")
        return 2
    return 0
