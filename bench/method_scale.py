"""Time and peak memory of DC, DM and MTT at IPC 10, 50 and 100 on CIFAR-100 shapes; recorded under
bench/results/ (method_scale.md, newest first, and method_scale.jsonl).

    python bench/method_scale.py [--cases dc-ipc10 dm-ipc50 mtt-ipc100 ...] [--repeat 1]

Set-up of every case: CIFAR-100 shapes (100 classes of 3 x 32 x 32, 300 random uint8 images per class,
enough for IPC 100 with ``init="real"``), model ConvNetW32 (depth 3, width 32 instead of the default
ConvNet's 128, so that the rows run on a 2-core CPU: about 1/13 of the default's convolution FLOPs per
image), each method's default hyper-parameters otherwise:

- ``dc``: DC without augmentation, 256 real images per class, ``get_loops(ipc)`` outer and inner loops
  (IPC 10: 10 and 50; IPC 50: 50 and 10; IPC 100: 100 and 5), network SGD lr 0.01, batch 256.
  An iteration (``outer_loop`` matching steps, each but the last followed by ``inner_loop`` epochs of
  network training on the synthetic set) takes far too long here, so ONE OUTER STEP is measured: the
  body of ``DC.step``'s loop run through the distiller's own methods (``matching_loss`` on
  ``real_batches``, ``update_images``, then ``fastdd.train.train_epochs`` for ``inner_loop`` epochs),
  on one network that persists from call to call as it does within an iteration. The
  ``DC: s/iteration, extrapolated`` column is ``outer_loop x`` that time, NOT MEASURED; it counts the
  network training of the last outer step, which ``DC.step`` skips, so it overstates an iteration by
  one inner training (under 1/outer_loop of it). The peak is that of one outer step (each outer step
  allocates the same buffers).
- ``dm``: DM with DSA, 256 real images per class, the class chunks of :mod:`fastdd.methods.dm`.
- ``mtt``: MTT in mode ``"flat"``, syn_steps 20, expert_epochs 2, max_start_epoch 4, DSA; the experts
  are one random trajectory (a freshly initialised network, then five random steps: the cost of an
  iteration does not depend on the values). ``batch_syn`` is the default (all ``100 x IPC`` images
  per student step) at IPC 10; at IPC 50 and 100 the default (5,000 and 10,000 images per student
  step) would take several minutes per iteration here (a student step's cost grows with
  ``batch_syn``), so to keep an iteration within about two minutes those cases set ``batch_syn`` to
  2,500 (:data:`MTT_BATCH_SYN`; it divides both sets, so every student step has the same size), as the
  ``settings`` column shows.

Every number comes from a fresh process: seconds, the median of ``repeat`` iterations (DC: outer steps)
after one warm-up, with :func:`fastdd.runtime.allocator.keep_freed_memory`; peak, :func:`harness.measure.
peak_bytes` of one iteration (DC: outer step) beyond what the process held before it (the data,
the synthetic set, the experts). A process that fails is recorded as ``failed (exit status N)``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from fastdd.data import RealDataset
from fastdd.methods import DC, DM, MTT, Distiller
from fastdd.runtime.allocator import keep_freed_memory
from harness.measure import cell, commit, machine, median_seconds, peak_bytes, record_cases
from harness.memory_plan import random_expert
from harness.method_steps import CLASSES, MODEL, cifar100_shaped, dc_outer_step, gradient_settings

RESULTS = Path(__file__).parent / "results"
MTT_BATCH_SYN = {50: 2500, 100: 2500}  # IPC -> batch_syn where the default (all images) is too slow here
EXPERT_EPOCHS, MAX_START_EPOCH = 2, 4
# name -> (method, IPC)
CASES = {f"{method}-ipc{ipc}": (method, ipc) for method in ("dc", "dm", "mtt") for ipc in (10, 50, 100)}


def mtt(train: RealDataset, ipc: int, generator: torch.Generator) -> MTT:
    """An MTT distiller (flat mode) with one random expert of ``MAX_START_EPOCH + EXPERT_EPOCHS - 1`` epochs."""
    with tempfile.TemporaryDirectory() as experts:
        random_expert(train, MODEL, generator, experts, MAX_START_EPOCH + EXPERT_EPOCHS - 1)
        return MTT(train, ipc, generator, experts=experts, mode="flat", expert_epochs=EXPERT_EPOCHS,
                   max_start_epoch=MAX_START_EPOCH, batch_syn=MTT_BATCH_SYN.get(ipc), model=MODEL)


def distiller(case: str) -> Distiller:
    method, ipc = CASES[case]
    train, generator = cifar100_shaped()
    if method == "dc":
        return DC(train, ipc, generator, model=MODEL, real_precision="float32")
    if method == "dm":
        return DM(train, ipc, generator, model=MODEL, real_precision="float32")
    return mtt(train, ipc, generator)


def worker(case: str, what: str, repeat: int) -> float | None:
    """Seconds (median) or peak bytes of one iteration (DC: one outer step), measured in this process."""
    if what == "seconds":
        keep_freed_memory()
    d = distiller(case)
    if isinstance(d, DC):
        step = dc_outer_step(d)
    else:
        iteration = iter(range(2**62))

        def step() -> None:
            d.step(next(iteration))

    if what == "peak":
        return peak_bytes(step, "cpu")
    return median_seconds(step, "cpu", repeat=repeat, warmup=1)


def in_fresh_process(case: str, what: str, repeat: int) -> float | str | None:
    run = subprocess.run([sys.executable, __file__, "--worker", case, what, "--repeat", str(repeat)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        sys.stderr.write(run.stderr[-2000:])
        return f"failed (exit status {run.returncode})"
    out = run.stdout.split()[-1]
    return None if out == "None" else float(out)


def settings(case: str) -> dict:
    method, ipc = CASES[case]
    if method == "mtt":
        return {"mode": "flat", "syn_steps": 20, "batch_syn": MTT_BATCH_SYN.get(ipc, CLASSES * ipc)}
    return gradient_settings(method, ipc)


HEADER = ("| date | case | classes x IPC | model | settings | s/iteration | DC: s/outer step | "
          "DC: s/iteration, extrapolated (outer_loop x outer step, not measured) | peak MiB (DC: one outer step) | "
          "machine | commit |\n" + "|---" * 11 + "|\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="cases (default: all)")
    p.add_argument("--repeat", type=int, default=1, help="timed iterations (DC: outer steps) per measurement (median)")
    p.add_argument("--worker", nargs=2, metavar=("CASE", "WHAT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(worker(*args.worker, args.repeat))
        return

    def measure(case: str) -> dict:
        method, ipc = CASES[case]
        seconds, peak = (in_fresh_process(case, what, args.repeat) for what in ("seconds", "peak"))
        row = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "case": case, "method": method,
               "classes": CLASSES, "ipc": ipc, "model": MODEL, "settings": settings(case), "repeat": args.repeat}
        if method == "dc":
            outer_loop = row["settings"]["outer_loop"]
            extrapolated = seconds * outer_loop if isinstance(seconds, float) else seconds
            row |= {"seconds_outer_step": seconds, "seconds_iteration_extrapolated": extrapolated}
        else:
            row |= {"seconds_iteration": seconds}
        return row | {"peak": peak, "machine": machine("cpu"), "commit": commit()}

    def cells(row: dict) -> list[str]:
        shown = ", ".join(f"{k} {v}" for k, v in row["settings"].items())
        return [row["date"], row["case"], f"{row['classes']} x {row['ipc']}", row["model"], shown,
                cell(row.get("seconds_iteration"), 1, 2), cell(row.get("seconds_outer_step"), 1, 2),
                cell(row.get("seconds_iteration_extrapolated"), 1, 0), cell(row["peak"], 2**-20, 0),
                row["machine"], row["commit"]]

    record_cases(RESULTS, "method_scale", HEADER, args.cases, measure, cells)


if __name__ == "__main__":
    main()
