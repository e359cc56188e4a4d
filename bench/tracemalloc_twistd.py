"""
twistd with tracemalloc on: SIGUSR1 writes a snapshot of the live Python
allocations to the path in C{$BENCH_SNAPSHOT}, numbered 1, 2, ...; SIGUSR2
runs the cyclic garbage collector first (and writes how many objects it
found to the snapshot's path + ".gc").

    BENCH_SNAPSHOT=/tmp/snap python -m bench.tracemalloc_twistd -n hermux ...
"""

import gc
import itertools
import os
import signal
import sys
import tracemalloc


def main() -> None:
    tracemalloc.start(int(os.environ.get("BENCH_TRACEMALLOC_FRAMES", "12")))
    path = os.environ["BENCH_SNAPSHOT"]
    numbers = itertools.count(1)

    def dump(signum, frame):
        tracemalloc.take_snapshot().dump(f"{path}.{next(numbers)}")

    def collectAndDump(signum, frame):
        found = gc.collect()
        number = next(numbers)
        with open(f"{path}.{number}.gc", "w") as f:
            f.write(f"{found}\n")
        tracemalloc.take_snapshot().dump(f"{path}.{number}")

    signal.signal(signal.SIGUSR1, dump)
    signal.signal(signal.SIGUSR2, collectAndDump)
    sys.argv = ["twistd"] + sys.argv[1:]
    from twisted.scripts.twistd import run

    run()


if __name__ == "__main__":
    main()
