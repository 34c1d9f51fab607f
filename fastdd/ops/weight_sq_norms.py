"""Squared norms of per-sample weight gradients that are products ``G U^T``, without forming the products.

A Linear or Conv2d layer's weight gradient for one sample is ``G U^T``: ``U`` [D, T] its input (for a
convolution unfolded, per group), ``G`` [p, T] its output gradient, T the positions. Its squared Frobenius
norm is either taken directly (``|G U^T|^2``, tile by tile in the fused kernels) or as the ghost norm
``<U^T U, G^T G>`` over T x T positions, whichever needs fewer FLOPs: ghost when ``T (D + p) < D p``.
:func:`matmul_sq_norms` is the plain-torch form for any ``U``, ``G``; :func:`conv2d_weight_sq_norms` the
Conv2d form on every backend (padding modes, stride, dilation, groups), differentiable w.r.t. its inputs.
Non-finite inputs: the direct form gives the NaN or +inf norms of the formed per-sample gradients; the ghost form
gives NaN for NaN, and may give NaN where they give +inf (its sums add infinities of both signs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdd.ops import _backend

# Largest intermediate a chunk of the plain-torch forms may hold, in elements (256 MiB of float32).
_CHUNK_ELEMENTS = 1 << 26


def matmul_sq_norms(u: Tensor, gm: Tensor) -> Tensor:
    """[B] ``|G U^T|_F^2`` for u [B, D, T], gm [B, p, T]; direct or ghost form, whichever is cheaper."""
    b, d, t = u.shape
    p = gm.shape[1]
    ghost = t * (d + p) < d * p
    per_sample = t * t if ghost else p * d
    step = max(1, _CHUNK_ELEMENTS // max(1, per_sample + d * t))
    out = []
    for uc, gc in zip(u.split(step), gm.split(step)):
        if ghost:
            out.append((uc.transpose(1, 2) @ uc).mul(gc.transpose(1, 2) @ gc).sum((1, 2)))
        else:
            out.append((gc @ uc.transpose(1, 2)).pow(2).sum((1, 2)))
    return torch.cat(out)


def _window(start: int, count: int, step: int) -> slice:
    """``count`` indices ``start, start + step, ...``: the input rows (or columns) one kernel tap reads."""
    return slice(start, start + step * (count - 1) + 1, step)


def unfold(a: Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
           out_hw: tuple[int, int]) -> Tensor:
    """im2col of an already padded input: [B, C, H, W] -> [B, C * kh * kw, Ho * Wo], torch's unfold order.

    kh * kw strided copies; torch's own ``F.unfold`` measured about 40x slower on CPU at ConvNet shapes.
    """
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel, stride, dilation, out_hw
    cols = [a[:, :, _window(i * dh, ho, sh), _window(j * dw, wo, sw)]
            for i in range(kh) for j in range(kw)]
    return torch.stack(cols, dim=2).reshape(a.shape[0], -1, ho * wo)


def fold(u: Tensor, shape: torch.Size, kernel: tuple[int, int], stride: tuple[int, int],
         dilation: tuple[int, int], out_hw: tuple[int, int]) -> Tensor:
    """The adjoint of :func:`unfold`: [B, C * kh * kw, Ho * Wo] -> [B, C, H, W], overlaps summed."""
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel, stride, dilation, out_hw
    u = u.reshape(shape[0], shape[1], kh, kw, ho, wo)
    out = u.new_zeros(shape)
    for i in range(kh):
        for j in range(kw):
            out[:, :, _window(i * dh, ho, sh), _window(j * dw, wo, sw)] += u[:, :, i, j]
    return out


def padded_input(a: Tensor, module: nn.Conv2d) -> Tensor:
    """The conv input with the module's padding applied in its own mode (so unfold needs none)."""
    pad = module._reversed_padding_repeated_twice
    if not any(pad):
        return a
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(a, pad, mode=mode)


def conv2d_weight_sq_norms(a: Tensor, g: Tensor, module: nn.Conv2d, *, backend: str = "auto") -> Tensor:
    """[B] per-sample ``|dL/dW|^2`` of a Conv2d from its input a [B, Cin, H, W] and output gradient g.

    The ghost form where it needs fewer FLOPs, else the direct form. C++: per-sample im2col and GEMMs
    in cache-sized buffers, both forms. Triton: the direct form by tiled implicit im2col (the ghost
    form runs as torch on GPU). torch: unfold + bmm in chunks.
    """
    a = padded_input(a, module)
    b, groups = a.shape[0], module.groups
    kh, kw = module.kernel_size
    t = g.shape[2] * g.shape[3]
    d = a.shape[1] // groups * kh * kw
    p = g.shape[1] // groups
    ghost = t * (d + p) < d * p
    name = _backend.resolve_backend(backend, [a, g], "grad_norm", _backend.CPP_FLOATS)
    if name == "torch" or (name == "triton" and ghost):
        u = unfold(a, module.kernel_size, module.stride, module.dilation, g.shape[2:])  # [B, groups * D, T]
        return matmul_sq_norms(u.reshape(b * groups, d, t), g.reshape(b * groups, p, t)).reshape(b, groups).sum(1)
    return _backend.apply(_ConvSqNorms, a, g, module.kernel_size, module.stride, module.dilation, groups, ghost, name)


def _fused_sq_norms(a: Tensor, g: Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                    dilation: tuple[int, int], groups: int, ghost: bool, name: str) -> Tensor:
    """[B] squared norms on the C++ kernel (either form) or the Triton kernel (direct); ``a`` already padded.

    float64 for float64 inputs, else float32.
    """
    b = a.shape[0]
    a, g = a.detach().contiguous(), g.detach().contiguous()  # gradients come from _ConvSqNorms.backward
    if name == "cpp":
        partial = _backend.empty((b * groups,), a.dtype, a.device)
        _backend.load_extension("grad_norm").conv2d_weight_sq_norms(a, g, *kernel, *stride, *dilation, groups,
                                                                    ghost, partial)
    else:
        from fastdd.kernels.grad_norm import conv2d_weight_sq_norms as triton_sq_norms

        partial = triton_sq_norms(a, g, kernel, stride, dilation, groups)
    # fp16 / bf16 inputs keep the fp32 sums: a squared norm easily overflows fp16
    return partial.reshape(b, -1).sum(1).to(torch.promote_types(a.dtype, torch.float32))


class _ConvSqNorms(torch.autograd.Function):
    """Fused squared norms with a torch backward (recomputes the per-sample gradients once)."""

    @staticmethod
    def forward(a: Tensor, g: Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                dilation: tuple[int, int], groups: int, ghost: bool, name: str) -> Tensor:
        return _fused_sq_norms(a, g, kernel, stride, dilation, groups, ghost, name)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        a, g, ctx.kernel, ctx.stride, ctx.dilation, ctx.groups, _, _ = inputs
        ctx.save_for_backward(a, g)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        a, g = ctx.saved_tensors
        b, groups = a.shape[0], ctx.groups
        geometry = (ctx.kernel, ctx.stride, ctx.dilation, g.shape[2:])
        u = unfold(a, *geometry)
        u = u.reshape(b * groups, -1, u.shape[-1])  # [B*groups, D, T]
        gm = g.reshape(b * groups, -1, u.shape[-1])  # [B*groups, p, T]
        w = (gm @ u.transpose(1, 2)) * (2 * grad_out).repeat_interleave(groups)[:, None, None]
        grad_a = grad_g = None
        if ctx.needs_input_grad[0]:
            grad_a = fold((w.transpose(1, 2) @ gm).reshape(b, -1, u.shape[-1]), a.shape, *geometry)
        if ctx.needs_input_grad[1]:
            grad_g = (w @ u).reshape(g.shape)
        return grad_a, grad_g, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, a, g, kernel, stride, dilation, groups, ghost, name):
        """One call per vmapped slice (the kernels take one batch of samples)."""
        def slices(t: Tensor, dim: int | None) -> list[Tensor]:
            return list(t.movedim(dim, 0)) if dim is not None else [t] * info.batch_size

        out = [_backend.apply(_ConvSqNorms, ai, gi, kernel, stride, dilation, groups, ghost, name)
               for ai, gi in zip(slices(a, in_dims[0]), slices(g, in_dims[1]))]
        return torch.stack(out), 0
