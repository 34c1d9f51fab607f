"""UDD: region mining by each policy on networks whose response is a known function of position, the
region-masked contrastive term against an eager float64 computation, and the plug-in inside the
distillers (schedule, outputs, resume, bad arguments)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from conftest import make_dataset
from fastdd.cli import main
from fastdd.methods import get_distiller
from fastdd.methods.multiformation import decoded_to_stored
from fastdd.models import get_network
from fastdd.plugins.udd import (
    AUTO_POLICY,
    LATEST_PICTURE,
    POLICIES,
    SHARE_PLOT,
    START_PICTURE,
    UDD,
    class_prototypes,
    default_beta,
    feature_map,
    jitter_masks,
    proxy_network,
    region_contrastive,
    response_masks,
    shift,
    underutilized,
)
from fastdd.registry import method_spec
from fastdd.run import run_distillation

MODEL = "ConvNetW32"


class PositionNet(nn.Module):
    """feature_map(x) = |x| * weight: a response that is the image's magnitude times a fixed map of position."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs() * self.weight


def ramp(size: int = 8) -> torch.Tensor:
    """[1, 1, size, size] with distinct values increasing column by column (then down the column)."""
    return (torch.arange(size * size, dtype=torch.float64).view(size, size).T + 1).reshape(1, 1, size, size)


# ----------------------------------------------------------------------------- mining
def test_underutilized_cells_are_those_below_the_reference_quantile():
    cells = torch.tensor([[4.0, 1.0], [3.0, 2.0]]).view(1, 1, 2, 2)
    assert underutilized(cells, cells, 0.5).view(-1).tolist() == [0, 1, 0, 1]  # quantile 2.5
    reference = torch.tensor([0.0, 10.0, 20.0, 30.0, 40.0]).view(5, 1, 1, 1)  # quantile 0.25: 10
    assert underutilized(cells, reference, 0.25).sum() == 4
    assert underutilized(cells, reference, 0.1).view(-1).tolist() == [0, 1, 1, 1]  # quantile 0.1: 4
    assert underutilized(torch.ones(1, 1, 3, 3), torch.ones(2, 1, 3, 3), 0.25).sum() == 0  # nothing below a constant


def test_response_policy_marks_the_lowest_responses():
    """Response = the ramp itself, reference = the ramp: the 16 lowest cells of 64 (quantile 0.25) are the first
    two columns; a brighter synthetic image has none, a darker one all."""
    net = PositionNet(torch.ones(1, 1, 8, 8, dtype=torch.float64))
    masks = response_masks(net, ramp(), ramp(), 0.25)
    expected = torch.zeros(8, 8)
    expected[:, :2] = 1
    assert torch.equal(masks.view(8, 8).float(), expected)
    assert response_masks(net, ramp() + 100, ramp(), 0.25).sum() == 0
    assert response_masks(net, ramp() / 100, ramp(), 0.25).sum() == 64


def test_shift_moves_with_zero_fill():
    x = torch.arange(9.0).view(1, 1, 3, 3)
    assert shift(x, 1, -1).view(3, 3).tolist() == [[0, 0, 0], [1, 2, 0], [4, 5, 0]]
    assert torch.equal(shift(shift(x, 0, 0), 0, 0), x)


def test_jitter_policy_ignores_cells_that_are_low_only_because_of_where_they_sit():
    """A network blind to column 5 (weight 0 there): the response policy marks that column, whatever the
    image holds; under random shifts its content lights up elsewhere, so the jitter policy does not mark it
    and marks the image's genuinely dark columns instead."""
    weight = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    weight[..., 5] = 0
    net = PositionNet(weight)
    image = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    image[..., :2] = 0.01  # dark columns 0 and 1
    response = response_masks(net, image, image, 0.3).view(8, 8)
    assert bool(response[:, 5].all())
    jitter = jitter_masks(net, image, image, 0.3, jitters=8, max_shift=2, generator=torch.Generator().manual_seed(0))
    jitter = jitter.view(8, 8)
    assert not bool(jitter[:, 5].any())
    assert bool(jitter[:, :2].all()) and int(jitter.sum()) == 16


def test_jitter_policy_on_an_equivariant_network_equals_the_response_policy():
    net = PositionNet(torch.ones(1, 1, 8, 8, dtype=torch.float64))
    masks = jitter_masks(net, ramp(), ramp(), 0.25, jitters=5, max_shift=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(masks, response_masks(net, ramp(), ramp(), 0.25))


def test_convnet_feature_map_is_the_last_block_before_pooling():
    net = get_network("ConvNet", 1, 10, (28, 28), torch.Generator().manual_seed(0))
    x = torch.randn(2, 1, 28, 28)
    fmap = feature_map(net, x)
    assert fmap.shape == (2, 128, 8, 8)
    torch.testing.assert_close(F.avg_pool2d(fmap, 2).flatten(1), net.embed(x))
    with pytest.raises(ValueError, match="feature_map"):
        feature_map(nn.Linear(3, 3), x)


def test_decoded_masks_land_in_their_patches():
    masks = torch.zeros(4, 1, 2, 2)
    masks[1] = 1  # decoded image 1 is patch (0, 1): the top-right quarter of stored image 0
    stored = decoded_to_stored(masks, 2, 8, 8)
    expected = torch.zeros(1, 1, 8, 8)
    expected[..., :4, 4:] = 1
    assert torch.equal(stored, expected)
    assert decoded_to_stored(masks, 1, 4, 4).shape == (4, 1, 4, 4)


# ----------------------------------------------------------------------------- the contrastive term
def eager_term(features, masks, labels, prototypes, tau):
    """The definition in float64: masked average pool, L2 normalisation, prototype logits, mean CE."""
    pooled = (features * masks).sum((2, 3)) / masks.sum((2, 3)).clamp_min(1e-6)
    h = pooled / pooled.norm(dim=1, keepdim=True).clamp_min(1e-12)
    mu = prototypes / prototypes.norm(dim=1, keepdim=True)
    return F.cross_entropy(h @ mu.T / tau, labels)


def test_prototypes_are_class_means_of_pooled_features():
    features = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    labels = torch.tensor([0, 2, 0, 2, 2])
    prototypes, present = class_prototypes(features, labels, 3)
    pooled = features.mean((2, 3))
    torch.testing.assert_close(prototypes[0], pooled[[0, 2]].mean(0))
    torch.testing.assert_close(prototypes[2], pooled[[1, 3, 4]].mean(0))
    assert present.tolist() == [True, False, True] and prototypes[1].abs().sum() == 0


@pytest.mark.parametrize("n, c, side", [(1, 3, 1), (6, 5, 3), (37, 4, 7)])
def test_term_and_gradient_match_the_eager_float64_computation(n, c, side):
    g = torch.Generator().manual_seed(n)
    features = torch.randn(n, c, side, side, dtype=torch.float64, generator=g).requires_grad_(True)
    masks = (torch.rand(n, 1, side, side, generator=g, dtype=torch.float64) < 0.5).double()
    labels = torch.randint(0, 3, (n,), generator=g)
    prototypes = torch.rand(3, c, dtype=torch.float64, generator=g)
    present = torch.ones(3, dtype=torch.bool)
    got = region_contrastive(features, masks, labels, prototypes, present, 0.2)
    want = eager_term(features, masks, labels, prototypes, 0.2)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, features)[0], torch.autograd.grad(want, features)[0])


def test_a_class_without_real_images_is_left_out():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(4, 3, 2, 2, dtype=torch.float64, generator=g)
    masks = torch.ones(4, 1, 2, 2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 2])
    prototypes = torch.rand(3, 3, dtype=torch.float64, generator=g)
    present = torch.tensor([True, False, True])
    got = region_contrastive(features, masks, labels, prototypes, present, 0.5)
    # image 1 (class 1) dropped; classes 0 and 2 renumbered 0 and 1 against their two prototypes
    want = eager_term(features[[0, 2, 3]], masks[[0, 2, 3]], torch.tensor([0, 1, 1]), prototypes[[0, 2]], 0.5)
    torch.testing.assert_close(got, want)
    assert region_contrastive(features[1:2], masks[1:2], labels[1:2], prototypes, present, 0.5) is None


def test_an_all_zero_mask_gives_log_k_and_no_gradient():
    features = torch.randn(2, 4, 3, 3, dtype=torch.float64).requires_grad_(True)
    masks = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
    term = region_contrastive(features, masks, torch.tensor([0, 1]), torch.rand(5, 4, dtype=torch.float64),
                              torch.ones(5, dtype=torch.bool), 0.1)
    assert math.isclose(term.item(), math.log(5), rel_tol=1e-12)
    assert torch.autograd.grad(term, features)[0].abs().max() == 0


# ----------------------------------------------------------------------------- the plug-in
class Counting(UDD):
    """UDD that records which image updates mined regions."""

    def mine(self, ctx, images):
        self.mined_at = [*getattr(self, "mined_at", []), self.updates]
        return super().mine(ctx, images)


def test_regions_are_mined_again_on_schedule(tiny):
    udd = Counting("jitter", 1.0, every=3)
    d = get_distiller("dc")(tiny, 1, torch.Generator().manual_seed(0), model=MODEL, batch_real=4, iterations=7,
                            outer_loop=1, inner_loop=0, plugins=[udd])
    for it in range(7):
        d.step(it)
    assert udd.mined_at == [0, 3, 6] and [u for u, _ in udd.history] == [0, 3, 6]
    assert all(0 < share < 1 for _, share in udd.history)


def test_plugin_term_equals_a_direct_computation(tiny):
    """The term the plug-in adds at a network, and its image gradient, equal region_contrastive built by hand
    from the same masks, the first prototype_images real images of each class and the decoded images."""
    udd = UDD("jitter", 2.5, prototype_images=3)
    d = get_distiller("idc")(tiny, 1, torch.Generator().manual_seed(0), model=MODEL, batch_real=5, factor=2,
                             plugins=[udd], real_precision="float32")
    net = d.new_network()
    d.real_batches()
    term = udd.loss(d.step_context(net, 0))
    real = torch.cat([b[:3] for b in d.last_real_batches])
    prototypes, present = class_prototypes(feature_map(net, real).detach(), torch.arange(3).repeat_interleave(3), 3)
    images, labels = d.training_images()
    want = 2.5 * eager_term(feature_map(net, images), udd.masks, labels, prototypes, udd.tau)
    torch.testing.assert_close(term, want)
    got_grad, = torch.autograd.grad(term, d.images)
    want_grad, = torch.autograd.grad(want, d.images)
    torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.parametrize("method, options", [("dc", dict(outer_loop=2, inner_loop=1)), ("dsa", {}),
                                             ("idc", dict(match_steps=2, factor=2))])
@pytest.mark.parametrize("policy", ["response", "jitter"])
def test_plugin_composes_with_each_gradient_matching_distiller(tmp_path, monkeypatch, tiny, method, options, policy):
    monkeypatch.setenv("FASTDD_CACHE", str(tmp_path / "cache"))
    udd = UDD(policy, 100.0, every=1)
    d = get_distiller(method)(tiny, 2, torch.Generator().manual_seed(1), model=MODEL, batch_real=4, iterations=1,
                              plugins=[udd], **options)
    run_distillation(d, tmp_path / "run", {}, 0, progress=False)
    assert bool(torch.isfinite(d.images).all()) and len(udd.history) >= 1
    for name in (START_PICTURE, LATEST_PICTURE, SHARE_PLOT):
        assert (tmp_path / "run" / name).stat().st_size > 0
    picture = np.asarray(Image.open(tmp_path / "run" / START_PICTURE))
    assert picture.ndim == 3 and bool(((picture[..., 0] == 255) & (picture[..., 1] == 0)).any())  # red outlines


def test_plugin_state_resumes_bit_for_bit(tmp_path, tiny):
    def run(stop_after: int | None):
        udd = UDD("jitter", 50.0, every=2)
        d = get_distiller("dc")(tiny, 1, torch.Generator().manual_seed(3), model=MODEL, batch_real=4, iterations=4,
                                outer_loop=1, inner_loop=0, plugins=[udd])
        if stop_after is not None:
            d.iterations = stop_after
            run_distillation(d, tmp_path / "r", {}, 0, checkpoint_every=1, progress=False)
            return None
        return d

    run(2)
    resumed = run(None)
    run_distillation(resumed, tmp_path / "r", {}, 0, resume=True, progress=False)
    whole = run(None)
    run_distillation(whole, tmp_path / "w", {}, 0, progress=False)
    assert torch.equal(resumed.images, whole.images)
    assert resumed.plugins[0].history == whole.plugins[0].history


@pytest.mark.parametrize("policy", POLICIES)
def test_plugin_leaves_the_runs_draws_alone(tmp_path, monkeypatch, tiny, policy):
    """With the plug-in the method draws what it draws without it (networks, real batches): the plug-in's
    randomness is a stream of its own, so a run with it pairs with the run of the same seed without it."""
    monkeypatch.setenv("FASTDD_CACHE", str(tmp_path))

    def generator_states(plugins: list) -> list[torch.Tensor]:
        d = get_distiller("idc")(tiny, 1, torch.Generator().manual_seed(4), model=MODEL, batch_real=4, factor=2,
                                 match_steps=2, iterations=2, plugins=plugins)
        states = []
        for it in range(2):
            d.step(it)
            states.append(d.generator.get_state())
        return states

    udd = UDD(policy, 100.0, every=1)
    with_udd = generator_states([udd])
    assert len(udd.history) >= 2
    assert all(torch.equal(a, b) for a, b in zip(generator_states([]), with_udd))


def test_proxy_is_trained_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDD_CACHE", str(tmp_path))
    train = make_dataset(per_class=20)
    first = proxy_network(train, MODEL, 7)
    files = list((tmp_path / "udd-proxies").glob("*.pt"))
    assert len(files) == 1
    again = proxy_network(train, MODEL, 7)
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    proxy_network(train, MODEL, 8)  # another seed, another proxy
    assert len(list((tmp_path / "udd-proxies").glob("*.pt"))) == 2


def test_defaults_and_bad_arguments():
    assert default_beta("idc") == method_spec("idc").plugin_weights["udd"] and AUTO_POLICY in POLICIES
    for call, match in [(lambda: UDD("pixel", 1.0), "policy"), (lambda: UDD("jitter", -1.0), "beta"),
                        (lambda: UDD("jitter", 1.0, tau=0.0), "tau"), (lambda: UDD("jitter", 1.0, quantile=1.0),
                                                                        "quantile"),
                        (lambda: UDD("jitter", 1.0, every=0), "every"), (lambda: default_beta("dm"), "method"),
                        (lambda: underutilized(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 1, 1), 0), "quantile"),
                        (lambda: underutilized(torch.ones(1, 1, 2, 2), torch.ones(0, 1, 1, 1), 0.5), "reference")]:
        with pytest.raises(ValueError, match=match):
            call()


def test_plugin_refuses_a_method_it_does_not_apply_to_when_the_distiller_is_built(tiny):
    with pytest.raises(ValueError, match="--plugin udd applies to --method dc, dsa, idc, not dm"):
        get_distiller("dm")(tiny, 1, torch.Generator(), model=MODEL, plugins=[UDD("jitter", 1.0)])


BETA_DC = method_spec("dc").plugin_weights["udd"]
DISTILL = ["distill", "--dataset", "digits", "--ipc", "1", "--iterations", "1", "--model", MODEL,
           "--eval-models", "0", "--quiet", "--batch-real", "8"]


def test_distill_with_udd_records_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main([*DISTILL, "--method", "dc", "--plugin", "udd", "--udd-policy", "jitter", "--udd-every", "1",
                 "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["plugins"] == ["udd"] and config["udd_policy"] == "jitter" and config["udd_beta"] == BETA_DC
    assert (out / START_PICTURE).exists()


@pytest.mark.parametrize("extra, match", [
    (["--method", "dc", "--udd-beta", "1"], "--udd-beta is an option of --plugin udd"),
    (["--method", "dm", "--plugin", "udd"], "--plugin udd applies to"),
    (["--method", "dc", "--plugin", "udd", "--udd-quantile", "2"], "quantile"),
])
def test_distill_bad_udd_arguments(tmp_path, capsys, extra, match):
    assert main([*DISTILL, *extra, "--out", str(tmp_path / "run")]) == 1
    assert match in capsys.readouterr().err
