"""
hermux at another git revision, to measure a change against in the same
invocation: a git worktree of the revision in a run's temporary directory,
from which hermux runs with PYTHONPATH (and its working directory) there,
removed when the run ends.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import attr

from bench.targets import REPO


@attr.frozen
class Checkout:
    """
    Revision C{revision} (commit C{commit}, C{short} for short) checked out
    in C{tree}.
    """

    revision: str
    commit: str
    short: str
    tree: str

    def environ(self) -> dict[str, str]:
        """
        The environment in which Python imports hermux from this checkout.
        """
        return dict(os.environ, PYTHONPATH=self.tree)


def _git(*argv: str) -> str:
    return subprocess.run(["git", *argv], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def checkout(revision: str, tmp: str):
    """
    A L{Checkout} of C{revision} in a new git worktree in C{tmp}, removed
    when the context ends; hermux is checked to import from it.
    """
    try:
        commit = _git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
    except subprocess.CalledProcessError:
        raise SystemExit(f"bench: --baseline {revision}: no such revision") from None
    short = _git("rev-parse", "--short", commit)
    tree = os.path.join(tmp, f"hermux-{short}")
    _git("worktree", "add", "--detach", "--quiet", tree, commit)
    try:
        found = Checkout(revision, commit, short, tree)
        where = subprocess.run(
            [sys.executable, "-c", "import hermux.tap; print(hermux.tap.__file__)"],
            cwd=tree, env=found.environ(), capture_output=True, text=True,
        )
        if where.returncode or not where.stdout.strip().startswith(tree + os.sep):
            raise RuntimeError(f"hermux at {revision} does not import from {tree}: {where.stdout}{where.stderr}")
        yield found
    finally:
        try:
            _git("worktree", "remove", "--force", tree)
        except subprocess.CalledProcessError as e:
            print(f"bench: could not remove the worktree {tree}: {e.stderr.strip()}", file=sys.stderr)
