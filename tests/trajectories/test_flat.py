"""Sharpness-aware training (fastdd.trajectories.flat): steps against the formulas written out as vector maths, radius
0 as plain SGD, BatchNorm statistics, the training loop's closure, flat experts (meta, resume, CLI) and data-parallel
steps."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector

from fastdd.cli import main
from fastdd.data import load_dataset
from fastdd.models import fused_blocks, get_network
from fastdd.train import train_epoch
from fastdd.trajectories.experts import train_experts
from fastdd.trajectories.files import Trajectory, expert_path
from fastdd.trajectories.flat import SharpnessAware

MODEL = "ConvNetW32"


def tiny_net(batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    middle = [nn.BatchNorm1d(5)] if batchnorm else []
    return nn.Sequential(nn.Linear(4, 5), *middle, nn.Tanh(), nn.Linear(5, 3)).double()


def batches(count: int = 2) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
            for _ in range(count)]


def loss_and_gradient(net: nn.Module, w: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The batch's mean cross-entropy at the parameter vector ``w`` and its gradient there, as vectors."""
    w = w.detach().requires_grad_()
    named = dict(net.named_parameters())
    pieces = w.split([p.numel() for p in named.values()])
    params = {name: piece.view_as(p) for (name, p), piece in zip(named.items(), pieces)}
    loss = F.cross_entropy(functional_call(net, params, (x,)), y)
    return loss.detach(), torch.autograd.grad(loss, w)[0]


def reference_training(net: nn.Module, radius: float, lr: float, momentum: float, weight_decay: float
                       ) -> tuple[Tensor, list[Tensor]]:
    """The parameter vector after one step a batch, written out from FTD's formulas: the GSAM gradient with the
    adaptive perturbation, then SGD (momentum without dampening, weight decay added to the gradient)."""
    w = parameters_to_vector(net.parameters()).detach().clone()
    velocity, losses = None, []
    for x, y in batches():
        loss, g = loss_and_gradient(net, w, x, y)
        e = radius * (w * w * g) / (torch.linalg.vector_norm(w.abs() * g) + 1e-12)
        _, g_perturbed = loss_and_gradient(net, w + e, x, y)
        cos = g.dot(g_perturbed) / (g.norm() * g_perturbed.norm() + 1e-12)
        vertical = g - cos * g.norm() * g_perturbed / (g_perturbed.norm() + 1e-12)
        d = g_perturbed - 0.4 * vertical + weight_decay * w  # FTD's alpha 0.4
        velocity = d if velocity is None else momentum * velocity + d
        w = w - lr * velocity
        losses.append(loss)
    return w, losses


def optimiser_training(net: nn.Module, optimizer: torch.optim.Optimizer | SharpnessAware, count: int = 2
                       ) -> list[Tensor]:
    """One ``optimizer.step(closure)`` for each of ``batches(count)``; the losses it returns."""
    losses = []
    for x, y in batches(count):
        def closure() -> Tensor:
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss
        optimizer.zero_grad()
        losses.append(optimizer.step(closure).detach())
    return losses


def close(a: Tensor, b: Tensor, rtol: float = 1e-12) -> bool:
    return bool(torch.linalg.vector_norm(a - b) <= rtol * torch.linalg.vector_norm(b))


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 5e-4)])
@pytest.mark.parametrize("radius", [0.01, 0.5])
def test_steps_follow_the_formulas(radius, momentum, weight_decay):
    net = tiny_net()
    start = parameters_to_vector(net.parameters()).detach().clone()
    expected, expected_losses = reference_training(net, radius, 0.1, momentum, weight_decay)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    losses = optimiser_training(net, SharpnessAware(sgd, radius, net))
    got = parameters_to_vector(net.parameters()).detach()
    assert close(got, expected)
    assert all(close(a, b) for a, b in zip(losses, expected_losses))  # the first pass's loss, at w

    plain = tiny_net()
    assert torch.equal(parameters_to_vector(plain.parameters()), start)
    optimiser_training(plain, torch.optim.SGD(plain.parameters(), lr=0.1, momentum=momentum,
                                              weight_decay=weight_decay))
    assert not close(got, parameters_to_vector(plain.parameters()).detach(), rtol=1e-6)  # not a vacuous check


def test_radius_zero_is_plain_sgd_to_the_bit():
    nets = [tiny_net(), tiny_net()]
    sgds = [torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) for net in nets]
    flat = SharpnessAware(sgds[1], 0.0, nets[1])
    losses = [torch.stack(optimiser_training(net, optimizer)) for net, optimizer in zip(nets, (sgds[0], flat))]
    assert torch.equal(*losses)
    assert torch.equal(parameters_to_vector(nets[0].parameters()), parameters_to_vector(nets[1].parameters()))
    assert flat.param_groups is sgds[1].param_groups


def test_state_dict_is_the_base_optimisers():
    nets = [tiny_net(), tiny_net()]
    flats = [SharpnessAware(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), 0.1, net) for net in nets]
    optimiser_training(nets[0], flats[0], count=1)
    state = flats[0].state_dict()
    assert state["param_groups"] == flats[0].base.state_dict()["param_groups"] and len(state["state"]) == 4
    nets[1].load_state_dict(nets[0].state_dict())
    flats[1].load_state_dict(copy.deepcopy(state))  # as from a file: loading alone would share the buffers
    for net, flat in zip(nets, flats):
        optimiser_training(net, flat)  # momentum buffers carried over: the same steps
    assert torch.equal(parameters_to_vector(nets[0].parameters()), parameters_to_vector(nets[1].parameters()))


def test_second_pass_leaves_batchnorm_statistics_alone():
    """One step from the same weights: the running statistics are those of the plain step's single pass."""
    nets = [tiny_net(batchnorm=True), tiny_net(batchnorm=True)]
    optimiser_training(nets[0], torch.optim.SGD(nets[0].parameters(), lr=0.1), count=1)
    optimiser_training(nets[1], SharpnessAware(torch.optim.SGD(nets[1].parameters(), lr=0.1), 0.5, nets[1]), count=1)
    plain, flat = nets[0][1], nets[1][1]
    assert flat.track_running_stats and int(flat.num_batches_tracked) == 1
    assert torch.equal(flat.running_mean, plain.running_mean) and torch.equal(flat.running_var, plain.running_var)
    assert not torch.equal(nets[0][0].weight, nets[1][0].weight)  # the steps themselves differ


def test_radius_is_checked():
    net = tiny_net()
    with pytest.raises(ValueError, match="radius must be a finite number >= 0"):
        SharpnessAware(torch.optim.SGD(net.parameters(), lr=0.1), -0.1, net)


def test_train_epoch_steps_as_a_plain_loop_does():
    """One closure a batch, called once by SGD: the numbers of zero_grad, backward, step."""
    x = torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.arange(40) % 10
    nets = [get_network(MODEL, 3, 10, (16, 16), torch.Generator().manual_seed(0)) for _ in range(2)]
    sgds = [torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4) for net in nets]
    loss = train_epoch(nets[0], x, y, sgds[0], torch.Generator().manual_seed(3), batch_size=16)
    order, total = torch.randperm(40, generator=torch.Generator().manual_seed(3)), 0.0
    for start in range(0, 40, 16):
        idx = order[start : start + 16]
        sgds[1].zero_grad()
        with fused_blocks():
            batch_loss = F.cross_entropy(nets[1](x[idx]), y[idx])
        batch_loss.backward()
        sgds[1].step()
        total += batch_loss.item() * len(idx)
    assert loss == total / 40
    assert torch.equal(parameters_to_vector(nets[0].parameters()), parameters_to_vector(nets[1].parameters()))


SETTINGS = dict(epochs=3, batch_size=256, model=MODEL, seed=7, progress=False)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")[0]


def test_flat_experts_record_the_radius(digits, tmp_path):
    train_experts(digits, tmp_path / "plain", num_experts=1, **SETTINGS)
    train_experts(digits, tmp_path / "full", num_experts=2, flat=0.01, **SETTINGS)
    plain = Trajectory.load(expert_path(tmp_path / "plain", 0))
    flat = Trajectory.load(expert_path(tmp_path / "full", 0))
    assert "flat" not in plain.meta and flat.meta["flat"] == 0.01
    assert torch.equal(flat.params[0], plain.params[0]) and not torch.equal(flat.params[1], plain.params[1])
    with pytest.raises(ValueError, match=r"other settings .*flat \(None asked, 0\.01 there\)"):
        train_experts(digits, tmp_path / "full", num_experts=2, **SETTINGS)


def test_cli_refuses_a_negative_radius(tmp_path, capsys):
    out = tmp_path / "experts"
    assert main(["experts", "--dataset", "digits", "--out", str(out), "--num-experts", "1", "--flat", "-1",
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--flat" in err and "-1" in err
    assert not out.exists()

