"""Benchmark cases; their timing, peak memory and provenance (machine, its load, backend, commit)."""

from __future__ import annotations

import ctypes
import math
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdd.ops._backend import isa_level, resolve_backend
from fastdd.ops.calibration import OPS, cpu_model, extension_of
from fastdd.runtime.allocator import process_memory

MAX_ROUNDS = 1000  # most rounds paired_seconds runs beyond ``repeat`` to reach ``min_seconds`` (microsecond calls)
LOADED_SHARE = 0.3  # a machine whose 1-minute load average exceeds this share of its CPUs is "loaded"


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
    """Median wall time in seconds of each of ``fns`` over the rounds of :func:`paired_seconds`."""
    return [statistics.median(t) for t in paired_seconds(fns, device, repeat, warmup, min_seconds)]


def paired_seconds(fns: Sequence[Callable[[], object]], device: str, repeat: int = 5, warmup: int = 1,
                   min_seconds: float = 0.0) -> list[list[float]]:
    """Wall time in seconds of each round of each of ``fns``, called in turn (one call of each per round, after
    ``warmup`` calls each), so that a slower or faster spell of a shared machine reaches every one of them alike.

    Rounds go on until there are ``repeat`` of them and every function has run ``min_seconds`` in all, or
    ``repeat + MAX_ROUNDS`` rounds.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: list[list[float]] = [[] for _ in fns]
    while len(times[0]) < repeat or (min(sum(t) for t in times) < min_seconds and len(times[0]) < repeat + MAX_ROUNDS):
        for fn, spent in zip(fns, times):
            began = time.perf_counter()
            fn()
            synchronize(device)
            spent.append(time.perf_counter() - began)
    return times


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """The first and third quartiles of ``values`` (at least two), interpolated between the values."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


@dataclass(frozen=True)
class Load:
    """The machine's 1-minute load average when a measurement began and when it ended, its CPUs, and ``own``: the
    part of ``before`` that the benchmark's own earlier measurements still account for (:class:`OwnLoad`).

    ``before - own`` is other work (this measurement's threads count in ``after`` only); the machine was ``loaded``
    when that exceeds :data:`LOADED_SHARE` of the CPUs.
    """

    before: float
    after: float
    cpus: int
    own: float = 0.0

    @property
    def loaded(self) -> bool:
        return self.before - self.own > LOADED_SHARE * self.cpus


class OwnLoad:
    """What a run of back-to-back measurements adds to the 1-minute load average: ``threads`` runnable while one
    runs, averaged in as the kernel averages the load (exponentially, time constant 60 s), so that one case's
    threads are not taken for other work in the next case's ``before``."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.value = 0.0

    def ran(self, seconds: float) -> None:
        """Account for ``seconds`` of measuring."""
        decay = math.exp(-seconds / 60)
        self.value = self.value * decay + self.threads * (1 - decay)


def load_average() -> float:
    """The 1-minute load average: processes running or waiting for a CPU, averaged over the last minute."""
    return os.getloadavg()[0]


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def peak_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Memory ``fn()`` needs at its peak beyond what was held before, in bytes; None where unmeasurable.

    One warm-up call first (lazy initialisation, such as loading an extension, is not the op's memory).
    CUDA: the allocator's peak. CPU (Linux): the resident-set high-water mark, reset through
    /proc/self/clear_refs before the call, minus the resident set before it. glibc would otherwise
    serve buffers from pages an earlier call left resident, which the resident set before the call
    already counts: the mmap threshold is pinned at 128 KiB first (every large buffer is then freshly
    mapped) and the free pages of the heaps are returned (malloc_trim) before the resident set is
    read, so the small buffers count too (without that, the peak of the same call measured 8-10.7
    MiB in successive processes; with it, within 3 %). That also slows later allocations: take CPU
    peaks in a process of their own (:mod:`harness.suite` does).
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
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        fn()
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = process_memory("VmRSS")
        fn()
        after = process_memory("VmHWM")
    except OSError:
        return None
    return None if before is None or after is None else max(0, after - before)


def processor(device: str = "cpu") -> str:
    """The CPU model, the ISA level of torch's and fastdd's kernels and the number of threads torch uses, or the
    GPU's name."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{cpu_model()}, {isa_level()}, {torch.get_num_threads()} threads"


def machine(device: str = "cpu") -> str:
    """:func:`processor` and the torch version."""
    return f"{processor(device)}, torch {torch.__version__}"


# op -> its family in the calibration
FAMILIES = {op: family for family, ops in OPS.items() for op in ops}


def backend(op: str, device: str) -> str:
    """The backend ``op`` runs on with ``backend="auto"`` on ``device``: triton, cpp or torch (on CPU as calibrated,
    :mod:`fastdd.ops.calibration`, timing it first where this machine has no calibration yet)."""
    family = FAMILIES[op]
    return resolve_backend("auto", [torch.empty(0, device=device)], extension_of(family), family=family)


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
    """Put ``table_rows`` at the top of ``results/<name>.md`` (newest first, under ``header``; rows under another
    header stay below) and
    append ``rows`` to ``results/<name>.jsonl``, holding ``results/.<name>.lock`` so that benchmarks finishing
    together (the campaign's workers) do not drop each other's rows."""
    import fcntl

    from fastdd.io import append_jsonl, atomic_write_bytes

    results.mkdir(parents=True, exist_ok=True)
    with open(results / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = results / f"{name}.md"
        old = table.read_text() if table.exists() else ""
        if old.startswith(header):
            old = old[len(header):]
        elif old:  # a table under another header (columns since changed) stays whole, below a blank line
            old = "\n" + old
        atomic_write_bytes(table, (header + table_rows + old).encode())
        for row in rows:
            append_jsonl(results / f"{name}.jsonl", row)
