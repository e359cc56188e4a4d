# -*- test-case-name: tests.test_config -*-
"""
Loading hermux's configuration files: the upstream keys (tokens.csv), the
clients' bare access tokens (allow.txt) and the named clients with their
roles and limits (clients.csv).

Every problem is reported as one L{ConfigError} naming the file and line (and
the column, where one is to blame), and never quoting a key or an access
token.
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
    "Role",
    "ClientEntry",
    "loadClients",
    "parseClients",
]

import csv
import io
import re
from datetime import date, datetime, time, timezone
from decimal import Decimal, InvalidOperation
from enum import Enum

import attr

_KEY_COLUMNS = ("name", "token")
_OPTIONAL_COLUMNS = ("daily_limit", "daily_cost")
_NANOCREDITS = 10**9
# No account spends a million credits a day: a larger daily_cost is a typo.
_DAILY_COST_LARGEST = Decimal(10**6)
_NAME = re.compile(r"[\x20-\x7e]{1,64}")
# A secret travels in an Authorization header: visible ASCII, no spaces.
_SECRET = re.compile(r"[\x21-\x7e]+")
# The labels that hermux.access gives allow.txt's tokens.
_ALLOW_LABEL = re.compile(r"client-[0-9a-f]{8}")
# What the usage ledger records for a request of no client.
_NO_CLIENT = "-"
_CLIENT_COLUMNS = (
    "role",
    "daily_requests",
    "daily_cost",
    "per_minute",
    "max_parallel",
    "models",
    "keys",
    "expires",
)
# A header cell that looks like a column name, and may be quoted in an error.
_COLUMN_WORD = re.compile(r"[a-z][a-z0-9_]{0,39}")
_DAILY_REQUESTS_LARGEST = 10**9
_RATE_LARGEST = 1_000_000
_MODEL_PATTERN_LONGEST = 128
_MODEL_PATTERNS_MOST = 100
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_DATE_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ]")
_END_OF_DAY = time(23, 59, 59, tzinfo=timezone.utc)


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
    names the file (and the line, and the column by its header name, where
    there are) and what is wrong.
    """

    def __init__(
        self,
        path: str,
        message: str,
        line: int | None = None,
        column: str | None = None,
    ):
        super().__init__(path, message, line, column)
        self.path = path
        self.message = message
        self.line = line
        self.column = column

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.path}: {self.message}"
        if self.column is None:
            return f"{self.path}, line {self.line}: {self.message}"
        return f"{self.path}, line {self.line}, column {self.column}: {self.message}"


class _BadField(Exception):
    """
    A field that its column does not accept.  The argument says why in a
    sentence that quotes no secret; L{_field} adds where.
    """


def _field(path: str, line: int, column: str | None, read, *args):
    """
    C{read(*args)}, one field's value, with a L{_BadField} it raises turned
    into a L{ConfigError} naming the field's place.
    """
    try:
        return read(*args)
    except _BadField as e:
        raise ConfigError(path, str(e), line, column) from None


def _shown(text: str) -> str:
    """
    A field's text as an error quotes it: escaped, so that it stays on one
    line, and cut short if long.
    """
    if len(text) > 40:
        return repr(text[:40]) + "..."
    return repr(text)


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
    rows = _csvRows(text, path)
    header = next(rows, None)
    if header is None:
        raise ConfigError(path, "empty file; expected the header 'name,token'")
    lineNumber, columns = header
    columns = [c.lower() for c in columns]
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
    distinct = _Distinct(path)
    for lineNumber, row in rows:
        key = _parseKeyRow(row, columns, path, lineNumber)
        distinct.check(lineNumber, key.name, key.token)
        keys.append(key)
    if not keys:
        raise ConfigError(path, "no keys: add one 'name,token' line per key")
    return tuple(keys)


def _csvRows(text: str, path: str):
    """
    Yield C{(line number, fields)} for each row of a CSV file's text that
    has content, with the whitespace around each field removed, and turning
    CSV syntax errors into L{ConfigError}.
    """
    # Whitespace around fields is not part of them, quoted or not: skip it
    # after commas, and drop it at line ends, where the csv module would
    # call it an error after a closing quote.
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True, strict=True)
    return _nonBlankRows(reader, path)


def _nonBlankRows(reader, path):
    """
    Yield C{(line number, stripped fields)} for each row of C{reader} with
    content, turning CSV syntax errors into L{ConfigError}.  A row's line
    is the one it starts on, also when a quoted field spans several.
    """
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise ConfigError(path, f"not valid CSV ({e})", reader.line_num)
        fields = [field.strip() for field in row]
        if any(fields):
            yield start, fields


def _checkWidth(row: list[str], columns: list[str], path: str, line: int):
    """
    Refuse a row with more or fewer fields than its file's header.
    """
    if len(row) != len(columns):
        raise ConfigError(
            path, f"expected {len(columns)} columns, found {len(row)}", line
        )


def _checkName(name: str) -> str:
    """
    A key's or a client's name: printable ASCII, so that it cannot break a
    log line, and short.
    """
    if not name:
        raise _BadField("empty name")
    if not _NAME.fullmatch(name):
        raise _BadField(
            "a name must be printable ASCII (letters, digits, punctuation, "
            "spaces) and at most 64 characters"
        )
    return name


def _checkToken(token: str, name: str) -> str:
    """
    A key's or a client's secret, which travels in an HTTP header.  The
    errors name its owner and never quote it.
    """
    if not token:
        raise _BadField(f"empty token for {name!r}")
    if not _SECRET.fullmatch(token):
        raise _BadField(
            f"the token for {name!r} contains spaces or non-ASCII characters"
        )
    return token


class _Distinct:
    """
    The names and tokens of a file's rows so far, to refuse a row that
    repeats either.
    """

    def __init__(self, path: str, nameColumn: str | None = None, tokenColumn: str | None = None):
        self._path = path
        self._nameColumn = nameColumn
        self._tokenColumn = tokenColumn
        self._names: dict[str, int] = {}
        self._tokens: dict[str, int] = {}

    def check(self, line: int, name: str, token: str):
        if name in self._names:
            raise ConfigError(
                self._path,
                f"duplicate name {name!r} (first on line {self._names[name]})",
                line,
                self._nameColumn,
            )
        if token in self._tokens:
            raise ConfigError(
                self._path,
                f"duplicate token (the same as on line {self._tokens[token]})",
                line,
                self._tokenColumn,
            )
        self._names[name] = self._tokens[token] = line


def _parseKeyRow(row: list[str], columns: list[str], path: str, line: int) -> Key:
    _checkWidth(row, columns, path, line)
    name = _field(path, line, None, _checkName, row[0])
    token = _field(path, line, None, _checkToken, row[1], name)
    fields = dict(zip(columns[2:], row[2:]))
    dailyLimit = dailyCost = None
    text = fields.get("daily_limit")
    if text:
        dailyLimit = _wholeNumber(text, _DAILY_REQUESTS_LARGEST)
        if dailyLimit is None:
            raise ConfigError(
                path,
                f"daily_limit for {name!r} must be a whole number of free-model "
                f"requests, from 0 to {_DAILY_REQUESTS_LARGEST} (or empty for no limit), "
                f"not {_shown(text)}",
                line,
            )
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


class Role(Enum):
    """
    What a client of clients.csv may do besides relaying: an admin also
    reads every client's usage and hermux's own pages.
    """

    USER = "user"
    ADMIN = "admin"


@attr.frozen
class ClientEntry:
    """
    One client of clients.csv: its name (its label in logs and the ledger),
    its secret token, its role, and its limits; L{None} means no limit.

    The token is left out of C{repr} so that a client can never be logged by
    accident.
    """

    name: str
    token: str = attr.field(repr=False)
    role: Role = Role.USER
    dailyRequests: int | None = None  # requests admitted per UTC day
    dailyCost: int | None = None  # nanocredits per UTC day
    perMinute: int | None = None  # requests admitted per sliding 60 seconds
    maxParallel: int | None = None  # requests in flight at once
    models: tuple[str, ...] | None = None  # fnmatchcase patterns; None: any
    keys: tuple[str, ...] | None = None  # names of tokens.csv's keys; None: any
    expires: float | None = None  # POSIX time of the token's last valid moment

    def limited(self) -> bool:
        """
        Whether any of the client's request or cost limits is set.
        """
        limits = (self.dailyRequests, self.dailyCost, self.perMinute, self.maxParallel)
        return any(limit is not None for limit in limits)


def loadClients(path: str) -> tuple[ClientEntry, ...]:
    """
    Read the clients from a CSV file whose header starts C{name,token},
    followed by any of the columns C{role}, C{daily_requests},
    C{daily_cost}, C{per_minute}, C{max_parallel}, C{models}, C{keys} and
    C{expires}, in any order.
    """
    return parseClients(_readText(path), path)


def parseClients(text: str, path: str = "clients.csv") -> tuple[ClientEntry, ...]:
    """
    Parse the text of a clients.csv file; C{path} only names it in errors.
    """
    return tuple(client for _, client in _numberedClients(text, path))


def _numberedClients(text: str, path: str) -> list[tuple[int, ClientEntry]]:
    """
    The clients of a clients.csv file's text, each with its line number,
    for the checks against the other files to name it.
    """
    rows = _csvRows(text, path)
    header = next(rows, None)
    if header is None:
        raise ConfigError(path, "empty file; expected a header starting 'name,token'")
    lineNumber, columns = header
    columns = _clientColumns(columns, path, lineNumber)
    clients: list[tuple[int, ClientEntry]] = []
    distinct = _Distinct(path, "name", "token")
    for lineNumber, row in rows:
        client = _parseClientRow(row, columns, path, lineNumber)
        distinct.check(lineNumber, client.name, client.token)
        clients.append((lineNumber, client))
    if not clients:
        raise ConfigError(path, "no clients: add one line per client under the header")
    return clients


def _clientColumns(header: list[str], path: str, line: int) -> list[str]:
    """
    The column names of clients.csv's header, in lower case, once each.
    """
    columns = [c.lower() for c in header]
    if columns[:2] != ["name", "token"]:
        raise ConfigError(
            path,
            "the first line must be a header starting 'name,token' "
            "(e.g. 'name,token,role,daily_requests')",
            line,
        )
    seen = {"name", "token"}
    for position, column in enumerate(columns[2:], start=3):
        if not _COLUMN_WORD.fullmatch(column):
            # Perhaps a secret, where the user forgot the header: unquoted.
            raise ConfigError(path, f"header field {position} is not a column name", line)
        if column in seen:
            raise ConfigError(path, f"the column {column} appears twice", line)
        if column not in _CLIENT_COLUMNS:
            raise ConfigError(
                path,
                f"unknown column {column!r}; after name,token the header may have "
                f"any of {', '.join(_CLIENT_COLUMNS)}",
                line,
            )
        seen.add(column)
    return columns


def _parseClientRow(
    row: list[str], columns: list[str], path: str, line: int
) -> ClientEntry:
    _checkWidth(row, columns, path, line)
    name = _field(path, line, "name", _clientName, row[0])
    token = _field(path, line, "token", _checkToken, row[1], name)
    values = {}
    for column, text in zip(columns[2:], row[2:]):
        if text:
            attribute, read = _CLIENT_FIELDS[column]
            values[attribute] = _field(path, line, column, read, text)
    return ClientEntry(name=name, token=token, **values)


def _clientName(name: str) -> str:
    _checkName(name)
    if name == _NO_CLIENT:
        raise _BadField(
            f"the name {_NO_CLIENT!r} is reserved: the usage ledger writes it for no client"
        )
    if _ALLOW_LABEL.fullmatch(name):
        raise _BadField(
            "names of the form client-<8 hex digits> are reserved for "
            "allow.txt's tokens; choose another"
        )
    return name


def _role(text: str) -> Role:
    try:
        return Role(text.lower())
    except ValueError:
        raise _BadField(f"expected user or admin (or empty for user), not {_shown(text)}")


def _wholeNumber(text: str, largest: int) -> int | None:
    """
    A whole number written in ASCII digits, or L{None} if C{text} is not
    one or it is over C{largest}.
    """
    if not text.isascii() or not text.isdigit():
        return None
    # Too many digits would be slow for int(), or refused by it.
    if len(text.lstrip("0")) > len(str(largest)):
        return None
    number = int(text)
    return number if number <= largest else None


def _dailyRequests(text: str) -> int:
    number = _wholeNumber(text, _DAILY_REQUESTS_LARGEST)
    if number is None:
        raise _BadField(
            f"expected a whole number of requests a UTC day from 0 to "
            f"{_DAILY_REQUESTS_LARGEST} (0 pauses the client; empty for no limit), "
            f"not {_shown(text)}"
        )
    return number


def _dailyCost(text: str) -> int:
    nanocredits = _nanocredits(text)
    if nanocredits is None:
        raise _BadField(
            f"expected a number of credits a UTC day from 0 to {_DAILY_COST_LARGEST}, "
            f"such as 2.5 (empty for no limit), not {_shown(text)}"
        )
    return nanocredits


def _rate(what: str):
    """
    A reader of a positive whole number of requests C{what} (C{"a
    minute"}), at most a million.
    """

    def read(text: str) -> int:
        number = _wholeNumber(text, _RATE_LARGEST)
        if not number:
            raise _BadField(
                f"expected a whole number of requests {what} from 1 to "
                f"{_RATE_LARGEST} (empty for no limit), not {_shown(text)}"
            )
        return number

    return read


def _models(text: str) -> tuple[str, ...]:
    patterns = _words(text)
    for pattern in patterns:
        if not _SECRET.fullmatch(pattern):
            raise _BadField(f"the model pattern {_shown(pattern)} is not printable ASCII")
        if len(pattern) > _MODEL_PATTERN_LONGEST:
            raise _BadField(
                f"the model pattern {_shown(pattern)} is longer than "
                f"{_MODEL_PATTERN_LONGEST} characters"
            )
    if len(patterns) > _MODEL_PATTERNS_MOST:
        raise _BadField(
            f"{len(patterns)} model patterns; at most {_MODEL_PATTERNS_MOST} are allowed"
        )
    return patterns


def _keyNames(text: str) -> tuple[str, ...]:
    names = _words(text)
    for name in names:
        if not _NAME.fullmatch(name):
            raise _BadField(
                f"{_shown(name)} is not a key name (printable ASCII, at most 64 characters)"
            )
    return names


def _words(text: str) -> tuple[str, ...]:
    """
    The space-separated words of C{text}, each once, in their order.
    """
    return tuple(dict.fromkeys(text.split()))


def _expires(text: str) -> float:
    moment = _moment(text)
    if moment is None:
        raise _BadField(
            "expected a date such as 2030-12-31 (the token is valid to the end of "
            "that day, UTC) or a date and time such as 2030-12-31T18:00:00+01:00, "
            f"not {_shown(text)}"
        )
    return moment.timestamp()


def _moment(text: str) -> datetime | None:
    """
    The moment an C{expires} field names: the last second of a day alone,
    UTC where no offset is given; or L{None} if it names none.
    """
    if not text.isascii():
        return None
    try:
        if _DATE.fullmatch(text):
            return datetime.combine(date.fromisoformat(text), _END_OF_DAY)
        if _DATE_TIME.match(text):
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            return moment
    except ValueError:
        pass
    return None


# The optional columns of clients.csv: the attribute each sets, and its reader.
_CLIENT_FIELDS = {
    "role": ("role", _role),
    "daily_requests": ("dailyRequests", _dailyRequests),
    "daily_cost": ("dailyCost", _dailyCost),
    "per_minute": ("perMinute", _rate("a minute")),
    "max_parallel": ("maxParallel", _rate("at once")),
    "models": ("models", _models),
    "keys": ("keys", _keyNames),
    "expires": ("expires", _expires),
}


@attr.frozen
class Configuration:
    """
    What hermux's configuration files say: the upstream keys, the bare
    access tokens of allow.txt and the clients of clients.csv.
    """

    keys: tuple[Key, ...]
    accessTokens: tuple[str, ...] = attr.field(repr=False)
    clients: tuple[ClientEntry, ...] = ()


def loadConfiguration(
    tokensPath: str, allowPath: str | None, clientsPath: str | None = None
) -> Configuration:
    """
    Read and check the configuration files together: at start and on every
    reload, so that all are judged by the same rules.  Either of allow.txt
    and clients.csv may be left out (L{None}), not both.

    @raise ConfigError: naming the file and line of the first problem.
    """
    if allowPath is None and clientsPath is None:
        raise ConfigError(
            "allow.txt and clients.csv",
            "neither file is given; hermux needs one or both to let clients in",
        )
    keys = loadKeys(tokensPath)
    accessTokens: tuple[str, ...] = ()
    if allowPath is not None:
        accessTokens = loadAccessTokens(allowPath)
        checkSeparate(keys, accessTokens, allowPath)
    clients: list[tuple[int, ClientEntry]] = []
    if clientsPath is not None:
        clients = _numberedClients(_readText(clientsPath), clientsPath)
        _checkClients(clients, clientsPath, keys, tokensPath, accessTokens, allowPath)
    return Configuration(keys, accessTokens, tuple(client for _, client in clients))


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


def _checkClients(
    clients: list[tuple[int, ClientEntry]],
    clientsPath: str,
    keys: tuple[Key, ...],
    tokensPath: str,
    accessTokens: tuple[str, ...],
    allowPath: str | None,
):
    """
    Refuse a client whose token is also an upstream key or an allow.txt
    token, or who names a key that tokens.csv does not have.
    """
    keyTokens = {key.token for key in keys}
    keyNames = {key.name for key in keys}
    allowed = set(accessTokens)
    for line, client in clients:
        if client.token in keyTokens:
            raise ConfigError(
                clientsPath,
                f"the token for {client.name!r} is also an upstream key in {tokensPath}; "
                "clients and OpenRouter must get different secrets",
                line,
                "token",
            )
        if client.token in allowed:
            raise ConfigError(
                clientsPath,
                f"the token for {client.name!r} is also in {allowPath}; "
                "give each client a token of its own",
                line,
                "token",
            )
        for name in client.keys or ():
            if name not in keyNames:
                raise ConfigError(
                    clientsPath, f"no key named {name!r} in {tokensPath}", line, "keys"
                )
