"""An example method as an outside package would write it: mean-embedding matching of noise-perturbed real batches.

Every iteration draws a fresh network and freezes it; each class's synthetic images are moved so that their mean
embedding matches that of a real batch of the class, perturbed by Gaussian noise of std ``noise``. Registered by
``fastdd.register_method(SPEC)`` or, installed, by the entry point ``meanmatch = example_method:SPEC`` of the group
``fastdd.methods`` (docs/extending.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import fastdd
from fastdd.checks import nonnegative_float
from fastdd.methods import Distiller


@dataclass(frozen=True)
class MeanMatchOptions:
    """The method's options: RunConfig field ``meanmatch_noise``, command-line option ``--meanmatch-noise``."""

    meanmatch_noise: float = fastdd.option(0.0, keyword="noise", check=nonnegative_float, metavar="STD",
                                           help="std of the noise added to the real batches before embedding")


class MeanMatch(Distiller):
    """Mean-embedding matching of noise-perturbed real batches (module docstring). ``noise``: the noise's std."""

    name = "meanmatch"
    default_iterations = 100
    default_lr_img = 1.0

    def __init__(self, *args: Any, noise: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.noise = nonnegative_float("noise", noise)

    def step(self, iteration: int) -> dict[str, float]:
        net = self.new_network().requires_grad_(False)
        real = self.real_batches()
        loss = self.images.new_zeros(())
        for c in range(self.num_classes):
            x = real[c] + self.noise * torch.randn(real[c].shape, generator=self.generator).to(self.device)
            loss = loss + (net.embed(x).mean(0) - net.embed(self.class_images(c)).mean(0)).pow(2).sum()
        return {"loss": self.update_images(loss, net, iteration)}

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "noise": self.noise}


SPEC = fastdd.MethodSpec("meanmatch", MeanMatch, MeanMatchOptions, eval_augment="none", eval_epochs=300,
                         traits=frozenset({"network", "real_batches"}),
                         help="mean-embedding matching of noise-perturbed real batches (an example)")
