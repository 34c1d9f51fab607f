"""The tail of a ConvNet block fused: instance norm (GroupNorm with one channel per group) + ReLU + 2x2 average
pooling, forward and backward, first order; and a whole block, convolution included, for thin convolutions.

``instance_norm_relu_pool(x, weight, bias, eps)`` equals :func:`fastdd.ops.naive.instance_norm_relu_pool`. On CPU
the C++ kernel (``csrc/norm_relu_pool.cpp``) reads each (sample, channel) plane once forward and twice backward (the
plane stays in cache) and never writes the normalised or rectified map: eager torch makes three passes with a
full-size output each way. On channels_last maps it reads and writes NHWC, a sample and a block of 32 channels at a
time (the layout the methods' real passes use where the calibration measured it faster:
:func:`fastdd.ops.calibration.block_layout`). The backward is not differentiable (``create_graph=True`` raises): use
the op for passes whose gradients are not differentiated again (the real-image passes of a distiller, network
training), and the eager modules where a graph of the gradient is needed. On CUDA the Triton kernels of
``kernels/norm_relu_pool.py`` do the same, one program per plane, which it walks in tiles of at most 1024 values.

Non-finite values (NaN, +-inf in x, weight, bias or the upstream gradient) come out of both ops, forward and
backward, where the eager composition puts them: the kernels' ReLU keeps NaN as ``torch.relu`` does, their ReLU
backward passes a NaN as ``threshold_backward`` does, and their norm backward is ATen's GroupNorm formulation, so
that infinities meet as there (tests/ops/test_nonfinite_ops.py).

``conv_instance_norm_relu_pool(x, conv_weight, conv_bias, weight, bias, padding, eps)`` is the whole block. On grey
images a ConvNet's first convolution has one input channel: its FLOPs are few and its cost is writing and reading
back the [N, C, H, W] map (134 MB for 256 Fashion-MNIST images). On CPU, when ``x`` needs no gradient (real-image
passes, training a network on fixed images, evaluation) and the convolution has at most ``MAX_FUSED_TAPS`` taps
per output, the C++ kernel computes each output plane of the convolution in cache, normalises and pools it, and
recomputes it in the backward: the map is never written. Everywhere else the op is the composition of
``F.conv2d`` and :func:`instance_norm_relu_pool`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdd.checks import nonnegative_int, positive_float
from fastdd.ops import _backend, naive
from fastdd.ops import _checks as checks
from fastdd.ops._dtypes import NORM_RELU_POOL as DTYPES  # x on every backend

_EXTENSION = "norm_relu_pool"
# Most input channels x kernel positions of a convolution the fused C++ block computes itself: one channel of
# 3 x 3 (grey images). Measured (bench/NOTES.md): at 27 taps (RGB) oneDNN's convolution is faster.
MAX_FUSED_TAPS = 9


def _kernels(backend: str):
    """The module whose ``forward`` and ``backward`` fill preallocated outputs: C++ or Triton."""
    if backend == "cpp":
        return _backend.load_extension(_EXTENSION)
    from fastdd.kernels import norm_relu_pool

    return norm_relu_pool


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channels_last(x: Tensor) -> bool:
    """Whether x [N, C, H, W] lies channels_last in memory and not also contiguous (as when C or H W is 1)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class _NormReLUPool(torch.autograd.Function):
    """(x, weight, bias, eps, backend, sink) -> (out, mean, rstd); mean and rstd [N, C] are kept for the backward.
    x contiguous, or channels_last on the C++ kernels (out and grad_x are then channels_last too).
    ``sink``: None, or a list the backward appends the per-sample squared norms [N] of the weight and bias
    gradients to (of those that need a gradient)."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float, backend: str, sink: list | None):
        (n, c, h, w), acc = x.shape, _accumulation_dtype(x.dtype)
        nhwc = _channels_last(x)
        out = _backend.empty((n, c, h // 2, w // 2), x.dtype, x.device, _layout(nhwc))
        mean, rstd = (_backend.empty((n, c), acc, x.device) for _ in range(2))
        kernel = _kernels(backend).forward_nhwc if nhwc else _kernels(backend).forward
        kernel(x, weight.to(acc).contiguous(), bias.to(acc).contiguous(), eps, out, mean, rstd)
        return out, mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, _, ctx.backend, ctx.sink = inputs
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(x, weight, bias, *output[1:])

    @staticmethod
    def backward(ctx, grad_out: Tensor, *_):
        if torch.is_grad_enabled():
            raise RuntimeError("instance_norm_relu_pool has a first-order backward only, and a graph of its gradient "
                               "was asked for (create_graph=True): run this pass outside fastdd.models.fused_blocks()")
        x, weight, bias, mean, rstd = ctx.saved_tensors
        acc, nhwc = mean.dtype, _channels_last(x)
        grad_x = _backend.empty(x.shape, x.dtype, x.device, _layout(nhwc))
        grad_gamma, grad_beta = (_backend.empty(mean.shape, acc, x.device) for _ in range(2))
        kernel = _kernels(ctx.backend).backward_nhwc if nhwc else _kernels(ctx.backend).backward
        kernel(grad_out.to(x.dtype).contiguous(memory_format=_layout(nhwc)), x, weight.to(acc).contiguous(),
               bias.to(acc).contiguous(), mean, rstd, grad_x, grad_gamma, grad_beta)
        if ctx.sink is not None:  # the per-plane sums are the per-sample gradients
            needed = [g for g, need in zip((grad_gamma, grad_beta), ctx.needs_input_grad[1:3]) if need]
            ctx.sink.append(sum(g.pow(2).sum(1) for g in needed))
        return grad_x, grad_gamma.sum(0).to(weight.dtype), grad_beta.sum(0).to(bias.dtype), None, None, None


def _layout(nhwc: bool) -> torch.memory_format:
    return torch.channels_last if nhwc else torch.contiguous_format


def _validate_input(x: Tensor, shape: str) -> None:
    """Refuse an ``x`` that is not a non-empty 4-D tensor ``shape`` of a dtype in ``DTYPES``."""
    checks.tensor("x", x)
    if x.dim() != 4 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty {shape} tensor, got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x must have dtype in {DTYPES}, got {x.dtype}")


def _validate_affine(weight: Tensor, bias: Tensor, c: int) -> None:
    """Refuse a norm ``weight`` or ``bias`` that is not a floating [C] tensor."""
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, Tensor) or t.shape != (c,) or not t.dtype.is_floating_point:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating tensor of shape [C] = [{c}], got {got}")


def instance_norm_relu_pool(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5, *,
                            backend: str = "auto", per_sample_sq_norms: list[Tensor] | None = None) -> Tensor:
    """avg_pool2d(relu(group_norm(x, C, weight, bias, eps)), 2): x [N, C, H, W] -> [N, C, H // 2, W // 2].

    x non-empty, H and W >= 2, float32, float64 or bfloat16 on every backend (statistics accumulated in float32,
    float64 for float64); weight, bias floating [C]; all three on one device; eps a finite number > 0.
    Differentiable once w.r.t. x, weight and bias. ``backend``: see :mod:`fastdd.ops._backend`;
    ``"torch"`` runs the eager composition. A channels_last x stays so on the C++ kernels, which then read and write
    NHWC (the result and x's gradient channels_last); the other paths take it contiguous.
    ``per_sample_sq_norms``: a list to which the backward appends [N] the squared norms of each sample's
    own weight and bias gradient (the kernels compute them per plane before summing over samples; for
    :func:`fastdd.ops.per_sample_grad_norm`); the eager composition cannot, and raises when given one.
    """
    _validate_input(x, "[N, C, H, W]")
    _validate_affine(weight, bias, x.shape[1])
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"x must be at least 2 x 2 to pool, got {tuple(x.shape[2:])}")
    checks.one_device({"x": x, "weight": weight, "bias": bias})
    positive_float("eps", eps)
    if per_sample_sq_norms is not None and not isinstance(per_sample_sq_norms, list):
        raise ValueError(f"per_sample_sq_norms must be None or a list, got {type(per_sample_sq_norms).__name__}")
    name = _backend.resolve_backend(backend, [x, weight, bias], _EXTENSION)
    if name == "torch" or torch._C._are_functorch_transforms_active():
        if per_sample_sq_norms is not None:
            raise ValueError("per_sample_sq_norms needs the fused kernels, and this call runs the eager composition "
                             f"(backend {name!r}, or inside a torch.func transform)")
        acc = _accumulation_dtype(x.dtype)  # contiguous: ATen's channels_last GroupNorm loses precision on flat maps
        return naive.instance_norm_relu_pool(x.to(acc).contiguous(), weight.to(acc), bias.to(acc), eps).to(x.dtype)
    if not (name == "cpp" and _channels_last(x)):
        x = x.contiguous()
    return _backend.apply(_NormReLUPool, x, weight, bias, float(eps), name, per_sample_sq_norms)[0]


class _ConvNormReLUPool(torch.autograd.Function):
    """(x, conv_weight, conv_bias, weight, bias, padding, eps, memory_format) -> (out, mean, rstd) on the C++ kernel,
    out in ``memory_format``; no gradient w.r.t. x."""

    @staticmethod
    def forward(x: Tensor, conv_weight: Tensor, conv_bias: Tensor, weight: Tensor, bias: Tensor, padding: int,
                eps: float, memory_format: torch.memory_format):
        n, c, (kh, kw) = len(x), len(conv_weight), conv_weight.shape[2:]
        h, w = x.shape[2] + 2 * padding - kh + 1, x.shape[3] + 2 * padding - kw + 1
        out = _backend.empty((n, c, h // 2, w // 2), x.dtype, x.device, memory_format)
        mean, rstd = (_backend.empty((n, c), x.dtype, x.device) for _ in range(2))
        _kernels("cpp").conv_forward(x, conv_weight, conv_bias, weight, bias, padding, eps, out, mean, rstd)
        return out, mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.mark_non_differentiable(*output[1:])
        ctx.padding, ctx.memory_format = inputs[5], inputs[7]
        ctx.save_for_backward(*inputs[:5], *output[1:])

    @staticmethod
    def backward(ctx, grad_out: Tensor, *_):
        if torch.is_grad_enabled():
            raise RuntimeError("conv_instance_norm_relu_pool has a first-order backward only, and a graph of its "
                               "gradient was asked for (create_graph=True): run this pass outside "
                               "fastdd.models.fused_blocks()")
        x, conv_weight, conv_bias, weight, bias, mean, rstd = ctx.saved_tensors
        n, c = mean.shape
        grad_conv_weight = _backend.empty((n, c, conv_weight.shape[1:].numel()), x.dtype, x.device)
        grads = [_backend.empty((n, c), x.dtype, x.device) for _ in range(3)]
        _kernels("cpp").conv_backward(grad_out.contiguous(memory_format=ctx.memory_format), x, conv_weight, conv_bias,
                                      weight, bias, ctx.padding, mean, rstd, grad_conv_weight, *grads)
        return (None, grad_conv_weight.sum(0).view_as(conv_weight), *(g.sum(0) for g in grads), None, None, None)


def conv_instance_norm_relu_pool(x: Tensor, conv_weight: Tensor, conv_bias: Tensor, weight: Tensor, bias: Tensor,
                                 padding: int = 0, eps: float = 1e-5, *, backend: str = "auto",
                                 memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """instance_norm_relu_pool(conv2d(x, conv_weight, conv_bias, padding=padding), weight, bias, eps): a ConvNet block.

    x [N, Cin, H, W] non-empty, float32, float64 or bfloat16; conv_weight [C, Cin, kh, kw] (stride 1) and conv_bias
    [C] of x's dtype (any floating dtypes under autocast); weight, bias floating [C]; all five on one device;
    padding an int >= 0 with H' = H + 2 padding - kh + 1 >= 2 (W' alike); eps a finite number > 0. Returns
    [N, C, H' // 2, W' // 2]. The fused C++ kernel runs where ``backend`` resolves to ``"cpp"`` (``"auto"``: as
    calibrated for this op, against the convolution followed by the C++ tail), x is float32 or float64 and needs no
    gradient, and Cin kh kw <= ``MAX_FUSED_TAPS``; otherwise the composition (with ``backend`` passed on).
    ``memory_format``: the layout the block's maps and result are computed in, ``torch.contiguous_format`` or
    ``torch.channels_last`` (the convolution and the C++ tail then run on channels_last maps: the same values, to
    rounding, faster where oneDNN's channels_last convolutions are; see :mod:`fastdd.ops.calibration`).
    """
    _validate_conv(x, conv_weight, conv_bias, weight, bias, padding, eps)
    if memory_format not in (torch.contiguous_format, torch.channels_last):
        raise ValueError(f"memory_format must be torch.contiguous_format or torch.channels_last, got {memory_format}")
    name = _backend.resolve_backend(backend, [x, conv_weight, conv_bias, weight, bias], _EXTENSION,
                                    family="conv_norm_relu_pool")
    fused = (name == "cpp" and not x.requires_grad and x.dtype in (torch.float32, torch.float64)
             and conv_weight.shape[1:].numel() <= MAX_FUSED_TAPS and not torch._C._are_functorch_transforms_active())
    if not fused:
        z = F.conv2d(_in_layout(x, memory_format), conv_weight, conv_bias, padding=padding)
        return instance_norm_relu_pool(z.contiguous(memory_format=memory_format), weight, bias, eps, backend=backend)
    params = [t.to(x.dtype).contiguous() for t in (conv_weight, conv_bias, weight, bias)]
    return _backend.apply(_ConvNormReLUPool, x.contiguous(), *params, padding, float(eps), memory_format)[0]


def _in_layout(x: Tensor, memory_format: torch.memory_format) -> Tensor:
    """x [N, C, H, W] in ``memory_format``. A one-channel x is both layouts at once, and torch's convolution then
    writes a contiguous map: it is given channels_last strides (a view), so that the map comes out channels_last."""
    if memory_format == torch.channels_last and x.shape[1] == 1:
        n, _, h, w = x.shape
        return x.contiguous().view(n, h, w, 1).permute(0, 3, 1, 2)
    return x.contiguous(memory_format=memory_format)


def _validate_conv(x: Tensor, conv_weight: Tensor, conv_bias: Tensor, weight: Tensor, bias: Tensor, padding: int,
                   eps: float) -> None:
    """Raise ValueError naming the first argument of :func:`conv_instance_norm_relu_pool` that is not as documented."""
    _validate_input(x, "[N, Cin, H, W]")
    checks.tensor("conv_weight", conv_weight)
    if conv_weight.dim() != 4 or conv_weight.numel() == 0 or conv_weight.shape[1] != x.shape[1]:
        raise ValueError(f"conv_weight must be a non-empty [C, Cin = {x.shape[1]}, kh, kw] tensor, "
                         f"got shape {tuple(conv_weight.shape)}")
    checks.tensor("conv_bias", conv_bias)
    if conv_bias.shape != conv_weight.shape[:1]:
        raise ValueError(f"conv_bias must be [C] = [{len(conv_weight)}], got shape {tuple(conv_bias.shape)}")
    device = x.device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):  # else autocast casts
        for name, t in (("conv_weight", conv_weight), ("conv_bias", conv_bias)):
            if t.dtype != x.dtype:
                raise ValueError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    _validate_affine(weight, bias, len(conv_weight))
    nonnegative_int("padding", padding)
    sides = [x.shape[2] + 2 * padding - conv_weight.shape[2] + 1, x.shape[3] + 2 * padding - conv_weight.shape[3] + 1]
    if min(sides) < 2:
        raise ValueError(f"x {tuple(x.shape[2:])} with padding {padding} and conv_weight's kernel "
                         f"{tuple(conv_weight.shape[2:])} gives a {sides[0]} x {sides[1]} map; pooling needs at least "
                         "2 x 2")
    checks.one_device({"x": x, "conv_weight": conv_weight, "conv_bias": conv_bias, "weight": weight, "bias": bias})
    positive_float("eps", eps)
