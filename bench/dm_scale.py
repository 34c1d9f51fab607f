"""Peak memory and time of one DM iteration as classes and IPC grow, with the class chunks of
:mod:`fastdd.methods.dm` and without them (every real and synthetic image of a step at once, as the
reference holds them); recorded under bench/results/ (dm_scale.md, newest first, and dm_scale.jsonl).

    python bench/dm_scale.py [--cases cifar100-ipc10 ...] [--repeat 1]

Cases: CIFAR-100 shapes (100 classes of 3 x 32 x 32, 300 random images each, ConvNet, 256 real images
per class) at IPC 10, 50 and 100; ImageNet-1K at 64 px shapes (1000 classes of 3 x 64 x 64, 30 random
images each, ConvNetD4, 16 real images per class to keep an iteration within minutes on a CPU) at
IPC 10, and the same with ConvNetW32 (depth 3, width 32: a tenth of the compute, for a CPU). Every
number comes from a fresh process: seconds, the median of ``repeat`` iterations after one warm-up, with
:func:`fastdd.runtime.allocator.keep_freed_memory`; peak, :func:`harness.measure.peak_bytes` of one
iteration (beyond the data and the synthetic set). A case whose unchunked iteration would not fit this
machine's memory is not run that way (``-``); a process that fails is recorded as ``failed (exit status)``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from fastdd.data import RealDataset
from fastdd.methods import DM, dm
from fastdd.runtime.allocator import keep_freed_memory
from harness.measure import cell, commit, machine, peak_bytes, record_cases

RESULTS = Path(__file__).parent / "results"
# name -> (classes, side, images per class, model, IPC, real images per class, run unchunked)
CASES = {
    "cifar100-ipc10": (100, 32, 300, "ConvNet", 10, 256, True),
    "cifar100-ipc50": (100, 32, 300, "ConvNet", 50, 256, True),
    "cifar100-ipc100": (100, 32, 300, "ConvNet", 100, 256, False),
    "imagenet64-ipc10": (1000, 64, 30, "ConvNetD4", 10, 16, False),
    "imagenet64-ipc10-w32": (1000, 64, 30, "ConvNetW32", 10, 16, False),
}
WAYS = ("chunked", "whole")


def distiller(case: str) -> DM:
    classes, side, per_class, model, ipc, batch_real, _ = CASES[case]
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes * per_class, 3, side, side), dtype=torch.uint8, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    train = RealDataset(case, images, labels, classes, (0.5,) * 3, (0.25,) * 3, [str(c) for c in range(classes)])
    return DM(train, ipc, generator, model=model, batch_real=batch_real, real_precision="float32")


def worker(case: str, way: str, what: str, repeat: int) -> float | None:
    """Seconds per iteration (median) or peak bytes of one iteration, measured in this process."""
    if way == "whole":
        dm.REAL_CHUNK_PIXELS = dm.SYN_CHUNK_PIXELS = 2**62
    if what == "seconds":
        keep_freed_memory()
    d = distiller(case)
    iterations = itertools.count()

    def step() -> None:
        d.step(next(iterations))

    if what == "peak":
        return peak_bytes(step, "cpu")
    step()
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def in_fresh_process(case: str, way: str, what: str, repeat: int) -> float | str | None:
    if way == "whole" and not CASES[case][-1]:
        return None
    run = subprocess.run([sys.executable, __file__, "--worker", case, way, what, "--repeat", str(repeat)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        return f"failed (exit status {run.returncode})"
    out = run.stdout.split()[-1]
    return None if out == "None" else float(out)


HEADER = ("| date | case | classes x IPC | model | chunked s/iteration | whole s/iteration | chunked peak MiB | "
          "whole peak MiB | machine | commit |\n" + "|---" * 10 + "|\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="cases (default: all)")
    p.add_argument("--repeat", type=int, default=1, help="timed iterations per measurement (median)")
    p.add_argument("--worker", nargs=3, metavar=("CASE", "WAY", "WHAT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(worker(*args.worker, args.repeat))
        return
    def measure(case: str) -> dict:
        classes, _, _, model, ipc, _, _ = CASES[case]
        measured = {way: {what: in_fresh_process(case, way, what, args.repeat) for what in ("seconds", "peak")}
                    for way in WAYS}
        return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "case": case, "classes": classes, "ipc": ipc,
                "model": model, **measured, "machine": machine("cpu"), "commit": commit()}

    def cells(row: dict) -> list[str]:
        return [row["date"], row["case"], f"{row['classes']} x {row['ipc']}", row["model"],
                *(cell(row[way]["seconds"], 1, 2) for way in WAYS),
                *(cell(row[way]["peak"], 2**-20, 0) for way in WAYS), row["machine"], row["commit"]]

    record_cases(RESULTS, "dm_scale", HEADER, args.cases, measure, cells)

if __name__ == "__main__":
    main()
