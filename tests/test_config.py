"""
Tests for L{hermux.config}: reading tokens.csv and allow.txt, and the errors
a user sees when either is wrong.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from hermux.config import (
    ConfigError,
    Key,
    checkSeparate,
    loadAccessTokens,
    loadKeys,
    parseAccessTokens,
    parseKeys,
)

# Distinctive secrets, so that a test can tell for sure that an error
# message does not quote them.
SECRET_A = "sk-or-v1-SECRET-alpha-7f3a91"
SECRET_B = "sk-or-v1-SECRET-bravo-c02e55"
ACCESS_A = "hx-ACCESS-charlie-99d1e0"
ACCESS_B = "hx-ACCESS-delta-4b7a2c"
ALL_SECRETS = (SECRET_A, SECRET_B, ACCESS_A, ACCESS_B)


class ConfigErrorAssertions:
    """
    Checks shared by every test of a bad configuration file.
    """

    def assertConfigError(self, f, *args, path, line, secrets=ALL_SECRETS):
        """
        Call C{f(*args)}, which must raise L{ConfigError} naming C{path} and
        C{line} (or no line, if C{line} is L{None}) in a single line of text
        that quotes none of C{secrets}.
        """
        error = self.assertRaises(ConfigError, f, *args)
        text = str(error)
        self.assertNotIn("\n", text)
        self.assertNotIn("\r", text)
        self.assertIn(path, text)
        self.assertEqual(error.line, line)
        if line is None:
            self.assertNotIn(", line ", text)
        else:
            self.assertIn(f"line {line}", text)
        for secret in secrets:
            # Also the parts of a secret an error might quote.
            for shown in (secret, secret[-8:], repr(secret)):
                self.assertNotIn(shown, text)
                self.assertNotIn(shown, repr(error))
        return error

    def writeFile(self, data: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return path


class ParseKeysTests(ConfigErrorAssertions, SynchronousTestCase):
    """
    Tests for L{parseKeys}, the text of tokens.csv.
    """

    def test_quotedFields(self):
        """
        The example from the documentation, with a quoted token, gives one
        key.
        """
        keys = parseKeys('name,token\ntoto,"supersecrettoken"\n')
        self.assertEqual(keys, (Key(name="toto", token="supersecrettoken"),))

    def test_unquotedFields(self):
        """
        Fields need not be quoted; keys keep the order of the file.
        """
        keys = parseKeys(f"name,token\nfirst,{SECRET_A}\nsecond,{SECRET_B}\n")
        self.assertEqual(
            keys,
            (Key(name="first", token=SECRET_A), Key(name="second", token=SECRET_B)),
        )

    def test_crlfLineEndings(self):
        """
        Lines may end in CRLF; the CR is part of neither field.
        """
        keys = parseKeys(f'name,token\r\ntoto,"{SECRET_A}"\r\nbob,{SECRET_B}\r\n')
        self.assertEqual(
            keys, (Key(name="toto", token=SECRET_A), Key(name="bob", token=SECRET_B))
        )

    def test_noFinalNewline(self):
        """
        The last line need not end in a newline.
        """
        keys = parseKeys(f"name,token\ntoto,{SECRET_A}")
        self.assertEqual(keys, (Key(name="toto", token=SECRET_A),))

    def test_surroundingWhitespaceIgnored(self):
        """
        Whitespace around the header's and a row's fields is not part of
        them.
        """
        keys = parseKeys(f"  name , token \n  toto ,  {SECRET_A}  \n")
        self.assertEqual(keys, (Key(name="toto", token=SECRET_A),))

    def test_whitespaceBeforeQuotedFieldIgnored(self):
        """
        A space between the comma and a quoted token (as in
        C{toto, "token"}) is not part of the token, and neither are the
        quotes.
        """
        keys = parseKeys(f'name,token\ntoto, "{SECRET_A}"\n')
        self.assertEqual([key.token for key in keys], [SECRET_A])

    def test_whitespaceAfterQuotedFieldIgnored(self):
        """
        Whitespace after a quoted token, at the end of the line, is not part
        of the token and is no error.
        """
        keys = parseKeys(f'name,token\ntoto,"{SECRET_A}"  \n')
        self.assertEqual([key.token for key in keys], [SECRET_A])

    def test_blankLinesIgnored(self):
        """
        Blank lines, before the header or between rows, are skipped.
        """
        keys = parseKeys(f"\nname,token\n\ntoto,{SECRET_A}\n   \nbob,{SECRET_B}\n\n")
        self.assertEqual([key.name for key in keys], ["toto", "bob"])

    def test_headerCaseIgnored(self):
        """
        The header's column names may be written in any case.
        """
        keys = parseKeys(f"Name,TOKEN\ntoto,{SECRET_A}\n")
        self.assertEqual(keys, (Key(name="toto", token=SECRET_A),))

    def test_nameMayContainSpaces(self):
        """
        A name is printable ASCII and may contain inner spaces.
        """
        keys = parseKeys(f'name,token\n"team key, no. 2",{SECRET_A}\n')
        self.assertEqual([key.name for key in keys], ["team key, no. 2"])

    def test_dailyLimit(self):
        """
        The optional third column C{daily_limit} gives each key's limit as a
        whole number; empty means no limit.
        """
        keys = parseKeys(
            f"name,token,daily_limit\n"
            f"a,{SECRET_A},1000\n"
            f"b,{SECRET_B},\n"
            f"c,{ACCESS_A}, 0 \n"
        )
        self.assertEqual([key.dailyLimit for key in keys], [1000, None, 0])

    def test_dailyCost(self):
        """
        The optional column C{daily_cost} gives each key's credits a day, as
        a decimal number, kept in nanocredits; it may come before
        C{daily_limit} or without it.
        """
        keys = parseKeys(
            f"name,token,daily_cost,daily_limit\n"
            f"a,{SECRET_A},2.5,50\n"
            f"b,{SECRET_B},,\n"
            f"c,{ACCESS_A}, 0.000000001 ,\n"
            f"d,{ACCESS_B},0,1000\n"
        )
        self.assertEqual([key.dailyCost for key in keys], [2_500_000_000, None, 1, 0])
        self.assertEqual([key.dailyLimit for key in keys], [50, None, None, 1000])
        (key,) = parseKeys(f"name,token,daily_cost\ntoto,{SECRET_A},10\n")
        self.assertEqual((key.dailyCost, key.dailyLimit), (10 * 10**9, None))

    def test_badDailyCost(self):
        """
        A daily cost must be a plain, non-negative number of credits, at most
        a million; the error names the key, never its token.
        """
        for text in ("-1", "lots", "1e3", "nan", "inf", "1,5", "2000000", "١"):
            error = self.assertConfigError(
                parseKeys,
                f'name,token,daily_cost\ntoto,{SECRET_A},"{text}"\n',
                "keys.csv",
                path="keys.csv",
                line=2,
            )
            self.assertIn("daily_cost for 'toto'", str(error))

    def test_repeatedOptionalColumn(self):
        self.assertConfigError(
            parseKeys,
            f"name,token,daily_cost,daily_cost\ntoto,{SECRET_A},1,2\n",
            "keys.csv",
            path="keys.csv",
            line=1,
        )

    def test_noDailyLimitColumn(self):
        """
        Without the third column, no key has a daily limit.
        """
        (key,) = parseKeys(f"name,token\ntoto,{SECRET_A}\n")
        self.assertIsNone(key.dailyLimit)

    def test_emptyText(self):
        """
        An empty file is an error with no line number.
        """
        self.assertConfigError(parseKeys, "", "keys.csv", path="keys.csv", line=None)

    def test_onlyBlankLines(self):
        """
        A file of blank lines is as empty as an empty one.
        """
        self.assertConfigError(
            parseKeys, "\n  \n\r\n", "keys.csv", path="keys.csv", line=None
        )

    def test_missingHeader(self):
        """
        A file that starts with a key instead of the header is refused at
        line 1, without quoting the key it took for a header.
        """
        self.assertConfigError(
            parseKeys,
            f'toto,"{SECRET_A}"\nbob,"{SECRET_B}"\n',
            "keys.csv",
            path="keys.csv",
            line=1,
        )

    def test_wrongHeader(self):
        """
        A header with other column names is refused at its line.
        """
        self.assertConfigError(
            parseKeys,
            f"\nkey,secret\ntoto,{SECRET_A}\n",
            "keys.csv",
            path="keys.csv",
            line=2,
        )

    def test_headerWithExtraColumn(self):
        """
        A header with a column other than C{daily_limit} is refused.
        """
        self.assertConfigError(
            parseKeys,
            f"name,token,comment\ntoto,{SECRET_A},x\n",
            "keys.csv",
            path="keys.csv",
            line=1,
        )

    def test_headerOnly(self):
        """
        A header and no key is an error: hermux cannot serve without a key.
        """
        self.assertConfigError(
            parseKeys, "name,token\n\n", "keys.csv", path="keys.csv", line=None
        )

    def test_tooManyColumns(self):
        """
        A row with more columns than the header is refused at its line.
        """
        self.assertConfigError(
            parseKeys,
            f"name,token\ntoto,{SECRET_A}\nbob,{SECRET_B},{ACCESS_A}\n",
            "keys.csv",
            path="keys.csv",
            line=3,
        )

    def test_tooFewColumns(self):
        """
        A row with fewer columns than the header is refused at its line.
        """
        self.assertConfigError(
            parseKeys,
            f"name,token\n{SECRET_A}\n",
            "keys.csv",
            path="keys.csv",
            line=2,
        )

    def test_emptyName(self):
        """
        A key must have a name.
        """
        self.assertConfigError(
            parseKeys,
            f'name,token\ntoto,{SECRET_B}\n  ,"{SECRET_A}"\n',
            "keys.csv",
            path="keys.csv",
            line=3,
        )

    def test_emptyToken(self):
        """
        A key must have a token.
        """
        self.assertConfigError(
            parseKeys,
            f'name,token\ntoto,{SECRET_A}\nbob,""\n',
            "keys.csv",
            path="keys.csv",
            line=3,
        )

    def test_blankToken(self):
        """
        A token of only whitespace is as empty as an empty one.
        """
        self.assertConfigError(
            parseKeys, "name,token\nbob,   \n", "keys.csv", path="keys.csv", line=2
        )

    def test_duplicateName(self):
        """
        Two keys may not share a name, whose line is the second one's.
        """
        error = self.assertConfigError(
            parseKeys,
            f"name,token\ntoto,{SECRET_A}\n\ntoto,{SECRET_B}\n",
            "keys.csv",
            path="keys.csv",
            line=4,
        )
        self.assertIn("toto", str(error))

    def test_duplicateToken(self):
        """
        Two keys may not share a token; the error does not quote it.
        """
        self.assertConfigError(
            parseKeys,
            f"name,token\ntoto,{SECRET_A}\nbob,{SECRET_A}\n",
            "keys.csv",
            path="keys.csv",
            line=3,
        )

    def test_nameTooLong(self):
        """
        A name is at most 64 characters.
        """
        self.assertEqual(
            [key.name for key in parseKeys(f"name,token\n{'n' * 64},{SECRET_A}\n")],
            ["n" * 64],
        )
        self.assertConfigError(
            parseKeys,
            f"name,token\n{'n' * 65},{SECRET_A}\n",
            "keys.csv",
            path="keys.csv",
            line=2,
        )

    def test_nameNotASCII(self):
        """
        A name must be ASCII.
        """
        self.assertConfigError(
            parseKeys,
            f"name,token\ntötö,{SECRET_A}\n",
            "keys.csv",
            path="keys.csv",
            line=2,
        )

    def test_nameWithControlCharacter(self):
        """
        A name may not contain a control character such as a tab or a
        newline (inside a quoted field), which would break a log line.
        """
        for name in ("to\tto", "to\x1bto", "to\nto"):
            error = self.assertRaises(
                ConfigError, parseKeys, f'name,token\n"{name}",{SECRET_A}\n'
            )
            self.assertNotIn("\n", str(error), name)
            self.assertNotIn(SECRET_A, str(error), name)

    def test_tokenWithSpace(self):
        """
        A token may not contain a space, and the error does not quote it.
        """
        self.assertConfigError(
            parseKeys,
            f'name,token\ntoto,"{SECRET_A} {SECRET_B}"\n',
            "keys.csv",
            path="keys.csv",
            line=2,
        )

    def test_tokenNotASCII(self):
        """
        A token must be ASCII: it travels in an HTTP header.
        """
        self.assertConfigError(
            parseKeys,
            f"name,token\ntoto,{SECRET_A}é\n",
            "keys.csv",
            path="keys.csv",
            line=2,
        )

    def test_tokenWithControlCharacter(self):
        """
        A token may not contain a control character.
        """
        for bad in ("\t", "\x00", "\x7f", "\x0b"):
            error = self.assertRaises(
                ConfigError, parseKeys, f'name,token\ntoto,"{SECRET_A}{bad}x"\n'
            )
            self.assertNotIn("\n", str(error), repr(bad))
            self.assertNotIn(SECRET_A, str(error), repr(bad))

    def test_negativeDailyLimit(self):
        """
        A daily limit may not be negative.
        """
        self.assertConfigError(
            parseKeys,
            f"name,token,daily_limit\ntoto,{SECRET_A},-1\n",
            "keys.csv",
            path="keys.csv",
            line=2,
        )

    def test_dailyLimitNotANumber(self):
        """
        A daily limit must be a number.
        """
        self.assertConfigError(
            parseKeys,
            f"name,token,daily_limit\ntoto,{SECRET_A},lots\n",
            "keys.csv",
            path="keys.csv",
            line=2,
        )

    def test_dailyLimitFloat(self):
        """
        A daily limit must be a whole number.
        """
        self.assertConfigError(
            parseKeys,
            f"name,token,daily_limit\ntoto,{SECRET_A},2.5\n",
            "keys.csv",
            path="keys.csv",
            line=2,
        )

    def test_dailyLimitNonASCIIDigits(self):
        """
        A daily limit is written in ASCII digits, not in other scripts'
        digits or superscripts that Python would also call digits.
        """
        for text in ("١٠", "²", "１０"):
            self.assertConfigError(
                parseKeys,
                f"name,token,daily_limit\ntoto,{SECRET_A},{text}\n",
                "keys.csv",
                path="keys.csv",
                line=2,
            )

    def test_dailyLimitTooLarge(self):
        """
        A daily limit past a billion, or of thousands of digits (which
        int() would refuse with a ValueError), is an error of its own.
        """
        for text in ("1000000001", "9" * 5000, "0" * 50 + "1" * 11):
            error = self.assertConfigError(
                parseKeys,
                f"name,token,daily_limit\ntoto,{SECRET_A},{text}\n",
                "keys.csv",
                path="keys.csv",
                line=2,
            )
            self.assertLess(len(str(error)), 300)
        (key,) = parseKeys(f"name,token,daily_limit\ntoto,{SECRET_A},{'0' * 50}7\n")
        self.assertEqual(key.dailyLimit, 7)

    def test_dailyLimitMissingInARow(self):
        """
        With a C{daily_limit} header, each row has three columns (the third
        may be empty).
        """
        self.assertConfigError(
            parseKeys,
            f"name,token,daily_limit\ntoto,{SECRET_A}\n",
            "keys.csv",
            path="keys.csv",
            line=2,
        )

    def test_badQuoting(self):
        """
        Text after a closing quote is not valid CSV.
        """
        self.assertConfigError(
            parseKeys,
            f'name,token\ntoto,"{SECRET_A}"{SECRET_B}\nbob,{ACCESS_A}\n',
            "keys.csv",
            path="keys.csv",
            line=2,
        )

    def test_unclosedQuote(self):
        """
        A quote that is never closed is not valid CSV.
        """
        self.assertConfigError(
            parseKeys,
            f'name,token\ntoto,"{SECRET_A}\n',
            "keys.csv",
            path="keys.csv",
            line=2,
        )

    def test_defaultPathNamed(self):
        """
        Without a path, errors name tokens.csv.
        """
        error = self.assertRaises(ConfigError, parseKeys, "nope\n")
        self.assertTrue(str(error).startswith("tokens.csv"), str(error))


class LoadKeysTests(ConfigErrorAssertions, SynchronousTestCase):
    """
    Tests for L{loadKeys}, which reads tokens.csv from disk.
    """

    def test_loads(self):
        """
        The keys of a file on disk are loaded.
        """
        path = self.writeFile(b'name,token\ntoto,"supersecrettoken"\n')
        self.assertEqual(loadKeys(path), (Key(name="toto", token="supersecrettoken"),))

    def test_byteOrderMarkAndCRLF(self):
        """
        A UTF-8 byte order mark (as Windows editors write) is not part of
        the header, and CRLF line endings are understood.
        """
        path = self.writeFile(
            b"\xef\xbb\xbfname,token\r\ntoto,"
            + SECRET_A.encode("ascii")
            + b"\r\nbob,"
            + SECRET_B.encode("ascii")
            + b"\r\n"
        )
        self.assertEqual(
            loadKeys(path),
            (Key(name="toto", token=SECRET_A), Key(name="bob", token=SECRET_B)),
        )

    def test_missingFile(self):
        """
        A file that does not exist is an error naming it.
        """
        path = self.mktemp()
        self.assertConfigError(loadKeys, path, path=path, line=None)

    def test_directory(self):
        """
        A directory where the file should be is an error naming it.
        """
        path = self.mktemp()
        os.mkdir(path)
        self.assertConfigError(loadKeys, path, path=path, line=None)

    def test_notUTF8(self):
        """
        Bytes that are not UTF-8 are an error naming their line, and the
        message quotes none of the file's secrets.
        """
        path = self.writeFile(
            b"name,token\ntoto,"
            + SECRET_A.encode("ascii")
            + b"\nbob,"
            + SECRET_B.encode("ascii")
            + b"\xff\xfe\n"
        )
        self.assertConfigError(loadKeys, path, path=path, line=3)

    def test_latin1Name(self):
        """
        A Latin-1 file (an C{é} written as one byte) is not UTF-8.
        """
        path = self.writeFile(b"name,token\nt\xe9t\xe9," + SECRET_A.encode() + b"\n")
        self.assertConfigError(loadKeys, path, path=path, line=2)

    def test_errorNamesPath(self):
        """
        A content error names the file that was loaded, not a default name.
        """
        path = self.writeFile(b"name,token\n")
        error = self.assertConfigError(loadKeys, path, path=path, line=None)
        self.assertEqual(error.path, path)


class ParseAccessTokensTests(ConfigErrorAssertions, SynchronousTestCase):
    """
    Tests for L{parseAccessTokens}, the text of allow.txt.
    """

    def test_oneTokenPerLine(self):
        """
        Each line holds one access token; they keep the file's order.
        """
        self.assertEqual(
            parseAccessTokens(f"{ACCESS_A}\n{ACCESS_B}\n"), (ACCESS_A, ACCESS_B)
        )

    def test_blankLinesAndComments(self):
        """
        Blank lines and lines starting with C{#} (after any indentation) are
        ignored.
        """
        text = f"# clients\n\n{ACCESS_A}\n   \n  # laptop\n{ACCESS_B}\n#\n"
        self.assertEqual(parseAccessTokens(text), (ACCESS_A, ACCESS_B))

    def test_crlfAndSurroundingWhitespace(self):
        """
        CRLF line endings and whitespace around a token are not part of it.
        """
        self.assertEqual(
            parseAccessTokens(f"  {ACCESS_A}\t\r\n{ACCESS_B}  \r\n"),
            (ACCESS_A, ACCESS_B),
        )

    def test_noFinalNewline(self):
        """
        The last line need not end in a newline.
        """
        self.assertEqual(parseAccessTokens(ACCESS_A), (ACCESS_A,))

    def test_empty(self):
        """
        A file with no token is an error with no line number.
        """
        self.assertConfigError(
            parseAccessTokens, "", "clients.txt", path="clients.txt", line=None
        )

    def test_onlyComments(self):
        """
        Comments and blank lines are no tokens.
        """
        self.assertConfigError(
            parseAccessTokens,
            "# nobody yet\n\n   \n",
            "clients.txt",
            path="clients.txt",
            line=None,
        )

    def test_tokenWithSpace(self):
        """
        A line with two words is not one token; the error does not quote it.
        """
        self.assertConfigError(
            parseAccessTokens,
            f"{ACCESS_B}\n\n{ACCESS_A} {SECRET_A}\n",
            "clients.txt",
            path="clients.txt",
            line=3,
        )

    def test_tokenNotASCII(self):
        """
        A token must be ASCII.
        """
        self.assertConfigError(
            parseAccessTokens,
            f"{ACCESS_A}ü\n",
            "clients.txt",
            path="clients.txt",
            line=1,
        )

    def test_tokenWithControlCharacter(self):
        """
        A token may not contain a control character.
        """
        for bad in ("\x00", "\x1b", "\x7f", "\t"):
            self.assertConfigError(
                parseAccessTokens,
                f"{ACCESS_B}\n{ACCESS_A}{bad}x\n",
                "clients.txt",
                path="clients.txt",
                line=2,
            )

    def test_tokenWithLineSeparatorCharacter(self):
        """
        Characters that Python's C{str.splitlines} takes for line breaks
        (form feed, vertical tab, NEL, U+2028...) but that are not line
        breaks in a text file do not split a line in two: a line containing
        one is one bad token, refused at its line.
        """
        for bad in ("\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"):
            self.assertConfigError(
                parseAccessTokens,
                f"{ACCESS_A}{bad}{ACCESS_B}\n",
                "clients.txt",
                path="clients.txt",
                line=1,
            )

    def test_lineNumbersCountOnlyLineBreaks(self):
        """
        A form feed at the end of a line (whitespace, stripped like any
        other) does not make the following lines' numbers wrong.
        """
        self.assertConfigError(
            parseAccessTokens,
            f"{ACCESS_A}\x0c\n{ACCESS_B} x\n",
            "clients.txt",
            path="clients.txt",
            line=2,
        )

    def test_duplicate(self):
        """
        The same token twice is refused at the second line.
        """
        self.assertConfigError(
            parseAccessTokens,
            f"{ACCESS_A}\n{ACCESS_B}\n  {ACCESS_A}\n",
            "clients.txt",
            path="clients.txt",
            line=3,
        )

    def test_defaultPathNamed(self):
        """
        Without a path, errors name allow.txt.
        """
        error = self.assertRaises(ConfigError, parseAccessTokens, "")
        self.assertTrue(str(error).startswith("allow.txt"), str(error))


class LoadAccessTokensTests(ConfigErrorAssertions, SynchronousTestCase):
    """
    Tests for L{loadAccessTokens}, which reads allow.txt from disk.
    """

    def test_loads(self):
        """
        The tokens of a file on disk are loaded, past a byte order mark.
        """
        path = self.writeFile(
            b"\xef\xbb\xbf" + ACCESS_A.encode() + b"\r\n# x\r\n" + ACCESS_B.encode()
        )
        self.assertEqual(loadAccessTokens(path), (ACCESS_A, ACCESS_B))

    def test_missingFile(self):
        """
        A file that does not exist is an error naming it.
        """
        path = self.mktemp()
        self.assertConfigError(loadAccessTokens, path, path=path, line=None)

    def test_directory(self):
        """
        A directory where the file should be is an error naming it.
        """
        path = self.mktemp()
        os.mkdir(path)
        self.assertConfigError(loadAccessTokens, path, path=path, line=None)

    def test_notUTF8(self):
        """
        Bytes that are not UTF-8 are an error naming their line.
        """
        path = self.writeFile(
            ACCESS_A.encode() + b"\n\n" + ACCESS_B.encode() + b"\x80\n"
        )
        self.assertConfigError(loadAccessTokens, path, path=path, line=3)

    def test_empty(self):
        """
        An empty file on disk is an error naming it.
        """
        path = self.writeFile(b"")
        self.assertConfigError(loadAccessTokens, path, path=path, line=None)


class CheckSeparateTests(ConfigErrorAssertions, SynchronousTestCase):
    """
    Tests for L{checkSeparate}.
    """

    def test_separate(self):
        """
        Access tokens different from every key pass.
        """
        keys = (Key(name="a", token=SECRET_A), Key(name="b", token=SECRET_B))
        self.assertIsNone(checkSeparate(keys, (ACCESS_A, ACCESS_B), "allow.txt"))

    def test_accessTokenIsAKey(self):
        """
        An access token that is also an upstream key is refused, naming the
        access list and quoting neither secret.
        """
        keys = (Key(name="a", token=SECRET_A), Key(name="b", token=SECRET_B))
        self.assertConfigError(
            checkSeparate,
            keys,
            (ACCESS_A, SECRET_B),
            "/etc/hermux/allow.txt",
            path="/etc/hermux/allow.txt",
            line=None,
        )


class KeyTests(SynchronousTestCase):
    """
    Tests for L{Key}.
    """

    def test_reprHidesToken(self):
        """
        Neither C{repr} nor C{str} of a key shows its token, but they show
        its name.
        """
        key = Key(name="toto", token=SECRET_A, dailyLimit=5)
        for text in (repr(key), str(key), repr((key,)), f"{key}"):
            self.assertNotIn(SECRET_A, text)
            self.assertIn("toto", text)

    def test_frozen(self):
        """
        A key cannot be changed once made.
        """
        key = Key(name="toto", token=SECRET_A)
        self.assertRaises(AttributeError, setattr, key, "token", SECRET_B)
