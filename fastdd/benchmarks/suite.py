"""Run the op microbenchmarks and turn them into rows and a table."""

from __future__ import annotations

import importlib
import subprocess
import sys
from datetime import datetime, timezone

from fastdd.benchmarks.measure import Case, commit, machine, median_seconds, peak_bytes

MIN_SECONDS = 1.0  # each side is timed for at least this long: millisecond ops get hundreds of calls
# op name -> module under fastdd.benchmarks with a ``cases(device) -> list[Case]`` function
SUITES = {
    "grad_match_distance": "fastdd.benchmarks.grad_match",
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
        "machine": machine(device), "commit": commit(),
    }


def add_peaks(row: dict, op: str, index: int, device: str) -> None:
    """Fill in both peak memories of case ``index`` of ``op``.

    On CPU each peak is taken in a fresh process (``python -m fastdd.benchmarks.suite``), where the
    resident-set high-water mark is not blurred by pages earlier calls left behind.
    """
    for key, which in (("peak_mib", "run"), ("baseline_peak_mib", "baseline")):
        if device.startswith("cuda"):
            peak = peak_bytes(getattr(_cases(op, device)[index], which), device)
        else:
            out = subprocess.run([sys.executable, "-m", "fastdd.benchmarks.suite", op, str(index), which],
                                 capture_output=True, text=True, check=True).stdout.split()
            peak = None if out[-1] == "None" else int(out[-1])
        row[key] = None if peak is None else peak / 2**20


def _cases(op: str, device: str) -> list[Case]:
    if op not in SUITES:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(SUITES)}")
    return importlib.import_module(SUITES[op]).cases(device)


def run(ops: list[str], device: str, repeat: int = 5, progress: bool = True) -> list[dict]:
    """Rows for every case of the named ops on ``device``: all timings, then all peaks."""
    suites = {op: _cases(op, device) for op in ops}
    measured = []
    for op, cases in suites.items():
        for index, case in enumerate(cases):
            seconds = median_seconds(case.run, device, repeat, min_seconds=MIN_SECONDS)
            baseline_seconds = median_seconds(case.baseline, device, repeat, min_seconds=MIN_SECONDS)
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


if __name__ == "__main__":  # python -m fastdd.benchmarks.suite OP INDEX run|baseline: one CPU peak, in bytes
    _op, _index, _which = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    print(peak_bytes(getattr(_cases(_op, "cpu")[_index], _which), "cpu"))
