"""MTT against a hand-unrolled reference written here (a plain module whose parameters are swapped for
the tensors of the unrolled graph, same batches, same augmentation): loss and gradients must agree;
the lean mode must equal the reference with every step's starting point detached; the flat mode must
equal the exact mode to float64 rounding while the memory autograd holds does not grow with syn_steps."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import fastdd.evaluation as evaluate
from conftest import make_dataset
from fastdd.augment import DSA
from fastdd.cli import main
from fastdd.data import RealDataset, load_dataset
from fastdd.data.zca import whitened
from fastdd.errors import NonFiniteError
from fastdd.evaluation import EvalConfig, default_eval_config, evaluate_with_baseline, random_real
from fastdd.methods import MTT, get_distiller
from fastdd.methods.mtt import MAX_LR_GROWTH, MODES, Unroll
from fastdd.models import get_network
from fastdd.plugins.sdc import SDC
from fastdd.plugins.udd import UDD
from fastdd.run import run_distillation
from fastdd.synset import SyntheticSet
from fastdd.trajectories.files import Trajectory, expert_path

MODEL = "ConvNetW32"


def write_experts(directory: Path, data: RealDataset, count: int = 2, epochs: int = 4, model: str = MODEL) -> Path:
    """``count`` experts: a freshly initialised network, then ``epochs`` random steps of 0.02 per parameter."""
    g = torch.Generator().manual_seed(7)
    for i in range(count):
        net = get_network(model, data.channels, data.num_classes, (data.height, data.width), g)
        rows = [parameters_to_vector(net.parameters()).detach()]
        for _ in range(epochs):
            rows.append(rows[-1] + 0.02 * torch.randn(rows[0].shape, generator=g))
        meta = {"dataset": data.name, "model": model, "channels": data.channels, "num_classes": data.num_classes,
                "im_size": [data.height, data.width], "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0,
                "batch_size": 256, "epochs": epochs, "augment": "dsa", "seed": 0}
        Trajectory(torch.stack(rows), meta).save(expert_path(directory, i))
    return directory


@pytest.fixture
def experts(tmp_path, tiny) -> Path:
    return write_experts(tmp_path / "experts", tiny)


def make(data, experts, seed=1, **kwargs) -> MTT:
    args = {"ipc": 2, "syn_steps": 3, "expert_epochs": 2, "max_start_epoch": 2, "batch_syn": 4, **kwargs}
    return MTT(data, args.pop("ipc"), torch.Generator().manual_seed(seed), experts=experts, model=MODEL, **args)


def reference(d: MTT, unroll: Unroll, experts: Path, detach_start: bool = False, sdc: float = 0.0):
    """(loss, d loss / d images, d loss / d syn_lr[, d loss / d label logits]) of ``unroll``, unrolled by hand
    on a plain module, in the dtype of ``d.images``.

    ``detach_start``: each step's gradient is taken at a detached copy of its starting parameters
    (the lean mode's definition). ``sdc``: add ``sdc`` times the mean over the students of their mean
    per-sample gradient norm on the synthetic images (one sample at a time) to the differentiated total.
    With ``d.soft_labels.logits``, the students train on their softmax, and its gradient comes last."""
    net = get_network(MODEL, d.train.channels, d.num_classes, (d.train.height, d.train.width), torch.Generator())
    slots = [(m, name, p.shape) for m in net.modules() for name, p in list(m.named_parameters(recurse=False))]
    for m, name, _ in slots:
        del m._parameters[name]

    def split(flat):
        return [t.view(shape) for t, (_, _, shape) in zip(flat.split([s.numel() for *_, s in slots]), slots)]

    rows = Trajectory.load(expert_path(experts, unroll.expert)).params.to(d.images.dtype)
    start, target = split(rows[unroll.start]), split(rows[unroll.start + d.expert_epochs])
    images = d.images.detach().clone().requires_grad_(True)
    lr = d.syn_lr.detach().clone().requires_grad_(True)
    wrt = [images, lr]
    targets = d.labels
    if d.soft_labels is not None:
        wrt.append(d.soft_labels.logits.detach().clone().requires_grad_(True))
        targets = torch.softmax(wrt[-1], dim=1)
    theta = [t.clone().requires_grad_(True) for t in start]
    extra = 0.0
    for idx, params in unroll.batches:
        at = [t.detach().requires_grad_(True) for t in theta] if detach_start else theta
        for (m, name, _), t in zip(slots, at):
            setattr(m, name, t)
        if sdc:
            norms = []
            for k in range(len(images)):
                per_sample = torch.autograd.grad(F.cross_entropy(net(images[k : k + 1]), d.labels[k : k + 1]), at,
                                                 create_graph=True)
                norms.append(torch.sqrt(sum(g.pow(2).sum() for g in per_sample)))
            extra = extra + sdc * torch.stack(norms).mean() / len(unroll.batches)
        x = d.dsa.apply(images[idx], params, torch.arange(len(idx)))
        grads = torch.autograd.grad(F.cross_entropy(net(x), targets[idx]), at, create_graph=True)
        theta = [t - lr * g for t, g in zip(theta, grads)]
    loss = sum((a - b).pow(2).sum() for a, b in zip(theta, target)) / sum(
        (a - b).pow(2).sum() for a, b in zip(start, target))
    return (loss.item(), *torch.autograd.grad(loss + extra, wrt, allow_unused=True))


def assert_grads_close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_exact_mode_matches_the_hand_unrolled_reference(tiny, experts):
    d = make(tiny, experts)
    unroll = d.sample_unroll(0)
    assert [len(idx) for idx, _ in unroll.batches] == [4, 2, 4]  # chunks of a permutation, then a new one
    loss = d.backward(unroll)
    want_loss, want_images, want_lr = reference(d, unroll, experts)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert_grads_close(d.images.grad, want_images)
    assert_grads_close(d.syn_lr.grad, want_lr)
    assert d.images.grad.abs().sum() > 0 and d.syn_lr.grad != 0


def test_lean_mode_equals_the_reference_with_detached_starting_points(tiny, experts):
    lean, exact = make(tiny, experts, mode="lean"), make(tiny, experts)
    unroll = lean.sample_unroll(0)
    loss = lean.backward(unroll)
    want_loss, want_images, want_lr = reference(lean, unroll, experts, detach_start=True)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert_grads_close(lean.images.grad, want_images)
    assert_grads_close(lean.syn_lr.grad, want_lr)
    # the exact gradient keeps the Hessian terms of later steps: same loss, other gradients
    assert exact.backward(unroll) == pytest.approx(loss, rel=1e-5)
    assert (exact.images.grad - lean.images.grad).norm() > 1e-2 * exact.images.grad.norm()
    assert not math.isclose(exact.syn_lr.grad.item(), lean.syn_lr.grad.item(), rel_tol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_sdc_term_at_every_student_matches_the_hand_unrolled_reference(tiny, experts, mode):
    """With the SDC plug-in: the exact and flat modes differentiate the term through the whole unroll; the lean mode
    holds each student constant, as it does for the matching gradient (so syn_lr gets no part of it)."""
    d = make(tiny, experts, mode=mode, plugins=[SDC(0.5)])
    unroll = d.sample_unroll(0)
    loss = d.backward(unroll)
    want_loss, want_images, want_lr = reference(d, unroll, experts, detach_start=mode == "lean", sdc=0.5)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert_grads_close(d.images.grad, want_images)
    assert_grads_close(d.syn_lr.grad, want_lr)
    plain = make(tiny, experts, mode=mode)
    plain.backward(unroll)
    assert (plain.images.grad - d.images.grad).norm() > 1e-3 * plain.images.grad.norm()  # the term counts


def test_sdc_lowers_the_students_gradn(tiny, experts):
    """One iteration with a large lambda against one without (same seed): lower mean GraDN at the start."""
    after = {}
    for lam in (0.0, 5.0):
        d = make(tiny, experts, plugins=[SDC(lam)], lr_img=100.0)
        d.step(0)
        assert bool(torch.isfinite(d.images).all())
        theta0 = d.expert_rows[0, 0]
        after[lam] = SDC(1.0).term(d.student, d.images.detach(), d.labels, d.student_params(theta0)).item()
    assert after[5.0] < after[0.0]


def test_lean_mode_misses_exactly_the_hessian_term_of_the_later_step(tiny, experts):
    """For two steps P_0 = I - alpha H_1, so exact - lean = alpha^2 J_0^T H_1 lambda for the images and
    alpha g_0^T H_1 lambda for the rate (module docstring), with no higher-order rest."""
    lean, exact = make(tiny, experts, mode="lean", syn_steps=2), make(tiny, experts, syn_steps=2)
    unroll = lean.sample_unroll(0)
    lean.backward(unroll)
    exact.backward(unroll)
    alpha, rows = exact.syn_lr.detach(), exact.expert_rows[unroll.expert]
    theta0, target = rows[unroll.start], rows[unroll.start + exact.expert_epochs]
    images = exact.images.detach().requires_grad_(True)
    first, second = unroll.batches
    t0 = theta0.clone().requires_grad_(True)
    (g0,) = torch.autograd.grad(exact.student_loss(t0, *exact.batch(images, first)), t0, create_graph=True)
    t1 = (theta0 - alpha * g0).detach().requires_grad_(True)
    (g1,) = torch.autograd.grad(exact.student_loss(t1, *exact.batch(images.detach(), second)), t1,
                                create_graph=True)
    lam = 2 * (t1.detach() - alpha * g1.detach() - target) / (theta0 - target).pow(2).sum()
    (h1_lam,) = torch.autograd.grad(g1, t1, grad_outputs=lam)
    (want_images,) = torch.autograd.grad(g0, images, grad_outputs=alpha**2 * h1_lam)
    torch.testing.assert_close(exact.images.grad - lean.images.grad, want_images, rtol=1e-3,
                               atol=1e-4 * float(want_images.abs().max()))
    assert (exact.syn_lr.grad - lean.syn_lr.grad).item() == pytest.approx((alpha * g0.detach() @ h1_lam).item(),
                                                                          rel=1e-3)


def test_lean_image_gradient_error_shrinks_with_the_step_size(tiny, experts):
    """The dropped terms are second order in the learned rate, the gradient first order: their ratio
    shrinks in proportion to the rate."""
    def relative_error(rate):
        lean, exact = make(tiny, experts, mode="lean", syn_lr=rate), make(tiny, experts, syn_lr=rate)
        unroll = lean.sample_unroll(0)
        lean.backward(unroll)
        exact.backward(unroll)
        return float((exact.images.grad - lean.images.grad).norm() / exact.images.grad.norm())

    assert relative_error(0.0025) < relative_error(0.01) / 2


def test_lean_mode_is_exact_for_one_step(tiny, experts):
    lean, exact = make(tiny, experts, mode="lean", syn_steps=1), make(tiny, experts, syn_steps=1)
    unroll = lean.sample_unroll(0)
    assert lean.backward(unroll) == pytest.approx(exact.backward(unroll), rel=1e-6)
    assert_grads_close(lean.images.grad, exact.images.grad)
    assert_grads_close(lean.syn_lr.grad, exact.syn_lr.grad)


def test_lean_mode_is_exact_for_the_images_of_the_last_step(tiny, experts):
    lean, exact = make(tiny, experts, mode="lean", syn_steps=2), make(tiny, experts, syn_steps=2)
    dsa, g = lean.dsa, torch.Generator().manual_seed(3)
    first, last = torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5])  # disjoint: image k is in one step only
    unroll = Unroll(0, 1, ((first, dsa.sample_per_image(3, g)), (last, dsa.sample_per_image(3, g))))
    lean.backward(unroll)
    exact.backward(unroll)
    assert_grads_close(lean.images.grad[last], exact.images.grad[last])
    assert not torch.allclose(lean.images.grad[first], exact.images.grad[first], rtol=1e-3, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_short_run_is_finite_and_its_state_resumes_bit_for_bit(tmp_path, tiny, experts, mode):
    d = make(tiny, experts, mode=mode, iterations=2)
    synset = run_distillation(d, tmp_path / "run", {"method": "mtt"}, 0, checkpoint_every=1, progress=False)
    assert torch.isfinite(synset.images).all() and synset.lr == d.syn_lr.item() > 0
    assert synset.lr != 0.01  # learned
    assert SyntheticSet.load(tmp_path / "run" / "synset.safetensors").lr == pytest.approx(synset.lr)
    assert synset.meta["hparams"]["mode"] == mode and "batch_real" not in synset.meta["hparams"]

    a = make(tiny, experts, mode=mode)
    a.step(0)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    a.step(1)
    b = make(tiny, experts, seed=99, mode=mode)  # other initial images and generator state
    b.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    assert b.lr_optimizer.state_dict()["state"]  # the learned rate's momentum buffer came along
    b.step(1)
    assert torch.equal(a.images, b.images) and torch.equal(a.syn_lr, b.syn_lr)


def in_float64(d: MTT) -> MTT:
    """``d`` with its images, learned rate, experts and student in float64 (for ``backward`` only: the optimisers
    still hold the float32 tensors)."""
    d.images = d.images.detach().double().requires_grad_(True)
    d.syn_lr = d.syn_lr.detach().double().requires_grad_(True)
    d.expert_rows = d.expert_rows.double()
    d.student.double()
    if d.soft_labels is not None:
        d.soft_labels.logits = d.soft_labels.logits.detach().double().requires_grad_(d.soft_labels.learn)
    return d


@pytest.mark.parametrize("kwargs", [
    {},  # batch_syn 4 of 6 images: the chunks of a permutation
    {"batch_syn": None, "syn_steps": 4},  # every image in every step
    {"syn_steps": 6, "plugins": [SDC(0.5)]},  # the SDC term at every student
], ids=["batch_syn<all", "batch_syn=all", "sdc"])
def test_flat_mode_equals_the_exact_mode_in_float64(tiny, experts, kwargs):
    exact, flat = (in_float64(make(tiny, experts, mode=mode, **kwargs)) for mode in ("exact", "flat"))
    unroll = exact.sample_unroll(0)
    assert len({int(params.op[0]) for _, params in unroll.batches}) > 1  # several augmentations, replayed
    assert flat.backward(unroll) == pytest.approx(exact.backward(unroll), rel=1e-14)
    for got, want in ((flat.images.grad, exact.images.grad), (flat.syn_lr.grad, exact.syn_lr.grad)):
        assert got.dtype == torch.float64 and want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))


class SavedBytes:
    """Bytes of the tensors autograd keeps for a backward pass, live and at their peak, counted through
    ``torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack)``.

    A tensor is counted from when autograd saves it until autograd drops it, even where it shares storage with
    another (so a saved view of an input counts in full)."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def pack(self, tensor: torch.Tensor) -> "_Saved":
        return _Saved(self, tensor)

    @staticmethod
    def unpack(saved: "_Saved") -> torch.Tensor:
        return saved.tensor


class _Saved:
    def __init__(self, counter: SavedBytes, tensor: torch.Tensor) -> None:
        # detached: holding the tensor itself would tie it to its own graph node in a cycle that is never freed
        self.counter, self.tensor, self.bytes = counter, tensor.detach(), tensor.numel() * tensor.element_size()
        counter.live += self.bytes
        counter.peak = max(counter.peak, counter.live)

    def __del__(self) -> None:
        self.counter.live -= self.bytes


@pytest.mark.parametrize("mode", MODES)
def test_saved_activation_memory_grows_with_syn_steps_in_the_exact_mode_only(tiny, experts, mode):
    """Every step on the same batch and augmentation, so that each step's graph is the same size: the flat and
    lean modes hold one step's graph at a time (the flat mode's stored students are plain tensors, not counted
    here), the exact mode all of them."""
    peaks = []
    for steps in (2, 8):
        d = make(tiny, experts, mode=mode, syn_steps=steps, batch_syn=None)
        unroll = d.sample_unroll(0)
        counter = SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            d.backward(Unroll(unroll.expert, unroll.start, unroll.batches[:1] * steps))
        assert counter.live == 0  # every graph was freed
        peaks.append(counter.peak)
    if mode == "exact":
        assert peaks[1] > 3 * peaks[0]
    else:
        assert peaks[1] == peaks[0] > 0


def test_soft_labels_start_as_the_logits_of_the_first_experts_final_network(tiny, experts):
    d = make(tiny, experts, soft_labels=True)
    net = get_network(MODEL, tiny.channels, tiny.num_classes, (tiny.height, tiny.width), torch.Generator())
    vector_to_parameters(Trajectory.load(expert_path(experts, 0)).params[-1], net.parameters())
    torch.testing.assert_close(d.soft_labels.logits, net(d.images.detach()), rtol=1e-6, atol=1e-6)
    assert not d.soft_labels.logits.requires_grad
    assert d.hparams()["soft_labels"] and not d.hparams()["learn_soft_labels"]
    soft = d.synthetic_set().soft_labels
    assert soft.shape == (6, 3)
    torch.testing.assert_close(soft, d.soft_labels.logits.softmax(1))


def assert_float64_reference(d: MTT, experts: Path, sdc: float) -> None:
    """``d`` (:func:`in_float64`) on its first unroll: the loss and the gradients of the images, the rate and the label
    logits (when there are some) equal the reference's (the lean mode's with detached starting points) to 1e-10."""
    unroll = d.sample_unroll(0)
    loss = d.backward(unroll)
    want_loss, *want = reference(d, unroll, experts, detach_start=d.mode == "lean", sdc=sdc)
    assert loss == pytest.approx(want_loss, rel=1e-12)
    got = (d.images.grad, d.syn_lr.grad, *(() if d.soft_labels is None else (d.soft_labels.logits.grad,)))
    for grad, expected in zip(got, want, strict=True):
        assert expected.abs().max() > 0
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))


@pytest.mark.parametrize("mode", MODES)
def test_learned_soft_labels_get_the_hand_unrolled_references_gradients_in_float64(tiny, experts, mode):
    """Every mode's gradients for the images, the rate and the label logits against the reference (the lean mode:
    with detached starting points), with the SDC term, which uses the class labels."""
    d = in_float64(make(tiny, experts, mode=mode, soft_labels=True, learn_soft_labels=True, plugins=[SDC(0.5)]))
    assert_float64_reference(d, experts, 0.5)


def test_learned_soft_labels_resume_bit_for_bit(tiny, experts):
    a = make(tiny, experts, mode="flat", soft_labels=True, learn_soft_labels=True)
    initial = a.soft_labels.logits.detach().clone()
    a.step(0)
    assert not torch.equal(a.soft_labels.logits, initial)  # learned
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    a.step(1)
    b = make(tiny, experts, seed=99, mode="flat", soft_labels=True, learn_soft_labels=True)
    b.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    b.step(1)
    assert torch.equal(a.images, b.images) and torch.equal(a.syn_lr, b.syn_lr)
    assert torch.equal(a.soft_labels.logits, b.soft_labels.logits)
    torch.testing.assert_close(a.synthetic_set().soft_labels, a.soft_labels.logits.detach().softmax(1), rtol=0, atol=0)


@pytest.mark.parametrize("value", [-0.01, 0.0, 1.01 * MAX_LR_GROWTH * 0.01, math.inf, math.nan])
def test_learned_lr_out_of_range_raises(tiny, experts, value):
    d = make(tiny, experts)
    with torch.no_grad():
        d.syn_lr.fill_(value)
    with pytest.raises(NonFiniteError, match=r"iteration 7: the learned learning rate became"):
        d.check_learned_lr(7)


def test_negative_learned_lr_stops_the_run(tiny, experts):
    d = make(tiny, experts, lr_lr=1e-12)
    with torch.no_grad():
        d.syn_lr.fill_(-0.01)
    with pytest.raises(NonFiniteError, match="iteration 3: the learned learning rate became -0.01"):
        d.step(3)


def test_non_finite_loss_raises_before_updating(tiny, experts):
    d = make(tiny, experts)
    with torch.no_grad():
        d.images[0] = math.nan
    before = d.images.detach().clone()
    with pytest.raises(NonFiniteError, match="iteration 5: the MTT loss is nan"):
        d.step(5)
    assert torch.equal(d.images[1:], before[1:]) and torch.equal(d.syn_lr.detach(), torch.tensor(0.01))


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "fast"}, "mode"),
    ({"syn_steps": 0}, "syn_steps"),
    ({"expert_epochs": 0}, "expert_epochs"),
    ({"max_start_epoch": 0}, "max_start_epoch"),
    ({"max_start_epoch": 4}, "max_start_epoch"),  # 4 + 2 - 1 epochs needed, the experts hold 4
    ({"batch_syn": 0}, "batch_syn"),
    ({"lr_lr": -1.0}, "lr_lr"),
    ({"syn_lr": 0.0}, "syn_lr"),
    ({"syn_lr": math.nan}, "syn_lr"),
    ({"lr_img": -1.0}, "lr_img"),
    ({"batch_real": 5}, "batch_real"),
    ({"real_precision": "bfloat16"}, "real_precision"),
    ({"plugins": [UDD("jitter", 1.0)]}, "--plugin udd applies to --method dc, dsa, idc, not mtt"),
    ({"learn_soft_labels": True}, "learn_soft_labels needs soft_labels"),
])
def test_bad_arguments_are_named(tiny, experts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(tiny, experts, **kwargs)


def test_experts_must_fit_the_run(tmp_path, tiny, experts):
    with pytest.raises(ValueError, match=r"experts: .* model 'ConvNetW32' \(this run: 'ConvNetW64'\)"):
        MTT(tiny, 1, torch.Generator(), experts=experts, model="ConvNetW64")
    other = make_dataset(name="other")
    with pytest.raises(ValueError, match=r"dataset 'tiny' \(this run: 'other'\)"):
        make(other, experts)
    with pytest.raises(FileNotFoundError, match="fastdd experts"):
        make(tiny, tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"zca None \(this run: 0.1\)"):  # experts of unwhitened images
        make(whitened(tiny, tiny)[0], experts)
    assert get_distiller("mtt") is MTT


def test_per_image_draw_replays_the_training_augmentation():
    dsa, x = DSA(), torch.randn(5, 3, 8, 8)
    g = torch.Generator().manual_seed(4)
    params = dsa.sample_per_image(5, torch.Generator().manual_seed(4))
    torch.testing.assert_close(dsa.apply(x, params, torch.arange(5)), dsa(x, g), rtol=0, atol=0)


def test_evaluation_trains_with_the_stored_lr(tiny, monkeypatch):
    seen = []

    def train_and_test(net, images, labels, test, config, generator, lr=None, on_epoch=None):
        seen.append(config.lr if lr is None else lr)
        return 0.5

    monkeypatch.setattr(evaluate, "train_and_test", train_and_test)
    images, labels = random_real(tiny, 1, torch.Generator().manual_seed(0))
    config = EvalConfig(model=MODEL, epochs=1)
    report = evaluate_with_baseline(SyntheticSet(images, labels, {"ipc": 1}, lr=0.037), tiny, tiny, config, 1, 0,
                                    progress=False)
    assert seen == [0.037, 0.01]  # the set at its learned lr, the random-real baseline at the protocol's
    assert report["distilled"]["config"]["lr"] == 0.037 and report["random_real"]["config"]["lr"] == 0.01
    seen.clear()
    evaluate_with_baseline(SyntheticSet(images, labels, {"ipc": 1}), tiny, tiny, config, 1, 0, False, False)
    assert seen == [0.01]  # a set without a learned lr
    assert (default_eval_config("mtt").augment, default_eval_config("mtt").epochs) == ("dsa", 1000)


def test_cli_distills_with_mtt_and_resumes(tmp_path, capsys):
    train, _ = load_dataset("digits")
    experts = write_experts(tmp_path / "experts", train, count=1, epochs=2)
    out = tmp_path / "run"
    args = ["distill", "--dataset", "digits", "--method", "mtt", "--experts", str(experts), "--ipc", "1",
            "--iterations", "2", "--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch", "2",
            "--mtt-mode", "lean", "--model", MODEL, "--eval-models", "0", "--quiet", "--out", str(out)]
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["mtt_mode"] == "lean" and config["syn_steps"] == 2 and config["experts"] == str(experts)
    assert SyntheticSet.load(out / "synset.safetensors").lr > 0
    assert main([*args, "--resume"]) == 0
    capsys.readouterr()
    assert main([*args[:4], "dc", *args[5:]]) == 1
    assert "--experts is an option of --method mtt, ftd, datm;" in capsys.readouterr().err
    assert main([*args[:5], *args[7:]]) == 1
    assert "--method mtt needs --experts" in capsys.readouterr().err

    flat = tmp_path / "flat"
    assert main([*args[:-1], str(flat), "--mtt-mode", "flat", "--soft-labels", "--learn-soft-labels"]) == 0
    config = json.loads((flat / "config.json").read_text())
    assert config["mtt_mode"] == "flat" and config["soft_labels"] is True and config["learn_soft_labels"] is True
    soft = SyntheticSet.load(flat / "synset.safetensors").soft_labels
    assert soft.shape == (10, 10) and torch.allclose(soft.sum(1), torch.ones(10))
