"""Plain-torch oracles of the fused ops: the definitions, written for clarity, not speed.

Every fused op in ``fastdd.ops`` is tested against the function of the same name here (in float64).
All but ``per_sample_grad_norm`` run it as their ``backend="torch"`` path; that op's torch path is its
per-layer rules (``fastdd.ops.layer_rules``) in plain torch, while the oracle here forms every
per-sample gradient.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

METRICS = ("ours", "mse", "l1", "cos")  # grad_match_distance
_EPS = 1e-6


def _cosine_rows(a: Tensor, b: Tensor) -> Tensor:
    """Sum over rows of ``1 - cos(a_row, b_row)``; a, b: [rows, n]."""
    dot = (a * b).sum(dim=-1)
    return (1 - dot / (a.norm(dim=-1) * b.norm(dim=-1) + _EPS)).sum()


def grad_match_distance(g_syn: Sequence[Tensor], g_real: Sequence[Tensor], metric: str = "ours", *,
                        batched: bool = False) -> Tensor:
    """Scalar distance between two equally shaped lists of gradients (one tensor per parameter).

    - ``"ours"``: for every tensor with more than one dimension, reshape to ``(out, -1)`` and sum over
      rows of ``1 - <a, b> / (|a| |b| + 1e-6)``; one-dimensional tensors contribute 0.
    - ``"mse"``: sum of squared differences over all gradients.
    - ``"l1"``: sum of absolute differences over all gradients.
    - ``"cos"``: one ``1 - <a, b> / (|a| |b| + 1e-6)`` over the concatenation of all gradients.

    ``batched=True``: every tensor has a leading class dimension K (the same for all); the result is the
    sum over classes k of the distance between ``[t[k] for t in g_syn]`` and ``[t[k] for t in g_real]``.
    """
    if batched:
        classes = {t.shape[0] if t.dim() else None for t in [*g_syn, *g_real]}
        if len(classes) != 1 or None in classes:
            raise ValueError(f"batched=True needs one leading class dimension K shared by all tensors, got {classes}")
        return sum(grad_match_distance([s[k] for s in g_syn], [r[k] for r in g_real], metric)
                   for k in range(classes.pop()))
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if len(g_syn) != len(g_real) or len(g_syn) == 0:
        raise ValueError("g_syn and g_real must be non-empty lists of equal length, "
                         f"got {len(g_syn)} and {len(g_real)}")
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


def per_sample_grad_norm(model: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """[B] norms ``|grad_theta CE(model(x_i), y_i)|_2`` over the parameters that require grad.

    ``torch.func.vmap`` over ``torch.func.grad`` of the single-sample loss. Its values are the oracle;
    its gradient w.r.t. ``x`` is not: in torch 2.13 it fails gradcheck through instance and layer norm
    (the tests check input gradients against a per-sample autograd loop instead).
    """
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v for k, v in model.named_parameters() if not v.requires_grad}
    buffers = dict(model.named_buffers())

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        logits = functional_call(model, {**p, **frozen, **buffers}, (xi[None],))
        return torch.nn.functional.cross_entropy(logits, yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()


def masked_feature_contrastive(features: Tensor, masks: Tensor, labels: Tensor, prototypes: Tensor,
                               tau: float) -> Tensor:
    """Scalar region-masked category-wise contrastive loss of UDD (docs/design.md section 3).

    features [N, C, H, W]; masks [N, 1, H, W] weights in [0, 1]; labels [N] in [0, K); prototypes
    [K, C]. ``h_i`` = L2-normalised masked average pool of ``features_i`` (weights ``masks_i``);
    ``mu_k`` = L2-normalised ``prototypes_k``; the loss is the mean cross-entropy of the logits
    ``h_i . mu_k / tau`` against ``labels``. An all-zero mask gives ``h_i = 0`` (loss ``log K``).
    """
    pooled = (features * masks).sum((2, 3)) / masks.sum((2, 3)).clamp_min(1e-6)
    h = torch.nn.functional.normalize(pooled, dim=1)
    mu = torch.nn.functional.normalize(prototypes, dim=1)
    return torch.nn.functional.cross_entropy(h @ mu.T / tau, labels)


def instance_norm_relu_pool(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """The tail of a ConvNet block: avg_pool2d(relu(group_norm(x, C groups, weight, bias, eps)), 2).

    x [N, C, H, W]; weight, bias [C]; returns [N, C, H // 2, W // 2].
    """
    normed = torch.nn.functional.group_norm(x, x.shape[1], weight, bias, eps)
    return torch.nn.functional.avg_pool2d(torch.relu(normed), 2)


def conv_instance_norm_relu_pool(x: Tensor, conv_weight: Tensor, conv_bias: Tensor, weight: Tensor, bias: Tensor,
                                 padding: int = 0, eps: float = 1e-5) -> Tensor:
    """A ConvNet block: instance_norm_relu_pool(conv2d(x, conv_weight, conv_bias, padding=padding), weight, bias, eps).

    x [N, Cin, H, W]; conv_weight [C, Cin, kh, kw] (stride 1); conv_bias, weight, bias [C].
    """
    conv = torch.nn.functional.conv2d(x, conv_weight, conv_bias, padding=padding)
    return instance_norm_relu_pool(conv, weight, bias, eps)
