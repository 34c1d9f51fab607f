"""Triton kernels of masked_feature_contrastive: the two passes over the [N, C, L] feature map (L = H * W).

Forward: masked average pooling ``pooled[n, c] = inv_msum[n] * sum_l f[n, c, l] * m[n, l]`` with
``inv_msum[n] = 1 / max(sum_l m[n, l], 1e-6)``, one read of the features and never the product ``f * m``.
Backward: ``grad_f[n, c, l] = m[n, l] * scale[n, c]``, one write. Features may be
float16/bfloat16/float32/float64; masks, ``inv_msum``, ``scale`` and ``pooled`` are in
the compute dtype (float64 for float64 features, float32 otherwise), which is also the accumulator's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastdd.ops import _backend
from fastdd.ops._dtypes import MASKED_CONTRASTIVE_CUDA

from .resources import LaunchConfig, pointer, powers_of_two

_BLOCK_C = 32
# positions a program takes at once: at least one warp's width, at most what keeps the forward's [BLOCK_C, BLOCK_L]
# accumulator in few registers (bench/results/triton_resources.md)
_MIN_BLOCK_L, _MAX_BLOCK_L = 32, 64


def _block_l(length: int) -> int:
    """The positions a program takes at once: a power of 2 from ``_MIN_BLOCK_L`` to ``_MAX_BLOCK_L``, all of them
    when they fit."""
    return min(max(triton.next_power_of_2(length), _MIN_BLOCK_L), _MAX_BLOCK_L)


def _acc_type(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _pool_forward_kernel(f_ptr, m_ptr, out_ptr, inv_ptr, C, L,
                         ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    c_block = tl.program_id(1)
    cs = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    acc = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
    msum = tl.zeros([BLOCK_L], dtype=ACC)
    for start in range(0, L, BLOCK_L):
        ls = start + tl.arange(0, BLOCK_L)
        l_ok = ls < L
        m = tl.load(m_ptr + n * L + ls, mask=l_ok, other=0.0).to(ACC)
        f = tl.load(f_ptr + (n * C + cs[:, None]) * L + ls[None, :], mask=c_ok[:, None] & l_ok[None, :], other=0.0)
        acc += f.to(ACC) * m[None, :]
        msum += m
    inv = 1.0 / tl.maximum(tl.sum(msum, axis=0), 1e-6)
    tl.store(out_ptr + n * C + cs, tl.sum(acc, axis=1) * inv, mask=c_ok)
    tl.store(inv_ptr + n, inv, mask=c_block == 0)


@triton.jit
def _pool_backward_kernel(m_ptr, scale_ptr, out_ptr, C, L,
                          ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ls = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    c_ok, l_ok = cs < C, ls < L
    m = tl.load(m_ptr + n * L + ls, mask=l_ok, other=0.0).to(ACC)
    s = tl.load(scale_ptr + n * C + cs, mask=c_ok, other=0.0).to(ACC)
    grad = s[:, None] * m[None, :]
    tl.store(out_ptr + (n * C + cs[:, None]) * L + ls[None, :], grad.to(out_ptr.dtype.element_ty),
             mask=c_ok[:, None] & l_ok[None, :])


def pool_forward(features: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """(pooled [N, C], inv_msum [N]) in the masks' dtype from contiguous features [N, C, L] and masks [N, L]."""
    n, c, length = features.shape
    pooled = _backend.empty((n, c), masks.dtype, features.device)
    inv_msum = _backend.empty((n,), masks.dtype, features.device)
    block_l = _block_l(length)
    _pool_forward_kernel[(n, triton.cdiv(c, _BLOCK_C))](
        features, masks, pooled, inv_msum, c, length,
        ACC=_acc_type(masks.dtype), BLOCK_C=_BLOCK_C, BLOCK_L=block_l)
    return pooled, inv_msum


def pool_backward(masks: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """grad_features [N, C, L] in ``dtype``: ``masks[:, None, :] * scale[:, :, None]``."""
    (n, length), c = masks.shape, scale.shape[1]
    grad = _backend.empty((n, c, length), dtype, masks.device)
    block_l = _block_l(length)
    _pool_backward_kernel[(n, triton.cdiv(c, _BLOCK_C), triton.cdiv(length, block_l))](
        masks, scale, grad, c, length, ACC=_acc_type(masks.dtype), BLOCK_C=_BLOCK_C, BLOCK_L=block_l)
    return grad


def launch_configs() -> list[LaunchConfig]:
    """Every kernel specialisation :func:`pool_forward` and :func:`pool_backward` can launch: features of each dtype
    the op takes on CUDA (masks, scale and the pooled values in the compute dtype), each :func:`_block_l`."""
    configs = []
    for dtype in MASKED_CONTRASTIVE_CUDA:
        f, compute = pointer(dtype), pointer(torch.float64 if dtype == torch.float64 else torch.float32)
        for block_l in powers_of_two(_MIN_BLOCK_L, _MAX_BLOCK_L):
            constexprs = dict(ACC=_acc_type(dtype), BLOCK_C=_BLOCK_C, BLOCK_L=block_l)
            configs.append(LaunchConfig(_pool_forward_kernel, dict(f_ptr=f, m_ptr=compute, out_ptr=compute,
                                                                   inv_ptr=compute, C="i32", L="i32"), constexprs))
            configs.append(LaunchConfig(_pool_backward_kernel, dict(m_ptr=compute, scale_ptr=compute, out_ptr=f,
                                                                    C="i32", L="i32"), constexprs))
    return configs
