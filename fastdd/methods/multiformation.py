"""Multi-formation (IDC): one stored image holds ``factor x factor`` training images.

A stored image of size H x W is cut into a ``factor x factor`` grid of patches; patch row ``i`` spans
rows ``[i*H // factor, (i+1)*H // factor)`` (columns likewise), so sides that ``factor`` does not
divide give patches that differ by one pixel instead of padding. :func:`decode` upsamples every
patch (bilinear, ``align_corners=False``) back to H x W; :func:`mix_init` fills every patch with a
real image of the class shrunk to the patch (nearest, as the original IDC code's ``F.interpolate``
default). Both use the same grid, so decoding a 'mix' initialisation gives the real images back at
reduced resolution.

Independent of any distiller: the evaluation decodes stored sets with :func:`decode`, and other
methods built on multi-formation (UDD) import it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdd.checks import positive_int
from fastdd.data import RealDataset

__all__ = ["check_factor", "decode", "decoded_to_stored", "mix_images", "mix_init", "patch_bounds"]


def check_factor(factor: int, height: int, width: int) -> None:
    """ValueError unless ``factor`` is an integer in [1, min(height, width)]."""
    positive_int("factor", factor)
    if factor > min(height, width):
        raise ValueError(f"factor must be at most the image side {min(height, width)}, got {factor}")


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [N, C, H, W], got {shape}")


def patch_bounds(size: int, factor: int) -> list[tuple[int, int]]:
    """(start, end) of the ``factor`` patches along a side of ``size`` pixels."""
    return [(i * size // factor, (i + 1) * size // factor) for i in range(factor)]


def decode(images: Tensor, labels: Tensor, factor: int) -> tuple[Tensor, Tensor]:
    """Decode stored images into training images.

    images [N, C, H, W] float, labels [N] -> (images [N * factor², C, H, W], labels [N * factor²]).
    Stored image n yields rows ``n * factor² .. (n+1) * factor² - 1`` (its patches in row-major
    order), so a set stored class by class stays class by class. Differentiable w.r.t. ``images``;
    ``factor`` 1 returns the inputs unchanged.
    """
    _check_images(images)
    if not isinstance(labels, Tensor) or labels.shape != images.shape[:1]:
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a tensor [N={images.shape[0]}], got {got}")
    n, c, h, w = images.shape
    check_factor(factor, h, w)
    if factor == 1:
        return images, labels
    patches = [
        F.interpolate(images[:, :, top:bottom, left:right], size=(h, w), mode="bilinear", align_corners=False)
        for top, bottom in patch_bounds(h, factor)
        for left, right in patch_bounds(w, factor)
    ]
    decoded = torch.stack(patches, dim=1).reshape(n * factor**2, c, h, w)
    return decoded, labels.repeat_interleave(factor**2)


def mix_images(real: Tensor, factor: int) -> Tensor:
    """Grids of shrunken images: real [N * factor², C, H, W] -> [N, C, H, W].

    Patch k (row-major) of output image n is ``real[n * factor² + k]`` shrunk (nearest) to the patch.
    """
    _check_images(real)
    total, c, h, w = real.shape
    check_factor(factor, h, w)
    if total % factor**2:
        raise ValueError(f"real must hold a multiple of factor² = {factor**2} images, got {total}")
    groups = real.reshape(total // factor**2, factor**2, c, h, w)
    out = torch.empty(groups.shape[0], c, h, w, dtype=real.dtype, device=real.device)
    cells = [(rows, cols) for rows in patch_bounds(h, factor) for cols in patch_bounds(w, factor)]
    for k, ((top, bottom), (left, right)) in enumerate(cells):
        out[:, :, top:bottom, left:right] = F.interpolate(groups[:, k], size=(bottom - top, right - left),
                                                          mode="nearest")
    return out


def decoded_to_stored(masks: Tensor, factor: int, height: int, width: int) -> Tensor:
    """Masks of decoded images [N * factor², 1, h, w] -> masks of the stored images [N, 1, height, width]: each
    decoded image's mask (nearest, image resolution) shrunk into its patch, as :func:`mix_images` lays it out
    (the public map from the training images a plug-in sees to the stored ones)."""
    return mix_images(F.interpolate(masks.float(), size=(height, width), mode="nearest"), factor)


def mix_init(train: RealDataset, ipc: int, factor: int, generator: torch.Generator) -> Tensor:
    """IDC's 'mix' initialisation: [num_classes * ipc, C, H, W], class by class (normalised space).

    Each stored image is a ``factor x factor`` grid of distinct random real images of its class
    (:func:`mix_images`), ``ipc * factor²`` drawn per class from ``generator``; a class with fewer
    images reuses them in the drawn order.
    """
    positive_int("ipc", ipc)
    check_factor(factor, train.height, train.width)
    need = ipc * factor**2
    grids = []
    for c in range(train.num_classes):
        real = train.sample(c, need, generator)
        if len(real) == 0:
            raise ValueError(f"class {c} of {train.name} has no images to initialise from")
        if len(real) < need:
            real = real[torch.arange(need, device=real.device) % len(real)]
        grids.append(mix_images(real, factor))
    return torch.cat(grids)
