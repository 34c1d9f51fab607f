"""class_gradients (every class's parameter gradients from one pass) against one autograd call per
class, in float64: the gradients themselves and their derivative w.r.t. the images; the class-batched
matching distance against the per-class loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdd.methods.matching import (
    class_batched_distance,
    class_gradients,
    matching_distance,
    per_class_distance,
    supports_class_batching,
)
from fastdd.models import ConvNet, fused_blocks, get_network
from fastdd.ops import METRICS, grad_match_distance

PER_SAMPLE_NETS = ["ConvNetW32", "ConvNetLN", "ConvNetGN", "ConvNetNN", "ConvNetMP", "ConvNetNP", "ConvNetAS",
                   "ConvNetAL", "ConvNetD1"]
EXACT = dict(rtol=1e-10, atol=1e-12)


def network(name: str, channels: int, classes: int, size: int, seed: int = 0) -> torch.nn.Module:
    return get_network(name, channels, classes, (size, size), torch.Generator().manual_seed(seed)).double()


def loop_gradients(net: torch.nn.Module, x: torch.Tensor, classes: int) -> list[torch.Tensor]:
    """The reference: one forward and one backward (with graph) per class, stacked per parameter."""
    per_class = len(x) // classes
    params = list(net.parameters())
    grads = [torch.autograd.grad(F.cross_entropy(net(x[c * per_class:(c + 1) * per_class]),
                                                 torch.full((per_class,), c)), params, create_graph=True)
             for c in range(classes)]
    return [torch.stack(g) for g in zip(*grads)]


def compare(name: str, classes: int, per_class: int, channels: int = 1, size: int = 8, seed: int = 0) -> None:
    net = network(name, channels, classes, size, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(classes * per_class, channels, size, size, generator=g, dtype=torch.float64, requires_grad=True)
    got = class_gradients(net, x, classes, create_graph=True)
    want = loop_gradients(net, x, classes)
    assert [t.shape for t in got] == [t.shape for t in want]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **EXACT)
    # the derivative w.r.t. the images, along a random direction of the gradients
    directions = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in want]
    (d_got,) = torch.autograd.grad(sum((a * u).sum() for a, u in zip(got, directions)), x)
    (d_want,) = torch.autograd.grad(sum((b * u).sum() for b, u in zip(want, directions)), x)
    torch.testing.assert_close(d_got, d_want, **EXACT)


@pytest.mark.parametrize("name", PER_SAMPLE_NETS)
def test_matches_one_pass_per_class(name):
    compare(name, classes=3, per_class=2)


@given(classes=st.sampled_from([1, 2, 3, 7]), per_class=st.sampled_from([1, 2, 5]),
       channels=st.sampled_from([1, 3]), size=st.sampled_from([8, 9, 13]))
@settings(max_examples=12, deadline=None)
def test_odd_class_counts_batch_sizes_and_image_sizes(classes, per_class, channels, size):
    compare("ConvNetW32", classes, per_class, channels, size)


def test_without_graph_gives_detached_gradients():
    net = network("ConvNetW32", 1, 3, 8)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    got = class_gradients(net, x, 3)
    assert not any(t.requires_grad for t in got)
    for a, b in zip(got, loop_gradients(net, x, 3)):
        torch.testing.assert_close(a, b.detach(), **EXACT)


def test_runs_the_eager_blocks_inside_fused_blocks():
    """Its forward records every layer's input and output, which the fused blocks never form."""
    net = network("ConvNet", 1, 3, 8)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    with fused_blocks():
        got = class_gradients(net, x, 3)
    for a, b in zip(got, loop_gradients(net, x, 3)):
        torch.testing.assert_close(a, b.detach(), **EXACT)


@pytest.mark.parametrize("name", ["ConvNetBN", "ResNet18"])
def test_refuses_networks_that_mix_samples_or_are_unknown(name):
    net = get_network(name, 1, 3, (8, 8), torch.Generator().manual_seed(0))
    assert not supports_class_batching(net)
    with pytest.raises(ValueError, match="ConvNet without BatchNorm"):
        class_gradients(net, torch.randn(3, 1, 8, 8), 3)


@pytest.mark.parametrize("shape", [(7, 1, 8, 8), (6, 8, 8)])
def test_refuses_images_not_split_into_equal_classes(shape):
    net = ConvNet(1, 3, 8, width=8, depth=1)
    with pytest.raises(ValueError, match=r"x must be \[K \* B, C, H, W\]"):
        class_gradients(net, torch.randn(shape), 3)


def matching_case(name: str = "ConvNetW32", classes: int = 3, per_class: int = 2, seed: int = 0):
    """A float64 network, synthetic images (leaf) split per class, and random real-gradient targets."""
    net = network(name, 1, classes, 8, seed)
    g = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(classes * per_class, 1, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    targets = [[torch.randn(p.shape, generator=g, dtype=torch.float64) for p in net.parameters()]
               for _ in range(classes)]
    return net, images, list(images.split(per_class)), targets


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("conv_weights_only", [False, True])  # DC matches every parameter, IDC conv weights
def test_class_batched_distance_equals_per_class_loop(metric, conv_weights_only):
    net, images, syn, targets = matching_case()
    weights = list(net.parameters())
    if conv_weights_only:
        keep = [i for i, p in enumerate(weights) if p.dim() == 4]
        weights, targets = [weights[i] for i in keep], [[t[i] for i in keep] for t in targets]
    got = class_batched_distance(net, weights, syn, targets, metric)
    want = per_class_distance(net, weights, syn, targets, metric)
    torch.testing.assert_close(got, want, **EXACT)
    torch.testing.assert_close(torch.autograd.grad(got, images)[0], torch.autograd.grad(want, images)[0], **EXACT)


def whole_graph_distance(net, weights, syn, targets, metric):
    """The reference: every class's distance on one graph, differentiated once at the end."""
    total = syn[0].new_zeros(())
    for c, (x, target) in enumerate(zip(syn, targets)):
        grads = torch.autograd.grad(F.cross_entropy(net(x), torch.full((len(x),), c)), weights, create_graph=True)
        total = total + grad_match_distance(grads, target, metric)
    return total


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name", ["ConvNetW32", "ConvNetBN"])
def test_per_class_distance_equals_one_graph_over_every_class(metric, name):
    net, images, syn, targets = matching_case(name, classes=3, per_class=3)
    weights = list(net.parameters())
    got = per_class_distance(net, weights, [x * 1.5 for x in syn], targets, metric)  # an op before, as DSA's
    want = whole_graph_distance(net, weights, [x * 1.5 for x in syn], targets, metric)
    torch.testing.assert_close(got, want, **EXACT)
    torch.testing.assert_close(torch.autograd.grad(3 * got, images)[0], torch.autograd.grad(3 * want, images)[0],
                               **EXACT)


@pytest.mark.parametrize("name, sizes, path", [
    ("ConvNetW32", (2, 2, 2), "class_batched_distance"),
    ("ConvNetW32", (1, 1, 1), "class_batched_distance"),
    ("ConvNetBN", (2, 2, 2), "per_class_distance"),  # BatchNorm mixes samples
    ("ConvNetW32", (2, 1, 3), "per_class_distance"),  # unequal classes
    ("ConvNetW32", (3, 3, 3), "per_class_distance"),  # more than MAX_BATCHED_PER_CLASS images a class
])
def test_matching_distance_takes_the_right_path(monkeypatch, name, sizes, path):
    import fastdd.methods.matching as matching

    net = network(name, 1, 3, 8)
    images = torch.randn(sum(sizes), 1, 8, 8, dtype=torch.float64, requires_grad=True)
    syn = list(images.split(list(sizes)))
    targets = [[torch.randn(p.shape, dtype=torch.float64) for p in net.parameters()] for _ in sizes]
    weights = list(net.parameters())
    want = per_class_distance(net, weights, syn, targets, "ours")
    calls = []
    original = getattr(matching, path)
    monkeypatch.setattr(matching, path, lambda *args: calls.append(path) or original(*args))
    torch.testing.assert_close(matching_distance(net, weights, syn, targets, "ours"), want, **EXACT)
    assert calls == [path]
