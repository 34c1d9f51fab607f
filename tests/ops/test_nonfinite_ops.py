"""Non-finite values through every fused op, on every backend and dtype.

Each case puts NaN, +inf or -inf at one position, or NaN everywhere, in one floating input (and, for the ConvNet
blocks, in the upstream gradient) and compares the op's output and gradients with the plain-torch reference's
(fastdd.ops.naive, in float64, on the same values) element by element: NaN where it has NaN, +inf where +inf,
-inf where -inf, finite where finite. masked_feature_contrastive refuses such inputs by name instead.

Where the formulation makes an exact match impossible, the cases ask for non-finite where the reference is
non-finite (and finite where finite): the ghost form of conv2d_weight_sq_norms (<U^T U, G^T G> adds infinities
of both signs where the per-sample gradient is only infinite), and an infinite upstream gradient of the "ours"
grad_match_distance (its gradient is the unit gradient scaled, +-inf where the reference's chain rule meets inf -
inf).
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_grad_norm import loop_grad_norms, small_net, unfold_sq_norms
from torch import Tensor

from fastdd.models import get_network
from fastdd.ops import (
    conv_instance_norm_relu_pool,
    grad_match_distance,
    instance_norm_relu_pool,
    masked_feature_contrastive,
    naive,
    per_sample_grad_norm,
)
from fastdd.ops.weight_sq_norms import _fused_sq_norms

BACKENDS = ["torch", "cpp", "triton"]
# Triton runs on CUDA tensors where a GPU is present, and interpreted on CPU tensors elsewhere (conftest)
DEVICE = {"torch": "cpu", "cpp": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu"}
VALUES = ["nan", "inf", "-inf", "all nan"]
F64 = dict(dtype=torch.float64)


def poisoned(t: Tensor, value: str, at: int = 1) -> Tensor:
    """A copy of ``t`` with element ``at`` (flat) set to ``value``, or every element NaN for "all nan"."""
    t = t.clone()
    if value == "all nan":
        t.fill_(float("nan"))
    else:
        t.view(-1)[at] = float(value)
    return t


def pattern(t: Tensor) -> Tensor:
    """Per element: 0 finite, 1 NaN, 2 +inf, 3 -inf."""
    t = t.detach().cpu().double()
    return torch.where(t.isnan(), 1, 0) + torch.where(t == float("inf"), 2, 0) + torch.where(t == -float("inf"), 3, 0)


def assert_same_pattern(got: Tensor, expected: Tensor, what: str, finite_only: bool = False) -> None:
    """``got`` is NaN, +inf and -inf exactly where ``expected`` is (``finite_only``: non-finite where it is)."""
    g, e = pattern(got), pattern(expected)
    if finite_only:
        g, e = g > 0, e > 0
    assert g.shape == e.shape and torch.equal(g, e), (
        f"{what}: (finite, NaN, +inf, -inf) counts {torch.bincount(g.flatten().long(), minlength=4).tolist()}, "
        f"the reference's {torch.bincount(e.flatten().long(), minlength=4).tolist()}")


def compare(got: tuple[Tensor, ...], expected: tuple[Tensor, ...], names: tuple[str, ...], case: str) -> None:
    for g, e, name in zip(got, expected, names, strict=True):
        assert_same_pattern(g, e, f"{case}: {name}")


def value_and_grads(fn, inputs: list[Tensor], differentiable: list[bool], grad_out: Tensor | None, **kw):
    """fn(*inputs) and its gradients w.r.t. the inputs marked ``differentiable`` (for ``grad_out``; None: 1)."""
    inputs = [t.clone().requires_grad_(d) for t, d in zip(inputs, differentiable)]
    out = fn(*inputs, **kw)
    wrt = [t for t in inputs if t.requires_grad]
    return (out, *torch.autograd.grad(out, wrt, grad_out, materialize_grads=True))


# ---- instance_norm_relu_pool and conv_instance_norm_relu_pool ----

def norm_inputs() -> list[Tensor]:
    """x [2, 3, 5, 4] (odd height: a dropped row), weight, bias [3], grad_out [2, 3, 2, 2]."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 5, 4, generator=g, **F64), *torch.randn(2, 3, generator=g, **F64),
            torch.randn(2, 3, 2, 2, generator=g, **F64)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("poison", ["x", "weight", "bias", "grad_out"])
def test_instance_norm_relu_pool(backend, dtype, poison):
    """weight and bias stay float64 (any floating dtype is taken); x and grad_out are ``dtype``."""
    names = ("x", "weight", "bias", "grad_out")
    for value in VALUES:
        inputs = norm_inputs()
        inputs[names.index(poison)] = poisoned(inputs[names.index(poison)], value)
        inputs[0], inputs[3] = inputs[0].to(dtype).double(), inputs[3].to(dtype).double()  # the values ``dtype`` holds
        expected = value_and_grads(lambda x, w, b: naive.instance_norm_relu_pool(x, w, b), inputs[:3], [True] * 3,
                                   inputs[3])
        x, w, b, grad_out = (t.to(DEVICE[backend]) for t in inputs)
        got = value_and_grads(instance_norm_relu_pool, [x.to(dtype), w, b], [True] * 3, grad_out.to(dtype),
                              backend=backend)
        compare(got, expected, ("out", "grad x", "grad weight", "grad bias"), f"{poison} {value}")


def conv_inputs() -> list[Tensor]:
    """x [2, 1, 5, 6], conv_weight [3, 1, 3, 3] (fused on CPU), conv_bias, weight, bias [3], grad_out [2, 3, 2, 3]
    (padding 1)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 1, 5, 6, generator=g, **F64), torch.randn(3, 1, 3, 3, generator=g, **F64),
            *torch.randn(3, 3, generator=g, **F64), torch.randn(2, 3, 2, 3, generator=g, **F64)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("poison", ["x", "conv_weight", "conv_bias", "weight", "bias", "grad_out"])
@pytest.mark.parametrize("x_grad", [False, True], ids=["fused", "x needs grad"])
def test_conv_instance_norm_relu_pool(backend, dtype, poison, x_grad):
    """An x that needs no gradient takes the fused C++ block (float32, float64); one that does, the composition."""
    names = ("x", "conv_weight", "conv_bias", "weight", "bias", "grad_out")
    grads = [x_grad, True, True, True, True]
    for value in VALUES:
        inputs = conv_inputs()
        inputs[names.index(poison)] = poisoned(inputs[names.index(poison)], value)
        inputs = [t.to(dtype).double() for t in inputs]
        expected = value_and_grads(lambda *a: naive.conv_instance_norm_relu_pool(*a, padding=1), inputs[:5], grads,
                                   inputs[5])
        on_device = [t.to(DEVICE[backend], dtype) for t in inputs]
        got = value_and_grads(lambda *a: conv_instance_norm_relu_pool(*a, padding=1, backend=backend), on_device[:5],
                              grads, on_device[5])
        compare(got, expected, ("out", *(f"grad {n}" for n, d in zip(names, grads) if d)), f"{poison} {value}")


# ---- per_sample_grad_norm and conv2d_weight_sq_norms ----

def convnet() -> torch.nn.Module:
    """A ConvNet of width 32 (fusable: on CPU its norms come from the fused block tails)."""
    return get_network("ConvNetW32", 1, 4, 8, torch.Generator().manual_seed(0)).double()


MODELS = {"every layer rule": (small_net, (2, 6, 6)), "ConvNet": (convnet, (1, 8, 8))}
# the ConvNet for the backend whose path differs: the fused block tails of the C++ backend
CASES = [*(("every layer rule", backend) for backend in BACKENDS), ("ConvNet", "cpp")]


@pytest.mark.parametrize("model, backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_sample_grad_norm(model, backend, dtype):
    """x, the first convolution's weight and the first norm's weight."""
    make, shape = MODELS[model]
    x0, y = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0), **F64), torch.tensor([0, 1, 2])
    targets = ["x", *[name for name, _ in make().named_parameters()][0:3:2]]
    for target in targets:
        for value in VALUES:
            net, x = make(), poisoned(x0, value, at=40) if target == "x" else x0
            if target != "x":
                parameter = dict(net.named_parameters())[target]
                parameter.data = poisoned(parameter.data, value)
            net, x = net.to(dtype), x.to(dtype)
            expected = naive.per_sample_grad_norm(copy.deepcopy(net).double(), x.double(), y)
            device = DEVICE[backend]
            got = per_sample_grad_norm(net.to(device), x.to(device), y.to(device), backend=backend)
            assert_same_pattern(got, expected, f"{target} {value}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_sample_grad_norm_input_gradient(backend, dtype):
    """create_graph=True: the norms' gradient w.r.t. x, against a per-sample autograd loop, for a non-finite x and
    a non-finite upstream gradient of one sample's norm."""
    x0, y = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(0), **F64), torch.tensor([0, 1, 2])
    for target in ("x", "upstream"):
        for value in VALUES:
            x = poisoned(x0, value, at=40) if target == "x" else x0
            upstream = poisoned(torch.ones(3, **F64), value) if target == "upstream" else torch.ones(3, **F64)
            x = x.to(dtype).double()
            expected = value_and_grads(lambda v: loop_grad_norms(small_net(), v, y), [x], [True], upstream)
            net, device = small_net().to(dtype), DEVICE[backend]
            got = value_and_grads(lambda v: per_sample_grad_norm(net.to(device), v, y.to(device), create_graph=True,
                                                                 backend=backend),
                                  [x.to(device, dtype)], [True], upstream.to(device, dtype))
            compare(got, expected, ("norms", "grad x"), f"{target} {value}")


@pytest.mark.parametrize("form", [("cpp", False), ("cpp", True), ("triton", False)], ids=["cpp direct", "cpp ghost",
                                                                                        "triton direct"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv2d_weight_sq_norms(form, dtype):
    """The kernels' squared norms of the per-sample Conv2d weight gradients against the gradients formed one by one:
    a [3, 2, 6, 6], g [3, 3, 4, 4], kernel 3 x 3."""
    backend, ghost = form
    g = torch.Generator().manual_seed(0)
    a0, g0 = torch.randn(3, 2, 6, 6, generator=g, **F64), torch.randn(3, 3, 4, 4, generator=g, **F64)
    geometry = ((3, 3), (1, 1), (1, 1), 1)
    for target in ("a", "g"):
        for value in VALUES:
            a = poisoned(a0, value, at=5) if target == "a" else a0
            grad = poisoned(g0, value, at=5) if target == "g" else g0
            a, grad = a.to(dtype), grad.to(dtype)
            expected = unfold_sq_norms(a.double(), grad.double(), *geometry)
            got = _fused_sq_norms(a.to(DEVICE[backend]), grad.to(DEVICE[backend]), *geometry, ghost, backend)
            assert_same_pattern(got, expected, f"{target} {value}", finite_only=ghost)


# ---- grad_match_distance ----

def gradient_lists(batched: bool) -> tuple[list[Tensor], list[Tensor]]:
    """g_syn, g_real: a [4, 3, 3] layer (rows under "ours") and a [4] vector (no part in "ours"); with a leading
    class dimension of 2 when ``batched``."""
    g = torch.Generator().manual_seed(0)
    lead = (2,) if batched else ()
    return tuple([torch.randn(*lead, *shape, generator=g, **F64) for shape in ((4, 3, 3), (4,))] for _ in range(2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("metric", ["ours", "mse", "l1", "cos"])
@pytest.mark.parametrize("batched", [False, True], ids=["unbatched", "batched"])
def test_grad_match_distance(backend, dtype, metric, batched):
    for side in ("g_syn", "g_real"):
        for layer in range(2):
            for value in VALUES:
                g_syn, g_real = ([t.to(dtype).double() for t in ts] for ts in gradient_lists(batched))
                poisoned_list = g_syn if side == "g_syn" else g_real
                poisoned_list[layer] = poisoned(poisoned_list[layer], value)
                flat = [*g_syn, *g_real]

                def distance(*ts, fn=naive.grad_match_distance, **kw):
                    return fn(list(ts[:2]), list(ts[2:]), metric, batched=batched, **kw)

                expected = value_and_grads(distance, flat, [True] * 4, None)
                got = value_and_grads(lambda *ts: distance(*ts, fn=grad_match_distance, backend=backend),
                                      [t.to(DEVICE[backend], dtype) for t in flat], [True] * 4, None)
                names = ("distance", "grad g_syn[0]", "grad g_syn[1]", "grad g_real[0]", "grad g_real[1]")
                compare(got, expected, names, f"{side}[{layer}] {value}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["ours", "mse", "l1", "cos"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_grad_match_distance_upstream_gradient(backend, metric, value):
    """A non-finite upstream gradient: exact but for +-inf under "ours" (see the module docstring)."""
    flat = [*gradient_lists(False)[0], *gradient_lists(False)[1]]
    upstream = torch.tensor(float(value), **F64)

    def distance(*ts, fn=naive.grad_match_distance, **kw):
        return fn(list(ts[:2]), list(ts[2:]), metric, **kw)

    expected = value_and_grads(distance, flat, [True] * 4, upstream)
    got = value_and_grads(lambda *ts: distance(*ts, fn=grad_match_distance, backend=backend),
                          [t.to(DEVICE[backend]) for t in flat], [True] * 4, upstream.to(DEVICE[backend]))
    for i, (g, e) in enumerate(zip(got[1:], expected[1:])):
        assert_same_pattern(g, e, f"grad {i}", finite_only=metric == "ours" and value != "nan")


# ---- masked_feature_contrastive: refused ----

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("poison, match", [("features", "features must hold finite values"),
                                           ("prototypes", "prototypes must hold finite values"),
                                           ("masks", r"masks must hold weights in \[0, 1\]")])
def test_masked_feature_contrastive_refuses(backend, dtype, poison, match):
    g = torch.Generator().manual_seed(0)
    device = DEVICE[backend]
    inputs = {"features": torch.randn(3, 4, 2, 2, generator=g, **F64),
              "masks": torch.rand(3, 1, 2, 2, generator=g, **F64), "prototypes": torch.randn(2, 4, generator=g, **F64)}
    labels = torch.tensor([0, 1, 1], device=device)
    for value in VALUES:
        args = {k: t.to(device, dtype) for k, t in dict(inputs, **{poison: poisoned(inputs[poison], value)}).items()}
        with pytest.raises(ValueError, match=match) as info:
            masked_feature_contrastive(args["features"], args["masks"], labels, args["prototypes"], 0.5,
                                       backend=backend)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("poison", ["x", "grad_out"])
def test_instance_norm_relu_pool_across_triton_tiles(monkeypatch, dtype, poison):
    """A 13 x 11 plane walked in two tiles of 128 values, the value in the second tile."""
    from fastdd.kernels import norm_relu_pool as kernels

    monkeypatch.setattr(kernels, "MAX_BLOCK", 128)
    g = torch.Generator().manual_seed(2)
    clean = [torch.randn(1, 2, 13, 11, generator=g, **F64), *torch.randn(2, 2, generator=g, **F64),
             torch.randn(1, 2, 6, 5, generator=g, **F64)]
    index = 0 if poison == "x" else 3
    at = 130 if poison == "x" else 28  # x: in the second tile; grad_out: a window of inputs 116, 117, 127, 128
    for value in VALUES:
        inputs = list(clean)
        inputs[index] = poisoned(inputs[index], value, at)
        inputs[0], inputs[3] = inputs[0].to(dtype).double(), inputs[3].to(dtype).double()
        expected = value_and_grads(lambda x, w, b: naive.instance_norm_relu_pool(x, w, b), inputs[:3], [True] * 3,
                                   inputs[3])
        x, w, b, grad_out = (t.to(DEVICE["triton"]) for t in inputs)
        got = value_and_grads(instance_norm_relu_pool, [x.to(dtype), w, b], [True] * 3, grad_out.to(dtype),
                              backend="triton")
        compare(got, expected, ("out", "grad x", "grad weight", "grad bias"), f"{poison} {value}")
