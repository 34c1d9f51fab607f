"""Triton kernels of instance_norm_relu_pool: one program per (sample, channel) plane of L = H * W values.

Forward: the plane's mean and rstd, then each 2x2 window of ``relu(a x + b)`` (a = rstd gamma, b = beta -
mean a; NaN kept, as torch.relu) averaged into the output. Backward: ``gz = [not a x + b <= 0] grad_out[h / 2,
w / 2] / 4`` (0 on the rows and columns AvgPool2d drops; a NaN passes, as in torch's threshold_backward),
``db = sum gz``, ``ds = sum gz x``, and in ATen's GroupNorm formulation (so that infinities meet as there)
``grad_x = c1 gz + c2 x + c3`` with ``c1 = a``, ``c2 = (db gamma mean - ds gamma) rstd^3 / L``, ``c3 = -c2 mean -
db gamma rstd / L``; per plane ``(ds - db mean) rstd`` and ``db`` are the contributions to grad_gamma and
grad_beta. The plane is held whole in one block (the op sends planes above 128 x 128 to torch); statistics in
float32 (float64 for float64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def _acc_type(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _forward_kernel(x_ptr, gamma_ptr, beta_ptr, out_ptr, mean_ptr, rstd_ptr, C, H, W, eps,
                    ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_OUT: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    c = plane % C
    length = H * W
    offs = tl.arange(0, BLOCK)
    inside = offs < length
    x = tl.load(x_ptr + plane * length + offs, mask=inside, other=0.0).to(ACC)
    mean = tl.sum(x, axis=0) / length
    centred = tl.where(inside, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / length + eps)
    a = rstd * tl.load(gamma_ptr + c).to(ACC)
    b = tl.load(beta_ptr + c).to(ACC) - mean * a
    tl.store(mean_ptr + plane, mean)
    tl.store(rstd_ptr + plane, rstd)
    wo = W // 2
    o = tl.arange(0, BLOCK_OUT)
    o_inside = o < (H // 2) * wo
    corner = x_ptr + plane * length + (o // wo) * 2 * W + (o % wo) * 2
    total = tl.zeros([BLOCK_OUT], dtype=ACC)
    for dh in tl.static_range(2):
        for dw in tl.static_range(2):
            v = tl.load(corner + dh * W + dw, mask=o_inside, other=0.0).to(ACC)
            total += tl.maximum(a * v + b, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN kept, as torch.relu
    tl.store(out_ptr + plane * (H // 2) * wo + o, (0.25 * total).to(out_ptr.dtype.element_ty), mask=o_inside)


@triton.jit
def _backward_kernel(grad_out_ptr, x_ptr, gamma_ptr, beta_ptr, mean_ptr, rstd_ptr, grad_x_ptr, grad_gamma_ptr,
                     grad_beta_ptr, C, H, W, ACC: tl.constexpr, BLOCK: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    c = plane % C
    length = H * W
    ho, wo = H // 2, W // 2
    offs = tl.arange(0, BLOCK)
    inside = offs < length
    h, w = offs // W, offs % W
    pooled = inside & (h < 2 * ho) & (w < 2 * wo)
    x = tl.load(x_ptr + plane * length + offs, mask=inside, other=0.0).to(ACC)
    mean, rstd = tl.load(mean_ptr + plane), tl.load(rstd_ptr + plane)
    gamma = tl.load(gamma_ptr + c).to(ACC)
    a = rstd * gamma
    b = tl.load(beta_ptr + c).to(ACC) - mean * a
    g = tl.load(grad_out_ptr + plane * ho * wo + (h // 2) * wo + w // 2, mask=pooled, other=0.0).to(ACC)
    gz = tl.where(a * x + b <= 0, 0.0, 0.25 * g)  # as torch's threshold_backward: a NaN z passes the gradient
    db = tl.sum(gz, axis=0)
    ds = tl.sum(gz * x, axis=0)
    # ATen's formulation (see the module docstring)
    c2 = (db * gamma * mean - ds * gamma) * rstd * rstd * rstd / length
    c3 = -c2 * mean - db * gamma * rstd / length
    dx = a * gz + c2 * x + c3
    tl.store(grad_x_ptr + plane * length + offs, dx.to(grad_x_ptr.dtype.element_ty), mask=inside)
    tl.store(grad_gamma_ptr + plane, (ds - db * mean) * rstd)
    tl.store(grad_beta_ptr + plane, db)


def forward(x: Tensor, gamma: Tensor, beta: Tensor, eps: float, out: Tensor, mean: Tensor, rstd: Tensor) -> None:
    """Fill out [N, C, H/2, W/2] and mean, rstd [N, C] from contiguous x [N, C, H, W]."""
    n, c, h, w = x.shape
    _forward_kernel[(n * c,)](x, gamma, beta, out, mean, rstd, c, h, w, eps, ACC=_acc_type(x.dtype),
                              BLOCK=triton.next_power_of_2(h * w),
                              BLOCK_OUT=triton.next_power_of_2(max(1, (h // 2) * (w // 2))))


def backward(grad_out: Tensor, x: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, rstd: Tensor, grad_x: Tensor,
             grad_gamma: Tensor, grad_beta: Tensor) -> None:
    """Fill grad_x [N, C, H, W] and the per-plane grad_gamma, grad_beta [N, C]."""
    n, c, h, w = x.shape
    _backward_kernel[(n * c,)](grad_out, x, gamma, beta, mean, rstd, grad_x, grad_gamma, grad_beta, c, h, w,
                               ACC=_acc_type(x.dtype), BLOCK=triton.next_power_of_2(h * w))
