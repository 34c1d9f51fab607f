"""Region-masked category-wise contrastive loss of UDD (docs/design.md section 3), fused.

``masked_feature_contrastive(features, masks, labels, prototypes, tau)`` is the loss defined in
:func:`fastdd.ops.naive.masked_feature_contrastive`: masked average pooling of the feature map,
L2 normalisation, logits against the L2-normalised class prototypes ``mu``, mean cross-entropy.

The two passes over the [N, C, H, W] feature map are kernels: the forward pools with one read of the
features (the masked map ``features * masks`` is never formed), the backward writes
``grad_features = masks * scale`` in one pass. On CPU the op is one C++ autograd node (``loss`` in
``csrc/masked_contrastive.cpp``): each direction is one C++ call that also does the per-sample steps in
between (norms, logits, softmax) and the prototypes' normalisation, and no Python runs in either, since
Python and torch dispatch would cost more than the passes themselves at UDD sizes. Under torch.func
transforms, and with Triton, the Python Function below runs instead (it has the vmap rule): the N x C and
N x K steps are torch ops between the kernels, and the prototypes are normalised by torch autograd outside it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdd.checks import positive_float
from fastdd.ops import _backend, naive
from fastdd.ops import _checks as checks
from fastdd.ops._dtypes import MASKED_CONTRASTIVE_CUDA as _CUDA_DTYPES

_EXTENSION = "masked_contrastive"
_CPU_DTYPES = (torch.float32, torch.float64)
_NORM_EPS = 1e-12  # as F.normalize


def _validate(features: Tensor, masks: Tensor, labels: Tensor, prototypes: Tensor, tau: float) -> None:
    """Raise ValueError naming the first argument whose type, shape, dtype or device is not as documented."""
    tensors = {"features": features, "masks": masks, "labels": labels, "prototypes": prototypes}
    for name, t in tensors.items():
        checks.tensor(name, t)
    checks.one_device(tensors)
    if features.dim() != 4 or features.numel() == 0:
        raise ValueError(f"features must be a non-empty [N, C, H, W] tensor, got shape {tuple(features.shape)}")
    allowed = _CUDA_DTYPES if features.is_cuda else _CPU_DTYPES
    if features.dtype not in allowed:
        raise ValueError(f"features must have dtype in {allowed} on {features.device.type}, got {features.dtype}")
    n, c, height, width = features.shape
    if masks.shape != (n, 1, height, width):
        raise ValueError(f"masks must have shape [N, 1, H, W] = {[n, 1, height, width]}, got {list(masks.shape)}")
    if not masks.dtype.is_floating_point:
        raise ValueError(f"masks must be a floating tensor (weights in [0, 1]), got {masks.dtype}")
    if masks.requires_grad:
        raise ValueError("masks requires grad, but masked_feature_contrastive gives masks no gradient; "
                         "pass masks.detach()")
    if labels.shape != (n,) or labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of shape [N] = [{n}], "
                         f"got {labels.dtype} {list(labels.shape)}")
    if prototypes.dim() != 2 or prototypes.shape[0] == 0 or prototypes.shape[1] != c:
        raise ValueError(f"prototypes must have shape [K, C] with K >= 1 and C = {c}, got {list(prototypes.shape)}")
    if not prototypes.dtype.is_floating_point:
        raise ValueError(f"prototypes must be a floating tensor, got {prototypes.dtype}")
    positive_float("tau", tau)


def _validate_values(features: Tensor, masks: Tensor, labels: Tensor, prototypes: Tensor) -> None:
    """Raise ValueError naming the first tensor whose values are not as documented (one pass over each)."""
    checks.labels_in_range("labels", labels, prototypes.shape[0])
    weights = checks.plain(masks)
    if not bool(((weights >= 0) & (weights <= 1)).all()):  # NaN fails both
        raise ValueError("masks must hold weights in [0, 1], got values outside it or NaN")
    checks.all_finite("features", features)
    checks.all_finite("prototypes", prototypes)


def _compute_dtype(features: Tensor) -> torch.dtype:
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def _flat_masks(masks: Tensor, dtype: torch.dtype) -> Tensor:
    """masks [N, 1, H, W] as a contiguous [N, H * W] tensor of ``dtype``."""
    return masks.reshape(masks.shape[0], -1).to(dtype).contiguous()


def _unpool(masks: Tensor, scale: Tensor, dtype: torch.dtype, backend: str) -> Tensor:
    """grad [N, C, L] of ``dtype`` = masks[:, None, :] * scale[:, :, None]; masks [N, L], scale [N, C]."""
    if backend == "cpp":
        grad = _backend.empty((*scale.shape, masks.shape[1]), dtype, masks.device)
        _backend.load_extension(_EXTENSION).pool_backward(masks, scale, grad)
        return grad
    from fastdd.kernels.masked_contrastive import pool_backward

    return pool_backward(masks, scale, dtype)


def _normalise_backward(grad: Tensor, unit: Tensor, norm: Tensor) -> Tensor:
    """Gradient w.r.t. ``x`` of ``unit = x / max(|x|, 1e-12)`` (rows; norm [rows] = |x|) given ``grad``."""
    norm = norm[:, None]
    radial = unit * (unit * grad).sum(1, keepdim=True) * (norm > _NORM_EPS)
    return (grad - radial) / norm.clamp_min(_NORM_EPS)


class _Unpool(torch.autograd.Function):
    """:func:`_unpool` as a Function, so that under torch.func transforms the backward pass of
    :class:`_MaskedContrastive` hands the kernel plain tensors (first-order gradients only)."""

    @staticmethod
    def forward(masks: Tensor, scale: Tensor, dtype: torch.dtype, backend: str) -> Tensor:
        return _unpool(masks, scale, dtype, backend)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def vmap(info, in_dims, masks, scale, dtype, backend):
        """Rows are independent: fold the vmapped dimension into N."""
        def leading(t: Tensor, dim: int | None) -> Tensor:
            t = t.movedim(dim, 0) if dim is not None else t.expand(info.batch_size, *t.shape)
            return t.flatten(0, 1).contiguous()

        out = _backend.apply(_Unpool, leading(masks, in_dims[0]), leading(scale, in_dims[1]), dtype, backend)
        return out.unflatten(0, (info.batch_size, -1)), 0


class _MaskedContrastive(torch.autograd.Function):
    """Loss of (features, flat masks [N, L], labels, mu = normalised prototypes); outputs (loss, h, norm, g, inv_msum),
    all but the loss saved for the backward: h [N, C] the normalised pooled features, norm [N] the pooled norms,
    g [N, K] = softmax(logits) - onehot(labels), inv_msum [N] = 1 / max(mask sums, 1e-6)."""

    @staticmethod
    def forward(features: Tensor, masks: Tensor, labels: Tensor, mu: Tensor, tau: float, backend: str):
        (n, c), k = features.shape[:2], mu.shape[0]
        features = features.reshape(n, c, -1).contiguous()
        if backend == "cpp":
            h, g = _backend.empty((n, c), mu.dtype, mu.device), _backend.empty((n, k), mu.dtype, mu.device)
            norm, inv_msum = (_backend.empty((n,), mu.dtype, mu.device) for _ in range(2))
            loss = _backend.empty((), mu.dtype, mu.device)
            _backend.load_extension(_EXTENSION).forward(features, masks, labels, mu, tau, h, norm, g, inv_msum, loss)
            return loss, h, norm, g, inv_msum
        from fastdd.kernels.masked_contrastive import pool_forward

        pooled, inv_msum = pool_forward(features, masks)
        norm = torch.linalg.vector_norm(pooled, dim=1)
        h = pooled / norm[:, None].clamp_min(_NORM_EPS)
        log_probs = (h @ mu.T / tau).log_softmax(1)
        loss = -log_probs.gather(1, labels[:, None]).mean()
        g = log_probs.exp().scatter_add_(1, labels[:, None], -torch.ones_like(norm[:, None]))
        return loss, h, norm, g, inv_msum

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        features, masks, _, mu, ctx.tau, ctx.backend = inputs
        ctx.features_shape, ctx.features_dtype = features.shape, features.dtype
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(masks, mu, *output[1:])

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_):
        if grad_loss is None:  # no gradient reached the loss
            return None, None, None, None, None, None
        masks, mu, h, norm, g, inv_msum = ctx.saved_tensors
        coef = grad_loss / (h.shape[0] * ctx.tau)  # d loss / d logits = coef * g
        # under torch.func transforms the tensors here are wrapped: reach the kernels through a Function
        functorch = torch._C._are_functorch_transforms_active()
        grad_features = grad_mu = None
        if ctx.needs_input_grad[0]:
            if ctx.backend == "cpp" and not functorch:
                grad = _backend.empty((*h.shape, masks.shape[1]), h.dtype, h.device)
                _backend.load_extension(_EXTENSION).backward(g, h, norm, inv_msum, masks, mu, coef.item(), grad)
            else:
                scale = _normalise_backward(g @ mu * coef, h, norm) * inv_msum[:, None]
                grad = (_Unpool.apply if functorch else _unpool)(masks, scale, ctx.features_dtype, ctx.backend)
            grad_features = grad.view(ctx.features_shape)
        if ctx.needs_input_grad[3]:
            grad_mu = g.T @ h * coef
        return grad_features, None, None, grad_mu, None, None

    @staticmethod
    def vmap(info, in_dims, features, masks, labels, mu, tau, backend):
        """One call per vmapped slice (the kernels take one batch of samples)."""
        def slices(t: Tensor, dim: int | None) -> list[Tensor]:
            return list(t.movedim(dim, 0)) if dim is not None else [t] * info.batch_size

        outs = [_backend.apply(_MaskedContrastive, *args, tau, backend)
                for args in zip(*(slices(t, d) for t, d in zip((features, masks, labels, mu), in_dims)))]
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])


def masked_feature_contrastive(features: Tensor, masks: Tensor, labels: Tensor, prototypes: Tensor, tau: float, *,
                               backend: str = "auto") -> Tensor:
    """Scalar UDD contrastive loss: mean_i CE(normalise(masked_pool(features_i)) . normalise(prototypes).T / tau).

    features [N, C, H, W], non-empty and finite: float32/float64 on every backend, float16/bfloat16 too on CUDA;
    masks [N, 1, H, W] floating weights in [0, 1], given no gradient (detach them); labels [N] integers in [0, K);
    prototypes [K, C], K >= 1, floating and finite; all four on one device; tau a finite number > 0.
    Differentiable w.r.t. ``features`` and ``prototypes``. The loss is float64 for float64 features and
    float32 otherwise (half features are pooled with float32 accumulation); the features' gradient has the
    features' dtype, the prototypes' gradient the prototypes'. ``backend``: see :mod:`fastdd.ops._backend`;
    ``"torch"`` runs the eager composition :func:`fastdd.ops.naive.masked_feature_contrastive`.
    """
    _validate(features, masks, labels, prototypes, tau)
    name = _backend.resolve_backend(backend, [features, masks, labels, prototypes], _EXTENSION)
    _validate_values(features, masks, labels, prototypes)
    if name == "torch":
        return naive.masked_feature_contrastive(features, masks, labels, prototypes, tau)
    dtype = _compute_dtype(features)
    masks = _flat_masks(masks, dtype)
    if name == "cpp" and not torch._C._are_functorch_transforms_active():  # no Python in either direction
        return _backend.load_extension(_EXTENSION).loss(features, masks, labels.long(), prototypes.to(dtype),
                                                        float(tau), _backend.POISON_OUTPUTS)
    mu = torch.nn.functional.normalize(prototypes.to(dtype), dim=1)
    return _backend.apply(_MaskedContrastive, features, masks, labels.long(), mu, float(tau), name)[0]
