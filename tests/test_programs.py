"""
Tests for L{tests.programs}: a missing program skips a test, or fails it
under CI.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.programs import requireProgram


class RequireProgramTests(SynchronousTestCase):
    def setUp(self):
        self.addCleanup(os.environ.__setitem__, "CI", os.environ.get("CI", ""))

    def test_found(self):
        self.assertTrue(requireProgram(self, "sh", "dash").endswith("/sh"))

    def test_missingSkipsOutsideCI(self):
        os.environ["CI"] = ""
        error = self.assertRaises(SkipTest, requireProgram, self, "no-such-program-xyz", "pkg-xyz")
        self.assertIn("apt-get install pkg-xyz", str(error))

    def test_missingFailsUnderCI(self):
        os.environ["CI"] = "true"
        error = self.assertRaises(
            self.failureException, requireProgram, self, "no-such-program-xyz", "pkg-xyz"
        )
        self.assertIn("apt-get install pkg-xyz", str(error))
