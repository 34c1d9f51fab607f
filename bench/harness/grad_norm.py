"""per_sample_grad_norm on ConvNet-3, 3x32x32, batch 256, against what users have today.

Baselines: one plain forward+backward of the same model (the target: norms for the price of the
gradient), torch.func vmap(grad) (whole batch and chunk_size=32), Opacus' GradSampleModule hooks,
and BackPACK's BatchL2Grad (on the norm-free ConvNet: BackPACK has no GroupNorm). Opacus and BackPACK
are optional (``pip install -c constraints.txt opacus backpack-for-pytorch``); their cases are
skipped when absent.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdd.models import get_network
from fastdd.ops import per_sample_grad_norm
from harness.measure import Calls, Case, unchanged

OP = "per_sample_grad_norm"
BATCH = 256


def _inputs(device: str, batch: int = BATCH) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    return x, torch.randint(0, 10, (batch,), generator=g).to(device)


def _net(name: str, device: str) -> nn.Module:
    return get_network(name, 3, 10, 32, torch.Generator().manual_seed(0)).to(device)


def plain_step(net: nn.Module, x: Tensor, y: Tensor) -> Callable[[], object]:
    def run() -> None:
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
    return run


def vmap_grad(net: nn.Module, x: Tensor, y: Tensor, chunk_size: int | None) -> Callable[[], Tensor]:
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0), chunk_size=chunk_size)
    return lambda: torch.stack([g.flatten(1).pow(2).sum(1) for g in per_sample(params, x, y).values()]).sum(0).sqrt()


def opacus_hooks(net: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    from opacus import GradSampleModule

    wrapped = GradSampleModule(net, loss_reduction="sum")

    def run() -> Tensor:
        wrapped.zero_grad(set_to_none=True)
        F.cross_entropy(wrapped(x), y, reduction="sum").backward()
        return torch.stack([p.grad_sample.flatten(1).pow(2).sum(1) for p in wrapped.parameters()]).sum(0).sqrt()
    return run


def backpack_l2(net: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    model = extend(nn.Sequential(*net.features, nn.Flatten(), net.classifier))
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))

    def run() -> Tensor:
        model.zero_grad(set_to_none=True)
        with backpack(BatchL2Grad()):
            loss_fn(model(x), y).backward()
        return torch.stack([p.batch_l2 for p in model.parameters()]).sum(0).sqrt()
    return run


def fastdd_torch(net: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    return lambda: per_sample_grad_norm(net, x, y, backend="torch")


def _setup(device: str, baseline: Callable[[nn.Module, Tensor, Tensor], Callable[[], object]], net: str = "ConvNet",
           expected: Callable[[object], object] | None = unchanged) -> Calls:
    """fastdd and ``baseline`` on the same batch, each on a network of its own (equal weights)."""
    x, y = _inputs(device)
    ours = _net(net, device)
    return Calls(lambda: per_sample_grad_norm(ours, x, y), baseline(_net(net, device), x, y), expected)


def cases(device: str) -> list[Case]:
    convnet = "ConvNet-3 IN, 3x32x32, B=256"
    found = [
        Case(OP, convnet, "plain forward+backward (no norms)", partial(_setup, device, plain_step, expected=None), 1.0),
        Case(OP, convnet, "torch.func vmap(grad)", partial(_setup, device, partial(vmap_grad, chunk_size=None))),
        Case(OP, convnet, "torch.func vmap(grad), chunk_size=32",
             partial(_setup, device, partial(vmap_grad, chunk_size=32))),
        Case(OP, convnet, "fastdd unfold+bmm (backend=torch)", partial(_setup, device, fastdd_torch)),
    ]
    if importlib.util.find_spec("opacus"):
        found.append(Case(OP, convnet, "Opacus GradSampleModule", partial(_setup, device, opacus_hooks)))
    if importlib.util.find_spec("backpack"):
        found.append(Case(OP, "ConvNet-3 no norm, 3x32x32, B=256", "BackPACK BatchL2Grad",
                          partial(_setup, device, backpack_l2, "ConvNetNN")))
    return found
