"""DCC and DSAC (fastdd.methods.dcc): the contrastive loss and its image gradient against a straightforward
computation written here (float64), the warm-up schedule, runs on digits, torchrun with two processes against one,
bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_dataset, run_on_two_processes
from fastdd.data import load_dataset
from fastdd.evaluation import default_eval_config
from fastdd.methods import DC, DCC, get_distiller
from fastdd.methods.dcc import WARMUP_STEPS
from fastdd.plugins.sdc import default_lambda
from fastdd.registry import method_spec
from fastdd.runtime.memory import activation_bytes

MODEL = "ConvNetW32"
DSA, DSAC = get_distiller("dsa"), get_distiller("dsac")  # DC and DCC with augment="dsa"
F64_EXACT = dict(rtol=1e-9, atol=1e-12)


def distance(g_syn, g_real, metric):
    """``ours``: per output row of each tensor of more than one dimension, 1 - cosine (eps 1e-6 on the product of the
    norms); ``mse``: the sum of squared differences."""
    total = 0.0
    for s, r in zip(g_syn, g_real):
        if metric == "mse":
            total = total + ((s - r) ** 2).sum()
        elif s.dim() > 1:
            s, r = s.reshape(len(s), -1), r.reshape(len(r), -1)
            total = total + (1 - (s * r).sum(-1) / (s.norm(dim=-1) * r.norm(dim=-1) + 1e-6)).sum()
    return total


def reference_loss(net, images, ipc, real, metric, augment):
    """The DCC distance and its gradient w.r.t. ``images``: the mean over classes of each class's real gradient, the
    gradient of the mean cross-entropy of every synthetic image, then their distance."""
    params = list(net.parameters())
    per_class = [torch.autograd.grad(F.cross_entropy(net(augment(x, c)), torch.full((len(x),), c)), params)
                 for c, x in enumerate(real)]
    g_real = [sum(grads) / len(real) for grads in zip(*per_class)]
    images = images.detach().clone().requires_grad_(True)
    x_syn = torch.cat([augment(images[c * ipc:(c + 1) * ipc], c) for c in range(len(real))])
    labels = torch.arange(len(real)).repeat_interleave(ipc)
    g_syn = torch.autograd.grad(F.cross_entropy(net(x_syn), labels), params, create_graph=True)
    loss = distance(g_syn, g_real, metric)
    (grad,) = torch.autograd.grad(loss, images)
    return loss.detach(), grad


def float64_case(cls, data, ipc, metric, model=MODEL):
    """A distiller whose images, network and real batches are float64, with its augmentation draw."""
    d = cls(data, ipc, torch.Generator().manual_seed(1), model=model, batch_real=5, metric=metric,
            real_precision="float32")
    d.images = d.images.detach().double().requires_grad_(True)
    net = d.new_network()
    if model == "ConvNetBN":
        d._set_batchnorm_statistics(net)
    net.double()
    real = [batch.double() for batch in d.real_batches()]
    return d, net, real, d.augmentation_params()


@pytest.mark.parametrize("metric", ["ours", "mse"])
@pytest.mark.parametrize("ipc", [1, 3])
@pytest.mark.parametrize("cls", [DCC, DSAC])
def test_contrastive_loss_and_image_gradient_equal_the_straightforward_computation(cls, ipc, metric):
    data = make_dataset(channels=3, size=8, name="cifar10")
    d, net, real, params = float64_case(cls, data, ipc, metric)

    def augment(x, c):
        return x if params is None else d.dsa.apply(x, params, torch.full((len(x),), c))

    got = d.contrastive_loss(net, real, params)
    (got_grad,) = torch.autograd.grad(got, d.images)
    want, want_grad = reference_loss(net, d.images, ipc, real, metric, augment)
    torch.testing.assert_close(got.detach(), want, **F64_EXACT)
    torch.testing.assert_close(got_grad, want_grad, **F64_EXACT)
    assert got_grad.abs().sum() > 0


def test_contrastive_loss_with_batchnorm_frozen_on_a_real_batch(tiny):
    """DC's frozen BatchNorm makes the pass over every class's images per sample."""
    d, net, real, _ = float64_case(DCC, tiny, 2, "ours", model="ConvNetBN")
    got = d.contrastive_loss(net, real)
    want, want_grad = reference_loss(net, d.images, 2, real, "ours", lambda x, c: x)
    torch.testing.assert_close(got.detach(), want, **F64_EXACT)
    torch.testing.assert_close(torch.autograd.grad(got, d.images)[0], want_grad, **F64_EXACT)


def test_warmup_schedule(tiny):
    d = DCC(tiny, 1, torch.Generator().manual_seed(0), iterations=8)  # warm-up: iterations 0 and 1
    assert [d.contrastive(i, 0) for i in range(4)] == [False, False, True, True]
    assert [d.contrastive(1, s) for s in (0, WARMUP_STEPS - 1, WARMUP_STEPS, 30)] == [False, False, True, True]
    started = DCC(tiny, 1, torch.Generator().manual_seed(0), iterations=8, warmup=0.0)
    assert started.contrastive(0, 0)
    assert DCC(tiny, 1, torch.Generator().manual_seed(0), iterations=1000).contrastive(249, 9) is False
    assert DCC(tiny, 1, torch.Generator().manual_seed(0), iterations=1000).contrastive(250, 0) is True


def test_step_takes_the_contrastive_loss_past_the_warmup(tiny):
    d = DCC(tiny, 1, torch.Generator().manual_seed(0), model=MODEL, batch_real=4, iterations=4, warmup=0.5,
            outer_loop=WARMUP_STEPS + 2, inner_loop=0)
    taken = []
    for name in ("matching_loss", "contrastive_loss"):
        def spy(*args, loss=getattr(d, name), name=name):
            taken.append(name)
            return loss(*args)
        setattr(d, name, spy)
    d.step(1)
    assert taken == ["matching_loss"] * WARMUP_STEPS + ["contrastive_loss"] * 2
    taken.clear()
    d.step(2)
    assert taken == ["contrastive_loss"] * (WARMUP_STEPS + 2)


@pytest.mark.parametrize("cls, plain", [(DCC, DC), (DSAC, DSA)])
def test_warmup_steps_are_dcs(tiny, cls, plain):
    """During the warm-up a step is DC's (DSA's) bit for bit; past it the images go elsewhere."""
    def run(kind, iteration, **options):
        d = kind(tiny, 2, torch.Generator().manual_seed(3), model=MODEL, batch_real=4, outer_loop=2, inner_loop=1,
                 iterations=4, **options)
        metrics = d.step(iteration)
        return metrics["loss"], d.images.detach()

    loss, images = run(cls, 1, warmup=0.5)  # warm-up: iterations 0 and 1
    want_loss, want_images = run(plain, 1)
    assert loss == want_loss and torch.equal(images, want_images)
    _, contrastive = run(cls, 2, warmup=0.5)
    _, dc = run(plain, 2)
    assert not torch.equal(contrastive, dc)


@pytest.mark.parametrize("method", ["dcc", "dsac"])
def test_digits_run_is_reproducible_and_finite(method):
    train, _ = load_dataset("digits")

    def run():
        d = get_distiller(method)(train, 2, torch.Generator().manual_seed(5), model=MODEL, batch_real=16,
                                  iterations=3, warmup=0.34, inner_loop=2)  # iteration 0 warm-up, 1 and 2 not
        before = d.images.detach().clone()
        losses = [d.step(i)["loss"] for i in range(3)]
        return before, d.images.detach().clone(), losses

    before, after, losses = run()
    assert all(math.isfinite(loss) for loss in losses) and torch.isfinite(after).all()
    assert not torch.equal(before, after)
    _, again, losses_again = run()
    assert torch.equal(after, again) and losses == losses_again


def test_registered_with_protocols_lambda_and_memory_plan(tiny):
    assert get_distiller("dcc") is DCC
    assert (method_spec("dsac").distiller, method_spec("dsac").arguments) == (DCC, {"augment": "dsa"})
    assert (default_eval_config("dcc").augment, default_eval_config("dcc").epochs) == ("none", 300)
    assert (default_eval_config("dsac").augment, default_eval_config("dsac").epochs) == ("dsa", 1000)
    assert default_lambda(1, "dcc") == default_lambda(1, "dsac") == 3.0  # a tenth of the pull (bench/sdc_pull.py)
    d = DSAC(tiny, 3, torch.Generator().manual_seed(0), model=MODEL, batch_real=4, outer_loop=1)
    assert d.name == "dsac" and d.dsa is not None
    (term,) = method_spec("dsac").memory_terms(d, activation_bytes(MODEL, 1, 3, (8, 8)))
    assert term.what.startswith("contrastive matching step") and term.bytes > 0
    assert d.hparams()["warmup"] == 0.25


@pytest.mark.parametrize("warmup", [1.0, -0.1, float("nan"), "0.5"])
def test_bad_warmup_is_named(tiny, warmup):
    with pytest.raises(ValueError, match=r"^warmup must be a number in \[0, 1\), got"):
        DCC(tiny, 1, torch.Generator(), warmup=warmup)


def test_two_processes_equal_one(tmp_path):
    """Two iterations (the first in the warm-up) of two matching steps with network training between them, DCC with
    the SDC plug-in and DSAC, under torchrun with two processes against one: images and reported losses."""
    run_on_two_processes(TWO_PROCESSES, tmp_path)


TWO_PROCESSES = """
import pytest
import torch
from fastdd.data import load_dataset
from fastdd.runtime.distributed import SINGLE, join
from fastdd.methods import DCC, get_distiller
from fastdd.plugins.sdc import SDC

world = join(torch.device("cpu"))
train, _ = load_dataset("digits")
for cls, plugins in ((DCC, lambda: [SDC(5.0)]), (get_distiller("dsac"), lambda: [])):
    images, losses = [], []
    for w in (SINGLE, world):
        d = cls(train, 2, torch.Generator().manual_seed(0), model="ConvNetW32", batch_real=16, iterations=2,
                warmup=0.5, outer_loop=2, inner_loop=1, plugins=plugins(), world=w, real_precision="float32")
        losses.append([d.step(iteration)["loss"] for iteration in range(2)])
        d.share_shards()
        images.append(d.images.detach().clone())
    torch.testing.assert_close(images[1], images[0], rtol=1e-5, atol=1e-5)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5), losses
print("equal")
"""
