"""Run the op microbenchmarks and turn them into rows and a table."""

from __future__ import annotations

import importlib
from datetime import datetime, timezone

from fastdd.benchmarks.measure import Case, commit, machine, median_seconds, peak_bytes

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


def add_peaks(row: dict, case: Case, device: str) -> None:
    """Fill in both peak memories (after every timing: see measure.peak_bytes)."""
    for key, fn in (("peak_mib", case.run), ("baseline_peak_mib", case.baseline)):
        peak = peak_bytes(fn, device)
        row[key] = None if peak is None else peak / 2**20


def run(ops: list[str], device: str, repeat: int = 5, progress: bool = True) -> list[dict]:
    """Rows for every case of the named ops on ``device``: all timings first, then all peaks."""
    for op in ops:
        if op not in SUITES:
            raise ValueError(f"unknown op {op!r}; expected one of {sorted(SUITES)}")
    measured = []
    for op in ops:
        for case in importlib.import_module(SUITES[op]).cases(device):
            measured.append((case, timing_row(case, device, median_seconds(case.run, device, repeat),
                                       median_seconds(case.baseline, device, repeat))))
            if progress:
                print(format_table([measured[-1][1]], header=len(measured) == 1), end="", flush=True)
    for case, row in measured:
        add_peaks(row, case, device)
    if progress:
        print("\npeak memory:\n" + format_table([r for _, r in measured]), end="")
    return [r for _, r in measured]


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
