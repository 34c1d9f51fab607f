"""DSA: differentiable siamese augmentation, vectorised and seeded by a ``torch.Generator``.

The strategy string (e.g. ``"color_crop_cutout_flip_scale_rotate"``) is split on ``_`` into op
groups; each augmentation draws ONE op group uniformly and applies it (``color`` is brightness, then
saturation, then contrast, each with its own draw). Op semantics follow the reference DSA code:

* scale:  sx, sy ~ U[1/ratio_scale, ratio_scale] (independent; the reference code happens to
  reuse one seed for both), theta = [[sx, 0, 0], [0, sy, 0]]
* rotate: angle = (u - 0.5) * 2 * ratio_rotate degrees, theta = [[cos, sin, 0], [-sin, cos, 0]];
  scale and rotate resample with ``F.affine_grid`` + ``F.grid_sample`` (bilinear, zero padding,
  ``align_corners=True``)
* flip:   horizontal (last dim) with probability ``prob_flip``
* crop:   integer shift (dy, dx), dy ~ randint(-s, s) inclusive with s = int(H * ratio_crop_pad + 0.5)
  (dx likewise with W); out[i, j] = x[i + dy, j + dx], zero outside the image
* cutout: side k = int(H * ratio_cutout + 0.5) (W likewise); centre c ~ randint(0, H + 1 - k % 2) and
  rows [c - k // 2, c - k // 2 + k) clamped to the image are zeroed (columns likewise)
* color:  x + (u - 0.5) * brightness; then (x - m) * (u * saturation) + m with m the per-pixel
  channel mean; then (x - m) * (u + contrast) + m with m the per-image mean over C, H, W

Siamese use: :meth:`DSA.sample` draws one op and one parameter set per *group*; :meth:`DSA.apply`
applies group ``g``'s transform to every image tagged ``g``, so the real and the synthetic batch of a
class see the identical transform. :meth:`DSA.__call__` is training-time augmentation: one op per
call, independent parameters per image.

Integer parameters (crop shift, cutout centre) are stored as uniform draws u in [0, 1) and turned
into integers for the image size at apply time (floor(u * n) is uniform on {0..n-1}), because
``sample`` does not know the image size; equal sizes give equal integers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from fastdd.checks import nonnegative_float, positive_float, positive_int

OPS: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")
_NO_FLIP_DATASETS = ("mnist", "svhn", "digits")
AUGMENTS = ("none", "dsa")  # the augmentations an evaluation trains with


def dsa_strategy_for(dataset_name: str) -> str:
    """The reference DSA strategy for a data set: no flip for digit sets (mnist, svhn, digits)."""
    if dataset_name.lower() in _NO_FLIP_DATASETS:
        return "color_crop_cutout_scale_rotate"
    return "color_crop_cutout_flip_scale_rotate"


@dataclass(frozen=True)
class DSAParams:
    """One augmentation per group, for G groups (all tensors on one device, first dim G).

    ops: the strategy's op groups; op: int64 [G] index into ``ops``; scale: [G, 2] (sx, sy);
    angle: [G] radians; flip: bool [G]; crop: [G, 2] uniform draws for (dy, dx);
    cutout: [G, 2] uniform draws for the centre (cy, cx); brightness: [G] additive shift;
    saturation: [G] factor; contrast: [G] factor. Float tensors are float32.
    """

    ops: tuple[str, ...]
    op: torch.Tensor
    scale: torch.Tensor
    angle: torch.Tensor
    flip: torch.Tensor
    crop: torch.Tensor
    cutout: torch.Tensor
    brightness: torch.Tensor
    saturation: torch.Tensor
    contrast: torch.Tensor

    def __post_init__(self) -> None:
        g = self.op.shape[0] if self.op.dim() == 1 else -1
        for f in fields(self)[1:]:
            t = getattr(self, f.name)
            if t.dim() < 1 or t.shape[0] != g:
                raise ValueError(f"DSAParams.{f.name} has shape {tuple(t.shape)}; expected first dim {g} (= op)")

    @property
    def num_groups(self) -> int:
        return self.op.shape[0]

    def to(self, device: torch.device | str) -> DSAParams:
        """The same parameters on ``device``."""
        return DSAParams(self.ops, *(getattr(self, f.name).to(device) for f in fields(self)[1:]))


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample x [n, C, H, W] with affine matrices theta [n, 2, 3] (align_corners=True)."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _scale_theta(scale: torch.Tensor) -> torch.Tensor:
    """[n, 2] (sx, sy) -> [n, 2, 3]."""
    zero = torch.zeros_like(scale[:, 0])
    return torch.stack([torch.stack([scale[:, 0], zero, zero], 1), torch.stack([zero, scale[:, 1], zero], 1)], 1)


def _rotate_theta(angle: torch.Tensor) -> torch.Tensor:
    """[n] radians -> [n, 2, 3] = [[cos, sin, 0], [-sin, cos, 0]]."""
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    return torch.stack([torch.stack([cos, sin, zero], 1), torch.stack([-sin, cos, zero], 1)], 1)


def _flip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Flip images of x [n, C, H, W] horizontally where flip [n] is True."""
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def _crop(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """out[b, :, i, j] = x[b, :, i + dy[b], j + dx[b]], zero outside; dy, dx int64 [n]."""
    n, c, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    rows = (torch.arange(h, device=x.device) + dy[:, None] + 1).clamp(0, h + 1)  # [n, H]
    cols = (torch.arange(w, device=x.device) + dx[:, None] + 1).clamp(0, w + 1)  # [n, W]
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def _cutout(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero the size[0] x size[1] square starting at (cy - size[0]//2, cx - size[1]//2); cy, cx int64 [n]."""
    h, w = x.shape[2:]
    top, left = cy - size[0] // 2, cx - size[1] // 2
    r = torch.arange(h, device=x.device)
    c = torch.arange(w, device=x.device)
    in_rows = (r >= top[:, None]) & (r < top[:, None] + size[0])  # [n, H]
    in_cols = (c >= left[:, None]) & (c < left[:, None] + size[1])  # [n, W]
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)


def _color(x: torch.Tensor, brightness: torch.Tensor, saturation: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """Brightness shift, then saturation and contrast factors; parameters [n]."""
    b, s, c = (p.to(x.dtype)[:, None, None, None] for p in (brightness, saturation, contrast))
    x = x + b
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * s + m
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * c + m


@dataclass(frozen=True)
class DSA:
    """Differentiable siamese augmentation (see the module docstring for each op's definition)."""

    strategy: str = "color_crop_cutout_flip_scale_rotate"
    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    ops: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.strategy, str):
            raise ValueError(f"strategy must be a string like 'color_crop_cutout', got {self.strategy!r}")
        ops = tuple(self.strategy.split("_"))
        for name in ops:
            if name not in OPS:
                raise ValueError(
                    f"unknown DSA op {name!r} in strategy {self.strategy!r}; known ops: {', '.join(OPS)}"
                )
        object.__setattr__(self, "ops", ops)
        if not 0.0 <= self.prob_flip <= 1.0:
            raise ValueError(f"prob_flip must be in [0, 1], got {self.prob_flip}")
        positive_float("ratio_scale", self.ratio_scale)
        for name in ("ratio_rotate", "ratio_crop_pad", "ratio_cutout", "brightness", "saturation", "contrast"):
            nonnegative_float(name, getattr(self, name))

    def _draw(self, op: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """All parameter kinds for len(op) groups, drawn in a fixed order on the generator's device."""
        g, dev = op.shape[0], generator.device

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(g, *shape, generator=generator, device=dev)

        lo = 1.0 / self.ratio_scale
        return dict(
            op=op,
            scale=rand(2) * (self.ratio_scale - lo) + lo,
            angle=(rand() - 0.5) * 2 * self.ratio_rotate * (math.pi / 180),
            flip=rand() < self.prob_flip,
            crop=rand(2),
            cutout=rand(2),
            brightness=(rand() - 0.5) * self.brightness,
            saturation=rand() * self.saturation,
            contrast=rand() + self.contrast,
        )

    def sample(
        self, num_groups: int, generator: torch.Generator, device: torch.device | str | None = None
    ) -> DSAParams:
        """Siamese draw: one op (uniform over the strategy's op groups) and one parameter set per group.

        Drawn on the generator's device, returned on ``device`` (default: the generator's device).
        """
        positive_int("num_groups", num_groups)
        op = torch.randint(0, len(self.ops), (num_groups,), generator=generator, device=generator.device)
        params = DSAParams(self.ops, **self._draw(op, generator))
        return params if device is None else params.to(device)

    def crop_shifts(self, params: DSAParams, height: int, width: int) -> torch.Tensor:
        """Integer shifts int64 [G, 2] = (dy, dx), each uniform on [-s, s] for this image size."""
        s = torch.tensor([int(height * self.ratio_crop_pad + 0.5), int(width * self.ratio_crop_pad + 0.5)])
        s = s.to(params.crop.device)
        return (params.crop.double() * (2 * s + 1)).floor().long() - s

    def cutout_size(self, height: int, width: int) -> tuple[int, int]:
        """Side lengths (kh, kw) of the cutout square for this image size."""
        return int(height * self.ratio_cutout + 0.5), int(width * self.ratio_cutout + 0.5)

    def cutout_centres(self, params: DSAParams, height: int, width: int) -> torch.Tensor:
        """Integer centres int64 [G, 2] = (cy, cx), cy uniform on [0, H - kh % 2] (cx likewise)."""
        kh, kw = self.cutout_size(height, width)
        n = torch.tensor([height + 1 - kh % 2, width + 1 - kw % 2], device=params.cutout.device)
        return (params.cutout.double() * n).floor().long()

    def _apply_op(self, name: str, x: torch.Tensor, p: DSAParams, idx: torch.Tensor) -> torch.Tensor:
        """Apply op group ``name`` to x [n, C, H, W]; image k uses group idx[k] of ``p``."""
        h, w = x.shape[2:]
        if name == "scale":
            return _affine(x, _scale_theta(p.scale[idx]))
        if name == "rotate":
            return _affine(x, _rotate_theta(p.angle[idx]))
        if name == "flip":
            return _flip(x, p.flip[idx])
        if name == "crop":
            shift = self.crop_shifts(p, h, w)[idx]
            return _crop(x, shift[:, 0], shift[:, 1])
        if name == "cutout":
            centre = self.cutout_centres(p, h, w)[idx]
            return _cutout(x, centre[:, 0], centre[:, 1], self.cutout_size(h, w))
        return _color(x, p.brightness[idx], p.saturation[idx], p.contrast[idx])

    def apply(self, x: torch.Tensor, params: DSAParams, groups: torch.Tensor | None = None) -> torch.Tensor:
        """Augment x [N, C, H, W]: image k gets group groups[k]'s op and parameters.

        groups: int64 [N] with values in [0, G); None puts every image in group 0. Differentiable in x;
        returns a new [N, C, H, W] tensor. Only loops over op kinds, never over images.
        """
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"x must be a float tensor [N, C, H, W], got {x.dtype} of shape {tuple(x.shape)}")
        n = x.shape[0]
        params = params.to(x.device)
        if groups is None:
            groups = torch.zeros(n, dtype=torch.long, device=x.device)
        else:
            if not isinstance(groups, torch.Tensor) or groups.dtype != torch.long or groups.shape != (n,):
                got = (
                    f"{groups.dtype} of shape {tuple(groups.shape)}"
                    if isinstance(groups, torch.Tensor)
                    else type(groups).__name__
                )
                raise ValueError(f"groups must be an int64 tensor of shape [N]=({n},), got {got}")
            groups = groups.to(x.device)
            if n:
                lo, hi = torch.aminmax(groups)
                if int(lo) < 0 or int(hi) >= params.num_groups:
                    raise ValueError(
                        f"groups values must be in [0, {params.num_groups}) (the number of sampled groups), "
                        f"got range [{int(lo)}, {int(hi)}]"
                    )
        if n == 0:
            return x.clone()
        kind_of_op = torch.tensor([OPS.index(name) for name in params.ops], device=x.device)
        image_kind = kind_of_op[params.op][groups]  # [N] index into OPS
        kinds = torch.unique(image_kind).tolist()
        if len(kinds) == 1:
            return self._apply_op(OPS[kinds[0]], x, params, groups)
        out = x
        for kind in kinds:
            sel = (image_kind == kind).nonzero().squeeze(1)
            out = out.index_put((sel,), self._apply_op(OPS[kind], x[sel], params, groups[sel]))
        return out

    def sample_per_image(self, n: int, generator: torch.Generator) -> DSAParams:
        """Training-time draw for ``n`` images: one op for all of them, independent parameters per image
        (group ``k`` is image ``k``); ``apply(x, params, torch.arange(n))`` replays it."""
        op = torch.randint(0, len(self.ops), (1,), generator=generator, device=generator.device).expand(n)
        return DSAParams(self.ops, **self._draw(op, generator))

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training-time augmentation of x [N, C, H, W]: one op per call, independent parameters per image."""
        if x.dim() != 4:
            raise ValueError(f"x must be a float tensor [N, C, H, W], got shape {tuple(x.shape)}")
        n = x.shape[0]
        return self.apply(x, self.sample_per_image(n, generator), torch.arange(n, device=x.device))
