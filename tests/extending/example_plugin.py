"""An example plug-in as an outside package would write it: a total-variation penalty on the synthetic images.

Adds ``weight * TV(images)`` to the method's loss at every image update, ``TV`` being the mean absolute difference
of neighbouring pixels of the training images the method trains on (its context's ``images``). Registered by
``fastdd.register_plugin(TotalVariation)`` or, installed, by the entry point ``tv = example_plugin:TotalVariation`` of
the group ``fastdd.plugins``; or passed as an instance: ``fastdd.distill(config, plugins=[TotalVariation(0.1)])``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

import fastdd
from fastdd.checks import nonnegative_float


@dataclass(frozen=True)
class TotalVariationOptions:
    """The plug-in's options: RunConfig field ``tv_weight``, command-line option ``--tv-weight``."""

    weight: float = fastdd.option(0.01, check=nonnegative_float, metavar="X",
                                  help="weight of the total-variation penalty")


class TotalVariation(fastdd.Plugin):
    """``weight * TV`` of the synthetic training images (module docstring); applies to every method."""

    name = "tv"
    Options = TotalVariationOptions
    help = "total-variation penalty on the synthetic images"

    def __init__(self, weight: float) -> None:
        self.weight = nonnegative_float("weight (--tv-weight)", weight)

    @classmethod
    def from_options(cls, options: TotalVariationOptions, method: fastdd.MethodSpec, ipc: int) -> TotalVariation:
        return cls(options.weight)

    def loss(self, ctx: fastdd.StepContext) -> Tensor | None:
        if self.weight == 0:
            return None
        x = ctx.images
        tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
        return ctx.share * self.weight * tv  # under torchrun: this process's share of the mean

    def hparams(self) -> dict[str, Any]:
        return {"weight": self.weight}
