"""
Tests for the clients.csv part of L{hermux.config}: the clients, their roles
and limits, the checks against tokens.csv and allow.txt, and the errors a
user sees when the file is wrong.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

from twisted.trial.unittest import SynchronousTestCase

from hermux.config import (
    ClientEntry,
    ConfigError,
    Configuration,
    Key,
    Role,
    loadClients,
    loadConfiguration,
    parseClients,
)
from tests.test_config import ConfigErrorAssertions

# Distinctive secrets, so that a test can tell for sure that an error
# message does not quote them.
CLIENT_A = "hx-CLIENT-echo-5e81c3"
CLIENT_B = "hx-CLIENT-foxtrot-0d94fa"
UPSTREAM = "sk-or-v1-SECRET-golf-a17b20"
ALLOWED = "hx-ACCESS-hotel-6c3e08"
ALL_SECRETS = (CLIENT_A, CLIENT_B, UPSTREAM, ALLOWED)

HEADER = "name,token,role,daily_requests,daily_cost,per_minute,max_parallel,models,keys,expires"
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def utc(*args) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


class ClientErrorAssertions(ConfigErrorAssertions):
    def assertClientError(self, text, line, column=None, path="c.csv"):
        """
        Parsing C{text} must fail at C{line} and C{column} (or no column),
        quoting no secret.
        """
        error = self.assertConfigError(
            parseClients, text, path, path=path, line=line, secrets=ALL_SECRETS
        )
        self.assertEqual(error.column, column)
        if column is None:
            self.assertNotIn(", column ", str(error))
        else:
            self.assertTrue(
                str(error).startswith(f"{path}, line {line}, column {column}: "),
                str(error),
            )
        return error

    def assertFieldError(self, column, text, contains=None):
        """
        A client whose C{column} says C{text} is refused at that column of
        line 2, and the message includes C{contains}.
        """
        error = self.assertClientError(
            f'name,token,{column}\nalice,{CLIENT_A},"{text}"\n', 2, column
        )
        if contains is not None:
            self.assertIn(contains, str(error))
        return error

    def parseOne(self, column, text) -> ClientEntry:
        (client,) = parseClients(f'name,token,{column}\nalice,{CLIENT_A},"{text}"\n')
        return client


class ParseClientsTests(ClientErrorAssertions, SynchronousTestCase):
    """
    Tests for L{parseClients}: the file's shape.
    """

    def test_nameAndTokenOnly(self):
        """
        The two first columns alone give clients with no limit, as users.
        """
        clients = parseClients(f"name,token\nalice,{CLIENT_A}\nbob,{CLIENT_B}\n")
        self.assertEqual(
            clients,
            (ClientEntry(name="alice", token=CLIENT_A), ClientEntry(name="bob", token=CLIENT_B)),
        )
        self.assertEqual(clients[0].role, Role.USER)
        self.assertFalse(clients[0].limited())

    def test_everyColumn(self):
        """
        Every optional column sets its attribute.
        """
        (client,) = parseClients(
            f"{HEADER}\n"
            f'alice,{CLIENT_A},admin,1000,2.5,30,4,"openai/* *:free",main spare,2030-12-31\n'
        )
        self.assertEqual(
            client,
            ClientEntry(
                name="alice",
                token=CLIENT_A,
                role=Role.ADMIN,
                dailyRequests=1000,
                dailyCost=2_500_000_000,
                perMinute=30,
                maxParallel=4,
                models=("openai/*", "*:free"),
                keys=("main", "spare"),
                expires=utc(2030, 12, 31, 23, 59, 59),
            ),
        )

    def test_emptyFieldsAreDefaults(self):
        """
        Empty optional fields mean a user with no limit, any model, any key
        and no expiry.
        """
        (client,) = parseClients(f"{HEADER}\nalice,{CLIENT_A},, ,,,,\"\",,\n")
        self.assertEqual(client, ClientEntry(name="alice", token=CLIENT_A))

    def test_columnsInAnyOrder(self):
        """
        The optional columns may come in any order, and the header in any
        case with whitespace around its names.
        """
        (client,) = parseClients(
            f" Name , TOKEN ,Expires, MAX_PARALLEL ,role\nalice,{CLIENT_A},2030-01-01,2,ADMIN\n"
        )
        self.assertEqual(
            (client.expires, client.maxParallel, client.role),
            (utc(2030, 1, 1, 23, 59, 59), 2, Role.ADMIN),
        )

    def test_quotedFieldsAndWhitespace(self):
        """
        Fields may be quoted, and whitespace around them, quoted or not, is
        not part of them; blank lines are skipped.
        """
        clients = parseClients(
            f'\nname,token,daily_requests\n\n  "alice", "{CLIENT_A}", " 5 " \n'
            f'   \n"bob, the second",{CLIENT_B},\n\n'
        )
        self.assertEqual([c.name for c in clients], ["alice", "bob, the second"])
        self.assertEqual([c.token for c in clients], [CLIENT_A, CLIENT_B])
        self.assertEqual([c.dailyRequests for c in clients], [5, None])

    def test_crlf(self):
        """
        Lines may end in CRLF, and the last one need not end at all.
        """
        clients = parseClients(f"name,token,role\r\nalice,{CLIENT_A},admin\r\nbob,{CLIENT_B},")
        self.assertEqual([c.role for c in clients], [Role.ADMIN, Role.USER])

    def test_limited(self):
        """
        A client is limited if any of its request or cost limits is set,
        even to 0; models, keys, role and expiry are no limits.
        """
        self.assertFalse(
            ClientEntry(
                name="a", token=CLIENT_A, role=Role.ADMIN, models=("x",), keys=("k",), expires=1.0
            ).limited()
        )
        for attribute in ("dailyRequests", "dailyCost", "perMinute", "maxParallel"):
            entry = ClientEntry(name="a", token=CLIENT_A, **{attribute: 0})
            self.assertTrue(entry.limited(), attribute)

    def test_reprHidesToken(self):
        """
        Neither C{repr} nor C{str} of a client shows its token.
        """
        client = ClientEntry(name="alice", token=CLIENT_A, dailyRequests=5)
        for text in (repr(client), str(client), repr((client,))):
            self.assertNotIn(CLIENT_A, text)
            self.assertIn("alice", text)

    def test_defaultPathNamed(self):
        """
        Without a path, errors name clients.csv.
        """
        error = self.assertRaises(ConfigError, parseClients, "")
        self.assertTrue(str(error).startswith("clients.csv: "), str(error))

    def test_empty(self):
        """
        An empty file, or one of blank lines, is an error with no line.
        """
        for text in ("", "\n \r\n\n"):
            self.assertClientError(text, None)

    def test_noClients(self):
        """
        A header and no client is an error.
        """
        error = self.assertClientError(f"{HEADER}\n\n", None)
        self.assertIn("no clients", str(error))

    def test_missingHeader(self):
        """
        A file starting with a client is refused at line 1, without quoting
        the token taken for a header.
        """
        self.assertClientError(f"alice,{CLIENT_A}\nbob,{CLIENT_B}\n", 1)

    def test_wrongFirstColumns(self):
        """
        The header starts with name and token, in that order.
        """
        for header in ("token,name", "name", "name,secret", "role,name,token"):
            self.assertClientError(f"{header}\nalice,{CLIENT_A}\n", 1)

    def test_unknownColumn(self):
        """
        A column hermux does not know is refused, naming it.
        """
        error = self.assertClientError(f"name,token,role,comment\nalice,{CLIENT_A},,x\n", 1)
        self.assertIn("unknown column 'comment'", str(error))
        self.assertIn("daily_requests", str(error))
        # tokens.csv's daily_limit is no column of clients.csv.
        error = self.assertClientError(f"name,token,daily_limit\nalice,{CLIENT_A},1\n", 1)
        self.assertIn("'daily_limit'", str(error))

    def test_headerFieldNotAColumnName(self):
        """
        A header field that is no column name is refused by its position,
        without quoting it: it may be a secret.
        """
        for header in (f"name,token,{CLIENT_B}", "name,token,", 'name,token,"a\nb"'):
            error = self.assertClientError(f"{header}\nalice,{CLIENT_A},1\n", 1)
            self.assertIn("header field 3", str(error))

    def test_repeatedColumn(self):
        """
        A column may appear only once, name and token included.
        """
        for header in ("name,token,role,ROLE", "name,token,name", "name,token,models,token"):
            error = self.assertClientError(f"{header}\nalice,{CLIENT_A},a,b\n", 1)
            self.assertIn("appears twice", str(error))

    def test_wrongWidth(self):
        """
        Every row has as many fields as the header.
        """
        self.assertClientError(f"name,token,role\nalice,{CLIENT_A},user\nbob,{CLIENT_B}\n", 3)
        self.assertClientError(f"name,token\nalice,{CLIENT_A},{CLIENT_B}\n", 2)

    def test_badCSV(self):
        """
        Text after a closing quote, or a quote never closed, is not CSV.
        """
        self.assertClientError(f'name,token\nalice,"{CLIENT_A}"{CLIENT_B}\n', 2)
        self.assertClientError(f'name,token\nalice,"{CLIENT_A}\n', 2)


class ClientFieldTests(ClientErrorAssertions, SynchronousTestCase):
    """
    Tests for each column of clients.csv.
    """

    def test_badName(self):
        """
        A name follows tokens.csv's rule for key names.
        """
        for name in ("", "  ", "n" * 65, "tötö", "a\tb", "a\nb", "a\x1bb"):
            self.assertClientError(f'name,token\n"{name}",{CLIENT_A}\n', 2, "name")
        (client,) = parseClients(f'name,token\n"{"n" * 64}",{CLIENT_A}\n')
        self.assertEqual(client.name, "n" * 64)

    def test_nameOfNoClient(self):
        """
        C{-}, which the usage ledger writes for no client, is no name.
        """
        error = self.assertClientError(f"name,token\n-,{CLIENT_A}\n", 2, "name")
        self.assertIn("reserved", str(error))

    def test_nameOfAnAllowLabel(self):
        """
        Names like those that label allow.txt's tokens are refused; others
        that start alike are fine.
        """
        error = self.assertClientError(f"name,token\nclient-0a1b2c3d,{CLIENT_A}\n", 2, "name")
        self.assertIn("allow.txt", str(error))
        for name in ("client-0a1b2c3", "client-0a1b2c3d4", "client-0A1B2C3D", "client-0a1b2c3g"):
            (client,) = parseClients(f"name,token\n{name},{CLIENT_A}\n")
            self.assertEqual(client.name, name)

    def test_duplicateName(self):
        """
        Two clients may not share a name.
        """
        error = self.assertClientError(
            f"name,token\nalice,{CLIENT_A}\n\nalice,{CLIENT_B}\n", 4, "name"
        )
        self.assertIn("first on line 2", str(error))

    def test_badToken(self):
        """
        A token is one word of visible ASCII; the error names the client
        and never quotes the token.
        """
        for token in ("", "  ", f"{CLIENT_A} {CLIENT_B}", f"{CLIENT_A}é", f"{CLIENT_A}\x7f"):
            error = self.assertClientError(f'name,token\nalice,"{token}"\n', 2, "token")
            self.assertIn("'alice'", str(error))

    def test_duplicateToken(self):
        """
        Two clients may not share a token.
        """
        error = self.assertClientError(
            f"name,token\nalice,{CLIENT_A}\nbob,{CLIENT_A}\n", 3, "token"
        )
        self.assertIn("line 2", str(error))

    def test_role(self):
        """
        A role is user or admin, in any case; empty is user.
        """
        self.assertEqual(self.parseOne("role", "Admin").role, Role.ADMIN)
        self.assertEqual(self.parseOne("role", "USER").role, Role.USER)
        self.assertEqual(self.parseOne("role", "").role, Role.USER)

    def test_badRole(self):
        for text in ("root", "admins", "1"):
            self.assertFieldError("role", text, repr(text))

    def test_dailyRequests(self):
        """
        daily_requests is a whole number from 0 (the client is paused) to a
        billion.
        """
        for text, number in (("0", 0), ("1", 1), ("1000000000", 10**9), ("007", 7)):
            self.assertEqual(self.parseOne("daily_requests", text).dailyRequests, number)

    def test_badDailyRequests(self):
        for text in ("-1", "1000000001", "9" * 5000, "2.5", "lots", "١٠", "1e3", "1 000"):
            self.assertFieldError("daily_requests", text, "whole number")

    def test_dailyCost(self):
        """
        daily_cost is a number of credits, kept in nanocredits, as in
        tokens.csv.
        """
        for text, nanocredits in (("0", 0), ("2.5", 2_500_000_000), ("0.000000001", 1)):
            self.assertEqual(self.parseOne("daily_cost", text).dailyCost, nanocredits)

    def test_badDailyCost(self):
        for text in ("-1", "lots", "1e3", "nan", "inf", "1,5", "2000000", "١"):
            self.assertFieldError("daily_cost", text, "credits")

    def test_perMinuteAndMaxParallel(self):
        """
        per_minute and max_parallel are whole numbers from 1 to a million.
        """
        for text, number in (("1", 1), ("1000000", 1_000_000)):
            self.assertEqual(self.parseOne("per_minute", text).perMinute, number)
            self.assertEqual(self.parseOne("max_parallel", text).maxParallel, number)

    def test_badPerMinuteAndMaxParallel(self):
        for column in ("per_minute", "max_parallel"):
            for text in ("0", "000", "-1", "1000001", "1.5", "x"):
                self.assertFieldError(column, text, "from 1 to 1000000")

    def test_models(self):
        """
        models is a space-separated list of patterns, each kept once in its
        order.
        """
        self.assertEqual(
            self.parseOne("models", "  openai/*  *:free openai/* ").models,
            ("openai/*", "*:free"),
        )
        self.assertEqual(self.parseOne("models", "m" * 128).models, ("m" * 128,))
        many = " ".join(f"m{i}" for i in range(100))
        self.assertEqual(len(self.parseOne("models", many + " m0").models), 100)

    def test_badModels(self):
        self.assertFieldError("models", "openai/* gpt-é", "'gpt-é'")
        self.assertFieldError("models", "a\x00b", "printable")
        self.assertFieldError("models", "m" * 129, "longer than 128")
        self.assertFieldError("models", " ".join(f"m{i}" for i in range(101)), "at most 100")

    def test_keys(self):
        """
        keys is a space-separated list of key names, each kept once.
        """
        self.assertEqual(self.parseOne("keys", "main spare main").keys, ("main", "spare"))

    def test_badKeys(self):
        self.assertFieldError("keys", "main tötö", "'tötö'")
        self.assertFieldError("keys", "n" * 65, "not a key name")

    def test_expiresDate(self):
        """
        A date alone means the last second of that day, UTC.
        """
        self.assertEqual(
            self.parseOne("expires", "2030-06-15").expires, utc(2030, 6, 15, 23, 59, 59)
        )

    def test_expiresDateTime(self):
        """
        A date and time, with C{T} or a space between them, is UTC unless it
        has an offset (C{Z} included).
        """
        cases = (
            ("2030-06-15T18:30", utc(2030, 6, 15, 18, 30)),
            ("2030-06-15 18:30:05", utc(2030, 6, 15, 18, 30, 5)),
            ("2030-06-15T18:30:00Z", utc(2030, 6, 15, 18, 30)),
            ("2030-06-15T18:30:00+02:00", utc(2030, 6, 15, 16, 30)),
            ("2030-06-15T18:30:00.5-01:00", utc(2030, 6, 15, 19, 30) + 0.5),
        )
        for text, expires in cases:
            self.assertEqual(self.parseOne("expires", text).expires, expires, text)

    def test_badExpires(self):
        for text in (
            "tomorrow",
            "2030-13-01",
            "2030-02-30",
            "20300615",
            "2030-6-15",
            "15/06/2030",
            "2030-06-15T",
            "2030-06-15x18:00",
            "2030-06-15T25:00",
            "2030-06-15T18:00+25:00",
            "١٢٣٤-06-15",
            "1718000000",
        ):
            self.assertFieldError("expires", text, "such as 2030-12-31")

    def test_longValueCutShort(self):
        """
        An error quotes at most the start of a long field.
        """
        error = self.assertFieldError("role", "x" * 500)
        self.assertLess(len(str(error)), 200)

    def test_firstBadFieldNamed(self):
        """
        With several bad fields on a line, the first in the header's order
        is named.
        """
        self.assertClientError(
            f"name,token,per_minute,role\nalice,{CLIENT_A},0,root\n", 2, "per_minute"
        )


class LoadClientsTests(ClientErrorAssertions, SynchronousTestCase):
    """
    Tests for L{loadClients}, which reads clients.csv from disk.
    """

    def test_byteOrderMarkAndCRLF(self):
        """
        A UTF-8 byte order mark is not part of the header; CRLF is read.
        """
        path = self.writeFile(
            b"\xef\xbb\xbfname,token,role\r\nalice,"
            + CLIENT_A.encode()
            + b",admin\r\nbob,"
            + CLIENT_B.encode()
            + b",\r\n"
        )
        self.assertEqual(
            loadClients(path),
            (
                ClientEntry(name="alice", token=CLIENT_A, role=Role.ADMIN),
                ClientEntry(name="bob", token=CLIENT_B),
            ),
        )

    def test_missingFile(self):
        path = self.mktemp()
        self.assertConfigError(loadClients, path, path=path, line=None)

    def test_notUTF8(self):
        path = self.writeFile(b"name,token\nalice," + CLIENT_A.encode() + b"\xff\n")
        self.assertConfigError(loadClients, path, path=path, line=2, secrets=ALL_SECRETS)

    def test_errorNamesPath(self):
        path = self.writeFile(b"name,token\n-," + CLIENT_A.encode() + b"\n")
        error = self.assertConfigError(loadClients, path, path=path, line=2)
        self.assertEqual((error.path, error.column), (path, "name"))

    def test_example(self):
        """
        The example clients.csv shipped with hermux loads with the example
        tokens.csv.
        """
        configuration = loadConfiguration(
            os.path.join(EXAMPLES, "tokens.csv.example"),
            None,
            os.path.join(EXAMPLES, "clients.csv.example"),
        )
        self.assertEqual(len(configuration.clients), 3)
        self.assertEqual(
            [client.role for client in configuration.clients],
            [Role.USER, Role.ADMIN, Role.USER],
        )
        for client in configuration.clients:
            self.assertTrue(client.token.startswith("hx-example-"), client.name)


class LoadConfigurationTests(ClientErrorAssertions, SynchronousTestCase):
    """
    Tests for L{loadConfiguration} with and without allow.txt and
    clients.csv.
    """

    def setUp(self):
        self.tokens = self.writeFile(f"name,token\nmain,{UPSTREAM}\n".encode())
        self.allow = self.writeFile(f"{ALLOWED}\n".encode())

    def clientsFile(self, text: str) -> str:
        return self.writeFile(text.encode())

    def test_allowOnly(self):
        """
        With two arguments, as before clients.csv, there are no clients.
        """
        configuration = loadConfiguration(self.tokens, self.allow)
        self.assertEqual(
            configuration,
            Configuration((Key(name="main", token=UPSTREAM),), (ALLOWED,), ()),
        )

    def test_clientsOnly(self):
        """
        Without allow.txt, there are no bare access tokens.
        """
        clients = self.clientsFile(f"name,token,keys\nalice,{CLIENT_A},main\n")
        configuration = loadConfiguration(self.tokens, None, clients)
        self.assertEqual(configuration.accessTokens, ())
        self.assertEqual(
            configuration.clients, (ClientEntry(name="alice", token=CLIENT_A, keys=("main",)),)
        )

    def test_both(self):
        clients = self.clientsFile(f"name,token\nalice,{CLIENT_A}\n")
        configuration = loadConfiguration(self.tokens, self.allow, clients)
        self.assertEqual(configuration.accessTokens, (ALLOWED,))
        self.assertEqual([c.name for c in configuration.clients], ["alice"])

    def test_neither(self):
        """
        Without either file no client could get in: an error.
        """
        error = self.assertConfigError(
            loadConfiguration, self.tokens, None, None, path="clients.csv", line=None
        )
        self.assertIn("allow.txt", str(error))

    def test_clientsErrorNamesItsFile(self):
        clients = self.clientsFile(f"name,token,role\nalice,{CLIENT_A},root\n")
        error = self.assertConfigError(
            loadConfiguration, self.tokens, self.allow, clients, path=clients, line=2,
            secrets=ALL_SECRETS,
        )
        self.assertEqual(error.column, "role")

    def test_clientTokenIsAKey(self):
        """
        A client's token may not be an upstream key.
        """
        clients = self.clientsFile(f"name,token\nalice,{CLIENT_A}\nbob,{UPSTREAM}\n")
        error = self.assertConfigError(
            loadConfiguration, self.tokens, self.allow, clients, path=clients, line=3,
            secrets=ALL_SECRETS,
        )
        self.assertEqual(error.column, "token")
        self.assertIn("'bob'", str(error))
        self.assertIn("upstream key", str(error))

    def test_clientTokenInAllow(self):
        """
        A client's token may not also be a bare token of allow.txt.
        """
        clients = self.clientsFile(f"name,token\nalice,{ALLOWED}\n")
        error = self.assertConfigError(
            loadConfiguration, self.tokens, self.allow, clients, path=clients, line=2,
            secrets=ALL_SECRETS,
        )
        self.assertEqual(error.column, "token")
        self.assertIn(self.allow, str(error))
        # Without allow.txt there is nothing to clash with.
        configuration = loadConfiguration(self.tokens, None, clients)
        self.assertEqual([c.token for c in configuration.clients], [ALLOWED])

    def test_unknownKey(self):
        """
        A client may name only keys that tokens.csv has.
        """
        clients = self.clientsFile(
            f"name,token,keys\nalice,{CLIENT_A},main\nbob,{CLIENT_B},main spare\n"
        )
        error = self.assertConfigError(
            loadConfiguration, self.tokens, self.allow, clients, path=clients, line=3,
            secrets=ALL_SECRETS,
        )
        self.assertEqual(error.column, "keys")
        self.assertIn("'spare'", str(error))
        self.assertIn(self.tokens, str(error))


class ConfigErrorColumnTests(SynchronousTestCase):
    """
    Tests for L{ConfigError}'s column.
    """

    def test_lineAndColumn(self):
        error = ConfigError("c.csv", "bad", 3, column="daily_cost")
        self.assertEqual(str(error), "c.csv, line 3, column daily_cost: bad")
        self.assertEqual(error.column, "daily_cost")

    def test_formsWithoutColumn(self):
        """
        Without a column, or without a line, the forms are those of before.
        """
        self.assertEqual(str(ConfigError("c.csv", "bad", 3)), "c.csv, line 3: bad")
        self.assertEqual(str(ConfigError("c.csv", "bad")), "c.csv: bad")
        self.assertEqual(str(ConfigError("c.csv", "bad", column="role")), "c.csv: bad")
        self.assertIsNone(ConfigError("c.csv", "bad").column)


class RowLineTests(ClientErrorAssertions, SynchronousTestCase):
    """
    Tests for the line an error names.
    """

    def test_rowSpanningLines(self):
        """
        A row whose quoted field spans lines is named by its first line.
        """
        self.assertClientError(
            f'name,token,role\n\nalice,{CLIENT_A},"ad\nmin"\nbob,{CLIENT_B},\n', 3, "role"
        )
