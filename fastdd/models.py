"""Networks used for distillation and evaluation: the ConvNet family and ResNet-18.

ConvNet follows the field's reference definition: ``depth`` blocks of
``Conv2d(k3, pad 1) -> norm -> act -> pool(2)`` with ``width`` channels, then ``Linear(feat_dim,
classes)``. For 1-channel inputs the first conv pads 3, so 28x28 MNIST becomes 32x32 and the
feature map matches CIFAR's (128 x 4 x 4 = 2048 features at depth 3). The default (3x32x32, 10
classes) has 320,010 parameters; 1x28x28 / 10 classes has 317,706.

ResNet-18 is the CIFAR-style variant used for cross-architecture evaluation: a 3x3 stride-1 stem
without max-pool, BasicBlocks [2, 2, 2, 2] of widths 64..512, adaptive average pooling. Its "instancenorm" is
``GroupNorm(C, C, affine=True)`` (DC's ResNet18); "ResNet18BN" uses BatchNorm.

A network runs on inputs smaller than it was made for, but may not learn from them: an instance norm over a
single pixel per channel outputs its bias whatever the image (ResNet18 on 8x8 images: its last stage's maps are
1x1, so every image gives the same logits and its networks train to chance). :func:`check_image_size` refuses
such a size before any training, naming the smallest it needs (:func:`min_image_size`, found by tracing the
layers' shapes on the meta device): 9 px for ResNet18, for instance; fastdd refuses rather than adapts the
network, so that a reported architecture is the one trained.

Networks never touch the global RNG: :func:`get_network` re-initialises every parameter from an
explicit ``torch.Generator`` with PyTorch's default distributions (:func:`init_parameters`).

Inside :func:`fused_blocks`, a ConvNet in its default configuration (instance norm, ReLU, average
pooling) runs each block as one op (:func:`fastdd.ops.norm_relu_pool.conv_instance_norm_relu_pool`: the
norm + ReLU + pooling fused, and on CPU the first block of a grey-image network fused whole when the
images need no gradient): same values, much less memory traffic, but a backward that cannot be
differentiated again. Passes whose gradients get a graph of their own
(the synthetic side of gradient matching, unrolled students) run outside it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import nn

from fastdd.ops.grad_norm import Tail
from fastdd.ops.norm_relu_pool import conv_instance_norm_relu_pool

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTIVATIONS = ("relu", "sigmoid", "leakyrelu")
POOLINGS = ("avgpooling", "maxpooling", "none")

# name -> ConvNet keyword overrides (relative to width 128, depth 3, instancenorm, relu, avgpooling)
_CONVNET_VARIANTS: dict[str, dict[str, object]] = {
    "ConvNet": {},
    **{f"ConvNetD{d}": {"depth": d} for d in range(1, 7)},
    **{f"ConvNetW{w}": {"width": w} for w in (32, 64, 256)},
    "ConvNetBN": {"norm": "batchnorm"},
    "ConvNetLN": {"norm": "layernorm"},
    "ConvNetGN": {"norm": "groupnorm"},
    "ConvNetNN": {"norm": "none"},
    "ConvNetMP": {"pooling": "maxpooling"},
    "ConvNetNP": {"pooling": "none"},
    "ConvNetAS": {"act": "sigmoid"},
    "ConvNetAL": {"act": "leakyrelu"},
}
_RESNET_VARIANTS: dict[str, str] = {"ResNet18": "instancenorm", "ResNet18BN": "batchnorm"}
NETWORK_NAMES: tuple[str, ...] = (*_CONVNET_VARIANTS, *_RESNET_VARIANTS)

_FUSED_BLOCKS = contextvars.ContextVar("fused_blocks", default=None)  # None, or the memory format of fused maps
MAX_SIDE = 1024  # the largest image side min_image_size looks at


@contextlib.contextmanager
def fused_blocks(memory_format: torch.memory_format = torch.contiguous_format) -> Iterator[None]:
    """Within it, default-configured ConvNets run norm + ReLU + pooling fused (first-order gradients only), their
    maps in ``memory_format`` (contiguous, or ``torch.channels_last``: the same values to rounding)."""
    token = _FUSED_BLOCKS.set(memory_format)
    try:
        yield
    finally:
        _FUSED_BLOCKS.reset(token)


def _check_choice(arg: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{arg}={value!r} is not supported; expected one of {', '.join(choices)}")


def _check_positive(**kwargs: int) -> None:
    for arg, value in kwargs.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")


def _im_size_pair(im_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    pair = (im_size, im_size) if isinstance(im_size, int) else tuple(im_size)
    if len(pair) != 2 or not all(isinstance(s, int) and s >= 1 for s in pair):
        raise ValueError(f"im_size must be a positive int or a pair (height, width), got {im_size!r}")
    return pair  # type: ignore[return-value]


def _norm_layer(norm: str, channels: int, shape: tuple[int, int, int]) -> nn.Module | None:
    """Norm layer for a [B, C, H, W] map of per-sample shape ``shape`` = (C, H, W); None for ``"none"``."""
    if norm == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "layernorm":
        return nn.LayerNorm(list(shape), elementwise_affine=True)
    if norm == "groupnorm":
        if channels % 4:
            raise ValueError(f"norm='groupnorm' uses 4 groups and needs width divisible by 4, got {channels}")
        return nn.GroupNorm(4, channels, affine=True)
    _check_choice("norm", norm, NORMS)
    return None


def _activation(act: str) -> nn.Module:
    _check_choice("act", act, ACTIVATIONS)
    if act == "relu":
        return nn.ReLU()
    if act == "sigmoid":
        return nn.Sigmoid()
    return nn.LeakyReLU(negative_slope=0.01)


class VanishedMapError(ValueError):
    """A ConvNet's pooling leaves no pixel: its images are too small for its depth."""

    def __init__(self, im_size: object, depth: int, block: int) -> None:
        super().__init__(f"im_size={im_size!r} is too small for depth={depth}: the feature map vanishes after block "
                         f"{block}")
        self.block = block


class ConvBlock(NamedTuple):
    """One ConvNet block, ``pool(act(norm(conv(x))))``: modules of ``ConvNet.features``; ``norm`` and ``pool`` are
    None in a network without them."""

    conv: nn.Conv2d
    norm: nn.Module | None
    act: nn.Module
    pool: nn.Module | None

    def unpooled(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Cin, H, W] -> the block's activations before its pooling, ``act(norm(conv(x)))``."""
        x = self.conv(x)
        return self.act(x if self.norm is None else self.norm(x))


BlockForward = Callable[[ConvBlock, torch.Tensor], torch.Tensor]
"""(block, x) -> the block's output: how :meth:`ConvNet.embed` runs each block."""


def eager_block(block: ConvBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's modules in turn (so their hooks run)."""
    x = block.unpooled(x)
    return x if block.pool is None else block.pool(x)


def fused_block(block: ConvBlock, x: torch.Tensor) -> torch.Tensor:
    """The block of a network in its default configuration as one op, :func:`conv_instance_norm_relu_pool`
    (first-order gradients only)."""
    conv, norm = block.conv, block.norm
    return conv_instance_norm_relu_pool(x, conv.weight, conv.bias, norm.weight, norm.bias, conv.padding[0], norm.eps,
                                        memory_format=_FUSED_BLOCKS.get() or torch.contiguous_format)


class ConvNet(nn.Module):
    """The field's default ConvNet.

    Input [B, channels, H, W] -> logits [B, num_classes]; ``embed`` gives the flattened features
    [B, feat_dim] (feat_dim = width * H' * W', 2048 for 32x32 or 28x28 inputs at depth 3);
    ``feature_map`` the last block's activations before its pooling (UDD's response maps).
    ``blocks`` holds each block's modules (:class:`ConvBlock`; ``features`` holds the same modules in one
    Sequential). ``forward`` and ``embed`` run the blocks in turn, each through a ``run_block`` callback: a
    caller that needs a block run another way (eager with hooks, fused with per-sample norms) passes its own.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        im_size: int | tuple[int, int],
        width: int = 128,
        depth: int = 3,
        norm: str = "instancenorm",
        act: str = "relu",
        pooling: str = "avgpooling",
    ) -> None:
        super().__init__()
        _check_positive(channels=channels, num_classes=num_classes, width=width, depth=depth)
        _check_choice("norm", norm, NORMS)
        _check_choice("act", act, ACTIVATIONS)
        _check_choice("pooling", pooling, POOLINGS)
        h, w = _im_size_pair(im_size)
        blocks: list[ConvBlock] = []
        in_ch = channels
        for d in range(depth):
            pad = 3 if channels == 1 and d == 0 else 1
            conv = nn.Conv2d(in_ch, width, kernel_size=3, padding=pad)
            h, w = h + 2 * pad - 2, w + 2 * pad - 2
            norm_layer = _norm_layer(norm, width, (width, h, w))
            pool = None
            if pooling != "none":
                pool = nn.AvgPool2d(2) if pooling == "avgpooling" else nn.MaxPool2d(2)
                h, w = h // 2, w // 2
                if h < 1 or w < 1:
                    raise VanishedMapError(im_size, depth, d + 1)
            blocks.append(ConvBlock(conv, norm_layer, _activation(act), pool))
            in_ch = width
        self.features = nn.Sequential(*(layer for block in blocks for layer in block if layer is not None))
        self.blocks = tuple(blocks)
        self.fusable = (norm, act, pooling) == ("instancenorm", "relu", "avgpooling")
        self.feat_dim = width * h * w
        self.classifier = nn.Linear(self.feat_dim, num_classes)

    def _through(self, x: torch.Tensor, blocks: tuple[ConvBlock, ...], run_block: BlockForward | None) -> torch.Tensor:
        run = run_block or (fused_block if self.fusable and _FUSED_BLOCKS.get() is not None else eager_block)
        for block in blocks:
            x = run(block, x)
        return x

    def embed(self, x: torch.Tensor, run_block: BlockForward | None = None) -> torch.Tensor:
        """[B, C, H, W] -> flattened features [B, feat_dim]: ``x = run_block(block, x)`` for each block in turn.

        ``run_block`` by default: :func:`fused_block` inside :func:`fused_blocks` for a network in its default
        configuration (``fusable``), else :func:`eager_block`.
        """
        return self._through(x, self.blocks, run_block).flatten(1)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> the last block's activations before its pooling [B, width, h, w]
        (8 x 8 at depth 3 for 1 x 28 x 28 inputs, whose first convolution pads by 3, and for 3 x 32 x 32);
        the blocks before it run as in :meth:`embed`."""
        return self.blocks[-1].unpooled(self._through(x, self.blocks[:-1], None))

    def forward(self, x: torch.Tensor, run_block: BlockForward | None = None) -> torch.Tensor:
        """[B, C, H, W] -> logits [B, num_classes]; ``run_block`` as in :meth:`embed`."""
        return self.classifier(self.embed(x, run_block))

    def tail_norms(self) -> tuple[nn.Module, ...]:
        """Every block's norm in a network in its default configuration (``fusable``), else none: the tails (norm,
        ReLU, 2 x 2 average pooling) :func:`fastdd.ops.per_sample_grad_norm` may run fused
        (:class:`fastdd.ops.grad_norm.FusableTails`)."""
        return tuple(block.norm for block in self.blocks) if self.fusable else ()

    def forward_with_tails(self, x: torch.Tensor, tail: Tail) -> torch.Tensor:
        """Logits as :meth:`forward`, each block run as ``tail(block.conv(h), block.norm)`` on its input h."""
        return self(x, run_block=lambda block, h: tail(block.conv(h), block.norm))


def _resnet_norm(norm: str, channels: int) -> nn.Module:
    return nn.GroupNorm(channels, channels, affine=True) if norm == "instancenorm" else nn.BatchNorm2d(channels)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a (projected when needed) identity shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _resnet_norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.norm2 = _resnet_norm(norm, out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), _resnet_norm(norm, out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: [B, channels, H, W] -> logits [B, num_classes]; ``embed`` -> [B, 512]."""

    def __init__(self, channels: int, num_classes: int, norm: str = "instancenorm") -> None:
        super().__init__()
        _check_positive(channels=channels, num_classes=num_classes)
        _check_choice("norm", norm, ("instancenorm", "batchnorm"))
        self.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
        self.norm1 = _resnet_norm(norm, 64)
        stages: list[nn.Module] = []
        in_ch = 64
        for out_ch, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages += [BasicBlock(in_ch, out_ch, stride, norm), BasicBlock(out_ch, out_ch, 1, norm)]
            in_ch = out_ch
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feat_dim = 512
        self.classifier = nn.Linear(512, num_classes)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> the last stage's activations [B, 512, H / 8, W / 8]."""
        return self.layers(torch.relu(self.norm1(self.conv1(x))))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> pooled features [B, 512]."""
        return self.pool(self.feature_map(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> logits [B, num_classes]."""
        return self.classifier(self.embed(x))


def _fill(param: torch.Tensor, init: Callable[[torch.Tensor], object], generator: torch.Generator) -> None:
    """Run ``init`` on ``param`` in place, drawing on the generator's device when it differs."""
    if param.device == generator.device:
        init(param)
    else:
        tmp = torch.empty(param.shape, dtype=param.dtype, device=generator.device)
        init(tmp)
        param.copy_(tmp)


_NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


@torch.no_grad()
def init_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise every parameter of ``model`` from ``generator`` (global RNG untouched).

    Conv/Linear weights: kaiming_uniform(a=sqrt 5) = U(+-1/sqrt(fan_in)); their biases
    U(+-1/sqrt(fan_in)); norm weights 1, biases 0, BatchNorm running statistics reset (the only
    buffers these networks hold). These are
    PyTorch's default distributions. Modules are visited in ``model.modules()`` order, so equal
    generator states give identical networks. Raises TypeError for a parameterised module of
    another kind.
    """
    done: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            weight = module.weight
            _fill(weight, lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator), generator)
            done.add(id(weight))
            if module.bias is not None:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                _fill(module.bias, lambda t: nn.init.uniform_(t, -bound, bound, generator=generator), generator)
                done.add(id(module.bias))
        elif isinstance(module, _NORM_TYPES):
            for name, value in (("weight", 1.0), ("bias", 0.0)):
                param = getattr(module, name, None)
                if isinstance(param, nn.Parameter):
                    param.fill_(value)
                    done.add(id(param))
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
    for name, param in model.named_parameters():
        if id(param) not in done:
            raise TypeError(f"init_parameters: no initialiser for parameter {name!r} of {type(model).__name__}")


def get_network(
    name: str,
    channels: int,
    num_classes: int,
    im_size: int | tuple[int, int],
    generator: torch.Generator,
) -> nn.Module:
    """Build network ``name`` (see NETWORK_NAMES) on CPU, initialised from ``generator``.

    ConvNet variants: "ConvNet" (depth 3, width 128, instancenorm, relu, avg pooling), "ConvNetD1".."D6"
    (depth; use D4 for 64 px and D5 for 128 px inputs), "ConvNetW32/W64/W256" (width), "ConvNetBN/LN/GN/NN"
    (batch/layer/group/no norm), "ConvNetMP/NP" (max/no pooling), "ConvNetAS/AL" (sigmoid/leaky relu);
    "ResNet18" (instancenorm) and "ResNet18BN". Unknown name -> ValueError listing the names.
    """
    # built on the meta device (no global-RNG draws, no wasted default init), then filled from `generator`
    net = meta_network(name, channels, num_classes, im_size).to_empty(device="cpu")
    init_parameters(net, generator)
    return net


def meta_network(name: str, channels: int, num_classes: int, im_size: int | tuple[int, int]) -> nn.Module:
    """Network ``name`` as :func:`get_network` builds it, on the meta device: its layers and shapes, no memory
    and no values (what the memory plan and :func:`check_image_size` trace)."""
    if name not in NETWORK_NAMES:
        raise ValueError(f"unknown network name {name!r}; expected one of {', '.join(NETWORK_NAMES)}")
    with torch.device("meta"):
        if name in _CONVNET_VARIANTS:
            kwargs = _CONVNET_VARIANTS[name]
            return ConvNet(channels, num_classes, im_size, **kwargs)  # type: ignore[arg-type]
        _im_size_pair(im_size)
        return ResNet18(channels, num_classes, norm=_RESNET_VARIANTS[name])


def _normalises_each_channel(module: nn.Module) -> bool:
    """True for a norm over each channel of each image alone (instance norm, ``GroupNorm(C, C)``)."""
    if isinstance(module, nn.GroupNorm):
        return module.num_groups == module.num_channels
    return isinstance(module, nn.modules.instancenorm._InstanceNorm)


@functools.lru_cache(maxsize=None)
def _blind_spot(name: str, channels: int, size: tuple[int, int]) -> str | None:
    """Why network ``name`` cannot learn from images [channels, *size], None when nothing stops it: its feature
    map vanishes, or a layer normalises each channel over a single pixel, which makes its output independent of
    the image. Traced on the meta device (the first trace of a process loads torch's meta kernels, a second or
    two)."""
    try:
        net = meta_network(name, channels, 2, size)
    except VanishedMapError as err:
        return f"its feature map vanishes after block {err.block}"
    single: list[str] = []

    def probe(layer: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if math.prod(args[0].shape[2:]) <= 1:
                single.append(layer)
        return hook

    for layer, module in net.named_modules():
        if _normalises_each_channel(module):
            module.register_forward_pre_hook(probe(layer))
    with torch.no_grad():
        net(torch.empty(2, channels, *size, device="meta"))
    if single:
        return (f"its instance norm {single[0]} normalises each channel over a single pixel, so its output is the "
                "same for every image")
    return None


@functools.lru_cache(maxsize=None)
def min_image_size(name: str, channels: int) -> int:
    """The smallest side S such that network ``name`` can learn from S x S images of ``channels`` channels (none
    of :func:`check_image_size`'s faults), found from its layers' shapes by doubling the side, then bisecting (a
    larger image never has smaller maps); ValueError when none up to :data:`MAX_SIDE` is."""
    blind, fits = 0, 1
    while _blind_spot(name, channels, (fits, fits)) is not None:
        blind, fits = fits, 2 * fits
        if fits > MAX_SIDE:
            raise ValueError(f"network {name} cannot learn from images of {channels} channel(s) up to {MAX_SIDE} px")
    while fits - blind > 1:
        middle = (blind + fits) // 2
        blind, fits = (middle, fits) if _blind_spot(name, channels, (middle, middle)) is not None else (blind, middle)
    return fits


def check_image_size(name: str, channels: int, size: tuple[int, int], option: str = "model (--model)") -> None:
    """ValueError, before anything is trained, when network ``name`` cannot learn from images [channels, *size]:
    its feature map vanishes (pooling below one pixel), or an instance norm sees a single pixel per channel and
    outputs the same for every image. The message names ``option``, the network, the size and the smallest
    square size the network needs (:func:`min_image_size`)."""
    reason = _blind_spot(name, channels, tuple(size))
    if reason is not None:
        side = min_image_size(name, channels)
        raise ValueError(f"{option}: {name} cannot learn from {channels}x{size[0]}x{size[1]} images ({reason}); it "
                         f"needs images of at least {side}x{side}: choose another network or larger images")


def has_batchnorm(model: nn.Module) -> bool:
    """True when ``model`` contains a BatchNorm layer (its train/eval mode then matters)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
