"""UDD's underutilized regions and its region-masked category-wise contrastive term (docs/design.md section 3; our
definitions). The plug-in that uses them during distillation is :mod:`fastdd.methods.udd`.

Responses. A network with a ``feature_map(x)`` method (ConvNet: its last block's activations before the
pooling, 8 x 8 for Fashion-MNIST and CIFAR) gives every image a response map [1, h, w]: the channel mean
of the absolute activations. Its ``h x w`` positions are the *cells*, each covering a patch of the image.
A cell of a synthetic image is underutilized when its response lies strictly below the ``quantile``-th
quantile of the cells of real reference images, mapped the same way by the same network
(:func:`underutilized`): at the first mining a set initialised from real images has about that share
mined, and the share falls as synthesis puts information into the idle cells. Masks are float
[N, 1, h, w], 1 on underutilized cells.

- Response policy (:func:`response_masks`): the responses of a proxy network trained briefly on real
  data (:func:`proxy_network`, cached on disk).
- Jitter policy (:func:`jitter_masks`): the responses of the network at hand to the image and to
  ``jitters`` copies shifted by random whole pixels (zero fill), each shifted back onto the image's grid
  at image resolution; a cell counts by its largest response over these views (the reference images go
  through the same shifts). Content that lights up at some position is not underutilized: cells that are
  low only because of where they sit are not marked.

Contrastive term (:func:`region_contrastive`): ``masked_feature_contrastive`` of the synthetic feature
maps restricted to the masks, against class prototypes from real feature maps of the same network
(:func:`class_prototypes`: mean over a class's real images of the globally average-pooled map).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdd.augment import DSA, dsa_strategy_for
from fastdd.data import RealDataset
from fastdd.methods.multiformation import patch_bounds
from fastdd.io import atomic_torch_save
from fastdd.models import get_network
from fastdd.ops import masked_feature_contrastive
from fastdd.train import train_epoch

PROXY_IMAGES = 10_000  # random real training images the proxy sees
PROXY_EPOCHS = 1
PROXY_LR, PROXY_MOMENTUM, PROXY_BATCH = 0.01, 0.9, 256


def feature_map(net: nn.Module, x: Tensor) -> Tensor:
    """``net.feature_map(x)``: x [N, C, H, W] -> [N, C', h, w]; ValueError for a network without one."""
    method = getattr(net, "feature_map", None)
    if not callable(method):
        raise ValueError(f"UDD needs a network with a feature_map(x) method (ConvNet, ResNet18), "
                         f"got {type(net).__name__}")
    out = method(x)
    if out.dim() != 4:
        raise ValueError(f"{type(net).__name__}.feature_map must return [N, C, h, w], got shape {tuple(out.shape)}")
    return out


def response(net: nn.Module, x: Tensor) -> Tensor:
    """Response maps [N, 1, h, w]: the channel mean of |feature_map(x)|."""
    return feature_map(net, x).abs().mean(1, keepdim=True)


def _check_quantile(quantile: float) -> None:
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0 < quantile < 1:
        raise ValueError(f"quantile must be a number in (0, 1), got {quantile!r}")


def underutilized(cells: Tensor, reference: Tensor, quantile: float) -> Tensor:
    """Float mask [N, 1, h, w]: 1 where a cell of ``cells`` [N, 1, h, w] is strictly below the ``quantile``-th
    quantile of all the cells of ``reference`` [R, 1, h', w'] (linear interpolation, as ``torch.quantile``)."""
    _check_quantile(quantile)
    if reference.numel() == 0:
        raise ValueError("reference: no reference cells to take the quantile of")
    threshold = torch.quantile(reference.flatten().float(), quantile)
    return (cells < threshold).to(cells.dtype)


@torch.no_grad()
def response_masks(net: nn.Module, x: Tensor, reference: Tensor, quantile: float) -> Tensor:
    """Underutilized cells [N, 1, h, w] of images x [N, C, H, W] by ``net``'s responses, against real
    reference images [R, C, H, W] (response policy)."""
    return underutilized(response(net, x), response(net, reference), quantile)


def shift(x: Tensor, dy: int, dx: int) -> Tensor:
    """x [..., H, W] moved by ``dy`` rows and ``dx`` columns (down and right when positive), zero fill."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = \
        x[..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
    return out


@torch.no_grad()
def jitter_responses(net: nn.Module, x: Tensor, jitters: int, max_shift: int, generator: torch.Generator) -> Tensor:
    """Cells [N, 1, h, w] of x [N, C, H, W]: the largest response over the plain view and ``jitters`` shifted ones.

    Each shift (dy, dx) is drawn uniformly from [-max_shift, max_shift]² (CPU ``generator``); the response
    maps are upsampled (bilinear) to H x W and shifted back, their elementwise maximum is averaged over
    each cell.
    """
    if isinstance(jitters, bool) or not isinstance(jitters, int) or jitters < 1:
        raise ValueError(f"jitters must be an integer >= 1, got {jitters!r}")
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 1:
        raise ValueError(f"max_shift must be an integer >= 1, got {max_shift!r}")
    height, width = x.shape[-2:]
    plain = response(net, x)
    peak = F.interpolate(plain, size=(height, width), mode="bilinear", align_corners=False)
    for dy, dx in torch.randint(-max_shift, max_shift + 1, (jitters, 2), generator=generator).tolist():
        moved = response(net, shift(x, dy, dx))
        moved = F.interpolate(moved, size=(height, width), mode="bilinear", align_corners=False)
        peak = torch.maximum(peak, shift(moved, -dy, -dx))
    return F.adaptive_avg_pool2d(peak, plain.shape[-2:])


@torch.no_grad()
def jitter_masks(net: nn.Module, x: Tensor, reference: Tensor, quantile: float, jitters: int, max_shift: int,
                 generator: torch.Generator) -> Tensor:
    """Underutilized cells [N, 1, h, w] of x [N, C, H, W] under random shifts (jitter policy), against real
    reference images [R, C, H, W] under the same shifts (:func:`jitter_responses`)."""
    cells = jitter_responses(net, torch.cat([x, reference]), jitters, max_shift, generator)
    return underutilized(cells[: len(x)], cells[len(x) :], quantile)


def default_max_shift(height: int, width: int) -> int:
    """Jitter range: an eighth of the shorter side, at least 1 pixel (4 px for 28 and 32 px images)."""
    return max(1, min(height, width) // 8)


@torch.no_grad()
def class_prototypes(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Class means of the average-pooled real feature maps.

    features [N, C, h, w], labels [N] in [0, num_classes) -> (prototypes [num_classes, C], present
    [num_classes] bool). A class without images has a zero row and ``present`` False.
    """
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32  # bfloat16 real passes: float32
    pooled = features.to(dtype).mean((2, 3))
    sums = pooled.new_zeros(num_classes, pooled.shape[1]).index_add_(0, labels, pooled)
    counts = torch.bincount(labels, minlength=num_classes)
    return sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype), counts > 0


def region_contrastive(features: Tensor, masks: Tensor, labels: Tensor, prototypes: Tensor, present: Tensor,
                       tau: float) -> Tensor | None:
    """UDD's contrastive loss of synthetic feature maps over their underutilized regions.

    features [N, C, h, w] (differentiable), masks [N, 1, h, w], labels [N], prototypes [K, C] and present
    [K] from :func:`class_prototypes`. Classes without real images are left out: their prototypes are not
    among the logits and their synthetic images add nothing; ``None`` when no image is left. An image whose
    mask is empty pools to zero and contributes ``log K`` with no gradient.
    """
    if not bool(present.all()):
        keep = present[labels]
        if not bool(keep.any()):
            return None
        new_index = torch.cumsum(present.long(), 0) - 1
        features, masks, labels = features[keep], masks[keep], new_index[labels[keep]]
        prototypes = prototypes[present]
    return masked_feature_contrastive(features, masks.detach().to(features.dtype), labels,
                                      prototypes.to(features.dtype), tau)


def decoded_to_stored(masks: Tensor, factor: int, height: int, width: int) -> Tensor:
    """Masks of decoded images [N * factor², 1, h, w] -> masks of the stored images [N, 1, H, W]: each
    decoded image's mask (nearest, image resolution) shrunk into its patch, as multi-formation laid it out."""
    full = F.interpolate(masks.float(), size=(height, width), mode="nearest")
    if factor == 1:
        return full
    n = masks.shape[0] // factor**2
    full = full.view(n, factor**2, 1, height, width)
    out = full.new_empty(n, 1, height, width)
    cells = [(rows, cols) for rows in patch_bounds(height, factor) for cols in patch_bounds(width, factor)]
    for k, ((top, bottom), (left, right)) in enumerate(cells):
        out[:, :, top:bottom, left:right] = F.interpolate(full[:, k], size=(bottom - top, right - left),
                                                          mode="nearest")
    return out


# --------------------------------------------------------------------------------------------- proxy
def cache_dir() -> Path:
    """Where proxies are kept: ``$FASTDD_CACHE``, else ``~/.cache/fastdd``."""
    return Path(os.environ.get("FASTDD_CACHE") or Path.home() / ".cache" / "fastdd")


def proxy_network(train: RealDataset, model: str, seed: int) -> nn.Module:
    """The response policy's proxy: a ``model`` trained ``PROXY_EPOCHS`` epoch(s) on ``PROXY_IMAGES`` random
    real images (SGD lr 0.01, momentum 0.9, batch 256, the data set's DSA augmentation), everything drawn
    from ``torch.Generator().manual_seed(seed)``. Kept in :func:`cache_dir` under a name that hashes every
    setting (data set, shapes, ZCA, model, training, seed) and reused by later runs."""
    whitening = train.whitening.regularization if train.whitening is not None else None
    key = {"dataset": train.name, "channels": train.channels, "num_classes": train.num_classes,
           "im_size": [train.height, train.width], "zca": whitening, "model": model, "images": PROXY_IMAGES,
           "epochs": PROXY_EPOCHS, "lr": PROXY_LR, "momentum": PROXY_MOMENTUM, "batch": PROXY_BATCH, "seed": seed}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "udd-proxies" / f"{train.name}-{model}-{digest}.pt"
    generator = torch.Generator().manual_seed(seed)
    net = get_network(model, train.channels, train.num_classes, (train.height, train.width), generator)
    net = net.to(train.device)
    if path.exists():
        net.load_state_dict(torch.load(path, map_location=train.device, weights_only=True)["state"])
    else:
        idx = torch.randperm(len(train), generator=generator)[:PROXY_IMAGES].to(train.device)
        images, labels = train.get(idx), train.labels[idx]
        optimizer = torch.optim.SGD(net.parameters(), lr=PROXY_LR, momentum=PROXY_MOMENTUM)
        augment = DSA(dsa_strategy_for(train.name))
        for _ in range(PROXY_EPOCHS):
            train_epoch(net, images, labels, optimizer, generator, PROXY_BATCH, augment)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"key": key, "state": net.state_dict()}, path)
    return net.eval()
