"""The share of convolutions in one fastdd iteration of DC (IPC 1) and DM (IPC 10) per ISA level, and the most any
other optimisation could gain; recorded in bench/results/conv_share.md (newest first) and conv_share.jsonl.

    python bench/conv_share.py [--levels avx2 avx512 native] [--cases dc-1 dm-10] [--threads 2] [--results DIR]

Levels and cases are bench/isa_levels.py's (its variables set on a fresh process per level and case); the iteration
is the distiller's ``step`` with ``real_precision="float32"``, on random images of Fashion-MNIST's shapes (60,000,
as bench/step.py makes them: an iteration's cost does not depend on the pixels). Each process runs one warm-up
iteration, one timed iteration, then one under torch.profiler (CPU).

Convolution time: the inclusive CPU time of the outermost calls of ``aten::convolution`` (forward),
``aten::convolution_backward`` (backward) and ``aten::_convolution_double_backward`` (DC's backward through the
synthetic side's weight gradients), that is everything a convolution call does, oneDNN's kernels and the layout
reorders and buffers they need, and nothing outside it. The kernels' self time alone would leave out the reorders,
which any caller of oneDNN's convolutions pays. Outermost, because these calls nest (the double backward calls
convolutions). Counted as other work: the first block of a ConvNet on grey images, which fastdd computes in one C++
kernel with its norm, ReLU and pooling (its convolution, one input channel of 3 x 3 taps, cannot be timed apart),
so the share is a little low and the bounds below a little high, which keeps them bounds.

Share = convolution time / the profiled iteration's wall time (profiling adds a few percent to both). Bound: were
everything but the convolutions to take no time, the iteration would be at most 1 / share times faster. With the
newest row of bench/isa_levels.py for the same case and level in the same results folder (``--results``), the
highest ratio against the original code that optimising anything but the convolutions could reach: that row's
ratio (original / fastdd) / share. Each row also holds the timed iteration's seconds, the 1-minute load average
before and after, machine and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.autograd.profiler_util import FunctionEvent

from fastdd.methods import DC, DM
from fastdd.runtime.allocator import keep_freed_memory
from harness.measure import commit, machine, record_cases
from isa_levels import CASES, LEVELS, expected_capability, level_environment, levels_to_run
from step import BATCH_REAL, SHAPES, random_shaped
from step import CASES as STEP_CASES

RESULTS = Path(__file__).parent / "results"
CONVOLUTIONS = frozenset({"aten::convolution", "aten::convolution_backward", "aten::_convolution_double_backward"})


def outermost_convolution_seconds(events: list[FunctionEvent]) -> float:
    """Seconds of the calls of :data:`CONVOLUTIONS` that no other such call encloses, inclusive of what they call."""
    def enclosed(event: FunctionEvent) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name in CONVOLUTIONS:
                return True
            parent = parent.cpu_parent
        return False

    return sum(e.cpu_time_total for e in events if e.name in CONVOLUTIONS and not enclosed(e)) / 1e6


def worker(case: str) -> dict:
    """One warm-up, one timed and one profiled iteration of ``case`` in this process: the timed iteration's seconds,
    the profiled one's wall seconds and convolution seconds, and torch's CPU capability."""
    keep_freed_memory()
    method, ipc, shapes = STEP_CASES[case]
    generator = torch.Generator().manual_seed(0)
    classes, *_, images = SHAPES[shapes]
    train = random_shaped(generator, shapes, images // classes)
    distiller = (DC if method == "dc" else DM)(train, ipc, generator, init="real", batch_real=BATCH_REAL,
                                               real_precision="float32")
    distiller.step(0)
    began = time.perf_counter()
    distiller.step(1)
    seconds = time.perf_counter() - began
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        began = time.perf_counter()
        distiller.step(2)
        profiled = time.perf_counter() - began
    return {"seconds": seconds, "profiled": profiled, "convolution": outermost_convolution_seconds(profile.events()),
            "capability": torch.backends.cpu.get_cpu_capability().lower()}


def newest_isa_row(results: Path, case: str, level: str) -> dict | None:
    """The newest row of ``results/isa_levels.jsonl`` for ``case`` at ``level``; None where there is none."""
    path = results / "isa_levels.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    matching = [row for row in rows if row["case"] == case and row["level"] == level]
    return matching[-1] if matching else None


def measure(case: str, level: str, threads: int, results: Path) -> dict:
    """One row: ``case`` at ``level`` in a fresh process, and the bound against the original where
    bench/isa_levels.py has measured it."""
    load_start = os.getloadavg()[0]
    out = subprocess.run([sys.executable, __file__, "--worker", case], env=level_environment(level, threads),
                         capture_output=True, text=True)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{case} at level {level}: worker exited with status {out.returncode}: {tail[0]}")
    measured = json.loads(out.stdout.splitlines()[-1])
    if measured["capability"] != expected_capability(level):
        raise RuntimeError(f"{case} at level {level}: the worker runs torch's {measured['capability']} kernels")
    share = measured["convolution"] / measured["profiled"]
    isa = newest_isa_row(results, case, level)
    against = None if isa is None else {
        "date": isa["date"], "commit": isa["commit"], "original": isa["median"]["original"],
        "fastdd": isa["median"]["fastdd"], "bound": isa["median"]["original"] / isa["median"]["fastdd"] / share}
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "case": case, "level": level, **measured,
            "share": share, "bound": 1 / share, "against_original": against,
            "load": [load_start, os.getloadavg()[0]], "machine": machine(), "commit": commit()}


HEADER = ("| date | case | level | fastdd s | profiled s | convolution s | share | at most faster | original s "
          "| original / fastdd | at most against the original | load start, end | machine | commit |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def table_cells(row: dict) -> list[str]:
    against = row["against_original"]
    original = ["-", "-", "-"] if against is None else [
        f"{against['original']:.2f} ({against['date']})", f"{against['original'] / against['fastdd']:.2f}x",
        f"{against['bound']:.2f}x"]
    return [row["date"], row["case"], row["level"], f"{row['seconds']:.2f}", f"{row['profiled']:.2f}",
            f"{row['convolution']:.2f}", f"{100 * row['share']:.0f} %", f"{row['bound']:.2f}x", *original,
            f"{row['load'][0]:.2f}, {row['load'][1]:.2f}", row["machine"], row["commit"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", nargs="+", choices=list(LEVELS),
                   help="ISA levels (default: avx2, avx512 and native, those the machine runs)")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="default: both")
    p.add_argument("--threads", type=int, default=2, help="threads of the worker process (default 2)")
    p.add_argument("--results", type=Path, default=RESULTS,
                   help="folder of the tables, isa_levels.jsonl read from it (default bench/results)")
    p.add_argument("--worker", metavar="CASE", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    try:
        levels = levels_to_run(args.levels)
    except ValueError as err:
        sys.exit(f"conv_share.py: error: {err}")
    torch.set_num_threads(args.threads)  # the machine column names the worker's threads
    runs = [(case, level) for level in levels for case in args.cases]
    record_cases(args.results, "conv_share", HEADER, runs, lambda run: measure(*run, args.threads, args.results),
                 table_cells)


if __name__ == "__main__":
    main()
