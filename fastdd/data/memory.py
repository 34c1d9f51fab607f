"""Real data sets made from images already in memory: :func:`from_tensors` (image and label tensors) and
:func:`from_dataset` (map-style datasets of (image, label) items). Both return (train, test) as
:func:`fastdd.data.load_dataset` does, ready for ``fastdd.distill(config, data=(train, test))``; nothing is
written to or read from files.

Pixels: uint8 images hold 0..255 and are used as given (not copied); floating images must hold finite values
in [0, 1] and become uint8 by ``round(x * 255)`` (half to even), the 256 levels every fastdd set is held in
(:class:`fastdd.data.RealDataset`). A floating set made as ``u / 255`` from uint8 pixels ``u`` thus gives ``u``
back exactly; finer levels are rounded away. ``mean`` / ``std`` are per channel in [0, 1] pixel units, as
:data:`fastdd.data.NORMALIZATION` gives them for the built-in sets (images normalise as
``(x / 255 - mean) / std``). Classes are ``class_names`` when given, else ``"0"``, ``"1"``, ... up to the
largest label of either split.

``name`` is the set's name: ``config.json``'s ``dataset`` and the synthetic set's ``meta["dataset"]``. The
name of a built-in set brings that set's own settings, as for the set read from files (DSA without flips for
digits, mnist and svhn; IDC's for cifar10 and mnist).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fastdd.checks import finite, list_of, positive_float, shown, text
from fastdd.data.base import RealDataset
from fastdd.data.registry import dataset_name

__all__ = ["from_dataset", "from_tensors"]

DEFAULT_NAME = "custom"
Description = tuple[str, list[float], list[float], list[str] | None]  # name, mean, std, class names (None: indices)


def from_tensors(
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str] | None = None,
    name: str = DEFAULT_NAME,
) -> tuple[RealDataset, RealDataset]:
    """(train, test) RealDatasets of the images [N, C, H, W] (uint8 0..255, or floating 0..1: module docstring)
    and their integer labels [N] (class indices), on the images' device; the test images must have the train
    images' C, H, W. ``mean`` / ``std``: C numbers each, std > 0. ``class_names``: distinct non-empty strings,
    one per class, every label below their number. Each bad argument is a one-line ValueError naming it."""
    described = _description(name, mean, std, class_names)
    train_images = _pixels("train_images", train_images, "[N, C, H, W]")
    test_images = _pixels("test_images", test_images, "[N, C, H, W]")
    if test_images.shape[1:] != train_images.shape[1:]:
        raise ValueError(f"test_images must be [N, {', '.join(map(str, train_images.shape[1:]))}] like train_images, "
                         f"got shape {tuple(test_images.shape)}")
    train_labels = _labels("train_labels", train_labels, len(train_images))
    test_labels = _labels("test_labels", test_labels, len(test_images))
    return _datasets(described, {"train_labels": (train_images, train_labels),
                                 "test_labels": (test_images, test_labels)})


def from_dataset(
    train: Any,
    test: Any,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str] | None = None,
    name: str = DEFAULT_NAME,
) -> tuple[RealDataset, RealDataset]:
    """(train, test) RealDatasets of two map-style datasets (``len(d)`` and ``d[i]`` for i in range(len(d)), such
    as a ``torch.utils.data.Dataset``) whose items are (image, label): an image tensor [C, H, W] (uint8 0..255 or
    floating 0..1, the same shape and dtype in every item) and an integer label (an int, a NumPy integer or a
    one-element integer tensor). Every item is read once, into one uint8 tensor per split on the device of the
    split's first image. ``mean``, ``std``, ``class_names``, ``name``: as for :func:`from_tensors`. A bad item is a
    one-line ValueError naming the split and the index."""
    described = _description(name, mean, std, class_names)
    train_split = _read("train", train, None)
    test_split = _read("test", test, train_split[0].shape[1:])
    return _datasets(described, {"train's labels": train_split, "test's labels": test_split})


def _pixels(name: str, x: Any, shape: str) -> Tensor:
    """``x`` (a tensor of layout ``shape``, every dimension >= 1) as uint8 pixels: uint8 as given, floating values
    in [0, 1] by round(x * 255)."""
    dims = shape.count(",") + 1
    if not isinstance(x, Tensor) or x.dim() != dims or not (x.dtype == torch.uint8 or x.is_floating_point()):
        raise ValueError(f"{name} must be a uint8 (0..255) or floating (0..1) tensor {shape}, got {shown(x)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must hold at least one image of at least one pixel, got {shown(x)}")
    if x.dtype == torch.uint8:
        return x
    low, high = (float(v) for v in torch.aminmax(x))  # NaN propagates into both
    if not 0 <= low <= high <= 1:
        raise ValueError(f"{name} must hold finite values in [0, 1] (floating pixels), got values from {low} to {high}")
    return x.float().mul(255).round_().to(torch.uint8)


def _labels(name: str, y: Any, n: int) -> Tensor:
    """``y`` if it is an integer tensor [n] (bool refused)."""
    integer = isinstance(y, Tensor) and not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)
    if not integer or y.dim() != 1 or len(y) != n:
        raise ValueError(f"{name} must be an integer tensor [{n}] (one class index per image), got {shown(y)}")
    return y


def _read(which: str, dataset: Any, shape: torch.Size | None) -> tuple[Tensor, Tensor]:
    """(uint8 images [N, C, H, W], int64 labels [N]) of the map-style ``dataset`` named ``which``; every image must
    have the dtype and shape of its first, and that shape must be ``shape`` (C, H, W) when given (train's)."""
    if isinstance(dataset, Tensor) or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise ValueError(f"{which} must be a map-style dataset (len() and [i]) of (image, label) items, got "
                         f"{shown(dataset)}")
    count = len(dataset)
    if count == 0:
        raise ValueError(f"{which} must hold at least one (image, label) item, got an empty dataset")
    first, _ = _item(f"{which}[0]", dataset[0])
    if shape is not None and first.shape != shape:
        raise ValueError(f"{which}[0]'s image must be [{', '.join(map(str, shape))}] like train's images, got "
                         f"{shown(first)}")
    images = torch.empty((count, *first.shape), dtype=torch.uint8, device=first.device)
    labels = torch.empty(count, dtype=torch.int64)
    for i in range(count):
        image, labels[i] = _item(f"{which}[{i}]", dataset[i])
        if image.shape != first.shape or image.dtype != first.dtype:
            raise ValueError(f"{which}[{i}]'s image must be a {first.dtype} tensor [{', '.join(map(str, first.shape))}]"
                             f" like {which}[0]'s, got {shown(image)}")
        images[i] = _pixels(f"{which}[{i}]'s image", image, "[C, H, W]")
    return images, labels


def _item(name: str, item: Any) -> tuple[Tensor, int]:
    """(image tensor, integer label) of a dataset's ``item``; the image's dtype, shape and values are checked later."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError(f"{name} must be an (image, label) pair, got {shown(item)}")
    image, label = item
    if not isinstance(image, Tensor):
        raise ValueError(f"{name}'s image must be a tensor [C, H, W] (e.g. transform=ToTensor() for PIL images), "
                         f"got {type(image).__name__}")
    try:
        if isinstance(label, bool) or (isinstance(label, Tensor) and label.is_floating_point()):
            raise TypeError
        return image, operator.index(label)
    except TypeError:
        raise ValueError(f"{name}'s label must be an integer class index, got {shown(label)}") from None


def _description(name: Any, mean: Any, std: Any, class_names: Any) -> Description:
    """(name, mean, std, class_names) checked, before any image is: a data set name, finite means, positive stds,
    distinct non-empty class names or None. Their number against the channels and labels is :func:`_datasets`'."""
    dataset_name("name", name)
    mean = list_of(finite)("mean", mean)
    std = list_of(positive_float)("std", std)
    if class_names is not None:
        names = list_of(text)("class_names", class_names)
        if not names or len(set(names)) < len(names):
            raise ValueError(f"class_names must be distinct names, at least one, got {shown(class_names)}")
        class_names = names
    return name, mean, std, class_names


def _datasets(described: Description, splits: dict[str, tuple[Tensor, Tensor]]) -> tuple[RealDataset, RealDataset]:
    """(train, test) RealDatasets of ``splits``: (uint8 images, integer labels) of train, then test, each keyed by
    the name its labels go by, ``described`` by :func:`_description`; mean and std must have a number per channel,
    and every label must be a class index."""
    name, mean, std, class_names = described
    channels = next(iter(splits.values()))[0].shape[1]
    for statistic, values in (("mean", mean), ("std", std)):
        if len(values) != channels:
            raise ValueError(f"{statistic} must be a list of {channels} numbers (one per channel), got {shown(values)}")
    ranges = {label_name: [int(v) for v in torch.aminmax(labels)] for label_name, (_, labels) in splits.items()}
    names = class_names or [str(c) for c in range(max(high for _, high in ranges.values()) + 1)]
    for label_name, (low, high) in ranges.items():
        if low < 0:
            raise ValueError(f"{label_name} must be class indices >= 0, got {low}")
        if high >= len(names):
            raise ValueError(f"{label_name} must be class indices below {len(names)}, the number of class_names, "
                             f"got {high}")
    train, test = (RealDataset(name=name, images=images, labels=labels.to(images.device, torch.int64),
                               num_classes=len(names), mean=tuple(mean), std=tuple(std), class_names=list(names))
                   for images, labels in splits.values())
    return train, test
