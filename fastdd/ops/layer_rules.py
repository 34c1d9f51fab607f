"""Per-layer rules: each parameterised layer type's parameter gradients as sums of per-sample contributions.

When a network treats the samples of a batch independently, the gradient of a summed loss w.r.t. a layer's
parameter is the sum over samples of a per-sample gradient that follows from the layer's input ``a``
[B, ...] and output gradient ``g = dL/dz`` [B, ...] alone. A rule, registered for a layer type with
:func:`register`, maps ``(layer, a, g, backend)`` to one :class:`PerSampleGrads` per parameter the layer
has: a form of the per-sample gradients that need not hold them, [B, *shape], in memory. Its two
reductions are what the callers use: ``sq_norms()`` [B], each sample's squared gradient norm
(:func:`fastdd.ops.per_sample_grad_norm`), and ``group_sums(K)`` [K, *shape], the gradient summed over K
equal runs of consecutive samples (the per-class gradients of :mod:`fastdd.methods.matching`).

- Linear: weight ``sum_t g_t a_t^T`` over positions t (:class:`OuterProducts`), bias ``sum_t g_t``.
- Conv2d (any padding mode, stride, dilation, groups): weight ``G U^T`` over the unfolded input
  (:class:`ConvWeightGrads`), bias ``g`` summed over positions.
- GroupNorm, affine InstanceNorm: weight ``sum_s xhat g`` and bias ``sum_s g`` over each channel's
  positions (on the C++ backend without a graph, from per-group row sums without forming ``xhat``).
- LayerNorm: ``xhat g`` and ``g`` summed over the dims before the normalised ones.

Refused, with the reason: BatchNorm (it mixes the samples of a batch) and any layer tracking running
statistics. :func:`rule_for` finds a layer's rule along its type's MRO, so subclasses share their base's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdd.ops import _backend
from fastdd.ops.weight_sq_norms import conv2d_weight_sq_norms, matmul_sq_norms, padded_input


class PerSampleGrads(Protocol):
    """One parameter's per-sample gradients [B, *shape] of a batch of B samples, not necessarily formed."""

    def sq_norms(self) -> Tensor:
        """[B]: each sample's squared gradient norm (Frobenius)."""

    def group_sums(self, groups: int) -> Tensor:
        """[K, *shape]: the gradients summed over each of K = ``groups`` equal runs of consecutive samples."""


@dataclass(frozen=True)
class SummedOver:
    """Per-sample gradients that are ``t[i]`` summed over the dims ``dims`` of t [B, ...] (positions; none: t[i])."""

    t: Tensor
    dims: tuple[int, ...] = ()

    def sq_norms(self) -> Tensor:
        per_sample = self.t.sum(self.dims) if self.dims else self.t  # sum(()) would sum everything
        return per_sample.pow(2).flatten(1).sum(1)

    def group_sums(self, groups: int) -> Tensor:
        return self.t.reshape(groups, -1, *self.t.shape[1:]).sum((1, *(d + 1 for d in self.dims)))


@dataclass(frozen=True)
class OuterProducts:
    """A Linear weight's per-sample gradients ``g[i]^T a[i]`` [B, p, D]: a [B, T, D] inputs, g [B, T, p] output
    gradients at T positions."""

    a: Tensor
    g: Tensor

    def sq_norms(self) -> Tensor:
        return matmul_sq_norms(self.a.transpose(1, 2), self.g.transpose(1, 2))

    def group_sums(self, groups: int) -> Tensor:
        by_group = [t.reshape(groups, -1, t.shape[-1]) for t in (self.g, self.a)]  # samples and positions merged
        return torch.einsum("kbp,kbd->kpd", *by_group)


@dataclass(frozen=True)
class ConvWeightGrads:
    """A Conv2d weight's per-sample gradients from its input a [B, Cin, H, W] and output gradient g [B, Cout, Ho, Wo];
    ``backend`` picks the kernel of :func:`conv2d_weight_sq_norms`."""

    conv: nn.Conv2d
    a: Tensor
    g: Tensor
    backend: str

    def sq_norms(self) -> Tensor:
        return conv2d_weight_sq_norms(self.a, self.g, self.conv, backend=self.backend)

    def group_sums(self, groups: int) -> Tensor:
        """The K groups become K channel groups of one convolution over B / K samples, so a single grouped
        weight-gradient call computes all of them."""
        conv, k = self.conv, groups

        def grouped(t: Tensor) -> Tensor:  # [K * B', C, H, W] -> [B', K * C, H, W]
            kb, c, h, w = t.shape
            return t.reshape(k, kb // k, c, h, w).transpose(0, 1).reshape(kb // k, k * c, h, w)

        zero_padded = conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
        a, padding = (self.a, conv.padding) if zero_padded else (padded_input(self.a, conv), (0, 0))
        weight = conv.weight.detach().repeat(k, 1, 1, 1)  # only its shape is read for a weight gradient
        _, grad_weight, _ = torch.ops.aten.convolution_backward(
            grouped(self.g), grouped(a), weight, None, conv.stride, padding, conv.dilation, False, [0, 0],
            k * conv.groups, [False, True, False])
        return grad_weight.reshape(k, *conv.weight.shape)


Rule = Callable[[nn.Module, Tensor, Tensor, str], dict[nn.Parameter, PerSampleGrads]]
"""(layer, input a [B, ...], output gradient g [B, ...], backend) -> {parameter: its per-sample gradients}, for
each parameter the layer has (a frozen one included; the forms compute nothing until reduced)."""

_RULES: dict[type[nn.Module], Rule] = {}
_REFUSED: dict[type[nn.Module], str] = {
    nn.modules.batchnorm._BatchNorm: "mixes the samples of a batch, so per-sample gradients are not defined; "
                                     "use instance or group norm",
}


def register(*layer_types: type[nn.Module]) -> Callable[[Rule], Rule]:
    """Decorator: the function is the rule of ``layer_types`` and of their subclasses without a rule of their own."""
    def add(rule: Rule) -> Rule:
        for layer_type in layer_types:
            _RULES[layer_type] = rule
        return rule
    return add


def _rule_or_reason(layer: nn.Module) -> Rule | str:
    """The rule of the first class along ``type(layer)``'s MRO that has one, or why there is none."""
    for cls in type(layer).__mro__:
        if cls in _REFUSED:
            return _REFUSED[cls]
        if cls in _RULES:
            if getattr(layer, "track_running_stats", False):
                return "tracks running statistics, which the per-sample rules do not model"
            return _RULES[cls]
    return f"has no per-sample gradient rule; there are rules for {sorted(t.__name__ for t in _RULES)}"


def rule_for(layer: nn.Module) -> Rule:
    """``layer``'s rule; a ValueError naming its type and why there is none otherwise."""
    found = _rule_or_reason(layer)
    if isinstance(found, str):
        raise ValueError(f"{type(layer).__name__} {found}")
    return found


def has_rule(layer: nn.Module) -> bool:
    """True when ``layer`` has a rule (:func:`rule_for` would not raise)."""
    return not isinstance(_rule_or_reason(layer), str)


def _affine(layer: nn.Module, weight: PerSampleGrads, bias: PerSampleGrads) -> dict[nn.Parameter, PerSampleGrads]:
    """{weight: ..., bias: ...} for those of the two the layer has."""
    return {p: grads for p, grads in ((layer.weight, weight), (layer.bias, bias)) if p is not None}


@register(nn.Linear)
def _linear(layer: nn.Linear, a: Tensor, g: Tensor, backend: str) -> dict[nn.Parameter, PerSampleGrads]:
    b = a.shape[0]
    a, g = a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])
    return _affine(layer, OuterProducts(a, g), SummedOver(g, (1,)))


@register(nn.Conv2d)
def _conv2d(layer: nn.Conv2d, a: Tensor, g: Tensor, backend: str) -> dict[nn.Parameter, PerSampleGrads]:
    return _affine(layer, ConvWeightGrads(layer, a, g, backend), SummedOver(g, (2, 3)))


@register(nn.LayerNorm)
def _layer_norm(layer: nn.LayerNorm, a: Tensor, g: Tensor, backend: str) -> dict[nn.Parameter, PerSampleGrads]:
    xhat = F.layer_norm(a, layer.normalized_shape, eps=layer.eps)
    lead = tuple(range(1, a.dim() - len(layer.normalized_shape)))
    return _affine(layer, SummedOver(xhat * g, lead), SummedOver(g, lead))


@register(nn.GroupNorm)
def _group_norm(layer: nn.GroupNorm, a: Tensor, g: Tensor, backend: str) -> dict[nn.Parameter, PerSampleGrads]:
    weight, bias = _group_norm_affine_grads(a, g, layer.num_groups, layer.eps, backend)
    return _affine(layer, SummedOver(weight), SummedOver(bias))


@register(nn.modules.instancenorm._InstanceNorm)
def _instance_norm(layer: nn.Module, a: Tensor, g: Tensor, backend: str) -> dict[nn.Parameter, PerSampleGrads]:
    weight, bias = _group_norm_affine_grads(a, g, a.shape[1], layer.eps, backend)
    return _affine(layer, SummedOver(weight), SummedOver(bias))


def _group_norm_affine_grads(a: Tensor, g: Tensor, groups: int, eps: float, backend: str) -> tuple[Tensor, Tensor]:
    """[B, C] per-sample gradients of a group norm's affine weight (``sum_s xhat g``) and bias (``sum_s g``).

    Without a graph to keep, the C++ backend gets the four row sums it needs in one pass over ``a`` and ``g``,
    and with xhat = (a - mean) * rstd per (sample, group), sum_s xhat g = rstd (sum_s a g - mean sum_s g), so
    xhat is never formed. Otherwise xhat comes from ``F.group_norm`` (in torch, and through its graph, that is
    cheaper than the sums).
    """
    b, c = a.shape[:2]
    a, g = a.reshape(b, c, -1), g.reshape(b, c, -1)
    keep_graph = torch.is_grad_enabled() and (a.requires_grad or g.requires_grad)
    if keep_graph or _backend.resolve_backend(backend, [a, g], "grad_norm", _backend.CPP_FLOATS) != "cpp":
        return (F.group_norm(a, groups, eps=eps) * g).sum(2), g.sum(2)
    sums = _backend.empty((b * c, 4), torch.float64, a.device)
    _backend.load_extension("grad_norm").row_sums(a.contiguous().view(b * c, -1), g.contiguous().view(b * c, -1), sums)
    per_group = c // groups
    sums = sums.view(b, groups, per_group, 4)
    count = per_group * a.shape[2]
    mean = sums[..., 0].sum(2) / count
    var = (sums[..., 1].sum(2) / count - mean.pow(2)).clamp_min(0)
    rstd = (var + eps).rsqrt()[..., None]
    weight = rstd * (sums[..., 2] - mean[..., None] * sums[..., 3])
    return weight.reshape(b, c).to(a.dtype), sums[..., 3].reshape(b, c).to(a.dtype)
