"""Distance between two lists of gradients, as used by gradient matching (DC, DSA, IDC).

Metrics (DESIGN section 2), for per-layer gradient lists ``g_syn`` and ``g_real``:

- ``"ours"``: for every tensor with more than one dimension, reshape to ``(out, -1)`` and sum over
  rows of ``1 - <a, b> / (|a| |b| + 1e-6)``; one-dimensional tensors (biases, norm affines)
  contribute 0.
- ``"mse"``: sum of squared differences over all gradients.
- ``"l1"``: sum of absolute differences over all gradients (IDC on MNIST-like sets).
- ``"cos"``: one cosine distance ``1 - <a, b> / (|a| |b| + 1e-6)`` over the concatenation of all
  gradients.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

METRICS = ("ours", "mse", "l1", "cos")
_EPS = 1e-6


def _cosine_rows(a: Tensor, b: Tensor) -> Tensor:
    """Sum over rows of ``1 - cos(a_row, b_row)``; a, b: [rows, n]."""
    dot = (a * b).sum(dim=-1)
    return (1 - dot / (a.norm(dim=-1) * b.norm(dim=-1) + _EPS)).sum()


def grad_match_distance(g_syn: Sequence[Tensor], g_real: Sequence[Tensor], metric: str = "ours") -> Tensor:
    """Scalar distance between two equally shaped lists of gradients (one tensor per parameter)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if len(g_syn) != len(g_real) or len(g_syn) == 0:
        raise ValueError(f"g_syn and g_real must be non-empty lists of equal length, got {len(g_syn)} and {len(g_real)}")
    for i, (s, r) in enumerate(zip(g_syn, g_real)):
        if s.shape != r.shape:
            raise ValueError(f"gradient {i}: g_syn has shape {tuple(s.shape)} but g_real has {tuple(r.shape)}")
    if metric == "cos":
        a = torch.cat([s.reshape(-1) for s in g_syn])
        b = torch.cat([r.reshape(-1) for r in g_real])
        return _cosine_rows(a[None], b[None])
    total = g_syn[0].new_zeros(())
    for s, r in zip(g_syn, g_real):
        if metric == "ours":
            if s.dim() > 1:
                total = total + _cosine_rows(s.reshape(s.shape[0], -1), r.reshape(r.shape[0], -1))
        elif metric == "mse":
            total = total + ((s - r) ** 2).sum()
        else:
            total = total + (s - r).abs().sum()
    return total
