"""Per-sample gradient norms of the cross-entropy loss, without per-sample gradients.

``per_sample_grad_norm(model, x, y)`` returns, for every sample i, ``|grad_theta CE(model(x_i), y_i)|_2``
over the parameters of ``model`` that require grad: the GraDN difficulty score of SDC.

How: one forward pass records each layer's input ``a`` and hooks its output ``z``; one backward pass
of the summed loss (sum, so batch-mean scaling does not leak into the norms; weight gradients are
never formed) hands each hook ``g = dL/dz``, and the layer's per-sample squared norm follows from
``a`` and ``g`` right there, by the layer's rule (:mod:`fastdd.ops.layer_rules`: Linear, Conv2d with any
padding mode, stride, dilation and groups, GroupNorm, affine InstanceNorm, LayerNorm), so ``g`` is freed as
in a plain backward.

A layer without a rule (BatchNorm: it mixes samples), a frozen BatchNorm that normalises with batch statistics,
a module used twice in one forward, and a model without trainable parameters are refused with a clear error.
With ``create_graph=True`` the norms are differentiable w.r.t. ``x`` (SDC backpropagates through them).

On CPU without a graph of the norms, a model that offers its norm + ReLU + pooling tails (:class:`FusableTails`,
as ``fastdd.models.ConvNet`` in its default configuration does) runs them as the fused C++ op
:func:`~fastdd.ops.norm_relu_pool.instance_norm_relu_pool`, which reports the norms' per-sample squared norms itself.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastdd.checks import boolean, positive_int
from fastdd.ops import _backend, norm_relu_pool
from fastdd.ops import _checks as checks
from fastdd.ops.layer_rules import Rule, rule_for
from fastdd.ops.norm_relu_pool import instance_norm_relu_pool

Tail = Callable[[Tensor, nn.Module], Tensor]
"""(z, norm) -> a block's tail on its convolution's output z: ``norm``, ReLU and 2 x 2 average pooling."""


@runtime_checkable
class FusableTails(Protocol):
    """A model whose blocks end in a tail (:data:`Tail`) with an affine per-channel instance norm (``InstanceNorm2d``
    or ``GroupNorm`` with a group per channel) and that can run every tail through a given function."""

    def tail_norms(self) -> tuple[nn.Module, ...]:
        """The norm of each tail, in the order the forward runs them; empty when the model has none to fuse."""

    def forward_with_tails(self, x: Tensor, tail: Tail) -> Tensor:
        """The model's output on ``x``, each tail run as ``tail(z, norm)``, every other layer as in ``forward``."""


def trainable_layers(model: nn.Module) -> dict[nn.Module, Rule]:
    """The modules whose own parameters require grad, each with its rule; raises for any that has none, and for a
    frozen BatchNorm that normalises with batch statistics (it mixes the samples of a batch all the same)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = {}
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            try:
                layers[module] = rule_for(module)
            except ValueError as err:
                raise ValueError(f"model: module {name!r}: {err}") from None
        elif isinstance(module, _BatchNorm) and (module.training or not module.track_running_stats):
            raise ValueError(f"model: module {name!r}: {type(module).__name__} normalises with batch statistics, "
                             "which mixes the samples of a batch; call model.eval() or use instance or group norm")
    if not layers:
        raise ValueError("model has no parameters that require grad")
    return layers


def _record(layers: dict[nn.Module, Rule], create_graph: bool, backend: str) -> tuple[list[Tensor], list]:
    """Forward hooks that give each layer's output a gradient hook computing the layer's squared norms.

    Returns the list the per-layer [B] squared norms are appended to (during the backward pass, so
    each output gradient is freed as soon as it is used) and the handles of all hooks, to be removed
    after that backward (an SDC backward through the graph must not run them again). A second call of
    one layer in a forward raises.
    """
    called: set[nn.Module] = set()
    sq_norms: list[Tensor] = []
    handles: list = []

    def sq_norm(rule: Rule, module: nn.Module, a: Tensor, g: Tensor) -> None:
        sq_norms.append(sum(grads.sq_norms() for p, grads in rule(module, a, g, backend).items() if p.requires_grad))

    def hook(rule: Rule, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if module in called:
            raise ValueError(f"model: {type(module).__name__} is called more than once per forward "
                             "(shared weights); its per-sample gradient does not split by layer")
        called.add(module)
        a = inputs[0] if create_graph else inputs[0].detach()
        handles.append(output.register_hook(partial(sq_norm, rule, module, a)))

    handles.extend(m.register_forward_hook(partial(hook, rule)) for m, rule in layers.items())
    return sq_norms, handles


def per_sample_grad_norm(model: nn.Module, x: Tensor, y: Tensor, *, create_graph: bool = False,
                         chunk_size: int = 256, backend: str = "auto") -> Tensor:
    """[B] per-sample norms of the CE gradient over ``model``'s trainable parameters.

    model: a module whose trainable layers all have a rule (:mod:`fastdd.ops.layer_rules`), with no BatchNorm
    normalising by batch statistics, mapping x to logits [B, K]. x: [B, ...] non-empty floating inputs, of the
    dtype and on the device of every parameter of ``model``; y: [B] int64 labels in [0, K). Samples are processed
    ``chunk_size`` (an int >= 1) at a time, so a whole data set can be scored in one call. ``create_graph=True``
    keeps the graph: the result is then differentiable w.r.t. ``x`` (and the parameters). ``backend`` picks the
    kernel of the direct Conv2d form (see :func:`fastdd.ops.weight_sq_norms.conv2d_weight_sq_norms`); everything
    else is torch. dtypes: float32 and float64 everywhere; float16 and bfloat16 on CUDA and on the torch rules:
    on CPU ``"auto"`` runs those in torch (the C++ kernels of the per-sample norms take float32 and float64 only)
    and ``"cpp"`` refuses them.
    """
    layers = _validate(model, x, y, create_graph, chunk_size, backend)
    return torch.cat([_chunk_norms(model, layers, xs, ys, create_graph, backend)
                      for xs, ys in zip(x.split(chunk_size), y.split(chunk_size))])


def _validate(model: nn.Module, x: Tensor, y: Tensor, create_graph: bool, chunk_size: int,
              backend: str) -> dict[nn.Module, Rule]:
    """Raise ValueError naming the first argument that is not as documented; otherwise the trainable layers."""
    layers = trainable_layers(model)
    checks.tensor("x", x)
    if x.dim() < 2 or x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty batch [B, ...], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating tensor, got {x.dtype}")
    checks.tensor("y", y)
    if y.shape != x.shape[:1] or y.dtype != torch.int64:
        raise ValueError(f"y must be int64 labels of shape [{x.shape[0]}], got {y.dtype} {tuple(y.shape)}")
    checks.one_device({"x": x, "y": y})
    for name, p in model.named_parameters():
        if p.device != x.device or (p.dtype.is_floating_point and p.dtype != x.dtype):
            raise ValueError(f"model parameter {name!r} is {p.dtype} on {p.device}, but x is {x.dtype} on {x.device}: "
                             "model and x must share one dtype and device")
    boolean("create_graph", create_graph)
    positive_int("chunk_size", chunk_size)
    _backend.resolve_backend(backend, [x], "grad_norm", _backend.CPP_FLOATS)  # "cpp" on other dtypes is refused
    return layers


def _fused_tails(model: nn.Module, x: Tensor, create_graph: bool, backend: str, sink: list[Tensor]) -> Tail | None:
    """On CPU, for a model with tails to fuse (:class:`FusableTails`) and no graph of the norms: a :data:`Tail`
    that runs as the fused C++ op, which appends its per-sample weight and bias squared norms to ``sink`` and forms
    neither the normalised nor the rectified map; None otherwise."""
    if create_graph or backend == "torch" or not isinstance(model, FusableTails) or not model.tail_norms():
        return None
    if _backend.resolve_backend("auto", [x], "norm_relu_pool", norm_relu_pool.DTYPES) != "cpp":
        return None
    if not all(norm.weight.requires_grad == norm.bias.requires_grad for norm in model.tail_norms()):
        return None

    def tail(z: Tensor, norm: nn.Module) -> Tensor:
        return instance_norm_relu_pool(z, norm.weight, norm.bias, norm.eps, backend="cpp",
                                       per_sample_sq_norms=sink if norm.weight.requires_grad else None)
    return tail


def _chunk_norms(model: nn.Module, layers: dict[nn.Module, Rule], x: Tensor, y: Tensor, create_graph: bool,
                 backend: str) -> Tensor:
    # Differentiating w.r.t. the input walks the whole graph, so every layer's output-gradient hook
    # fires, and no weight gradient is formed (the input gradient of the first layer is the only extra).
    x = x if x.requires_grad else x.detach().requires_grad_(True)
    sink: list[Tensor] = []
    tail = _fused_tails(model, x, create_graph, backend, sink)
    hooked = layers
    if tail is not None:  # the fused tails report the norms' squared norms themselves
        fused = set(model.tail_norms())
        hooked = {m: rule for m, rule in layers.items() if m not in fused}
    sq_norms, handles = _record(hooked, create_graph, backend)
    try:
        with torch.enable_grad():
            logits = model(x) if tail is None else model.forward_with_tails(x, tail)
            if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != len(x):
                got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                raise ValueError(f"model must map x [B, ...] to logits [B, K] = [{len(x)}, K], got {got}")
            checks.labels_in_range("y", y, logits.shape[1])
            torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x, create_graph=create_graph)
    finally:
        for h in handles:
            h.remove()
    sq_norms += sink
    if len(sq_norms) != len(layers):
        raise ValueError(f"per_sample_grad_norm: {len(layers) - len(sq_norms)} of the model's trainable layers got "
                         "no gradient from the loss (unused in the forward pass?)")
    return torch.stack(sq_norms).sum(0).sqrt()
