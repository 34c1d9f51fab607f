"""The standard evaluation protocol of dataset distillation (docs/design.md section 2).

For each of ``num_models`` models: build a fresh network (``get_network(config.model, ...)``,
initialised from the generator), train it on the synthetic set with SGD (lr 0.01 or MTT's learned
lr, momentum 0.9, weight decay 5e-4), batch 256 reshuffled every epoch, for ``epochs`` epochs
(300 without augmentation, 1000 with DSA: set ``EvalConfig(epochs=1000, augment="dsa")``), the lr
multiplied by 0.1 from epoch ``epochs // 2`` on; DSA augmentation of every batch when
``augment == "dsa"``. The last checkpoint is tested on the whole real test set: no model selection
on the test set. The report gives the mean and population std (``np.std``) of the accuracies.

Accuracies are fractions in [0, 1]. A set with soft labels (``SyntheticSet.soft_labels``, MTT's
``--soft-labels``, TESLA) trains its networks with cross-entropy against those distributions, as TESLA
evaluates; other sets, and the random-real baseline, train on the hard labels. The report's ``labels``
says which (``"soft"`` or ``"hard"``). A multi-formation set (IDC, ``meta["factor"]`` > 1) is decoded
first: networks train on its ``factor²`` images per stored image (:func:`training_data`).

Networks that do not learn are flagged, not hidden: a network learned when its last epoch's mean training loss
fell below its chance loss (that of a network that ignores its images and predicts the labels' mean
distribution: ln K for K balanced hard labels) by at least :data:`LEARNED_SHARE` of the way to the lowest loss
the labels allow (their mean entropy: 0 for hard labels). The report counts the networks that did not
(``stuck``) and :func:`evaluate_with_baseline` adds a one-line warning for each part where any did: its
accuracy then says nothing of the set. A warning rather than a refusal: the numbers are still measurements, and
the structural cause, a network whose maps are too small for the images, is refused before any training
(:func:`fastdd.models.check_image_size`).

Differences from the original DC/DSA code, deliberate: it runs ``epochs + 1`` epochs, decays the
lr after epoch ``epochs // 2 + 1`` and rebuilds the optimizer there (dropping the momentum buffer);
fastdd runs exactly ``epochs`` epochs and decays at ``epochs // 2`` keeping the momentum buffer
(``MultiStepLR`` semantics), as the protocol is usually stated. All randomness (network init,
shuffling, augmentation) comes from one ``torch.Generator``, so equal generator states give equal
reports on the same device.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastdd.augment import AUGMENTS, DSA, dsa_strategy_for
from fastdd.checks import nonnegative_float, one_of, positive_float, positive_int, seed_value
from fastdd.data import RealDataset
from fastdd.methods.multiformation import decode
from fastdd.models import check_image_size, fused_blocks, get_network
from fastdd.progress import progress_bar
from fastdd.registry import find_method
from fastdd.runtime.distributed import SINGLE, World
from fastdd.synset import SyntheticSet
from fastdd.train import train_epoch

LR_DECAY = 0.1
SOFT_SUM_TOLERANCE = 1e-4  # how far a soft label's row sum may be from 1
LEARNED_SHARE = 0.1  # a network learned when its final loss fell this share of the way from chance to the lowest


@dataclass
class EvalConfig:
    """Hyper-parameters of the evaluation protocol (defaults: the field's no-augmentation protocol)."""

    model: str = "ConvNet"
    epochs: int = 300
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    augment: str = "none"  # "none" | "dsa"
    dsa_strategy: str | None = None  # None: dsa_strategy_for(test set name)
    test_batch_size: int = 1024

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        for name in ("epochs", "batch_size", "test_batch_size"):
            positive_int(f"EvalConfig.{name}", getattr(self, name))
        positive_float("EvalConfig.lr", self.lr)
        for name in ("momentum", "weight_decay"):
            nonnegative_float(f"EvalConfig.{name}", getattr(self, name))
        one_of("EvalConfig.augment", self.augment, AUGMENTS)
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"EvalConfig.model must be a network name, got {self.model!r}")


def lr_at_epoch(base_lr: float, epoch: int, epochs: int) -> float:
    """Learning rate of (0-based) ``epoch`` out of ``epochs``: ``base_lr``, times 0.1 from ``epochs // 2`` on."""
    return base_lr * LR_DECAY if epoch >= epochs // 2 else base_lr


def _check_set(images: torch.Tensor, labels: torch.Tensor, data: RealDataset, which: str) -> None:
    """Images float [N, *data.image_shape]; labels int64 [N] in [0, data.num_classes) (hard labels), or
    float [N, data.num_classes] with finite non-negative rows summing to 1 (soft labels, :func:`_check_soft`)."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4:
        raise ValueError(f"images must be a float tensor [N, C, H, W], got {_describe(images)}")
    if tuple(images.shape[1:]) != tuple(data.image_shape):
        raise ValueError(
            f"images have per-image shape {tuple(images.shape[1:])} but the {which} set's is {tuple(data.image_shape)}"
        )
    soft = isinstance(labels, torch.Tensor) and labels.is_floating_point()
    if not soft and (not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1):
        raise ValueError(f"labels must be an int64 tensor [N] (hard labels) or a float tensor [N, {data.num_classes}] "
                         f"(soft labels), got {_describe(labels)}")
    if soft and (labels.dim() != 2 or labels.shape[1] != data.num_classes):
        raise ValueError(f"soft labels must be a float tensor [N, {data.num_classes}] (a distribution over the "
                         f"{which} set's {data.num_classes} classes per image; hard labels are int64 [N]), got "
                         f"{_describe(labels)}")
    if len(labels) != len(images):
        raise ValueError(f"labels has {len(labels)} entries but images has {len(images)}")
    if len(images) == 0:
        raise ValueError("images is empty: nothing to train on")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images hold NaN or infinite values: networks cannot be trained on them")
    if soft:
        _check_soft(labels)
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= data.num_classes:
        raise ValueError(f"labels must lie in [0, {data.num_classes}) for the {which} set, got range [{lo}, {hi}]")


def _check_soft(labels: torch.Tensor) -> None:
    """Soft labels [N, K]: every row finite, non-negative and summing to 1 (within ``SOFT_SUM_TOLERANCE``)."""
    bad = int((~torch.isfinite(labels)).sum())
    if bad:
        raise ValueError(f"soft labels hold {bad} NaN or infinite value(s); each row must be a distribution over "
                         "the classes")
    if bool((labels < 0).any()):
        raise ValueError(f"soft labels must be non-negative (a distribution over the classes per image), got min "
                         f"{float(labels.min()):.6g}")
    error = (labels.detach().double().sum(1) - 1.0).abs()
    if bool((error > SOFT_SUM_TOLERANCE).any()):
        row = int(error.argmax())
        raise ValueError(f"soft labels' rows must sum to 1 (tolerance {SOFT_SUM_TOLERANCE:g}), row {row} sums to "
                         f"{float(labels[row].double().sum()):.6g}")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


@torch.no_grad()
def compute_accuracy(net: nn.Module, test: RealDataset, batch_size: int = 1024) -> float:
    """Top-1 accuracy (fraction) of ``net`` on the whole ``test`` set, in eval mode, batched."""
    net.eval()
    device = next(net.parameters()).device
    correct = 0
    for start in range(0, len(test), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(test)), device=test.labels.device)
        with torch.no_grad(), fused_blocks():
            logits = net(test.get(idx).to(device))
        correct += int((logits.argmax(1) == test.labels[idx].to(device)).sum())
    return correct / len(test)


def train_and_test(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    test: RealDataset,
    config: EvalConfig,
    generator: torch.Generator,
    lr: float | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> float:
    """Train ``net`` on (images [N,C,H,W] normalised float, labels int64 [N] or soft labels float [N, K]) by the
    protocol; return test accuracy.

    Soft labels are cross-entropy targets (probabilities, cast to ``images.dtype``). ``net`` is moved to
    ``images.device`` and trained in place. ``lr`` (e.g. MTT's learned lr) overrides ``config.lr``.
    ``on_epoch(epochs_done, last_batch_loss)``, when given, is called after every epoch (for progress
    display). Shuffling and augmentation draw from ``generator``.
    """
    config.validate()
    _check_set(images, labels, test, "test")
    base_lr = config.lr if lr is None else positive_float("lr", lr)
    device = images.device
    images = images.detach()
    labels = labels.detach().to(device, images.dtype) if labels.is_floating_point() else labels.to(device)
    net.to(device)
    optimizer = torch.optim.SGD(
        net.parameters(), lr=base_lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    augment = DSA(config.dsa_strategy or dsa_strategy_for(test.name)) if config.augment == "dsa" else None
    for epoch in range(config.epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at_epoch(base_lr, epoch, config.epochs)
        loss = train_epoch(net, images, labels, optimizer, generator, config.batch_size, augment)
        if on_epoch is not None:
            on_epoch(epoch + 1, loss)
    return compute_accuracy(net, test, config.test_batch_size)


def label_losses(labels: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """(chance, lowest) cross-entropies of labels int64 [N] or soft labels float [N, K]: that of a network that
    ignores its images and predicts the labels' mean distribution (ln K for K balanced classes), and the lowest
    any network can reach (the labels' mean entropy, 0 for hard labels)."""
    p = labels.detach().double() if labels.is_floating_point() else F.one_hot(labels, num_classes).double()
    chance = -torch.special.xlogy(p, p.mean(0)).sum(1).mean()
    lowest = -torch.special.xlogy(p, p).sum(1).mean()
    return float(chance), float(lowest)


def did_not_learn(final_loss: float, chance: float, lowest: float) -> bool:
    """True when a final training loss (NaN included) did not fall :data:`LEARNED_SHARE` of the way from the
    ``chance`` loss to the ``lowest`` (:func:`label_losses`)."""
    return not final_loss < chance - LEARNED_SHARE * (chance - lowest)


@dataclass
class EvalReport:
    """Accuracies (fractions) of ``num_models`` networks, their mean and population std, and the config used.

    ``config.lr`` is the learning rate actually used (the learned lr when one overrode the config).
    ``labels`` is what the networks trained on: ``"hard"`` (class indices) or ``"soft"`` (soft labels).
    ``final_losses``: each network's mean training loss over its last epoch; ``chance_loss``: that of a network
    that ignores its images (:func:`label_losses`); ``stuck``: the networks that did not learn
    (:func:`did_not_learn`; module docstring). A report made without the losses has none and counts none.
    """

    accuracies: list[float]
    mean: float
    std: float
    config: EvalConfig
    num_models: int
    seconds: float
    labels: str = "hard"
    final_losses: list[float] = field(default_factory=list)
    chance_loss: float | None = None
    stuck: int = 0

    @classmethod
    def from_accuracies(cls, accuracies: list[float], config: EvalConfig, seconds: float,
                        labels: str = "hard", final_losses: list[float] | None = None,
                        losses: tuple[float, float] | None = None) -> EvalReport:
        """The report of ``accuracies``; with ``final_losses`` and ``losses`` (the labels' chance and lowest
        losses, :func:`label_losses`), the networks that did not learn are counted."""
        acc = np.asarray(accuracies, dtype=np.float64)
        final_losses = list(map(float, final_losses or []))
        stuck = 0 if losses is None else sum(did_not_learn(loss, *losses) for loss in final_losses)
        return cls(list(map(float, accuracies)), float(acc.mean()), float(acc.std()), config, len(accuracies), seconds,
                   labels, final_losses, None if losses is None else losses[0], stuck)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field (config as a nested dict; a NaN loss as None)."""
        return {
            "accuracies": list(self.accuracies),
            "mean": self.mean,
            "std": self.std,
            "num_models": self.num_models,
            "seconds": self.seconds,
            "labels": self.labels,
            "final_losses": [loss if np.isfinite(loss) else None for loss in self.final_losses],
            "chance_loss": self.chance_loss,
            "stuck": self.stuck,
            "config": dataclasses.asdict(self.config),
        }

    def warning(self, which: str) -> str | None:
        """One line saying that ``stuck`` of the networks trained on ``which`` (``"the distilled set"``) did not
        learn, so that their accuracy says nothing of it; None when every network learned."""
        if not self.stuck:
            return None
        mean = float(np.mean(self.final_losses))
        return (f"{self.stuck} of {self.num_models} {self.config.model} networks trained on {which} did not learn: "
                f"their training loss ended at {mean:.3f} (mean), against {self.chance_loss:.3f} for a network that "
                f"ignores its images; the accuracy of {100 * self.mean:.2f} % says nothing of the set (try more "
                "--eval-epochs or another --eval-model)")

    def __str__(self) -> str:
        return f"{self.config.model}: {100 * self.mean:.2f} +- {100 * self.std:.2f} % over {self.num_models} models"


def evaluate_synset(
    images: torch.Tensor,
    labels: torch.Tensor,
    train: RealDataset,
    test: RealDataset,
    config: EvalConfig,
    num_models: int,
    generator: torch.Generator,
    lr: float | None = None,
    progress: bool = True,
    world: World = SINGLE,
) -> EvalReport:
    """Evaluate a synthetic set (images float [N,C,H,W] normalised like ``train``, labels int64 [N], or soft
    labels float [N, num_classes] whose rows are distributions over the classes).

    Trains ``num_models`` fresh ``config.model`` networks (network k initialised and trained by
    :func:`train_and_test` on ``images.device`` from a generator of its own, seeded with the k-th number drawn
    from ``generator``) and tests each on ``test``. ``lr`` overrides ``config.lr`` (MTT's learned lr).
    ``progress`` shows a tqdm bar over models with the epoch as postfix. Over several processes (``world``),
    process r trains networks r, r + N, ... and every process returns all the accuracies, in network order.
    """
    positive_int("num_models", num_models)
    config.validate()
    _check_set(images, labels, train, "train")
    if tuple(test.image_shape) != tuple(train.image_shape) or test.num_classes != train.num_classes:
        raise ValueError(
            f"train and test sets disagree: image shape {tuple(train.image_shape)} vs {tuple(test.image_shape)}, "
            f"classes {train.num_classes} vs {test.num_classes}"
        )
    c, h, w = train.image_shape
    check_image_size(config.model, c, (h, w), "eval_model (--eval-model)")
    if lr is not None:
        config = dataclasses.replace(config, lr=positive_float("lr", lr))
    began = time.perf_counter()
    seeds = [int(torch.randint(2**62, (1,), generator=generator)) for _ in range(num_models)]
    mine = range(world.rank, num_models, world.size)
    accuracies: list[float] = []
    final_losses: list[float] = []
    bar = progress_bar(mine, desc=f"eval {config.model}", unit="model", disable=not (progress and world.is_main),
                       leave=False)
    every = max(1, config.epochs // 20)

    def on_epoch(done: int, loss: float) -> None:
        if done == config.epochs:
            final_losses.append(loss)
        if done % every == 0 or done == config.epochs:
            bar.set_postfix_str(f"epoch {done}/{config.epochs} loss {loss:.3f}")

    for k in bar:
        network_generator = torch.Generator().manual_seed(seeds[k])
        net = get_network(config.model, c, train.num_classes, (h, w), network_generator)
        accuracies.append(train_and_test(net, images, labels, test, config, network_generator, on_epoch=on_epoch))
        bar.set_postfix_str(f"last acc {100 * accuracies[-1]:.2f}%")
    bar.close()
    return EvalReport.from_accuracies(world.interleave(accuracies), config, time.perf_counter() - began,
                                      "soft" if labels.is_floating_point() else "hard",
                                      world.interleave(final_losses), label_losses(labels, train.num_classes))


def check_baseline(train: RealDataset, ipc: int) -> None:
    """ValueError unless every class of ``train`` holds ``ipc`` images for the random-real baseline."""
    positive_int("ipc", ipc)
    sizes = train.class_sizes
    if min(sizes) < ipc:
        c = sizes.index(min(sizes))
        raise ValueError(f"baseline: class {c} ({train.class_names[c]!r}) of {train.name} holds {sizes[c]} training "
                         f"image(s), fewer than the IPC of {ipc} random real images per class; pass --no-baseline")


def random_real(train: RealDataset, ipc: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` random distinct real images of every class; a class holding fewer is a ValueError (the
    baseline would not be IPC images per class).

    Returns (images float32 [num_classes * ipc, C, H, W] normalised, labels int64 [num_classes * ipc]) on
    ``train``'s device, grouped by class in ascending order.
    """
    check_baseline(train, ipc)
    images, labels = [], []
    for c in range(train.num_classes):
        x = train.sample(c, ipc, generator)
        images.append(x)
        labels.append(torch.full((len(x),), c, dtype=torch.int64, device=x.device))
    return torch.cat(images), torch.cat(labels)


def evaluate_random_real(
    train: RealDataset,
    test: RealDataset,
    ipc: int,
    config: EvalConfig,
    num_models: int,
    generator: torch.Generator,
    progress: bool = True,
    world: World = SINGLE,
) -> EvalReport:
    """The random-real baseline: one :func:`random_real` draw of ``ipc`` images per class, then the
    same protocol as :func:`evaluate_synset` (what distillation is compared against)."""
    images, labels = random_real(train, ipc, generator)
    return evaluate_synset(images, labels, train, test, config, num_models, generator, progress=progress, world=world)


def default_eval_config(method: str, model: str = "ConvNet", epochs: int | None = None,
                        augment: str | None = None) -> EvalConfig:
    """The protocol ``method``'s results are reported with (its spec's ``eval_augment`` and ``eval_epochs``; 300
    epochs without augmentation for a method not registered); ``epochs`` and ``augment`` override it."""
    spec = find_method(method)
    default_augment, default_epochs = ("none", 300) if spec is None else (spec.eval_augment, spec.eval_epochs)
    return EvalConfig(model=model, epochs=default_epochs if epochs is None else epochs,
                      augment=default_augment if augment is None else augment)


def training_data(synset: SyntheticSet, soft: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The images [M, C, H, W] and labels [M] networks train on: the stored ones, decoded
    (``fastdd.methods.multiformation.decode``, ``factor²`` images per stored image) when
    ``synset.meta["factor"]`` > 1 (IDC's multi-formation); sets without the key are not decoded.

    With ``soft``, a set holding ``soft_labels`` gives them (float [M, K]) in place of the labels: what the
    evaluation trains on. Soft labels on a multi-formation set do not occur and are a ValueError there.
    """
    factor = synset.meta.get("factor", 1)
    if soft and synset.soft_labels is not None:
        if factor != 1:
            raise ValueError(f"the set holds soft labels and is stored multi-formation (meta['factor'] = {factor!r}); "
                             "evaluating soft labels of decoded images is not supported")
        return synset.images, synset.soft_labels
    return decode(synset.images, synset.labels, factor)


def evaluate_with_baseline(synset: SyntheticSet, train: RealDataset, test: RealDataset, config: EvalConfig,
                           num_models: int, seed: int, baseline: bool = True,
                           progress: bool = True, world: World = SINGLE) -> dict[str, Any]:
    """Evaluate ``synset`` (its :func:`training_data`, on its soft labels when it has them) and, with
    ``baseline``, ``synset.meta["ipc"]`` random real images per class by the same protocol, on hard labels
    (for a multi-formation set: the same storage). Returns a JSON-able report: ``distilled``,
    ``random_real`` and ``gain`` (difference of the mean accuracies, a fraction); each part's ``labels``
    says what its networks trained on, and ``warnings`` holds a line for each part whose networks did not all learn
    (:meth:`EvalReport.warning`). Each evaluation draws from a generator seeded with ``seed`` (an integer in
    [0, 2**63)); over several processes (``world``) the networks are split between them and every process returns
    the whole report."""
    seed_value("seed (--seed)", seed)
    device = train.images.device
    images, labels = training_data(synset, soft=True)
    distilled = evaluate_synset(images.to(device), labels.to(device), train, test, config,
                                num_models, torch.Generator().manual_seed(seed), lr=synset.lr, progress=progress,
                                world=world)
    report: dict[str, Any] = {"distilled": distilled.to_dict()}
    warnings = [distilled.warning("the distilled set")]
    if baseline:
        rand = evaluate_random_real(train, test, synset.meta["ipc"], config, num_models,
                                    torch.Generator().manual_seed(seed), progress=progress, world=world)
        report["random_real"] = rand.to_dict()
        report["gain"] = distilled.mean - rand.mean
        warnings.append(rand.warning("random real images"))
    report["warnings"] = [line for line in warnings if line is not None]
    return report
