"""What the backend calibration (:mod:`fastdd.ops.calibration`) times for each family of ops: its ops forward and
backward as the methods call them, at the shapes of fastdd's default ConvNet-3 on Fashion-MNIST and as UDD calls its
contrastive term.

ConvNet-3 (``fastdd.models.ConvNet(1, 10, 28)``, which the ops do not import: its layers are spelled out here, and a
test holds them to the model's): three blocks of a 3 x 3 convolution to 128 channels (on 1 x 28 x 28 images the first
pads by 3, the others by 1), an instance norm (``GroupNorm`` with a group per channel), ReLU and 2 x 2 average
pooling, then a linear layer from the 128 x 4 x 4 features to 10 classes.

Each :class:`Workload`'s ``setup()`` builds its inputs once, from a private generator, and returns ``run(backend)``,
one round on ``"cpp"`` or ``"torch"`` (on a side of :data:`fastdd.ops.calibration.SIDES` for the families that
choose other things); every op is called with that backend (an ``"auto"`` call would calibrate inside the
calibration, waiting for its own lock), except in the layout family's workload, whose ``"auto"`` calls run the
choices of the families it needs (:data:`fastdd.ops.calibration.NEEDS`), measured before it. Batches are a chunk of
the methods' (64 real images rather than 256, 32 images for the per-sample norms), so that a calibration takes
seconds; the choice takes the two paths' ratio on a chunk for their ratio on the whole batch. The layouts are timed
on a whole batch of 256, where their ratio differs from a chunk's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastdd.ops.grad_match import grad_match_distance
from fastdd.ops.layer_rules import rule_for
from fastdd.ops.masked_contrastive import masked_feature_contrastive
from fastdd.ops.norm_relu_pool import conv_instance_norm_relu_pool, instance_norm_relu_pool

Run = Callable[[str], object]
REAL_BATCH = 64
NORMS_BATCH = 32
LAYOUT_BATCH = 256  # a whole real batch: channels_last's gain grows with the batch (bench/NOTES.md)
UDD_SHAPES = [(100, 10), (400, 100)]  # (synthetic feature maps N, classes K): IPC 10 of 10 classes; 400 decoded
UDD_TAU = 0.01  # UDD's default temperature
CHANNELS, SIDE, CLASSES, WIDTH = 1, 28, 10, 128  # ConvNet-3 on Fashion-MNIST
PADDINGS = (3, 1, 1)  # of the blocks' convolutions


@dataclass(frozen=True)
class Workload:
    """What is timed (``what``, for tables) and ``setup() -> run``."""

    what: str
    setup: Callable[[], Run]


def blocks(batch: int) -> list[tuple[nn.Conv2d, nn.GroupNorm, torch.Size, torch.Size]]:
    """Each block of ConvNet-3 (module docstring) on ``batch`` Fashion-MNIST images: its conv and norm modules (on the
    meta device), the conv's input shape and its output shape (the norm's input and output)."""
    side, channels, found = SIDE, CHANNELS, []
    for padding in PADDINGS:
        with torch.device("meta"):
            conv, norm = nn.Conv2d(channels, WIDTH, 3, padding=padding), nn.GroupNorm(WIDTH, WIDTH)
        out = side + 2 * padding - 2  # stride 1
        found.append((conv, norm, torch.Size((batch, channels, side, side)), torch.Size((batch, WIDTH, out, out))))
        side, channels = out // 2, WIDTH  # the block's 2 x 2 pooling
    return found


def parameter_shapes() -> list[torch.Size]:
    """The shapes of ConvNet-3's parameters, in the order of ``ConvNet.parameters()``: each block's convolution and
    norm, then the linear layer."""
    found = blocks(1)
    pooled = found[-1][3][-1] // 2  # the side of the last block's pooled map
    layers = [*(layer for conv, norm, _, _ in found for layer in (conv, norm)),
              nn.Linear(WIDTH * pooled * pooled, CLASSES, device="meta")]
    return [p.shape for layer in layers for p in layer.parameters()]


def _grad_match() -> Run:
    g = torch.Generator().manual_seed(0)
    shapes = parameter_shapes()
    calls = []
    for lead, batched in (((10,), True), ((), False)):
        syn = [torch.randn(*lead, *s, generator=g).requires_grad_(True) for s in shapes]
        calls.append((syn, [torch.randn(*lead, *s, generator=g) for s in shapes], batched))

    def run(backend: str) -> None:
        for syn, real, batched in calls:  # "ours" skips the one-dimensional parameters: allow_unused
            torch.autograd.grad(grad_match_distance(syn, real, "ours", batched=batched, backend=backend), syn,
                                allow_unused=True)
    return run


def _grad_norm() -> Run:
    g = torch.Generator().manual_seed(0)
    records: list[tuple[nn.Module, Tensor, Tensor]] = []
    for conv, norm, conv_in, conv_out in blocks(NORMS_BATCH):
        records += [(conv, torch.randn(conv_in, generator=g), torch.randn(conv_out, generator=g)),
                    (norm, torch.randn(conv_out, generator=g), torch.randn(conv_out, generator=g))]

    def run(backend: str) -> None:
        with torch.no_grad():  # as in per_sample_grad_norm's backward hooks without create_graph
            for layer, a, grad in records:
                sum(grads.sq_norms() for grads in rule_for(layer)(layer, a, grad, backend).values())
    return run


def _norm_relu_pool() -> Run:
    """The tail op on the output maps of ConvNet-3's three convolutions, forward and backward."""
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(out, generator=g).requires_grad_(True) for _, _, _, out in blocks(REAL_BATCH)]
    affine = [[torch.randn(z.shape[1], generator=g).requires_grad_(True) for _ in range(2)] for z in maps]
    grad_outs = [torch.randn(*z.shape[:2], z.shape[2] // 2, z.shape[3] // 2, generator=g) for z in maps]
    leaves = [*maps, *(t for pair in affine for t in pair)]

    def run(backend: str) -> None:
        outs = [instance_norm_relu_pool(z, w, b, backend=backend) for z, (w, b) in zip(maps, affine)]
        torch.autograd.grad(outs, leaves, grad_outs)
    return run


def _conv_norm_relu_pool() -> Run:
    """The first block whole, forward and backward: on ``"cpp"`` the fused kernel, on ``"torch"`` what the op runs
    when the calibration chooses against it, the convolution followed by the tail op (its C++ path)."""
    g = torch.Generator().manual_seed(0)
    (conv, _, x_shape, out), *_ = blocks(REAL_BATCH)
    x = torch.randn(x_shape, generator=g)
    params = [torch.randn(shape, generator=g).requires_grad_(True)
              for shape in (conv.weight.shape, conv.bias.shape, conv.bias.shape, conv.bias.shape)]
    grad_out = torch.randn(*out[:2], out[2] // 2, out[3] // 2, generator=g)
    padding = conv.padding[0]

    def run(backend: str) -> None:
        if backend == "cpp":
            y = conv_instance_norm_relu_pool(x, *params, padding, backend="cpp")
        else:
            weight, bias, norm_weight, norm_bias = params
            y = instance_norm_relu_pool(F.conv2d(x, weight, bias, padding=padding), norm_weight, norm_bias,
                                        backend="cpp")
        torch.autograd.grad(y, params, grad_out)
    return run


def _block_layout() -> Run:
    """ConvNet-3's three blocks in turn (:func:`conv_instance_norm_relu_pool` on the backends calibrated for it and
    its tail, as the real passes run it), forward and backward to their parameters, on ``"contiguous"`` or
    ``"channels_last"`` maps."""
    g = torch.Generator().manual_seed(0)
    found = blocks(LAYOUT_BATCH)
    x = torch.randn(found[0][2], generator=g)
    params = [[torch.randn(shape, generator=g).requires_grad_(True)
               for shape in (conv.weight.shape, conv.bias.shape, conv.bias.shape, conv.bias.shape)]
              for conv, _, _, _ in found]
    out = found[-1][3]
    grad_out = torch.randn(*out[:2], out[2] // 2, out[3] // 2, generator=g)
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}

    def run(layout: str) -> None:
        h = x
        for (conv, _, _, _), block in zip(found, params):
            h = conv_instance_norm_relu_pool(h, *block, conv.padding[0], memory_format=formats[layout])
        torch.autograd.grad(h, [p for block in params for p in block], grad_out)
    return run


def _masked_contrastive() -> Run:
    g = torch.Generator().manual_seed(0)
    calls = []
    for n, k in UDD_SHAPES:
        features = torch.randn(n, 128, 8, 8, generator=g).requires_grad_(True)
        masks = (torch.rand(n, 1, 8, 8, generator=g) < 0.75).float()
        calls.append((features, masks, torch.arange(n) % k, torch.randn(k, 128, generator=g)))

    def run(backend: str) -> None:
        for features, masks, labels, prototypes in calls:
            torch.autograd.grad(masked_feature_contrastive(features, masks, labels, prototypes, UDD_TAU,
                                                           backend=backend), features)
    return run


WORKLOADS = {
    "grad_match": Workload("DC's distance over ConvNet-3's gradients: one class-batched call of 10 classes and one "
                           "class's call, backward to the synthetic side", _grad_match),
    "grad_norm": Workload(f"per-sample squared norms of ConvNet-3's conv and norm parameter gradients, {NORMS_BATCH} "
                          "images, no graph", _grad_norm),
    "masked_contrastive": Workload("UDD's term on [N, 128, 8, 8] feature maps, N = 100 of 10 classes and 400 of "
                                   "100, backward to the features", _masked_contrastive),
    "norm_relu_pool": Workload(f"the tail of ConvNet-3's three blocks on {REAL_BATCH} real images, forward and "
                               "backward", _norm_relu_pool),
    "conv_norm_relu_pool": Workload(f"ConvNet-3's first block on {REAL_BATCH} real images, forward and backward: "
                                    "fused, or the convolution then the tail", _conv_norm_relu_pool),
    "block_layout": Workload(f"ConvNet-3's three blocks on {LAYOUT_BATCH} real images, forward and backward, on "
                             "contiguous and on channels_last maps", _block_layout),
}
