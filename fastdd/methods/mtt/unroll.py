"""One iteration's unroll: where its start epoch comes from (:class:`StartRange`), its random choices
(:class:`Unroll`) and the three ways of taking the gradient of its loss (the modes, module docstring of
:mod:`fastdd.methods.mtt`), each a small object chosen once when the distiller is built (:data:`STRATEGIES`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fastdd.augment import DSAParams

if TYPE_CHECKING:
    from fastdd.methods.mtt.distiller import MTT


@dataclass(frozen=True)
class StartRange:
    """Where an iteration's start epoch is drawn from: ``[low, upper(t))``, ``upper`` growing from ``initial`` at
    the first iteration to ``final`` at ``expansion_end`` of the run (a share of the iterations in [0, 1); 0:
    ``final`` from the start). MTT's is ``[0, max_start_epoch)`` throughout; DATM's widens
    (:mod:`fastdd.methods.datm`)."""

    low: int
    initial: int
    final: int
    expansion_end: float

    def at(self, iteration: int, iterations: int) -> range:
        """The start epochs of iteration ``iteration`` (0-based) of a run of ``iterations``."""
        if self.expansion_end == 0:
            return range(self.low, self.final)
        end = max(1, round(self.expansion_end * iterations))
        return range(self.low, min(self.final, self.initial + (self.final - self.initial) * iteration // end))


def default_max_start_epoch(ipc: int) -> int:
    """2 at IPC 1, 4 otherwise (sources in docs/methods.md)."""
    return 2 if ipc == 1 else 4


@dataclass(frozen=True)
class Unroll:
    """The random choices of one iteration.

    ``expert``: index of the expert; ``start``: the start epoch ``s``; ``batches``: per unrolled step,
    the indices int64 [b] of the synthetic images it trains on and their augmentation
    (``DSA.sample_per_image``: group ``k`` is the batch's image ``k``); ``iteration``: the outer iteration it
    belongs to (the plug-ins' context; 0 for an unroll made by hand).
    """

    expert: int
    start: int
    batches: tuple[tuple[Tensor, DSAParams], ...]
    iteration: int = 0


class Exact:
    """The original's computation: every step's gradient taken with ``create_graph``, the loss back-propagated
    through the whole unrolled graph, the plug-ins' terms part of it."""

    keeps_graph = True  # the whole unroll's graph is held at once

    def backward(self, d: MTT, unroll: Unroll, theta0: Tensor, target: Tensor, scale: Tensor) -> float:
        """Set the ``grad`` of ``d``'s learned tensors (None before) to the gradient of the unroll's loss from
        ``theta0`` [P] towards ``target`` [P] (``scale``: ``|theta0 - target|^2``); returns the loss."""
        theta = theta0.clone().requires_grad_(True)
        terms = []
        for step in unroll.batches:
            terms.append(d.plugin_term(theta, unroll.iteration))
            theta = theta - d.syn_lr * d.step_gradient(theta, d.images, step, create_graph=True)
        loss = (theta - target).pow(2).sum() / scale
        total = loss + sum(t for t in terms if t is not None)
        torch.autograd.backward(total, inputs=d.learned())
        return loss.item()


def _replayed(d: MTT, unroll: Unroll, theta0: Tensor, target: Tensor, scale: Tensor,
              keep: bool) -> tuple[list[Tensor], Tensor, float]:
    """Pass 1 of the flat and lean modes: the unroll without a graph (:meth:`MTT.plain_unroll`, the students
    ``theta_0 .. theta_{N-1}`` kept when ``keep``), ``a_N = dL/dtheta_N`` [P] and the loss."""
    students, theta_n = d.plain_unroll(unroll, theta0, keep=keep)
    return students, 2 * (theta_n - target) / scale, ((theta_n - target).pow(2).sum() / scale).item()


class Flat:
    """The exact gradient with activation memory independent of ``syn_steps``: the steps recomputed backwards from
    the stored students, one Hessian-vector product each."""

    keeps_graph = False

    def backward(self, d: MTT, unroll: Unroll, theta0: Tensor, target: Tensor, scale: Tensor) -> float:
        """As :meth:`Exact.backward`."""
        students, adjoint, loss = _replayed(d, unroll, theta0, target, scale, keep=True)
        for i in reversed(range(len(students))):
            _, adjoint = d.backprop_step(students.pop(), unroll.batches[i], adjoint, through_theta=i > 0,
                                         iteration=unroll.iteration)
        return loss


class Lean:
    """TESLA's decomposition: the steps recomputed forwards with the final adjoint in place of every step's (no
    Hessian-vector product)."""

    keeps_graph = False

    def backward(self, d: MTT, unroll: Unroll, theta0: Tensor, target: Tensor, scale: Tensor) -> float:
        """As :meth:`Exact.backward`, with the stop-gradient of the lean mode."""
        _, adjoint, loss = _replayed(d, unroll, theta0, target, scale, keep=False)
        lr, theta = d.syn_lr.detach(), theta0
        for step in unroll.batches:
            g, _ = d.backprop_step(theta, step, adjoint, through_theta=False, iteration=unroll.iteration)
            theta = theta - lr * g
        return loss


STRATEGIES = {"exact": Exact(), "flat": Flat(), "lean": Lean()}  # by mode
MODES = tuple(STRATEGIES)
