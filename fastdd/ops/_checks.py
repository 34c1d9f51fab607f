"""Argument checks the ops share; each raises a one-line ValueError that names the argument, what it must be and
what it got (the scalar checks are in :mod:`fastdd.checks`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def tensor(name: str, value: Any) -> Tensor:
    """``value`` if it is a tensor."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(value).__name__}")
    return value


def tensor_list(name: str, value: Any) -> Sequence[Tensor]:
    """``value`` if it is a list or tuple (its items are checked by the caller); a lone tensor is refused."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list or tuple of tensors, got {type(value).__name__}")
    return value


def one_device(tensors: dict[str, Tensor]) -> torch.device:
    """The device all of ``tensors`` (by argument name) are on."""
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        got = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
        raise ValueError(f"{', '.join(tensors)} must be on one device, got {got}")
    return devices.pop()


def plain(t: Tensor) -> Tensor:
    """``t`` without its torch.func wrappers, so that its values can be read under transforms (under vmap: all the
    slices at once)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def all_finite(name: str, t: Tensor) -> None:
    """Refuse a tensor holding NaN or infinite values: its minimum and maximum, which NaN propagates into, are
    finite exactly when every value is (one pass, about a seventh of ``isfinite(t).all()``'s time)."""
    t = plain(t)
    if t.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()):
        raise ValueError(f"{name} must hold finite values, got NaN or infinity")


def labels_in_range(name: str, labels: Tensor, classes: int) -> None:
    """Refuse integer ``labels`` outside [0, classes)."""
    low, high = (int(v) for v in torch.aminmax(plain(labels)))
    if low < 0 or high >= classes:
        raise ValueError(f"{name} must lie in [0, K) = [0, {classes}), got values in [{low}, {high}]")
