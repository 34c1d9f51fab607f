"""Paired differences of the accuracy rows: each plug-in variant, and each run with bfloat16 real passes, against
its method without them (float32), seed by seed.

    python bench/paired.py [--since 2026-12-02]

Reads ``bench/results/accuracy.jsonl`` (written by ``bench/accuracy.py``) and pairs every row of a method with a
plug-in ("dc + sdc (lambda 10)") with the row of the method alone ("dc") made with the same distillation seed,
data set, IPC, iterations, evaluation models, evaluation protocol and machine (where a case was run more than
once, its newest row counts). For each variant: the seeds, the mean accuracy of both sides, and the mean and
sample standard deviation over the seeds of the difference (variant minus method alone; each seed's two runs
share the networks, batches, evaluation seed and machine, so the pairing removes what they share; the seeds of
one variant may come from different machines, all of them listed). Rewrites
``bench/results/paired.md`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from fastdd.io import atomic_write_bytes

RESULTS = Path(__file__).parent / "results"
BF16 = " (bfloat16 real)"  # how bench/accuracy.py's rows name a method run with bfloat16 passes over real images
HEADER = ("| method | variant | data set | IPC | iterations | models | eval | seeds | alone % | variant % "
          "| difference (mean +- std over seeds) | per seed | machine | commits |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def case(row: dict) -> tuple:
    """What the pairs of one variant share (each pair also shares its seed and machine)."""
    return (row["dataset"], row["ipc"], row["iterations"], row["models"], row["eval"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--since", default="", help="only rows of this date (YYYY-MM-DD) or later")
    args = p.parse_args()
    rows = [json.loads(line) for line in (RESULTS / "accuracy.jsonl").read_text().splitlines() if line.strip()]
    newest: dict[tuple, dict] = {}
    for row in rows:  # in the order written: a later row of the same case and seed replaces an earlier one
        if row["date"] >= args.since and row.get("seed") is not None:
            method, _, variant = row["method"].partition(" + ")
            if method.endswith(BF16):
                method = method.removesuffix(BF16)
                variant = " + ".join(filter(None, ("bfloat16 real passes", variant)))
            newest[(method, variant, case(row), row["seed"], row["machine"])] = row
    pairs: dict[tuple, list[tuple[dict, dict]]] = defaultdict(list)
    for (method, variant, shared, seed, machine), row in newest.items():
        alone = newest.get((method, "", shared, seed, machine))
        if variant and alone is not None:
            pairs[(method, variant, shared)].append((alone, row))
    lines = []
    for (method, variant, shared), matched in sorted(pairs.items(), key=lambda item: (item[0][0], item[0][1])):
        matched.sort(key=lambda pair: (pair[0]["seed"], pair[0]["machine"]))
        diffs = [100 * (row["distilled"]["mean"] - alone["distilled"]["mean"]) for alone, row in matched]
        spread = f" +- {statistics.stdev(diffs):.2f}" if len(diffs) > 1 else ""
        dataset, ipc, iterations, models, protocol = shared
        machines = sorted({alone["machine"] for alone, _ in matched})
        commits = sorted({r["commit"] for pair in matched for r in pair})
        lines.append(
            f"| {method} | {variant} | {dataset} | {ipc} | {iterations} | {models} | {protocol} "
            f"| {', '.join(str(alone['seed']) for alone, _ in matched)} "
            f"| {statistics.mean(100 * a['distilled']['mean'] for a, _ in matched):.2f} "
            f"| {statistics.mean(100 * r['distilled']['mean'] for _, r in matched):.2f} "
            f"| {statistics.mean(diffs):+.2f}{spread} ({len(diffs)}) | {', '.join(f'{d:+.2f}' for d in diffs)} "
            f"| {'; '.join(machines)} | {', '.join(commits)} |\n")
    table = HEADER + "".join(lines)
    atomic_write_bytes(RESULTS / "paired.md", table.encode())
    print(table, end="")


if __name__ == "__main__":
    main()
