"""SVHN (Street View House Numbers, cropped digits "format 2") from its MATLAB files.

Layout: ``train_32x32.mat`` and ``test_32x32.mat`` (from http://ufldl.stanford.edu/housenumbers/)
directly in the data root. Each holds ``X``: uint8 [32, 32, 3, N] and ``y``: [N, 1] with labels
1..10, where 10 means the digit 0; fastdd's labels are the digits 0..9. Needs scipy (extra ``data``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastdd.data.base import DatasetError, RealDataset, require_root, tensor_from_numpy

__all__ = ["SVHN_MEAN", "SVHN_STD", "load_svhn"]

SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.1980, 0.2010, 0.1970)
_FILES = ("train_32x32.mat", "test_32x32.mat")
_SOURCE = "http://ufldl.stanford.edu/housenumbers/"
_LAYOUT = f"{_FILES[0]} and {_FILES[1]} (from {_SOURCE})"


def _read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, 3, 32, 32], int64 digit labels [N]) from one SVHN .mat file."""
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise ImportError("reading SVHN needs scipy: pip install 'fastdd[data]'") from e
    if not path.is_file():
        raise DatasetError(f"svhn: missing {path}. Expected {_LAYOUT} in {path.parent}.")
    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except Exception as e:  # scipy signals a corrupt file with many types (ValueError, MatReadError, zlib.error, ...)
        raise DatasetError(f"{path}: not a readable MATLAB file ({type(e).__name__}: {e}); re-download it") from e
    if "X" not in mat or "y" not in mat:
        raise DatasetError(f"{path}: expected variables 'X' and 'y', found {sorted(k for k in mat if k[0] != '_')}")
    x, y = mat["X"], mat["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DatasetError(f"{path}: 'X' must be uint8 [32, 32, 3, N], got {x.dtype} {x.shape}")
    y = y.reshape(-1).astype(np.int64)
    if y.shape[0] != x.shape[3]:
        raise DatasetError(f"{path}: {x.shape[3]} images in 'X' but {y.shape[0]} labels in 'y'; expected equal counts")
    bad = np.flatnonzero((y < 1) | (y > 10))
    if bad.size:
        raise DatasetError(f"{path}: label {y[bad[0]]} at index {bad[0]}, expected labels 1..10 (10 = digit 0)")
    return x.transpose(3, 2, 0, 1), y % 10


def load_svhn(root: str | Path | None, device: str | torch.device = "cpu") -> tuple[RealDataset, RealDataset]:
    """(train, test) of SVHN: uint8 [N, 3, 32, 32] (73257 / 26032), 10 classes "0".."9"."""
    folder = require_root(root, "svhn", _LAYOUT)
    splits = []
    for name in _FILES:
        images, labels = _read_mat(folder / name)
        splits.append(
            RealDataset(
                name="svhn",
                images=tensor_from_numpy(images, device),
                labels=tensor_from_numpy(labels, device),
                num_classes=10,
                mean=SVHN_MEAN,
                std=SVHN_STD,
                class_names=[str(c) for c in range(10)],
            )
        )
    return splits[0], splits[1]
