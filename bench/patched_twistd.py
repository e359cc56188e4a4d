"""
twistd with the patches of bench/patches.py named in C{$BENCH_PATCHES}
(comma-separated) applied first.

    BENCH_PATCHES=name,name python -m bench.patched_twistd -n hermux ...
"""

import os
import sys


def main() -> None:
    from bench import patches

    patches.apply(os.environ.get("BENCH_PATCHES", ""))
    sys.argv = ["twistd"] + sys.argv[1:]
    from twisted.scripts.twistd import run

    run()


if __name__ == "__main__":
    main()
