"""Microbenchmarks of the fused ops against their baselines, recorded under bench/results/.

    python bench/ops.py [--ops grad_match_distance ...] [--device cpu|cuda]

Runs the same suite as ``fastdd bench``, adds its rows at the top of ``bench/results/ops.md``
(newest first) and appends them to ``bench/results/ops.jsonl``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastdd.benchmarks import suite
from fastdd.benchmarks.measure import record

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", default=list(suite.SUITES), choices=list(suite.SUITES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    rows = suite.run(args.ops, args.device, args.repeat)
    record(RESULTS, "ops", suite.HEADER, suite.format_table(rows, header=False), rows)


if __name__ == "__main__":
    main()
