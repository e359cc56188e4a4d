# -*- test-case-name: tests.test_config -*-
"""
Loading hermux's two configuration files: the upstream keys (tokens.csv) and
the clients' access tokens (allow.txt).

Every problem is reported as one L{ConfigError} naming the file and line, and
never quoting a key or an access token.
"""

from __future__ import annotations

__all__ = [
    "Key",
    "ConfigError",
    "loadKeys",
    "parseKeys",
    "loadAccessTokens",
    "parseAccessTokens",
    "Configuration",
    "loadConfiguration",
    "checkSeparate",
]

import csv
import io
import re
from decimal import Decimal, InvalidOperation

import attr

_KEY_COLUMNS = ("name", "token")
_OPTIONAL_COLUMNS = ("daily_limit", "daily_cost")
_NANOCREDITS = 10**9
# No account spends a million credits a day: a larger daily_cost is a typo.
_DAILY_COST_LARGEST = Decimal(10**6)
_NAME = re.compile(r"[\x20-\x7e]{1,64}")
# A secret travels in an Authorization header: visible ASCII, no spaces.
_SECRET = re.compile(r"[\x21-\x7e]+")


@attr.frozen
class Key:
    """
    One upstream API key: its public name and its secret token.

    The token is left out of C{repr} so that a key can never be logged by
    accident.
    """

    name: str
    token: str = attr.field(repr=False)
    dailyLimit: int | None = None
    dailyCost: int | None = None  # nanocredits


class ConfigError(Exception):
    """
    A configuration file hermux cannot use.  C{str()} of it is one line that
    names the file (and the line, where there is one) and what is wrong.
    """

    def __init__(self, path: str, message: str, line: int | None = None):
        super().__init__(path, message, line)
        self.path = path
        self.message = message
        self.line = line

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.path}: {self.message}"
        return f"{self.path}, line {self.line}: {self.message}"


def _readText(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(path, "file not found")
    except IsADirectoryError:
        raise ConfigError(path, "is a directory, not a file")
    except OSError as e:
        raise ConfigError(path, f"cannot read: {e.strerror}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(path, "not UTF-8 text", line)


def loadKeys(path: str) -> tuple[Key, ...]:
    """
    Read the upstream keys from a CSV file with the header C{name,token} and
    the optional columns C{daily_limit} (free-model requests a UTC day) and
    C{daily_cost} (credits a UTC day), in either order.
    """
    return parseKeys(_readText(path), path)


def parseKeys(text: str, path: str = "tokens.csv") -> tuple[Key, ...]:
    """
    Parse the text of a tokens.csv file; C{path} only names it in errors.
    """
    # Whitespace around fields is not part of them, quoted or not: skip it
    # after commas, and drop it at line ends, where the csv module would
    # call it an error after a closing quote.
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True, strict=True)
    rows = _nonBlankRows(reader, path)
    header = next(rows, None)
    if header is None:
        raise ConfigError(path, "empty file; expected the header 'name,token'")
    lineNumber, columns = header
    columns = [c.strip().lower() for c in columns]
    optional = columns[2:]
    if (
        tuple(columns[:2]) != _KEY_COLUMNS
        or any(c not in _OPTIONAL_COLUMNS for c in optional)
        or len(set(optional)) != len(optional)
    ):
        raise ConfigError(
            path,
            "the first line must be the header 'name,token', optionally followed "
            "by the columns daily_limit and daily_cost (e.g. 'name,token,daily_limit,daily_cost')",
            lineNumber,
        )
    keys: list[Key] = []
    namesSeen: dict[str, int] = {}
    tokensSeen: dict[str, int] = {}
    for lineNumber, row in rows:
        key = _parseKeyRow(row, columns, path, lineNumber)
        if key.name in namesSeen:
            raise ConfigError(
                path,
                f"duplicate name {key.name!r} (first on line {namesSeen[key.name]})",
                lineNumber,
            )
        if key.token in tokensSeen:
            raise ConfigError(
                path,
                f"duplicate token (the same as on line {tokensSeen[key.token]})",
                lineNumber,
            )
        namesSeen[key.name] = tokensSeen[key.token] = lineNumber
        keys.append(key)
    if not keys:
        raise ConfigError(path, "no keys: add one 'name,token' line per key")
    return tuple(keys)


def _nonBlankRows(reader, path):
    """
    Yield C{(line number, row)} for each row with content, turning CSV
    syntax errors into L{ConfigError}.
    """
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise ConfigError(path, f"not valid CSV ({e})", reader.line_num)
        if any(field.strip() for field in row):
            yield reader.line_num, row


def _parseKeyRow(row: list[str], columns: list[str], path: str, line: int) -> Key:
    width = len(columns)
    if len(row) != width:
        raise ConfigError(
            path, f"expected {width} columns, found {len(row)}", line
        )
    name, token = row[0].strip(), row[1].strip()
    if not name:
        raise ConfigError(path, "empty name", line)
    if not _NAME.fullmatch(name):
        raise ConfigError(
            path,
            "a name must be printable ASCII (letters, digits, punctuation, "
            "spaces) and at most 64 characters",
            line,
        )
    if not token:
        raise ConfigError(path, f"empty token for {name!r}", line)
    if not _SECRET.fullmatch(token):
        raise ConfigError(
            path,
            f"the token for {name!r} contains spaces or non-ASCII characters",
            line,
        )
    fields = {column: value.strip() for column, value in zip(columns[2:], row[2:])}
    dailyLimit = dailyCost = None
    text = fields.get("daily_limit")
    if text:
        if not text.isascii() or not text.isdigit():
            raise ConfigError(
                path,
                f"daily_limit for {name!r} must be a whole number of free-model "
                f"requests, 0 or more (or empty for no limit), not {text!r}",
                line,
            )
        dailyLimit = int(text)
    text = fields.get("daily_cost")
    if text:
        dailyCost = _nanocredits(text)
        if dailyCost is None:
            raise ConfigError(
                path,
                f"daily_cost for {name!r} must be a number of credits, 0 or more "
                f"(such as 2.5; or empty for no limit), not {text!r}",
                line,
            )
    return Key(name=name, token=token, dailyLimit=dailyLimit, dailyCost=dailyCost)


def _nanocredits(text: str) -> int | None:
    """
    A decimal number of credits (C{"2.5"}) as whole nanocredits, or L{None}
    if it is not a sane one.
    """
    if not text.isascii() or not all(c.isdigit() or c == "." for c in text):
        return None
    try:
        credits = Decimal(text)
    except InvalidOperation:
        return None
    if not credits.is_finite() or credits < 0 or credits > _DAILY_COST_LARGEST:
        return None
    return int((credits * _NANOCREDITS).to_integral_value())


def loadAccessTokens(path: str) -> tuple[str, ...]:
    """
    Read the access tokens that clients may present, one per line; blank
    lines and lines starting with C{#} are ignored.
    """
    return parseAccessTokens(_readText(path), path)


def parseAccessTokens(text: str, path: str = "allow.txt") -> tuple[str, ...]:
    """
    Parse the text of an allow.txt file; C{path} only names it in errors.
    """
    tokens: dict[str, int] = {}
    # Only LF (and CRLF) end a line; str.splitlines would also split at
    # form feeds and Unicode separators and miscount the lines.
    for lineNumber, line in enumerate(text.split("\n"), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not _SECRET.fullmatch(token):
            raise ConfigError(
                path,
                "an access token must be one word of visible ASCII characters",
                lineNumber,
            )
        if token in tokens:
            raise ConfigError(
                path,
                f"duplicate access token (the same as on line {tokens[token]})",
                lineNumber,
            )
        tokens[token] = lineNumber
    if not tokens:
        raise ConfigError(path, "no access tokens: add one token per line")
    return tuple(tokens)


@attr.frozen
class Configuration:
    """
    What hermux's configuration files say: the upstream keys and the
    clients' access tokens.
    """

    keys: tuple[Key, ...]
    accessTokens: tuple[str, ...] = attr.field(repr=False)


def loadConfiguration(tokensPath: str, allowPath: str) -> Configuration:
    """
    Read and check both configuration files together: at start and on every
    reload, so that both are judged by the same rules.

    @raise ConfigError: naming the file and line of the first problem.
    """
    keys = loadKeys(tokensPath)
    accessTokens = loadAccessTokens(allowPath)
    checkSeparate(keys, accessTokens, allowPath)
    return Configuration(keys, accessTokens)


def checkSeparate(keys: tuple[Key, ...], accessTokens: tuple[str, ...], allowPath: str):
    """
    Refuse an access token that is also an upstream key: a client holding it
    would hold an OpenRouter key.
    """
    secrets = {key.token for key in keys}
    if any(token in secrets for token in accessTokens):
        raise ConfigError(
            allowPath,
            "an access token is also an upstream key; "
            "clients and OpenRouter must get different secrets",
        )
