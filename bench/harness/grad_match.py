"""grad_match_distance forward + backward (w.r.t. g_syn) against the per-class, per-layer loop of DC.

Gradients of fastdd's default ConvNet-3 (width 128, instance norm): 1 channel 28 x 28 with 10 classes
(Fashion-MNIST) and 3 channels 32 x 32 with 100 classes (CIFAR-100). fastdd makes one batched call
over all classes and layers (leaves [K, ...]); the baseline makes the original per-class call (the
oracle's loop over layers) for every class on that class's own leaves, as DC holds them, sums, and
differentiates once.
"""

from __future__ import annotations

from functools import partial

import torch

from fastdd.models import ConvNet
from fastdd.ops import grad_match_distance, naive
from harness.measure import Calls, Case

# (data set, channels, image size, classes, metric, target speed-up)
CASES = [
    ("Fashion-MNIST", 1, 28, 10, "ours", 3.0),
    ("CIFAR-100", 3, 32, 100, "ours", 3.0),
    ("Fashion-MNIST", 1, 28, 10, "mse", None),
]


def _setup(channels: int, im_size: int, classes: int, metric: str, device: str) -> Calls:
    with torch.device("meta"):
        shapes = [p.shape for p in ConvNet(channels, classes, im_size).parameters()]
    g = torch.Generator().manual_seed(0)
    syn = [torch.randn(classes, *s, generator=g).to(device).requires_grad_(True) for s in shapes]
    real = [torch.randn(classes, *s, generator=g).to(device) for s in shapes]
    syn_per_class = [[t[k].detach().clone().requires_grad_(True) for t in syn] for k in range(classes)]
    leaves = [t for per_class in syn_per_class for t in per_class]

    def run():
        return torch.autograd.grad(grad_match_distance(syn, real, metric, batched=True), syn)

    def baseline():
        loss = sum(naive.grad_match_distance(syn_per_class[k], [t[k] for t in real], metric) for k in range(classes))
        return torch.autograd.grad(loss, leaves, allow_unused=True)

    def stacked(grads):  # per-class leaf gradients -> [K, ...] per layer (a leaf the metric skips: zeros)
        return tuple(torch.stack([torch.zeros_like(t[0]) if grad is None else grad for grad in grads[i::len(syn)]])
                     for i, t in enumerate(syn))

    return Calls(run, baseline, stacked)


def cases(device: str) -> list[Case]:
    return [Case(op="grad_match_distance",
                 name=f"ConvNet-3 {dataset} ({channels}x{im_size}x{im_size}), {classes} classes, {metric}",
                 baseline_name="per-class, per-layer torch loop (DC)",
                 setup=partial(_setup, channels, im_size, classes, metric, device), target=target)
            for dataset, channels, im_size, classes, metric, target in CASES]
