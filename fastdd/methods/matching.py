"""Gradient matching's synthetic side: per-class parameter gradients, class by class or from one pass.

Gradient matching needs, for each class c, the gradient of ``mean_i CE(net(x_i), c)`` over the
class's images w.r.t. every parameter. The reference code runs one forward and one backward per
class. When the network treats samples independently (no BatchNorm), the per-class gradient is a
sum of per-sample contributions, so one pass over all classes' images gives every class's
gradient:

1. one forward over ``[K * B, ...]`` images (K classes of B images each, class by class) whose hooks keep
   each parameterised layer's input and output;
2. one backward of ``sum_c mean_{i in c} CE`` to those outputs (each sample's output gradient is its
   contribution to its own class's loss);
3. per layer, the class sums of the per-sample gradients, by the layer's rule
   (:mod:`fastdd.ops.layer_rules`): ``sum_i g_i a_i^T`` per class for Linear, a grouped weight gradient for
   Conv2d (classes moved into channel groups: one call for all classes), sums over the class's samples for
   norm affines and biases.

With ``create_graph=True`` every step is differentiable, so a loss on the gradients (gradient
matching) backpropagates to the images, as in the per-class loop. :func:`matching_distance` takes
this path when the network allows it and the classes hold few images (where it was measured faster),
and the reference's loop over classes otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from fastdd.models import ConvNet, eager_block
from fastdd.ops import grad_match_distance
from fastdd.ops.layer_rules import Rule, has_rule, rule_for
from fastdd.runtime.plan_terms import BACKWARD_FACTOR, ActivationBytes, Term, image_bytes, scaled

if TYPE_CHECKING:
    from fastdd.methods.base import Distiller

# Most synthetic images per class for which matching_distance takes the class-batched path. Measured on
# CPU (bench/class_batching.py, bench/NOTES.md): 1.5x at one image a class, 1.3x at two, even at five
# and ten, slower at fifty (one pass over every class's images no longer stays in cache).
MAX_BATCHED_PER_CLASS = 2


def _parameterised(net: nn.Module) -> list[nn.Module]:
    """The modules of ``net`` with parameters of their own, in ``net.modules()`` order."""
    return [m for m in net.modules() if next(m.parameters(recurse=False), None) is not None]


def supports_class_batching(net: nn.Module) -> bool:
    """True for a ConvNet whose parameterised layers all have a per-sample rule: its norm (if any) is per sample
    (instance, group or layer norm), not BatchNorm."""
    return isinstance(net, ConvNet) and all(has_rule(m) for m in _parameterised(net))


def _forward_recording(net: ConvNet, x: Tensor,
                       layers: dict[nn.Module, Rule]) -> tuple[Tensor, list[tuple[nn.Module, Tensor, Tensor]]]:
    """Logits of the eager forward, and (layer, input, output) for each of ``layers``, in the order they ran."""
    records = []
    handles = [layer.register_forward_hook(lambda m, inputs, output: records.append((m, inputs[0], output)))
               for layer in layers]
    try:
        logits = net(x, run_block=eager_block)
    finally:
        for h in handles:
            h.remove()
    return logits, records


def class_gradients(net: nn.Module, x: Tensor, num_classes: int, *, create_graph: bool = False,
                    classes: Sequence[int] | None = None) -> list[Tensor]:
    """Gradients of each class's mean cross-entropy w.r.t. ``net``'s parameters, from one pass.

    Args:
        net: a network with ``supports_class_batching(net)``.
        x: [K * B, C, H, W] images, class by class: rows ``k * B : (k + 1) * B`` have label ``classes[k]``,
            K = num_classes.
        create_graph: keep the graph (the gradients are then differentiable w.r.t. ``x``).
        classes: the label of each of the K groups (default ``0 .. K - 1``).

    Returns:
        One tensor [K, *p.shape] per parameter p, in ``net.parameters()`` order; row k is
        ``grad_p mean_i CE(net(x_k), classes[k])``.
    """
    if not supports_class_batching(net):
        raise ValueError(f"class_gradients needs a ConvNet without BatchNorm, got {type(net).__name__}")
    if x.dim() != 4 or len(x) % num_classes:
        raise ValueError(f"x must be [K * B, C, H, W] with K = num_classes = {num_classes}, got {tuple(x.shape)}")
    per_class = len(x) // num_classes
    classes = range(num_classes) if classes is None else classes
    labels = torch.tensor(list(classes), device=x.device).repeat_interleave(per_class)
    layers = {m: rule_for(m) for m in _parameterised(net)}
    logits, records = _forward_recording(net, x, layers)
    loss = F.cross_entropy(logits, labels, reduction="sum") / per_class
    output_grads = torch.autograd.grad(loss, [y for _, _, y in records], create_graph=create_graph)
    sums = {}
    with torch.set_grad_enabled(create_graph):
        for (layer, a, _), g in zip(records, output_grads):
            for p, grads in layers[layer](layer, a, g, "auto").items():
                sums[p] = grads.group_sums(num_classes)
    return [sums[p] for p in net.parameters()]


def class_batched_distance(net: nn.Module, weights: Sequence[Tensor], syn: Sequence[Tensor],
                           targets: Sequence[Sequence[Tensor]], metric: str,
                           classes: Sequence[int] | None = None) -> Tensor:
    """``sum_k grad_match_distance(grads of class classes[k]'s loss on syn[k] w.r.t. weights, targets[k], metric)``
    from one pass over every class (:func:`class_gradients`); differentiable w.r.t. the images.

    ``weights``: parameters of ``net``; ``syn``: K tensors [B, C, H, W], equally many images each;
    ``targets``: K lists of gradients shaped like ``weights``; ``classes``: the K classes (default ``0 .. K - 1``).
    """
    chosen = {id(w) for w in weights}
    grads = class_gradients(net, torch.cat(list(syn)), len(syn), create_graph=True, classes=classes)
    g_syn = [g for g, p in zip(grads, net.parameters()) if id(p) in chosen]
    return grad_match_distance(g_syn, [torch.stack(g) for g in zip(*targets)], metric, batched=True)


class _GradientNow(torch.autograd.Function):
    """``fn(x)``, a scalar, with its gradient w.r.t. x taken in the forward pass: ``fn``'s graph is freed at once
    and only the gradient (x's size) waits for the backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            value = fn(leaf)
            (grad,) = torch.autograd.grad(value, leaf)
        ctx.save_for_backward(grad)
        return value.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, upstream: Tensor) -> tuple[Tensor, None]:
        (grad,) = ctx.saved_tensors
        return upstream * grad, None


def per_class_distance(net: nn.Module, weights: Sequence[Tensor], syn: Sequence[Tensor],
                       targets: Sequence[Sequence[Tensor]], metric: str,
                       classes: Sequence[int] | None = None) -> Tensor:
    """The same sum as :func:`class_batched_distance`, one forward and one backward per class (the
    reference code's loop; any network, any number of images per class). Each class's distance is
    differentiated w.r.t. its images as soon as it is computed, so a step holds one class's second-order graph at
    a time, not every class's (the sum is differentiable w.r.t. the images only, not the weights)."""
    loss = syn[0].new_zeros(())
    for c, x, target in zip(range(len(syn)) if classes is None else classes, syn, targets, strict=True):
        y = torch.full((len(x),), c, dtype=torch.long, device=x.device)

        def distance(images: Tensor, y: Tensor = y, target: Sequence[Tensor] = target) -> Tensor:
            g_syn = torch.autograd.grad(F.cross_entropy(net(images), y), weights, create_graph=True)
            return grad_match_distance(g_syn, target, metric)

        loss = loss + (_GradientNow.apply(x, distance) if x.requires_grad else distance(x))
    return loss


def matching_distance(net: nn.Module, weights: Sequence[Tensor], syn: Sequence[Tensor],
                      targets: Sequence[Sequence[Tensor]], metric: str,
                      classes: Sequence[int] | None = None) -> Tensor:
    """:func:`class_batched_distance` when the network treats samples independently and the classes
    have equally many images, at most ``MAX_BATCHED_PER_CLASS``; :func:`per_class_distance` otherwise."""
    if supports_class_batching(net) and len({len(x) for x in syn}) == 1 and len(syn[0]) <= MAX_BATCHED_PER_CLASS:
        return class_batched_distance(net, weights, syn, targets, metric, classes)
    return per_class_distance(net, weights, syn, targets, metric, classes)


def matching_term(d: Distiller, act: ActivationBytes, per_class: int, copies: int) -> Term:
    """A gradient-matching step of distiller ``d`` over ``per_class`` synthetic images a class, of this process's
    classes, ``d.batch_real`` real images a class.

    The real passes, one class batch's first-order pass at a time, all run and are freed before the synthetic
    ones: the larger of the two counts. Where a class holds at most ``MAX_BATCHED_PER_CLASS`` images, one
    second-order pass over every class's images. Otherwise one class's second-order pass and its backward at a time
    (:func:`fastdd.methods.matching.per_class_distance` takes each class's image gradient at once), and ``copies``
    of every class's synthetic images meanwhile (their gradients, and their augmented copies where the method
    augments)."""
    syn = len(d.own_classes) * per_class
    real = scaled(d.batch_real, act.first_order)
    what = f"matching step ({d.batch_real} real images, {syn} synthetic images"
    options = ("a lower --ipc", "a lower --batch-real", "a smaller --model")
    if per_class <= MAX_BATCHED_PER_CLASS:
        return Term(f"{what} in one pass)", max(real, scaled(syn, act.second_order)), options)
    one_class = scaled(per_class, BACKWARD_FACTOR * act.second_order)
    return Term(f"{what}, {per_class} in a pass)", max(real, one_class) + copies * syn * image_bytes(d), options)
