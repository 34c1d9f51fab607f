"""Benchmark cases; their timing, peak memory and provenance (machine, backend, commit)."""

from __future__ import annotations

import ctypes
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdd.allocator import process_memory
from fastdd.ops._backend import resolve_backend


def unchanged(output: object) -> object:
    """``output`` itself (a baseline that returns what fastdd returns)."""
    return output


@dataclass(frozen=True)
class Calls:
    """A case's two callables on inputs built for them: ``run`` (fastdd) and ``baseline``.

    ``expected(baseline())`` is what ``run()`` returns, up to rounding; None where the baseline computes
    something else (a plain training step, timed for its cost).
    """

    run: Callable[[], object]
    baseline: Callable[[], object]
    expected: Callable[[object], object] | None = unchanged


@dataclass(frozen=True)
class Case:
    """One measurement: fastdd against its baseline (what users have today), same inputs.

    ``setup()`` builds the inputs and returns the :class:`Calls` to time; listing cases builds nothing.
    ``target`` is the speed-up (baseline time / fastdd time) the op is expected to reach here.
    """

    op: str
    name: str
    baseline_name: str
    setup: Callable[[], Calls]
    target: float | None = None


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device: str, repeat: int = 5, warmup: int = 1,
                   min_seconds: float = 0.0) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` calls (at least ``min_seconds`` in all)."""
    return paired_median_seconds([fn], device, repeat, warmup, min_seconds)[0]


def paired_median_seconds(fns: Sequence[Callable[[], object]], device: str, repeat: int = 5, warmup: int = 1,
                          min_seconds: float = 0.0) -> list[float]:
    """Median wall time in seconds of each of ``fns``, called in turn (one call of each per round), so
    that a slower or faster spell of a shared machine reaches every one of them alike.

    Rounds go on until there are ``repeat`` of them and every function has run ``min_seconds`` in all.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: list[list[float]] = [[] for _ in fns]
    while len(times[0]) < repeat or min(sum(t) for t in times) < min_seconds:
        for fn, spent in zip(fns, times):
            began = time.perf_counter()
            fn()
            synchronize(device)
            spent.append(time.perf_counter() - began)
    return [statistics.median(t) for t in times]


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def peak_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Memory ``fn()`` needs at its peak beyond what was held before, in bytes; None where unmeasurable.

    One warm-up call first (lazy initialisation, such as loading an extension, is not the op's memory).
    CUDA: the allocator's peak. CPU (Linux): the resident-set high-water mark, reset through
    /proc/self/clear_refs before the call, minus the resident set before it. glibc would otherwise
    serve large buffers from pages an earlier call left resident (its mmap threshold grows as
    buffers are freed), so the threshold is pinned at 128 KiB first: every large buffer is then
    freshly mapped and counted. That also slows later large allocations: take CPU peaks in a
    process of their own (``fastdd.benchmarks.suite`` does).
    """
    if device.startswith("cuda"):
        fn()
        synchronize(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated() - before
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        fn()
        Path("/proc/self/clear_refs").write_text("5")
        before = process_memory("VmRSS")
        fn()
        after = process_memory("VmHWM")
    except OSError:
        return None
    return None if before is None or after is None else max(0, after - before)


def processor(device: str = "cpu") -> str:
    """The CPU model and the number of threads torch uses, or the GPU's name."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {torch.get_num_threads()} threads"


def machine(device: str = "cpu") -> str:
    """:func:`processor` and the torch version."""
    return f"{processor(device)}, torch {torch.__version__}"


# op -> the C++ extension (csrc/<name>.cpp) of its CPU path
EXTENSIONS = {
    "conv_instance_norm_relu_pool": "norm_relu_pool",
    "grad_match_distance": "grad_match",
    "instance_norm_relu_pool": "norm_relu_pool",
    "masked_feature_contrastive": "masked_contrastive",
    "per_sample_grad_norm": "grad_norm",
}


def backend(op: str, device: str) -> str:
    """The backend ``op`` runs on with ``backend="auto"`` on ``device``: triton, cpp or torch."""
    return resolve_backend("auto", [torch.empty(0, device=device)], EXTENSIONS[op])


def commit() -> str:
    """Short hash of the checked-out commit, with ``-dirty`` when tracked files other than the result tables
    (``bench/results``, which benchmarks write while others run) differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)bench/results")
    return rev + ("-dirty" if changed else "")


def cell(value: float | str | None, scale: float, digits: int) -> str:
    """A table cell: ``value * scale`` with ``digits`` decimals, ``-`` for None, a failure's text as it is."""
    if value is None or isinstance(value, str):
        return "-" if value is None else value
    return f"{value * scale:.{digits}f}"


def record_cases(results: Path, name: str, header: str, cases: Sequence[object],
                 measure: Callable[[object], dict], cells: Callable[[dict], list[str]]) -> None:
    """For each case, ``row = measure(case)``; print its table line (``cells(row)``) as it comes, then
    :func:`record` them all."""
    rows, lines = [], []
    for case in cases:
        rows.append(measure(case))
        lines.append("| " + " | ".join(cells(rows[-1])) + " |\n")
        print(lines[-1], end="", flush=True)
    record(results, name, header, "".join(lines), rows)


def record(results: Path, name: str, header: str, table_rows: str, rows: list[dict]) -> None:
    """Put ``table_rows`` at the top of ``results/<name>.md`` (newest first, under ``header``) and
    append ``rows`` to ``results/<name>.jsonl``, holding ``results/.<name>.lock`` so that benchmarks finishing
    together (the campaign's workers) do not drop each other's rows."""
    import fcntl

    from fastdd.io import append_jsonl, atomic_write_bytes

    results.mkdir(parents=True, exist_ok=True)
    with open(results / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = results / f"{name}.md"
        old = table.read_text()[len(header):] if table.exists() else ""
        atomic_write_bytes(table, (header + table_rows + old).encode())
        for row in rows:
            append_jsonl(results / f"{name}.jsonl", row)
