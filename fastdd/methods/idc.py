"""IDC: gradient matching on multi-formation images (docs/design.md section 2; Kim et al., ICML 2022).

Each stored image holds ``factor x factor`` patches; :func:`fastdd.methods.multiformation.decode`
turns the ``ipc`` stored images of a class into ``ipc * factor²`` training images. Every outer
iteration clamps the images to the valid pixel range and draws a fresh network; then, for
``match_steps`` steps: for each class, the gradients of the cross-entropy w.r.t. the network's
conv weights on a real batch and on the class's decoded images (both under the same random
augmentation) are compared with ``mse`` or ``l1``; one SGD step moves the stored images on the sum
over classes; the network then trains one pass over ``net_images`` random real images.

The defaults and their sources in the original code (github.com/snu-mllab/Efficient-Dataset-Condensation),
and the deliberate differences from it, are in docs/methods.md, "IDC".
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from fastdd.augment import DSA, DSAParams
from fastdd.checks import nonnegative_int, one_of, positive_float, positive_int
from fastdd.data import RealDataset
from fastdd.methods.base import INITS, Distiller
from fastdd.methods.matching import matching_term
from fastdd.methods.multiformation import check_factor, decode, mix_init
from fastdd.models import has_batchnorm
from fastdd.registry import MethodSpec, register_method
from fastdd.runtime.distributed import SINGLE
from fastdd.runtime.plan_terms import ActivationBytes, Term
from fastdd.synset import SyntheticSet
from fastdd.train import train_epoch

IDC_METRICS = ("mse", "l1")
PIXEL_LR = {"mse": 5e-3, "l1": 1e-4}  # image lr in [0, 1] pixel units at IPC 10
NET_IMAGES = {"cifar10": 2000}  # real images per network update; 500 for the other sets
NET_MOMENTUM = 0.9
NET_WEIGHT_DECAY = 5e-4
MATCH_OPS = ("color", "crop", "cutout")
NET_OPS = ("color", "crop")


def default_factor(height: int, width: int) -> int:
    """Multi-formation factor for images of this size: 3 from 224 px on (ImageNet), else 2."""
    return 3 if min(height, width) >= 224 else 2


def matching_ops(dataset: str, factor: int) -> tuple[str, ...]:
    """The augmentation ops of the matching step: colour, crop, cutout; no cutout for MNIST with factor > 1."""
    return MATCH_OPS[:2] if dataset == "mnist" and factor > 1 else MATCH_OPS


def conv_weights(net: nn.Module) -> list[nn.Parameter]:
    """The weights of the network's convolutions, the only tensors IDC matches."""
    return [m.weight for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd)]


class IDC(Distiller):
    """Multi-formation gradient matching (module docstring; defaults and their sources in docs/methods.md).

    Args (besides the Distiller's):
        factor: patches per side of a stored image (default 2; 3 for images of 224 px and more).
        metric: ``"mse"`` or ``"l1"`` (default ``l1`` for 1-channel sets, ``mse`` otherwise).
        match_steps: matching steps per outer iteration, i.e. per fresh network (100).
        net_images: real images the network trains on after each matching step (500; CIFAR-10 2000).
        batch_syn: most decoded images of a class per matching step (128).
        lr_net: the network's SGD learning rate (0.01).
    """

    name = "idc"
    default_iterations = 2000
    default_batch_real = 64
    default_init = "mix"
    inits = ("mix", *INITS)
    distributed = True

    def __init__(
        self,
        train: RealDataset,
        ipc: int,
        generator: torch.Generator,
        *,
        factor: int | None = None,
        metric: str | None = None,
        match_steps: int = 100,
        net_images: int | None = None,
        batch_syn: int = 128,
        lr_net: float = 0.01,
        **kwargs: Any,
    ) -> None:
        self.factor = default_factor(train.height, train.width) if factor is None else factor
        check_factor(self.factor, train.height, train.width)
        self.metric = one_of("metric", ("l1" if train.channels == 1 else "mse") if metric is None else metric,
                             IDC_METRICS)
        self.net_images = nonnegative_int("net_images",
                                          NET_IMAGES.get(train.name, 500) if net_images is None else net_images)
        self.match_steps = positive_int("match_steps", match_steps)
        self.batch_syn = positive_int("batch_syn", batch_syn)
        self.lr_net = positive_float("lr_net", lr_net)
        super().__init__(train, ipc, generator, **kwargs)
        self.match_augments = tuple(DSA(op) for op in matching_ops(self.train.name, self.factor))
        self.net_augments = tuple(DSA(op) for op in NET_OPS)
        mean = torch.tensor(self.train.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.train.std, device=self.device).view(1, -1, 1, 1)
        self.pixel_range = (-mean / std, (1 - mean) / std)

    def default_image_lr(self) -> float:
        """``PIXEL_LR[metric] * ipc / 10``, divided by the mean over channels of std² (normalised space)."""
        mean_var = sum(s * s for s in self.train.std) / len(self.train.std)
        return PIXEL_LR[self.metric] * self.ipc / 10 / mean_var

    def _initial_images(self) -> Tensor:
        if self.init == "mix":
            return mix_init(self.train, self.ipc, self.factor, self.generator)
        return super()._initial_images()

    def hparams(self) -> dict[str, Any]:
        return {
            **super().hparams(),
            "factor": self.factor,
            "metric": self.metric,
            "match_steps": self.match_steps,
            "net_images": self.net_images,
            "batch_syn": self.batch_syn,
            "lr_net": self.lr_net,
            "match_augment": "_".join(a.strategy for a in self.match_augments),
            "net_augment": "_".join(a.strategy for a in self.net_augments),
        }

    def synthetic_set(self, seed: int | None = None) -> SyntheticSet:
        """The stored (encoded) images; ``meta["factor"]`` tells the evaluation to decode them."""
        synset = super().synthetic_set(seed)
        synset.meta["factor"] = self.factor
        return synset

    # ----------------------------------------------------------------------------- matching
    def training_images(self) -> tuple[Tensor, Tensor]:
        """All decoded images [num_classes * ipc * factor², C, H, W], class by class, and their labels."""
        return decode(self.images, self.labels, self.factor)

    def synthetic_batches(self) -> list[Tensor]:
        """Per class, its decoded images [min(ipc * factor², batch_syn), C, H, W]: a random subset
        (from the generator) when there are more; differentiable w.r.t. ``self.images``."""
        decoded, _ = self.training_images()
        per_class = self.ipc * self.factor**2
        batches = []
        for c in range(self.num_classes):
            x = decoded[c * per_class : (c + 1) * per_class]
            if per_class > self.batch_syn:
                x = x[torch.randperm(per_class, generator=self.generator)[: self.batch_syn].to(self.device)]
            batches.append(x)
        return batches

    def augmentation_params(self) -> list[DSAParams]:
        """One siamese draw per class of each matching op, in ``match_augments`` order."""
        return [aug.sample(self.num_classes, self.generator, self.device) for aug in self.match_augments]

    def augment_class(self, x: Tensor, params: list[DSAParams], c: int) -> Tensor:
        """Apply class ``c``'s draw of every matching op to x [n, C, H, W], in order."""
        groups = torch.full((len(x),), c, dtype=torch.long, device=x.device)
        for aug, p in zip(self.match_augments, params):
            x = aug.apply(x, p, groups)
        return x

    def matching_loss(self, net: nn.Module, real: Sequence[Tensor], syn: list[Tensor],
                      params: list[DSAParams]) -> Tensor:
        """Sum over this process's classes (all in one process) of D(conv-weight grads on aug(syn_c), on
        aug(real_c)); differentiable w.r.t. the images."""
        owned = self.own_classes
        x_real = (self.augment_class(real[c], params, c) for c in owned)  # one class at a time
        x_syn = [self.augment_class(syn[c], params, c) for c in owned]
        return self.gradient_matching_loss(net, conv_weights(net), x_real, x_syn, self.metric, owned)

    def _augment_real(self, x: Tensor, generator: torch.Generator) -> Tensor:
        for aug in self.net_augments:
            x = aug(x, generator)
        return x

    def train_network(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """One pass over ``net_images`` random real images (any class), batches of ``batch_real``, augmented."""
        if self.net_images == 0:
            return
        idx = torch.randperm(len(self.train), generator=self.generator)[: self.net_images].to(self.device)
        images, labels = self.train.get(idx), self.train.labels[idx]
        train_epoch(net, images, labels, optimizer, self.generator, self.batch_real, self._augment_real,
                    world=SINGLE if has_batchnorm(net) else self.world)

    def step(self, iteration: int) -> dict[str, float]:
        with torch.no_grad():
            self.images.clamp_(*self.pixel_range)
        net = self.new_network()
        net.train()
        optimizer = torch.optim.SGD(net.parameters(), lr=self.lr_net, momentum=NET_MOMENTUM,
                                    weight_decay=NET_WEIGHT_DECAY)
        total = 0.0
        for step in range(self.match_steps):
            loss = self.matching_loss(net, self.real_batches(), self.synthetic_batches(), self.augmentation_params())
            total += self.world.sum(self.update_images(loss, net, iteration))
            self.world.share_rows(self.images, self.ipc)  # every process decodes every class's images
            if step < self.match_steps - 1:
                self.train_network(net, optimizer)
        return {"loss": total / self.match_steps}


def memory_terms(d: IDC, act: ActivationBytes) -> list[Term]:
    """A matching step (:func:`fastdd.methods.matching.matching_term`) over each class's decoded synthetic batch."""
    return [matching_term(d, act, min(d.ipc * d.factor**2, d.batch_syn), copies=2)]


register_method(MethodSpec("idc", IDC, eval_augment="dsa", eval_epochs=1000, memory_terms=memory_terms,
                           plugin_weights={"sdc": 400.0, "udd": 6000.0},
                           traits=frozenset({"network", "real_batches", "gradient_matching"}),
                           help="gradient matching on multi-formation images (Kim et al., ICML 2022)"))
