"""masked_feature_contrastive forward + backward (features requiring grad) against the eager composition.

Shapes of the UDD use: ConvNet-3 feature maps before the last pooling, C = 128; H = W = 8 for 32 x 32
images (after two poolings), 16 for 64 x 64; N = 100 synthetic images (10 classes x 10), 400 decoded
multi-formation images (4 per stored image), or 2000 of them (100 classes, IPC 5); binary region masks
keeping about three quarters of the cells.
"""

from __future__ import annotations

from functools import partial

import torch

from fastdd.ops import masked_feature_contrastive, naive
from harness.measure import Calls, Case

# (N, C, H = W, K)
SHAPES = [(100, 128, 8, 10), (400, 128, 8, 100), (100, 128, 16, 10), (2000, 128, 8, 100)]
TAU = 0.1


def _setup(n: int, c: int, size: int, k: int, device: str) -> Calls:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(n, c, size, size, generator=g).to(device).requires_grad_(True)
    masks = (torch.rand(n, 1, size, size, generator=g) < 0.75).float().to(device)
    labels = (torch.arange(n) % k).to(device)
    prototypes = torch.randn(k, c, generator=g).to(device)

    def grad_of(loss_fn):
        return lambda: torch.autograd.grad(loss_fn(features, masks, labels, prototypes, TAU), features)

    return Calls(grad_of(masked_feature_contrastive), grad_of(naive.masked_feature_contrastive))


def cases(device: str) -> list[Case]:
    return [Case(op="masked_feature_contrastive", name=f"N={n} C={c} H=W={size} K={k}",
                 baseline_name="eager torch (f*m, sums, normalize, matmul, cross_entropy)",
                 setup=partial(_setup, n, c, size, k, device), target=1.5)
            for n, c, size, k in SHAPES]
