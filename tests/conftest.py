"""Shared fixtures: a tiny random real data set that every distiller test can use; NaN-poisoned
kernel outputs; Triton kernels interpreted on CPU when no GPU is present; a script run over two processes; a
backend calibration that keeps ``backend="auto"`` on the C++ extensions without timing anything.

The benchmark harness (``bench/harness``, not part of the package) imports as ``harness``, as in the scripts of
``bench/``: ``bench/`` is appended to the path (after everything installed; ``python bench/SCRIPT.py`` puts it
first)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import types
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.append(str(BENCH))

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastdd.data import RealDataset  # noqa: E402
from fastdd.ops import _backend, calibration  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def calibrated_for_cpp(tmp_path_factory):
    """The user cache folder (XDG_CACHE_HOME, which subprocesses inherit) is a temporary one holding a calibration
    that chooses the C++ extension for every op, and contiguous maps for the real passes, at every ISA level this
    machine runs: ``backend="auto"`` runs C++ on CPU tensors and a test session never times the backends."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        calibration.pin_first_sides()
        yield


@pytest.fixture
def fake_timings(monkeypatch, tmp_path) -> types.SimpleNamespace:
    """Calibrations that time nothing: an empty user cache ``cache``, no choice made yet in this process, every C++
    extension loading, and workloads whose round on a backend takes the seconds ``seconds[backend]`` says (the
    timer reads them; 1.0 each until a test sets them); ``measured`` lists the extensions measured, in turn."""
    from fastdd.ops import workloads

    fake = types.SimpleNamespace(cache=tmp_path / "cache", measured=[],
                                 seconds={"cpp": 1.0, "torch": 1.0, "contiguous": 1.0, "channels_last": 1.0})

    def setup(name: str):
        fake.measured.append(name)
        return lambda backend: fake.seconds[backend]

    monkeypatch.setenv("XDG_CACHE_HOME", str(fake.cache))
    monkeypatch.setattr(calibration, "_choices", {})
    monkeypatch.setattr(calibration, "wall_seconds", lambda fn: fn())
    monkeypatch.setattr(_backend, "load_extension", lambda name: types.SimpleNamespace())
    for name in calibration.FAMILIES:
        monkeypatch.setitem(workloads.WORKLOADS, name, workloads.Workload("fake", functools.partial(setup, name)))
    return fake


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every output buffer a launcher allocates starts as NaN, so an unwritten element fails."""
    monkeypatch.setattr(_backend, "POISON_OUTPUTS", True)


def make_dataset(num_classes: int = 3, per_class: int = 12, channels: int = 1, size: int = 8,
                 name: str = "tiny", seed: int = 0) -> RealDataset:
    """A random uint8 data set [num_classes * per_class, channels, size, size] with balanced labels."""
    g = torch.Generator().manual_seed(seed)
    n = num_classes * per_class
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(num_classes).repeat(per_class)
    return RealDataset(name=name, images=images, labels=labels, num_classes=num_classes,
                       mean=(0.5,) * channels, std=(0.25,) * channels,
                       class_names=[f"class{c}" for c in range(num_classes)])


@pytest.fixture
def tiny() -> RealDataset:
    return make_dataset()


def run_on_two_processes(script: str, tmp_path: Path) -> None:
    """Run the Python ``script`` under torchrun with two gloo processes of one thread each, leaving the process group
    at its end (a process exiting while the other still holds the group can abort it); both must succeed and print
    "equal" (the script compares a split computation with one process's)."""
    worker = tmp_path / "worker.py"
    worker.write_text(script + "\nfrom fastdd.runtime.distributed import leave\nleave()\n")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(worker)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[:3000] + "\n...\n" + run.stderr[-1500:]  # the first failure, and the end
    assert run.stdout.count("equal") == 2  # one line from each process, possibly interleaved
