"""Peak memory and time of one MTT iteration, exact mode against lean mode, by syn_steps; recorded under
bench/results/ (mtt_memory.md, newest first, and mtt_memory.jsonl).

    python bench/mtt_memory.py [--steps 10 20 40 80] [--repeat 3] [--device cpu]

An iteration as ``fastdd distill --method mtt`` runs it: Fashion-MNIST shapes (10 classes of
1 x 28 x 28, random pixels), ConvNet-3, IPC 10, every student step on all 100 synthetic images
(the default ``batch_syn``), DSA, the image and learned-rate updates. The experts are random rows (a
freshly initialised network, then one random step): the cost of an iteration does not depend on
their values. Each number comes from a fresh process:

- seconds: median of ``repeat`` iterations after one warm-up iteration, with
  :func:`fastdd.allocator.keep_freed_memory` as the ``fastdd`` command sets it;
- peak MiB: :func:`fastdd.benchmarks.measure.peak_bytes` of one iteration (CPU: the resident-set
  high-water mark beyond the resident set before the iteration; CUDA: the allocator's peak).

A measurement whose process fails (for example killed for want of memory: the exact mode's memory
grows with syn_steps) is recorded as ``failed (exit status)`` and the others go on.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.nn.utils import parameters_to_vector

from fastdd.allocator import keep_freed_memory
from fastdd.benchmarks.measure import commit, machine, peak_bytes, record, synchronize
from fastdd.methods import MTT
from fastdd.models import get_network
from fastdd.trajectory import Trajectory, expert_path
from step import fashion_mnist_shaped

RESULTS = Path(__file__).parent / "results"
MODES = ("exact", "lean")
CLASSES, PER_CLASS, IPC, MODEL = 10, 20, 10, "ConvNet"


def distiller(mode: str, steps: int, device: str) -> MTT:
    """An MTT distiller of the benchmark's set-up, with one random expert of one epoch."""
    generator = torch.Generator().manual_seed(0)
    train = fashion_mnist_shaped(generator, PER_CLASS).to(device)
    net = get_network(MODEL, 1, CLASSES, (28, 28), generator)
    start = parameters_to_vector(net.parameters()).detach()
    rows = torch.stack([start, start + 0.01 * torch.randn(start.shape, generator=generator)])
    meta = {"dataset": train.name, "model": MODEL, "channels": 1, "num_classes": CLASSES, "im_size": [28, 28],
            "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "batch_size": 256, "epochs": 1, "augment": "dsa",
            "seed": 0}
    with tempfile.TemporaryDirectory() as experts:
        Trajectory(rows, meta).save(expert_path(experts, 0))
        return MTT(train, IPC, generator, experts=experts, mode=mode, syn_steps=steps, expert_epochs=1,
                   max_start_epoch=1, model=MODEL)


def worker(mode: str, steps: int, what: str, repeat: int, device: str) -> float | None:
    """Seconds per iteration (median) or peak bytes of one iteration, measured in this process."""
    if what == "seconds":
        keep_freed_memory()
    d = distiller(mode, steps, device)
    iterations = itertools.count()

    def step() -> None:
        d.step(next(iterations))

    if what == "peak":
        return peak_bytes(step, device)
    step()
    synchronize(device)
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def in_fresh_process(mode: str, steps: int, what: str, repeat: int, device: str) -> float | str | None:
    """The worker's number, or ``'failed (exit status N)'``."""
    run = subprocess.run([sys.executable, __file__, "--worker", mode, str(steps), what, "--repeat", str(repeat),
                          "--device", device], capture_output=True, text=True)
    if run.returncode != 0:
        return f"failed (exit status {run.returncode})"
    out = run.stdout.split()[-1]
    return None if out == "None" else float(out)


def cell(value: float | str | None, scale: float, digits: int) -> str:
    if value is None or isinstance(value, str):
        return "-" if value is None else value
    return f"{value * scale:.{digits}f}"


HEADER = ("| date | syn_steps | exact s/iteration | lean s/iteration | exact peak MiB | lean peak MiB | device "
          "| machine | commit |\n|---|---|---|---|---|---|---|---|---|\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", nargs="+", type=int, default=[10, 20, 40, 80], help="syn_steps values")
    p.add_argument("--repeat", type=int, default=3, help="timed iterations per measurement (median)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--worker", nargs=3, metavar=("MODE", "STEPS", "WHAT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        mode, steps, what = args.worker
        print(worker(mode, int(steps), what, args.repeat, args.device))
        return
    rows, lines = [], []
    for steps in args.steps:
        measured = {mode: {what: in_fresh_process(mode, steps, what, args.repeat, args.device)
                           for what in ("seconds", "peak")} for mode in MODES}
        row = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "syn_steps": steps, "ipc": IPC,
               "model": MODEL, "device": args.device, **measured, "machine": machine(args.device),
               "commit": commit()}
        rows.append(row)
        lines.append(f"| {row['date']} | {steps} | " + " | ".join(cell(measured[m]["seconds"], 1, 2) for m in MODES)
                     + " | " + " | ".join(cell(measured[m]["peak"], 2**-20, 0) for m in MODES)
                     + f" | {args.device} | {row['machine']} | {row['commit']} |\n")
        print(lines[-1], end="", flush=True)
    record(RESULTS, "mtt_memory", HEADER, "".join(lines), rows)


if __name__ == "__main__":
    main()
