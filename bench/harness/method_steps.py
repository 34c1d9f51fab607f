"""The set-up and steps the method benchmarks time (bench/method_scale.py, bench/distributed.py): a random data set
of CIFAR-100 shape, and one outer step of DC.

CIFAR-100 shapes: 100 classes of 3 x 32 x 32, 300 random uint8 images per class (enough for IPC 100 with
``init="real"``); the network ConvNetW32 (depth 3, width 32), so that the cases run on a small CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastdd.data import RealDataset
from fastdd.methods import DC, DM, get_loops
from harness.memory_plan import random_set

CLASSES, SIDE, PER_CLASS, MODEL = 100, 32, 300, "ConvNetW32"


def cifar100_shaped() -> tuple[RealDataset, torch.Generator]:
    """Random images of CIFAR-100 shape (module docstring) and the generator, seeded 0, that drew them."""
    generator = torch.Generator().manual_seed(0)
    return random_set(CLASSES, SIDE, PER_CLASS, generator), generator


def dc_outer_step(d: DC) -> Callable[[], None]:
    """One outer step of ``d`` (:meth:`DC.outer_step`, the network trained after it, as after every outer step but
    an iteration's last) on a network drawn once that persists from call to call, as it does within an
    iteration."""
    net = d.new_network()
    net.train()
    net_optimizer = torch.optim.SGD(net.parameters(), lr=d.lr_net)
    return lambda: d.outer_step(net, net_optimizer, train_network=True)


def gradient_settings(method: str, ipc: int) -> dict:
    """The defaults a DC (``"dc"``) or DM (``"dm"``) case at ``ipc`` runs with, for the tables."""
    if method == "dc":
        outer_loop, inner_loop = get_loops(ipc)
        return {"outer_loop": outer_loop, "inner_loop": inner_loop, "batch_real": DC.default_batch_real}
    return {"batch_real": DM.default_batch_real}
