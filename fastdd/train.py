"""Plain minibatch training of a network on a tensor data set, for one epoch or several; shared by the distillers,
the evaluation, the expert trajectories and the plug-ins' networks."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdd.models import fused_blocks

Augment = Callable[[Tensor, torch.Generator], Tensor]


def train_epoch(
    net: nn.Module,
    images: Tensor,
    labels: Tensor,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    batch_size: int = 256,
    augment: Augment | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> float:
    """Train ``net`` one epoch on (images [N,C,H,W], labels [N]) in shuffled minibatches.

    The order comes from ``torch.randperm(generator=generator)``; ``transform(x)`` (e.g.
    ``RealDataset.normalize`` for uint8 images) and then ``augment(x, generator)`` are applied to
    every batch when given. ConvNet blocks run fused (:func:`fastdd.models.fused_blocks`). Returns the
    mean cross-entropy over the epoch.
    """
    net.train()
    order = torch.randperm(len(images), generator=generator).to(images.device)
    total = 0.0
    for start in range(0, len(images), batch_size):
        idx = order[start : start + batch_size]
        x = images[idx]
        if transform is not None:
            x = transform(x)
        if augment is not None:
            x = augment(x, generator)
        with fused_blocks():
            loss = F.cross_entropy(net(x), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
    return total / len(images)


def train_epochs(
    net: nn.Module,
    images: Tensor,
    labels: Tensor,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    epochs: int,
    *,
    batch_size: int = 256,
    augment: Augment | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    done: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> None:
    """Train ``net`` epochs ``done + 1 .. epochs`` with :func:`train_epoch` (same arguments).

    ``done``: epochs already trained, e.g. by a run being resumed (the optimizer and generator must be in
    the state they had then). ``on_epoch(epoch, loss)``, when given, is called after every epoch with its
    number (1-based) and its mean cross-entropy.
    """
    for epoch in range(done + 1, epochs + 1):
        loss = train_epoch(net, images, labels, optimizer, generator, batch_size, augment, transform)
        if on_epoch is not None:
            on_epoch(epoch, loss)
