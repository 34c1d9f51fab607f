"""SDC: GraDN against torch.func vmap(grad) norms; the plug-in's term and its image gradient against a
per-sample autograd loop; the plug-in inside DC, DSA, DM and IDC; the scoring networks; the
``fastdd difficulty`` and ``fastdd distill --plugin sdc`` commands; bad arguments."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector

from conftest import make_dataset
from fastdd.cli import main
from fastdd.difficulty import SCORE_EPOCH, scoring_networks
from fastdd.methods import Plugin, get_distiller
from fastdd.methods.multiformation import decode
from fastdd.models import get_network
from fastdd.ops import naive
from fastdd.plugins.sdc import SDC, default_lambda, gradn
from fastdd.registry import method_spec
from fastdd.synset import SyntheticSet
from fastdd.trajectories.experts import train_experts
from fastdd.trajectories.files import Trajectory, expert_path

MODEL = "ConvNetW32"
F64 = dict(dtype=torch.float64)


def networks(count: int, classes: int = 3, seed: int = 0) -> list[torch.nn.Module]:
    g = torch.Generator().manual_seed(seed)
    return [get_network(MODEL, 1, classes, (8, 8), g) for _ in range(count)]


def batch(n: int, classes: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, **F64), torch.randint(0, classes, (n,), generator=g)


# ----------------------------------------------------------------------------- GraDN
def test_gradn_is_the_mean_of_vmap_grad_norms_over_networks():
    models = [net.double() for net in networks(2)]
    x, y = batch(5)
    want = torch.stack([naive.per_sample_grad_norm(m, x, y) for m in models]).mean(0)
    torch.testing.assert_close(gradn(models, x, y, chunk_size=2), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gradn(models[0], x, y), naive.per_sample_grad_norm(models[0], x, y),
                               rtol=1e-10, atol=1e-10)


def test_gradn_counts_frozen_parameters_and_restores_their_flags():
    net = networks(1)[0].double()
    x, y = batch(3)
    want = gradn(net, x, y)
    net.requires_grad_(False)  # as DM freezes its networks
    torch.testing.assert_close(gradn(net, x, y), want, rtol=0, atol=0)
    assert not any(p.requires_grad for p in net.parameters())


# ----------------------------------------------------------------------------- the plug-in's term
def loop_term(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """lam * mean per-sample gradient norm, one autograd.grad with create_graph per sample."""
    params = list(net.parameters())
    norms = []
    for xi, yi in zip(x, y):
        grads = torch.autograd.grad(F.cross_entropy(net(xi[None]), yi[None]), params, create_graph=True)
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    return lam * torch.stack(norms).mean()


@pytest.mark.parametrize("method", ["dc", "idc"])
def test_term_and_its_image_gradient_match_a_per_sample_loop(tiny, method):
    d = get_distiller(method)(tiny, 1, torch.Generator().manual_seed(0), model=MODEL, batch_real=4)
    d.images = d.images.detach().double().requires_grad_(True)  # float64 for tight comparisons
    net = d.new_network().double()
    term = SDC(0.7).loss(d.step_context(net, 0))
    (grad,) = torch.autograd.grad(term, d.images)

    images = d.images.detach().clone().requires_grad_(True)
    x, y = decode(images, d.labels, d.factor) if method == "idc" else (images, d.labels)  # IDC: decoded images
    assert len(x) == (12 if method == "idc" else 3)
    want = loop_term(net, x, y, 0.7)
    (want_grad,) = torch.autograd.grad(want, images)
    torch.testing.assert_close(term, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-8, atol=1e-12)
    assert grad.abs().sum() > 0


def test_term_with_functional_parameters_as_for_mtt_students():
    net = networks(1)[0].double()
    x, y = batch(4)
    reference = copy.deepcopy(net)
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(1.5)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    net.requires_grad_(False)  # MTT's student module holds no trainable parameters of its own
    sdc = SDC(2.0)
    got = sdc.term(net, x, y, {k: 1.5 * v for k, v in params.items()})
    want = sdc.term(reference, x, y)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(got, params["classifier.weight"])
    (want_grad,) = torch.autograd.grad(want, reference.classifier.weight)
    torch.testing.assert_close(grad, 1.5 * want_grad)  # d/dw term(1.5 w) = 1.5 term'(1.5 w)
    assert not any(p.requires_grad for p in net.parameters())


def test_lambda_zero_adds_nothing(tiny):
    d = get_distiller("dc")(tiny, 1, torch.Generator(), model=MODEL)
    assert SDC(0.0).loss(d.step_context(d.new_network(), 0)) is None


# ----------------------------------------------------------------------------- inside the distillers
class Record(Plugin):
    """Keeps the network the method used at its last image update."""

    name = "record"

    def loss(self, ctx):
        self.net = ctx.network
        return None


# One outer iteration whose network does not change after the image update (no training after the last
# matching step; DM's network is frozen), so the term can be evaluated at that network afterwards.
ONE_STEP = {"dc": dict(outer_loop=1, inner_loop=0, lr_img=0.01), "dsa": dict(outer_loop=1, inner_loop=0, lr_img=0.01),
            "dm": dict(lr_img=0.01), "idc": dict(match_steps=1, lr_img=0.01)}


@pytest.mark.parametrize("method", ["dc", "dsa", "dm", "idc"])
def test_plugin_lowers_the_synthetic_gradn_in_every_distiller(tiny, method):
    """One image update with a large lambda against the same update without SDC (same seed, same network):
    the images end finite and with a lower mean GraDN at that network."""
    after = {}
    for lam in (0.0, 50.0):
        record = Record()
        d = get_distiller(method)(tiny, 2, torch.Generator().manual_seed(4), model=MODEL, batch_real=4, iterations=1,
                                  plugins=[SDC(lam), record], **ONE_STEP[method])
        metrics = d.step(0)
        assert np.isfinite(metrics["loss"]) and bool(torch.isfinite(d.images).all())
        term = gradn(record.net, *d.training_images()).mean().item()
        after[lam] = (term, parameters_to_vector(record.net.parameters()))
    assert torch.equal(after[0.0][1], after[50.0][1])  # SDC draws nothing from the generator
    assert after[50.0][0] < after[0.0][0]


# ----------------------------------------------------------------------------- scoring networks
def test_scoring_networks_from_experts_are_their_early_rows(tmp_path, tiny):
    train_experts(tiny, tmp_path, num_experts=2, epochs=SCORE_EPOCH, model=MODEL, seed=0, progress=False)
    nets, about = scoring_networks(tiny, 2, torch.Generator(), experts=tmp_path)
    for i, net in enumerate(nets):
        want = Trajectory.load(expert_path(tmp_path, i)).params[SCORE_EPOCH]
        torch.testing.assert_close(parameters_to_vector(net.parameters()), want, rtol=0, atol=0)
    assert about["model"] == MODEL and about["epoch"] == SCORE_EPOCH and about["count"] == 2
    with pytest.raises(ValueError, match="holds 2 experts"):
        scoring_networks(tiny, 3, torch.Generator(), experts=tmp_path)
    with pytest.raises(ValueError, match=rf"model '{MODEL}' \(this run: 'ConvNet'\)"):
        scoring_networks(tiny, 1, torch.Generator(), model="ConvNet", experts=tmp_path)
    with pytest.raises(ValueError, match=r"another set-up: .*num_classes 3 \(this run: 4\)"):
        scoring_networks(make_dataset(num_classes=4), 1, torch.Generator(), experts=tmp_path)
    with pytest.raises(FileNotFoundError, match="fastdd experts"):
        scoring_networks(tiny, 1, torch.Generator(), experts=tmp_path / "none")


def test_trained_scoring_networks_come_from_the_generator(tiny):
    a, about = scoring_networks(tiny, 2, torch.Generator().manual_seed(5), model=MODEL)
    b, _ = scoring_networks(tiny, 2, torch.Generator().manual_seed(5), model=MODEL)
    assert about["model"] == MODEL and "trained" in about["source"]
    for na, nb in zip(a, b):
        assert torch.equal(parameters_to_vector(na.parameters()), parameters_to_vector(nb.parameters()))
    assert not torch.equal(parameters_to_vector(a[0].parameters()), parameters_to_vector(a[1].parameters()))
    with pytest.raises(ValueError, match="mixes"):
        scoring_networks(tiny, 1, torch.Generator(), model="ConvNetBN")


# ----------------------------------------------------------------------------- commands
def digits_synset(path, factor: int = 1) -> None:
    meta = {"dataset": "digits", "mean": [0.3], "std": [0.4], "ipc": 1, "factor": factor}
    g = torch.Generator().manual_seed(0)
    SyntheticSet(torch.randn(10, 1, 8, 8, generator=g), torch.arange(10), meta).save(path)


DIFFICULTY = ["difficulty", "--dataset", "digits", "--networks", "1", "--model", MODEL, "--quiet"]


def test_difficulty_command_writes_scores_summary_and_histogram(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    digits_synset(tmp_path / "set.safetensors", factor=2)
    out = tmp_path / "difficulty"
    assert main([*DIFFICULTY, "--synset", str(tmp_path / "set.safetensors"), "--out", str(out)]) == 0
    assert "GraDN synthetic" in capsys.readouterr().out
    scores = np.load(out / "difficulty.npz")
    assert scores["synthetic_scores"].shape == (40,)  # IDC-style set: 10 stored images, 4 decoded each
    assert scores["real_scores"].shape == scores["real_labels"].shape and len(scores["real_scores"]) > 1000
    assert (scores["real_scores"] > 0).all() and np.isfinite(scores["real_scores"]).all()
    summary = json.loads((out / "difficulty.json").read_text())
    assert summary["networks"]["count"] == 1 and summary["dataset"] == "digits"
    assert summary["real"]["count"] == len(scores["real_scores"]) and len(summary["real"]["class_means"]) == 10
    q = summary["synthetic"]["quantiles"]
    assert q["0"] <= q["0.5"] <= q["1"]
    assert summary["synthetic"]["mean"] == pytest.approx(float(scores["synthetic_scores"].mean()), rel=1e-5)
    assert (out / "difficulty.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_difficulty_without_matplotlib_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if it were not installed
    assert main([*DIFFICULTY, "--out", str(tmp_path / "out")]) == 1
    assert "pip install 'fastdd[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, match", [
    (["--networks", "0"], "--networks"),
    (["--synset", "OTHER"], "distilled from 'cifar10'"),
    (["--experts", "NONE"], "no expert trajectories"),
])
def test_difficulty_bad_arguments(tmp_path, capsys, extra, match):
    pytest.importorskip("matplotlib")
    other = tmp_path / "other.safetensors"
    SyntheticSet(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.int64), {"dataset": "cifar10"}).save(other)
    extra = [str(other) if a == "OTHER" else str(tmp_path / "none") if a == "NONE" else a for a in extra]
    assert main([*DIFFICULTY, *extra, "--out", str(tmp_path / "out")]) == 1
    assert match in capsys.readouterr().err


DISTILL = ["distill", "--dataset", "digits", "--method", "dc", "--ipc", "1", "--iterations", "1", "--model", MODEL,
           "--eval-models", "0", "--quiet"]


def test_distill_with_sdc_records_it_and_resume_checks_lambda(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*DISTILL, "--batch-real", "8", "--plugin", "sdc", "--out", str(out)]
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    lambda0 = method_spec("dc").plugin_weights["sdc"]
    assert config["plugins"] == ["sdc"] and config["sdc_lambda"] == default_lambda(1, "dc") == lambda0
    synset = SyntheticSet.load(out / "synset.safetensors")
    assert synset.meta["plugins"] == ["sdc"] and synset.meta["hparams"]["sdc.lambda"] == lambda0
    assert main([*args, "--resume"]) == 0
    assert main([*args, "--resume", "--sdc-lambda", "0.5"]) == 1
    assert "sdc_lambda" in capsys.readouterr().err


@pytest.mark.parametrize("extra, match", [
    (["--sdc-lambda", "0.1"], "--sdc-lambda is an option of --plugin sdc"),
    (["--plugin", "sdc", "--sdc-lambda", "-1"], "--sdc-lambda"),
    (["--plugin", "sdc", "--plugin", "sdc"], "once"),
    (["--plugin", "udd", "--method", "mtt", "--experts", "NONE"], "--plugin udd applies to"),
])
def test_distill_bad_plugin_arguments(tmp_path, capsys, extra, match):
    extra = [str(tmp_path) if a == "NONE" else a for a in extra]
    assert main([*DISTILL, *extra, "--out", str(tmp_path / "run")]) == 1
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("call, match", [
    (lambda: SDC(-1.0), "lam"),
    (lambda: SDC(float("nan")), "lam"),
    (lambda: SDC(True), "lam"),
    (lambda: default_lambda(0, "dc"), "ipc"),
    (lambda: default_lambda(1, "kip"), "method"),
    (lambda: gradn([], *batch(2)), "models"),
    (lambda: scoring_networks(make_dataset(), 0, torch.Generator()), "--networks"),
])
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()
