"""DM: distribution matching (docs/design.md section 2).

Every iteration draws a fresh network and freezes it. Each class's real batch and synthetic images
get the same random DSA augmentation; the loss is the sum over classes of the squared distance
between the mean embeddings of the two. The synthetic images are embedded in one pass over all
classes (the default network normalises per sample, so this equals the class-by-class loop); the
real images class by class (one pass over every class's batch would hold gigabytes of
activations). BatchNorm networks embed all real images in one pass, as the reference does for them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fastdd.augment import DSA, dsa_strategy_for
from fastdd.methods.base import Distiller
from fastdd.models import has_batchnorm


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Mean feature per class: features [N, D], labels [N] -> [num_classes, D]."""
    sums = features.new_zeros(num_classes, features.shape[1]).index_add(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(features.dtype)
    return sums / counts[:, None]


class DM(Distiller):
    """Distribution matching with DSA augmentation; images SGD lr 1.0, 20000 iterations."""

    name = "dm"
    default_iterations = 20000
    default_lr_img = 1.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dsa = DSA(dsa_strategy_for(self.train.name))

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "dsa_strategy": self.dsa.strategy}

    def matching_loss(self, net: nn.Module, real: list[Tensor], params) -> Tensor:
        """Sum over classes of |mean embed(aug(real_c)) - mean embed(aug(syn_c))|^2."""
        y_real = torch.cat([torch.full((len(r),), c, dtype=torch.long) for c, r in enumerate(real)]).to(self.device)
        x_real = self.dsa.apply(torch.cat(real), params, y_real)
        x_syn = self.dsa.apply(self.images, params, self.labels)
        with torch.no_grad(), self.real_pass():
            chunks = [x_real] if has_batchnorm(net) else x_real.split([len(r) for r in real])
            embedded = torch.cat([net.embed(x).float() for x in chunks])
            mu_real = class_means(embedded, y_real, self.num_classes)
        mu_syn = class_means(net.embed(x_syn), self.labels, self.num_classes)
        return ((mu_real - mu_syn) ** 2).sum()

    def step(self, iteration: int) -> dict[str, float]:
        net = self.new_network()
        net.train()
        for p in net.parameters():
            p.requires_grad_(False)
        params = self.dsa.sample(self.num_classes, self.generator, self.device)
        loss = self.matching_loss(net, self.real_batches(), params)
        return {"loss": self.update_images(loss, net)}
