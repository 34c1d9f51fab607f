"""ZCA whitening: the transform against its definition, the data set hands out whitened images, and
runs record it so that evaluation whitens the same way."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import make_dataset
from fastdd.cli import main
from fastdd.data.zca import fit_zca, whitened
from fastdd.synset import SyntheticSet


def definition(images: torch.Tensor, eps: float) -> torch.Tensor:
    """Whitened images by the original's recipe: unbiased covariance, SVD, U diag((S + eps)^-1/2) U^T."""
    x = images.flatten(1).double()
    centred = x - x.mean(0)
    u, s, _ = torch.linalg.svd(centred.T @ centred / (len(x) - 1))
    return (centred @ (u * (s + eps).rsqrt()) @ u.T).view_as(images)


@pytest.fixture
def data():
    return make_dataset(num_classes=3, per_class=40, channels=2, size=3)  # D = 18 < N = 120


def test_matches_the_definition(data):
    whitened_train, _ = whitened(data, data, regularization=0.1)
    idx = torch.arange(len(data))
    torch.testing.assert_close(whitened_train.get(idx).double(), definition(data.get(idx), 0.1), rtol=1e-4, atol=1e-4)


def test_whitened_covariance_is_the_identity_without_regularization(data):
    train, _ = whitened(data, data, regularization=1e-8)
    x = train.get(torch.arange(len(train))).flatten(1).double()
    torch.testing.assert_close(torch.cov(x.T), torch.eye(x.shape[1], dtype=torch.float64), rtol=0, atol=1e-3)


def test_denormalize_inverts_normalize(data):
    train, _ = whitened(data, data)
    pixels = data.images[:5]
    torch.testing.assert_close(train.denormalize(train.normalize(pixels)), pixels.float() / 255, rtol=1e-4, atol=1e-4)
    single = train.normalize(pixels[0])
    torch.testing.assert_close(single, train.normalize(pixels[:1])[0])


def test_test_set_uses_the_training_fit(data):
    other = make_dataset(num_classes=3, per_class=5, channels=2, size=3, seed=7)
    train, test = whitened(data, other)
    assert test.whitening is train.whitening
    zca = fit_zca(data)
    idx = torch.arange(len(other))
    torch.testing.assert_close(test.get(idx), zca.apply(other.get(idx)))


def test_bad_arguments(data):
    with pytest.raises(ValueError, match="regularization"):
        fit_zca(data, regularization=0.0)
    with pytest.raises(ValueError, match="whitened already"):
        fit_zca(whitened(data, data)[0])
    with pytest.raises(ValueError, match="at least 2"):
        fit_zca(dataclasses.replace(data, images=data.images[:1], labels=data.labels[:1]))


def test_distill_records_it_and_evaluate_whitens_again(tmp_path):
    out = tmp_path / "run"
    tiny = ["--dataset", "digits", "--method", "dc", "--ipc", "1", "--iterations", "1", "--batch-real", "8",
            "--model", "ConvNetW32", "--eval-model", "ConvNetW32", "--eval-models", "0", "--quiet"]
    assert main(["distill", *tiny, "--zca", "--out", str(out)]) == 0
    synset = SyntheticSet.load(out / "synset.safetensors")
    assert synset.meta["zca"] == 0.1
    assert main(["evaluate", str(out), "--models", "1", "--eval-epochs", "1", "--eval-model", "ConvNetW32",
                 "--no-baseline", "--quiet", "--report", str(tmp_path / "r.json")]) == 0
