"""The per-layer rule registry: lookup along the type's MRO, registration, refusals with their reasons, and each
rule's two reductions (per-sample squared norms, group sums) against per-sample autograd gradients in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastdd.ops import layer_rules
from fastdd.ops.layer_rules import SummedOver, has_rule, register, rule_for

F64 = dict(dtype=torch.float64)


def per_sample_gradients(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """The oracle: {parameter: [B, *shape]}, one autograd call per sample of the loss <layer(x_i), g_i>."""
    params = list(layer.parameters())
    rows = [torch.autograd.grad((layer(x[i:i + 1]) * g[i:i + 1]).sum(), params) for i in range(len(x))]
    return {p: torch.stack(column) for p, column in zip(params, zip(*rows))}


LAYERS = {
    "linear": (lambda: nn.Linear(5, 3), (6, 5)),
    "linear over positions": (lambda: nn.Linear(5, 3), (6, 4, 5)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3, padding=1), (6, 2, 7, 7)),
    "conv2d reflect, stride, dilation": (
        lambda: nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2, padding_mode="reflect"), (4, 2, 9, 8)),
    "conv2d same, groups, no bias": (
        lambda: nn.Conv2d(4, 6, (3, 2), padding="same", groups=2, bias=False), (6, 4, 6, 7)),
    "group norm": (lambda: nn.GroupNorm(2, 4), (6, 4, 5, 5)),
    "instance norm": (lambda: nn.InstanceNorm2d(3, affine=True), (4, 3, 5, 6)),
    "layer norm": (lambda: nn.LayerNorm([3, 4, 4]), (6, 3, 4, 4)),
    "layer norm over positions": (lambda: nn.LayerNorm(5), (4, 3, 5)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # the asymmetric case
@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_sq_norms_and_group_sums_match_per_sample_gradients(name, backend):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = make().double()
    for p in layer.parameters():  # away from the default init, so every term of the rules counts
        p.data.normal_()
    x = torch.randn(shape, **F64)
    g = torch.randn(layer(x).shape, **F64)
    expected = per_sample_gradients(layer, x, g)
    grads = rule_for(layer)(layer, x, g, backend)
    assert list(grads) == list(layer.parameters())
    for p, per_sample in grads.items():
        torch.testing.assert_close(per_sample.sq_norms(), expected[p].flatten(1).pow(2).sum(1), rtol=1e-10, atol=1e-12)
        groups = 2
        want = expected[p].reshape(groups, -1, *p.shape).sum(1)
        torch.testing.assert_close(per_sample.group_sums(groups), want, rtol=1e-10, atol=1e-12)


def test_the_forms_compute_nothing_until_reduced():
    """A frozen parameter costs nothing: the rule returns forms, the work happens in their reductions."""
    layer = nn.Conv2d(2, 3, 3).double()
    x, g = torch.randn(2, 2, 5, 5, **F64), torch.randn(2, 3, 3, 3, **F64)
    bias = rule_for(layer)(layer, x, g, "torch")[layer.bias]
    assert isinstance(bias, SummedOver) and bias.t is g


class Scale(nn.Module):
    """A per-sample layer of its own: y = x * weight."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3, **F64))
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class Rescale(Scale):
    """A subclass: finds its base's rule."""


def test_register_adds_a_rule_that_subclasses_find(monkeypatch):
    monkeypatch.setattr(layer_rules, "_RULES", dict(layer_rules._RULES))
    assert not has_rule(Scale())

    @register(Scale)
    def scale(layer, a, g, backend):
        return {layer.weight: SummedOver(a * g)}

    assert rule_for(Scale()) is scale and rule_for(Rescale()) is scale
    layer, x, g = Rescale(), torch.randn(4, 3, **F64), torch.randn(4, 3, **F64)
    torch.testing.assert_close(rule_for(layer)(layer, x, g, "torch")[layer.weight].group_sums(2),
                               per_sample_gradients(layer, x, g)[layer.weight].reshape(2, 2, 3).sum(1))


@pytest.mark.parametrize("layer, match", [
    (nn.Conv1d(1, 2, 3), r"Conv1d has no per-sample gradient rule; there are rules for \[.*'Conv2d'.*'Linear'"),
    (nn.BatchNorm2d(3), "BatchNorm2d mixes the samples of a batch"),
    (nn.BatchNorm1d(3, track_running_stats=False), "BatchNorm1d mixes the samples of a batch"),
    (nn.InstanceNorm2d(3, affine=True, track_running_stats=True), "InstanceNorm2d tracks running statistics"),
])
def test_refused_layers_say_why(layer, match):
    assert not has_rule(layer)
    with pytest.raises(ValueError, match=match):
        rule_for(layer)
