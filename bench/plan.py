"""The memory plan against measured peaks: for each case of :mod:`harness.memory_plan` (distillers on
random images), the plan's working set of an iteration and the peak measured over one iteration, each case in a
fresh process; recorded under bench/results/ (plan.md, newest first, and plan.jsonl).

    python bench/plan.py [--cases dc dm ...]
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

from harness.measure import cell, commit, machine, record_cases
from harness.memory_plan import CASES
from harness.process import run_module

RESULTS = Path(__file__).parent / "results"
HEADER = ("| date | case | method | model | classes x IPC | side | planned MiB | measured MiB | planned / measured "
          "| machine | commit |\n" + "|---" * 11 + "|\n")


def measure(name: str) -> dict:
    run = run_module("memory_plan", name)
    measured = json.loads(run.stdout.splitlines()[-1]) if run.returncode == 0 else {}
    case = CASES[name]
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "case": name, "method": case.method,
            "model": case.model, "classes": case.classes, "ipc": case.ipc, "side": case.side, "options": case.options,
            "planned": measured.get("planned"),
            "measured": measured.get("measured", f"failed (exit status {run.returncode})"),
            "machine": machine("cpu"), "commit": commit()}


def cells(row: dict) -> list[str]:
    ratio = row["planned"] / row["measured"] if isinstance(row["measured"], int) and row["measured"] else None
    return [row["date"], row["case"], row["method"] + "".join(f", {k} {v}" for k, v in row["options"].items()),
            row["model"], f"{row['classes']} x {row['ipc']}", str(row["side"]), cell(row["planned"], 2**-20, 0),
            cell(row["measured"], 2**-20, 0), cell(ratio, 1, 2), row["machine"], row["commit"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="cases (default: all)")
    args = p.parse_args()
    record_cases(RESULTS, "plan", HEADER, args.cases, measure, cells)


if __name__ == "__main__":
    main()
