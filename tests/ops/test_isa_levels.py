"""The C++ kernels at every ISA level this machine runs, against the plain-torch references (fastdd.ops.naive); the
level torch's ATEN_CPU_CAPABILITY picks; and no instruction of a higher level in the code of a lower one."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdd.ops import _backend, grad_match_distance, masked_feature_contrastive, naive, per_sample_grad_norm
from fastdd.ops.norm_relu_pool import conv_instance_norm_relu_pool, instance_norm_relu_pool
from fastdd.ops.weight_sq_norms import _fused_sq_norms

EXTENSIONS = ("grad_match", "grad_norm", "masked_contrastive", "norm_relu_pool")
# float32 kernels against a float64 reference: sums of a few hundred terms
TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])


@pytest.fixture(params=_backend.isa_levels())
def level(request) -> str:
    """Every test that takes it runs once per level, its C++ kernels at that level."""
    with _backend.at_isa_level(request.param):
        yield request.param


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def assert_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected.double(), **TOLERANCES[dtype])


def test_every_extension_runs_at_the_level(level):
    for name in EXTENSIONS:
        assert _backend.load_extension(name).level() == level == _backend.isa_level()


@DTYPES
@pytest.mark.parametrize("metric", ["ours", "mse", "l1", "cos"])
def test_grad_match(level, dtype, metric):
    shapes = [(37, 3, 3, 3), (5, 7), (37,), (3, 2, 5)]  # odd rows and lengths: vector tails everywhere
    a = [randn(*s, dtype=dtype, seed=i) for i, s in enumerate(shapes)]
    b = [randn(*s, dtype=dtype, seed=10 + i) for i, s in enumerate(shapes)]

    def value_and_grads(fn, a, **kw):
        a = [t.clone().requires_grad_(True) for t in a]
        value = fn(a, b, metric, **kw)
        return (value, *torch.autograd.grad(value, a, materialize_grads=True))  # "ours" skips 1-D tensors

    expected = value_and_grads(naive.grad_match_distance, [t.double() for t in a])
    for got, want in zip(value_and_grads(grad_match_distance, a, backend="cpp"), expected):
        assert_close(got, want, dtype)


class _Net(nn.Sequential):
    """Convolutions for the direct and the ghost form of the C++ norms, and GroupNorm for its row sums."""

    def __init__(self, dtype: torch.dtype):
        generator = torch.Generator().manual_seed(0)
        super().__init__(nn.Conv2d(2, 3, 3, padding=1), nn.GroupNorm(3, 3), nn.ReLU(),
                         nn.Conv2d(3, 4, 3, stride=2), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
        self.to(dtype)


@DTYPES
def test_grad_norm(level, dtype):
    net = _Net(dtype)
    x, y = randn(3, 2, 7, 7, dtype=dtype, seed=1), torch.tensor([0, 4, 2])
    expected = naive.per_sample_grad_norm(_Net(torch.float64), x.double(), y)
    assert_close(per_sample_grad_norm(net, x, y, backend="cpp"), expected, dtype)


@DTYPES
@pytest.mark.parametrize("ghost", [False, True], ids=["direct", "ghost"])
def test_grad_norm_conv_forms(level, dtype, ghost):
    a, g = randn(2, 4, 7, 6, dtype=dtype, seed=2), randn(2, 6, 3, 4, dtype=dtype, seed=3)  # 2 groups, stride 2, 1
    u = F.unfold(a.double(), (3, 3), stride=(2, 1)).reshape(4, 2 * 9, 12)
    expected = (g.double().reshape(4, 3, 12) @ u.transpose(1, 2)).pow(2).sum((1, 2)).reshape(2, 2).sum(1)
    assert_close(_fused_sq_norms(a, g, (3, 3), (2, 1), (1, 1), 2, ghost, "cpp"), expected, dtype)


@DTYPES
def test_masked_contrastive(level, dtype):
    """The autograd node (loss), and the forward and unpooling kernels reached under torch.func."""
    features, masks = randn(5, 37, 3, 5, dtype=dtype, seed=4), randn(5, 1, 3, 5, dtype=dtype, seed=5).sigmoid()
    labels, prototypes = torch.tensor([0, 2, 1, 3, 2]), randn(4, 37, dtype=dtype, seed=6)

    def loss(fn, features, masks, prototypes, **kw):
        return fn(features, masks, labels, prototypes, 0.3, **kw)

    def loss_and_grads(fn, features, masks, prototypes, **kw):
        f, p = features.clone().requires_grad_(True), prototypes.clone().requires_grad_(True)
        value = loss(fn, f, masks, p, **kw)
        return (value, *torch.autograd.grad(value, (f, p)))

    expected = loss_and_grads(naive.masked_feature_contrastive, features.double(), masks.double(), prototypes.double())
    for got, want in zip(loss_and_grads(masked_feature_contrastive, features, masks, prototypes, backend="cpp"),
                         expected):
        assert_close(got, want, dtype)
    under_func = torch.func.grad(lambda f: loss(masked_feature_contrastive, f, masks, prototypes, backend="cpp"))
    assert_close(under_func(features), expected[1], dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["float64", "float32", "bfloat16"])
def test_instance_norm_relu_pool(level, dtype):
    x, grad_out = randn(2, 3, 7, 9, dtype=dtype, seed=7), randn(2, 3, 3, 4, dtype=dtype, seed=8)
    weight, bias = randn(3, dtype=torch.float64, seed=9), randn(3, dtype=torch.float64, seed=10)

    def value_and_grads(fn, x, **kw):
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
        out = fn(*leaves, 1e-5, **kw)
        return (out, *torch.autograd.grad(out, leaves, grad_out.to(x.dtype)))

    expected = value_and_grads(naive.instance_norm_relu_pool, x.double())
    got = value_and_grads(instance_norm_relu_pool, x, backend="cpp")
    tolerance = dict(rtol=5e-2, atol=5e-2 * 2 * 7 * 9) if dtype == torch.bfloat16 else TOLERANCES[dtype]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, **tolerance)


@DTYPES
def test_conv_instance_norm_relu_pool(level, dtype):
    """The fused block: x needs no gradient, one input channel of 3 x 3 taps."""
    x, grad_out = randn(2, 1, 9, 11, dtype=dtype, seed=11), randn(2, 3, 4, 5, dtype=dtype, seed=12)
    params = [randn(*s, dtype=dtype, seed=13 + i) for i, s in enumerate([(3, 1, 3, 3), (3,), (3,), (3,)])]

    def value_and_grads(fn, x, params, **kw):
        leaves = [p.clone().requires_grad_(True) for p in params]
        out = fn(x, *leaves, 1, 1e-5, **kw)
        return (out, *torch.autograd.grad(out, leaves, grad_out.to(x.dtype)))

    expected = value_and_grads(naive.conv_instance_norm_relu_pool, x.double(), [p.double() for p in params])
    for got, want in zip(value_and_grads(conv_instance_norm_relu_pool, x, params, backend="cpp"), expected):
        assert_close(got, want, dtype)


@pytest.mark.parametrize("level", [lv for lv in ("avx2", "default") if lv in _backend.isa_levels()])
def test_aten_cpu_capability_picks_the_level(level):
    """torch's own switch lowers fastdd's level with its own, in a process of its own."""
    show = ("from fastdd.ops import _backend; m = _backend.load_extension('norm_relu_pool'); "
            "print(_backend.isa_level(), ','.join(_backend.isa_levels()), m.level(), m.__name__)")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": level}
    done = subprocess.run([sys.executable, "-c", show], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    in_use, levels, module_level, module = done.stdout.split()
    assert in_use == module_level == level
    assert levels.split(",")[0] == level
    assert module == _backend.load_extension("norm_relu_pool").__name__  # the same build, at a lower level


# An AVX-512 instruction names a zmm register, a mask register k0-k7, one of xmm16-31 / ymm16-31, or a broadcast.
_AVX512 = re.compile(r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b|\{1to")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("objdump") is None,
                    reason="x86-64 with objdump only")
@pytest.mark.parametrize("name", EXTENSIONS)
def test_no_level_holds_instructions_of_a_higher_one(name):
    """In the machine code of a module: no AVX-512 instruction outside the functions of level_avx512, and no VEX
    or EVEX instruction (AVX and above) outside those of level_avx2 and level_avx512 (the baseline: SSE2)."""
    library = _backend.load_extension(name).__file__
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", library], capture_output=True,
                             text=True, check=True).stdout
    function, wrong = "", []
    for line in listing.splitlines():
        if header := re.match(r"[0-9a-f]+ <(.*)>:$", line):
            function = header[1]
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        instruction = re.sub(r"<.*>|#.*", "", fields[-1]).strip()  # without the symbols and comments objdump adds
        if "level_avx512" not in function and _AVX512.search(instruction):
            wrong.append(f"{function}: {instruction}")
        elif "level_avx" not in function and instruction.startswith("v"):
            wrong.append(f"{function}: {instruction}")
    assert not wrong, "\n".join(wrong[:10])
