"""Sharpness-aware ("flat") training: the expert optimiser of FTD (Du et al., "Minimizing the Accumulated
Trajectory Error to Improve Dataset Distillation", CVPR 2023), i.e. GSAM (Zhuang et al., ICLR 2022) with
ASAM's adaptive perturbation (Kwon et al., ICML 2021) around a base optimiser.

:class:`SharpnessAware` wraps a constructed base optimiser (the experts' SGD). Each step back-propagates the
same batch twice: at the weights ``w`` and at the perturbed weights ``w + e``, which lie uphill, and gives the
base optimiser a gradient built from both (the formulas in :class:`SharpnessAware`); the base optimiser's
learning rate, momentum and weight decay act on that gradient as they would on a plain one.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from fastdd.checks import nonnegative_float

GSAM_ALPHA = 0.4  # GSAM's alpha: FTD's default (github.com/AngusDujw/FTD-distillation, buffer/buffer_FTD.py)
PERTURB_EPS = 1e-12  # GSAM's perturb_eps: keeps the divisions by gradient norms finite


def _norm(tensors: list[Tensor]) -> Tensor:
    """The 2-norm of ``tensors`` taken together as one vector (a 0-dim tensor, no host synchronisation)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


@contextlib.contextmanager
def _running_stats_frozen(net: nn.Module) -> Iterator[None]:
    """Within it, ``net``'s BatchNorm layers in training mode normalise with the batch's statistics as always but
    leave their running statistics (and ``num_batches_tracked``) untouched; restored on exit."""
    layers = [m for m in net.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


class SharpnessAware:
    """A base optimiser made sharpness-aware, as FTD trains its experts (module docstring).

    ``base``: the optimiser taking the steps (e.g. ``torch.optim.SGD``), already constructed on the parameters;
    the perturbation acts on its parameters. ``radius``: rho >= 0, the size of the perturbation ``e`` relative to
    the weights, ``|| e / |w| ||_2 = radius`` (elementwise division), so dimensionless; FTD uses 0.01, constant
    over training. ``net``: the network those parameters belong to, whose BatchNorm running statistics the second
    pass leaves alone (as FTD's ``disable_running_stats``).

    ``step(closure)``, with the parameters as one vector ``w`` and ``closure()`` back-propagating the batch's loss:

    1. ``g``: the gradient ``closure()`` leaves at ``w`` (its loss is what ``step`` returns);
    2. ``e = radius * (w * w * g) / (|| |w| * g ||_2 + 1e-12)`` (ASAM's adaptive perturbation; products
       elementwise, the norm over all parameters together); the weights become ``w + e``;
    3. ``g'``: the gradient a second ``closure()`` leaves there, BatchNorm running statistics frozen;
    4. GSAM's decomposition: ``cos = <g, g'> / (|g| |g'| + 1e-12)``,
       ``vertical = g - cos * |g| * g' / (|g'| + 1e-12)`` (the part of ``g`` orthogonal to ``g'``),
       ``g_final = g' - GSAM_ALPHA * vertical``;
    5. the weights are set back to ``w`` exactly (a copy; FTD subtracts ``e``, which can be off by a rounding)
       and ``base.step()`` runs with the gradients ``g_final``.

    Parameters whose gradient is None after the first pass are neither perturbed nor counted in the norms.
    At radius 0 a step is ``base.step(closure)``: one pass, the base optimiser's very numbers.

    Gradients: the caller zeroes them before ``step`` (``zero_grad``, as with any torch optimiser) and the closure
    zeroes nothing, so the first pass accumulates into what the caller left; ``step`` sets them to None before
    the second pass. After ``step`` the parameters' ``.grad`` hold ``g_final`` (the plain gradient at radius 0).
    Over several processes the closure must sum the gradients over them (as :func:`fastdd.train.train_epoch`'s
    does); every process then computes the same ``e`` and ``g_final``.

    ``state_dict``, ``load_state_dict``, ``zero_grad`` and ``param_groups`` are the base optimiser's: the wrapper
    keeps no state of its own between steps.
    """

    def __init__(self, base: torch.optim.Optimizer, radius: float, net: nn.Module) -> None:
        self.base = base
        self.radius = nonnegative_float("radius", radius)
        self.net = net

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        """One sharpness-aware step (class docstring); returns the loss of the first ``closure()`` call, at ``w``."""
        if self.radius == 0:
            return self.base.step(closure)
        with torch.enable_grad():
            loss = closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        with torch.no_grad():
            scale = self.radius / (_norm([p.abs() * g for p, g in zip(params, grads)]) + PERTURB_EPS)
            weights = [p.clone() for p in params]
            for p, g in zip(params, grads):
                p.add_(g * scale * p.square())
                p.grad = None
        with torch.enable_grad(), _running_stats_frozen(self.net):
            closure()
        with torch.no_grad():
            perturbed = [p.grad for p in params]
            g_norm, p_norm = _norm(grads), _norm(perturbed)
            inner = torch.stack([torch.sum(g * q) for g, q in zip(grads, perturbed)]).sum()
            cos = inner / (g_norm * p_norm + PERTURB_EPS)
            for p, g, q, w in zip(params, grads, perturbed, weights):
                q.sub_(g - cos * g_norm * q / (p_norm + PERTURB_EPS), alpha=GSAM_ALPHA)  # g' - alpha * vertical
                p.copy_(w)
        self.base.step()
        return loss
