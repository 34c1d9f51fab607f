"""ConvNet / ResNet-18 shapes, parameter counts, options and generator-seeded initialisation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastdd.models import (
    NETWORK_NAMES,
    ConvNet,
    ResNet18,
    check_image_size,
    eager_block,
    fused_blocks,
    get_network,
    has_batchnorm,
    init_parameters,
    min_image_size,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(("shape", "count"), [((3, 32, 32), 320_010), ((1, 28, 28), 317_706)])
def test_reference_parameter_counts(shape, count):
    net = get_network("ConvNet", shape[0], 10, shape[1:], gen())
    assert n_params(net) == count
    x = torch.randn(2, *shape)
    assert net.embed(x).shape == (2, 2048)
    assert net(x).shape == (2, 10)


@pytest.mark.parametrize(
    ("shape", "depth", "feat_hw"),
    [
        ((1, 28, 28), 3, 4),  # pad 3 -> 32 -> 16 -> 8 -> 4
        ((3, 32, 32), 3, 4),
        ((1, 8, 8), 3, 1),  # pad 3 -> 12 -> 6 -> 3 -> 1
        ((3, 8, 8), 3, 1),
        ((3, 64, 64), 4, 4),  # ConvNetD4 for 64 px
        ((3, 24, 40), 2, None),  # non-square
    ],
)
def test_convnet_shapes(shape, depth, feat_hw):
    net = ConvNet(shape[0], 7, shape[1:], width=16, depth=depth)
    x = torch.randn(3, *shape)
    feats = net.embed(x)
    if feat_hw is not None:
        assert net.feat_dim == 16 * feat_hw * feat_hw
    else:
        assert net.feat_dim == 16 * 6 * 10
    assert feats.shape == (3, net.feat_dim)
    out = net(x)
    assert out.shape == (3, 7)
    torch.testing.assert_close(out, net.classifier(feats))


def test_first_conv_padding_only_for_one_channel():
    gray = ConvNet(1, 10, (28, 28), width=8)
    rgb = ConvNet(3, 10, (28, 28), width=8)
    assert gray.features[0].padding == (3, 3)
    assert rgb.features[0].padding == (1, 1)
    assert all(m.padding == (1, 1) for m in gray.features[1:] if isinstance(m, nn.Conv2d))
    assert rgb.feat_dim == 8 * 3 * 3  # 28 -> 14 -> 7 -> 3


@pytest.mark.parametrize(
    ("norm", "layer"),
    [
        ("instancenorm", nn.GroupNorm),
        ("batchnorm", nn.BatchNorm2d),
        ("layernorm", nn.LayerNorm),
        ("groupnorm", nn.GroupNorm),
        ("none", None),
    ],
)
def test_norm_options(norm, layer):
    net = ConvNet(3, 5, (16, 16), width=16, norm=norm)
    norms = [m for m in net.features if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm))]
    if layer is None:
        assert norms == []
    else:
        assert len(norms) == 3 and all(type(m) is layer for m in norms)
    if norm == "instancenorm":
        assert all(m.num_groups == 16 and m.affine for m in norms)
    if norm == "groupnorm":
        assert all(m.num_groups == 4 and m.affine for m in norms)
    if norm == "layernorm":
        # normalised over the conv output [C, H, W] of each block, before pooling
        assert [m.normalized_shape for m in norms] == [(16, 16, 16), (16, 8, 8), (16, 4, 4)]
        assert all(m.elementwise_affine for m in norms)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    assert has_batchnorm(net) == (norm == "batchnorm")


@pytest.mark.parametrize(("act", "layer"), [("relu", nn.ReLU), ("sigmoid", nn.Sigmoid), ("leakyrelu", nn.LeakyReLU)])
def test_activation_options(act, layer):
    net = ConvNet(3, 5, (8, 8), width=8, act=act)
    acts = [m for m in net.features if isinstance(m, (nn.ReLU, nn.Sigmoid, nn.LeakyReLU))]
    assert len(acts) == 3 and all(type(m) is layer for m in acts)
    if act == "leakyrelu":
        assert acts[0].negative_slope == 0.01
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 5)


@pytest.mark.parametrize(("pooling", "feat_hw"), [("avgpooling", 2), ("maxpooling", 2), ("none", 16)])
def test_pooling_options(pooling, feat_hw):
    net = ConvNet(3, 5, (16, 16), width=8, pooling=pooling)
    pools = [m for m in net.features if isinstance(m, (nn.AvgPool2d, nn.MaxPool2d))]
    assert len(pools) == (0 if pooling == "none" else 3)
    assert net.feat_dim == 8 * feat_hw * feat_hw
    assert net.embed(torch.randn(2, 3, 16, 16)).shape == (2, net.feat_dim)


@pytest.mark.parametrize("name", ["ConvNet", "ConvNetNN", "ConvNetNP", "ConvNetBN"])
def test_blocks_are_the_features_in_order(name):
    net = get_network(name, 1, 5, (12, 12), gen())
    assert len(net.blocks) == 3
    assert [m for block in net.blocks for m in block if m is not None] == list(net.features)
    assert all((block.norm is None) == (name == "ConvNetNN") for block in net.blocks)
    assert all((block.pool is None) == (name == "ConvNetNP") for block in net.blocks)


def test_embed_runs_every_block_through_run_block():
    net = get_network("ConvNet", 1, 5, (12, 12), gen()).double()
    x = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    ran = []

    def run_block(block, x):
        ran.append(block)
        return eager_block(block, x)

    torch.testing.assert_close(net(x, run_block=run_block), net(x))
    assert ran == list(net.blocks)


@pytest.mark.parametrize("name", ["ConvNet", "ConvNetNP"])
def test_feature_map_is_the_last_block_before_its_pooling_inside_fused_blocks_too(name):
    net = get_network(name, 1, 5, (12, 12), gen()).double()
    x = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    eager = net.feature_map(x)
    last = net.blocks[-1]
    pooled = eager if last.pool is None else last.pool(eager)
    torch.testing.assert_close(pooled.flatten(1), net.embed(x))
    with fused_blocks():
        torch.testing.assert_close(net.feature_map(x), eager, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["ResNet18", "ResNet18BN"])
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (1, 8, 8)])
def test_resnet18_shapes(name, shape):
    net = get_network(name, shape[0], 10, shape[1:], gen())
    assert isinstance(net, ResNet18)
    x = torch.randn(2, *shape)
    assert net.embed(x).shape == (2, 512)
    assert net(x).shape == (2, 10)
    assert has_batchnorm(net) == (name == "ResNet18BN")


def test_resnet18_structure():
    net = ResNet18(3, 10)
    assert n_params(net) == 11_173_962  # CIFAR ResNet-18 (BN and GroupNorm(C, C) have the same count)
    assert n_params(ResNet18(3, 10, norm="batchnorm")) == 11_173_962
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    gns = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert gns and all(m.num_groups == m.num_channels for m in gns)
    assert not has_batchnorm(net)


@pytest.mark.parametrize("name", NETWORK_NAMES)
def test_every_name_builds_and_runs(name):
    size = 64 if name in ("ConvNetD5", "ConvNetD6") else 16
    net = get_network(name, 3, 4, (size, size), gen())
    assert net(torch.randn(1, 3, size, size)).shape == (1, 4)


def test_named_variants_configure_convnet():
    def cfg(name):
        net = get_network(name, 3, 10, (32, 32), gen())
        convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
        return len(convs), convs[0].out_channels, {type(m) for m in net.features}

    assert cfg("ConvNet")[:2] == (3, 128)
    assert cfg("ConvNetD1")[:2] == (1, 128)
    assert cfg("ConvNetD4")[:2] == (4, 128)
    assert cfg("ConvNetW32")[:2] == (3, 32)
    assert cfg("ConvNetW256")[:2] == (3, 256)
    assert nn.BatchNorm2d in cfg("ConvNetBN")[2]
    assert nn.LayerNorm in cfg("ConvNetLN")[2]
    assert not {nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm} & cfg("ConvNetNN")[2]
    assert nn.MaxPool2d in cfg("ConvNetMP")[2] and nn.AvgPool2d not in cfg("ConvNetMP")[2]


@pytest.mark.parametrize("name", ["ConvNetW32", "ConvNetBN", "ResNet18BN"])
def test_get_network_is_deterministic_and_ignores_global_rng(name):
    with torch.random.fork_rng():
        torch.manual_seed(1)
        a = get_network(name, 3, 10, (16, 16), gen(42))
        torch.manual_seed(2)
        torch.rand(100)
        b = get_network(name, 3, 10, (16, 16), gen(42))
        c = get_network(name, 3, 10, (16, 16), gen(43))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:  # parameters and buffers (BatchNorm running statistics)
        assert torch.equal(sa[k], sb[k]), k
    first = next(k for k in sa if k.endswith("weight"))
    assert not torch.equal(sa[first], sc[first])
    x = torch.randn(2, 3, 16, 16)
    a.eval()
    b.eval()
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_get_network_does_not_consume_global_rng():
    with torch.random.fork_rng():
        torch.manual_seed(5)
        get_network("ConvNetBN", 1, 10, (8, 8), gen())
        after = torch.rand(3)
        torch.manual_seed(5)
        expected = torch.rand(3)
    assert torch.equal(after, expected)


def test_init_parameters_uses_default_distributions():
    net = ConvNet(3, 10, (8, 8), width=32, norm="batchnorm")
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(7.0)
        net.features[1].running_mean.fill_(3.0)
    init_parameters(net, gen(3))
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            bound = 1 / math.sqrt(fan_in)
            for t in (m.weight, m.bias):
                assert t.abs().max() <= bound
                assert t.abs().max() > 0.8 * bound  # spread over the whole interval
            # uniform(-b, b) has std b / sqrt(3)
            assert abs(m.weight.std().item() - bound / math.sqrt(3)) < 0.15 * bound
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
            assert int(m.num_batches_tracked) == 0


def test_init_parameters_rejects_unknown_parameterised_module():
    net = nn.Sequential(nn.Linear(3, 3), nn.PReLU())
    with pytest.raises(TypeError, match="1.weight"):
        init_parameters(net, gen())


def test_unknown_names_and_bad_options():
    with pytest.raises(ValueError, match="ConvNetD4") as err:
        get_network("VGG11", 3, 10, (32, 32), gen())
    assert "'VGG11'" in str(err.value) and "ResNet18BN" in str(err.value)
    with pytest.raises(ValueError, match="norm='weird'"):
        ConvNet(3, 10, (32, 32), norm="weird")
    with pytest.raises(ValueError, match="act='tanh'"):
        ConvNet(3, 10, (32, 32), act="tanh")
    with pytest.raises(ValueError, match="pooling='avg'"):
        ConvNet(3, 10, (32, 32), pooling="avg")
    with pytest.raises(ValueError, match="too small"):
        ConvNet(3, 10, (8, 8), depth=4)
    with pytest.raises(ValueError, match="divisible by 4"):
        ConvNet(3, 10, (8, 8), width=6, norm="groupnorm")
    with pytest.raises(ValueError, match="im_size"):
        get_network("ConvNet", 3, 10, (32, 32, 3), gen())
    with pytest.raises(ValueError, match="channels"):
        ConvNet(0, 10, (8, 8))


# ----------------------------------------------------------------------------- the smallest image a network learns from
# A few of the sizes min_image_size finds, worked out by hand: ResNet18's three stride-2 stages leave ceil(S / 8) px,
# and its instance norms need 2; a grey ConvNet pads its first convolution by 3 (S + 4 px after it) and pools after
# every block; without pooling nothing shrinks but the 3-channel first map of 1x1 images (1 px).
SMALLEST = {("ResNet18", 1): 9, ("ResNet18", 3): 9, ("ResNet18BN", 1): 1, ("ConvNet", 1): 4, ("ConvNet", 3): 8,
            ("ConvNetD4", 1): 12, ("ConvNetD5", 1): 28, ("ConvNetD6", 3): 64, ("ConvNetNP", 1): 1, ("ConvNetNP", 3): 2}
# The data sets' images (channels, side) and the networks refused at their size.
REFUSED = {"digits": ((1, 8), {"ConvNetD4", "ConvNetD5", "ConvNetD6", "ResNet18"}),
           "mnist, fashion-mnist": ((1, 28), {"ConvNetD6"}),
           "cifar10, cifar100, svhn": ((3, 32), {"ConvNetD6"}),
           "64 px image folders": ((3, 64), set())}


def refused(name: str, channels: int, side: int) -> bool:
    try:
        check_image_size(name, channels, (side, side))
    except ValueError:
        return True
    return False


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", NETWORK_NAMES)
def test_the_smallest_image_a_network_learns_from_comes_from_its_layers(name, channels):
    side = min_image_size(name, channels)
    assert SMALLEST.get((name, channels), side) == side
    assert not refused(name, channels, side) and not refused(name, channels, side + 1)
    assert side == 1 or refused(name, channels, side - 1)


@pytest.mark.parametrize("data", REFUSED)
def test_the_networks_refused_at_each_data_set_size(data):
    (channels, side), expected = REFUSED[data]
    assert {name for name in NETWORK_NAMES if refused(name, channels, side)} == expected


def test_a_refusal_names_the_option_network_size_and_smallest_size():
    with pytest.raises(ValueError) as err:
        check_image_size("ResNet18", 1, (8, 8), "eval_model (--eval-model)")
    assert str(err.value) == ("eval_model (--eval-model): ResNet18 cannot learn from 1x8x8 images (its instance norm "
                              "layers.6.norm1 normalises each channel over a single pixel, so its output is the same "
                              "for every image); it needs images of at least 9x9: choose another network or larger "
                              "images")
    with pytest.raises(ValueError, match=r"^model \(--model\): ConvNetD6 cannot learn from 3x32x32 images \(its "
                                         r"feature map vanishes after block 6\); it needs images of at least 64x64"):
        check_image_size("ConvNetD6", 3, (32, 32))
    check_image_size("ResNet18", 3, (9, 12))  # non-square: every map keeps 2 px or more


def test_resnet18_on_8x8_images_gives_every_image_the_same_logits():
    """Why it is refused: its last stage's maps are 1x1, which its instance norms turn into their biases."""
    x = torch.randn(4, 1, 9, 9, generator=gen(1))
    blind = get_network("ResNet18", 1, 10, (8, 8), gen())(x[:, :, :8, :8])
    torch.testing.assert_close(blind, blind[:1].expand_as(blind))
    seeing = get_network("ResNet18", 1, 10, (9, 9), gen())(x)
    assert not torch.allclose(seeing, seeing[:1].expand_as(seeing))
