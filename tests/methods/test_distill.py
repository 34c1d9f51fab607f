"""Distillers against straightforward per-class implementations written here (same network, same
real batches, same augmentation parameters): the image gradients must agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import make_dataset
from fastdd.methods import DC, DM, Plugin, dm, get_distiller, get_loops
from fastdd.models import get_network

MODEL = "ConvNetW32"


# float32 image gradients: the distiller's real pass runs fused (fastdd.models.fused_blocks), whose rounding differs
# from the eager modules' by an ulp here and there, amplified by the cosine distance
FLOAT32_STEP = dict(rtol=1e-3, atol=1e-5)


def reference_distance(gs: torch.Tensor, gr: torch.Tensor) -> torch.Tensor:
    """DC's layer distance: rows of the (out, -1) reshape, 1 - cosine; 1-D tensors give 0."""
    if gs.dim() == 1:
        return torch.zeros(())
    gs, gr = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
    return torch.sum(1 - torch.sum(gs * gr, dim=-1) / (gs.norm(dim=-1) * gr.norm(dim=-1) + 1e-6))


def per_class_dc_grad(net, syn, ipc, real, augment=None):
    """Gradient of the DC/DSA loss w.r.t. the synthetic images, one class at a time."""
    syn = syn.detach().clone().requires_grad_(True)
    params = list(net.parameters())
    loss = 0.0
    for c, x_real in enumerate(real):
        x_syn = syn[c * ipc : (c + 1) * ipc]
        if augment is not None:
            x_real, x_syn = augment(x_real, c), augment(x_syn, c)
        g_real = torch.autograd.grad(F.cross_entropy(net(x_real), torch.full((len(x_real),), c)), params)
        g_syn = torch.autograd.grad(F.cross_entropy(net(x_syn), torch.full((len(x_syn),), c)), params,
                                    create_graph=True)
        loss = loss + sum(reference_distance(s, r.detach()) for s, r in zip(g_syn, g_real))
    (grad,) = torch.autograd.grad(loss, syn)
    return grad


def distiller_grad(distiller, loss):
    (grad,) = torch.autograd.grad(loss, distiller.images)
    return grad


def make(cls, data, ipc=2, real_precision="float32", **kwargs):
    return cls(data, ipc, torch.Generator().manual_seed(1), model=MODEL, batch_real=5, real_precision=real_precision,
               **kwargs)


@pytest.mark.parametrize("ipc", [1, 3])
def test_dc_image_gradient_matches_per_class_loop(tiny, ipc):
    d = make(DC, tiny, ipc=ipc)
    net = d.new_network()
    real = d.real_batches()
    got = distiller_grad(d, d.matching_loss(net, real))
    want = per_class_dc_grad(net, d.images, ipc, real)
    torch.testing.assert_close(got, want, **FLOAT32_STEP)
    assert got.abs().sum() > 0


def test_dsa_image_gradient_matches_per_class_loop():
    data = make_dataset(channels=3, size=8, name="cifar10")
    d = make(get_distiller("dsa"), data)
    net = d.new_network()
    real = d.real_batches()
    params = d.augmentation_params()
    got = distiller_grad(d, d.matching_loss(net, real, params))

    def augment(x, c):
        return d.dsa.apply(x, params, torch.full((len(x),), c))

    want = per_class_dc_grad(net, d.images, d.ipc, real, augment)
    torch.testing.assert_close(got, want, **FLOAT32_STEP)


@pytest.mark.parametrize("chunks", ["whole", "class chunks"])
def test_dm_image_gradient_matches_per_class_loop(tiny, monkeypatch, chunks):
    if chunks == "class chunks":  # 3 classes' real batches at a time; synthetic chunks of 3 classes, recomputed
        monkeypatch.setattr(dm, "REAL_CHUNK_PIXELS", 3 * 5 * tiny.height * tiny.width)
        monkeypatch.setattr(dm, "SYN_CHUNK_PIXELS", 3 * 2 * tiny.height * tiny.width)
    d = make(DM, tiny, ipc=2)
    net = d.new_network()
    for p in net.parameters():
        p.requires_grad_(False)
    params = d.dsa.sample(d.num_classes, d.generator, d.device)
    state = d.generator.get_state()
    got = distiller_grad(d, d.matching_loss(net, params))
    d.generator.set_state(state)
    real = d.real_batches()  # the batches the loss drew

    syn = d.images.detach().clone().requires_grad_(True)
    loss = 0.0
    for c, x_real in enumerate(real):
        x_syn = syn[c * d.ipc : (c + 1) * d.ipc]
        e_real = net.embed(d.dsa.apply(x_real, params, torch.full((len(x_real),), c)))
        e_syn = net.embed(d.dsa.apply(x_syn, params, torch.full((len(x_syn),), c)))
        loss = loss + torch.sum((e_real.mean(0) - e_syn.mean(0)) ** 2)
    (want,) = torch.autograd.grad(loss, syn)
    torch.testing.assert_close(got, want, **FLOAT32_STEP)


@pytest.mark.parametrize("cls", [DC, DM])
def test_bfloat16_real_pass_gives_nearly_the_float32_image_gradient(tiny, cls):
    grads = []
    for precision in ("float32", "bfloat16"):
        d = make(cls, tiny, real_precision=precision)
        net = d.new_network()
        if cls is DM:
            net.requires_grad_(False)
        if cls is DM:
            loss = d.matching_loss(net, d.dsa.sample(d.num_classes, d.generator, d.device))
        else:
            loss = d.matching_loss(net, d.real_batches())
        grads.append(distiller_grad(d, loss).flatten())
    assert not torch.equal(grads[0], grads[1])  # the real pass did run in bfloat16
    assert F.cosine_similarity(grads[0], grads[1], dim=0) > 0.99  # bfloat16 keeps 8 bits of mantissa


def test_dc_with_batchnorm_runs_and_is_finite(tiny):
    d = DC(tiny, 2, torch.Generator().manual_seed(0), model="ConvNetBN", batch_real=5, iterations=1)
    metrics = d.step(0)
    assert torch.isfinite(torch.tensor(metrics["loss"])) and torch.isfinite(d.images).all()


@pytest.mark.parametrize("method", ["dc", "dsa", "dm"])
def test_step_moves_images_and_is_deterministic(tiny, method):
    loops = {} if method == "dm" else {"outer_loop": 2, "inner_loop": 1}

    def run():
        d = get_distiller(method)(tiny, 2, torch.Generator().manual_seed(3), model=MODEL, batch_real=4, **loops)
        before = d.images.detach().clone()
        d.step(0)
        return before, d.images.detach().clone()

    before, after = run()
    assert not torch.equal(before, after)
    torch.testing.assert_close(run()[1], after, rtol=0, atol=0)


def test_real_init_takes_images_of_each_class(tiny):
    d = make(DC, tiny, ipc=2)
    assert d.labels.tolist() == [0, 0, 1, 1, 2, 2]
    pool = {c: tiny.get(tiny.class_indices[c]) for c in range(3)}
    for i, c in enumerate(d.labels.tolist()):
        assert any(torch.equal(d.images[i].detach(), img) for img in pool[c])


def test_plugin_term_is_added_and_hooks_run(tiny):
    class Pull(Plugin):
        name = "pull"
        calls = 0

        def loss(self, ctx):
            return 10.0 * ctx.stored.pow(2).mean()

        def after_step(self, iteration, stored):
            Pull.calls += 1

    plain = make(DC, tiny, outer_loop=1, inner_loop=0)
    pulled = make(DC, tiny, outer_loop=1, inner_loop=0, plugins=[Pull()])
    m_plain, m_pulled = plain.step(0), pulled.step(0)
    pulled.after_step(0)
    assert m_pulled["loss"] > m_plain["loss"]
    assert Pull.calls == 1
    assert pulled.images.pow(2).mean() < plain.images.pow(2).mean()


def test_get_loops_table_and_rule():
    assert [get_loops(i) for i in (1, 10, 20, 30, 40, 50)] == [(1, 1), (10, 50), (20, 25), (30, 20), (40, 15), (50, 10)]
    assert get_loops(100) == (100, 5)
    assert get_loops(5) == (5, 50)
    with pytest.raises(ValueError, match="ipc"):
        get_loops(0)


@pytest.mark.parametrize("kwargs, match", [
    ({"ipc": 0}, "ipc"),
    ({"init": "zeros"}, "init"),
    ({"iterations": 0}, "iterations"),
    ({"lr_img": -1.0}, "lr_img"),
    ({"metric": "l2"}, "metric"),
    ({"real_precision": "float16"}, "real_precision"),
])
def test_bad_arguments_are_named(tiny, kwargs, match):
    args = {"ipc": 1, **kwargs}
    ipc = args.pop("ipc")
    with pytest.raises(ValueError, match=match):
        DC(tiny, ipc, torch.Generator(), **args)


def test_unknown_method():
    with pytest.raises(ValueError, match="method must be one of"):
        get_distiller("kip")


def test_networks_come_from_the_generator_only(tiny):
    a = make(DC, tiny).new_network()
    torch.manual_seed(123)
    b = make(DC, tiny).new_network()
    # make() draws the initial images first, so the networks see the same generator state
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert isinstance(get_network(MODEL, 1, 3, (8, 8), torch.Generator()), torch.nn.Module)
