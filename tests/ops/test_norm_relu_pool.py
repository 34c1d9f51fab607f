"""instance_norm_relu_pool and conv_instance_norm_relu_pool against the eager composition (fastdd.ops.naive) and
inside ConvNet."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdd.models import fused_blocks, get_network
from fastdd.ops import naive
from fastdd.ops.norm_relu_pool import MAX_FUSED_TAPS, conv_instance_norm_relu_pool, instance_norm_relu_pool

BACKENDS = ["torch", "cpp", "triton"]
# Triton runs on CUDA tensors where a GPU is present, and interpreted on CPU tensors elsewhere (conftest)
DEVICE = {"torch": "cpu", "cpp": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu"}
# against a float64 oracle: float32 statistics over up to H * W terms; bfloat16 keeps 8 bits of mantissa
TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5),
              torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


def inputs(n, c, h, w, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)
    weight, bias = torch.randn(2, c, generator=g, dtype=torch.float64)
    grad_out = torch.randn(n, c, h // 2, w // 2, generator=g, dtype=torch.float64).to(dtype)
    return x, weight, bias, grad_out


def value_and_grads(fn, x, weight, bias, grad_out, **kw):
    x, weight, bias = (t.clone().requires_grad_(True) for t in (x, weight, bias))
    out = fn(x, weight, bias, 1e-5, **kw)
    return (out, *torch.autograd.grad(out, (x, weight, bias), grad_out))


LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.mark.parametrize(("backend", "layout"), [*((b, "contiguous") for b in BACKENDS), ("cpp", "channels_last")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 4), c=st.sampled_from([1, 3, 37]), h=st.integers(2, 9), w=st.integers(2, 9),
       seed=st.integers(0, 2**16))
def test_matches_oracle(backend, layout, dtype, n, c, h, w, seed):
    """Odd sides included: AvgPool2d drops the last row or column, which still gets the norm's gradient. A
    channels_last x runs the C++ kernels' channels_last loops (37 channels: a block of 32 and a rest); the other
    backends take it contiguous, as any strided x."""
    x, weight, bias, grad_out = inputs(n, c, h, w, dtype, seed)
    expected = value_and_grads(naive.instance_norm_relu_pool, x.double(), weight, bias, grad_out.double())
    on_device = [t.to(DEVICE[backend]) for t in (x, weight, bias, grad_out)]
    on_device[0] = on_device[0].contiguous(memory_format=LAYOUTS[layout])
    got = value_and_grads(instance_norm_relu_pool, *on_device, backend=backend)
    if backend == "cpp" and layout == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        assert got[1].is_contiguous(memory_format=torch.channels_last)
    for e, r, name in zip(expected, got, ("out", "grad x", "grad weight", "grad bias")):
        assert r.dtype == (dtype if name in ("out", "grad x") else torch.float64), name
        r = r.cpu()
        tol = TOLERANCES[dtype]
        if dtype == torch.bfloat16 and name != "out":  # sums of up to N * H * W bfloat16 gradients
            tol = dict(rtol=5e-2, atol=5e-2 * n * h * w)
        torch.testing.assert_close(r.double(), e, **tol, msg=name)


@pytest.mark.parametrize("backend, layout", [("cpp", "contiguous"), ("cpp", "channels_last"), ("triton", "contiguous")])
def test_gradcheck(backend, layout):
    x, weight, bias, _ = inputs(2, 3, 5, 4)
    x = x.contiguous(memory_format=LAYOUTS[layout])
    args = tuple(t.to(DEVICE[backend]).requires_grad_(True) for t in (x, weight, bias))
    assert torch.autograd.gradcheck(lambda *a: instance_norm_relu_pool(*a, backend=backend), args)


def test_constant_plane_has_finite_output_and_gradient():
    """Zero variance: rstd = 1 / sqrt(eps), as GroupNorm."""
    x = torch.full((1, 2, 4, 4), 3.0, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.ones(2, dtype=torch.float64), torch.tensor([0.5, -0.5], dtype=torch.float64)
    out = instance_norm_relu_pool(x, weight, bias, backend="cpp")
    torch.testing.assert_close(out, naive.instance_norm_relu_pool(x, weight, bias))
    assert torch.isfinite(torch.autograd.grad(out.sum(), x)[0]).all()


def test_backward_is_first_order_only():
    x, weight, bias, _ = inputs(1, 2, 4, 4)
    x.requires_grad_(True)
    out = instance_norm_relu_pool(x, weight, bias, backend="cpp").sum()
    with pytest.raises(RuntimeError, match="first-order backward only"):
        torch.autograd.grad(out, x, create_graph=True)


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.randn(2, 3, 4)), "x must be a non-empty"),
    (dict(x=torch.randn(1, 3, 4, 4).half()), "dtype"),
    (dict(weight=torch.randn(4)), "weight must be"),
    (dict(bias=torch.randn(3, 1)), "bias must be"),
    (dict(x=torch.randn(1, 3, 1, 4)), "at least 2 x 2"),
    (dict(eps=0.0), "eps"),
])
def test_bad_inputs_are_named(bad, match):
    args = dict(x=torch.randn(1, 3, 4, 4), weight=torch.ones(3), bias=torch.zeros(3), eps=1e-5, backend="cpp")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        instance_norm_relu_pool(args.pop("x"), args.pop("weight"), args.pop("bias"), args.pop("eps"), **args)


def conv_inputs(n, cin, h, w, c, k, dtype=torch.float64, seed=0):
    """x [n, cin, h, w] (no gradient) and the parameters conv_weight [c, cin, k, k], conv_bias, weight, bias."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g, dtype=torch.float64).to(dtype)
    params = [torch.randn(c, cin, k, k, generator=g, dtype=torch.float64), *torch.randn(3, c, generator=g,
                                                                                        dtype=torch.float64)]
    return x, [p.to(dtype) for p in params]


def value_and_param_grads(fn, x, params, padding, seed, **kw):
    params = [p.clone().requires_grad_(True) for p in params]
    out = fn(x, *params, padding, **kw)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (out, *torch.autograd.grad(out, params, grad_out.to(out.device, out.dtype)))


@pytest.mark.parametrize(("backend", "layout"),
                         [*((b, "contiguous") for b in BACKENDS), ("cpp", "channels_last"), ("torch", "channels_last")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 4), cin=st.sampled_from([1, 2, 3]), c=st.sampled_from([1, 3, 37]), k=st.integers(1, 3),
       padding=st.integers(0, 3), h=st.integers(2, 9), w=st.integers(2, 9), seed=st.integers(0, 2**16))
def test_conv_block_matches_oracle(backend, layout, dtype, n, cin, c, k, padding, h, w, seed):
    """Fused (cpp, at most MAX_FUSED_TAPS taps) or composed, odd sides and every padding included, computed in
    either memory format (the fused kernel then writes its output channels_last; Triton takes its maps
    contiguous)."""
    if min(h, w) + 2 * padding - k + 1 < 2:
        return
    x, params = conv_inputs(n, cin, h, w, c, k, dtype, seed)
    oracle = naive.conv_instance_norm_relu_pool
    expected = value_and_param_grads(oracle, x.double(), [p.double() for p in params], padding, seed)
    device = DEVICE[backend]
    got = value_and_param_grads(conv_instance_norm_relu_pool, x.to(device), [p.to(device) for p in params], padding,
                                seed, backend=backend, memory_format=LAYOUTS[layout])
    if backend == "cpp":
        assert got[0].is_contiguous(memory_format=LAYOUTS[layout])
    for e, r, name in zip(expected, got, ("out", "grad conv_weight", "grad conv_bias", "grad weight", "grad bias")):
        assert r.dtype == dtype, name
        r = r.cpu()
        tol = TOLERANCES[dtype]
        if dtype == torch.float32 and name != "out":
            # sums of up to N * H * W float32 products as large as the weight gradient's entries: the conv bias's
            # cancel to 0 (the norm removes every channel's mean), leaving their rounding, which plain torch in
            # float32 shows as well (about 1.5e-3 on a 2x2 map whose weight gradient reaches 40)
            tol = dict(rtol=1e-4, atol=1e-4 * n * h * w * max(1.0, float(expected[1].abs().max())))
        torch.testing.assert_close(r.double(), e, **tol, msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_block_gradcheck(layout):
    x, params = conv_inputs(2, 1, 5, 6, 3, 3)
    run = functools.partial(conv_instance_norm_relu_pool, backend="cpp", memory_format=LAYOUTS[layout])
    assert torch.autograd.gradcheck(lambda *p: run(x, *p, 1), tuple(p.requires_grad_(True) for p in params))


def test_conv_block_with_input_gradient_runs_the_composition():
    """The fused kernel has no gradient w.r.t. x: an x that needs one takes the composition."""
    x, params = conv_inputs(2, 1, 6, 6, 4, 3)
    x.requires_grad_(True)
    out = conv_instance_norm_relu_pool(x, *params, 2, backend="cpp")
    assert out.grad_fn.name() != "_ConvNormReLUPoolBackward"
    xr = x.detach().requires_grad_(True)
    expected = torch.autograd.grad(naive.conv_instance_norm_relu_pool(xr, *params, 2).sum(), xr)[0]
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], expected, rtol=1e-10, atol=1e-12)


def test_conv_block_takes_the_fused_kernel_on_cpu_for_thin_convolutions():
    x, params = conv_inputs(1, 1, 4, 4, 2, 3)
    params = [p.requires_grad_(True) for p in params]
    assert conv_instance_norm_relu_pool(x, *params, 1).grad_fn.name() == "_ConvNormReLUPoolBackward"
    x, params = conv_inputs(1, 2, 4, 4, 2, 3)  # 18 taps > MAX_FUSED_TAPS
    params = [p.requires_grad_(True) for p in params]
    assert 2 * 9 > MAX_FUSED_TAPS
    assert conv_instance_norm_relu_pool(x, *params, 1).grad_fn.name() != "_ConvNormReLUPoolBackward"


def test_conv_block_backward_is_first_order_only():
    x, params = conv_inputs(1, 1, 4, 4, 2, 3)
    params = [p.requires_grad_(True) for p in params]
    out = conv_instance_norm_relu_pool(x, *params, 1, backend="cpp").sum()
    with pytest.raises(RuntimeError, match="first-order backward only"):
        torch.autograd.grad(out, params, create_graph=True)


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.randn(1, 4, 4)), "x must be a non-empty"),
    (dict(conv_weight=torch.randn(2, 3, 3, 3)), "conv_weight must be"),
    (dict(conv_bias=torch.randn(3)), "conv_bias must be"),
    (dict(weight=torch.randn(3)), "weight must be"),
    (dict(bias=torch.randn(2, 1)), "bias must be"),
    (dict(padding=-1), "padding"),
    (dict(padding=1.5), "padding"),
    (dict(x=torch.randn(1, 1, 3, 3), padding=0), "at least 2 x 2"),
    (dict(eps=0.0), "eps"),
    (dict(memory_format=torch.preserve_format), "memory_format must be"),
])
def test_conv_block_bad_inputs_are_named(bad, match):
    args = dict(x=torch.randn(1, 1, 4, 4), conv_weight=torch.randn(2, 1, 3, 3), conv_bias=torch.zeros(2),
                weight=torch.ones(2), bias=torch.zeros(2), padding=1, eps=1e-5)
    args.update(bad)
    memory_format = args.pop("memory_format", torch.contiguous_format)
    with pytest.raises(ValueError, match=match):
        conv_instance_norm_relu_pool(*args.values(), backend="cpp", memory_format=memory_format)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("model", "channels", "fusable"),
                         [("ConvNet", 1, True), ("ConvNet", 3, True), ("ConvNetBN", 1, False), ("ConvNetMP", 1, False)])
def test_convnet_inside_fused_blocks_gives_the_same_logits_and_gradients(model, channels, fusable, layout):
    net = get_network(model, channels, 5, (28, 28), torch.Generator().manual_seed(0)).double()
    x = torch.randn(3, channels, 28, 28, dtype=torch.float64)
    y = torch.tensor([0, 4, 2])
    results = []
    for fused in (False, True):
        with fused_blocks(LAYOUTS[layout]) if fused else torch.enable_grad():
            logits = net(x)
        results.append((logits, *torch.autograd.grad(F.cross_entropy(logits, y), list(net.parameters()))))
    for eager, fused in zip(*results):
        torch.testing.assert_close(fused, eager, rtol=1e-10, atol=1e-12)
    assert net.fusable == fusable


def test_per_sample_sq_norms_are_each_samples_own_weight_and_bias_gradient():
    x, weight, bias, grad_out = inputs(3, 4, 6, 5)
    weight, bias = weight.requires_grad_(True), bias.requires_grad_(True)
    sink = []
    out = instance_norm_relu_pool(x, weight, bias, backend="cpp", per_sample_sq_norms=sink)
    torch.autograd.grad(out, (weight, bias), grad_out)
    expected = []
    for i in range(3):
        gw, gb = torch.autograd.grad(naive.instance_norm_relu_pool(x[i:i + 1], weight, bias), (weight, bias),
                                     grad_out[i:i + 1])
        expected.append(gw.pow(2).sum() + gb.pow(2).sum())
    torch.testing.assert_close(sink[0], torch.stack(expected), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="per_sample_sq_norms needs the fused kernels"):
        instance_norm_relu_pool(x, weight, bias, backend="torch", per_sample_sq_norms=[])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_block", [128, None], ids=["tiles of 128", "default tiles"])
def test_triton_walks_planes_larger_than_a_tile(monkeypatch, dtype, max_block):
    """45 x 47 planes (2115 values, odd sides): 17 tiles of 128 values (the last one partial), or 3 of the default
    MAX_BLOCK; statistics merged across tiles as exact as over the whole plane."""
    from fastdd.kernels import norm_relu_pool as kernels

    if max_block is not None:
        monkeypatch.setattr(kernels, "MAX_BLOCK", max_block)
    assert kernels.block(45 * 47) < 45 * 47
    x, weight, bias, grad_out = inputs(2, 3, 45, 47, dtype, seed=3)
    x = x + 4.0  # a mean far from 0: the merged variance must not cancel
    expected = value_and_grads(naive.instance_norm_relu_pool, x.double(), weight, bias, grad_out.double())
    device = DEVICE["triton"]
    got = value_and_grads(instance_norm_relu_pool, *(t.to(device) for t in (x, weight, bias, grad_out)),
                          backend="triton")
    for e, r, name in zip(expected, got, ("out", "grad x", "grad weight", "grad bias")):
        tol = TOLERANCES[dtype]
        if dtype == torch.bfloat16 and name != "out":
            tol = dict(rtol=5e-2, atol=5e-2 * 2 * 45 * 47)
        torch.testing.assert_close(r.cpu().double(), e, **tol, msg=name)
