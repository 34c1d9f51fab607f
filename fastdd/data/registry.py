"""Data sets by name: :func:`load_dataset`, the names in :data:`DATASETS`, default roots and
normalisation constants.

Names are case-insensitive and ``_`` may stand for ``-`` (``Fashion_MNIST`` = ``fashion-mnist``).
``root`` is ignored for ``digits`` (bundled with scikit-learn); ``fashion-mnist`` falls back to
:data:`DEFAULT_ROOTS`; every other set needs a root (a DatasetError says what to put there).
``image_size`` resizes only ``imagefolder``; the fixed-size sets accept only their own size.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch

from fastdd.checks import shown
from fastdd.data.base import RealDataset
from fastdd.data.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, load_cifar10, load_cifar100
from fastdd.data.digits import DIGITS_MEAN, DIGITS_STD, load_digits
from fastdd.data.folder import IMAGENET_MEAN, IMAGENET_STD
from fastdd.data.idx import (
    FASHION_MNIST_DEFAULT_ROOT,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    MNIST_MEAN,
    MNIST_STD,
    load_fashion_mnist,
    load_mnist,
)
from fastdd.data.imagefolder import load_imagefolder
from fastdd.data.svhn import SVHN_MEAN, SVHN_STD, load_svhn

__all__ = ["DATASETS", "DEFAULT_ROOTS", "NORMALIZATION", "dataset_name", "load_dataset"]

DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn", "imagefolder")
DEFAULT_ROOTS: dict[str, Path] = {"fashion-mnist": FASHION_MNIST_DEFAULT_ROOT}
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": (DIGITS_MEAN, DIGITS_STD),
    "mnist": (MNIST_MEAN, MNIST_STD),
    "fashion-mnist": (FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "svhn": (SVHN_MEAN, SVHN_STD),
    "imagefolder": (IMAGENET_MEAN, IMAGENET_STD),
}  # (mean, std) per channel, [0, 1] pixel units

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_NATIVE_SIZE = {"digits": 8, "mnist": 28, "fashion-mnist": 28, "cifar10": 32, "cifar100": 32, "svhn": 32}
_FIXED_LOADERS: dict[str, Callable[[Path | str | None, str | torch.device], tuple[RealDataset, RealDataset]]] = {
    "digits": lambda root, device: load_digits(device),
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "svhn": load_svhn,
}


def dataset_name(name: str, value: Any) -> str:
    """``value`` if it can name a data set: letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit
    (it becomes part of file names: a run directory's default, cached proxies). Every name in :data:`DATASETS` is
    one; a set held in memory (:mod:`fastdd.data.memory`) may take any other."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"{name} must be a data set name (letters, digits, '.', '_', '-', starting with a letter or "
                         f"digit), got {shown(value)}")
    return value


def load_dataset(
    name: str,
    root: str | Path | None = None,
    device: str | torch.device = "cpu",
    image_size: int | tuple[int, int] | None = None,
) -> tuple[RealDataset, RealDataset]:
    """(train, test) of data set ``name`` (one of :data:`DATASETS`), uint8 images on ``device``."""
    key = name.lower().replace("_", "-") if isinstance(name, str) else None
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from None
    if key == "imagefolder":
        return load_imagefolder(root, device, image_size)
    native = _NATIVE_SIZE[key]
    if image_size is not None and image_size not in (native, (native, native), [native, native]):
        raise ValueError(
            f"image_size={image_size!r}: {key} images are {native}x{native} and are not resized; "
            "image_size applies to imagefolder only"
        )
    return _FIXED_LOADERS[key](root, device)
