"""Shared fixtures: a tiny random real data set that every distiller test can use; NaN-poisoned
kernel outputs; Triton kernels interpreted on CPU when no GPU is present; a script run over two processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastdd.data import RealDataset  # noqa: E402
from fastdd.ops import _backend  # noqa: E402


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
    worker.write_text(script + "\nfrom fastdd.distributed import leave\nleave()\n")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(worker)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("equal") == 2  # one line from each process, possibly interleaved
