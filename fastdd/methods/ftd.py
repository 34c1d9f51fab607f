"""FTD: trajectory matching on flat expert trajectories, with a moving average of the images as the output (Du et
al., "Minimizing the Accumulated Trajectory Error to Improve Dataset Distillation", CVPR 2023). Defaults, their
sources and the differences from the original code are in docs/methods.md, "FTD".

FTD is MTT (:mod:`fastdd.methods.mtt`: the unroll, the loss, the learned rate, every mode, soft labels, the
plug-ins at every unrolled student) with two changes:

- the experts are trained sharpness-aware (``fastdd experts --flat RADIUS``, :mod:`fastdd.trajectories.flat`), so the
  trajectories are flat and a student that strays from them accumulates less error; trajectories trained with
  plain SGD are refused;
- the synthetic set is the exponential moving average of the images over the iterations, ``ema <- decay * ema +
  (1 - decay) * images`` after every image update, starting from the initial images; the images themselves are
  what the iterations update and match with.

``ema_decay`` defaults to ``1 - 1 / (0.4 * iterations)`` (at least 0): an average whose window is 40 % of the run,
0.9995 at the original's 5000 iterations, and the same share of a shorter run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fastdd.checks import fraction
from fastdd.data import RealDataset
from fastdd.methods.base import IMAGE_COPIES
from fastdd.methods.mtt import MTT, MTTOptions, memory_terms
from fastdd.methods.mtt.average import ImageAverage, default_ema_decay
from fastdd.registry import MethodSpec, option, register_method

__all__ = ["FTD", "FTDOptions", "default_ema_decay"]


class FTD(MTT):
    """MTT on flat experts with an :class:`~fastdd.methods.mtt.average.ImageAverage` of the images as its set (module
    docstring).

    Args: those of :class:`fastdd.methods.mtt.MTT` (``experts`` must hold flat trajectories), and
        ema_decay: weight of the average's old value at each update, in [0, 1) (default :func:`default_ema_decay`
            of the run's iterations).
    """

    name = "ftd"
    image_copies = (*IMAGE_COPIES, "moving average", "its checkpoint copy")

    def __init__(self, train: RealDataset, ipc: int, generator: torch.Generator, *,
                 ema_decay: float | None = None, **kwargs: Any) -> None:
        super().__init__(train, ipc, generator, flat_experts=True, average=ImageAverage(ema_decay), **kwargs)


@dataclass(frozen=True)
class FTDOptions(MTTOptions):
    """FTD's options: MTT's and the moving average's decay."""

    ema_decay: float | None = option(help="ftd: the synthetic set is the images' moving average with this decay "
                                          "(default: a window of 40% of the iterations, 0.9995 at 5000)",
                                     check=fraction, metavar="D")


register_method(MethodSpec("ftd", FTD, FTDOptions, eval_augment="dsa", eval_epochs=1000, memory_terms=memory_terms,
                           plugin_weights={"sdc": 0.002}, draws_real=False,
                           help="MTT on flat expert trajectories, returning the images' moving average (Du et al., "
                                "CVPR 2023)"))
