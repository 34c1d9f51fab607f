"""scikit-learn's bundled 8x8 handwritten digits: fastdd's offline default data set.

1797 grey images of 8x8 pixels, 10 classes, shipped inside scikit-learn (no download).
Pixels 0..16 become uint8 by ``round(v * 255 / 16)`` (16 -> 255; 8 -> 127.5 -> 128).

Split (fixed, deterministic, stratified): within each class, in the order scikit-learn returns the
samples, every 5th sample (the 5th, 10th, ... of that class, i.e. class positions 4, 9, 14, ...)
goes to the test set, the rest to train: 1442 train / 355 test images, both kept in the original
order. ``DIGITS_MEAN`` / ``DIGITS_STD`` are the mean and population std (ddof 0) of all train pixels
in [0, 1] units, computed once from this split and hard-coded (a test re-computes them).
"""

from __future__ import annotations

import numpy as np
import torch

from fastdd.data.base import RealDataset, tensor_from_numpy

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "TEST_EVERY", "load_digits"]

DIGITS_MEAN = (0.305183,)
DIGITS_STD = (0.375994,)
TEST_EVERY = 5


def load_digits(device: str | torch.device = "cpu") -> tuple[RealDataset, RealDataset]:
    """(train, test) of the 8x8 digits: uint8 [N, 1, 8, 8], 10 classes named "0".."9"."""
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # [N, 1, 8, 8]
    labels = bunch.target.astype(np.int64)
    test = np.zeros(labels.shape[0], dtype=bool)
    for c in range(10):
        test[np.flatnonzero(labels == c)[TEST_EVERY - 1 :: TEST_EVERY]] = True
    names = [str(c) for c in range(10)]

    def subset(name: str, mask: np.ndarray) -> RealDataset:
        return RealDataset(
            name=name,
            images=tensor_from_numpy(images[mask], device),
            labels=tensor_from_numpy(labels[mask], device),
            num_classes=10,
            mean=DIGITS_MEAN,
            std=DIGITS_STD,
            class_names=list(names),
        )

    return subset("digits", ~test), subset("digits", test)
