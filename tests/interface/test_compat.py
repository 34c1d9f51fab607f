"""fastdd.compat against straightforward implementations of the reference utilities' definitions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastdd.compat import (
    DiffAugment,
    ModelEmaV2,
    ParamDiffAug,
    SoftCrossEntropy,
    TensorDataset,
    distance_wb,
    epoch,
    evaluate_synset,
    get_loops,
    get_network,
    match_loss,
)


def reference_distance_wb(gwr, gws):
    shape = gwr.shape
    if len(shape) == 1:
        return torch.tensor(0.0)
    if len(shape) > 2:
        gwr, gws = gwr.reshape(shape[0], -1), gws.reshape(shape[0], -1)
    return torch.sum(1 - torch.sum(gwr * gws, dim=-1) / (torch.norm(gwr, dim=-1) * torch.norm(gws, dim=-1) + 0.000001))


def reference_match_loss(gw_syn, gw_real, metric):
    if metric == "ours":
        return sum(reference_distance_wb(r, s) for s, r in zip(gw_syn, gw_real))
    if metric == "mse":
        return sum(((s - r) ** 2).sum() for s, r in zip(gw_syn, gw_real))
    a, b = torch.cat([s.reshape(-1) for s in gw_syn]), torch.cat([r.reshape(-1) for r in gw_real])
    return 1 - torch.sum(a * b) / (torch.norm(a) * torch.norm(b) + 0.000001)


def grads(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in [(37, 3, 3, 3), (37,), (10, 37), (3, 5, 2)]]


@pytest.mark.parametrize("metric", ["ours", "mse", "cos"])
def test_match_loss(metric):
    a, b = grads(0), grads(1)
    torch.testing.assert_close(match_loss(a, b, SimpleNamespace(dis_metric=metric, device="cpu")),
                               reference_match_loss(a, b, metric))


def test_distance_wb():
    for r, s in zip(grads(2), grads(3)):
        torch.testing.assert_close(distance_wb(r, s).double(), reference_distance_wb(r, s).double())


def test_get_loops_and_network():
    assert get_loops(1) == (1, 1) and get_loops(10) == (10, 50) and get_loops(50) == (50, 10)
    net = get_network("ConvNet", 3, 10, (32, 32))
    assert sum(p.numel() for p in net.parameters()) == 320_010


def test_get_network_follows_torch_manual_seed():
    torch.manual_seed(5)
    a = get_network("ConvNet", 1, 10, (28, 28))
    torch.manual_seed(5)
    b = get_network("ConvNet", 1, 10, (28, 28))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_diff_augment_is_siamese_under_one_seed():
    x = torch.randn(6, 3, 16, 16)
    param = ParamDiffAug()
    strategy = "color_crop_cutout_flip_scale_rotate"
    for seed in range(5):
        torch.testing.assert_close(DiffAugment(x, strategy, seed=seed, param=param),
                                   DiffAugment(x.clone(), strategy, seed=seed, param=param))
        assert param.latestseed == seed
    same = DiffAugment(x[:1].expand(4, -1, -1, -1), "crop", seed=3, param=param)
    assert all(torch.equal(same[0], same[i]) for i in range(4))  # one transform for the whole batch


def test_diff_augment_unseeded_modes():
    x = torch.randn(8, 3, 16, 16, requires_grad=True)
    assert DiffAugment(x, "none") is x
    y = DiffAugment(x[:1].expand(8, -1, -1, -1), "crop", param=ParamDiffAug())
    assert not all(torch.equal(y[0], y[i]) for i in range(8))  # independent per image
    z = DiffAugment(x, "color_crop", param=ParamDiffAug(aug_mode="M"))
    z.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="aug_mode"):
        DiffAugment(x, "crop", param=ParamDiffAug(aug_mode="X"))


def test_tensor_dataset_epoch_and_evaluate_synset():
    torch.manual_seed(0)
    images, labels = torch.randn(20, 1, 28, 28), torch.arange(10).repeat(2)
    data = TensorDataset(images, labels)
    assert len(data) == 20 and torch.equal(data[3][0], images[3])
    test_loader = torch.utils.data.DataLoader(data, batch_size=8)
    args = SimpleNamespace(device="cpu", lr_net=0.01, epoch_eval_train=2, batch_train=256, dsa=True,
                           dsa_strategy="color_crop_cutout_scale_rotate", dsa_param=ParamDiffAug())
    net = get_network("ConvNet", 1, 10, (28, 28))
    loss, acc = epoch("test", test_loader, net, None, torch.nn.CrossEntropyLoss(), args, aug=False)
    assert loss > 0 and 0 <= acc <= 1
    net, acc_train, acc_test = evaluate_synset(0, net, images, labels, test_loader, args)
    assert 0 <= acc_train <= 1 and 0 <= acc_test <= 1
    args.dsa, args.dc_aug_param = False, {"strategy": "crop_scale_rotate"}
    with pytest.raises(ValueError, match="dc_aug_param"):
        epoch("train", test_loader, net, torch.optim.SGD(net.parameters(), 0.01), torch.nn.CrossEntropyLoss(), args,
              aug=True)


def test_soft_cross_entropy_is_datms_definition():
    g = torch.Generator().manual_seed(0)
    inputs, target = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g,
                                                                                      dtype=torch.float64)
    want = torch.sum(-torch.log_softmax(inputs, 1) * torch.softmax(target, 1)) / 5
    torch.testing.assert_close(SoftCrossEntropy(inputs, target), want, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="reduction must be 'average'"):
        SoftCrossEntropy(inputs, target, reduction="sum")


def test_model_ema_v2_averages_the_tensors():
    x = torch.zeros(3)
    ema = ModelEmaV2([x], decay=0.75)
    for value in (4.0, 8.0):
        x.fill_(value)
        ema.update([x])
    torch.testing.assert_close(ema.module[0], torch.full((3,), 0.75 * (0.25 * 4.0) + 0.25 * 8.0))


def test_evaluate_synset_trains_on_soft_labels_with_datms_criterion():
    torch.manual_seed(0)
    images, soft = torch.randn(20, 1, 28, 28), torch.randn(20, 10)
    test_loader = torch.utils.data.DataLoader(TensorDataset(images, torch.arange(10).repeat(2)), batch_size=8)
    args = SimpleNamespace(device="cpu", lr_net=0.01, epoch_eval_train=1, batch_train=256, dsa=False)
    net = get_network("ConvNet", 1, 10, (28, 28))
    _, acc_train, acc_test = evaluate_synset(0, net, images, soft, test_loader, args, train_criterion=SoftCrossEntropy)
    assert 0 <= acc_train <= 1 and 0 <= acc_test <= 1
