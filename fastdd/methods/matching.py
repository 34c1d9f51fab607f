"""Gradient matching's synthetic side: per-class parameter gradients, class by class or from one pass.

Gradient matching needs, for each class c, the gradient of ``mean_i CE(net(x_i), c)`` over the
class's images w.r.t. every parameter. The reference code runs one forward and one backward per
class. When the network treats samples independently (no BatchNorm), the per-class gradient is a
sum of per-sample contributions, so one pass over all classes' images gives every class's
gradient:

1. one forward over ``[K * B, ...]`` images (K classes of B images each, class by class) that keeps
   each parameterised layer's input (for norms: the normalised input) and output;
2. one backward of ``sum_c mean_{i in c} CE`` to those outputs (each sample's output gradient is its
   contribution to its own class's loss);
3. per layer, the class sums: ``sum_i g_i a_i^T`` per class for Linear, a grouped weight gradient
   for Conv2d (classes moved into channel groups: one call for all classes), sums over the class's
   samples for norm affines and biases.

With ``create_graph=True`` every step is differentiable, so a loss on the gradients (gradient
matching) backpropagates to the images, as in the per-class loop. :func:`matching_distance` takes
this path when the network allows it and the classes hold few images (where it was measured faster),
and the reference's loop over classes otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdd.models import ConvNet
from fastdd.ops import grad_match_distance

_NORMS = (nn.GroupNorm, nn.LayerNorm)
# Most synthetic images per class for which matching_distance takes the class-batched path. Measured on
# CPU (bench/class_batching.py, bench/NOTES.md): 1.5x at one image a class, 1.3x at two, even at five
# and ten, slower at fifty (one pass over every class's images no longer stays in cache).
MAX_BATCHED_PER_CLASS = 2


def supports_class_batching(net: nn.Module) -> bool:
    """True for a ConvNet whose norm (if any) is per sample (instance, group or layer norm)."""
    if not isinstance(net, ConvNet):
        return False
    per_sample = (nn.Conv2d, *_NORMS, nn.ReLU, nn.Sigmoid, nn.LeakyReLU, nn.AvgPool2d, nn.MaxPool2d)
    return all(isinstance(layer, per_sample) for layer in net.features)


def _normalised(layer: nn.Module, x: Tensor) -> Tensor:
    """The norm layer's input normalised, before its affine transform."""
    if isinstance(layer, nn.GroupNorm):
        return F.group_norm(x, layer.num_groups, eps=layer.eps)
    return F.layer_norm(x, layer.normalized_shape, eps=layer.eps)


def _affine(layer: nn.Module, xhat: Tensor) -> Tensor:
    if isinstance(layer, nn.GroupNorm):
        return xhat * layer.weight[:, None, None] + layer.bias[:, None, None]
    return xhat * layer.weight + layer.bias


def _forward_recording(net: ConvNet, x: Tensor) -> tuple[Tensor, list[tuple[nn.Module, Tensor, Tensor]]]:
    """Logits, and (layer, input or normalised input, output) for every parameterised layer in order."""
    records = []
    for layer in net.features:
        if isinstance(layer, nn.Conv2d):
            y = layer(x)
            records.append((layer, x, y))
        elif isinstance(layer, _NORMS):
            xhat = _normalised(layer, x)
            y = _affine(layer, xhat)
            records.append((layer, xhat, y))
        else:
            y = layer(x)
        x = y
    features = x.flatten(1)
    logits = net.classifier(features)
    records.append((net.classifier, features, logits))
    return logits, records


def _by_class(t: Tensor, k: int) -> Tensor:
    """[K * B, ...] -> [K, B, ...]."""
    return t.reshape(k, -1, *t.shape[1:])


def _conv_weight_gradients(layer: nn.Conv2d, a: Tensor, g: Tensor, k: int) -> Tensor:
    """Per-class weight gradients [K, *weight.shape] of a conv with input a and output gradient g.

    The K classes become K channel groups of one convolution over B samples, so a single grouped
    weight-gradient call computes all of them.
    """
    def grouped(t: Tensor) -> Tensor:  # [K * B, C, H, W] -> [B, K * C, H, W]
        kb, c, h, w = t.shape
        return t.reshape(k, kb // k, c, h, w).transpose(0, 1).reshape(kb // k, k * c, h, w)

    weight = layer.weight.detach().repeat(k, 1, 1, 1)  # only its shape is read for a weight gradient
    _, grad_weight, _ = torch.ops.aten.convolution_backward(
        grouped(g), grouped(a), weight, None, layer.stride, layer.padding, layer.dilation, False, [0, 0],
        k * layer.groups, [False, True, False])
    return grad_weight.reshape(k, *layer.weight.shape)


def _layer_gradients(layer: nn.Module, a: Tensor, g: Tensor, k: int) -> list[Tensor]:
    """Per-class gradients of ``layer``'s parameters, in ``layer.parameters()`` order, each [K, *shape]."""
    g_k = _by_class(g, k)
    channel_wise = isinstance(layer, (nn.Conv2d, nn.GroupNorm))  # parameters of shape [C], or [C, ...] for conv

    def class_sum(t: Tensor) -> Tensor:  # [K, B, ...] -> [K, parameter shape]
        return t.sum((1, 3, 4)) if channel_wise else t.sum(1)

    if isinstance(layer, nn.Linear):
        grads = [torch.einsum("kbo,kbi->koi", g_k, _by_class(a, k))]
    elif isinstance(layer, nn.Conv2d):
        grads = [_conv_weight_gradients(layer, a, g, k)]
    else:  # norm affine: a is the normalised input
        grads = [class_sum(g_k * _by_class(a, k))]
    if layer.bias is not None:
        grads.append(class_sum(g_k))
    return grads


def class_gradients(net: nn.Module, x: Tensor, num_classes: int, *, create_graph: bool = False) -> list[Tensor]:
    """Gradients of each class's mean cross-entropy w.r.t. ``net``'s parameters, from one pass.

    Args:
        net: a network with ``supports_class_batching(net)``; every parameter must require grad.
        x: [K * B, C, H, W] images, class by class: rows ``c * B : (c + 1) * B`` have label c, K = num_classes.
        create_graph: keep the graph (the gradients are then differentiable w.r.t. ``x``).

    Returns:
        One tensor [K, *p.shape] per parameter p, in ``net.parameters()`` order; row c is
        ``grad_p mean_i CE(net(x_c), c)``.
    """
    if not supports_class_batching(net):
        raise ValueError(f"class_gradients needs a ConvNet without BatchNorm, got {type(net).__name__}")
    if x.dim() != 4 or len(x) % num_classes:
        raise ValueError(f"x must be [K * B, C, H, W] with K = num_classes = {num_classes}, got {tuple(x.shape)}")
    per_class = len(x) // num_classes
    labels = torch.arange(num_classes, device=x.device).repeat_interleave(per_class)
    logits, records = _forward_recording(net, x)
    loss = F.cross_entropy(logits, labels, reduction="sum") / per_class
    outputs = [y for _, _, y in records]
    output_grads = torch.autograd.grad(loss, outputs, create_graph=create_graph)
    grads = []
    with torch.set_grad_enabled(create_graph):
        for (layer, a, _), g in zip(records, output_grads):
            grads += _layer_gradients(layer, a, g, num_classes)
    return grads


def class_batched_distance(net: nn.Module, weights: Sequence[Tensor], syn: Sequence[Tensor],
                           targets: Sequence[Sequence[Tensor]], metric: str) -> Tensor:
    """``sum_c grad_match_distance(grads of class c's loss on syn[c] w.r.t. weights, targets[c], metric)``
    from one pass over every class (:func:`class_gradients`); differentiable w.r.t. the images.

    ``weights``: parameters of ``net``; ``syn``: K tensors [B, C, H, W], equally many images each;
    ``targets``: K lists of gradients shaped like ``weights``.
    """
    chosen = {id(w) for w in weights}
    grads = class_gradients(net, torch.cat(list(syn)), len(syn), create_graph=True)
    g_syn = [g for g, p in zip(grads, net.parameters()) if id(p) in chosen]
    return grad_match_distance(g_syn, [torch.stack(g) for g in zip(*targets)], metric, batched=True)


def per_class_distance(net: nn.Module, weights: Sequence[Tensor], syn: Sequence[Tensor],
                       targets: Sequence[Sequence[Tensor]], metric: str) -> Tensor:
    """The same sum as :func:`class_batched_distance`, one forward and one backward per class (the
    reference code's loop; any network, any number of images per class)."""
    loss = syn[0].new_zeros(())
    for c, (x, target) in enumerate(zip(syn, targets)):
        y = torch.full((len(x),), c, dtype=torch.long, device=x.device)
        g_syn = torch.autograd.grad(F.cross_entropy(net(x), y), weights, create_graph=True)
        loss = loss + grad_match_distance(g_syn, target, metric)
    return loss


def matching_distance(net: nn.Module, weights: Sequence[Tensor], syn: Sequence[Tensor],
                      targets: Sequence[Sequence[Tensor]], metric: str) -> Tensor:
    """:func:`class_batched_distance` when the network treats samples independently and the classes
    have equally many images, at most ``MAX_BATCHED_PER_CLASS``; :func:`per_class_distance` otherwise."""
    if supports_class_batching(net) and len({len(x) for x in syn}) == 1 and len(syn[0]) <= MAX_BATCHED_PER_CLASS:
        return class_batched_distance(net, weights, syn, targets, metric)
    return per_class_distance(net, weights, syn, targets, metric)
