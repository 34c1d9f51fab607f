"""What ``backend="auto"`` runs on CPU at each ISA level: ``fastdd calibrate`` in a fresh process per level
(the level's variables of ``bench/isa_levels.py``, a cache folder of its own so that nothing stored is reused),
recorded in bench/results/calibration.md (newest first) and calibration.jsonl.

    python bench/calibration.py [--levels avx2 avx512 native] [--results DIR]

Each row: the op family, its two sides (the C++ path and torch; for ``block_layout``, the fused blocks on contiguous
and on channels_last maps), their median milliseconds per round of its workload (forward and backward at the
methods' shapes, ``fastdd.ops.workloads``), the median over rounds of the second's time over the first's, and what
``auto`` runs; with the load average before and after, the machine and the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from fastdd.ops import calibration
from harness.measure import commit, load_average, machine, record_cases
from isa_levels import RESULTS, level_environment, levels_to_run

HEADER = ("| date | level | ops | sides | first ms | second ms | second / first | rounds | auto runs | "
          "load before -> after | machine | commit |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def measure(level: str) -> list[dict]:
    """One row per C++ extension: ``fastdd calibrate`` at ``level`` with an empty cache folder."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**level_environment(level, threads=os.cpu_count() or 1), "XDG_CACHE_HOME": cache}
        before = load_average()
        subprocess.run([sys.executable, "-m", "fastdd.cli", "calibrate"], env=env, check=True)
        after = load_average()
        stored = [json.loads(path.read_text()) for path in Path(cache, "fastdd").glob("calibration-*.json")]
    (found,) = stored
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    return [{"date": date, "level": level, "isa_level": found["key"]["isa_level"], "extension": name,
             "ops": list(calibration.OPS[name]), **m, "load": [before, after], "machine": machine("cpu"),
             "commit": commit()} for name, m in found["measurements"].items()]


def cells(row: dict) -> list[str]:
    return [row["date"], row["level"], ", ".join(row["ops"]), " / ".join(calibration.sides(row["extension"])),
            f"{row['first_ms']:.2f}", f"{row['second_ms']:.2f}",
            f"{row['second_over_first']:.2f}", str(row["rounds"]), row["backend"],
            f"{row['load'][0]:.2f} -> {row['load'][1]:.2f}", row["machine"], row["commit"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", nargs="+", choices=("default", "avx2", "avx512", "native"),
                   help="ISA levels (default: those bench/isa_levels.py runs by default)")
    p.add_argument("--results", type=Path, default=RESULTS, help=f"folder of the tables (default {RESULTS})")
    args = p.parse_args()
    try:
        levels = levels_to_run(args.levels)
    except ValueError as err:
        p.error(str(err))
    rows = [row for level in levels for row in measure(level)]
    record_cases(args.results, "calibration", HEADER, rows, lambda row: row, cells)


if __name__ == "__main__":
    main()
