"""The synthetic-set container: the one file a user keeps from a distillation, and its PNG grid.

File format (safetensors, written atomically):

* tensors ``images`` float32 [N, C, H, W] (normalised space), ``labels`` int64 [N], and
  ``soft_labels`` float32 [N, K] when present;
* header metadata key ``"fastdd"``: a JSON string ``{"format": 1, "fastdd_version": ..., "lr": float
  | null, "meta": {...}, "sha256": ...}``. ``meta`` is the caller's dict (data set, mean, std, ipc,
  method, plugins, hyper-parameters, seed, ...); ``lr`` is the learned learning rate of MTT-style
  methods; ``fastdd_version`` is the version that wrote the file; ``sha256`` the digest of the tensors'
  bytes (in the order images, labels, soft_labels), checked on load so that an altered file is
  reported, not evaluated. ``meta["factor"]`` > 1 marks a
  multi-formation (IDC) set: its images are stored encoded, and networks train on their decoding
  (``fastdd.evaluation.training_data``).

Any safetensors reader can open the tensors; ``SyntheticSet.load`` restores everything. A set holds
finite numbers only: images or soft labels with NaN or inf are refused when the set is made or read.

Every value read back is checked: the header's ``format`` (1), ``lr``, ``meta`` (an object) and, when present,
``fastdd_version`` and ``sha256`` (files of other tools may lack them), and each key of ``meta`` that fastdd
reads (:data:`META_CHECKS`: data set, mean / std per channel, classes, IPC, method, plug-ins, hyper-parameters,
seed, version, ZCA, factor) when present; other keys are the caller's. A value of the wrong type is a
DamagedFileError naming the file and the field when read, a ValueError when the set is made or saved.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from fastdd.checks import (
    finite,
    integer,
    list_of,
    one_of,
    optional,
    positive_float,
    positive_int,
    seed_value,
    shown,
    text,
)
from fastdd.errors import DamagedFileError
from fastdd.io import atomic_write_bytes
from fastdd.version import __version__

METADATA_KEY = "fastdd"
FORMAT_VERSION = 1
GRID_MIN_SIDE = 32  # images smaller than this are upscaled (nearest) in the PNG grid
GRID_PADDING = 2  # pixels between tiles (white)
SHA256_HEX = frozenset("0123456789abcdef")


def _mapping(name: str, value: Any) -> dict[str, Any]:
    """``value`` if it is a dict with string keys (a JSON object)."""
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise ValueError(f"{name} must be a JSON object (a dict with string keys), got {type(value).__name__}")
    return value


# meta key -> check(name, value) of its value where present (the keys fastdd reads; mean and std are also
# checked against the images' channels, num_classes against the labels and class_names)
META_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "dataset": text,
    "mean": list_of(finite),
    "std": list_of(positive_float),
    "num_classes": positive_int,
    "class_names": list_of(text),
    "ipc": positive_int,
    "method": text,
    "plugins": list_of(text),
    "hparams": _mapping,
    "seed": optional(seed_value),
    "fastdd_version": text,
    "zca": optional(positive_float),
    "factor": positive_int,
}


@dataclass
class SyntheticSet:
    """A distilled data set.

    images: float [N, C, H, W] in the normalised space (``(x - mean) / std``, x in [0, 1]).
    labels: int64 [N], class of each image.
    meta: JSON-able dict describing how the set was made; ``save_grid`` needs ``meta["mean"]`` and
        ``meta["std"]`` (per-channel, [0, 1] pixel units).
    lr: learned evaluation learning rate (MTT) or None.
    soft_labels: float [N, K] or None.
    """

    images: torch.Tensor
    labels: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None
    soft_labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dim() != 4 or not self.images.is_floating_point():
            raise ValueError(f"images must be a float tensor [N, C, H, W], got {_describe(self.images)}")
        if not isinstance(self.labels, torch.Tensor) or self.labels.dim() != 1 or self.labels.dtype != torch.int64:
            raise ValueError(f"labels must be an int64 tensor [N], got {_describe(self.labels)}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"labels has {len(self.labels)} entries but images has {len(self.images)} images")
        if len(self.labels) and int(self.labels.min()) < 0:
            raise ValueError(f"labels must be non-negative class indices, got min {int(self.labels.min())}")
        _check_finite("images", self.images)
        self.check_meta()
        if self.lr is not None:
            if isinstance(self.lr, torch.Tensor) and self.lr.numel() == 1:
                self.lr = float(self.lr.detach())
            self.lr = finite("lr (a learned learning rate, or None)", self.lr)
        if self.soft_labels is not None:
            s = self.soft_labels
            shape_ok = isinstance(s, torch.Tensor) and s.dim() == 2 and len(s) == len(self.images)
            if not shape_ok or not s.is_floating_point():
                raise ValueError(
                    f"soft_labels must be a float tensor [N={len(self.images)}, K] or None, got {_describe(s)}"
                )
            _check_finite("soft_labels", s)

    def check_meta(self) -> None:
        """ValueError naming the first key of ``meta`` whose value fastdd cannot read (:data:`META_CHECKS`), or
        that disagrees with the tensors (a mean or std per channel, labels below ``num_classes``, one class name
        per class)."""
        meta = _mapping("meta", self.meta)
        for key, check in META_CHECKS.items():
            if key in meta:
                check(f"meta[{key!r}]", meta[key])
        channels = self.images.shape[1]
        for key in ("mean", "std"):
            if key in meta and len(meta[key]) != channels:
                raise ValueError(f"meta[{key!r}] must hold one number per channel ({channels}), got {len(meta[key])}")
        classes = meta.get("num_classes")
        if classes is not None and len(self.labels) and int(self.labels.max()) >= classes:
            raise ValueError(f"meta['num_classes'] is {classes} but labels reach class {int(self.labels.max())}")
        if classes is not None and "class_names" in meta and len(meta["class_names"]) != classes:
            raise ValueError(f"meta['class_names'] must hold meta['num_classes'] = {classes} names, got "
                             f"{len(meta['class_names'])}")

    @property
    def images_per_class(self) -> int:
        """Images per class (IPC); for an unbalanced set, the largest class count (0 when empty)."""
        if len(self.labels) == 0:
            return 0
        return int(torch.bincount(self.labels.cpu()).max())

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the set to ``path`` (safetensors, atomic). Tensors are stored float32/int64 on CPU. ``meta`` is
        checked again (:meth:`check_meta`: it may have changed since the set was made)."""
        self.check_meta()
        tensors = {
            "images": self.images.detach().to("cpu", torch.float32).contiguous(),
            "labels": self.labels.detach().cpu().contiguous(),
        }
        if self.soft_labels is not None:
            tensors["soft_labels"] = self.soft_labels.detach().to("cpu", torch.float32).contiguous()
        header = {"format": FORMAT_VERSION, "fastdd_version": __version__, "lr": self.lr, "meta": self.meta,
                  "sha256": _digest(tensors)}
        try:
            header_json = json.dumps(header, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"meta must be JSON-serialisable (finite numbers, str, list, dict): {e}") from e
        atomic_write_bytes(path, safetensors_save(tensors, metadata={METADATA_KEY: header_json}))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SyntheticSet:
        """Read a set written by :meth:`save` (tensors on CPU).

        Raises FileNotFoundError when ``path`` does not exist and DamagedFileError (a ValueError) when it
        is not a whole fastdd synthetic set (not safetensors, no ``fastdd`` metadata, a header field missing
        or of the wrong type, missing or malformed tensors, tensors that do not match the stored digest, NaN
        or inf); its one line names the file and the field.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"synthetic set file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as e:  # safetensors raises its own error type for a corrupt header
            raise DamagedFileError(f"{path}: damaged synthetic set, not a safetensors file ({e})") from e
        if METADATA_KEY not in metadata:
            raise DamagedFileError(f"{path} is not a fastdd synthetic set: its header has no {METADATA_KEY!r} metadata")
        try:
            meta, lr, digest = _read_header(metadata[METADATA_KEY])
        except ValueError as e:
            raise DamagedFileError(f"{path}: damaged synthetic set, {METADATA_KEY!r} metadata: {e}") from None
        missing = [key for key in ("images", "labels") if key not in tensors]
        if missing:
            raise DamagedFileError(f"{path} is not a complete fastdd synthetic set: missing tensor(s) "
                                   f"{', '.join(missing)}")
        if digest is not None and digest != _digest(tensors):
            raise DamagedFileError(f"{path}: damaged synthetic set, its tensors do not match the digest stored with "
                                   "them")
        try:
            return cls(tensors["images"], tensors["labels"], meta, lr, tensors.get("soft_labels"))
        except ValueError as e:
            raise DamagedFileError(f"{path}: damaged synthetic set, {e}") from None

    def save_grid(self, path: str | os.PathLike[str], outline: torch.Tensor | None = None) -> None:
        """Write a PNG grid of the images to ``path`` (atomic).

        One row per class present (ascending label), one column per image of the class (columns =
        largest class count), tiles separated by white padding. Images are denormalised with
        ``meta["mean"]``/``meta["std"]``, clamped to [0, 1], and upscaled (nearest, integer factor)
        to at least 32 px per side. 1-channel sets give a greyscale PNG, 3-channel sets RGB.
        ``outline`` (masks [N, 1, H, W], 1 inside a region): the regions' borders drawn in red (RGB PNG).
        """
        n, c, h, w = self.images.shape
        if c not in (1, 3):
            raise ValueError(f"save_grid needs 1- or 3-channel images, got {c} channels")
        if n == 0:
            raise ValueError("save_grid: the synthetic set has no images")
        mean, std = (_channel_stats(self.meta, key, c) for key in ("mean", "std"))
        x = self.images.detach().to("cpu", torch.float32) * std.view(1, c, 1, 1) + mean.view(1, c, 1, 1)
        x = x.clamp(0.0, 1.0)
        scale = max(1, math.ceil(GRID_MIN_SIDE / min(h, w)))
        if scale > 1:
            x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        if outline is not None:
            x = _draw_outline(x, outline, scale)
            c = 3
        th, tw = h * scale, w * scale
        labels = self.labels.cpu()
        classes = torch.unique(labels).tolist()
        cols = self.images_per_class
        p = GRID_PADDING
        grid = torch.ones(c, p + len(classes) * (th + p), p + cols * (tw + p))
        for row, cls_ in enumerate(classes):
            for col, i in enumerate(torch.nonzero(labels == cls_).flatten().tolist()):
                top, left = p + row * (th + p), p + col * (tw + p)
                grid[:, top : top + th, left : left + tw] = x[i]
        pixels = (grid * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
        image = Image.fromarray(pixels[:, :, 0] if c == 1 else pixels)  # uint8 HxW -> "L", HxWx3 -> "RGB"
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        atomic_write_bytes(path, buffer.getvalue())


def _read_header(raw: str) -> tuple[dict[str, Any], float | None, str | None]:
    """(meta, lr, digest) of a set's ``fastdd`` metadata; ValueError naming the field that is missing or of the
    wrong type (``meta``'s own keys are checked by :meth:`SyntheticSet.check_meta`)."""
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"not JSON ({e})") from None
    header = _mapping("the header", header)
    missing = [key for key in ("format", "lr", "meta") if key not in header]
    if missing:
        raise ValueError(f"the header lacks {', '.join(missing)}")
    one_of("format", integer("format", header["format"]), (FORMAT_VERSION,))
    if "fastdd_version" in header:
        text("fastdd_version", header["fastdd_version"])
    lr = optional(finite)("lr", header["lr"])
    digest = header.get("sha256")
    if digest is not None and (not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= SHA256_HEX):
        raise ValueError(f"sha256 must be 64 hexadecimal digits (the tensors' digest), got {shown(digest)}")
    return _mapping("meta", header["meta"]), lr, digest


def _draw_outline(x: torch.Tensor, masks: torch.Tensor, scale: int) -> torch.Tensor:
    """RGB copies of x [N, C, H', W'] (upscaled by ``scale``) with the border pixels of masks [N, 1, H, W]
    painted red; a region touching the image edge is closed along it."""
    want = [x.shape[0], 1, x.shape[2] // scale, x.shape[3] // scale]
    if list(masks.shape) != want:
        raise ValueError(f"outline must have shape [N, 1, H, W] = {want}, got {list(masks.shape)}")
    inside = (masks.detach().to("cpu", torch.float32) > 0.5).float()
    inside = inside.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    outside_near = F.max_pool2d(F.pad(1 - inside, (1, 1, 1, 1), value=1.0), 3, stride=1)
    border = (inside * outside_near) > 0
    rgb = x.expand(-1, 3, -1, -1).clone()
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand_as(rgb)
    return torch.where(border.expand_as(rgb), red, rgb)


def _channel_stats(meta: dict[str, Any], key: str, channels: int) -> torch.Tensor:
    value = meta.get(key)
    ok = isinstance(value, (list, tuple)) and len(value) == channels
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok:
        raise ValueError(f"save_grid needs meta[{key!r}] as a list of {channels} per-channel numbers, got {value!r}")
    return torch.tensor([float(v) for v in value])


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' bytes, in the order images, labels, soft_labels."""
    h = hashlib.sha256()
    for key in ("images", "labels", "soft_labels"):
        if key in tensors:
            h.update(key.encode())
            h.update(tensors[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def _check_finite(name: str, x: torch.Tensor) -> None:
    bad = int((~torch.isfinite(x.detach())).sum())
    if bad:
        raise ValueError(f"{name} hold {bad} NaN or infinite value(s); a synthetic set must be finite")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
