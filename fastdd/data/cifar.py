"""CIFAR-10 and CIFAR-100 from the "python version" pickled batches.

Layout (the extracted archives from https://www.cs.toronto.edu/~kriz/cifar.html), inside the data
root or as the data root itself::

    cifar-10-batches-py/  data_batch_1 .. data_batch_5, test_batch, batches.meta
    cifar-100-python/     train, test, meta          (fine labels: 100 classes)

Each batch is a pickled dict with ``data``: uint8 [N, 3072] (1024 red, 1024 green, 1024 blue values,
each a row-major 32x32 plane) and ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100); the meta file
holds ``label_names`` / ``fine_label_names``. Unpickling is restricted to the numpy array types a
batch needs, so a tampered file cannot run code.
"""

from __future__ import annotations

import codecs
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastdd.data.base import DatasetError, RealDataset, require_root, tensor_from_numpy

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "load_cifar10", "load_cifar100"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5071, 0.4866, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
_SOURCE = "https://www.cs.toronto.edu/~kriz/cifar.html"

_ALLOWED_GLOBALS = {
    ("_codecs", "encode"): codecs.encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): np.zeros(0).__reduce__()[0],
    ("numpy._core.multiarray", "_reconstruct"): np.zeros(0).__reduce__()[0],
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a pickled dict of numpy arrays and lists needs."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch") from None


def _load_pickle(path: Path, layout: str) -> dict[str, object]:
    """The pickled dict in ``path`` with str keys (Python 2 pickles give bytes keys)."""
    if not path.is_file():
        raise DatasetError(f"missing {path}. Expected {layout}.")
    try:
        with path.open("rb") as f:
            obj = _BatchUnpickler(f, encoding="bytes").load()
    except Exception as e:  # a corrupt pickle can fail in many ways (EOFError, UnpicklingError, ValueError, ...)
        raise DatasetError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e}); re-download it") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}; re-download it")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _field(batch: dict[str, object], key: str, path: Path) -> object:
    if key not in batch:
        raise DatasetError(f"{path}: no '{key}' entry (found {sorted(batch)}); not a CIFAR file of this kind")
    return batch[key]


def _read_batch(path: Path, label_key: str, num_classes: int, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, 3, 32, 32], int64 [N]) from one batch file."""
    batch = _load_pickle(path, layout)
    data = _field(batch, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: 'data' must be uint8 [N, 3072], got {found}")
    try:
        labels = np.asarray(_field(batch, label_key, path), dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{path}: '{label_key}' is not a list of integers ({e})") from e
    if labels.shape != (data.shape[0],):
        raise DatasetError(
            f"{path}: {data.shape[0]} images but '{label_key}' has shape {labels.shape}; expected one label per image"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DatasetError(f"{path}: label {labels[bad[0]]} at index {bad[0]}, expected labels in [0, {num_classes})")
    return data.reshape(-1, 3, 32, 32), labels


def _class_names(path: Path, key: str, num_classes: int, layout: str) -> list[str]:
    names = _field(_load_pickle(path, layout), key, path)
    if not isinstance(names, list) or len(names) != num_classes:
        raise DatasetError(f"{path}: '{key}' must be a list of {num_classes} names")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


@dataclass(frozen=True)
class _Layout:
    dataset: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    names_key: str
    label_key: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def description(self) -> str:
        files = ", ".join((*self.train_files, self.test_file, self.meta_file))
        return f"{self.folder}/ ({files}; the python version from {_SOURCE}, extracted)"


_CIFAR10 = _Layout(
    dataset="cifar10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch",
    meta_file="batches.meta",
    names_key="label_names",
    label_key="labels",
    num_classes=10,
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
)
_CIFAR100 = _Layout(
    dataset="cifar100",
    folder="cifar-100-python",
    train_files=("train",),
    test_file="test",
    meta_file="meta",
    names_key="fine_label_names",
    label_key="fine_labels",
    num_classes=100,
    mean=CIFAR100_MEAN,
    std=CIFAR100_STD,
)


def _load(layout: _Layout, root: str | Path | None, device: str | torch.device) -> tuple[RealDataset, RealDataset]:
    base = require_root(root, layout.dataset, layout.description)
    folder = base / layout.folder
    if not folder.is_dir() and (base / layout.meta_file).is_file():
        folder = base  # the data root is the extracted folder itself
    names = _class_names(folder / layout.meta_file, layout.names_key, layout.num_classes, layout.description)
    splits = []
    for files in (layout.train_files, (layout.test_file,)):
        parts = [_read_batch(folder / f, layout.label_key, layout.num_classes, layout.description) for f in files]
        splits.append(
            RealDataset(
                name=layout.dataset,
                images=tensor_from_numpy(np.concatenate([p[0] for p in parts]), device),
                labels=tensor_from_numpy(np.concatenate([p[1] for p in parts]), device),
                num_classes=layout.num_classes,
                mean=layout.mean,
                std=layout.std,
                class_names=list(names),
            )
        )
    return splits[0], splits[1]


def load_cifar10(root: str | Path | None, device: str | torch.device = "cpu") -> tuple[RealDataset, RealDataset]:
    """(train, test) of CIFAR-10: uint8 [N, 3, 32, 32] (50000 / 10000), 10 classes from batches.meta."""
    return _load(_CIFAR10, root, device)


def load_cifar100(root: str | Path | None, device: str | torch.device = "cpu") -> tuple[RealDataset, RealDataset]:
    """(train, test) of CIFAR-100: uint8 [N, 3, 32, 32] (50000 / 10000), 100 fine classes from meta."""
    return _load(_CIFAR100, root, device)
