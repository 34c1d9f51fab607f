"""Peak memory and time of one MTT iteration in each mode (exact, flat, lean), by syn_steps; recorded under
bench/results/ (mtt_modes.md, newest first, and mtt_modes.jsonl; the earlier exact-against-lean table is
mtt_memory.md).

    python bench/mtt_memory.py [--steps 10 20 40 80] [--modes exact flat lean] [--repeat 3] [--paired]
                               [--device cpu]

An iteration as ``fastdd distill --method mtt`` runs it: Fashion-MNIST shapes (10 classes of
1 x 28 x 28, random pixels), ConvNet-3, IPC 10, every student step on all 100 synthetic images
(the default ``batch_syn``), DSA, the image and learned-rate updates. The experts are random rows (a
freshly initialised network, then one random step): the cost of an iteration does not depend on
their values. Each number comes from a fresh process:

- seconds: median of ``repeat`` iterations after one warm-up iteration, with
  :func:`fastdd.runtime.allocator.keep_freed_memory` as the ``fastdd`` command sets it; with ``--paired`` the
  modes are timed in one process, one iteration of each in turn
  (:func:`harness.measure.paired_median_seconds`), so that a busy spell of a shared machine
  slows every mode alike;
- peak MiB: :func:`harness.measure.peak_bytes` of one iteration (CPU: the resident-set
  high-water mark beyond the resident set before the iteration; CUDA: the allocator's peak).

Modes left out by ``--modes`` show as ``-``. A measurement whose process fails (for example killed for want
of memory: the exact mode's memory grows with syn_steps) is recorded as ``failed (exit status)`` and the
others go on.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.nn.utils import parameters_to_vector

from fastdd.methods import MTT
from fastdd.methods.mtt import MODES
from fastdd.models import get_network
from fastdd.runtime.allocator import keep_freed_memory
from fastdd.trajectories.files import Trajectory, expert_path
from harness.measure import cell, commit, machine, paired_median_seconds, peak_bytes, record
from step import fashion_mnist_shaped

RESULTS = Path(__file__).parent / "results"
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


def worker(modes: list[str], steps: int, what: str, repeat: int, device: str) -> list[float | None]:
    """Per mode, seconds per iteration (median; several modes: timed in turn) or peak bytes of one
    iteration (one mode only), measured in this process."""
    if what == "seconds":
        keep_freed_memory()
    steps_of = []
    for mode in modes:
        d, iterations = distiller(mode, steps, device), itertools.count()
        steps_of.append(lambda d=d, iterations=iterations: d.step(next(iterations)))
    if what == "peak":
        (step,) = steps_of
        return [peak_bytes(step, device)]
    return paired_median_seconds(steps_of, device, repeat=repeat)


def in_fresh_process(modes: list[str], steps: int, what: str, repeat: int, device: str) -> list[float | str | None]:
    """The worker's numbers, or ``'failed (exit status N)'`` for every mode."""
    run = subprocess.run([sys.executable, __file__, "--worker", ",".join(modes), str(steps), what, "--repeat",
                          str(repeat), "--device", device], capture_output=True, text=True)
    if run.returncode != 0:
        return [f"failed (exit status {run.returncode})"] * len(modes)
    return [None if out == "None" else float(out) for out in run.stdout.split()[-len(modes):]]


HEADER = ("| date | syn_steps | " + " | ".join(f"{m} s/iteration" for m in MODES) + " | "
          + " | ".join(f"{m} peak MiB" for m in MODES) + " | device | machine | commit |\n"
          + "|---" * (2 * len(MODES) + 5) + "|\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", nargs="+", type=int, default=[10, 20, 40, 80], help="syn_steps values")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="modes to measure (default: all)")
    p.add_argument("--repeat", type=int, default=3, help="timed iterations per measurement (median)")
    p.add_argument("--paired", action="store_true", help="time the modes in one process, in turn")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--worker", nargs=3, metavar=("MODES", "STEPS", "WHAT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        modes, steps, what = args.worker
        print(*worker(modes.split(","), int(steps), what, args.repeat, args.device))
        return
    rows, lines = [], []
    for steps in args.steps:
        if args.paired:
            seconds = in_fresh_process(args.modes, steps, "seconds", args.repeat, args.device)
        else:
            seconds = [in_fresh_process([m], steps, "seconds", args.repeat, args.device)[0] for m in args.modes]
        measured = {m: {"seconds": s, "peak": in_fresh_process([m], steps, "peak", args.repeat, args.device)[0]}
                    for m, s in zip(args.modes, seconds)}
        row = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "syn_steps": steps, "ipc": IPC,
               "model": MODEL, "device": args.device, "paired": args.paired, **measured,
               "machine": machine(args.device), "commit": commit()}
        rows.append(row)
        cells = [cell(measured.get(m, {}).get("seconds"), 1, 2) for m in MODES]
        cells += [cell(measured.get(m, {}).get("peak"), 2**-20, 0) for m in MODES]
        lines.append(f"| {row['date']} | {steps} | " + " | ".join(cells)
                     + f" | {args.device}{', paired' if args.paired else ''} | {row['machine']} | {row['commit']} |\n")
        print(lines[-1], end="", flush=True)
    record(RESULTS, "mtt_modes", HEADER, "".join(lines), rows)


if __name__ == "__main__":
    main()
