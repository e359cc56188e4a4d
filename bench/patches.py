"""
Candidate optimizations of hermux, applied as patches when hermux starts
(see bench/patched_twistd.py), so that their gain can be measured before
anyone changes hermux/ itself: a variant of bench/experiments.py names the
patches it runs with.

Each L{Patch} lists the names in hermux/ that it replaces or calls
(C{"hermux.site.HermuxRequest._over"}); tests/test_bench.py checks that
they all exist, so that a patch that hermux/ has left behind fails there,
by name, rather than as a variant that answers 500s or measures nothing.

None is pending.  The last three are in hermux now, and were removed: an
agent that works out the upstream's endpoint, pool key and Host once
(hermux.upstream._UpstreamAgent), C{gc.freeze()} after startup
(hermux.lifecycle), and request ids from a seeded C{random.Random}
(hermux.site).
"""

from __future__ import annotations

from typing import Callable

import attr


@attr.frozen
class Patch:
    """
    A change to hermux made at startup: C{apply} makes it; C{names} are the
    dotted names in hermux/ it replaces or calls.
    """

    apply: Callable[[], None]
    names: tuple[str, ...]


# name -> the patch, as variants name it.
PATCHES: dict[str, Patch] = {}


def apply(names: str) -> None:
    """
    Apply the patches named in C{names} (comma-separated).
    """
    for name in filter(None, (n.strip() for n in names.split(","))):
        PATCHES[name].apply()
