"""Triton kernel: per-sample squared norms of Conv2d weight gradients, direct form.

For sample b and group k the weight gradient is ``G U^T`` (G = dL/dz [p, T], U the unfolded input
[D, T]). One program owns a [BLOCK_P, BLOCK_D] tile of it: it walks the T output positions in
blocks, gathers the matching input elements straight from the (padded) input (implicit im2col: U is
never written), accumulates the tile in fp32 registers (fp64 for fp64 inputs) and stores only the tile's squared
sum. The convolution's geometry (kernel, stride, dilation) is passed at run time: one specialisation per dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdd.ops import _backend

from .resources import FLOAT_TYPES, LaunchConfig, pointer

BLOCK = 32  # the tile's rows (output channels), columns (input channels x kernel positions) and positions per step


def _acc_type(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _conv_weight_sq_norm_kernel(
    a_ptr, g_ptr, out_ptr,
    groups, cin, height, width, p, out_w, d, t, KH, KW, SH, SW, DH, DW,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, ACC: tl.constexpr,
):
    n = tl.program_id(0)  # sample * groups + group
    tile_p, tile_d = tl.program_id(1), tl.program_id(2)
    b, k = n // groups, n % groups
    offs_p = tile_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tile_d * BLOCK_D + tl.arange(0, BLOCK_D)
    # d -> (channel, kernel row, kernel column), as torch's unfold orders it
    c = offs_d // (KH * KW)
    i = (offs_d // KW) % KH
    j = offs_d % KW
    a_base = a_ptr + (b * groups + k).to(tl.int64) * cin * height * width
    g_base = g_ptr + (b * groups + k).to(tl.int64) * p * t
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=ACC)
    for t0 in range(0, t, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        y, x = offs_t // out_w, offs_t % out_w
        g_tile = tl.load(g_base + offs_p[:, None] * t + offs_t[None, :],
                         mask=(offs_p[:, None] < p) & (offs_t[None, :] < t), other=0.0)
        rows = y[:, None] * SH + i[None, :] * DH
        cols = x[:, None] * SW + j[None, :] * DW
        u_tile = tl.load(a_base + (c[None, :] * height + rows) * width + cols,
                         mask=(offs_t[:, None] < t) & (offs_d[None, :] < d), other=0.0)
        if ACC == tl.float64:
            acc += tl.dot(g_tile, u_tile)
        elif g_tile.dtype == tl.float32:  # no TF32 rounding: norms are compared at fp32 precision
            acc += tl.dot(g_tile, u_tile, input_precision="ieee")
        else:  # fp16 / bf16 inputs, fp32 accumulation
            acc += tl.dot(g_tile, u_tile)
    # the tile's rows past p and columns past d hold 0 * (an input), NaN when that input is infinite: not summed
    acc = tl.where((offs_p[:, None] < p) & (offs_d[None, :] < d), acc, 0.0)
    tiles_p, tiles_d = tl.num_programs(1), tl.num_programs(2)
    tl.store(out_ptr + (n * tiles_p + tile_p) * tiles_d + tile_d, tl.sum(acc * acc))


def conv2d_weight_sq_norms(a: torch.Tensor, g: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                           dilation: tuple[int, int], groups: int) -> torch.Tensor:
    """[B * groups, tiles] partial squared sums (fp64 for fp64 inputs, else fp32); a: padded input
    [B, Cin, H, W], g: [B, Cout, Ho, Wo]."""
    b, cin_total, height, width = a.shape
    cin, p = cin_total // groups, g.shape[1] // groups
    t, d = g.shape[2] * g.shape[3], cin * kernel[0] * kernel[1]
    grid = (b * groups, triton.cdiv(p, BLOCK), triton.cdiv(d, BLOCK))
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    out = _backend.empty((grid[0], grid[1] * grid[2]), acc, a.device)
    _conv_weight_sq_norm_kernel[grid](
        a, g, out, groups, cin, height, width, p, g.shape[3], d, t, *kernel, *stride, *dilation,
        BLOCK_P=BLOCK, BLOCK_D=BLOCK, BLOCK_T=BLOCK, ACC=_acc_type(a.dtype),
    )
    return out


def launch_configs() -> list[LaunchConfig]:
    """Every kernel specialisation :func:`conv2d_weight_sq_norms` can launch: inputs of each floating dtype."""
    ints = dict.fromkeys(("groups", "cin", "height", "width", "p", "out_w", "d", "t", "KH", "KW", "SH", "SW", "DH",
                          "DW"), "i32")
    return [LaunchConfig(_conv_weight_sq_norm_kernel,
                         dict(a_ptr=pointer(dtype), g_ptr=pointer(dtype),
                              out_ptr=pointer(torch.float64 if dtype == torch.float64 else torch.float32), **ints),
                         dict(BLOCK_P=BLOCK, BLOCK_D=BLOCK, BLOCK_T=BLOCK, ACC=_acc_type(dtype)))
            for dtype in FLOAT_TYPES]
