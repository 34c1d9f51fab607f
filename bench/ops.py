"""Microbenchmarks of the fused ops against their baselines, recorded under bench/results/.

    python bench/ops.py [--ops grad_match_distance ...] [--device cpu|cuda] [--repeat N] [--results DIR]

Runs the op microbenchmarks (:mod:`harness.suite`), adds its rows at the top of ``RESULTS/ops.md`` (newest first) and
appends them to ``RESULTS/ops.jsonl`` (``--results``, default bench/results). Each row states the speed-up's
spread over the rounds and the machine's load (:mod:`harness.suite`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness import suite
from harness.measure import record

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", default=list(suite.SUITES), choices=list(suite.SUITES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=5, help="rounds per case, at least (default 5; 3 or more are run)")
    p.add_argument("--results", type=Path, default=RESULTS, metavar="DIR", help="where the tables go")
    args = p.parse_args()
    if args.repeat < 1:
        p.error(f"--repeat must be an integer >= 1, got {args.repeat}")
    rows = suite.run(args.ops, args.device, args.repeat)
    record(args.results, "ops", suite.HEADER, suite.format_table(rows, header=False), rows)


if __name__ == "__main__":
    main()
