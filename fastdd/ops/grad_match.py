"""Distance between two lists of gradients, as used by gradient matching (DC, DSA, IDC).

The metrics are defined in :func:`fastdd.ops.naive.grad_match_distance` (docs/design.md section 2). The fused
form evaluates all layers (and, with ``batched=True``, all classes) in one kernel launch:

- The inputs are cut into chunks of contiguous elements, each belonging to one *row*: an ``(out)`` row
  of a layer for "ours" (never split), a class for "cos", the single row of "mse" / "l1" (split into
  chunks of at most ``CHUNK``). Vectors of one-dimensional layers under "ours" form chunks of row -1
  (no contribution, zero gradient).
- Forward: a kernel writes per-chunk partial sums (``<a,b>, |a|^2, |b|^2``, or the sum of ``(a-b)^2``
  or ``|a-b|``); torch adds them up per row and combines the rows into the scalar. When the inputs
  require grad and a chunk's gradient depends on that chunk alone ("ours", "mse", "l1"), the same
  pass writes the gradient for an upstream gradient of 1 while the chunk is in cache; backward then
  only scales it (and returns it as is when the upstream gradient is a CPU 1).
- "cos" couples a whole class: backward turns the row sums into per-row coefficients and a second
  kernel writes ``grad_a = alpha a + beta b``.

Torch's conventions at zero hold: a zero row's norm has gradient 0, ``|0|`` has gradient 0. Non-finite values
in either list, or a NaN upstream gradient, give the reference's NaN and infinities; an infinite upstream gradient
of "ours" gives +-inf where the reference's chain rule meets inf - inf and gives NaN (the unit gradient is
scaled; both non-finite).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from fastdd.checks import boolean, one_of
from fastdd.ops import _backend, naive
from fastdd.ops import _checks as checks
from fastdd.ops.naive import METRICS

__all__ = ["METRICS", "grad_match_distance"]

CHUNK = 4096  # most elements a chunk (one Triton program, one C++ work item) owns, except rows of "ours"
_CHUNK_OVERHEAD = 16  # cost of a chunk beyond its elements, in elements, for balancing C++ threads
_KIND = {"ours": 0, "cos": 0, "mse": 1, "l1": 2}  # the kernels' kinds: dot/norms, (a-b)^2, |a-b|
_EPS = 1e-6


def grad_match_distance(g_syn: Sequence[Tensor], g_real: Sequence[Tensor], metric: str = "ours", *,
                        batched: bool = False, backend: str = "auto") -> Tensor:
    """Scalar distance between two equally shaped lists of gradients (one tensor per parameter).

    g_syn, g_real: non-empty lists (or tuples) of the same length of non-empty floating tensors, all of one dtype
    and on one device, ``g_syn[i]`` shaped as ``g_real[i]``. ``metric``: one of :data:`METRICS`.
    ``batched=True`` (a bool): every tensor has a leading class dimension K (the same K for all); the result is
    the sum over classes of the unbatched distance, computed in one launch.

    dtypes: float32 and float64 everywhere, float16 and bfloat16 on CUDA (Triton) and on the torch reference:
    on CPU ``"auto"`` runs those on the reference and ``"cpp"`` refuses them. Sums accumulate in fp32 (fp64 for
    fp64); the result has the input dtype for float32 / float64 and is float32 for float16 / bfloat16 (a sum over
    many rows overflows fp16).

    Differentiable once, w.r.t. both lists (what gradient matching needs: the image gradient flows
    through ``g_syn``); differentiating the op's backward again raises an error.
    """
    _validate(g_syn, g_real, metric, batched)
    name = _backend.resolve_backend(backend, [*g_syn, *g_real], "grad_match", _backend.CPP_FLOATS)
    dtype = g_syn[0].dtype
    if name == "torch":
        distance = naive.grad_match_distance(g_syn, g_real, metric, batched=batched)
        return distance if dtype in (torch.float32, torch.float64) else distance.float()
    eager = torch.is_grad_enabled() and metric != "cos"
    write = (eager and any(t.requires_grad for t in g_syn), eager and any(t.requires_grad for t in g_real))
    return _backend.apply(_GradMatchDistance, metric, batched, name, write, len(g_syn), *g_syn, *g_real)[0]


def _validate(g_syn: Sequence[Tensor], g_real: Sequence[Tensor], metric: str, batched: bool) -> None:
    """Raise ValueError naming the first argument that is not as documented."""
    one_of("metric", metric, METRICS)
    boolean("batched", batched)
    checks.tensor_list("g_syn", g_syn)
    checks.tensor_list("g_real", g_real)
    if len(g_syn) != len(g_real) or len(g_syn) == 0:
        raise ValueError("g_syn and g_real must be non-empty lists of equal length, "
                         f"got {len(g_syn)} and {len(g_real)}")
    first = g_syn[0]
    for i, (s, r) in enumerate(zip(g_syn, g_real)):
        for name, t in (("g_syn", s), ("g_real", r)):
            checks.tensor(f"{name}[{i}]", t)
            if not t.dtype.is_floating_point:
                raise ValueError(f"{name}[{i}] must be a floating-point tensor, got {t.dtype}")
            if t.dtype != first.dtype or t.device != first.device:
                raise ValueError(f"{name}[{i}] is {t.dtype} on {t.device}, but g_syn[0] is {first.dtype} on "
                                 f"{first.device}: all gradients must share one dtype and device")
            if t.numel() == 0:
                raise ValueError(f"{name}[{i}] has no elements (shape {tuple(t.shape)})")
            if batched and (t.dim() == 0 or t.shape[0] != first.shape[0]):
                raise ValueError(f"batched=True: {name}[{i}] must have the leading class dimension K "
                                 f"of g_syn[0] (shape {tuple(first.shape)}), got shape {tuple(t.shape)}")
        if s.shape != r.shape:
            raise ValueError(f"gradient {i}: g_syn[{i}] has shape {tuple(s.shape)} "
                             f"but g_real[{i}] has {tuple(r.shape)}")


@dataclass(frozen=True)
class _Plan:
    """The chunks of one call's shapes (see the module docstring)."""

    table: Tensor  # int64 [chunks, 4]: layer, start (element within the layer), length, row (-1: none)
    rows: int  # number of rows
    sink: Tensor  # int64 [chunks]: the row of each chunk, with -1 replaced by ``rows`` (a discarded row)
    work: Tensor  # int64 [chunks + 1], CPU: prefix sums of the chunks' costs (C++ thread balancing)
    layer_offsets: Tensor  # int64 [layers]: where each layer starts in the concatenated buffer (Triton)


@functools.lru_cache(maxsize=64)
def _plan(shapes: tuple[torch.Size, ...], metric: str, batched: bool, device: torch.device) -> _Plan:
    parts, rows = [], 0
    for layer, shape in enumerate(shapes):
        classes, per_class = (shape[0], shape[1:]) if batched else (1, shape)
        size = math.prod(per_class)
        # the layer as `count` segments of `length` elements, segment j on row row_of[j]; chunks of at
        # most `piece` elements (rows of "ours" stay whole: their gradient needs the whole row's sums)
        if metric == "ours" and len(per_class) > 1:
            count, length = classes * per_class[0], size // per_class[0]
            row_of, piece = torch.arange(rows, rows + count), length
            rows += count
        elif metric == "cos":
            count, length, row_of, piece = classes, size, torch.arange(classes), CHUNK
        else:  # mse, l1; and the skipped one-dimensional layers of "ours" (row -1)
            count, length, piece = 1, classes * size, CHUNK
            row_of = torch.tensor([-1 if metric == "ours" else 0])
        pieces = -(-length // piece)
        index = torch.arange(count * pieces)
        segment, offset = index // pieces, index % pieces * piece
        parts.append(torch.stack([torch.full_like(index, layer), segment * length + offset,
                                  (length - offset).clamp(max=piece), row_of[segment]], dim=1))
    if metric == "cos":
        rows = shapes[0][0] if batched else 1
    elif metric != "ours":
        rows = 1
    table = torch.cat(parts)
    row = table[:, 3]
    work = torch.cat([torch.zeros(1, dtype=torch.int64), (table[:, 2] + _CHUNK_OVERHEAD).cumsum(0)])
    offsets = torch.tensor([0, *[math.prod(s) for s in shapes]]).cumsum(0)[:-1]
    return _Plan(table.to(device), rows, torch.where(row < 0, rows, row).to(device), work, offsets.to(device))


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_sums(a: Sequence[Tensor], b: Sequence[Tensor], plan: _Plan, metric: str, backend: str,
              write_a: bool, write_b: bool) -> tuple[Tensor, list[Tensor] | None, list[Tensor] | None]:
    """Row sums [rows, 3] (<a,b>, |a|^2, |b|^2) for ours / cos, [1, 1] the whole sum for mse / l1; and the
    gradients w.r.t. a and b for an upstream gradient of 1 (each None unless asked for; not for "cos")."""
    acc = _accumulation_dtype(a[0].dtype)
    width = 3 if _KIND[metric] == 0 else 1
    if backend == "cpp":
        partials = _backend.empty((len(plan.table), width), acc, a[0].device)
        unit_a, unit_b = (_empty_like_all(a) if w else [] for w in (write_a, write_b))
        _backend.load_extension("grad_match").row_sums(_contiguous(a), _contiguous(b), plan.table, plan.work,
                                                       _KIND[metric], partials, unit_a, unit_b)
        unit_a, unit_b = unit_a or None, unit_b or None
    else:
        from fastdd.kernels import grad_match as kernels

        partials, flat_a, flat_b = kernels.row_sums(_flat(a), _flat(b), plan.table, plan.layer_offsets,
                                                    _KIND[metric], acc, write_a, write_b)
        unit_a, unit_b = _unflatten(flat_a, a), _unflatten(flat_b, a)
    sums = partials.new_zeros(plan.rows + 1, width).index_add_(0, plan.sink, partials)
    return sums[:-1], unit_a, unit_b


def _empty_like_all(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Output buffers shaped as ``tensors``: views of one allocation (one page-fault run, not one per layer)."""
    flat = _backend.empty((sum(t.numel() for t in tensors),), tensors[0].dtype, tensors[0].device)
    return _unflatten(flat, tensors)


def _contiguous(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [t.contiguous() for t in tensors]


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten(flat: Tensor | None, like: Sequence[Tensor]) -> list[Tensor] | None:
    if flat is None:
        return None
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in like]), like)]


def _norms(sums: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """<a,b>, |a|, |b| and the denominator |a||b| + eps of every row."""
    dot, norm_a, norm_b = sums[:, 0], sums[:, 1].sqrt(), sums[:, 2].sqrt()
    return dot, norm_a, norm_b, norm_a * norm_b + _EPS


def _distance(sums: Tensor, metric: str) -> Tensor:
    if metric in ("mse", "l1"):
        return sums.sum()
    dot, _, _, denominator = _norms(sums)
    return (1 - dot / denominator).sum()


def _cos_grads(a: Sequence[Tensor], b: Sequence[Tensor], plan: _Plan, sums: Tensor, grad: Tensor, backend: str,
               batched: bool, write_a: bool, write_b: bool) -> tuple[list[Tensor] | None, list[Tensor] | None]:
    """The gradients of "cos" w.r.t. a and b (each None unless asked for) from the row sums (one per class)."""
    dot, norm_a, norm_b, denominator = _norms(sums)
    # d/da [1 - <a,b> / D] = -b / D + <a,b> |b| a / (|a| D^2); the norm's gradient is 0 at 0
    scale = grad.to(sums.dtype) * dot / denominator**2
    alpha_a = torch.where(norm_a > 0, scale * norm_b / norm_a, 0)
    alpha_b = torch.where(norm_b > 0, scale * norm_a / norm_b, 0)
    beta = -grad.to(sums.dtype) / denominator
    if torch._C._functorch.is_functorch_wrapped_tensor(a[0]):
        # inside torch.func transforms the saved tensors are wrappers the kernels cannot read: torch ops
        def per_class(c: Tensor, t: Tensor) -> Tensor:
            return c.reshape(-1, *[1] * (t.dim() - 1)) if batched else c.reshape(())

        return tuple([per_class(alpha, x) * x + per_class(beta, x) * y for x, y in zip(xs, ys)] if w else None
                     for alpha, xs, ys, w in ((alpha_a, a, b, write_a), (alpha_b, b, a, write_b)))
    coef = torch.stack([alpha_a, beta, alpha_b, beta], dim=1).contiguous()
    if backend == "cpp":
        grad_a, grad_b = (_empty_like_all(a) if w else [] for w in (write_a, write_b))
        _backend.load_extension("grad_match").input_grads(_contiguous(a), _contiguous(b), plan.table, plan.work,
                                                          coef, grad_a, grad_b)
        return grad_a or None, grad_b or None
    from fastdd.kernels import grad_match as kernels

    flat_a, flat_b = kernels.input_grads(_flat(a), _flat(b), plan.table, plan.layer_offsets, coef, write_a, write_b)
    return _unflatten(flat_a, a), _unflatten(flat_b, b)


def _scaled(units: list[Tensor] | None, grad: Tensor, unread: list[bool]) -> list[Tensor] | None:
    """Unit-upstream gradients times the upstream gradient; as they are when that is a plain CPU 1 (the
    usual ``loss.backward()``; functorch-wrapped tensors cannot be branched on). ``unread[i]``: the distance never
    reads layer i (a vector under "ours"), whose zero gradient stays 0 (not NaN) for a NaN or infinite upstream
    gradient, as the reference's."""
    if units is None or (grad.device.type == "cpu" and not torch._C._functorch.is_functorch_wrapped_tensor(grad)
                         and bool(grad == 1)):
        return units
    return [u if skip else u * grad.to(u.dtype) for u, skip in zip(units, unread)]


def _first_order_only(grads: tuple[Tensor | None, ...], differentiable: bool) -> tuple[Tensor | None, ...]:
    """The gradients, made to raise a clear error if anything differentiates them again (when the graph
    is being recorded, ``differentiable``, and they would otherwise silently count as constants).

    Not inside torch.func transforms, which cannot mark tensors (a nested torch.func.grad is unsupported)."""
    if not (torch.is_grad_enabled() and differentiable) or torch._C._functorch.maybe_current_level() is not None:
        return grads
    present = [g for g in grads if g is not None]
    error = torch._C._functions.DelayedError(
        b"grad_match_distance is differentiable once: its backward cannot be differentiated again "
        b"(double backward is not implemented)", len(present))
    wrapped = error(*[g.detach().requires_grad_(True) for g in present])
    wrapped = iter(wrapped if isinstance(wrapped, tuple) else (wrapped,))
    return tuple(None if g is None else next(wrapped) for g in grads)


class _GradMatchDistance(torch.autograd.Function):
    """(distance, row sums, *unit_a, *unit_b); inputs: metric, batched, backend, write, n, *g_syn, *g_real.

    ``write`` = (for g_syn, for g_real): whether the forward pass writes that list's gradients for an
    upstream gradient of 1 (never for "cos", whose backward runs a kernel of its own)."""

    @staticmethod
    def forward(metric: str, batched: bool, backend: str, write: tuple[bool, bool], n: int, *tensors: Tensor):
        a, b = tensors[:n], tensors[n:]
        plan = _plan(tuple(t.shape for t in a), metric, batched, a[0].device)
        sums, unit_a, unit_b = _row_sums(a, b, plan, metric, backend, *write)
        distance = _distance(sums, metric)
        distance = distance if a[0].dtype in (torch.float32, torch.float64) else distance.float()
        return distance, sums, *(unit_a or []), *(unit_b or [])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.metric, ctx.batched, ctx.backend, ctx.write, ctx.n = inputs[:5]
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the (large) non-differentiable outputs
        ctx.save_for_backward(*inputs[5:], *output[1:])

    @staticmethod
    def backward(ctx, grad_distance: Tensor, *_):
        n = ctx.n
        if grad_distance is None:
            return (None,) * (5 + 2 * n)
        saved = ctx.saved_tensors
        a, b, sums, units = saved[:n], saved[n:2 * n], saved[2 * n], list(saved[2 * n + 1:])
        differentiable = grad_distance.requires_grad or any(t.requires_grad for t in saved[:2 * n])
        with torch.no_grad():
            grads = _GradMatchDistance._grads(ctx, grad_distance, a, b, sums, units)
        return (None,) * 5 + _first_order_only(grads, differentiable)

    @staticmethod
    def _grads(ctx, grad_distance: Tensor, a, b, sums: Tensor, units: list[Tensor]) -> tuple[Tensor | None, ...]:
        """The gradients w.r.t. g_syn and g_real (None where not needed)."""
        n = ctx.n
        need_a, need_b = any(ctx.needs_input_grad[5:5 + n]), any(ctx.needs_input_grad[5 + n:])
        if ctx.metric == "cos":
            plan = _plan(tuple(t.shape for t in a), "cos", ctx.batched, a[0].device)
            grad_a, grad_b = _cos_grads(a, b, plan, sums, grad_distance, ctx.backend, ctx.batched, need_a, need_b)
        else:
            unit_a = units[:n] if ctx.write[0] else None
            unit_b = units[-n:] if ctx.write[1] else None
            unread = [ctx.metric == "ours" and t.dim() - ctx.batched <= 1 for t in a]
            grad_a, grad_b = _scaled(unit_a, grad_distance, unread), _scaled(unit_b, grad_distance, unread)
        return tuple(grad_a or [None] * n) + tuple(grad_b or [None] * n)

    @staticmethod
    def vmap(info, in_dims, metric, batched, backend, write, n, *tensors):
        """One call per vmapped slice."""
        dims = in_dims[5:]
        outs = [_backend.apply(_GradMatchDistance, metric, batched, backend, write, n,
                                         *[t if d is None else t.select(d, i) for t, d in zip(tensors, dims)])
                for i in range(info.batch_size)]
        return tuple(torch.stack(column) for column in zip(*outs)), (0,) * len(outs[0])
