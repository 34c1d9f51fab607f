"""MNIST and Fashion-MNIST from their idx files, plain or gzip-compressed.

Layout: the four files directly in the data root, each either plain or with ``.gz``::

    train-images-idx3-ubyte  train-labels-idx1-ubyte  t10k-images-idx3-ubyte  t10k-labels-idx1-ubyte

idx format (big-endian): int32 magic (2051 for uint8 images [N, H, W], 2049 for uint8 labels [N]),
then one int32 per dimension, then the raw bytes. Every header is checked against the file size.
Fashion-MNIST defaults to ``/usr/share/datasets/fashion-mnist`` (Debian package
``dataset-fashion-mnist``).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from fastdd.data.base import DatasetError, RealDataset, require_root, tensor_from_numpy

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DEFAULT_ROOT",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "load_fashion_mnist",
    "load_mnist",
    "read_idx_images",
    "read_idx_labels",
]

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
FASHION_MNIST_MEAN = (0.2861,)
FASHION_MNIST_STD = (0.3530,)
FASHION_MNIST_CLASSES = "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot".split(",")
FASHION_MNIST_DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_LAYOUT = "the idx files " + ", ".join(f for pair in _FILES.values() for f in pair) + " (plain or .gz)"
_SOURCES = {
    "mnist": "http://yann.lecun.com/exdb/mnist/ (or any MNIST mirror)",
    "fashion-mnist": "`apt install dataset-fashion-mnist` (Debian) or "
    "https://github.com/zalandoresearch/fashion-mnist",
}


def _read_bytes(path: Path) -> bytes:
    """The (decompressed, for ``.gz``) content of ``path``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: cannot read ({e}); expected an idx file, plain or gzip. Re-download it.") from e


def _read_idx(path: Path, magic: int, ndim: int) -> tuple[tuple[int, ...], bytes]:
    """(dims, raw bytes) of an idx file, checked: magic number and size = header + prod(dims)."""
    data = _read_bytes(path)
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise DatasetError(f"{path}: {len(data)} bytes, shorter than the {header}-byte idx header (truncated file)")
    found, *dims = (int(v) for v in np.frombuffer(data, dtype=">i4", count=1 + ndim))
    if found != magic:
        kind = "images" if magic == IMAGES_MAGIC else "labels"
        raise DatasetError(f"{path}: idx magic number {found}, expected {magic} (uint8 {kind}); wrong or corrupt file")
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise DatasetError(
            f"{path}: {len(data)} bytes, but its header {tuple(dims)} needs {expected}; "
            "the file is truncated or corrupt, re-download it"
        )
    return tuple(dims), data


def read_idx_images(path: str | Path) -> np.ndarray:
    """uint8 [N, 1, H, W] from an idx3 image file (magic 2051), plain or ``.gz``."""
    path = Path(path)
    (n, h, w), data = _read_idx(path, IMAGES_MAGIC, 3)
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, 1, h, w)


def read_idx_labels(path: str | Path, num_classes: int) -> np.ndarray:
    """int64 [N] from an idx1 label file (magic 2049), plain or ``.gz``; every label in [0, num_classes)."""
    path = Path(path)
    (n,), data = _read_idx(path, LABELS_MAGIC, 1)
    labels = np.frombuffer(data, dtype=np.uint8, offset=8).astype(np.int64)
    if n and int(labels.max()) >= num_classes:
        bad = int(np.flatnonzero(labels >= num_classes)[0])
        raise DatasetError(f"{path}: label {labels[bad]} at index {bad}, expected labels in [0, {num_classes})")
    return labels


def _find(root: Path, stem: str, dataset: str) -> Path:
    for path in (root / stem, root / f"{stem}.gz"):
        if path.is_file():
            return path
    raise DatasetError(
        f"{dataset}: missing {root / stem} (or {stem}.gz). Expected {_LAYOUT} in {root}; "
        f"get them from {_SOURCES[dataset]}."
    )


def _load(
    dataset: str,
    root: Path,
    device: str | torch.device,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    class_names: list[str],
) -> tuple[RealDataset, RealDataset]:
    splits = []
    for images_stem, labels_stem in _FILES.values():
        images_path, labels_path = _find(root, images_stem, dataset), _find(root, labels_stem, dataset)
        images = read_idx_images(images_path)
        labels = read_idx_labels(labels_path, len(class_names))
        if images.shape[0] != labels.shape[0]:
            raise DatasetError(
                f"{dataset}: {images_path} holds {images.shape[0]} images but {labels_path} holds "
                f"{labels.shape[0]} labels; expected the same count (mismatched or corrupt files)"
            )
        splits.append(
            RealDataset(
                name=dataset,
                images=tensor_from_numpy(images, device),
                labels=tensor_from_numpy(labels, device),
                num_classes=len(class_names),
                mean=mean,
                std=std,
                class_names=list(class_names),
            )
        )
    return splits[0], splits[1]


def load_mnist(root: str | Path | None, device: str | torch.device = "cpu") -> tuple[RealDataset, RealDataset]:
    """(train, test) of MNIST: uint8 [N, 1, 28, 28], 10 classes "0".."9", from idx files in ``root``."""
    path = require_root(root, "mnist", f"{_LAYOUT} from {_SOURCES['mnist']}")
    return _load("mnist", path, device, MNIST_MEAN, MNIST_STD, [str(c) for c in range(10)])


def load_fashion_mnist(
    root: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[RealDataset, RealDataset]:
    """(train, test) of Fashion-MNIST: uint8 [N, 1, 28, 28], 10 classes; ``root=None`` reads
    :data:`FASHION_MNIST_DEFAULT_ROOT` (Debian package dataset-fashion-mnist)."""
    if root is None:
        if not FASHION_MNIST_DEFAULT_ROOT.is_dir():
            raise DatasetError(
                f"fashion-mnist: default root {FASHION_MNIST_DEFAULT_ROOT} does not exist. Install it with "
                f"`apt install dataset-fashion-mnist`, or put {_LAYOUT} (from "
                "https://github.com/zalandoresearch/fashion-mnist) in a folder and pass it as --data-root."
            )
        root = FASHION_MNIST_DEFAULT_ROOT
    path = require_root(root, "fashion-mnist", f"{_LAYOUT} from {_SOURCES['fashion-mnist']}")
    return _load("fashion-mnist", path, device, FASHION_MNIST_MEAN, FASHION_MNIST_STD, FASHION_MNIST_CLASSES)
