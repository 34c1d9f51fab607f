"""DATM: difficulty-aligned trajectory matching (Guo et al., "Towards Lossless Dataset Distillation via
Difficulty-Aligned Trajectory Matching", ICLR 2024). Defaults, their sources and the differences from the original
code are in docs/methods.md, "DATM".

DATM is MTT (:mod:`fastdd.methods.mtt`: the unroll, the loss, the learned rate, every mode, the plug-ins at
every unrolled student) with four changes:

- **Start epochs tied to IPC and widened during the run.** Iteration ``t`` of ``T`` draws its start epoch
  uniformly from ``[min_start_epoch, upper(t))`` with ``upper(t) = min(max_start_epoch, initial_max_start_epoch +
  floor((max_start_epoch - initial_max_start_epoch) * t / E))``, ``E = max(1, round(expansion_end * T))``: small
  sets match the early, easy part of the trajectories, large ones later parts (:func:`default_start_range`), and
  the range widens to the later epochs while the run goes on (DATM's sequential generation).
- **Correctly classified initial images** (``init="correct"``, the default): each class starts from ``ipc``
  random real images of the class that the first expert's network after its final epoch classifies as that class.
- **Learned soft labels.** Each image's label is a logit vector, initialised to that network's logits on the
  initial images; the students train with cross-entropy against its softmax; the logits are learned with the
  images, by SGD at ``lr_labels`` with momentum 0.9, through the same gradient as the images in every mode. The
  synthetic set carries the distributions as its ``soft_labels``.
- **A loss threshold.** An iteration whose loss exceeds ``LOSS_THRESHOLD`` updates nothing (the original's
  ``threshold``): the student strayed too far from the expert for its gradient to be useful.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from fastdd.checks import fraction, nonnegative_int, positive_float, positive_int
from fastdd.data import RealDataset
from fastdd.methods.base import INITS
from fastdd.methods.mtt import MTT, MTTOptions, StartRange, memory_terms
from fastdd.registry import MethodSpec, option, register_method

LOSS_THRESHOLD = 1.0  # an iteration whose normalised loss exceeds it updates nothing
LABEL_MOMENTUM = 0.9  # momentum of the soft labels' SGD
SELECTION_BATCH = 256  # real images a pass while choosing correctly classified ones


def default_start_range(ipc: int) -> StartRange:
    """DATM's CIFAR-10 ranges by IPC: [0, 4) at IPC 1; [0, 10 -> 20) widened over the first 10 % of the run up to
    IPC 10; [0, 20 -> 40) over 20 % up to IPC 50; [40, 60) beyond (its IPC 500 and 1000)."""
    positive_int("ipc", ipc)
    if ipc <= 1:
        return StartRange(0, 4, 4, 0.0)
    if ipc <= 10:
        return StartRange(0, 10, 20, 0.1)
    if ipc <= 50:
        return StartRange(0, 20, 40, 0.2)
    return StartRange(40, 60, 60, 0.0)


def default_lr_labels(ipc: int) -> float:
    """DATM's CIFAR-10 learning rates of the soft labels: 5 at IPC 1, 2 up to IPC 50, 10 beyond."""
    positive_int("ipc", ipc)
    return 5.0 if ipc <= 1 else 2.0 if ipc <= 50 else 10.0


def start_range(ipc: int, min_start_epoch: int | None, initial_max_start_epoch: int | None,
                max_start_epoch: int | None, expansion_end: float | None) -> StartRange:
    """:func:`default_start_range` with the given fields in place of the defaults; a ValueError unless
    ``min_start_epoch < initial_max_start_epoch <= max_start_epoch``."""
    default = default_start_range(ipc)
    low = default.low if min_start_epoch is None else nonnegative_int("min_start_epoch", min_start_epoch)
    final = default.final if max_start_epoch is None else positive_int("max_start_epoch", max_start_epoch)
    initial = (min(default.initial, final) if initial_max_start_epoch is None
               else positive_int("initial_max_start_epoch", initial_max_start_epoch))
    expansion = default.expansion_end if expansion_end is None else fraction("expansion_end", expansion_end)
    if not low < initial <= final:
        raise ValueError(f"min_start_epoch ({low}) < initial_max_start_epoch ({initial}) <= max_start_epoch ({final}) "
                         "must hold: start epochs are drawn from [min, upper) with upper growing from the initial "
                         "to the final bound")
    return StartRange(low, initial, final, expansion)


def correct_real_images(d: MTT) -> Tensor:
    """[num_classes * ipc, C, H, W]: for each class, the first ``ipc`` images of a random order of its real images
    that ``d``'s :meth:`~fastdd.methods.mtt.MTT.final_expert` classifies as the class; a ValueError when a class has
    fewer (DATM's ``init="correct"``)."""
    expert = d.final_expert()
    chosen = []
    for c, size in enumerate(d.train.class_sizes):
        kept, count = [], 0
        for chunk in d.train.sample_indices(c, size, d.generator).split(SELECTION_BATCH):
            with torch.no_grad():
                predicted = functional_call(d.student, expert, (d.train.get(chunk),)).argmax(1)
            kept.append(chunk[predicted == c])
            count += len(kept[-1])
            if count >= d.ipc:
                break
        if count < d.ipc:
            raise ValueError(f"ipc (--ipc) {d.ipc}: the experts' network classifies only {count} training "
                             f"images of class {c} ({d.train.class_names[c]!r}) correctly, and init 'correct' "
                             "starts from such images; lower --ipc or use --init real")
        chosen.append(d.train.get(torch.cat(kept)[: d.ipc]))
    return torch.cat(chosen)


class DATM(MTT):
    """MTT with DATM's start-epoch schedule, correctly classified initial images, learned soft labels and loss
    threshold (module docstring).

    Args: those of :class:`fastdd.methods.mtt.MTT` (``max_start_epoch`` is the range's final upper bound; soft labels
        are always on and learned), and
        min_start_epoch, initial_max_start_epoch, expansion_end: the rest of the range (:func:`default_start_range`
            by IPC for what is not given; :func:`start_range` checks them);
        lr_labels: learning rate of the soft labels' logits (default :func:`default_lr_labels`).
    ``init``: ``"correct"`` (default, :func:`correct_real_images`), or MTT's ``"real"`` / ``"noise"``.
    """

    name = "datm"
    default_init = "correct"
    inits = ("correct", *INITS)

    def __init__(self, train: RealDataset, ipc: int, generator: torch.Generator, *,
                 min_start_epoch: int | None = None, initial_max_start_epoch: int | None = None,
                 max_start_epoch: int | None = None, expansion_end: float | None = None,
                 lr_labels: float | None = None, soft_labels: bool = True, learn_soft_labels: bool = True,
                 init: str | None = None, **kwargs: Any) -> None:
        if soft_labels is not True or learn_soft_labels is not True:
            raise ValueError("soft_labels and learn_soft_labels are always on with --method datm (it learns soft "
                             f"labels), got soft_labels={soft_labels!r}, learn_soft_labels={learn_soft_labels!r}")
        starts = start_range(ipc, min_start_epoch, initial_max_start_epoch, max_start_epoch, expansion_end)
        self.lr_labels = positive_float("lr_labels", default_lr_labels(ipc) if lr_labels is None else lr_labels)
        correct = (self.default_init if init is None else init) == "correct"
        super().__init__(train, ipc, generator, start_range=starts, init=init, soft_labels=True,
                         learn_soft_labels=True, initialise=correct_real_images if correct else None,
                         label_optimizer=functools.partial(torch.optim.SGD, lr=self.lr_labels,
                                                           momentum=LABEL_MOMENTUM), **kwargs)

    def update(self, loss: float) -> dict[str, float]:
        """MTT's update and the soft labels' step, or nothing when ``loss`` exceeds :data:`LOSS_THRESHOLD`."""
        if loss > LOSS_THRESHOLD:
            return {"skipped": 1.0}
        super().update(loss)
        return {"skipped": 0.0}

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "min_start_epoch": self.start_range.low,
                "initial_max_start_epoch": self.start_range.initial, "expansion_end": self.start_range.expansion_end,
                "lr_labels": self.lr_labels}


@dataclass(frozen=True)
class DATMOptions(MTTOptions):
    """DATM's options: MTT's (``max_start_epoch`` is its range's final bound) and its range's and soft labels'."""

    min_start_epoch: int | None = option(help="datm: start epochs are drawn from this epoch on (default by IPC)",
                                         check=nonnegative_int)
    initial_max_start_epoch: int | None = option(help="datm: the range's upper bound at the first iteration, "
                                                      "widened to --max-start-epoch (default by IPC)",
                                                 check=positive_int)
    expansion_end: float | None = option(help="datm: share of the iterations after which the range is widest, in "
                                              "[0, 1) (default by IPC)", check=fraction, metavar="SHARE")
    lr_labels: float | None = option(help="datm: learning rate of the learned soft labels (default 5 at IPC 1, 2 up "
                                          "to IPC 50, else 10)", check=positive_float)


register_method(MethodSpec("datm", DATM, DATMOptions, eval_augment="dsa", eval_epochs=1000,
                           memory_terms=memory_terms, plugin_weights={"sdc": 0.0013}, draws_real=False,
                           help="difficulty-aligned trajectory matching (Guo et al., ICLR 2024)"))
