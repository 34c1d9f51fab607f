"""The evaluation protocol: determinism, lr schedule, accuracy on a toy problem, random-real baseline, report,
soft labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastdd import evaluation
from fastdd.data import RealDataset
from fastdd.evaluation import (
    EvalConfig,
    EvalReport,
    evaluate_random_real,
    evaluate_synset,
    evaluate_with_baseline,
    lr_at_epoch,
    random_real,
    train_and_test,
)
from fastdd.models import get_network
from fastdd.synset import SyntheticSet

MODEL = "ConvNetW32"  # the smallest named network; 8x8 inputs keep every run in milliseconds


def toy_dataset(per_class: int, seed: int, classes: int = 4, channels: int = 1, name: str = "toy") -> RealDataset:
    """Separable toy set: class c is a bright quadrant c on a dark noisy 8x8 background."""
    g = torch.Generator().manual_seed(seed)
    n = classes * per_class
    labels = torch.arange(classes).repeat(per_class)
    images = torch.randint(0, 60, (n, channels, 8, 8), generator=g, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):
        r, q = divmod(c, 2)
        images[i, :, 4 * r : 4 * r + 4, 4 * q : 4 * q + 4] += 180
    return RealDataset(name=name, images=images, labels=labels, num_classes=classes,
                       mean=(0.3,) * channels, std=(0.3,) * channels, class_names=[str(c) for c in range(classes)])


@pytest.fixture(scope="module")
def data() -> tuple[RealDataset, RealDataset]:
    return toy_dataset(20, seed=0), toy_dataset(50, seed=1)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_lr_schedule_function():
    assert [lr_at_epoch(1.0, e, 6) for e in range(6)] == [1.0, 1.0, 1.0, 0.1, 0.1, 0.1]
    assert [lr_at_epoch(1.0, e, 5) for e in range(5)] == [1.0, 1.0, 0.1, 0.1, 0.1]


def test_training_uses_schedule_and_lr_override(data, monkeypatch):
    train, test = data
    seen: list[float] = []
    original = torch.optim.SGD.step

    def probe(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        assert self.param_groups[0]["momentum"] == 0.9 and self.param_groups[0]["weight_decay"] == 5e-4
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", probe)
    images, labels = random_real(train, 3, gen())  # 12 images, batch 8 -> 2 steps per epoch
    config = EvalConfig(model=MODEL, epochs=4, batch_size=8)
    net = get_network(MODEL, 1, 4, (8, 8), gen())
    train_and_test(net, images, labels, test, config, gen())
    assert seen == pytest.approx([0.01] * 4 + [0.001] * 4)
    seen.clear()
    train_and_test(net, images, labels, test, config, gen(), lr=0.5)
    assert seen == pytest.approx([0.5] * 4 + [0.05] * 4)


def test_deterministic_with_equal_generators(data):
    train, test = data
    images, labels = random_real(train, 2, gen(3))
    config = EvalConfig(model=MODEL, epochs=3, augment="dsa", dsa_strategy="color_crop_cutout_scale_rotate")
    a = evaluate_synset(images, labels, train, test, config, 2, gen(5), progress=False)
    b = evaluate_synset(images, labels, train, test, config, 2, gen(5), progress=False)
    assert a.accuracies == b.accuracies
    net1 = get_network(MODEL, 1, 4, (8, 8), gen(1))
    net2 = get_network(MODEL, 1, 4, (8, 8), gen(1))
    train_and_test(net1, images, labels, test, EvalConfig(model=MODEL, epochs=2, augment="dsa"), gen(2))
    train_and_test(net2, images, labels, test, EvalConfig(model=MODEL, epochs=2, augment="dsa"), gen(2))
    for p1, p2 in zip(net1.parameters(), net2.parameters()):
        assert torch.equal(p1, p2)


def test_high_accuracy_on_separable_toy(data):
    train, test = data
    images, labels = random_real(train, 5, gen())
    report = evaluate_synset(images, labels, train, test, EvalConfig(model=MODEL, epochs=30), 2, gen(), progress=False)
    assert report.mean > 0.95, report.accuracies
    assert report.stuck == 0 and report.warning("random real images") is None  # its networks learned


def test_random_real_picks_ipc_per_class():
    train = toy_dataset(6, seed=2, channels=3)
    images, labels = random_real(train, 4, gen(9))
    assert images.shape == (16, 3, 8, 8) and images.dtype == torch.float32
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    g = gen(9)
    expected = torch.cat([train.sample_indices(c, 4, g) for c in range(4)])
    assert len(set(expected.tolist())) == 16
    assert torch.equal(train.labels[expected], labels)
    assert torch.equal(images, train.get(expected))
    # a class smaller than ipc would make the baseline smaller than the IPC it is compared at
    with pytest.raises(ValueError, match=r"baseline: class 0 \('.*'\) of .* holds 6 training image\(s\), fewer than"):
        random_real(train, 10, gen())
    with pytest.raises(ValueError, match="ipc"):
        random_real(train, 0, gen())


def test_report_fields(data):
    train, test = data
    config = EvalConfig(model=MODEL, epochs=2)
    report = evaluate_random_real(train, test, 2, config, 3, gen(), progress=False)
    assert isinstance(report, EvalReport) and report.num_models == 3 and len(report.accuracies) == 3
    assert report.mean == pytest.approx(np.mean(report.accuracies))
    assert report.std == pytest.approx(np.std(report.accuracies))
    assert all(0.0 <= a <= 1.0 for a in report.accuracies) and report.seconds > 0
    d = json.loads(json.dumps(report.to_dict()))
    assert d["config"]["model"] == MODEL and d["num_models"] == 3 and d["accuracies"] == report.accuracies
    images, labels = random_real(train, 1, gen())
    learned = evaluate_synset(images, labels, train, test, config, 1, gen(), lr=0.02, progress=False)
    assert learned.config.lr == 0.02 and config.lr == 0.01  # the report states the lr used


def test_progress_bar(data, capsys):
    train, test = data
    images, labels = random_real(train, 1, gen())
    evaluate_synset(images, labels, train, test, EvalConfig(model=MODEL, epochs=2), 1, gen(), progress=False)
    assert capsys.readouterr().err == ""
    evaluate_synset(images, labels, train, test, EvalConfig(model=MODEL, epochs=2), 1, gen(), progress=True)


@pytest.mark.parametrize(
    "field, value",
    [("epochs", 0), ("batch_size", 0), ("lr", 0.0), ("momentum", -0.1), ("augment", "mixup"), ("test_batch_size", 0)],
)
def test_bad_config(field, value):
    with pytest.raises(ValueError, match=field):
        EvalConfig(**{field: value})


def test_bad_arguments(data):
    train, test = data
    images, labels = random_real(train, 1, gen())
    config = EvalConfig(model=MODEL, epochs=1)

    def run(x=images, y=labels, num_models=1, **kw):
        return evaluate_synset(x, y, train, test, config, num_models, gen(), progress=False, **kw)

    with pytest.raises(ValueError, match="num_models"):
        run(num_models=0)
    with pytest.raises(ValueError, match="shape"):
        run(x=torch.zeros(4, 3, 8, 8))
    with pytest.raises(ValueError, match="images"):
        run(x=torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match="labels"):
        run(y=labels.to(torch.int32))
    with pytest.raises(ValueError, match="labels"):
        run(y=labels[:2])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        run(y=labels + 1)
    with pytest.raises(ValueError, match="lr"):
        run(lr=-1.0)
    with pytest.raises(ValueError, match="unknown network"):
        evaluate_synset(images, labels, train, test, EvalConfig(model="NoSuchNet"), 1, gen(), progress=False)


# ----------------------------------------------------------------------------- soft labels (TESLA)
def test_one_hot_soft_labels_train_exactly_as_hard_labels(data):
    train, test = data
    images, labels = random_real(train, 2, gen(3))
    one_hot = F.one_hot(labels, 4).float()
    config = EvalConfig(model=MODEL, epochs=3, batch_size=4, augment="dsa")
    hard = evaluate_with_baseline(SyntheticSet(images, labels, {"ipc": 2}), train, test, config, 2, 7, progress=False)
    soft = evaluate_with_baseline(SyntheticSet(images, labels, {"ipc": 2}, soft_labels=one_hot), train, test, config,
                                  2, 7, progress=False)
    assert soft["distilled"]["accuracies"] == hard["distilled"]["accuracies"]
    assert (soft["distilled"]["labels"], hard["distilled"]["labels"]) == ("soft", "hard")
    assert soft["random_real"] == {**hard["random_real"], "seconds": soft["random_real"]["seconds"]}
    assert soft["random_real"]["labels"] == "hard"
    nets = [get_network(MODEL, 1, 4, (8, 8), gen(1)) for _ in range(2)]
    for net, targets in zip(nets, (labels, one_hot)):
        train_and_test(net, images, targets, test, config, gen(2))
    for p1, p2 in zip(*(net.parameters() for net in nets)):
        assert torch.equal(p1, p2)  # cross-entropy against one-hot rows is the class-index one, bit for bit


def test_soft_labels_are_the_training_targets(data, monkeypatch):
    train, test = data
    images, labels = random_real(train, 2, gen(3))
    smoothed = 0.8 * F.one_hot(labels.roll(1), 4).float() + 0.05  # rows sum to 1, argmax differs from labels
    seen: list[torch.Tensor] = []
    original = evaluation.train_epoch

    def probe(net, x, targets, *args, **kwargs):
        seen.append(targets.clone())
        return original(net, x, targets, *args, **kwargs)

    monkeypatch.setattr(evaluation, "train_epoch", probe)
    config = EvalConfig(model=MODEL, epochs=2)
    synset = SyntheticSet(images, labels, {"ipc": 2}, lr=0.02, soft_labels=smoothed)
    report = evaluate_with_baseline(synset, train, test, config, 1, 0, progress=False)
    assert len(seen) == 4  # 2 epochs of the set, then 2 of the random-real baseline
    assert all(torch.equal(t, smoothed) for t in seen[:2])
    assert all(t.dtype == torch.int64 and t.dim() == 1 for t in seen[2:])
    assert report["distilled"]["labels"] == "soft" and report["random_real"]["labels"] == "hard"
    assert report["distilled"]["config"]["lr"] == 0.02
    assert json.loads(json.dumps(report)) == report
    # soft labels (in float64, within the tolerance of 1e-4) are cast to the images' dtype
    probabilities = torch.softmax(torch.randn(len(labels), 4, generator=gen(), dtype=torch.float64), 1) * (1 + 5e-5)
    assert evaluate_synset(images, probabilities, train, test, config, 1, gen(), progress=False).labels == "soft"
    assert seen[-1].dtype == torch.float32
    # IDC sets never hold soft labels: decoding them would be a guess
    idc = SyntheticSet(images, labels, {"ipc": 2, "factor": 2}, soft_labels=smoothed)
    with pytest.raises(ValueError, match=r"soft labels and is stored multi-formation \(meta\['factor'\] = 2\)"):
        evaluate_with_baseline(idc, train, test, config, 1, 0, progress=False)
    assert evaluation.training_data(idc)[1].tolist() == labels.repeat_interleave(4).tolist()  # hard: decoded


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda y: F.one_hot(y, 4).float()[:, :3], r"soft labels must be a float tensor \[N, 4\] .* got "
                                                   r"torch.float32 tensor of shape \(8, 3\)"),
        (lambda y: y.float(), r"soft labels must be a float tensor \[N, 4\] .*hard labels are int64 \[N\]"),
        (lambda y: F.one_hot(y, 4).float()[:5], "labels has 5 entries but images has 8"),
        (lambda y: 0.5 * F.one_hot(y, 4).float(), r"soft labels' rows must sum to 1 \(tolerance 0.0001\), row 0 sums "
                                                  "to 0.5"),
        (lambda y: 1.5 * F.one_hot(y, 4).float() - 0.5 * F.one_hot((y + 1) % 4, 4).float(),
         "soft labels must be non-negative .* got min -0.5"),
        (lambda y: F.one_hot(y, 4).float().index_fill(1, torch.tensor([0]), float("nan")),
         r"soft labels hold 8 NaN or infinite value\(s\)"),
        (lambda y: y.to(torch.int32), r"labels must be an int64 tensor \[N\] \(hard labels\) or a float tensor "
                                      r"\[N, 4\] \(soft labels\)"),
    ],
)
def test_bad_soft_labels(data, make, message):
    train, test = data
    images, labels = random_real(train, 2, gen())
    config = EvalConfig(model=MODEL, epochs=1)
    with pytest.raises(ValueError, match=message):
        evaluate_synset(images, make(labels), train, test, config, 1, gen(), progress=False)
    with pytest.raises(ValueError, match=message):
        train_and_test(get_network(MODEL, 1, 4, (8, 8), gen()), images, make(labels), test, config, gen())


# ----------------------------------------------------------------------------- networks that cannot learn
def test_a_network_too_deep_for_the_images_is_refused_before_training(data, monkeypatch):
    train, test = data
    images, labels = random_real(train, 1, gen())

    def no_training(*args, **kwargs):
        raise AssertionError("a network was trained")

    monkeypatch.setattr(evaluation, "train_and_test", no_training)
    for model, smallest in (("ResNet18", 9), ("ConvNetD4", 12)):
        message = (rf"^eval_model \(--eval-model\): {model} cannot learn from 1x8x8 images \(.*\); it needs images of "
                   rf"at least {smallest}x{smallest}")
        with pytest.raises(ValueError, match=message):
            evaluate_synset(images, labels, train, test, EvalConfig(model=model, epochs=1), 1, gen(), progress=False)


def test_the_losses_of_labels_that_teach_nothing():
    chance, lowest = evaluation.label_losses(torch.arange(4).repeat(3), 4)
    assert chance == pytest.approx(np.log(4)) and lowest == 0
    chance, lowest = evaluation.label_losses(torch.tensor([0, 0, 0, 1]), 2)  # a network that ignores images says 3:1
    assert chance == pytest.approx(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
    uniform = torch.full((6, 3), 1 / 3)
    assert evaluation.label_losses(uniform, 3) == pytest.approx((np.log(3), np.log(3)))
    assert evaluation.did_not_learn(2.2, np.log(10), 0.0) and not evaluation.did_not_learn(2.0, np.log(10), 0.0)
    assert evaluation.did_not_learn(float("nan"), np.log(10), 0.0)


def test_an_evaluation_whose_networks_do_not_learn_says_so(data):
    """A learning rate of 1e-9 leaves every network at its initial loss: the report flags both parts, with one
    warning line each (networks that learn are not flagged: test_high_accuracy_on_separable_toy)."""
    train, test = data
    images, labels = random_real(train, 2, gen(3))
    synset = SyntheticSet(images, labels, {"ipc": 2})
    stuck = evaluate_with_baseline(synset, train, test, EvalConfig(model=MODEL, epochs=1, lr=1e-9), 2, 0,
                                   progress=False)
    for part in ("distilled", "random_real"):
        assert stuck[part]["stuck"] == 2 and stuck[part]["chance_loss"] == pytest.approx(np.log(4))
        assert all(loss > 0.9 * np.log(4) for loss in stuck[part]["final_losses"])
    assert len(stuck["warnings"]) == 2
    assert stuck["warnings"][0].startswith(f"2 of 2 {MODEL} networks trained on the distilled set did not learn: "
                                           "their training loss ended at ")
    assert "against 1.386 for a network that ignores its images" in stuck["warnings"][0]
    assert "random real images did not learn" in stuck["warnings"][1]
    assert all("\n" not in line for line in stuck["warnings"])
    assert json.loads(json.dumps(stuck)) == stuck


def test_a_report_without_losses_flags_nothing():
    report = EvalReport.from_accuracies([0.5], EvalConfig(), 0.0)
    assert report.stuck == 0 and report.warning("the distilled set") is None
    nan = EvalReport.from_accuracies([0.1], EvalConfig(), 0.0, final_losses=[float("nan")], losses=(1.0, 0.0))
    assert nan.stuck == 1 and nan.to_dict()["final_losses"] == [None]
