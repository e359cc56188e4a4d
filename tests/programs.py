"""
Real programs the tests start (redis-server, chromium): found on the PATH,
or the test is skipped with how to install them; under CI (C{CI=true}) a
missing program is a failure, never a skip.
"""

from __future__ import annotations

import os
import shutil

from twisted.trial.unittest import SkipTest


def underCI() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def requireProgram(testCase, name: str, package: str) -> str:
    """
    The path of the program C{name}, from the Debian package C{package}.

    @raise SkipTest: if it is missing, outside CI.
    @raise testCase.failureException: if it is missing under CI.
    """
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed: sudo apt-get install {package}"
    if underCI():
        raise testCase.failureException(message + " (under CI a missing program is a failure)")
    raise SkipTest(message)
