"""
Conventions every module of hermux follows: its first line names its tests
(as Twisted's modules do, for C{trial --testmodule}), and it declares
C{__all__}, each name of which exists.
"""

from __future__ import annotations

import importlib
import os
import re

from twisted.trial.unittest import SynchronousTestCase

import hermux

_PACKAGE = os.path.dirname(os.path.abspath(hermux.__file__))
_TESTS = os.path.dirname(os.path.abspath(__file__))
_TEST_CASE_NAME = re.compile(r"# -\*- test-case-name: ([\w.]+(?:, *[\w.]+)*) -\*-")


def _modules() -> list[str]:
    return sorted(
        name[: -len(".py")]
        for name in os.listdir(_PACKAGE)
        if name.endswith(".py")
    )


class ModuleConventionTests(SynchronousTestCase):
    def test_firstLineNamesExistingTests(self):
        for name in _modules():
            with open(os.path.join(_PACKAGE, name + ".py"), encoding="utf-8") as f:
                first = f.readline().rstrip("\n")
            match = _TEST_CASE_NAME.fullmatch(first)
            self.assertIsNotNone(match, f"hermux/{name}.py: first line is {first!r}")
            for testModule in re.split(r", *", match.group(1)):
                package, _, module = testModule.rpartition(".")
                self.assertEqual(package, "tests", f"hermux/{name}.py names {testModule}")
                self.assertTrue(
                    os.path.exists(os.path.join(_TESTS, module + ".py")),
                    f"hermux/{name}.py names {testModule}, which does not exist",
                )

    def test_allIsDeclaredAndTrue(self):
        for name in _modules():
            qualified = "hermux" if name == "__init__" else f"hermux.{name}"
            module = importlib.import_module(qualified)
            self.assertTrue(hasattr(module, "__all__"), f"{qualified} declares no __all__")
            for exported in module.__all__:
                self.assertTrue(
                    hasattr(module, exported), f"{qualified}.__all__ names {exported!r}, which is not there"
                )


# An underscore name reached in a Twisted or treq module: "from twisted.x
# import _y", "twisted.web._newclient", or "import twisted._z".
_PRIVATE_IMPORT = re.compile(
    r"^\s*(?:from\s+(?:twisted|treq)[\w.]*\s+import\s+[^#\n]*\b_[A-Za-z]"
    r"|from\s+(?:twisted|treq)(?:\.\w+)*\._\w+"
    r"|import\s+(?:twisted|treq)(?:\.\w+)*\._\w+)",
    re.MULTILINE,
)


class PrivateTwistedTests(SynchronousTestCase):
    def test_privateImportsOnlyInTheFence(self):
        """
        Only L{hermux._twistedinternals} imports Twisted's (or treq's)
        private names; everything else uses what it offers.
        """
        for name in _modules():
            if name == "_twistedinternals":
                continue
            with open(os.path.join(_PACKAGE, name + ".py"), encoding="utf-8") as f:
                source = f.read()
            self.assertIsNone(
                _PRIVATE_IMPORT.search(source),
                f"hermux/{name}.py imports a private name of Twisted or treq",
            )

    def test_patternFindsThem(self):
        for line in (
            "from twisted.web.client import URI, _HTTP11ClientFactory",
            "from twisted.web._newclient import Request",
            "import twisted.web._newclient",
        ):
            self.assertIsNotNone(_PRIVATE_IMPORT.search(line), line)
        self.assertIsNone(_PRIVATE_IMPORT.search("from twisted.web.client import Agent"))
