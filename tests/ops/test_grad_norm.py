"""per_sample_grad_norm against torch.func vmap(grad) norms (fastdd.ops.naive), on every backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fastdd.models import fused_blocks, get_network
from fastdd.ops import grad_norm, naive, per_sample_grad_norm
from fastdd.ops.weight_sq_norms import _fused_sq_norms

BACKENDS = ["torch", "cpp", "triton"]
F64 = dict(dtype=torch.float64)
ON_CUDA = torch.cuda.is_available()
# Triton runs compiled on CUDA tensors when a GPU is present, else interpreted on CPU tensors.
DEVICE = {"torch": "cpu", "cpp": "cpu", "triton": "cuda" if ON_CUDA else "cpu"}


def small_net(seed: int = 0) -> nn.Module:
    """Every supported layer type; small enough for interpreted Triton; conv1 takes the direct form."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.GroupNorm(3, 3), nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect"), nn.InstanceNorm2d(4, affine=True),
        nn.Flatten(), nn.LayerNorm(4 * 3 * 3), nn.Linear(4 * 3 * 3, 5),
    ).double()


def batch(n: int, shape=(2, 6, 6), classes: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, **F64), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 3])
def test_matches_vmap_grad(backend, n):
    net = small_net()
    x, y = batch(n)
    expected = naive.per_sample_grad_norm(net, x, y)
    dev = DEVICE[backend]
    got = per_sample_grad_norm(net.to(dev), x.to(dev), y.to(dev), backend=backend)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("norm", ["instancenorm", "layernorm", "groupnorm", "none"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_convnet(norm, backend):
    net = get_network("ConvNet", 1, 10, 28, torch.Generator().manual_seed(0))
    if norm != "instancenorm":
        net = get_network({"layernorm": "ConvNetLN", "groupnorm": "ConvNetGN", "none": "ConvNetNN"}[norm],
                          1, 10, 28, torch.Generator().manual_seed(0))
    net = net.double()
    x, y = batch(3, (1, 28, 28), 10)
    torch.testing.assert_close(per_sample_grad_norm(net, x, y, backend=backend), naive.per_sample_grad_norm(net, x, y),
                               rtol=1e-10, atol=1e-10)


def test_float32_tolerance():
    net = get_network("ConvNet", 1, 10, 28, torch.Generator().manual_seed(0))
    x, y = batch(4, (1, 28, 28), 10)
    expected = naive.per_sample_grad_norm(net.double(), x, y)
    got = per_sample_grad_norm(net.float(), x.float(), y)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_chunks_and_frozen_parameters(backend):
    net = small_net()
    net[0].bias.requires_grad_(False)
    net[4].weight.requires_grad_(False)
    x, y = batch(5)
    whole = per_sample_grad_norm(net, x, y, backend=backend)
    torch.testing.assert_close(per_sample_grad_norm(net, x, y, chunk_size=2, backend=backend), whole)
    torch.testing.assert_close(whole, naive.per_sample_grad_norm(net, x, y))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["direct", "ghost"])
def test_gradcheck_wrt_input(backend, form):
    """The second-order path: norms are differentiable w.r.t. x (what SDC needs)."""
    torch.manual_seed(0)
    channels, size = (2, 5) if form == "direct" else (4, 2)  # ghost: T (D + p) < D p
    net = nn.Sequential(nn.Conv2d(channels, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.Tanh(), nn.Flatten(),
                        nn.Linear(6 * size * size, 4)).double()
    x, y = batch(2, (channels, size, size), 4)
    net, x, y = net.to(DEVICE[backend]), x.to(DEVICE[backend]).requires_grad_(True), y.to(DEVICE[backend])
    assert torch.autograd.gradcheck(lambda v: per_sample_grad_norm(net, v, y, create_graph=True, backend=backend), (x,))


def loop_grad_norms(net: nn.Module, x, y):
    """One autograd.grad per sample, graph kept: the plainest differentiable oracle."""
    params = [p for p in net.parameters() if p.requires_grad]
    norms = []
    for xi, yi in zip(x, y):
        grads = torch.autograd.grad(F.cross_entropy(net(xi[None]), yi[None]), params, create_graph=True)
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    return torch.stack(norms)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_input_gradient_matches_per_sample_loop(backend):
    """(vmap(grad)'s own x-gradient is wrong through instance and layer norm in torch 2.13; see naive.py.)"""
    net = small_net()
    x, y = batch(3)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(per_sample_grad_norm(net, x1, y, create_graph=True, backend=backend).sum(), x1)
    (g2,) = torch.autograd.grad(loop_grad_norms(net, x2, y).sum(), x2)
    torch.testing.assert_close(g1, g2)


def unfold_sq_norms(a, g, kernel, stride, dilation, groups):
    """Oracle of the direct form: materialise every per-sample weight gradient."""
    u = F.unfold(a, kernel, dilation=dilation, stride=stride)
    b = a.shape[0]
    u = u.reshape(b * groups, -1, u.shape[-1])
    w = g.reshape(b * groups, -1, u.shape[-1]) @ u.transpose(1, 2)
    return w.pow(2).sum((1, 2)).reshape(b, groups).sum(1)


@settings(max_examples=25, deadline=None)
@given(b=st.sampled_from([1, 2, 3]), groups=st.sampled_from([1, 2]), cin=st.integers(1, 3), cout=st.integers(1, 3),
       kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)), stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)), size=st.tuples(st.integers(5, 9), st.integers(5, 9)),
       form=st.sampled_from([("cpp", False), ("cpp", True), ("triton", False)]))
def test_fused_forms_conv_hyperparameters(b, groups, cin, cout, kernel, stride, dilation, size, form):
    g = torch.Generator().manual_seed(b * 100 + cin * 10 + cout)
    a = torch.randn(b, cin * groups, *size, generator=g, **F64)
    out_size = [(size[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)]
    grad = torch.randn(b, cout * groups, *out_size, generator=g, **F64)
    expected = unfold_sq_norms(a, grad, kernel, stride, dilation, groups)
    backend, ghost = form
    got = _fused_sq_norms(a.to(DEVICE[backend]), grad.to(DEVICE[backend]), kernel, stride, dilation, groups, ghost,
                          backend)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not ON_CUDA, reason="float16/bfloat16 run on CUDA only (Triton)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_reduced_precision_on_cuda(dtype):
    """fp32 accumulation: relative error of the inputs' rounding only (fp32: no TF32)."""
    g = torch.Generator().manual_seed(0)
    a, grad = torch.randn(5, 6, 13, 13, generator=g, **F64), torch.randn(5, 37, 11, 11, generator=g, **F64)
    expected = unfold_sq_norms(a, grad, (3, 3), (1, 1), (1, 1), 1)
    got = _fused_sq_norms(a.cuda().to(dtype), grad.cuda().to(dtype), (3, 3), (1, 1), (1, 1), 1, False, "triton")
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(got.double().cpu(), expected, rtol=tol, atol=0)


@settings(max_examples=20, deadline=None)
@given(b=st.sampled_from([1, 2, 5]), groups=st.sampled_from([1, 2]), stride=st.integers(1, 2),
       padding=st.sampled_from([0, 1, 2, "same"]), dilation=st.integers(1, 2),
       mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]), kernel=st.sampled_from([1, 2, 3]))
def test_conv_layer_against_vmap_grad(b, groups, stride, padding, dilation, mode, kernel):
    if padding == "same" and stride != 1:
        stride = 1  # torch refuses 'same' with stride
    torch.manual_seed(b)
    conv = nn.Conv2d(2 * groups, 2 * groups, kernel, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, padding_mode=mode)
    x = torch.randn(b, 2 * groups, 7, 7)
    features = conv(x).flatten(1).shape[1]
    net = nn.Sequential(conv, nn.Flatten(), nn.Linear(features, 3)).double()
    x, y = x.double(), torch.randint(0, 3, (b,))
    torch.testing.assert_close(per_sample_grad_norm(net, x, y, backend="cpp"), naive.per_sample_grad_norm(net, x, y),
                               rtol=1e-10, atol=1e-10)


def test_fused_form_vmap_rule():
    from fastdd.ops.weight_sq_norms import _ConvSqNorms

    a, g = torch.randn(4, 2, 2, 6, 6, **F64), torch.randn(4, 2, 3, 4, 4, **F64)
    got = torch.func.vmap(lambda ai, gi: _ConvSqNorms.apply(ai, gi, (3, 3), (1, 1), (1, 1), 1, False, "cpp"))(a, g)
    expected = torch.stack([unfold_sq_norms(ai, gi, (3, 3), (1, 1), (1, 1), 1) for ai, gi in zip(a, g)])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("make, match", [
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)), "mixes"),
    (lambda: nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4, 3)), "Conv1d"),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(36, 36), nn.ReLU()), None),
])
def test_refused_models(make, match):
    net = make().double()
    if match is None:  # the same Linear used twice
        lin = nn.Linear(36, 36).double()
        net = nn.Sequential(nn.Flatten(), lin, nn.ReLU(), lin, nn.Linear(36, 3).double())
        match = "more than once"
    x = torch.randn(2, 1, 6, 6, **F64) if not isinstance(net[0], nn.Conv1d) else torch.randn(2, 1, 6, **F64)
    with pytest.raises(ValueError, match=match):
        per_sample_grad_norm(net, x, torch.tensor([0, 1]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(y=torch.tensor([0, 1, 2])), "y must be"),
    (dict(y=torch.tensor([0.0, 1.0])), "y must be"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(backend="cuda"), "backend"),
])
def test_bad_arguments(kwargs, match):
    args = dict(x=torch.randn(2, 2, 6, 6, **F64), y=torch.tensor([0, 1])) | kwargs
    with pytest.raises(ValueError, match=match):
        per_sample_grad_norm(small_net(), args.pop("x"), args.pop("y"), **args)


def test_no_trainable_parameters():
    net = small_net().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters"):
        per_sample_grad_norm(net, *batch(2))


@settings(max_examples=20, deadline=None)
@given(kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)), stride=st.tuples(st.integers(1, 3), st.integers(1, 2)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 3)), size=st.tuples(st.integers(7, 11), st.integers(7, 11)))
def test_unfold_and_fold_match_torch(kernel, stride, dilation, size):
    from fastdd.ops.weight_sq_norms import fold, unfold

    a = torch.randn(2, 3, *size, **F64)
    out_hw = tuple((size[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2))
    expected = F.unfold(a, kernel, dilation=dilation, stride=stride)
    torch.testing.assert_close(unfold(a, kernel, stride, dilation, out_hw), expected)
    torch.testing.assert_close(fold(expected, a.shape, kernel, stride, dilation, out_hw),
                               F.fold(expected, size, kernel, dilation=dilation, stride=stride))


def test_unused_trainable_layer_is_reported():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match="1 of the model's trainable layers got no gradient"):
        per_sample_grad_norm(TwoHeads().double(), torch.randn(2, 4, **F64), torch.tensor([0, 1]))


def test_fused_blocks_path_matches_the_module_hooks_and_the_oracle():
    """On CPU a default ConvNet's norms come from the fused block tails (per-plane sums = per-sample
    gradients); the same values as the hook path (backend="torch") and the float64 oracle, inside or outside
    fused_blocks(); a graph of the norms inside fused_blocks() is refused by name."""
    net = get_network("ConvNet", 1, 3, (9, 7), torch.Generator().manual_seed(0)).double()
    x, y = torch.randn(3, 1, 9, 7, dtype=torch.float64), torch.tensor([0, 2, 1])
    expected = naive.per_sample_grad_norm(net, x, y)
    torch.testing.assert_close(per_sample_grad_norm(net, x, y), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(per_sample_grad_norm(net, x, y, backend="torch"), expected, rtol=1e-10, atol=1e-12)
    with fused_blocks():
        torch.testing.assert_close(per_sample_grad_norm(net, x, y), expected, rtol=1e-10, atol=1e-12)
        with pytest.raises(RuntimeError, match="fused_blocks"):
            per_sample_grad_norm(net, x, y, create_graph=True)


def test_fused_blocks_path_counts_only_trainable_norms():
    net = get_network("ConvNet", 1, 3, (8, 8), torch.Generator().manual_seed(1)).double()
    net.features[1].requires_grad_(False)  # the first block's norm affine
    x, y = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([1, 0])
    torch.testing.assert_close(per_sample_grad_norm(net, x, y), naive.per_sample_grad_norm(net, x, y),
                               rtol=1e-10, atol=1e-12)


def test_a_default_convnet_offers_its_tails_and_the_cpu_path_fuses_them(monkeypatch):
    """ConvNet is a FusableTails (the ops do not import fastdd.models): in its default configuration each block's
    norm comes from one fused tail that reports its per-sample squared norms; switched off, from the hooks alone."""
    net = get_network("ConvNet", 1, 3, (8, 8), torch.Generator().manual_seed(2)).double()
    assert isinstance(net, grad_norm.FusableTails) and net.tail_norms() == tuple(b.norm for b in net.blocks)
    x, y = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([1, 0])
    fused, tail = [], grad_norm.instance_norm_relu_pool

    def counted(*args, **kwargs):
        fused.append(kwargs["per_sample_sq_norms"] is not None)
        return tail(*args, **kwargs)

    monkeypatch.setattr(grad_norm, "instance_norm_relu_pool", counted)
    expected = naive.per_sample_grad_norm(net, x, y)
    torch.testing.assert_close(per_sample_grad_norm(net, x, y), expected, rtol=1e-10, atol=1e-12)
    assert fused == [True] * len(net.blocks)
    net.fusable = False
    assert net.tail_norms() == ()
    torch.testing.assert_close(per_sample_grad_norm(net, x, y), expected, rtol=1e-10, atol=1e-12)
    assert fused == [True] * len(net.blocks)
