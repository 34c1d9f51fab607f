"""DSA: each op against a per-image reference, the siamese contract, determinism, gradients, validation."""

from __future__ import annotations

import math
from dataclasses import fields, replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdd.augment import DSA, OPS, DSAParams, dsa_strategy_for


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def group(p: DSAParams, g: int) -> DSAParams:
    """The single-group parameters of group g."""
    return DSAParams(p.ops, *(getattr(p, f.name)[g : g + 1] for f in fields(p)[1:]))


def per_group(dsa: DSA, x: torch.Tensor, seed: int = 0) -> tuple[DSAParams, torch.Tensor]:
    """Sample one group per image of x and apply: image i gets group i."""
    p = dsa.sample(x.shape[0], gen(seed))
    return p, dsa.apply(x, p, torch.arange(x.shape[0]))


def affine_ref(img: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    t = torch.tensor([theta], dtype=img.dtype)
    grid = F.affine_grid(t, [1, *img.shape], align_corners=True)
    return F.grid_sample(img[None], grid, align_corners=True)[0]


# ---------------------------------------------------------------- strategy / construction


def test_strategy_parsing_and_unknown_op():
    assert DSA().ops == ("color", "crop", "cutout", "flip", "scale", "rotate")
    assert DSA("crop_flip").ops == ("crop", "flip")
    with pytest.raises(ValueError, match="'blur'") as err:
        DSA("crop_blur")
    assert all(op in str(err.value) for op in OPS)
    with pytest.raises(ValueError, match="unknown DSA op ''"):
        DSA("crop__flip")


@pytest.mark.parametrize(
    "kwargs",
    [{"prob_flip": 1.5}, {"ratio_scale": 0.0}, {"ratio_rotate": -1.0}, {"ratio_cutout": float("nan")}],
)
def test_bad_hyperparameters(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        DSA(**kwargs)


def test_dsa_strategy_for():
    for name in ("mnist", "svhn", "digits", "MNIST"):
        assert dsa_strategy_for(name) == "color_crop_cutout_scale_rotate"
    for name in ("cifar10", "cifar100", "fashion-mnist", "imagefolder"):
        assert dsa_strategy_for(name) == "color_crop_cutout_flip_scale_rotate"
    DSA(dsa_strategy_for("mnist"))


# ---------------------------------------------------------------- sampling


def test_sample_determinism_and_ranges():
    dsa = DSA()
    a, b, c = dsa.sample(500, gen(1)), dsa.sample(500, gen(1)), dsa.sample(500, gen(2))
    for f in fields(a)[1:]:
        assert torch.equal(getattr(a, f.name), getattr(b, f.name)), f.name
    assert not torch.equal(a.scale, c.scale)
    assert a.op.dtype == torch.long and set(a.op.tolist()) == set(range(6))  # uniform over 6 op groups
    assert a.scale.min() >= 1 / 1.2 and a.scale.max() <= 1.2
    assert not torch.equal(a.scale[:, 0], a.scale[:, 1])  # sx, sy independent
    assert a.angle.abs().max() <= math.radians(15) and a.angle.abs().max() > math.radians(14)
    assert 0.4 < a.flip.float().mean() < 0.6
    assert a.brightness.min() >= -0.5 and a.brightness.max() <= 0.5
    assert a.saturation.min() >= 0 and a.saturation.max() <= 2
    assert a.contrast.min() >= 0.5 and a.contrast.max() <= 1.5
    assert a.num_groups == 500


def test_integer_parameter_ranges():
    dsa = DSA()
    p = dsa.sample(600, gen(0))
    shifts = dsa.crop_shifts(p, 32, 8)  # s = 4 (H), 1 (W)
    assert set(shifts[:, 0].tolist()) == set(range(-4, 5))
    assert set(shifts[:, 1].tolist()) == {-1, 0, 1}
    assert dsa.cutout_size(32, 7) == (16, 4)  # int(3.5 + 0.5) = 4
    centres = dsa.cutout_centres(p, 32, 7)
    assert set(centres[:, 0].tolist()) == set(range(0, 33))  # even side: randint(0, H + 1)
    assert set(centres[:, 1].tolist()) == set(range(0, 8))
    dsa_odd = DSA(ratio_cutout=0.4)  # side int(12.8 + .5) = 13 (odd): randint(0, H)
    centres = dsa_odd.cutout_centres(p, 32, 16)  # sides 13 and int(6.4 + .5) = 6
    assert set(centres[:, 0].tolist()) == set(range(0, 32))
    assert set(centres[:, 1].tolist()) == set(range(0, 17))


def test_params_to_and_shape_check():
    p = DSA().sample(3, gen(), device="cpu")
    assert p.to("cpu").op.device.type == "cpu"
    with pytest.raises(ValueError, match="DSAParams.scale"):
        replace(p, scale=p.scale[:2])


# ---------------------------------------------------------------- each op against a per-image reference


def test_flip_reference():
    x = torch.randn(16, 2, 5, 6)
    p, out = per_group(DSA("flip"), x)
    assert 0 < int(p.flip.sum()) < 16
    for i in range(16):
        assert torch.equal(out[i], x[i].flip(-1) if p.flip[i] else x[i])


def test_flip_probability_extremes():
    x = torch.randn(4, 1, 3, 3)
    assert torch.equal(DSA("flip", prob_flip=1.0)(x, gen()), x.flip(3))
    assert torch.equal(DSA("flip", prob_flip=0.0)(x, gen()), x)


def crop_ref(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    c, h, w = img.shape
    out = torch.zeros_like(img)
    for i in range(h):
        for j in range(w):
            if 0 <= i + dy < h and 0 <= j + dx < w:
                out[:, i, j] = img[:, i + dy, j + dx]
    return out


def cutout_ref(img: torch.Tensor, cy: int, cx: int, kh: int, kw: int) -> torch.Tensor:
    out = img.clone()
    top, left = cy - kh // 2, cx - kw // 2
    out[:, max(top, 0) : max(top + kh, 0), max(left, 0) : max(left + kw, 0)] = 0
    return out


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    ratio=st.sampled_from([0.0, 0.125, 0.3, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_crop_reference(h, w, ratio, seed):
    dsa = DSA("crop", ratio_crop_pad=ratio)
    x = torch.randn(6, 2, h, w)
    p, out = per_group(dsa, x, seed)
    shifts = dsa.crop_shifts(p, h, w)
    for i in range(6):
        assert torch.equal(out[i], crop_ref(x[i], *shifts[i].tolist()))


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    ratio=st.sampled_from([0.0, 0.25, 0.5, 0.7, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_cutout_reference(h, w, ratio, seed):
    dsa = DSA("cutout", ratio_cutout=ratio)
    x = torch.rand(6, 2, h, w) + 1
    p, out = per_group(dsa, x, seed)
    centres = dsa.cutout_centres(p, h, w)
    kh, kw = dsa.cutout_size(h, w)
    for i in range(6):
        assert torch.equal(out[i], cutout_ref(x[i], *centres[i].tolist(), kh, kw))


def test_crop_direction_and_cutout_known_values():
    x = torch.arange(1.0, 13.0).reshape(1, 1, 3, 4)
    p = DSA("crop").sample(1, gen())
    dsa = DSA("crop", ratio_crop_pad=0.34)  # s = 1 for H = 3 and W = 4
    p = replace(p, crop=torch.tensor([[0.99, 0.0]]))  # dy = +1, dx = -1
    assert dsa.crop_shifts(p, 3, 4).tolist() == [[1, -1]]
    expected = torch.tensor([[0.0, 5, 6, 7], [0, 9, 10, 11], [0, 0, 0, 0]])
    assert torch.equal(dsa.apply(x, p)[0, 0], expected)


def test_scale_reference():
    x = torch.randn(8, 3, 6, 7)
    p, out = per_group(DSA("scale"), x)
    for i in range(8):
        sx, sy = p.scale[i].tolist()
        torch.testing.assert_close(out[i], affine_ref(x[i], [[sx, 0, 0], [0, sy, 0]]))


def test_rotate_reference():
    x = torch.randn(8, 3, 6, 7)
    p, out = per_group(DSA("rotate"), x)
    for i in range(8):
        a = p.angle[i].item()
        theta = [[math.cos(a), math.sin(a), 0], [-math.sin(a), math.cos(a), 0]]
        torch.testing.assert_close(out[i], affine_ref(x[i], theta))


def test_rotate_quarter_turn_is_exact_rot90():
    x = torch.randn(2, 2, 5, 5)
    dsa = DSA("rotate")
    p = replace(dsa.sample(1, gen()), angle=torch.tensor([math.pi / 2]))
    torch.testing.assert_close(dsa.apply(x, p), torch.rot90(x, -1, dims=(2, 3)), atol=1e-5, rtol=0)


def test_color_reference():
    x = torch.randn(8, 3, 4, 5)
    p, out = per_group(DSA("color"), x)
    for i in range(8):
        y = x[i] + p.brightness[i]
        m = y.mean(dim=0, keepdim=True)
        y = (y - m) * p.saturation[i] + m
        m = y.mean()
        y = (y - m) * p.contrast[i] + m
        torch.testing.assert_close(out[i], y)


def test_identity_like_settings():
    x = torch.randn(3, 2, 6, 5)
    g = gen()
    torch.testing.assert_close(DSA("scale", ratio_scale=1.0)(x, g), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(DSA("rotate", ratio_rotate=0.0)(x, g), x, atol=1e-6, rtol=0)
    assert torch.equal(DSA("crop", ratio_crop_pad=0.0)(x, g), x)
    assert torch.equal(DSA("cutout", ratio_cutout=0.0)(x, g), x)
    # colour: brightness shift 0 and saturation / contrast factors 1 (set explicitly) give x back
    dsa = DSA("color")
    p = replace(
        dsa.sample(1, g), brightness=torch.zeros(1), saturation=torch.ones(1), contrast=torch.ones(1)
    )
    torch.testing.assert_close(dsa.apply(x, p), x)


# ---------------------------------------------------------------- the siamese contract


@pytest.mark.parametrize("strategy", ["color", "crop", "cutout", "flip", "scale", "rotate"])
def test_same_params_same_transform_on_different_batches(strategy):
    dsa = DSA(strategy, prob_flip=1.0)
    p = dsa.sample(1, gen(7))
    real, syn = torch.randn(5, 3, 8, 8), torch.randn(2, 3, 8, 8)
    both = dsa.apply(torch.cat([real, syn]), p)
    torch.testing.assert_close(both[:5], dsa.apply(real, p))
    torch.testing.assert_close(both[5:], dsa.apply(syn, p))
    # every image of the group got the same transform: identical images stay identical
    same = dsa.apply(real[:1].expand(4, -1, -1, -1), p)
    assert torch.equal(same, same[:1].expand_as(same))


def test_groups_get_different_ops_and_multi_group_call_equals_single_calls():
    dsa = DSA()
    p = dsa.sample(12, gen(3))
    assert len(set(p.op.tolist())) > 2
    x = torch.randn(24, 3, 8, 8)
    groups = torch.arange(24) % 12
    groups = groups[torch.randperm(24, generator=gen(4))]
    out = dsa.apply(x, p, groups)
    for g in range(12):
        sel = groups == g
        torch.testing.assert_close(out[sel], dsa.apply(x[sel], group(p, g)))
    # one image in every group: the groups' transforms differ
    img = torch.randn(1, 3, 8, 8).expand(12, -1, -1, -1)
    outs = dsa.apply(img, p, torch.arange(12))
    assert len({tuple(o.flatten().tolist()) for o in outs}) > 6


def test_none_groups_means_group_zero():
    dsa = DSA()
    p = dsa.sample(4, gen(5))
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(dsa.apply(x, p), dsa.apply(x, p, torch.zeros(3, dtype=torch.long)))


# ---------------------------------------------------------------- training-time __call__


def test_call_is_deterministic_one_op_per_call_independent_params():
    dsa = DSA("flip_cutout", prob_flip=1.0)
    img = (torch.rand(1, 2, 8, 8) + 1).expand(16, -1, -1, -1)
    kinds = set()
    for seed in range(8):
        out = dsa(img, gen(seed))
        assert torch.equal(out, dsa(img, gen(seed)))
        if torch.equal(out, img.flip(3)):
            kinds.add("flip")
        else:  # cutout for every image, with independent centres
            assert ((out == 0).flatten(1).any(1)).all()
            assert len({tuple(o.flatten().tolist()) for o in out}) > 4
            kinds.add("cutout")
    assert kinds == {"flip", "cutout"}


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("strategy", ["scale", "rotate", "color"])
def test_gradcheck(strategy):
    dsa = DSA(strategy)
    p = dsa.sample(2, gen(11))
    x = torch.randn(2, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    groups = torch.tensor([0, 1])
    assert torch.autograd.gradcheck(lambda t: dsa.apply(t, p, groups), (x,))


def test_gradient_flows_through_every_op_and_mixed_groups():
    dsa = DSA()
    p = dsa.sample(6, gen(2))
    x = torch.randn(12, 3, 8, 8, requires_grad=True)
    dsa.apply(x, p, torch.arange(12) % 6).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()
    # integer ops move gradients exactly like they move pixels
    for strategy in ("flip", "crop", "cutout"):
        d = DSA(strategy, prob_flip=1.0)
        q = d.sample(1, gen(9))
        x = torch.randn(2, 1, 6, 6, requires_grad=True)
        w = torch.randn(2, 1, 6, 6)
        (d.apply(x, q) * w).sum().backward()
        xd = x.detach().requires_grad_(True)
        torch.testing.assert_close(x.grad, torch.autograd.grad((d.apply(xd, q) * w).sum(), xd)[0])
        if strategy == "flip":
            torch.testing.assert_close(x.grad, w.flip(3))


# ---------------------------------------------------------------- validation


def test_apply_validation():
    dsa = DSA()
    p = dsa.sample(3, gen())
    x = torch.randn(4, 3, 8, 8)
    with pytest.raises(ValueError, match=r"groups must be an int64 tensor of shape \[N\]=\(4,\)"):
        dsa.apply(x, p, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        dsa.apply(x, p, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        dsa.apply(x, p, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        dsa.apply(x, p, torch.tensor([0, -1, 2, 1]))
    with pytest.raises(ValueError, match="x must be"):
        dsa.apply(torch.randn(3, 8, 8), p)
    with pytest.raises(ValueError, match="x must be"):
        dsa.apply(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), p)
    with pytest.raises(ValueError, match="num_groups"):
        dsa.sample(0, gen())
    assert dsa.apply(x[:0], p, torch.zeros(0, dtype=torch.long)).shape == (0, 3, 8, 8)
