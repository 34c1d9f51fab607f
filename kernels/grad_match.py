"""Triton kernels of the gradient-matching distance: per-chunk sums (and unit-upstream gradients) and
input gradients from per-row coefficients (for "cos", whose rows span many chunks).

Both lists of gradients are flattened and concatenated, layer after layer, into one buffer each; a
table of chunks [chunks, 4] = (layer, start, length, row) says which elements every program owns
(``length`` of them from ``layer_offsets[layer] + start``) and the output row they belong to (-1: the
chunk adds nothing and its gradient is zero). One program per chunk, which walks it BLOCK elements at a time; sums
accumulate in fp32 (fp64 for fp64 inputs). Kinds: 0 dot/norms (``<a,b>, |a|^2, |b|^2``), 1 sum of (a-b)^2, 2 sum of
|a-b|. Which gradients to write (``write_a``, ``write_b``) is a run-time flag: one specialisation serves all four.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdd.ops import _backend

from .resources import FLOAT_TYPES, LaunchConfig, pointer

BLOCK = 512
EPS: tl.constexpr = tl.constexpr(1e-6)


@triton.jit
def _chunk(table_ptr, offsets_ptr):
    """(first element in the flat buffer, length, row) of this program's chunk."""
    c = tl.program_id(0).to(tl.int64)
    layer = tl.load(table_ptr + 4 * c)
    start = tl.load(offsets_ptr + layer) + tl.load(table_ptr + 4 * c + 1)
    return start, tl.load(table_ptr + 4 * c + 2), tl.load(table_ptr + 4 * c + 3)


@triton.jit
def _write(a_ptr, b_ptr, ga_ptr, gb_ptr, start, length, row, alpha_a, beta_a, alpha_b, beta_b, write_a, write_b,
           ACC: tl.constexpr, SIGN: tl.constexpr, BLOCK: tl.constexpr):
    """ga = alpha_a a + beta_a b and gb = alpha_b b + beta_b a over the chunk (SIGN: ga = alpha_a sign(a - b)
    = -gb), computed in ACC; zeros where row < 0."""
    valid = row >= 0
    for i in range(0, length, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        mask = offs < length
        x = tl.load(a_ptr + start + offs, mask=mask, other=0.0).to(ACC)
        y = tl.load(b_ptr + start + offs, mask=mask, other=0.0).to(ACC)
        if SIGN:
            gx = alpha_a * ((x > y).to(ACC) - (x < y).to(ACC))
            gy = -gx
        else:
            gx = alpha_a * x + beta_a * y
            gy = alpha_b * y + beta_b * x
        if write_a:
            tl.store(ga_ptr + start + offs, tl.where(valid, gx, 0.0).to(ga_ptr.dtype.element_ty), mask=mask)
        if write_b:
            tl.store(gb_ptr + start + offs, tl.where(valid, gy, 0.0).to(gb_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_sums_kernel(a_ptr, b_ptr, table_ptr, offsets_ptr, out_ptr, ua_ptr, ub_ptr, write_a, write_b,
                     KIND: tl.constexpr, BLOCK: tl.constexpr):
    start, length, row = _chunk(table_ptr, offsets_ptr)
    acc: tl.constexpr = out_ptr.dtype.element_ty
    n = tl.where(row < 0, 0, length)
    s0 = tl.zeros((BLOCK,), acc)
    s1 = tl.zeros((BLOCK,), acc)
    s2 = tl.zeros((BLOCK,), acc)
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(a_ptr + start + offs, mask=mask, other=0.0).to(acc)
        y = tl.load(b_ptr + start + offs, mask=mask, other=0.0).to(acc)
        if KIND == 0:
            s0 += x * y
            s1 += x * x
            s2 += y * y
        elif KIND == 1:
            s0 += (x - y) * (x - y)
        else:
            s0 += tl.abs(x - y)
    c = tl.program_id(0).to(tl.int64)
    dot, sq_a, sq_b = tl.sum(s0), tl.sum(s1), tl.sum(s2)
    if KIND == 0:
        tl.store(out_ptr + 3 * c, dot)
        tl.store(out_ptr + 3 * c + 1, sq_a)
        tl.store(out_ptr + 3 * c + 2, sq_b)
    else:
        tl.store(out_ptr + c, dot)
    if write_a or write_b:  # gradients for an upstream gradient of 1; for KIND 0 the chunk is a whole row
        if KIND == 0:  # d/da [1 - <a,b> / D] = -b / D + <a,b> |b| a / (|a| D^2); the norm's gradient is 0 at 0
            norm_a, norm_b = tl.sqrt(sq_a), tl.sqrt(sq_b)
            d = norm_a * norm_b + EPS
            scale = dot / (d * d)
            alpha_a = tl.where(norm_a > 0, scale * norm_b / tl.maximum(norm_a, 1e-30), 0.0)
            alpha_b = tl.where(norm_b > 0, scale * norm_a / tl.maximum(norm_b, 1e-30), 0.0)
            _write(a_ptr, b_ptr, ua_ptr, ub_ptr, start, length, row, alpha_a, -1.0 / d, alpha_b, -1.0 / d,
                   write_a, write_b, acc, False, BLOCK)
        else:
            scale = 2.0 if KIND == 1 else 1.0
            _write(a_ptr, b_ptr, ua_ptr, ub_ptr, start, length, row, scale, -scale, scale, -scale,
                   write_a, write_b, acc, KIND == 2, BLOCK)


@triton.jit
def _grads_kernel(a_ptr, b_ptr, table_ptr, offsets_ptr, coef_ptr, ga_ptr, gb_ptr, write_a, write_b,
                  BLOCK: tl.constexpr):
    start, length, row = _chunk(table_ptr, offsets_ptr)
    r = tl.maximum(row, 0)
    _write(a_ptr, b_ptr, ga_ptr, gb_ptr, start, length, row,
           tl.load(coef_ptr + 4 * r), tl.load(coef_ptr + 4 * r + 1),
           tl.load(coef_ptr + 4 * r + 2), tl.load(coef_ptr + 4 * r + 3), write_a, write_b,
           coef_ptr.dtype.element_ty, False, BLOCK)


def row_sums(a: torch.Tensor, b: torch.Tensor, table: torch.Tensor, layer_offsets: torch.Tensor, kind: int,
             acc_dtype: torch.dtype, write_a: bool, write_b: bool):
    """Partial sums [chunks, 3 if kind == 0 else 1] and the flat unit-upstream gradients (unit_a, unit_b),
    each None unless asked for; a, b: the flat concatenated gradients."""
    out = _backend.empty((len(table), 3 if kind == 0 else 1), acc_dtype, a.device)
    ua, ub = (_backend.empty(a.shape, a.dtype, a.device) if w else None for w in (write_a, write_b))
    _row_sums_kernel[(len(table),)](a, b, table, layer_offsets, out, a if ua is None else ua, a if ub is None else ub,
                                    write_a, write_b, KIND=kind, BLOCK=BLOCK)
    return out, ua, ub


def input_grads(a: torch.Tensor, b: torch.Tensor, table: torch.Tensor, layer_offsets: torch.Tensor,
                coef: torch.Tensor, write_a: bool, write_b: bool):
    """Flat (grad_a, grad_b), each None unless asked for: ``alpha_a a + beta_a b`` and ``alpha_b b + beta_b a``
    with coef [rows, 4] = (alpha_a, beta_a, alpha_b, beta_b)."""
    ga, gb = (_backend.empty(a.shape, a.dtype, a.device) if w else None for w in (write_a, write_b))
    _grads_kernel[(len(table),)](a, b, table, layer_offsets, coef, a if ga is None else ga, a if gb is None else gb,
                                 write_a, write_b, BLOCK=BLOCK)
    return ga, gb


def launch_configs() -> list[LaunchConfig]:
    """Every kernel specialisation :func:`row_sums` and :func:`input_grads` can launch: gradients of each floating
    dtype (sums and coefficients in the accumulation dtype), each kind."""
    configs = []
    for dtype in FLOAT_TYPES:
        x, acc, index = pointer(dtype), pointer(torch.float64 if dtype == torch.float64 else torch.float32), "*i64"
        common = dict(a_ptr=x, b_ptr=x, table_ptr=index, offsets_ptr=index, write_a="i1", write_b="i1")
        configs += [LaunchConfig(_row_sums_kernel, dict(common, out_ptr=acc, ua_ptr=x, ub_ptr=x),
                                 dict(KIND=kind, BLOCK=BLOCK)) for kind in (0, 1, 2)]
        configs.append(LaunchConfig(_grads_kernel, dict(common, coef_ptr=acc, ga_ptr=x, gb_ptr=x), dict(BLOCK=BLOCK)))
    return configs
