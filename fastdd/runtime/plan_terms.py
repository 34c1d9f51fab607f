"""The pieces of a memory plan (:mod:`fastdd.runtime.memory`): its terms, and the bytes autograd saves per image of a
network's passes, from which a method's ``memory_terms`` (its spec, :class:`fastdd.registry.MethodSpec`)
size its iteration. Per-image bytes are traced on the meta device (:func:`activation_bytes`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdd.models import meta_network
from fastdd.ops.norm_relu_pool import MAX_FUSED_TAPS

# A backward pass holds the gradients of the activations it walks through besides the saved ones: about this
# multiple of the saved bytes of the pass (measured: DM's embedding pass 1.35, MTT's second-order step 1.55).
BACKWARD_FACTOR = 1.45


@dataclass(frozen=True)
class Term:
    """One part of a plan: ``what`` it holds, its ``bytes``, and the changes of ``fastdd distill``'s options that
    shrink it (``"a lower --ipc"``)."""

    what: str
    bytes: int
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes autograd saves per image (floats) for each kind of pass of a network.

    first_order: a forward pass and the gradient of the cross-entropy w.r.t. the weights (real passes,
    network training). second_order: the same gradient taken with ``create_graph`` and then
    back-propagated (gradient matching, MTT's students). embedding: ``net.embed`` and its gradient w.r.t. the
    input images (DM). first_map: not saved, the first convolution's output, which a pass without gradients writes
    whole (DM's real chunks), except where it is fused into its block and never written (at most
    ``MAX_FUSED_TAPS`` taps, grey images: :mod:`fastdd.ops.norm_relu_pool`).
    """

    first_order: float
    second_order: float
    embedding: float
    first_map: float


def _storage_id(t: Tensor) -> int:
    """An identity of ``t``'s storage, shared by its views (meta tensors have no data pointer to tell them apart)."""
    return t.untyped_storage()._cdata


def _saved_bytes(fn: Callable[[], object], skip: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs, leaving out the storages in ``skip``
    (:func:`_storage_id`)."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = _storage_id(t)
        if storage not in skip:
            seen[storage] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def activation_bytes(model: str, channels: int, num_classes: int, size: tuple[int, int]) -> ActivationBytes:
    """:class:`ActivationBytes` of network ``model`` on images [channels, *size], traced on the meta device (module
    docstring): nothing of the network's or the images' size is allocated."""
    net = meta_network(model, channels, num_classes, size)
    weights = list(net.parameters())
    skip = {_storage_id(w) for w in weights}

    def first_order(x: Tensor, y: Tensor) -> None:
        torch.autograd.grad(F.cross_entropy(net(x), y), weights)

    def second_order(x: Tensor, y: Tensor) -> None:
        grads = torch.autograd.grad(F.cross_entropy(net(x), y), weights, create_graph=True)
        torch.autograd.grad(sum((g * g).sum() for g in grads), weights)

    def embedding(x: Tensor, y: Tensor) -> None:
        torch.autograd.grad(net.embed(x).sum(), x)

    def per_image(kind: Callable[[Tensor, Tensor], None]) -> float:
        def saved(n: int) -> int:
            x = torch.empty(n, channels, *size, device="meta", requires_grad=True)
            return _saved_bytes(lambda: kind(x, torch.zeros(n, dtype=torch.long, device="meta")), skip)
        return (saved(4) - saved(2)) / 2

    first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    fused_whole = first.weight.shape[1:].numel() <= MAX_FUSED_TAPS
    with torch.no_grad():
        first_map = 0 if fused_whole else first(torch.empty(1, channels, *size, device="meta")).numel() * 4
    return ActivationBytes(per_image(first_order), per_image(second_order), per_image(embedding), first_map)


def scaled(count: int, per_image: float) -> int:
    """Bytes of ``count`` images at ``per_image`` bytes each (an :class:`ActivationBytes` entry)."""
    return round(count * per_image)


def image_bytes(d: Any) -> int:
    """Bytes of one float32 image of ``d``'s training set."""
    return 4 * d.train.channels * d.train.height * d.train.width
