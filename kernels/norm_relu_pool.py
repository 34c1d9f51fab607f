"""Triton kernels of instance_norm_relu_pool: one program per (sample, channel) plane of L = H * W values, which it
walks in tiles of BLOCK values (at most ``MAX_BLOCK``: a program's registers stay bounded for any plane size).

Forward, two passes: the plane's mean and rstd (each tile's mean and centred sum of squares merged into the running
ones, Chan et al.'s update, as exact as two passes over the plane), then each 2x2 window of ``relu(a x + b)``
(a = rstd gamma, b = beta - mean a; NaN kept, as torch.relu) averaged into the output, BLOCK / 4 windows at a time.
Backward, two passes: ``gz = [not a x + b <= 0] grad_out[h / 2, w / 2] / 4`` (0 on the rows and columns AvgPool2d
drops; a NaN passes, as in torch's threshold_backward) summed into ``db = sum gz`` and ``ds = sum gz x``, then, in
ATen's GroupNorm formulation (so that infinities meet as there), ``grad_x = c1 gz + c2 x + c3`` with ``c1 = a``,
``c2 = (db gamma mean - ds gamma) rstd^3 / L``, ``c3 = -c2 mean - db gamma rstd / L``; per plane ``(ds - db mean)
rstd`` and ``db`` are the contributions to grad_gamma and grad_beta. Statistics in float32 (float64 for float64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastdd.ops._dtypes import NORM_RELU_POOL

from .resources import LaunchConfig, pointer, powers_of_two

MIN_BLOCK = 128  # one value per thread of the default 4 warps: a smaller tile would leave threads idle
MAX_BLOCK = 1024  # values of a plane a program holds at once: few registers (bench/results/triton_resources.md)


def block(length: int) -> int:
    """The tile of a plane of ``length`` values: a power of 2 from ``MIN_BLOCK`` to ``MAX_BLOCK``, the whole plane
    when it fits."""
    return min(max(triton.next_power_of_2(length), MIN_BLOCK), MAX_BLOCK)


def _acc_type(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _forward_kernel(x_ptr, gamma_ptr, beta_ptr, out_ptr, mean_ptr, rstd_ptr, C, H, W, eps,
                    ACC: tl.constexpr, BLOCK: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    c = plane % C
    length = H * W
    x_plane = x_ptr + plane * length
    mean = tl.zeros((), ACC)
    m2 = tl.zeros((), ACC)  # sum of squared deviations from mean
    seen = tl.zeros((), ACC)
    for start in range(0, length, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < length
        x = tl.load(x_plane + offs, mask=inside, other=0.0).to(ACC)
        count = tl.minimum(length - start, BLOCK).to(ACC)
        tile_mean = tl.sum(x, axis=0) / count
        centred = tl.where(inside, x - tile_mean, 0.0)
        total = seen + count
        delta = tile_mean - mean
        mean += delta * (count / total)
        m2 += tl.sum(centred * centred, axis=0) + delta * delta * (seen * count / total)
        seen = total
    rstd = 1.0 / tl.sqrt(m2 / length + eps)
    a = rstd * tl.load(gamma_ptr + c).to(ACC)
    b = tl.load(beta_ptr + c).to(ACC) - mean * a
    tl.store(mean_ptr + plane, mean)
    tl.store(rstd_ptr + plane, rstd)
    wo = W // 2
    windows = (H // 2) * wo
    for start in range(0, windows, BLOCK // 4):
        o = start + tl.arange(0, BLOCK // 4)
        o_inside = o < windows
        corner = x_plane + (o // wo) * 2 * W + (o % wo) * 2
        total = tl.zeros([BLOCK // 4], dtype=ACC)
        for dh in tl.static_range(2):
            for dw in tl.static_range(2):
                v = tl.load(corner + dh * W + dw, mask=o_inside, other=0.0).to(ACC)
                total += tl.maximum(a * v + b, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN kept, as torch.relu
        tl.store(out_ptr + plane * windows + o, (0.25 * total).to(out_ptr.dtype.element_ty), mask=o_inside)


@triton.jit
def _relu_pool_grad(grad_out_ptr, x_plane, offs, length, W, wo, ho, a, b, ACC: tl.constexpr):
    """(gz, x) at the plane offsets ``offs``: the gradient reaching the norm's output, and the input."""
    inside = offs < length
    h, w = offs // W, offs % W
    pooled = inside & (h < 2 * ho) & (w < 2 * wo)
    x = tl.load(x_plane + offs, mask=inside, other=0.0).to(ACC)
    g = tl.load(grad_out_ptr + (h // 2) * wo + w // 2, mask=pooled, other=0.0).to(ACC)
    return tl.where(a * x + b <= 0, 0.0, 0.25 * g), x  # as threshold_backward: a NaN z passes the gradient


@triton.jit
def _backward_kernel(grad_out_ptr, x_ptr, gamma_ptr, beta_ptr, mean_ptr, rstd_ptr, grad_x_ptr, grad_gamma_ptr,
                     grad_beta_ptr, C, H, W, ACC: tl.constexpr, BLOCK: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    c = plane % C
    length = H * W
    ho, wo = H // 2, W // 2
    x_plane = x_ptr + plane * length
    g_plane = grad_out_ptr + plane * ho * wo
    mean, rstd = tl.load(mean_ptr + plane), tl.load(rstd_ptr + plane)
    gamma = tl.load(gamma_ptr + c).to(ACC)
    a = rstd * gamma
    b = tl.load(beta_ptr + c).to(ACC) - mean * a
    db_acc = tl.zeros([BLOCK], dtype=ACC)
    ds_acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, length, BLOCK):
        gz, x = _relu_pool_grad(g_plane, x_plane, start + tl.arange(0, BLOCK), length, W, wo, ho, a, b, ACC)
        db_acc += gz
        ds_acc += gz * x
    db = tl.sum(db_acc, axis=0)
    ds = tl.sum(ds_acc, axis=0)
    # ATen's formulation (see the module docstring)
    c2 = (db * gamma * mean - ds * gamma) * rstd * rstd * rstd / length
    c3 = -c2 * mean - db * gamma * rstd / length
    for start in range(0, length, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        gz, x = _relu_pool_grad(g_plane, x_plane, offs, length, W, wo, ho, a, b, ACC)
        dx = a * gz + c2 * x + c3
        tl.store(grad_x_ptr + plane * length + offs, dx.to(grad_x_ptr.dtype.element_ty), mask=offs < length)
    tl.store(grad_gamma_ptr + plane, (ds - db * mean) * rstd)
    tl.store(grad_beta_ptr + plane, db)


def forward(x: Tensor, gamma: Tensor, beta: Tensor, eps: float, out: Tensor, mean: Tensor, rstd: Tensor) -> None:
    """Fill out [N, C, H/2, W/2] and mean, rstd [N, C] from contiguous x [N, C, H, W]."""
    n, c, h, w = x.shape
    _forward_kernel[(n * c,)](x, gamma, beta, out, mean, rstd, c, h, w, eps, ACC=_acc_type(x.dtype),
                              BLOCK=block(h * w))


def backward(grad_out: Tensor, x: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, rstd: Tensor, grad_x: Tensor,
             grad_gamma: Tensor, grad_beta: Tensor) -> None:
    """Fill grad_x [N, C, H, W] and the per-plane grad_gamma, grad_beta [N, C]."""
    n, c, h, w = x.shape
    _backward_kernel[(n * c,)](grad_out, x, gamma, beta, mean, rstd, grad_x, grad_gamma, grad_beta, c, h, w,
                               ACC=_acc_type(x.dtype), BLOCK=block(h * w))


def launch_configs() -> list[LaunchConfig]:
    """Every kernel specialisation :func:`forward` and :func:`backward` can launch: x of each dtype the op takes
    (gamma, beta and the statistics in the accumulation dtype), each tile size :func:`block` returns."""
    configs = []
    for dtype in NORM_RELU_POOL:
        x, acc = pointer(dtype), pointer(torch.float64 if dtype == torch.float64 else torch.float32)
        ints = dict(C="i32", H="i32", W="i32")
        for size in powers_of_two(MIN_BLOCK, MAX_BLOCK):
            constexprs = dict(ACC=_acc_type(dtype), BLOCK=size)
            configs.append(LaunchConfig(_forward_kernel, dict(
                x_ptr=x, gamma_ptr=acc, beta_ptr=acc, out_ptr=x, mean_ptr=acc, rstd_ptr=acc, **ints, eps="fp32"),
                constexprs))
            configs.append(LaunchConfig(_backward_kernel, dict(
                grad_out_ptr=x, x_ptr=x, gamma_ptr=acc, beta_ptr=acc, mean_ptr=acc, rstd_ptr=acc, grad_x_ptr=x,
                grad_gamma_ptr=acc, grad_beta_ptr=acc, **ints), constexprs))
    return configs
