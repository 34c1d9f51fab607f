"""Data held in memory: ``fastdd.data.from_tensors`` / ``from_dataset``, and ``fastdd.distill`` / ``evaluate`` /
``plan`` taking it as ``data=(train, test)`` instead of reading files."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import fastdd
from fastdd import RunConfig
from fastdd.data import from_dataset, from_tensors, load_digits
from fastdd.data.digits import DIGITS_MEAN, DIGITS_STD, TEST_EVERY
from fastdd.data.zca import whitened
from fastdd.run import CONFIG, REPORT

MODEL = "ConvNetW32"
TINY = {"method": "dc", "ipc": 1, "iterations": 2, "batch_real": 8, "model": MODEL, "eval_models": 0,
        "device": "cpu"}
EVALUATED = {"eval_models": 1, "eval_model": MODEL, "eval_epochs": 1}
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def random_split(n: int, seed: int, floating: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """n random 3 x 8 x 8 images (uint8, or floating u / 255) of 3 classes, in turn."""
    pixels = torch.randint(0, 256, (n, 3, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return (pixels.double() / 255 if floating else pixels), torch.arange(n) % 3


def random_data(floating: bool = False, name: str = "toy"):
    return from_tensors(*random_split(30, 0, floating), *random_split(9, 1, floating), mean=MEAN, std=STD,
                        class_names=["a", "b", "c"], name=name)


@pytest.mark.parametrize("floating, evaluated", [(False, {}), (True, EVALUATED)])
def test_a_set_in_memory_is_distilled_and_evaluated_on_its_test_split(tmp_path, floating, evaluated):
    data = random_data(floating)
    result = fastdd.distill(RunConfig(**{**TINY, **evaluated}, out=str(tmp_path / "run")), data=data, progress=False)
    assert (result.train_size, result.test_size) == (30, 9)
    assert result.config.dataset == "toy" and result.config.data_root is None
    assert json.loads((tmp_path / "run" / CONFIG).read_text()) == result.config.recorded()
    meta = result.synset.meta
    assert (meta["dataset"], meta["class_names"], meta["mean"], meta["std"]) == ("toy", ["a", "b", "c"], MEAN, STD)
    assert result.synset.images.shape == (3, 3, 8, 8)
    if evaluated:
        report = json.loads((tmp_path / "run" / REPORT).read_text())
        assert len(report["distilled"]["accuracies"]) == 1 and "random_real" in report
        assert report == result.evaluation.report
    else:
        assert result.evaluation is None


def test_floating_pixels_are_rounded_to_the_uint8_levels():
    (train, test), (float_train, float_test) = random_data(), random_data(floating=True)
    assert torch.equal(train.images, float_train.images) and torch.equal(test.images, float_test.images)
    assert float_train.images.dtype == torch.uint8 and float_train.labels.dtype == torch.int64


def test_a_torch_dataset_gives_the_sets_its_tensors_give():
    images, labels = random_split(30, 0)
    test_images, test_labels = random_split(9, 1)
    dataset = torch.utils.data.TensorDataset(images, labels)  # items: (image tensor, 0-d int64 label tensor)
    listed = [(image.double() / 255, int(label)) for image, label in zip(test_images, test_labels)]
    made = from_dataset(dataset, listed, mean=MEAN, std=STD, class_names=["a", "b", "c"], name="toy")
    for ours, theirs in zip(made, random_data()):
        assert torch.equal(ours.images, theirs.images) and torch.equal(ours.labels, theirs.labels)
        assert (ours.name, ours.class_names, ours.mean, ours.std) == (theirs.name, theirs.class_names, theirs.mean,
                                                                     theirs.std)


def test_class_names_default_to_the_label_indices():
    train, test = from_tensors(*random_split(30, 0), *random_split(9, 1), mean=MEAN, std=STD)
    assert train.name == test.name == "custom" and train.class_names == ["0", "1", "2"] and train.num_classes == 3


def test_a_run_in_memory_resumes_with_its_data_only(tmp_path):
    data = random_data()
    config = RunConfig(**TINY, out=str(tmp_path / "run"))
    first = fastdd.distill(config, data=data, progress=False)
    with pytest.raises(ValueError, match=r"differing in dataset \('digits' here, 'toy' in the run\)"):
        fastdd.distill(config, resume=True, progress=False)  # the default data set, read from files
    with pytest.raises(ValueError, match="dataset \\(--dataset\\) must be one of .* got 'toy'; a set held in memory"):
        fastdd.distill(first.config, resume=True, progress=False)  # its own name, but no data
    again = fastdd.distill(dataclasses.replace(config, **EVALUATED), data=data, resume=True, progress=False)
    assert torch.equal(again.synset.images, first.synset.images) and again.evaluation is not None

    # the set is evaluated again on the data it was distilled from, and only on that
    evaluation = fastdd.evaluate(first.run_dir, data=data, models=1, epochs=1, model=MODEL, overwrite=True,
                                 progress=False)
    assert evaluation.report["distilled"]["accuracies"] == again.evaluation.report["distilled"]["accuracies"]
    with pytest.raises(ValueError, match="synset: it was distilled from 'toy', a set held in memory; pass that set"):
        fastdd.evaluate(first.synset, models=1, progress=False)
    with pytest.raises(ValueError, match="data: the set was distilled from 'toy', not 'other'"):
        fastdd.evaluate(first.synset, data=random_data(name="other"), models=1, progress=False)


def test_plan_takes_data_in_memory():
    result = fastdd.plan(RunConfig(**TINY), data=random_data(), steps=1, progress=False)
    assert result.config.dataset == "toy" and result.timed_iterations == 1


def sklearn_digits(floating: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits split as fastdd.data.digits splits them (every TEST_EVERY-th image of each class to
    the test split): (train images, labels, test images, labels), pixels 0..16 as uint8 round(v * 255 / 16) or,
    ``floating``, as v / 16. Made by the reader's NumPy steps, so the tensors have its strides too: a channel
    dimension of stride 1, which convolutions take for channels-last (summing in another order) where a stride of
    64 would be taken for channels-first."""
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    pixels = (bunch.images / 16 if floating else np.rint(bunch.images * (255 / 16)).astype(np.uint8))[:, None]
    labels = bunch.target.astype(np.int64)
    test = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        test[np.flatnonzero(labels == c)[TEST_EVERY - 1::TEST_EVERY]] = True
    return tuple(torch.from_numpy(array[mask]) for mask in (~test, test) for array in (pixels, labels))


def test_digits_in_memory_distil_to_the_built_in_digits_set_bit_for_bit(tmp_path):
    data = from_tensors(*sklearn_digits(), mean=DIGITS_MEAN, std=DIGITS_STD, name="digits")
    floating = from_tensors(*sklearn_digits(floating=True), mean=DIGITS_MEAN, std=DIGITS_STD, name="digits")
    for ours, as_floats, theirs in zip(data, floating, load_digits()):
        assert torch.equal(ours.images, theirs.images) and torch.equal(ours.labels, theirs.labels)
        assert torch.equal(as_floats.images, theirs.images)
    in_memory = fastdd.distill(RunConfig(**TINY, out=str(tmp_path / "memory")), data=data, progress=False)
    from_files = fastdd.distill(RunConfig(**TINY, dataset="digits", out=str(tmp_path / "files")), progress=False)
    assert torch.equal(in_memory.synset.images, from_files.synset.images)
    assert torch.equal(in_memory.synset.labels, from_files.synset.labels)
    assert in_memory.synset.meta == from_files.synset.meta
    assert (tmp_path / "memory" / CONFIG).read_text() == (tmp_path / "files" / CONFIG).read_text()


def tensors(**changes):
    """from_tensors' arguments: 12 train and 6 test 1 x 4 x 4 uint8 images of 3 classes, with ``changes``."""
    arguments = {"train_images": torch.zeros(12, 1, 4, 4, dtype=torch.uint8), "train_labels": torch.arange(12) % 3,
                 "test_images": torch.zeros(6, 1, 4, 4, dtype=torch.uint8), "test_labels": torch.arange(6) % 3,
                 "mean": [0.5], "std": [0.25], "class_names": ["a", "b", "c"], "name": "toy"}
    return {**arguments, **changes}


NAN = torch.full((12, 1, 4, 4), float("nan"))


@pytest.mark.parametrize("changes, message", [
    ({"name": "my/set"}, "name must be a data set name (letters, digits, '.', '_', '-', starting with a letter"),
    ({"name": ""}, "name must be a data set name"),
    ({"train_images": np.zeros((12, 1, 4, 4), np.uint8)}, "train_images must be a uint8 (0..255) or floating (0..1) "
                                                          "tensor [N, C, H, W], got a uint8 ndarray of shape"),
    ({"train_images": torch.zeros(12, 4, 4, dtype=torch.uint8)}, "train_images must be a uint8 (0..255) or floating"),
    ({"test_images": torch.zeros(6, 1, 4, 4, dtype=torch.int32)}, "test_images must be a uint8 (0..255) or floating"),
    ({"train_images": torch.zeros(0, 1, 4, 4)}, "train_images must hold at least one image of at least one pixel"),
    ({"train_images": torch.full((12, 1, 4, 4), 1.5)}, "train_images must hold finite values in [0, 1] (floating "
                                                       "pixels), got values from 1.5 to 1.5"),
    ({"train_images": NAN}, "train_images must hold finite values in [0, 1] (floating pixels), got values from nan"),
    ({"test_images": torch.zeros(6, 3, 4, 4)}, "test_images must be [N, 1, 4, 4] like train_images, got shape "
                                               "(6, 3, 4, 4)"),
    ({"train_labels": torch.zeros(12)}, "train_labels must be an integer tensor [12] (one class index per image)"),
    ({"train_labels": torch.zeros(12, dtype=torch.bool)}, "train_labels must be an integer tensor [12]"),
    ({"test_labels": torch.zeros(5, dtype=torch.int64)}, "test_labels must be an integer tensor [6]"),
    ({"train_labels": torch.arange(12) % 3 - 1}, "train_labels must be class indices >= 0, got -1"),
    ({"test_labels": torch.arange(6) % 4}, "test_labels must be class indices below 3, the number of class_names, "
                                           "got 3"),
    ({"mean": [0.5, 0.5]}, "mean must be a list of 1 numbers (one per channel), got [0.5, 0.5]"),
    ({"mean": [float("nan")]}, "mean[0] must be a finite number, got nan"),
    ({"std": [0.0]}, "std[0] must be a finite number > 0, got 0.0"),
    ({"std": 0.25}, "std must be a list, got 0.25"),
    ({"class_names": ["a", "a", "c"]}, "class_names must be distinct names, at least one, got ['a', 'a', 'c']"),
    ({"class_names": ["a", "", "c"]}, "class_names[1] must be a non-empty string, got ''"),
])
def test_from_tensors_refuses_each_bad_argument_in_one_line(changes, message):
    with pytest.raises(ValueError) as error:
        from_tensors(**tensors(**changes))
    assert message in str(error.value) and "\n" not in str(error.value)


def items(n: int = 4, **at):
    """(uint8 1 x 4 x 4 image, int label) items of 2 classes, item i replaced by ``at[f"i{i}"]``."""
    made = [(torch.zeros(1, 4, 4, dtype=torch.uint8), i % 2) for i in range(n)]
    return [at.get(f"i{i}", item) for i, item in enumerate(made)]


@pytest.mark.parametrize("train, test, message", [
    (5, items(), "train must be a map-style dataset (len() and [i]) of (image, label) items, got 5"),
    (torch.zeros(4, 1, 4, 4), items(), "train must be a map-style dataset"),
    ([], items(), "train must hold at least one (image, label) item, got an empty dataset"),
    (items(i1=torch.zeros(1, 4, 4)), items(), "train[1] must be an (image, label) pair, got a torch.float32 Tensor"),
    (items(i0=(Image.new("L", (4, 4)), 0)), items(), "train[0]'s image must be a tensor [C, H, W] (e.g. "
                                                     "transform=ToTensor() for PIL images), got Image"),
    (items(i2=(torch.zeros(1, 4, 4, dtype=torch.uint8), 1.0)), items(), "train[2]'s label must be an integer class "
                                                                        "index, got 1.0"),
    (items(i2=(torch.zeros(1, 4, 4, dtype=torch.uint8), True)), items(), "train[2]'s label must be an integer"),
    (items(i1=(torch.zeros(1, 4, 4, dtype=torch.uint8), torch.tensor(1.0))), items(), "train[1]'s label must be an "
                                                                                      "integer class index"),
    (items(i3=(torch.zeros(1, 5, 4, dtype=torch.uint8), 1)), items(), "train[3]'s image must be a torch.uint8 tensor "
                                                                      "[1, 4, 4] like train[0]'s, got"),
    (items(i3=(torch.zeros(1, 4, 4), 1)), items(), "train[3]'s image must be a torch.uint8 tensor [1, 4, 4]"),
    (items(), items(i0=(torch.zeros(3, 4, 4, dtype=torch.uint8), 0)), "test[0]'s image must be [1, 4, 4] like "
                                                                      "train's images"),
    ([(torch.full((1, 4, 4), 2.0), 0)], items(), "train[0]'s image must hold finite values in [0, 1]"),
    ([(torch.zeros(4, 4), 0)], items(), "train[0]'s image must be a uint8 (0..255) or floating (0..1) tensor "
                                        "[C, H, W]"),
    (items(i1=(torch.zeros(1, 4, 4, dtype=torch.uint8), -1)), items(), "train's labels must be class indices >= 0, "
                                                                       "got -1"),
])
def test_from_dataset_refuses_each_bad_dataset_in_one_line(train, test, message):
    with pytest.raises(ValueError) as error:
        from_dataset(train, test, mean=[0.5], std=[0.25])
    assert message in str(error.value) and "\n" not in str(error.value)


def mixed_pair():
    (train, _), (_, test) = random_data(), random_data(name="other")
    return train, test


@pytest.mark.parametrize("call, message", [
    (lambda out: fastdd.distill(RunConfig(**TINY, out=out), data=random_data()[0]),
     "data must be a (train, test) pair of RealDatasets, as fastdd.data.from_tensors returns, got RealDataset("),
    (lambda out: fastdd.distill(RunConfig(**TINY, out=out), data=mixed_pair()),
     "data: train and test differ in name; they must split one data set"),
    (lambda out: fastdd.distill(RunConfig(**TINY, out=out), data=whitened(*random_data())),
     "data: the sets are whitened already; pass them unwhitened (zca (--zca) whitens them)"),
    (lambda out: fastdd.distill(RunConfig(**TINY, image_size=8, out=out), data=random_data()),
     "image_size (--image-size) resizes images read from files; with data it must be None (its images are 8x8), "
     "got 8"),
    (lambda out: fastdd.distill(RunConfig(**TINY, dataset="mnist10", out=out)),
     "dataset (--dataset) must be one of 'digits', 'mnist', 'fashion-mnist', 'cifar10', 'cifar100', 'svhn', "
     "'imagefolder' to be read from files, got 'mnist10'; a set held in memory is passed as data=(train, test)"),
    (lambda out: fastdd.plan(RunConfig(**TINY, dataset="mnist10", out=out)), "dataset (--dataset) must be one of"),
    (lambda out: fastdd.evaluate(out, data=random_data(), data_root=out),
     "data_root (--data-root) reads files; it must be None with data, got"),
])
def test_the_api_refuses_bad_data_in_one_line_before_any_work(tmp_path, call, message):
    out = str(tmp_path / "run")
    with pytest.raises(ValueError) as error:
        call(out)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()
