"""grad_match_distance against the definitions of docs/design.md section 2, written out here."""

from __future__ import annotations

import pytest
import torch

from fastdd.ops import grad_match_distance

SHAPES = [(37, 3, 3, 3), (5, 7), (37,), (1, 1, 3, 3), (3, 2, 5)]


def grads(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]


def ours(a, b):
    total = torch.zeros((), dtype=torch.float64)
    for x, y in zip(a, b):
        if x.dim() == 1:
            continue
        x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
        for r in range(len(x)):
            total += 1 - (x[r] @ y[r]) / (x[r].norm() * y[r].norm() + 1e-6)
    return total


def cos(a, b):
    x, y = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return 1 - (x @ y) / (x.norm() * y.norm() + 1e-6)


REFERENCES = {
    "ours": ours,
    "mse": lambda a, b: sum(((x - y) ** 2).sum() for x, y in zip(a, b)),
    "l1": lambda a, b: sum((x - y).abs().sum() for x, y in zip(a, b)),
    "cos": cos,
}


@pytest.mark.parametrize("metric", sorted(REFERENCES))
def test_matches_reference(metric):
    a, b = grads(0), grads(1)
    torch.testing.assert_close(grad_match_distance(a, b, metric), REFERENCES[metric](a, b))


@pytest.mark.parametrize("metric", sorted(REFERENCES))
def test_gradcheck(metric):
    a = [t[:2].clone().requires_grad_(True) for t in grads(2)]
    b = [t[:2] for t in grads(3)]
    assert torch.autograd.gradcheck(lambda *xs: grad_match_distance(list(xs), b, metric), a)


def test_ours_ignores_one_dimensional_tensors():
    a, b = [torch.randn(4)], [torch.randn(4)]
    assert grad_match_distance(a, b) == 0


def test_zero_gradient_is_finite():
    z = [torch.zeros(3, 4)]
    assert torch.isfinite(grad_match_distance(z, z)) and grad_match_distance(z, z) == 3


@pytest.mark.parametrize("a, b, metric, match", [
    ([torch.ones(2, 2)], [torch.ones(2, 3)], "ours", "shape"),
    ([torch.ones(2, 2)], [], "ours", "equal length"),
    ([torch.ones(2, 2)], [torch.ones(2, 2)], "l2", "metric"),
])
def test_bad_input(a, b, metric, match):
    with pytest.raises(ValueError, match=match):
        grad_match_distance(a, b, metric)


# ---- the fused backends against the oracle (fastdd.ops.naive.grad_match_distance) ----

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastdd.ops import _backend, naive  # noqa: E402

METRICS = sorted(REFERENCES)
ON_CUDA = torch.cuda.is_available()


def _triton_runs() -> bool:
    return _backend.triton_available() and (ON_CUDA or _backend.triton_interpreted())


BACKENDS = ["torch", "cpp", pytest.param("triton", marks=pytest.mark.skipif(
    not _triton_runs(), reason="triton is not installed or TRITON_INTERPRET is unset without CUDA"))]
DEVICE = {"torch": "cpu", "cpp": "cpu", "triton": "cuda" if ON_CUDA else "cpu"}
# odd sizes: 1, 3, 37, non-powers of two; a 1-d bias, a 0-d scalar, a row longer than one chunk
ODD_SHAPES = [(3, 1, 3, 3), (37,), (1, 5), (2, 4100), (), (5, 3, 2)]
BATCHED_SHAPES = [(3, *s) for s in [(3, 1, 3, 3), (37,), (1, 5), (), (2, 3, 2)]]
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-4)}


def random_pair(shapes, seed, dtype=torch.float64, device="cpu", zeros_and_ties=True):
    """Random lists a, b; with zeros_and_ties, a zero row in each and ties (for l1) where the op is not smooth."""
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes]
    b = [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes]
    if zeros_and_ties and a[0].dim() > 1:
        a[0].view(a[0].shape[0], -1)[0] = 0
        b[0].view(b[0].shape[0], -1)[-1] = 0
        b[-1].view(-1)[:2] = a[-1].view(-1)[:2]
    return a, b


def oracle_value_and_grads(a, b, metric, batched, wrt_real=False):
    a = [t.detach().double().cpu().requires_grad_(True) for t in a]
    b = [t.detach().double().cpu().requires_grad_(wrt_real) for t in b]
    value = naive.grad_match_distance(a, b, metric, batched=batched)
    inputs = a + (b if wrt_real else [])
    if not value.requires_grad:  # "ours" over tensors of at most one dimension: a constant 0
        return value, [torch.zeros_like(t) for t in inputs]
    return value, torch.autograd.grad(value, inputs, allow_unused=True, materialize_grads=True)


def assert_matches_oracle(a, b, metric, batched, backend, dtype, wrt_real=False):
    a = [t.detach().requires_grad_(True) for t in a]
    b = [t.detach().requires_grad_(wrt_real) for t in b]
    value = grad_match_distance(a, b, metric, batched=batched, backend=backend)
    grads = torch.autograd.grad(value, a + (b if wrt_real else []), allow_unused=True, materialize_grads=True)
    ref_value, ref_grads = oracle_value_and_grads(a, b, metric, batched, wrt_real)
    tol = TOLERANCE[dtype]
    assert value.dtype == dtype
    torch.testing.assert_close(value.double().cpu(), ref_value, **tol)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        # the gradient of a zero row of g_real is -a / 1e-6: compare relative to the gradient's scale
        torch.testing.assert_close(got.double().cpu(), want, rtol=tol["rtol"],
                                   atol=tol["atol"] * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backends_match_oracle(backend, metric, batched, dtype):
    shapes = BATCHED_SHAPES if batched else ODD_SHAPES
    a, b = random_pair(shapes, seed=10, dtype=dtype, device=DEVICE[backend])
    assert_matches_oracle(a, b, metric, batched, backend, dtype, wrt_real=dtype == torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck_backends(backend, metric):
    a, b = random_pair([(3, 2, 2), (3, 2), (3, 1)], seed=11, device=DEVICE[backend], zeros_and_ties=False)
    a = [t.requires_grad_(True) for t in a]
    b = [t.requires_grad_(True) for t in b]

    def fn(*xs):
        return grad_match_distance(list(xs[:3]), list(xs[3:]), metric, batched=True, backend=backend)

    assert torch.autograd.gradcheck(fn, (*a, *b))


shape_lists = st.lists(st.lists(st.sampled_from([1, 2, 3, 5, 37]), min_size=0, max_size=3).map(tuple),
                       min_size=1, max_size=4)


@settings(max_examples=25, deadline=None)
@given(shapes=shape_lists, classes=st.sampled_from([1, 2, 3]), metric=st.sampled_from(METRICS),
       batched=st.booleans(), seed=st.integers(0, 2**16))
def test_cpp_matches_oracle_on_random_shapes(shapes, classes, metric, batched, seed):
    shapes = [(classes, *s) for s in shapes] if batched else shapes
    a, b = random_pair(shapes, seed)
    assert_matches_oracle(a, b, metric, batched, "cpp", torch.float64, wrt_real=True)


@pytest.mark.skipif(not _triton_runs(), reason="triton cannot run here")
@settings(max_examples=6, deadline=None)
@given(shapes=st.lists(st.lists(st.sampled_from([1, 2, 3, 5]), min_size=0, max_size=3).map(tuple),
                       min_size=1, max_size=3),
       metric=st.sampled_from(METRICS), seed=st.integers(0, 2**16))
def test_triton_matches_oracle_on_random_shapes(shapes, metric, seed):
    a, b = random_pair(shapes, seed, device=DEVICE["triton"])
    assert_matches_oracle(a, b, metric, False, "triton", torch.float64, wrt_real=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_is_the_sum_over_classes(backend):
    a, b = random_pair([(4, 3, 5), (4, 3), (4, 2, 2, 2)], seed=12, device=DEVICE[backend])
    for metric in METRICS:
        per_class = sum(grad_match_distance([t[k] for t in a], [t[k] for t in b], metric, backend=backend)
                        for k in range(4))
        torch.testing.assert_close(grad_match_distance(a, b, metric, batched=True, backend=backend), per_class)


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=BACKENDS[2].marks)])
@pytest.mark.parametrize("metric", METRICS)
def test_upstream_gradient_scales_and_only_needed_grads(backend, metric):
    a, b = random_pair([(3, 4), (5,)], seed=13, device=DEVICE[backend])
    a = [t.requires_grad_(True) for t in a]
    ref = torch.autograd.grad(3 * naive.grad_match_distance(a, b, metric), a, allow_unused=True,
                              materialize_grads=True)
    got = torch.autograd.grad(3 * grad_match_distance(a, b, metric, backend=backend), a)
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=BACKENDS[2].marks)])
def test_no_grad_and_non_contiguous_inputs(backend):
    a, b = random_pair([(4, 6), (3, 2, 2)], seed=14, device=DEVICE[backend])
    a_t = [a[0].t(), a[1].transpose(0, 2)]
    b_t = [b[0].t(), b[1].transpose(0, 2)]
    with torch.no_grad():
        for metric in METRICS:
            torch.testing.assert_close(grad_match_distance(a_t, b_t, metric, backend=backend),
                                       naive.grad_match_distance(a_t, b_t, metric))


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=BACKENDS[2].marks)])
@pytest.mark.parametrize("metric", METRICS)
def test_double_backward_raises(backend, metric):
    a, b = random_pair([(3, 4)], seed=15, device=DEVICE[backend])
    x = a[0].requires_grad_(True)
    (g,) = torch.autograd.grad(grad_match_distance([x * 2], b, metric, backend=backend), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        g.sum().backward()


def test_distiller_style_call_flows_to_images():
    """g_syn depends on the images (create_graph), g_real is detached: the image gradient matches the oracle's."""
    g = torch.Generator().manual_seed(16)
    images = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    real = [torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)]
    for fn in (grad_match_distance, naive.grad_match_distance):
        loss = (images @ weight.t()).logsumexp(1).sum()
        g_syn = torch.autograd.grad(loss, [weight], create_graph=True)[0]
        g_syn = [g_syn, g_syn.sum(1)]
        grads = torch.autograd.grad(fn(g_syn, real, "ours"), images)[0]
        if fn is grad_match_distance:
            fused = grads
    torch.testing.assert_close(fused, grads)


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=BACKENDS[2].marks)])
@pytest.mark.parametrize("metric", ["ours", "cos"])
def test_torch_func_grad_and_vmap(backend, metric):
    a, b = random_pair([(2, 3, 4), (2, 3)], seed=17, device=DEVICE[backend])

    def loss(x0, x1):
        return grad_match_distance([x0, x1], b, metric, batched=True, backend=backend)

    def ref_loss(x0, x1):
        return naive.grad_match_distance([x0, x1], b, metric, batched=True)

    got = torch.func.grad(loss, argnums=(0, 1))(*a)
    want = torch.func.grad(ref_loss, argnums=(0, 1))(*a)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)
    stacked = [torch.stack([t, 2 * t]) for t in a]
    torch.testing.assert_close(torch.func.vmap(loss)(*stacked), torch.func.vmap(ref_loss)(*stacked))
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(loss))(*stacked),
                               torch.func.vmap(torch.func.grad(ref_loss))(*stacked))


@pytest.mark.skipif(not ON_CUDA, reason="float16 / bfloat16 run on Triton with CUDA only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", METRICS)
def test_half_precision_on_cuda(dtype, metric):
    a, b = random_pair([(5, 3, 3, 3), (5,), (10, 37)], seed=18, dtype=dtype, device="cuda")
    a = [t.requires_grad_(True) for t in a]
    value = grad_match_distance(a, b, metric, backend="triton")
    assert value.dtype == torch.float32
    ref_value, ref_grads = oracle_value_and_grads(a, b, metric, False)
    torch.testing.assert_close(value.double().cpu(), ref_value, rtol=2e-2, atol=2e-2)
    for got, want in zip(torch.autograd.grad(value, a), ref_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double().cpu(), want, rtol=3e-2, atol=3e-2 * want.abs().max().item())


def test_reduced_precision_on_cpu_runs_the_reference():
    a, b = random_pair([(3, 4)], seed=19, dtype=torch.bfloat16)
    assert grad_match_distance(a, b).dtype == torch.float32
    with pytest.raises(ValueError, match="float32 or float64"):
        grad_match_distance(a, b, backend="cpp")


@pytest.mark.parametrize("a, b, kwargs, error, match", [
    ([torch.ones(2, 2)], [torch.ones(2, 2)], dict(metric="l2"), ValueError, "metric"),
    ([], [], {}, ValueError, "non-empty"),
    ([torch.ones(2, 2)], [torch.ones(2, 2), torch.ones(2)], {}, ValueError, "equal length"),
    ([torch.ones(2, 2)], [torch.ones(2, 3)], {}, ValueError, r"g_syn\[0\] has shape"),
    ([torch.ones(2, 2)], [torch.ones(2, 2, dtype=torch.float64)], {}, ValueError, r"g_real\[0\] is torch.float64"),
    ([torch.ones(2, 2, dtype=torch.int64)], [torch.ones(2, 2, dtype=torch.int64)], {}, ValueError,
     r"g_syn\[0\] must be a floating-point"),
    ([torch.ones(2, 0)], [torch.ones(2, 0)], {}, ValueError, r"g_syn\[0\] has no elements"),
    ([torch.ones(3, 2), torch.ones(2)], [torch.ones(3, 2), torch.ones(2)], dict(batched=True), ValueError,
     r"g_syn\[1\] must have the leading class dimension K"),
    ([torch.ones(())], [torch.ones(())], dict(batched=True), ValueError, "leading class dimension"),
    ([torch.ones(2, 2)], [[1.0, 2.0]], {}, ValueError, r"g_real\[0\] must be a tensor"),
    ([torch.ones(2, 2)], [torch.ones(2, 2)], dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_input_names_the_argument(a, b, kwargs, error, match):
    with pytest.raises(error, match=match):
        grad_match_distance(a, b, **kwargs)
