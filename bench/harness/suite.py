"""Run the op microbenchmarks and turn them into rows and a table.

Each row states, beside the speed-up (the ratio of the two sides' median times), its spread: the interquartile
range of the per-round speed-ups (each round times both sides once, in turn), over at least :data:`MIN_ROUNDS`
rounds; and the machine's load: its 1-minute load average before and after the case and its CPUs, ``loaded`` when
other work held more than :data:`~harness.measure.LOADED_SHARE` of them at the start (the average less what the
suite's own earlier cases left in it, :class:`~harness.measure.OwnLoad`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone

import torch

from fastdd.runtime.allocator import keep_freed_memory
from harness.measure import Case, Load, OwnLoad, commit, load_average, machine, paired_seconds, peak_bytes, quartiles
from harness.process import run_module

MIN_SECONDS = 1.0  # each side is timed for at least this long: millisecond ops get hundreds of calls
MIN_ROUNDS = 3  # the fewest rounds a row's spread is stated over
# op name -> module of the harness with a ``cases(device) -> list[Case]`` function
SUITES = {
    "grad_match_distance": "harness.grad_match",
    "instance_norm_relu_pool": "harness.norm_relu_pool",
    "masked_feature_contrastive": "harness.contrastive",
    "per_sample_grad_norm": "harness.grad_norm",
}


@dataclasses.dataclass(frozen=True)
class Timing:
    """A case's seconds per round, fastdd (``run``) and ``baseline``, and the machine's load meanwhile."""

    run: list[float]
    baseline: list[float]
    load: Load


def timing_row(case: Case, device: str, seconds: float, baseline_seconds: float, ratios: Sequence[float] = (),
               load: Load | None = None) -> dict:
    """One table row: both timings and their ratio, where and when they were measured.

    ``ratios``: the per-round speed-ups, whose quartiles are the row's spread (none stated below
    :data:`MIN_ROUNDS`); ``load``: the machine's load during the measurement (None: not recorded).
    """
    spread = list(quartiles(ratios)) if len(ratios) >= MIN_ROUNDS else None
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "op": case.op, "case": case.name, "baseline": case.baseline_name, "device": device,
        "seconds": seconds, "baseline_seconds": baseline_seconds, "speedup": baseline_seconds / seconds,
        "speedup_iqr": spread, "rounds": len(ratios) or None,
        "load": None if load is None else {**dataclasses.asdict(load), "loaded": load.loaded},
        "target": case.target, "peak_mib": None, "baseline_peak_mib": None,
        "machine": machine(device) + ("" if device.startswith("cuda") else ", freed memory kept"), "commit": commit(),
    }


def _in_fresh_process(op: str, index: int, *args: str) -> str:
    """The last line ``python -m harness.suite OP INDEX *args`` prints."""
    return run_module("suite", op, str(index), *args, check=True).stdout.splitlines()[-1]


def timings(op: str, index: int, device: str, repeat: int, own: OwnLoad) -> Timing:
    """Seconds per round of case ``index`` of ``op``, fastdd and baseline in alternation, over ``repeat`` rounds (at
    least :data:`MIN_ROUNDS`) and :data:`MIN_SECONDS` a side.

    On CPU in a fresh process holding only this case, with glibc keeping freed memory
    (:func:`fastdd.runtime.allocator.keep_freed_memory`, as the ``fastdd`` command runs): with glibc's defaults,
    whether a buffer is reused or mapped fresh (a page fault per 4 KiB) depends on the order of every
    earlier allocation and free, and moved single cases by 2x in either direction, unrelated to the op.
    ``own`` accounts for the suite's earlier cases in the load and takes this one's time.
    """
    rounds = max(repeat, MIN_ROUNDS)
    before, own_before, start = load_average(), own.value, time.perf_counter()
    if device.startswith("cuda"):
        calls = cases(op, device)[index].setup()
        run, baseline = paired_seconds([calls.run, calls.baseline], device, rounds, min_seconds=MIN_SECONDS)
    else:
        run, baseline = json.loads(_in_fresh_process(op, index, "time", str(rounds)))
    own.ran(time.perf_counter() - start)
    return Timing(run, baseline, Load(before, load_average(), os.cpu_count() or 1, own_before))


def add_peaks(row: dict, op: str, index: int, device: str) -> None:
    """Fill in both peak memories of case ``index`` of ``op``.

    On CPU each peak is taken in a fresh process, where the resident-set high-water mark is not
    blurred by pages earlier calls left behind.
    """
    for key, which in (("peak_mib", "run"), ("baseline_peak_mib", "baseline")):
        if device.startswith("cuda"):
            peak = peak_bytes(getattr(cases(op, device)[index].setup(), which), device)
        else:
            out = _in_fresh_process(op, index, "peak", which)
            peak = None if out == "None" else int(out)
        row[key] = None if peak is None else peak / 2**20


def cases(op: str, device: str) -> list[Case]:
    """The cases of ``op`` on ``device`` (listed, not built: see :class:`~harness.measure.Case`)."""
    if op not in SUITES:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(SUITES)}")
    return importlib.import_module(SUITES[op]).cases(device)


def run(ops: list[str], device: str, repeat: int = 5, progress: bool = True) -> list[dict]:
    """Rows for every case of the named ops on ``device``: all timings, then all peaks."""
    suites = {op: cases(op, device) for op in ops}
    own = OwnLoad(torch.get_num_threads())
    measured = []
    for op, listed in suites.items():
        for index, case in enumerate(listed):
            timing = timings(op, index, device, repeat, own)
            ratios = [b / r for r, b in zip(timing.run, timing.baseline)]
            row = timing_row(case, device, statistics.median(timing.run), statistics.median(timing.baseline),
                             ratios, timing.load)
            measured.append((op, index, row))
            if progress:
                print(format_table([measured[-1][2]], header=len(measured) == 1), end="", flush=True)
    for op, index, row in measured:
        add_peaks(row, op, index, device)
    if progress:
        print("\nwith peak memory:\n" + format_table([r for _, _, r in measured]), end="")
    return [r for _, _, r in measured]


HEADER = ("| date | op | case | baseline | fastdd ms | baseline ms | speed-up | speed-up IQR (rounds) | target "
          "| peak MiB | baseline peak MiB | load 1 min before -> after / CPUs | machine | commit |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def format_table(rows: list[dict], header: bool = True) -> str:
    """Markdown rows, one per measurement (with the header when asked)."""
    def mib(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    def times(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    def spread(r: dict) -> str:  # rows from before spreads and loads were recorded have neither
        if r.get("speedup_iqr") is None:
            return "-"
        low, high = r["speedup_iqr"]
        return f"{low:.2f}-{high:.2f}x ({r['rounds']})"

    def load(r: dict) -> str:
        if r.get("load") is None:
            return "-"
        before, after, cpus, loaded = (r["load"][k] for k in ("before", "after", "cpus", "loaded"))
        own = f" ({r['load']['own']:.2f} own)" if r["load"].get("own") else ""
        return f"{before:.2f}{own} -> {after:.2f} / {cpus}" + (", loaded" if loaded else "")

    lines = [
        f"| {r['date']} | {r['op']} | {r['case']} | {r['baseline']} | {1e3 * r['seconds']:.2f} "
        f"| {1e3 * r['baseline_seconds']:.2f} | {times(r['speedup'])} | {spread(r)} | {times(r['target'])} "
        f"| {mib(r['peak_mib'])} | {mib(r['baseline_peak_mib'])} | {load(r)} | {r['machine']} | {r['commit']} |\n"
        for r in rows
    ]
    return (HEADER if header else "") + "".join(lines)


def _main(argv: list[str]) -> str:
    """``OP INDEX time REPEAT``: both sides' CPU seconds per round (JSON); ``OP INDEX peak run|baseline``: one CPU
    peak in bytes."""
    op, index, what, arg = argv
    calls = cases(op, "cpu")[int(index)].setup()
    if what == "time":
        keep_freed_memory()
        return json.dumps(paired_seconds([calls.run, calls.baseline], "cpu", int(arg), min_seconds=MIN_SECONDS))
    return str(peak_bytes(getattr(calls, arg), "cpu"))


if __name__ == "__main__":
    print(_main(sys.argv[1:]))
