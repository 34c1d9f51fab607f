"""Shared fixtures: a tiny random real data set that every distiller test can use; NaN-poisoned
kernel outputs; Triton kernels interpreted on CPU when no GPU is present."""

from __future__ import annotations

import os

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
