"""The reference utilities of the DC / DSA / DM research code and of FTD's and DATM's, by name and signature, on
fastdd.

For forks of the original code: ``from fastdd.compat import match_loss, DiffAugment, ...`` in place of
``from utils import ...`` (docs/porting.md). What runs underneath is fastdd's: the fused
``grad_match_distance``, the vectorised DSA, fastdd's networks. Differences, all deliberate:

- No global reseeding. The reference seeds torch's global RNG from the clock in ``get_network`` and
  from the DSA seed in ``DiffAugment``; here each call draws its own ``torch.Generator`` seed from the
  global RNG (so ``torch.manual_seed`` at the top of a script still makes the run reproducible), or
  uses the DSA ``seed`` it is given. The same seed still gives the real and the synthetic batch the
  same transform (the siamese contract), but not the same draws as the reference's RNG stream.
- ``epoch`` in test mode runs under ``torch.no_grad`` (same outputs, no wasted graph).
- DC's non-differentiable evaluation augmentation (``args.dc_aug_param`` with a strategy other than
  'none') is not provided: a clear error says to use DSA.
- ``evaluate_synset`` takes DATM's ``train_criterion`` (e.g. ``SoftCrossEntropy`` with soft labels [N, K]); with
  soft labels, ``epoch``'s training accuracy counts the label distribution's most likely class (DATM's code
  reports 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fastdd.augment import DSA
from fastdd.methods.dc import get_loops
from fastdd.models import get_network as _fastdd_network
from fastdd.ops import grad_match_distance

__all__ = ["DiffAugment", "ModelEmaV2", "ParamDiffAug", "SoftCrossEntropy", "TensorDataset", "distance_wb", "epoch",
           "evaluate_synset", "get_loops", "get_network", "match_loss"]


def _fresh_seed() -> int:
    """A seed drawn from torch's global RNG (advancing it, never resetting it)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def get_network(model: str, channel: int, num_classes: int, im_size: tuple[int, int] = (32, 32)) -> nn.Module:
    """A freshly initialised network by its reference name (ConvNet, ConvNetD4, ResNet18, ...), on the GPU if any."""
    generator = torch.Generator().manual_seed(_fresh_seed())
    return _fastdd_network(model, channel, num_classes, im_size, generator).to(_device())


def distance_wb(gwr: Tensor, gws: Tensor) -> Tensor:
    """The reference per-layer distance: rows of the layer's gradient, sum of ``1 - cos``; 0 for biases."""
    if gwr.dim() == 1:
        return torch.tensor(0, dtype=torch.float, device=gwr.device)
    return grad_match_distance([gws], [gwr], "ours")


def match_loss(gw_syn: Sequence[Tensor], gw_real: Sequence[Tensor], args: Any) -> Tensor:
    """Distance between two gradient lists by ``args.dis_metric`` ('ours', 'mse' or 'cos')."""
    return grad_match_distance(list(gw_syn), list(gw_real), args.dis_metric)


@dataclass
class ParamDiffAug:
    """The reference DSA parameters (same names and defaults)."""

    aug_mode: str = "S"  # 'S': one op group per call; 'M': every op group in turn
    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    Siamese: bool = False  # noqa: N815 - the reference's name
    latestseed: int = -1

    def dsa(self, strategy: str) -> DSA:
        return DSA(strategy=strategy, prob_flip=self.prob_flip, ratio_scale=self.ratio_scale,
                   ratio_rotate=self.ratio_rotate, ratio_crop_pad=self.ratio_crop_pad, ratio_cutout=self.ratio_cutout,
                   brightness=self.brightness, saturation=self.saturation, contrast=self.contrast)


def DiffAugment(x: Tensor, strategy: str = "", seed: int = -1, param: ParamDiffAug | None = None) -> Tensor:  # noqa: N802
    """Differentiable siamese augmentation of x [N, C, H, W] with the reference's calling convention.

    ``seed != -1``: one transform for the whole batch, the same for every call with that seed (pass the
    real and the synthetic batch of a class with one seed). ``seed == -1``: independent per image.
    """
    param = param or ParamDiffAug()
    param.latestseed = seed
    if not strategy or strategy.lower() == "none":
        return x
    if param.aug_mode not in ("S", "M"):
        raise ValueError(f"param.aug_mode must be 'S' or 'M', got {param.aug_mode!r}")
    generator = torch.Generator(device=x.device).manual_seed(seed if seed != -1 else _fresh_seed())
    for part in ([strategy] if param.aug_mode == "S" else strategy.split("_")):
        dsa = param.dsa(part)
        x = dsa.apply(x, dsa.sample(1, generator)) if seed != -1 else dsa(x, generator)
    return x.contiguous()


class TensorDataset(torch.utils.data.Dataset):
    """(images [N, ...], labels [N]) as a map-style data set, detached."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images.detach().float(), labels.detach()

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __len__(self) -> int:
        return self.images.shape[0]


def epoch(mode: str, dataloader: Any, net: nn.Module, optimizer: torch.optim.Optimizer | None,
          criterion: nn.Module, args: Any, aug: bool) -> tuple[float, float]:
    """One pass over ``dataloader`` ('train' steps the optimizer, 'test' only measures): (mean loss, accuracy)."""
    if mode not in ("train", "test"):
        raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
    net.to(args.device).train(mode == "train")
    loss_sum, correct, seen = 0.0, 0, 0
    with torch.set_grad_enabled(mode == "train"):
        for images, labels in dataloader:
            images, labels = images.float().to(args.device), labels.to(args.device)
            labels = labels.float() if labels.is_floating_point() else labels.long()
            if aug:
                images = _augment(images, args)
            output = net(images)
            loss = criterion(output, labels)
            loss_sum += loss.item() * len(labels)
            classes = labels.argmax(-1) if labels.dim() > 1 else labels  # soft labels: their most likely class
            correct += int(np.sum(output.argmax(-1).cpu().numpy() == classes.cpu().numpy()))
            seen += len(labels)
            if mode == "train":
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return loss_sum / seen, correct / seen


def _augment(images: Tensor, args: Any) -> Tensor:
    if getattr(args, "dsa", False):
        return DiffAugment(images, args.dsa_strategy, param=args.dsa_param)
    strategy = (getattr(args, "dc_aug_param", None) or {}).get("strategy", "none")
    if strategy not in (None, "none", "None"):
        raise ValueError(f"args.dc_aug_param strategy {strategy!r}: DC's evaluation augmentation is not "
                         "provided by fastdd.compat; set args.dsa = True (DSA augmentation) or strategy 'none'")
    return images


def evaluate_synset(it_eval: int, net: nn.Module, images_train: Tensor, labels_train: Tensor,
                    testloader: Any, args: Any, train_criterion: Any = None) -> tuple[nn.Module, float, float]:
    """The reference evaluation: ``args.epoch_eval_train + 1`` epochs of SGD (momentum 0.9, weight decay
    5e-4, lr ``args.lr_net`` divided by 10 after epoch ``epoch_eval_train // 2 + 1``, the optimizer
    re-created then as the reference does), then the test accuracy. Returns (net, train acc, test acc).
    ``train_criterion`` (DATM's): the training loss, default cross-entropy; ``SoftCrossEntropy`` trains on soft
    labels [N, K] (logits)."""
    net = net.to(args.device)
    lr, epochs = float(args.lr_net), int(args.epoch_eval_train)

    def sgd(rate: float) -> torch.optim.SGD:
        return torch.optim.SGD(net.parameters(), lr=rate, momentum=0.9, weight_decay=0.0005)

    optimizer = sgd(lr)
    criterion = nn.CrossEntropyLoss().to(args.device) if train_criterion is None else train_criterion
    loader = torch.utils.data.DataLoader(TensorDataset(images_train.to(args.device), labels_train.to(args.device)),
                                         batch_size=args.batch_train, shuffle=True, num_workers=0)
    acc_train = 0.0
    for ep in range(epochs + 1):
        _, acc_train = epoch("train", loader, net, optimizer, criterion, args, aug=True)
        if ep == epochs // 2 + 1:
            lr *= 0.1
            optimizer = sgd(lr)
    _, acc_test = epoch("test", testloader, net, optimizer, nn.CrossEntropyLoss().to(args.device), args, aug=False)
    print(f"Evaluate_{it_eval:02d}: epoch = {epochs:04d} train acc = {acc_train:.4f}, test acc = {acc_test:.4f}")
    return net, acc_train, acc_test


def SoftCrossEntropy(inputs: Tensor, target: Tensor, reduction: str = "average") -> Tensor:  # noqa: N802
    """DATM's loss: the cross-entropy of logits ``inputs`` [B, K] against ``softmax(target)`` (``target``: label
    logits [B, K]), averaged over the batch."""
    if reduction != "average":
        raise ValueError(f"reduction must be 'average' (the only one DATM's SoftCrossEntropy computes), got "
                         f"{reduction!r}")
    if inputs.shape != target.shape or inputs.dim() != 2:
        raise ValueError(f"inputs and target must both be [B, K] logits, got {tuple(inputs.shape)} and "
                         f"{tuple(target.shape)}")
    return torch.nn.functional.cross_entropy(inputs, target.softmax(1))


class ModelEmaV2:
    """FTD's moving average of tensors (its synthetic images): ``module`` holds a copy of ``params``; ``update``
    moves it to ``decay * module + (1 - decay) * params`` (the average FTD evaluates and saves)."""

    def __init__(self, params: Sequence[Tensor], decay: float = 0.9999) -> None:
        if not 0 <= decay <= 1:
            raise ValueError(f"decay must be in [0, 1], got {decay!r}")
        self.decay = decay
        self.module = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, params: Sequence[Tensor]) -> None:
        for average, p in zip(self.module, params, strict=True):
            average.lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def set(self, params: Sequence[Tensor]) -> None:
        for average, p in zip(self.module, params, strict=True):
            average.copy_(p.detach())
