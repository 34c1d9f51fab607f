"""masked_feature_contrastive on every backend against the eager oracle (fastdd.ops.naive) in float64."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdd.ops import masked_feature_contrastive, naive

BACKENDS = ["torch", "cpp", "triton"]
DEVICE = {"torch": "cpu", "cpp": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu"}
# float32 against a float64 oracle: pooling sums of up to C * H * W terms, logits scaled by 1 / tau
TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def inputs(n, c, h, w, k, dtype=torch.float64, seed=0, soft=True):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    masks = torch.rand(n, 1, h, w, generator=g, dtype=dtype)
    if not soft:
        masks = (masks < 0.6).to(dtype)
    labels = torch.randint(0, k, (n,), generator=g)
    prototypes = torch.randn(k, c, generator=g, dtype=dtype)
    return features, masks, labels, prototypes


def loss_and_grads(fn, features, masks, labels, prototypes, tau, **kw):
    """The loss and its gradients w.r.t. features and prototypes, computed on the backend's device (where one is
    named, else where the inputs are), returned on CPU."""
    device = DEVICE[kw["backend"]] if "backend" in kw else features.device
    features, masks, labels, prototypes = (t.to(device) for t in (features, masks, labels, prototypes))
    f, p = features.clone().requires_grad_(True), prototypes.clone().requires_grad_(True)
    loss = fn(f, masks, labels, p, tau, **kw)
    return tuple(t.cpu() for t in (loss, *torch.autograd.grad(loss, (f, p))))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=6, deadline=None)
@given(n=st.integers(1, 5), c=st.sampled_from([1, 3, 37]), h=st.integers(1, 5), w=st.integers(1, 6),
       k=st.integers(1, 4), soft=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_oracle(backend, dtype, n, c, h, w, k, soft, seed):
    x = inputs(n, c, h, w, k, dtype, seed, soft)
    as_double = (t.double() if t.is_floating_point() else t for t in x)
    expected = loss_and_grads(naive.masked_feature_contrastive, *as_double, tau=0.3)
    got = loss_and_grads(masked_feature_contrastive, *x, tau=0.3, backend=backend)
    # the oracle run in the same dtype: an op may be as far from float64 as plain torch is (a gradient that is
    # exactly zero in float64, as with one channel, is a float32 cancellation of order 1e-5 either way)
    same_dtype = loss_and_grads(naive.masked_feature_contrastive, *x, tau=0.3)
    for e, r, s in zip(expected, got, same_dtype):
        assert r.dtype == dtype
        tol = dict(TOLERANCES[dtype])
        tol["atol"] = max(tol["atol"], 2 * float((s.detach().double() - e.detach()).abs().max()))
        torch.testing.assert_close(r.double(), e, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_sizes_across_blocks(backend):
    """Sizes that cover the four-row blocks, vector tails and several Triton channel blocks."""
    x = inputs(6, 70, 5, 7, 10, seed=1)
    expected = loss_and_grads(naive.masked_feature_contrastive, *x, tau=0.07)
    got = loss_and_grads(masked_feature_contrastive, *x, tau=0.07, backend=backend)
    for e, r in zip(expected, got):
        torch.testing.assert_close(r, e, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_mask_is_finite(backend):
    features, masks, labels, prototypes = (t.to(DEVICE[backend]) for t in inputs(3, 4, 3, 3, 5))
    masks[1] = 0
    loss, grad_f, grad_p = loss_and_grads(masked_feature_contrastive, features, masks, labels, prototypes, 0.5,
                                          backend=backend)
    assert torch.isfinite(loss) and torch.isfinite(grad_f).all() and torch.isfinite(grad_p).all()
    assert (grad_f[1] == 0).all()
    alone = masked_feature_contrastive(features[1:2], masks[1:2], labels[1:2], prototypes, 0.5, backend=backend)
    torch.testing.assert_close(alone.cpu(), torch.tensor(math.log(5), dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    features, masks, labels, prototypes = (t.to(DEVICE[backend]) for t in inputs(3, 5, 2, 3, 4, seed=2))
    f, p = features.requires_grad_(True), prototypes.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: masked_feature_contrastive(a, masks, labels, b, 0.4, backend=backend), (f, p))


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_grad_and_vmap(backend):
    features, masks, labels, prototypes = (t.to(DEVICE[backend]) for t in inputs(4, 6, 3, 3, 3, seed=3))
    batch = torch.randn(3, *features.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    batch = batch.to(DEVICE[backend])

    def loss(f, fn=masked_feature_contrastive, **kw):
        return fn(f, masks, labels, prototypes, 0.5, **kw)

    expected = torch.stack([torch.autograd.grad(loss(f.requires_grad_(True), naive.masked_feature_contrastive), f)[0]
                            for f in batch.clone()])
    grad = torch.func.grad(lambda f: loss(f, backend=backend))
    torch.testing.assert_close(grad(batch[0]), expected[0])
    torch.testing.assert_close(torch.func.vmap(lambda f: loss(f, backend=backend))(batch),
                               torch.stack([loss(f, naive.masked_feature_contrastive) for f in batch]))
    torch.testing.assert_close(torch.func.vmap(grad)(batch), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16/bfloat16 run on CUDA only (Triton)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_on_cuda(dtype):
    x = inputs(40, 64, 8, 8, 10, torch.float32, seed=4)
    f, masks, labels, p = (t.cuda() for t in x)
    expected = loss_and_grads(naive.masked_feature_contrastive, f.to(dtype).float(), masks, labels, p, 0.1)
    loss, grad_f, grad_p = loss_and_grads(masked_feature_contrastive, f.to(dtype), masks, labels, p, 0.1)
    assert loss.dtype == torch.float32 and grad_f.dtype == dtype and grad_p.dtype == torch.float32
    torch.testing.assert_close(loss, expected[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_f.float(), expected[1], rtol=2e-2, atol=1e-5)
    torch.testing.assert_close(grad_p, expected[2], rtol=1e-3, atol=1e-5)


def _bad(**changes):
    features, masks, labels, prototypes = inputs(3, 4, 2, 2, 5)
    args = dict(features=features, masks=masks, labels=labels, prototypes=prototypes, tau=0.5) | changes
    return args


@pytest.mark.parametrize("args, match", [
    (_bad(features=torch.zeros(3, 4, 2)), "features must be a non-empty"),
    (_bad(features=torch.zeros(3, 4, 2, 2, dtype=torch.float16)), "features must have dtype"),
    (_bad(masks=torch.ones(3, 2, 2, 2, dtype=torch.float64)), "masks must have shape"),
    (_bad(masks=torch.ones(3, 1, 2, 2, dtype=torch.int64)), "masks must be a floating"),
    (_bad(masks=torch.ones(3, 1, 2, 2, dtype=torch.float64, requires_grad=True)), "detach"),
    (_bad(labels=torch.zeros(3)), "labels must be an integer"),
    (_bad(labels=torch.zeros(2, dtype=torch.int64)), "labels must be an integer tensor of shape"),
    (_bad(labels=torch.tensor([0, 5, 1])), r"labels must lie in \[0, K\)"),
    (_bad(labels=torch.tensor([0, -1, 1])), r"labels must lie in \[0, K\)"),
    (_bad(prototypes=torch.zeros(5, 3, dtype=torch.float64)), "prototypes must have shape"),
    (_bad(prototypes=torch.zeros(0, 4, dtype=torch.float64)), "prototypes must have shape"),
    (_bad(prototypes=torch.zeros(5, 4, dtype=torch.int64)), "prototypes must be a floating"),
    (_bad(tau=0.0), "tau must be"),
    (_bad(tau=float("inf")), "tau must be"),
    (_bad(tau=torch.tensor(0.5)), "tau must be"),
    (_bad(features=[1.0]), "features must be a tensor"),
])
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        masked_feature_contrastive(**args)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        masked_feature_contrastive(**_bad(), backend="cuda")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_walks_maps_larger_than_a_tile(dtype):
    """9 x 15 maps (135 positions): three tiles of positions per program forward, three programs per row backward,
    the last tile partial."""
    from fastdd.kernels.masked_contrastive import _block_l

    assert _block_l(9 * 15) < 9 * 15
    x = inputs(3, 37, 9, 15, 4, dtype, seed=5)
    expected = loss_and_grads(naive.masked_feature_contrastive, *(t.double() if t.is_floating_point() else t
                                                                  for t in x), tau=0.3)
    got = loss_and_grads(masked_feature_contrastive, *x, tau=0.3, backend="triton")
    same_dtype = loss_and_grads(naive.masked_feature_contrastive, *x, tau=0.3)  # plain torch's own rounding
    for e, r, s in zip(expected, got, same_dtype):
        assert r.dtype == dtype
        atol = max(TOLERANCES[dtype]["atol"], 2 * float((s.detach().double() - e.detach()).abs().max()))
        torch.testing.assert_close(r.double(), e, rtol=TOLERANCES[dtype]["rtol"], atol=atol)
