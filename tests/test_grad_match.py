"""grad_match_distance against the definitions of DESIGN section 2, written out here."""

from __future__ import annotations

import pytest
import torch

from fastdd.ops import grad_match_distance

SHAPES = [(37, 3, 3, 3), (5, 7), (37,), (1, 1, 3, 3), (3, 2, 5)]


def grads(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]


def ours(a, b):
    total = torch.zeros((), dtype=torch.float64)
    for x, y in zip(a, b):
        if x.dim() == 1:
            continue
        x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
        for r in range(len(x)):
            total += 1 - (x[r] @ y[r]) / (x[r].norm() * y[r].norm() + 1e-6)
    return total


def cos(a, b):
    x, y = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return 1 - (x @ y) / (x.norm() * y.norm() + 1e-6)


REFERENCES = {
    "ours": ours,
    "mse": lambda a, b: sum(((x - y) ** 2).sum() for x, y in zip(a, b)),
    "l1": lambda a, b: sum((x - y).abs().sum() for x, y in zip(a, b)),
    "cos": cos,
}


@pytest.mark.parametrize("metric", sorted(REFERENCES))
def test_matches_reference(metric):
    a, b = grads(0), grads(1)
    torch.testing.assert_close(grad_match_distance(a, b, metric), REFERENCES[metric](a, b))


@pytest.mark.parametrize("metric", sorted(REFERENCES))
def test_gradcheck(metric):
    a = [t[:2].clone().requires_grad_(True) for t in grads(2)]
    b = [t[:2] for t in grads(3)]
    assert torch.autograd.gradcheck(lambda *xs: grad_match_distance(list(xs), b, metric), a)


def test_ours_ignores_one_dimensional_tensors():
    a, b = [torch.randn(4)], [torch.randn(4)]
    assert grad_match_distance(a, b) == 0


def test_zero_gradient_is_finite():
    z = [torch.zeros(3, 4)]
    assert torch.isfinite(grad_match_distance(z, z)) and grad_match_distance(z, z) == 3


@pytest.mark.parametrize("a, b, metric, match", [
    ([torch.ones(2, 2)], [torch.ones(2, 3)], "ours", "shape"),
    ([torch.ones(2, 2)], [], "ours", "equal length"),
    ([torch.ones(2, 2)], [torch.ones(2, 2)], "l2", "metric"),
])
def test_bad_input(a, b, metric, match):
    with pytest.raises(ValueError, match=match):
        grad_match_distance(a, b, metric)
