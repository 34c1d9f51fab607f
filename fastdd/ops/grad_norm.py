"""Per-sample gradient norms of the cross-entropy loss, without per-sample gradients.

``per_sample_grad_norm(model, x, y)`` returns, for every sample i, ``|grad_theta CE(model(x_i), y_i)|_2``
over the parameters of ``model`` that require grad: the GraDN difficulty score of SDC.

How: one forward pass records each layer's input ``a`` and hooks its output ``z``; one backward pass
of the summed loss (sum, so batch-mean scaling does not leak into the norms; weight gradients are
never formed) hands each hook ``g = dL/dz``, and the layer's per-sample squared norm follows from
``a`` and ``g`` right there, so ``g`` is freed as in a plain backward:

- Linear, Conv2d (input unfolded to ``U`` [D, T], output gradient ``G`` [p, T] per sample and group):
  the weight gradient is ``G U^T``. Its squared norm is either taken directly, tile by tile (the
  fused kernel: ``conv2d_weight_sq_norms``), or as the ghost norm ``<U^T U, G^T G>`` over T x T
  positions, whichever needs fewer FLOPs: ghost when ``T (D + p) < D p``. Bias: ``|sum_t G|^2``.
- GroupNorm, InstanceNorm (affine), LayerNorm: per-sample sums of ``xhat * g`` and of ``g`` (for group
  norms from per-group mean and rstd, without forming ``xhat``).

Conv2d's padding modes (zeros, reflect, replicate, circular, 'same'), stride, dilation and groups are
handled. BatchNorm (it mixes samples), a module used twice in one forward, and any other module with
trainable parameters are refused with a clear error. With ``create_graph=True`` the norms are
differentiable w.r.t. ``x`` (SDC backpropagates through them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdd.ops import _backend
from fastdd.ops.norm_relu_pool import instance_norm_relu_pool

NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
SUPPORTED_TYPES = (nn.Conv2d, nn.Linear, *NORM_TYPES)
# Largest intermediate a chunk of the plain-torch forms may hold, in elements (256 MiB of float32).
_CHUNK_ELEMENTS = 1 << 26


def trainable_layers(model: nn.Module) -> list[nn.Module]:
    """The modules whose own parameters require grad; raises for any that cannot be handled."""
    layers = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"per_sample_grad_norm: module {name!r} is {type(module).__name__}, which mixes the "
                             "samples of a batch, so per-sample gradients are not defined; use instance or group norm")
        if not isinstance(module, SUPPORTED_TYPES):
            raise ValueError(f"per_sample_grad_norm: module {name!r} ({type(module).__name__}) has trainable "
                             f"parameters but is not one of {[t.__name__ for t in SUPPORTED_TYPES]}")
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
            raise ValueError(f"per_sample_grad_norm: module {name!r} tracks running statistics; not supported")
        layers.append(module)
    if not layers:
        raise ValueError("per_sample_grad_norm: model has no parameters that require grad")
    return layers


def _record(layers: list[nn.Module], create_graph: bool, backend: str) -> tuple[list[Tensor], list]:
    """Forward hooks that give each layer's output a gradient hook computing the layer's squared norms.

    Returns the list the per-layer [B] squared norms are appended to (during the backward pass, so
    each output gradient is freed as soon as it is used) and the handles of all hooks, to be removed
    after that backward (an SDC backward through the graph must not run them again). A second call of
    one layer in a forward raises.
    """
    called: set[nn.Module] = set()
    sq_norms: list[Tensor] = []
    handles: list = []

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if module in called:
            raise ValueError(f"per_sample_grad_norm: {type(module).__name__} is called more than once per forward "
                             "(shared weights); its per-sample gradient does not split by layer")
        called.add(module)
        a = inputs[0] if create_graph else inputs[0].detach()
        handles.append(output.register_hook(lambda g: sq_norms.append(_layer_sq_norms(module, a, g, backend))))

    handles.extend(m.register_forward_hook(hook) for m in layers)
    return sq_norms, handles


def per_sample_grad_norm(model: nn.Module, x: Tensor, y: Tensor, *, create_graph: bool = False,
                         chunk_size: int = 256, backend: str = "auto") -> Tensor:
    """[B] per-sample norms of the CE gradient over ``model``'s trainable parameters.

    x: [B, ...] inputs; y: [B] int64 labels. Samples are processed ``chunk_size`` at a time, so a whole
    data set can be scored in one call. ``create_graph=True`` keeps the graph: the result is then
    differentiable w.r.t. ``x`` (and the parameters). ``backend`` picks the kernel of the direct
    Conv2d form (see :func:`conv2d_weight_sq_norms`); everything else is torch.
    """
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch [B, ...], got shape {tuple(x.shape)}")
    if y.shape != x.shape[:1] or y.dtype != torch.int64:
        raise ValueError(f"y must be int64 labels of shape [{x.shape[0]}], got {y.dtype} {tuple(y.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    layers = trainable_layers(model)
    _backend.resolve_backend(backend, [x], "grad_norm")  # validates the name early
    return torch.cat([_chunk_norms(model, layers, xs, ys, create_graph, backend)
                      for xs, ys in zip(x.split(chunk_size), y.split(chunk_size))])


def _fused_tail_forward(model: nn.Module, x: Tensor, create_graph: bool,
                        backend: str) -> Callable[[Tensor, list], Tensor] | None:
    """On CPU, for a ConvNet in its default configuration and no graph of the norms: a forward that runs each
    block's norm + ReLU + pooling as the fused C++ op, which reports its per-sample weight and bias norms into
    a list (the eager blocks' forward and backward were about a third of the time); None otherwise."""
    from fastdd.models import ConvNet  # fastdd.models imports fastdd.ops

    if create_graph or backend == "torch" or not isinstance(model, ConvNet) or not model.fusable:
        return None
    if _backend.resolve_backend("auto", [x], "norm_relu_pool") != "cpp":
        return None
    blocks = model.conv_norm_pairs()
    if not all(norm.weight.requires_grad == norm.bias.requires_grad for _, norm in blocks):
        return None

    def forward(x: Tensor, sink: list) -> Tensor:
        for conv, norm in blocks:
            x = instance_norm_relu_pool(conv(x), norm.weight, norm.bias, norm.eps, backend="cpp",
                                        per_sample_sq_norms=sink if norm.weight.requires_grad else None)
        return model.classifier(x.flatten(1))
    return forward


def _chunk_norms(model: nn.Module, layers: list[nn.Module], x: Tensor, y: Tensor, create_graph: bool,
                 backend: str) -> Tensor:
    # Differentiating w.r.t. the input walks the whole graph, so every layer's output-gradient hook
    # fires, and no weight gradient is formed (the input gradient of the first layer is the only extra).
    x = x if x.requires_grad else x.detach().requires_grad_(True)
    fused = _fused_tail_forward(model, x, create_graph, backend)
    hooked = [m for m in layers if fused is None or not isinstance(m, NORM_TYPES)]
    sq_norms, handles = _record(hooked, create_graph, backend)
    try:
        with torch.enable_grad():
            logits = model(x) if fused is None else fused(x, sink := [])
            torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x, create_graph=create_graph)
    finally:
        for h in handles:
            h.remove()
    if fused is not None:
        sq_norms += sink
    if len(sq_norms) != len(layers):
        raise ValueError(f"per_sample_grad_norm: {len(layers) - len(sq_norms)} of the model's trainable layers got "
                         "no gradient from the loss (unused in the forward pass?)")
    return torch.stack(sq_norms).sum(0).sqrt()


def _layer_sq_norms(module: nn.Module, a: Tensor, g: Tensor, backend: str) -> Tensor:
    """[B] squared norms of one layer's per-sample gradient over its trainable parameters."""
    weight = module.weight is not None and module.weight.requires_grad
    bias = module.bias is not None and module.bias.requires_grad
    b = a.shape[0]
    total = a.new_zeros(b)
    if isinstance(module, nn.Linear):
        a, g = a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])
        if weight:
            total = total + _matmul_sq_norms(a.transpose(1, 2), g.transpose(1, 2))
        if bias:
            total = total + g.sum(1).pow(2).sum(1)
    elif isinstance(module, nn.Conv2d):
        if weight:
            total = total + conv2d_weight_sq_norms(a, g, module, backend=backend)
        if bias:
            total = total + g.sum((2, 3)).pow(2).sum(1)
    elif isinstance(module, nn.LayerNorm):
        xhat = F.layer_norm(a, module.normalized_shape, eps=module.eps)
        lead = tuple(range(1, a.dim() - len(module.normalized_shape)))
        per_sample = (lambda v: v.sum(lead)) if lead else (lambda v: v)  # sum(()) would sum everything
        if weight:
            total = total + per_sample(xhat * g).pow(2).flatten(1).sum(1)
        if bias:
            total = total + per_sample(g).pow(2).flatten(1).sum(1)
    else:  # GroupNorm, InstanceNorm: per (sample, channel) sums of xhat * g and of g
        groups = module.num_groups if isinstance(module, nn.GroupNorm) else a.shape[1]
        weight_grads, bias_grads = _group_norm_affine_grads(a, g, groups, module.eps, backend)
        if weight:
            total = total + weight_grads.pow(2).sum(1)
        if bias:
            total = total + bias_grads.pow(2).sum(1)
    return total


def _group_norm_affine_grads(a: Tensor, g: Tensor, groups: int, eps: float, backend: str) -> tuple[Tensor, Tensor]:
    """[B, C] per-sample gradients of a group norm's affine weight (``sum_s xhat g``) and bias (``sum_s g``).

    With xhat = (a - mean) * rstd per (sample, group): sum_s xhat g = rstd (sum_s a g - mean sum_s g), so
    xhat is never formed. Without a graph to keep, the C++ backend gets the four row sums it needs
    in one pass over ``a`` and ``g``.
    """
    b, c = a.shape[:2]
    per_group = c // groups
    a, g = a.reshape(b, c, -1), g.reshape(b, c, -1)
    keep_graph = torch.is_grad_enabled() and (a.requires_grad or g.requires_grad)
    if not keep_graph and _backend.resolve_backend(backend, [a, g], "grad_norm") == "cpp":
        sums = _backend.empty((b * c, 4), torch.float64, a.device)
        _backend.load_extension("grad_norm").row_sums(a.contiguous().view(b * c, -1),
                                                      g.contiguous().view(b * c, -1), sums)
        sums = sums.view(b, groups, per_group, 4)
        count = per_group * a.shape[2]
        mean = sums[..., 0].sum(2) / count
        var = (sums[..., 1].sum(2) / count - mean.pow(2)).clamp_min(0)
        rstd = (var + eps).rsqrt()[..., None]
        weight = rstd * (sums[..., 2] - mean[..., None] * sums[..., 3])
        return weight.reshape(b, c).to(a.dtype), sums[..., 3].reshape(b, c).to(a.dtype)
    var, mean = torch.var_mean(a.reshape(b, groups, -1), dim=2, correction=0)
    rstd = (var + eps).rsqrt().repeat_interleave(per_group, dim=1)
    mean = mean.repeat_interleave(per_group, dim=1)
    g_sum = g.sum(2)
    return rstd * (torch.einsum("bcs,bcs->bc", a, g) - mean * g_sum), g_sum


def _matmul_sq_norms(u: Tensor, gm: Tensor) -> Tensor:
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


def _padded(a: Tensor, module: nn.Conv2d) -> Tensor:
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
    a = _padded(a, module)
    b, groups = a.shape[0], module.groups
    kh, kw = module.kernel_size
    t = g.shape[2] * g.shape[3]
    d = a.shape[1] // groups * kh * kw
    p = g.shape[1] // groups
    ghost = t * (d + p) < d * p
    name = _backend.resolve_backend(backend, [a, g], "grad_norm")
    if name == "torch" or (name == "triton" and ghost):
        u = unfold(a, module.kernel_size, module.stride, module.dilation, g.shape[2:])  # [B, groups * D, T]
        return _matmul_sq_norms(u.reshape(b * groups, d, t), g.reshape(b * groups, p, t)).reshape(b, groups).sum(1)
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
