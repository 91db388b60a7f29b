"""Run every benchmark, each in its own process, and write their sections of ``docs/benchmarks.md``.

    python -m benchmarks.run_all            # make bench: speed, memory, sharding, quality (~35 min on 2 CPU cores)
    python -m benchmarks.run_all --quick    # tiny sizes and budgets: checks that everything runs
    python -m benchmarks.run_all --only speed memory

A separate process per benchmark keeps one's compiled kernels, allocator state and thread
settings out of the next one's measurements (speed first, so its start-up figure is a cold
compile). Extra arguments after ``--`` go to every benchmark.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence

from benchmarks.common import DOCS, REPO, load_average, log

BENCHMARKS = ("speed", "memory", "sharding", "quality")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--out", default=str(DOCS), help="directory of benchmarks.md and figures/")
    args = parser.parse_args(argv[: len(argv) - len(extra) - (1 if "--" in argv else 0)])
    for name in (b for b in BENCHMARKS if b in args.only):
        quick = ["--quick"] if args.quick else []
        cmd = [sys.executable, "-m", f"benchmarks.{name}", "--out", args.out, *quick, *extra]
        log(f"run_all: {' '.join(cmd[1:])} (load average {load_average()})")
        start = time.perf_counter()
        result = subprocess.run(cmd, cwd=REPO)
        log(f"run_all: {name} finished in {(time.perf_counter() - start) / 60:.1f} min")
        if result.returncode:
            log(f"run_all: {name} failed with exit code {result.returncode}")
            return result.returncode
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
