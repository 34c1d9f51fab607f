"""The in-memory real data set every distiller and evaluator reads: :class:`RealDataset`.

The whole set lives on one device as ``uint8 [N, C, H, W]`` (a quarter of float32's memory) with a
per-class index, so drawing a class batch is one index op. Pixels are converted to float32 and
normalised (``(x / 255 - mean) / std`` per channel) only when images are handed out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdd.checks import shown
from fastdd.data.zca import ZCA

__all__ = ["ClassBatches", "DatasetError", "RealDataset", "data_pair", "require_root", "tensor_from_numpy"]


class DatasetError(Exception):
    """A data set's files are missing or corrupt; the message names the file, what was expected and
    where to get or put the files."""


@dataclass(eq=False)
class RealDataset:
    """A labelled image set held on one device.

    ``images``: uint8 [N, C, H, W]; ``labels``: int64 [N] in ``[0, num_classes)``, same device.
    ``mean`` / ``std``: per channel, in [0, 1] pixel units. ``whitening``: a ZCA transform applied after
    the normalisation (:mod:`fastdd.data.zca`), or None. ``class_indices[c]``: int64 indices
    (on the images' device, ascending) of the images of class ``c``; derived, never passed in.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]
    whitening: ZCA | None = field(default=None, repr=False)
    class_indices: list[torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"{self.name}: images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}"
            )
        n, c = self.images.shape[:2]
        if self.labels.dtype != torch.int64 or tuple(self.labels.shape) != (n,):
            raise ValueError(
                f"{self.name}: labels must be int64 [{n}], got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if self.labels.device != self.images.device:
            raise ValueError(f"{self.name}: labels on {self.labels.device}, images on {self.images.device}")
        if self.num_classes < 1 or len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{self.name}: num_classes={self.num_classes} must be >= 1 and match "
                f"len(class_names)={len(self.class_names)}"
            )
        if len(self.mean) != c or len(self.std) != c or min(self.std) <= 0:
            raise ValueError(f"{self.name}: mean {self.mean} and std {self.std} need {c} values, std > 0")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes):
            raise ValueError(f"{self.name}: labels must lie in [0, {self.num_classes})")
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        order = torch.argsort(self.labels, stable=True)
        counts = torch.bincount(self.labels, minlength=self.num_classes).tolist()
        self.class_indices = list(torch.split(order, counts))
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32, device=self.device).view(c, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32, device=self.device).view(c, 1, 1)

    def __repr__(self) -> str:
        return (
            f"RealDataset(name={self.name!r}, n={len(self)}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes}, device={self.device})"
        )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def height(self) -> int:
        return self.images.shape[2]

    @property
    def width(self) -> int:
        return self.images.shape[3]

    @property
    def class_sizes(self) -> list[int]:
        """Images per class, by class index."""
        return [len(members) for members in self.class_indices]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return (self.channels, self.height, self.width)

    def _stats_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device == self._mean_t.device:
            return self._mean_t, self._std_t
        return self._mean_t.to(device), self._std_t.to(device)

    def _check_channels(self, x: torch.Tensor) -> None:
        if x.dim() < 3 or x.shape[-3] != self.channels:
            raise ValueError(f"x must be [..., {self.channels}, H, W] for {self.name}, got {tuple(x.shape)}")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (0..255) or float pixels in [0, 1], [..., C, H, W] -> float32 normalised (then whitened
        when the set has ``whitening``)."""
        self._check_channels(x)
        mean, std = self._stats_on(x.device)
        x = x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)
        x = (x - mean) / std
        return x if self.whitening is None else self.whitening.apply(x)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (and whitened) float [..., C, H, W] -> pixels in [0, 1] units (not clamped; clamp for display)."""
        self._check_channels(x)
        mean, std = self._stats_on(x.device)
        if self.whitening is not None:
            x = self.whitening.invert(x)
        return x * std + mean

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        """Normalised float32 images [len(idx), C, H, W] at int64 indices ``idx`` (any device)."""
        return self.normalize(self.images[idx.to(self.device)])

    def sample_indices(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """Indices of ``n`` distinct random images of class ``c`` (all of them, shuffled, if the class
        has fewer): the first ``n`` of a randperm of the class index. ``generator`` must be a CPU
        generator; it is the only source of randomness. Returns int64 [min(n, size)] on the data's device."""
        if not 0 <= c < self.num_classes:
            raise ValueError(f"class c={c} out of range [0, {self.num_classes}) for {self.name}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        members = self.class_indices[c]
        perm = torch.randperm(members.numel(), generator=generator, device="cpu")[:n]
        return members[perm.to(self.device)]

    def sample(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` distinct random images of class ``c``, normalised float32 [min(n, size), C, H, W]."""
        return self.get(self.sample_indices(c, n, generator))

    def sample_classes(self, n: int, generator: torch.Generator) -> ClassBatches:
        """One batch of ``n`` distinct random images per class, drawn now (the same draws as ``sample`` of every
        class in turn) and read when indexed: it holds their indices, not the images."""
        return ClassBatches(self, [self.sample_indices(c, n, generator) for c in range(self.num_classes)])

    def to(self, device: str | torch.device) -> RealDataset:
        """A copy of the set with images and labels on ``device``."""
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device))


def data_pair(name: str, value: Any) -> tuple[RealDataset, RealDataset]:
    """``value`` as (train, test) if it is a pair of splits of one data set, as :func:`fastdd.data.load_dataset` and
    :func:`fastdd.data.from_tensors` make them: two RealDatasets, each holding images, alike in name, classes,
    image shape and normalisation, neither whitened."""
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(isinstance(s, RealDataset) for s in value):
        raise ValueError(f"{name} must be a (train, test) pair of RealDatasets, as fastdd.data.from_tensors returns, "
                         f"got {shown(value)}")
    train, test = value
    differing = [field for field in ("name", "class_names", "image_shape", "mean", "std")
                 if getattr(train, field) != getattr(test, field)]
    if differing:
        raise ValueError(f"{name}: train and test differ in {', '.join(differing)}; they must split one data set")
    if train.whitening is not None or test.whitening is not None:
        raise ValueError(f"{name}: the sets are whitened already; pass them unwhitened (zca (--zca) whitens them)")
    if not len(train) or not len(test):
        raise ValueError(f"{name}: train and test must hold at least one image each, got {len(train)} and {len(test)}")
    return train, test


def tensor_from_numpy(array: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """A torch tensor of ``array`` on ``device`` (copies read-only buffers, e.g. from np.frombuffer)."""
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, order="C")
    return torch.from_numpy(array).to(device)


def require_root(root: str | Path | None, dataset: str, layout: str) -> Path:
    """``root`` as a Path, or a DatasetError that says which files to put where (``layout``)."""
    if root is None:
        raise DatasetError(
            f"{dataset}: no data root given. Put {layout} in a folder and pass it as --data-root "
            f"(root= in load_dataset)."
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(f"{dataset}: data root {path} is not a folder. Expected {layout} in it.")
    return path


class ClassBatches(Sequence[torch.Tensor]):
    """Drawn real batches, one per class: ``batches[c]`` reads class ``c``'s images, normalised float32
    [n, C, H, W], each time it is indexed. A step over many classes then holds one class's images at a time
    instead of all of them."""

    def __init__(self, data: RealDataset, indices: list[torch.Tensor]) -> None:
        self.data = data
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, c: int) -> torch.Tensor:  # type: ignore[override]  # by class, no slices
        return self.data.get(self.indices[c])
