"""
bench/run's commands: the first argument names one, and the rest are its
own (bench/run COMMAND --help).  Without a command, the benchmark runs.

    bench/run [...]                 measure (bench/suite.py)
    bench/run profile [...]         bench/profile.py
    bench/run instructions [...]    bench/instructions.py
    bench/run experiments [...]     bench/experiments.py
"""

import importlib
import sys

COMMANDS = {
    "measure": "bench.suite",
    "profile": "bench.profile",
    "instructions": "bench.instructions",
    "experiments": "bench.experiments",
}


def main(argv: list[str]) -> int:
    if argv[:1] and argv[0] in COMMANDS:
        command, argv = argv[0], argv[1:]
    else:
        command = "measure"
    return importlib.import_module(COMMANDS[command]).main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
