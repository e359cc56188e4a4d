"""
Whether the names the benchmark relies on still exist: the functions
bench/profile.py attributes samples to (a qualified name and the file it is
defined in, as py-spy names a frame), and the attributes an experiment's
patch replaces (a dotted name).  tests/test_bench.py checks the tables
themselves with these, so that a rename in hermux/ fails there, by name.
"""

from __future__ import annotations

import importlib
import inspect


def _module(name: str):
    try:
        return importlib.import_module(name), None
    except ImportError as e:
        return None, f"{name} does not import ({e})"


def functionProblem(qualname: str, path: str) -> str | None:
    """
    Why no function C{qualname} (C{"Class.method"} or C{"function"}) is
    defined in source file C{path} (C{"hermux/relay.py"}, or
    C{"twisted/web/http.py"} for an installed package), or None if one is.
    A method a class only inherits does not count: py-spy names it by the
    class that defines it.
    """
    if not path.endswith(".py"):
        return f"{path} is not a Python file"
    dotted = path[: -len(".py")].replace("/", ".")
    if dotted.endswith(".__init__"):
        dotted = dotted[: -len(".__init__")]
    found, problem = _module(dotted)
    if problem:
        return f"{qualname} ({path}): {problem}"
    for part in qualname.split("."):
        found = getattr(found, part, None)
        if found is None:
            return f"{qualname} ({path}): no {part}"
    if isinstance(found, property):
        found = found.fget
    code = getattr(inspect.unwrap(getattr(found, "__func__", found)), "__code__", None)
    if code is None:
        return f"{qualname} ({path}) is not a function"
    if code.co_qualname != qualname:
        return f"{qualname} ({path}) is inherited: it is defined as {code.co_qualname}"
    if not code.co_filename.endswith("/" + path):
        return f"{qualname} ({path}) is defined in {code.co_filename}"
    return None


def attributeProblem(dotted: str) -> str | None:
    """
    Why C{dotted} (C{"hermux.site.HermuxRequest._over"}: a module, then
    attributes) names nothing, or None if it names something.
    """
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for part in parts[split:]:
            if not hasattr(found, part):
                return f"{dotted}: no {part}"
            found = getattr(found, part)
        return None
    return f"{dotted}: no module {parts[0]}"
