"""Run the op microbenchmarks and turn them into rows and a table."""

from __future__ import annotations

import importlib
import subprocess
import sys
from datetime import datetime, timezone

from fastdd.allocator import keep_freed_memory
from fastdd.benchmarks.measure import Case, commit, machine, paired_median_seconds, peak_bytes

MIN_SECONDS = 1.0  # each side is timed for at least this long: millisecond ops get hundreds of calls
# op name -> module under fastdd.benchmarks with a ``cases(device) -> list[Case]`` function
SUITES = {
    "grad_match_distance": "fastdd.benchmarks.grad_match",
    "instance_norm_relu_pool": "fastdd.benchmarks.norm_relu_pool",
    "masked_feature_contrastive": "fastdd.benchmarks.contrastive",
    "per_sample_grad_norm": "fastdd.benchmarks.grad_norm",
}


def timing_row(case: Case, device: str, seconds: float, baseline_seconds: float) -> dict:
    """One table row: both timings and their ratio, where and when they were measured."""
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "op": case.op, "case": case.name, "baseline": case.baseline_name, "device": device,
        "seconds": seconds, "baseline_seconds": baseline_seconds, "speedup": baseline_seconds / seconds,
        "target": case.target, "peak_mib": None, "baseline_peak_mib": None,
        "machine": machine(device) + ("" if device.startswith("cuda") else ", freed memory kept"), "commit": commit(),
    }


def _in_fresh_process(op: str, index: int, *args: str) -> list[str]:
    """The words ``python -m fastdd.benchmarks.suite OP INDEX *args`` prints."""
    return subprocess.run([sys.executable, "-m", "fastdd.benchmarks.suite", op, str(index), *args],
                          capture_output=True, text=True, check=True).stdout.split()


def timings(op: str, index: int, device: str, repeat: int) -> tuple[float, float]:
    """Median seconds of case ``index`` of ``op``: (fastdd, baseline), timed in alternation.

    On CPU in a fresh process holding only this case, with glibc keeping freed memory
    (:func:`fastdd.allocator.keep_freed_memory`, as the ``fastdd`` command runs): with glibc's defaults,
    whether a buffer is reused or mapped fresh (a page fault per 4 KiB) depends on the order of every
    earlier allocation and free, and moved single cases by 2x in either direction, unrelated to the op.
    """
    if device.startswith("cuda"):
        calls = cases(op, device)[index].setup()
        seconds, baseline = paired_median_seconds([calls.run, calls.baseline], device, repeat, min_seconds=MIN_SECONDS)
        return seconds, baseline
    seconds, baseline = _in_fresh_process(op, index, "time", str(repeat))
    return float(seconds), float(baseline)


def add_peaks(row: dict, op: str, index: int, device: str) -> None:
    """Fill in both peak memories of case ``index`` of ``op``.

    On CPU each peak is taken in a fresh process, where the resident-set high-water mark is not
    blurred by pages earlier calls left behind.
    """
    for key, which in (("peak_mib", "run"), ("baseline_peak_mib", "baseline")):
        if device.startswith("cuda"):
            peak = peak_bytes(getattr(cases(op, device)[index].setup(), which), device)
        else:
            out = _in_fresh_process(op, index, "peak", which)[-1]
            peak = None if out == "None" else int(out)
        row[key] = None if peak is None else peak / 2**20


def cases(op: str, device: str) -> list[Case]:
    """The cases of ``op`` on ``device`` (listed, not built: see :class:`~fastdd.benchmarks.measure.Case`)."""
    if op not in SUITES:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(SUITES)}")
    return importlib.import_module(SUITES[op]).cases(device)


def run(ops: list[str], device: str, repeat: int = 5, progress: bool = True) -> list[dict]:
    """Rows for every case of the named ops on ``device``: all timings, then all peaks."""
    suites = {op: cases(op, device) for op in ops}
    measured = []
    for op, listed in suites.items():
        for index, case in enumerate(listed):
            seconds, baseline_seconds = timings(op, index, device, repeat)
            measured.append((op, index, timing_row(case, device, seconds, baseline_seconds)))
            if progress:
                print(format_table([measured[-1][2]], header=len(measured) == 1), end="", flush=True)
    for op, index, row in measured:
        add_peaks(row, op, index, device)
    if progress:
        print("\nwith peak memory:\n" + format_table([r for _, _, r in measured]), end="")
    return [r for _, _, r in measured]


HEADER = ("| date | op | case | baseline | fastdd ms | baseline ms | speed-up | target | peak MiB "
          "| baseline peak MiB | machine | commit |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def format_table(rows: list[dict], header: bool = True) -> str:
    """Markdown rows, one per measurement (with the header when asked)."""
    def mib(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    def times(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    lines = [
        f"| {r['date']} | {r['op']} | {r['case']} | {r['baseline']} | {1e3 * r['seconds']:.2f} "
        f"| {1e3 * r['baseline_seconds']:.2f} | {times(r['speedup'])} | {times(r['target'])} "
        f"| {mib(r['peak_mib'])} | {mib(r['baseline_peak_mib'])} | {r['machine']} | {r['commit']} |\n"
        for r in rows
    ]
    return (HEADER if header else "") + "".join(lines)


def _main(argv: list[str]) -> str:
    """``OP INDEX time REPEAT``: both median CPU timings; ``OP INDEX peak run|baseline``: one CPU peak in bytes."""
    op, index, what, arg = argv
    calls = cases(op, "cpu")[int(index)].setup()
    if what == "time":
        keep_freed_memory()
        seconds = paired_median_seconds([calls.run, calls.baseline], "cpu", int(arg), min_seconds=MIN_SECONDS)
        return " ".join(map(repr, seconds))
    return str(peak_bytes(getattr(calls, arg), "cpu"))


if __name__ == "__main__":
    print(_main(sys.argv[1:]))
