"""Every public op refuses arguments outside its documented contract, before any work, with a one-line ValueError
that names the argument."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastdd.models import get_network
from fastdd.ops import (
    conv_instance_norm_relu_pool,
    grad_match_distance,
    instance_norm_relu_pool,
    masked_feature_contrastive,
    per_sample_grad_norm,
)

F64 = dict(dtype=torch.float64)
NAN, INF = float("nan"), float("inf")


def refused(call, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value), str(info.value)


def with_value(t: torch.Tensor, value: float) -> torch.Tensor:
    """A copy of ``t`` with its first element set to ``value``."""
    t = t.clone()
    t.view(-1)[0] = value
    return t


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


# Each table row: (a name for the case, the changes to a good call, the expected message). "interpret" in a row's
# changes asks for TRITON_INTERPRET to be unset for that call.
BACKEND_CASES = [
    ("unknown backend", dict(backend="gpu"), "backend must be one of"),
    ("backend not a string", dict(backend=None), "backend must be one of"),
    ("triton on cpu without the interpreter", dict(backend="triton", interpret=False), "backend='triton' needs CUDA"),
]


def run_case(request, call, changes: dict, match: str) -> None:
    changes = dict(changes)
    if changes.pop("interpret", True) is False:
        request.getfixturevalue("no_interpreter")
    refused(lambda: call(**changes), match)


# ---- per_sample_grad_norm ----

def net(*extra: nn.Module, classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.GroupNorm(3, 3), nn.ReLU(), *extra, nn.Flatten(),
                         nn.Linear(3 * 36, classes)).double()


def frozen_batch_norm() -> nn.Module:
    model = net(nn.BatchNorm2d(3))
    model[3].requires_grad_(False)
    return model


GRAD_NORM_CASES = [
    ("model not a module", dict(model=42), "model must be a torch.nn.Module"),
    ("trainable batch norm", dict(model=net(nn.BatchNorm2d(3))), "model: module '3': BatchNorm2d mixes"),
    ("frozen batch norm in training mode", dict(model=frozen_batch_norm()), "model: module '3'.*batch statistics"),
    ("layer without a rule", dict(model=nn.Sequential(nn.Flatten(), nn.Bilinear(72, 72, 4)).double()),
     "model: module '1': Bilinear has no per-sample gradient rule"),
    ("no trainable parameters", dict(model=net().requires_grad_(False)), "model has no parameters"),
    ("model of another dtype", dict(model=net().float()), "model parameter '0.weight' is torch.float32"),
    ("model output not [B, K]", dict(model=nn.Sequential(nn.Conv2d(2, 3, 3)).double()), "model must map x"),
    ("x not a tensor", dict(x=[[1.0]]), "x must be a tensor"),
    ("x without a batch dim", dict(x=torch.randn(3, **F64)), "x must be a non-empty batch"),
    ("x empty batch", dict(x=torch.randn(0, 2, 6, 6, **F64), y=torch.zeros(0, dtype=torch.int64)),
     "x must be a non-empty batch"),
    ("x without elements", dict(x=torch.randn(3, 0, 6, 6, **F64)), "x must be a non-empty batch"),
    ("x integer", dict(x=torch.ones(3, 2, 6, 6, dtype=torch.int64)), "x must be a floating"),
    ("y not a tensor", dict(y=[0, 1, 2]), "y must be a tensor"),
    ("y float", dict(y=torch.zeros(3, **F64)), "y must be int64"),
    ("y wrong length", dict(y=torch.tensor([0, 1])), "y must be int64 labels of shape"),
    ("y on another device", dict(y=torch.zeros(3, dtype=torch.int64, device="meta")), "y on meta"),
    ("y beyond the classes", dict(y=torch.tensor([0, 4, 1])), r"y must lie in \[0, K\) = \[0, 4\)"),
    ("y negative (cross-entropy's ignore index)", dict(y=torch.tensor([0, -100, 1])), r"y must lie in \[0, K\)"),
    ("create_graph an int", dict(create_graph=1), "create_graph must be True or False"),
    ("chunk_size zero", dict(chunk_size=0), "chunk_size must be an integer >= 1"),
    ("chunk_size a bool", dict(chunk_size=True), "chunk_size must be an integer >= 1"),
    ("chunk_size a float", dict(chunk_size=2.5), "chunk_size must be an integer >= 1"),
    ("cpp off the cpu", dict(model=net().to("meta"), x=torch.randn(3, 2, 6, 6, device="meta", **F64),
                             y=torch.zeros(3, dtype=torch.int64, device="meta"), backend="cpp"),
     "backend='cpp' needs CPU tensors"),
    ("bfloat16 on cpu with cpp", dict(model=net().bfloat16(), x=torch.randn(3, 2, 6, 6, dtype=torch.bfloat16),
                                      backend="cpp"), "backend='cpp' takes float32 or float64 tensors.*bfloat16"),
    ("float16 on cpu with cpp", dict(model=net().half(), x=torch.randn(3, 2, 6, 6, dtype=torch.float16),
                                     backend="cpp"), "backend='cpp' takes float32 or float64 tensors.*float16"),
    *BACKEND_CASES,
]


def grad_norm_call(model=None, x=None, y=None, **kwargs):
    model = net() if model is None else model
    x = torch.randn(3, 2, 6, 6, **F64) if x is None else x
    y = torch.tensor([0, 1, 2]) if y is None else y
    return per_sample_grad_norm(model, x, y, **kwargs)


@pytest.mark.parametrize("case, changes, match", GRAD_NORM_CASES, ids=[c[0] for c in GRAD_NORM_CASES])
def test_per_sample_grad_norm_refuses(request, case, changes, match):
    run_case(request, grad_norm_call, changes, match)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("convnet", [False, True])
def test_per_sample_grad_norm_half_precision_on_cpu_runs_under_auto(dtype, convnet):
    """The C++ kernels take float32 and float64: "auto" runs the torch rules (and the fused ConvNet tails where they
    take the dtype) instead."""
    if convnet:
        model, x = get_network("ConvNet", 1, 4, 8, torch.Generator().manual_seed(0)).double(), torch.randn(3, 1, 8, 8)
    else:
        model, x = net(), torch.randn(3, 2, 6, 6)
    y = torch.tensor([0, 1, 2])
    expected = per_sample_grad_norm(model, x.double(), y)
    got = per_sample_grad_norm(model.to(dtype), x.to(dtype), y)
    torch.testing.assert_close(got.double(), expected, rtol=3e-2, atol=1e-2)


# ---- grad_match_distance ----

def pair(*shapes, dtype=torch.float32):
    return [torch.ones(s, dtype=dtype) for s in shapes]


GRAD_MATCH_CASES = [
    ("g_syn a lone tensor", dict(g_syn=torch.ones(3, 4)), "g_syn must be a list or tuple of tensors"),
    ("g_real None", dict(g_real=None), "g_real must be a list or tuple of tensors"),
    ("empty lists", dict(g_syn=[], g_real=[]), "g_syn and g_real must be non-empty lists"),
    ("unequal lengths", dict(g_real=pair((3, 4), (2,))), "g_syn and g_real must be non-empty lists of equal length"),
    ("item not a tensor", dict(g_real=[[1.0, 2.0]]), r"g_real\[0\] must be a tensor"),
    ("integer gradients", dict(g_syn=pair((3, 4), dtype=torch.int64), g_real=pair((3, 4), dtype=torch.int64)),
     r"g_syn\[0\] must be a floating-point tensor"),
    ("complex gradients", dict(g_syn=pair((3, 4), dtype=torch.complex64), g_real=pair((3, 4), dtype=torch.complex64)),
     r"g_syn\[0\] must be a floating-point tensor"),
    ("mixed dtypes", dict(g_real=pair((3, 4), dtype=torch.float64)), r"g_real\[0\] is torch.float64"),
    ("mixed devices", dict(g_real=[torch.ones(3, 4, device="meta")]), r"g_real\[0\] is torch.float32 on meta"),
    ("no elements", dict(g_syn=pair((3, 0)), g_real=pair((3, 0))), r"g_syn\[0\] has no elements"),
    ("shapes differ", dict(g_real=pair((4, 3))), r"g_syn\[0\] has shape \(3, 4\) but g_real\[0\] has \(4, 3\)"),
    ("batched scalar", dict(g_syn=pair(()), g_real=pair(()), batched=True), "leading class dimension"),
    ("batched K differs", dict(g_syn=pair((3, 4), (2,)), g_real=pair((3, 4), (2,)), batched=True),
     r"g_syn\[1\] must have the leading class dimension K"),
    ("unknown metric", dict(metric="l2"), "metric must be one of 'ours', 'mse', 'l1', 'cos'"),
    ("metric not a string", dict(metric=None), "metric must be one of"),
    ("batched an int", dict(batched=1), "batched must be True or False"),
    ("cpp off the cpu", dict(g_syn=[torch.ones(3, 4, device="meta")], g_real=[torch.ones(3, 4, device="meta")],
                             backend="cpp"), "backend='cpp' needs CPU tensors"),
    ("bfloat16 on cpu with cpp", dict(g_syn=pair((3, 4), dtype=torch.bfloat16),
                                      g_real=pair((3, 4), dtype=torch.bfloat16), backend="cpp"),
     "backend='cpp' takes float32 or float64 tensors.*bfloat16"),
    *BACKEND_CASES,
]


def grad_match_call(g_syn=..., g_real=..., **kwargs):
    return grad_match_distance(pair((3, 4)) if g_syn is ... else g_syn, pair((3, 4)) if g_real is ... else g_real,
                               **kwargs)


@pytest.mark.parametrize("case, changes, match", GRAD_MATCH_CASES, ids=[c[0] for c in GRAD_MATCH_CASES])
def test_grad_match_distance_refuses(request, case, changes, match):
    run_case(request, grad_match_call, changes, match)


# ---- masked_feature_contrastive ----

def contrastive_inputs(device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(3, 4, 2, 2, generator=g, **F64)
    masks = torch.rand(3, 1, 2, 2, generator=g, **F64)
    return [t.to(device) for t in (features, masks, torch.tensor([0, 4, 1]), torch.randn(5, 4, generator=g, **F64))]


FEATURES, MASKS, LABELS, PROTOTYPES = contrastive_inputs()
CONTRASTIVE_CASES = [
    ("features not a tensor", dict(features=[1.0]), "features must be a tensor"),
    ("features 3-D", dict(features=torch.zeros(3, 4, 2, **F64)), "features must be a non-empty"),
    ("features empty", dict(features=torch.zeros(3, 0, 2, 2, **F64)), "features must be a non-empty"),
    ("features float16 on cpu", dict(features=FEATURES.half()), "features must have dtype"),
    ("features NaN", dict(features=with_value(FEATURES, NAN)), "features must hold finite values"),
    ("features inf", dict(features=with_value(FEATURES, INF)), "features must hold finite values"),
    ("features -inf", dict(features=with_value(FEATURES, -INF)), "features must hold finite values"),
    ("prototypes NaN", dict(prototypes=with_value(PROTOTYPES, NAN)), "prototypes must hold finite values"),
    ("prototypes inf", dict(prototypes=with_value(PROTOTYPES, INF)), "prototypes must hold finite values"),
    ("prototypes wrong C", dict(prototypes=torch.zeros(5, 3, **F64)), "prototypes must have shape"),
    ("prototypes no classes", dict(prototypes=torch.zeros(0, 4, **F64)), "prototypes must have shape"),
    ("prototypes integer", dict(prototypes=torch.zeros(5, 4, dtype=torch.int64)), "prototypes must be a floating"),
    ("prototypes on another device", dict(prototypes=PROTOTYPES.to("meta")), "prototypes on meta"),
    ("masks wrong shape", dict(masks=torch.ones(3, 2, 2, 2, **F64)), "masks must have shape"),
    ("masks integer", dict(masks=torch.ones(3, 1, 2, 2, dtype=torch.int64)), "masks must be a floating"),
    ("masks require grad", dict(masks=MASKS.clone().requires_grad_(True)), "masks requires grad"),
    ("masks above 1", dict(masks=with_value(MASKS, 1.5)), r"masks must hold weights in \[0, 1\]"),
    ("masks negative", dict(masks=with_value(MASKS, -0.5)), r"masks must hold weights in \[0, 1\]"),
    ("masks NaN", dict(masks=with_value(MASKS, NAN)), r"masks must hold weights in \[0, 1\]"),
    ("labels float", dict(labels=torch.zeros(3)), "labels must be an integer"),
    ("labels bool", dict(labels=torch.zeros(3, dtype=torch.bool)), "labels must be an integer"),
    ("labels wrong length", dict(labels=torch.zeros(2, dtype=torch.int64)), "labels must be an integer tensor of"),
    ("labels beyond K", dict(labels=torch.tensor([0, 5, 1])), r"labels must lie in \[0, K\)"),
    ("labels negative", dict(labels=torch.tensor([0, -1, 1])), r"labels must lie in \[0, K\)"),
    ("tau zero", dict(tau=0.0), "tau must be a finite number > 0"),
    ("tau inf", dict(tau=INF), "tau must be a finite number > 0"),
    ("tau NaN", dict(tau=NAN), "tau must be a finite number > 0"),
    ("tau a bool", dict(tau=True), "tau must be a finite number > 0"),
    ("tau a string", dict(tau="0.5"), "tau must be a finite number > 0"),
    ("tau a tensor", dict(tau=torch.tensor(0.5)), "tau must be a finite number > 0"),
    ("cpp off the cpu", dict(zip(("features", "masks", "labels", "prototypes"), contrastive_inputs("meta")),
                             backend="cpp"), "backend='cpp' needs CPU tensors"),
    *BACKEND_CASES,
]


def contrastive_call(features=FEATURES, masks=MASKS, labels=LABELS, prototypes=PROTOTYPES, tau=0.5, **kwargs):
    return masked_feature_contrastive(features, masks, labels, prototypes, tau, **kwargs)


@pytest.mark.parametrize("case, changes, match", CONTRASTIVE_CASES, ids=[c[0] for c in CONTRASTIVE_CASES])
def test_masked_feature_contrastive_refuses(request, case, changes, match):
    run_case(request, contrastive_call, changes, match)


# ---- instance_norm_relu_pool ----

NORM_CASES = [
    ("x not a tensor", dict(x=[1.0]), "x must be a tensor"),
    ("x 3-D", dict(x=torch.randn(3, 4, 4)), "x must be a non-empty"),
    ("x empty", dict(x=torch.randn(0, 3, 4, 4)), "x must be a non-empty"),
    ("x float16", dict(x=torch.randn(1, 3, 4, 4).half()), "x must have dtype"),
    ("x integer", dict(x=torch.ones(1, 3, 4, 4, dtype=torch.int64)), "x must have dtype"),
    ("x too small to pool", dict(x=torch.randn(1, 3, 1, 4)), "x must be at least 2 x 2"),
    ("weight wrong shape", dict(weight=torch.ones(4)), "weight must be a floating tensor of shape"),
    ("weight integer", dict(weight=torch.ones(3, dtype=torch.int64)), "weight must be a floating tensor"),
    ("weight not a tensor", dict(weight=[1.0, 1.0, 1.0]), "weight must be a floating tensor"),
    ("bias wrong shape", dict(bias=torch.zeros(3, 1)), "bias must be a floating tensor of shape"),
    ("bias on another device", dict(bias=torch.zeros(3, device="meta")), "bias on meta"),
    ("eps zero", dict(eps=0.0), "eps must be a finite number > 0"),
    ("eps negative", dict(eps=-1e-5), "eps must be a finite number > 0"),
    ("eps NaN", dict(eps=NAN), "eps must be a finite number > 0"),
    ("eps inf", dict(eps=INF), "eps must be a finite number > 0"),
    ("eps a bool", dict(eps=True), "eps must be a finite number > 0"),
    ("eps a string", dict(eps="1e-5"), "eps must be a finite number > 0"),
    ("per_sample_sq_norms a tuple", dict(per_sample_sq_norms=()), "per_sample_sq_norms must be None or a list"),
    ("cpp off the cpu", dict(x=torch.randn(1, 3, 4, 4, device="meta"), weight=torch.ones(3, device="meta"),
                             bias=torch.zeros(3, device="meta"), backend="cpp"), "backend='cpp' needs CPU tensors"),
    *BACKEND_CASES,
]


def norm_call(x=None, weight=None, bias=None, eps=1e-5, **kwargs):
    x = torch.randn(1, 3, 4, 4) if x is None else x
    weight = torch.ones(3) if weight is None else weight
    bias = torch.zeros(3) if bias is None else bias
    return instance_norm_relu_pool(x, weight, bias, eps, **kwargs)


@pytest.mark.parametrize("case, changes, match", NORM_CASES, ids=[c[0] for c in NORM_CASES])
def test_instance_norm_relu_pool_refuses(request, case, changes, match):
    run_case(request, norm_call, changes, match)


# ---- conv_instance_norm_relu_pool ----

CONV_CASES = [
    ("x not a tensor", dict(x=1.0), "x must be a tensor"),
    ("x 3-D", dict(x=torch.randn(1, 4, 4)), "x must be a non-empty"),
    ("x float16", dict(x=torch.randn(1, 1, 4, 4).half()), "x must have dtype"),
    ("conv_weight not a tensor", dict(conv_weight=None), "conv_weight must be a tensor"),
    ("conv_weight wrong Cin", dict(conv_weight=torch.randn(2, 3, 3, 3)), "conv_weight must be a non-empty"),
    ("conv_weight 3-D", dict(conv_weight=torch.randn(2, 1, 3)), "conv_weight must be a non-empty"),
    ("conv_weight empty", dict(conv_weight=torch.randn(0, 1, 3, 3), conv_bias=torch.zeros(0), weight=torch.ones(0),
                               bias=torch.zeros(0)), "conv_weight must be a non-empty"),
    ("conv_weight of another dtype", dict(conv_weight=torch.randn(2, 1, 3, 3, **F64)),
     "conv_weight must have x's dtype"),
    ("conv_bias wrong shape", dict(conv_bias=torch.zeros(3)), "conv_bias must be"),
    ("conv_bias None", dict(conv_bias=None), "conv_bias must be a tensor"),
    ("conv_bias of another dtype", dict(conv_bias=torch.zeros(2, **F64)), "conv_bias must have x's dtype"),
    ("weight wrong shape", dict(weight=torch.ones(3)), "weight must be a floating tensor of shape"),
    ("weight integer", dict(weight=torch.ones(2, dtype=torch.int64)), "weight must be a floating tensor"),
    ("bias wrong shape", dict(bias=torch.zeros(2, 1)), "bias must be a floating tensor of shape"),
    ("bias on another device", dict(bias=torch.zeros(2, device="meta")), "bias on meta"),
    ("padding negative", dict(padding=-1), "padding must be an integer >= 0"),
    ("padding a float", dict(padding=1.5), "padding must be an integer >= 0"),
    ("padding a bool", dict(padding=True), "padding must be an integer >= 0"),
    ("map too small to pool", dict(x=torch.randn(1, 1, 3, 3), padding=0), "x .* with padding 0 .* at least 2 x 2"),
    ("eps zero", dict(eps=0.0), "eps must be a finite number > 0"),
    ("eps NaN", dict(eps=NAN), "eps must be a finite number > 0"),
    ("cpp off the cpu", dict(x=torch.randn(1, 1, 4, 4, device="meta"), conv_weight=torch.randn(2, 1, 3, 3).to("meta"),
                             **{name: torch.ones(2, device="meta") for name in ("conv_bias", "weight", "bias")},
                             backend="cpp"), "backend='cpp' needs CPU tensors"),
    *BACKEND_CASES,
]


def conv_call(x=None, conv_weight=..., conv_bias=..., weight=None, bias=None, padding=1, eps=1e-5, **kwargs):
    x = torch.randn(1, 1, 4, 4) if x is None else x
    conv_weight = torch.randn(2, 1, 3, 3) if conv_weight is ... else conv_weight
    conv_bias = torch.zeros(2) if conv_bias is ... else conv_bias
    weight = torch.ones(2) if weight is None else weight
    bias = torch.zeros(2) if bias is None else bias
    return conv_instance_norm_relu_pool(x, conv_weight, conv_bias, weight, bias, padding, eps, **kwargs)


@pytest.mark.parametrize("case, changes, match", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_instance_norm_relu_pool_refuses(request, case, changes, match):
    run_case(request, conv_call, changes, match)


def test_conv_block_under_autocast_takes_float32_parameters_with_bfloat16_input():
    x = torch.randn(2, 3, 6, 6).bfloat16()
    params = [torch.randn(4, 3, 3, 3), torch.zeros(4), torch.ones(4), torch.zeros(4)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv_instance_norm_relu_pool(x, *params, 1)
    assert out.shape == (2, 4, 3, 3) and out.dtype == torch.bfloat16


def test_per_sample_grad_norm_under_bfloat16_autocast_on_cpu_runs_the_torch_rules():
    model, x, y = net().float(), torch.randn(3, 2, 6, 6), torch.tensor([0, 1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = per_sample_grad_norm(model, x, y)
        want = per_sample_grad_norm(model, x, y, backend="torch")
    torch.testing.assert_close(got, want)


def test_non_finite_features_in_one_vmapped_slice_are_refused():
    batch = FEATURES.expand(3, *FEATURES.shape).clone()
    batch[2, 0, 0, 0, 0] = NAN
    refused(lambda: torch.func.vmap(lambda f: contrastive_call(features=f))(batch), "features must hold finite")
