"""IDC: multi-formation decoding and 'mix' initialisation on known inputs, the image gradient of a
matching step against a per-class implementation written here, resumable runs, decoding in the
evaluation, the command line."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import make_dataset
from fastdd import evaluation as evaluate
from fastdd.cli import main
from fastdd.evaluation import EvalConfig, evaluate_with_baseline, training_data
from fastdd.methods import DC, IDC, get_distiller
from fastdd.methods.multiformation import decode, mix_images, mix_init
from fastdd.synset import SyntheticSet

MODEL = "ConvNetW32"


def quadrants(values: list[list[float]], side: int = 8) -> torch.Tensor:
    """[len(values), 1, side, side]: image n's quadrants (row-major) hold the constants values[n]."""
    x = torch.empty(len(values), 1, side, side)
    half = side // 2
    for n, (a, b, c, d) in enumerate(values):
        x[n, 0, :half, :half], x[n, 0, :half, half:] = a, b
        x[n, 0, half:, :half], x[n, 0, half:, half:] = c, d
    return x


# ----------------------------------------------------------------------------- decode
def test_decode_quadrants_give_constant_images_in_order():
    images = quadrants([[1, 2, 3, 4], [5, 6, 7, 8]])
    decoded, labels = decode(images, torch.tensor([0, 1]), 2)
    assert decoded.shape == (8, 1, 8, 8)
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    for k in range(8):
        torch.testing.assert_close(decoded[k], torch.full((1, 8, 8), float(k + 1)))


def test_decode_uneven_side_and_several_channels():
    images = torch.zeros(1, 3, 5, 7)
    images[:, :, 2:, :] = 1.0  # factor 2 splits the rows as [0, 2), [2, 5) and the columns as [0, 3), [3, 7)
    images[:, 1] *= 2
    decoded, labels = decode(images, torch.tensor([4]), 2)
    assert decoded.shape == (4, 3, 5, 7) and labels.tolist() == [4] * 4
    torch.testing.assert_close(decoded[:2], torch.zeros(2, 3, 5, 7))
    torch.testing.assert_close(decoded[2:, 1], torch.full((2, 5, 7), 2.0))
    decoded, _ = decode(images, torch.tensor([4]), 3)
    assert decoded.shape == (9, 3, 5, 7)


def test_decode_factor_one_is_the_identity():
    images, labels = torch.randn(3, 2, 6, 6), torch.tensor([0, 0, 1])
    out_images, out_labels = decode(images, labels, 1)
    assert out_images is images and out_labels is labels


def test_decode_is_differentiable():
    images = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1])
    assert torch.autograd.gradcheck(lambda x: decode(x, labels, 2)[0], (images,))
    decode(images, labels, 2)[0].sum().backward()
    assert (images.grad > 0).all()


@pytest.mark.parametrize("images, labels, factor, match", [
    (torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), 0, "factor"),
    (torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), True, "factor"),
    (torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), 5, "factor"),
    (torch.zeros(1, 4, 4), torch.zeros(1, dtype=torch.long), 2, "images"),
    (torch.zeros(2, 1, 4, 4), torch.zeros(3, dtype=torch.long), 2, "labels"),
])
def test_decode_bad_arguments(images, labels, factor, match):
    with pytest.raises(ValueError, match=match):
        decode(images, labels, factor)


# ----------------------------------------------------------------------------- mix initialisation
def test_mix_images_places_shrunken_images_row_major():
    real = torch.arange(1.0, 9.0).view(8, 1, 1, 1).expand(8, 1, 8, 8)
    mixed = mix_images(real, 2)
    torch.testing.assert_close(mixed, quadrants([[1, 2, 3, 4], [5, 6, 7, 8]]))
    torch.testing.assert_close(decode(mixed, torch.tensor([0, 0]), 2)[0], real)
    with pytest.raises(ValueError, match="multiple of factor"):
        mix_images(real[:7], 2)


def test_mix_init_patches_are_shrunken_real_images_of_the_class():
    data = make_dataset()
    images = mix_init(data, 2, 2, torch.Generator().manual_seed(0))
    assert images.shape == (6, 1, 8, 8)
    torch.testing.assert_close(mix_init(data, 2, 2, torch.Generator().manual_seed(0)), images, rtol=0, atol=0)
    for i in range(6):
        pool = F.interpolate(data.get(data.class_indices[i // 2]), size=(4, 4), mode="nearest")
        seen = []
        for top in (0, 4):
            for left in (0, 4):
                patch = images[i, :, top : top + 4, left : left + 4]
                matches = [j for j in range(len(pool)) if torch.equal(pool[j], patch)]
                assert matches
                seen.append(matches[0])
        assert len(set(seen)) == 4


def test_mix_init_reuses_images_of_a_small_class():
    data = make_dataset(per_class=3)
    assert mix_init(data, 2, 2, torch.Generator().manual_seed(0)).shape == (6, 1, 8, 8)


# ----------------------------------------------------------------------------- the distiller
def make_idc(data, ipc=2, **kwargs):
    args = {"model": MODEL, "batch_real": 5, "match_steps": 2, "net_images": 8, "real_precision": "float32", **kwargs}
    return IDC(data, ipc, torch.Generator().manual_seed(1), **args)


def reference_decode(stored: torch.Tensor, factor: int) -> torch.Tensor:
    """Every patch of every stored image, upsampled to the image size, one at a time."""
    side = stored.shape[-1]
    s = side // factor
    return torch.cat([
        F.interpolate(img[None, :, i * s : (i + 1) * s, j * s : (j + 1) * s], size=(side, side), mode="bilinear")
        for img in stored for i in range(factor) for j in range(factor)
    ])


@pytest.mark.parametrize("channels, metric", [(1, "l1"), (3, "mse")])
def test_image_gradient_matches_per_class_loop(channels, metric):
    data = make_dataset(channels=channels, name="tiny" if channels == 1 else "cifar10")
    d = make_idc(data)
    assert d.metric == metric and d.factor == 2 and d.init == "mix" and d.batch_real == 5
    net = d.new_network()
    real = d.real_batches()
    syn = d.synthetic_batches()
    params = d.augmentation_params()
    (got,) = torch.autograd.grad(d.matching_loss(net, real, syn, params), d.images)

    stored = d.images.detach().clone().requires_grad_(True)
    convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3
    loss = 0.0
    for c in range(d.num_classes):
        x_real, x_syn = real[c], reference_decode(stored[c * d.ipc : (c + 1) * d.ipc], 2)
        for aug, p in zip(d.match_augments, params):
            x_real = aug.apply(x_real, p, torch.full((len(x_real),), c))
            x_syn = aug.apply(x_syn, p, torch.full((len(x_syn),), c))
        g_real = torch.autograd.grad(F.cross_entropy(net(x_real), torch.full((len(x_real),), c)), convs)
        g_syn = torch.autograd.grad(F.cross_entropy(net(x_syn), torch.full((len(x_syn),), c)), convs,
                                    create_graph=True)
        for s, r in zip(g_syn, g_real):
            diff = s - r.detach()
            loss = loss + (diff.pow(2).sum() if metric == "mse" else diff.abs().sum())
    (want,) = torch.autograd.grad(loss, stored)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)  # fused real pass
    assert got.abs().sum() > 0


def test_synthetic_batches_subsample_decoded_images():
    d = make_idc(make_dataset(), batch_syn=3)
    decoded, _ = decode(d.images.detach(), d.labels, 2)
    for c, batch in enumerate(d.synthetic_batches()):
        assert batch.shape == (3, 1, 8, 8)
        pool = decoded[c * 8 : (c + 1) * 8]
        assert all(any(torch.equal(x, y) for y in pool) for x in batch.detach())


def test_defaults_follow_the_original():
    data = make_dataset()
    d = IDC(data, 2, torch.Generator().manual_seed(0))
    assert (d.iterations, d.match_steps, d.batch_real, d.batch_syn, d.net_images) == (2000, 100, 64, 128, 500)
    assert d.lr_img == pytest.approx(1e-4 * 2 / 10 / 0.25**2)
    assert IDC(make_dataset(channels=3, name="cifar10"), 1, torch.Generator()).net_images == 2000
    assert get_distiller("idc") is IDC
    assert [a.strategy for a in IDC(make_dataset(name="mnist"), 1, torch.Generator()).match_augments] == [
        "color", "crop"]
    assert [a.strategy for a in d.match_augments] == ["color", "crop", "cutout"]


def test_short_run_is_finite_and_resumable():
    data = make_dataset()
    full = make_idc(data, iterations=2)
    before = full.images.detach().clone()
    full.step(0)
    state = copy.deepcopy(full.state_dict())  # the optimizer's state holds live momentum buffers
    metrics = full.step(1)
    assert torch.isfinite(full.images).all() and metrics["loss"] > 0
    assert not torch.equal(full.images, before)

    resumed = make_idc(data, iterations=2)
    resumed.load_state_dict(state)
    assert resumed.step(1) == metrics
    torch.testing.assert_close(resumed.images, full.images, rtol=0, atol=0)

    synset = full.synthetic_set(seed=1)
    assert synset.images.shape == (6, 1, 8, 8) and synset.meta["factor"] == 2
    assert synset.meta["method"] == "idc" and synset.meta["hparams"]["metric"] == "l1"


def test_images_are_clamped_to_the_pixel_range_each_iteration():
    d = make_idc(make_dataset(), match_steps=1, lr_img=1e-9)
    with torch.no_grad():
        d.images.fill_(100.0)
    d.step(0)
    assert float(d.images.detach().max()) == pytest.approx((1 - 0.5) / 0.25)


@pytest.mark.parametrize("kwargs, match", [
    ({"factor": 0}, "factor"),
    ({"factor": 9}, "factor"),
    ({"metric": "cos"}, "metric"),
    ({"match_steps": 0}, "match_steps"),
    ({"net_images": -1}, "net_images"),
    ({"batch_syn": 0}, "batch_syn"),
    ({"lr_net": 0.0}, "lr_net"),
    ({"init": "zeros"}, "init"),
    ({"batch_real": 0}, "batch_real"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IDC(make_dataset(), 1, torch.Generator(), **kwargs)


def test_mix_init_is_idc_only():
    with pytest.raises(ValueError, match="init"):
        DC(make_dataset(), 1, torch.Generator(), init="mix")


# ----------------------------------------------------------------------------- evaluation and CLI
def test_evaluation_trains_on_decoded_images(monkeypatch):
    data = make_dataset()
    stored = quadrants([[1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 0, 0]])
    synset = SyntheticSet(stored, torch.tensor([0, 1, 2]), {"ipc": 1, "factor": 2})
    images, labels = training_data(synset)
    assert images.shape == (12, 1, 8, 8) and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    old = SyntheticSet(stored, torch.tensor([0, 1, 2]), {"ipc": 1})
    assert training_data(old)[0] is old.images

    seen = []

    def fake_evaluate(images, labels, *args, **kwargs):
        seen.append((tuple(images.shape), labels.tolist()))
        return evaluate.EvalReport.from_accuracies([0.5], EvalConfig(), 0.0)

    monkeypatch.setattr(evaluate, "evaluate_synset", fake_evaluate)
    report = evaluate_with_baseline(synset, data, data, EvalConfig(), 1, 0, baseline=True, progress=False)
    assert seen[0] == ((12, 1, 8, 8), labels.tolist())
    assert seen[1][0] == (3, 1, 8, 8)  # the random-real baseline: IPC real images per class
    assert report["gain"] == 0.0


def test_cli_distills_and_evaluates_with_idc(tmp_path, monkeypatch):
    monkeypatch.setitem(IDC.__init__.__kwdefaults__, "match_steps", 1)
    monkeypatch.setitem(IDC.__init__.__kwdefaults__, "net_images", 16)
    out = tmp_path / "run"
    args = ["distill", "--dataset", "digits", "--method", "idc", "--ipc", "1", "--iterations", "1",
            "--batch-real", "8", "--model", MODEL, "--eval-model", MODEL, "--eval-models", "1",
            "--eval-epochs", "1", "--no-baseline", "--quiet", "--out", str(out)]
    assert main(args) == 0
    synset = SyntheticSet.load(out / "synset.safetensors")
    assert synset.images.shape == (10, 1, 8, 8) and synset.meta["factor"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["init"] == "mix" and config["batch_real"] == 8
    report = json.loads((out / "report.json").read_text())
    assert report["distilled"]["config"]["augment"] == "dsa"
    assert main(["evaluate", str(out), "--models", "1", "--eval-epochs", "1", "--eval-model", MODEL,
                 "--no-baseline", "--quiet", "--overwrite"]) == 0
