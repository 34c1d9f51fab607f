"""DM: distribution matching (docs/design.md section 2).

Every iteration draws a fresh network and freezes it. Each class's real batch and synthetic images
get the same random DSA augmentation; the loss is the sum over classes of the squared distance
between the mean embeddings of the two.

Memory stays bounded whatever the number of classes and IPC (the default network normalises per
sample, so embedding in chunks equals the class-by-class loop): real batches are drawn, augmented and
embedded a chunk of classes at a time (at most :data:`REAL_CHUNK_PIXELS` pixels), only their class means
kept; the synthetic images are embedded in one pass while they hold at most :data:`SYN_CHUNK_PIXELS`
pixels, else a chunk of classes at a time with each chunk's activations recomputed in the backward
pass instead of held. The random draws come in the same order either way. BatchNorm
networks embed all real images in one pass and all synthetic ones in another, as the reference does
for them (their statistics mix the samples).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fastdd.augment import DSA, dsa_strategy_for
from fastdd.methods.base import Distiller
from fastdd.models import get_network, has_batchnorm
from fastdd.registry import MethodSpec, register_method
from fastdd.runtime.plan_terms import BACKWARD_FACTOR, ActivationBytes, Term, image_bytes, scaled

# Pixels (images x height x width) a step holds at once. Real: drawn, augmented and embedded without gradient
# (4096 images at 32 x 32: 50 MB as float32 with 3 channels). Synthetic: embedded with their activations held
# (a ConvNet of width 128 holds about 1.5 KB of activations per pixel: 1.5 GB).
REAL_CHUNK_PIXELS = 2**22
SYN_CHUNK_PIXELS = 2**20


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Mean feature per class: features [N, D], labels [N] -> [num_classes, D]."""
    sums = features.new_zeros(num_classes, features.shape[1]).index_add(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(features.dtype)
    return sums / counts[:, None]


def check_splittable(d: DM) -> None:
    """ValueError unless ``d``'s network can be split over processes: without BatchNorm (its statistics mix the
    classes in DM's passes)."""
    probe = get_network(d.model, d.train.channels, d.num_classes, (d.train.height, d.train.width), torch.Generator())
    if has_batchnorm(probe):
        raise ValueError(f"--model {d.model} has BatchNorm, whose statistics mix every class: distributed DM needs a "
                         "network without it")


class DM(Distiller):
    """Distribution matching with DSA augmentation; images SGD lr 1.0, 20000 iterations."""

    name = "dm"
    default_iterations = 20000
    default_lr_img = 1.0
    distributed = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dsa = DSA(dsa_strategy_for(self.train.name))
        if self.world.size > 1:
            check_splittable(self)

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "dsa_strategy": self.dsa.strategy}

    def matching_loss(self, net: nn.Module, params) -> Tensor:
        """Sum over this process's classes (all of them in one process) of |mean embed(aug(real_c)) -
        mean embed(aug(syn_c))|^2 (module docstring)."""
        if has_batchnorm(net):
            return self._whole_batch_loss(net, self.real_batches(), params)
        owned = self.own_classes
        all_classes = range(self.num_classes)  # every class's real batch is drawn, for the generator's sake
        mu_real = torch.cat([self._real_means(net, params, classes, owned)
                             for classes in self.class_chunks(all_classes, self.batch_real, REAL_CHUNK_PIXELS)])
        syn_chunks = self.class_chunks(owned, self.ipc, SYN_CHUNK_PIXELS)
        if len(syn_chunks) == 1:
            mu_syn = self._syn_means(net, params, owned, self.images[owned.start * self.ipc: owned.stop * self.ipc])
        else:  # each chunk's activations are recomputed in the backward pass
            mu_syn = torch.cat([checkpoint(partial(self._syn_means, net, params, classes),
                                           self.images[classes.start * self.ipc: classes.stop * self.ipc],
                                           use_reentrant=False) for classes in syn_chunks])
        return ((mu_real - mu_syn) ** 2).sum()

    def class_chunks(self, classes: range, per_class: int, pixels: int) -> list[range]:
        """``classes`` in consecutive chunks of at most ``pixels`` pixels (``per_class`` images each; one class at
        least)."""
        size = max(1, pixels // (per_class * self.train.height * self.train.width))
        return [range(c, min(c + size, classes.stop)) for c in range(classes.start, classes.stop, size)]

    def _real_means(self, net: nn.Module, params, classes: range, owned: range) -> Tensor:
        """Mean embedding [n, D] of a fresh augmented real batch of each class of ``classes`` in ``owned`` (no
        gradient); the batches of the others are drawn and dropped."""
        indices = [self.train.sample_indices(c, self.batch_real, self.generator) for c in classes]
        kept = [c for c in classes if c in owned]
        if not kept:
            return torch.empty(0, device=self.device)
        real = [self.train.get(indices[c - classes.start]) for c in kept]
        labels = torch.cat([torch.full((len(r),), c, dtype=torch.long) for c, r in zip(kept, real)]).to(self.device)
        with torch.no_grad(), self.real_pass():
            augmented = self.dsa.apply(torch.cat(real), params, labels)
            return torch.stack([net.embed(x).float().mean(0) for x in augmented.split([len(r) for r in real])])

    def _syn_means(self, net: nn.Module, params, classes: range, images: Tensor) -> Tensor:
        """Mean embedding [len(classes), D] of the augmented synthetic ``images`` of ``classes`` (their ipc each)."""
        labels = self.labels[classes.start * self.ipc: classes.stop * self.ipc]
        embedded = net.embed(self.dsa.apply(images, params, labels))
        return class_means(embedded, labels - classes.start, len(classes))

    def _whole_batch_loss(self, net: nn.Module, real: list[Tensor], params) -> Tensor:
        """The loss with every real image embedded in one pass and every synthetic one in another."""
        y_real = torch.cat([torch.full((len(r),), c, dtype=torch.long) for c, r in enumerate(real)]).to(self.device)
        x_real = self.dsa.apply(torch.cat(real), params, y_real)
        with torch.no_grad(), self.real_pass():
            mu_real = class_means(net.embed(x_real).float(), y_real, self.num_classes)
        mu_syn = class_means(net.embed(self.dsa.apply(self.images, params, self.labels)), self.labels,
                             self.num_classes)
        return ((mu_real - mu_syn) ** 2).sum()

    def step(self, iteration: int) -> dict[str, float]:
        net = self.new_network()
        net.train()
        for p in net.parameters():
            p.requires_grad_(False)
        params = self.dsa.sample(self.num_classes, self.generator, self.device)
        loss = self.matching_loss(net, params)
        return {"loss": self.world.sum(self.update_images(loss, net, iteration))}


def memory_terms(d: DM, act: ActivationBytes) -> list[Term]:
    """The synthetic embedding pass of one class chunk and its backward, or the real chunk's pass when larger (its
    images drawn and augmented, float32, and the first convolution's output); the two do not overlap."""
    chunks = d.class_chunks(d.world.shard(d.num_classes), d.ipc, SYN_CHUNK_PIXELS)
    syn = len(chunks[0]) * d.ipc
    embedding = Term(f"synthetic embedding pass ({syn} images{'' if len(chunks) == 1 else ', one class chunk'})",
                     scaled(syn, BACKWARD_FACTOR * act.embedding), ("a lower --ipc", "a smaller --model"))
    real = len(d.class_chunks(range(d.num_classes), d.batch_real, REAL_CHUNK_PIXELS)[0]) * d.batch_real
    real_chunk = Term(f"real chunk ({real} images through the network)",
                      scaled(real, 2 * image_bytes(d) + act.first_map), ("a lower --batch-real",))
    return [max(embedding, real_chunk, key=lambda term: term.bytes)]


register_method(MethodSpec("dm", DM, eval_augment="dsa", eval_epochs=1000, memory_terms=memory_terms,
                           plugin_weights={"sdc": 20.0}, traits=frozenset({"network"}),
                           help="distribution matching (Zhao and Bilen, WACV 2023)"))
