"""Plain minibatch training of a network on a tensor data set, for one epoch or several; shared by the distillers,
the evaluation, the expert trajectories and the plug-ins' networks."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdd.models import fused_blocks
from fastdd.runtime.distributed import SINGLE, World
from fastdd.trajectories.flat import SharpnessAware

Augment = Callable[[Tensor, torch.Generator], Tensor]


def train_epoch(
    net: nn.Module,
    images: Tensor,
    labels: Tensor,
    optimizer: torch.optim.Optimizer | SharpnessAware,
    generator: torch.Generator,
    batch_size: int = 256,
    augment: Augment | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    world: World = SINGLE,
) -> float:
    """Train ``net`` one epoch on (images [N,C,H,W], labels [N]) in shuffled minibatches.

    The order comes from ``torch.randperm(generator=generator)``; ``transform(x)`` (e.g.
    ``RealDataset.normalize`` for uint8 images) and then ``augment(x, generator)`` are applied to
    every batch when given. ConvNet blocks run fused (:func:`fastdd.models.fused_blocks`). Each batch is one
    ``optimizer.step(closure)`` after ``optimizer.zero_grad()``, the closure back-propagating the batch's loss:
    a torch optimizer calls it once, a :class:`fastdd.trajectories.flat.SharpnessAware` twice (on the same augmented
    batch). Returns the mean cross-entropy over the epoch (with SharpnessAware, at the unperturbed weights).

    Over several processes (``world``; every process holding the same network, data and generator), each
    batch is drawn and augmented whole in every process, each process back-propagates its share of the batch's
    mean loss and the parameters' gradients are summed before the step (data-parallel): the same training as
    one process's for networks that treat samples independently (not BatchNorm, whose statistics would
    be the share's).
    """
    net.train()
    order = torch.randperm(len(images), generator=generator).to(images.device)
    total = 0.0
    for start in range(0, len(images), batch_size):
        idx = order[start : start + batch_size]
        x, y = images[idx], labels[idx]
        if transform is not None:
            x = transform(x)
        if augment is not None:
            x = augment(x, generator)
        optimizer.zero_grad(set_to_none=True)
        loss = optimizer.step(lambda: _backward(net, x, y, world))
        total += loss.item() * len(idx)
    return total / len(images)


def _backward(net: nn.Module, x: Tensor, y: Tensor, world: World) -> Tensor:
    """The batch's mean cross-entropy, back-propagated into the parameters' gradients (summed over the processes,
    :func:`_shared_backward`, when there are several); returns the loss. The optimizer's closure: zeroes nothing."""
    if world.size > 1:
        return _shared_backward(net, x, y, world)
    with fused_blocks():
        loss = F.cross_entropy(net(x), y)
    loss.backward()
    return loss


def _shared_backward(net: nn.Module, x: Tensor, y: Tensor, world: World) -> Tensor:
    """This process's share of the batch's mean cross-entropy, back-propagated, the parameters' gradients summed
    over the processes; returns the batch's mean loss (summed too). The gradients and the loss go in one buffer,
    one all-reduce a batch (each call costs a collective's latency)."""
    share = world.share(len(x))
    with fused_blocks():
        loss = F.cross_entropy(net(x[share]), y[share], reduction="sum") / len(x) if len(x[share]) else None
    if loss is not None:
        loss.backward()
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    part = torch.zeros(1, device=x.device) if loss is None else loss.detach().reshape(1)
    flat = torch.cat([*(p.grad.reshape(-1) for p in params), part.to(params[0].grad.dtype)])
    world.sum_(flat)
    for p, summed in zip(params, flat.split([*(p.numel() for p in params), 1])):
        p.grad.copy_(summed.view_as(p))
    return flat[-1]


def train_epochs(
    net: nn.Module,
    images: Tensor,
    labels: Tensor,
    optimizer: torch.optim.Optimizer | SharpnessAware,
    generator: torch.Generator,
    epochs: int,
    *,
    batch_size: int = 256,
    augment: Augment | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    done: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
    world: World = SINGLE,
) -> None:
    """Train ``net`` epochs ``done + 1 .. epochs`` with :func:`train_epoch` (same arguments).

    ``done``: epochs already trained, e.g. by a run being resumed (the optimizer and generator must be in
    the state they had then). ``on_epoch(epoch, loss)``, when given, is called after every epoch with its
    number (1-based) and its mean cross-entropy.
    """
    for epoch in range(done + 1, epochs + 1):
        loss = train_epoch(net, images, labels, optimizer, generator, batch_size, augment, transform, world)
        if on_epoch is not None:
            on_epoch(epoch, loss)
