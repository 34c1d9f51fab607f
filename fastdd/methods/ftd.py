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

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastdd.checks import fraction
from fastdd.data import RealDataset
from fastdd.methods.base import IMAGE_COPIES
from fastdd.methods.mtt import MTT, MTTOptions, memory_terms
from fastdd.registry import MethodSpec, option, register_method
from fastdd.synset import SyntheticSet

EMA_WINDOW = 0.4  # the default average's window, 1 / (1 - decay), as a share of the run's iterations


def default_ema_decay(iterations: int) -> float:
    """``max(0, 1 - 1 / (EMA_WINDOW * iterations))``: 0.9995 at 5000 iterations."""
    return max(0.0, 1.0 - 1.0 / (EMA_WINDOW * iterations))


class FTD(MTT):
    """MTT on flat experts, returning the moving average of the images (module docstring).

    Args: those of :class:`fastdd.methods.mtt.MTT` (``experts`` must hold flat trajectories), and
        ema_decay: weight of the average's old value at each update, in [0, 1) (default :func:`default_ema_decay`
            of the run's iterations).
    """

    name = "ftd"
    image_copies = (*IMAGE_COPIES, "moving average", "its checkpoint copy")

    def __init__(self, train: RealDataset, ipc: int, generator: torch.Generator, *,
                 ema_decay: float | None = None, **kwargs: Any) -> None:
        if ema_decay is not None:
            fraction("ema_decay", ema_decay)
        super().__init__(train, ipc, generator, flat_experts=True, **kwargs)
        self.ema_decay = default_ema_decay(self.iterations) if ema_decay is None else float(ema_decay)
        self.ema_images: Tensor = self.images.detach().clone()

    def update(self, loss: float) -> dict[str, float]:
        """MTT's update, then the images' moving average."""
        metrics = super().update(loss)
        with torch.no_grad():
            self.ema_images.lerp_(self.images, 1.0 - self.ema_decay)
        return metrics

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "ema_decay": self.ema_decay}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "ema_images": self.ema_images.cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.ema_images.copy_(state["ema_images"].to(self.device))

    def synthetic_set(self, seed: int | None = None) -> SyntheticSet:
        """MTT's set (the learned rate, soft labels) with the moving average in place of the images."""
        return dataclasses.replace(super().synthetic_set(seed), images=self.ema_images.cpu().clone())


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
