"""Models of paper Table I: shapes, layer bookkeeping, block maths."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from hydra import compose, initialize_config_dir

from pfc_sweeps.choices import BLOCKS
from pfc_sweeps.config import ArchConfig, register_configs, validate
from pfc_sweeps.jobs.build import build_net
from pfc_sweeps.nets.resnets import PFCNet, build_model

register_configs()


def conf_arch(dataset: str) -> ArchConfig:
    """The architecture that ``python launch.py dataset=<dataset>`` builds (conf/arch via Hydra)."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"dataset={dataset}"])
    return validate(cfg).arch


# Paper Table I, written out independently of conf/arch/*.yaml:
# dataset -> (in_shape, K, [(C, H, W, blocks) per stage]); the last stage is studied.
PAPER = {
    "mnist": ((1, 28, 28), 10, [(1000, None, None, 10)]),
    "fashion_mnist": ((1, 28, 28), 10, [(32, 14, 14, 5), (64, 7, 7, 4)]),
    "cifar10": ((3, 32, 32), 10, [(64, 16, 16, 2), (128, 8, 8, 3), (256, 4, 4, 4)]),
    "stl10": (
        (3, 96, 96),
        10,
        [(64, 48, 48, 5), (128, 24, 24, 5), (256, 12, 12, 5), (512, 6, 6, 5)],
    ),
    "cifar100": (
        (3, 32, 32),
        100,
        [(64, 32, 32, 3), (128, 16, 16, 3), (256, 8, 8, 4), (512, 4, 4, 4)],
    ),
}


def _residual_output_shapes(model: PFCNet, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Output shape of every residual block of the net (trunk and studied), in order."""
    shapes: list[tuple[int, ...]] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
        for m in model.modules()
        if type(m).__name__ == "_Residual"
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return shapes


@pytest.mark.parametrize("name", list(PAPER))
def test_table_i_architectures(name: str) -> None:
    in_shape, k, stages = PAPER[name]
    torch.manual_seed(0)
    model = build_net(conf_arch(name), in_shape, k)
    assert isinstance(model, PFCNet)
    model.eval()
    x = torch.randn(2, *in_shape)
    with torch.no_grad():
        logits, feats = model(x)

    c, h, w, n_blocks = stages[-1]
    d = c if h is None else c * h * w
    assert logits.shape == (2, k)
    assert len(feats) == n_blocks + 1
    assert [tuple(f.shape) for f in feats] == [(2, d)] * (n_blocks + 1)
    assert model.num_blocks == n_blocks
    assert model.num_layers == n_blocks + 1
    assert model.feature_dims == [d] * (n_blocks + 1)
    assert model.classifier.in_features == d
    assert model.classifier.out_features == k

    # every stage of Table I: the right number of blocks at the right (C, H, W)
    expected = []
    for c_s, h_s, w_s, n_s in stages:
        expected += [(2, c_s) if h_s is None else (2, c_s, h_s, w_s)] * n_s
    assert _residual_output_shapes(model, x) == expected


def test_layers_are_studied_block_inputs_and_outputs() -> None:
    """Layer 0 = input of the first studied block, layer l = output of block l, last = classifier input."""
    torch.manual_seed(0)
    model = build_net(conf_arch("cifar10"), (3, 32, 32), 10).eval()
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.blocks[0].register_forward_pre_hook(
            lambda _m, args: seen.__setitem__("in0", args[0].flatten(1))
        ),
        model.classifier.register_forward_pre_hook(
            lambda _m, args: seen.__setitem__("cls_in", args[0])
        ),
    ]
    for i, blk in enumerate(model.blocks):
        hooks.append(
            blk.register_forward_hook(
                lambda _m, _a, out, i=i: seen.__setitem__(f"out{i}", out.flatten(1))
            )
        )
    with torch.no_grad():
        logits, feats = model(torch.randn(2, 3, 32, 32))
    for hk in hooks:
        hk.remove()
    assert torch.equal(feats[0], seen["in0"])
    for i in range(model.num_blocks):
        assert torch.equal(feats[i + 1], seen[f"out{i}"])
    assert torch.equal(feats[-1], seen["cls_in"])
    assert torch.allclose(logits, model.classifier(feats[-1]))


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("kind", ["fc", "conv"])
def test_forward_logits_matches_forward(kind: str, block: str) -> None:
    torch.manual_seed(1)
    kw = {"width": 16, "blocks": 3} if kind == "fc" else {"stages": [(4, 4, 1), (8, 2, 2)]}
    model = build_model(kind, (1, 8, 8), 10, block=block, **kw).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        logits, feats = model(x)
        assert torch.allclose(model.forward_logits(x), logits, atol=1e-6)
    assert len(feats) == model.num_layers


def _fc_branch_reference(block: str, blk, h: torch.Tensor) -> torch.Tensor:
    """Float64 re-computation of one FC block from its parameters (module docstring formulas)."""
    lin = [m for m in blk.branch if isinstance(m, torch.nn.Linear)]
    bns = [m for m in blk.branch if isinstance(m, torch.nn.BatchNorm1d)]

    def linear(i, z, bias=True):
        w = lin[i].weight.double()
        return z @ w.T + (lin[i].bias.double() if bias else 0.0)

    def bn(i, z):  # eval mode: running statistics
        m = bns[i]
        return (z - m.running_mean.double()) / torch.sqrt(
            m.running_var.double() + m.eps
        ) * m.weight.double() + m.bias.double()

    if block == "relu":
        return h + torch.relu(linear(0, h))
    if block == "mlp":
        return h + linear(1, torch.relu(linear(0, h)))
    if block == "preact_bn":
        return h + linear(1, torch.relu(bn(1, linear(0, torch.relu(bn(0, h)), False))), False)
    return h + bn(1, linear(1, torch.relu(bn(0, linear(0, h, False))), False))  # mlp_bn


@pytest.mark.parametrize("block", BLOCKS)
def test_fc_block_formulas(block: str) -> None:
    torch.manual_seed(2)
    model = build_model("fc", (6,), 3, width=7, blocks=2, block=block)
    for m in model.modules():  # non-trivial BN statistics and affine parameters
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(4, 6)
    with torch.no_grad():
        _, feats = model(x)
        emb = model.stem[1]
        h = x.double() @ emb.weight.double().T + emb.bias.double()
        assert torch.allclose(feats[0].double(), h, atol=1e-5)
        for i, blk in enumerate(model.blocks):
            h = _fc_branch_reference(block, blk, h)
            assert torch.allclose(feats[i + 1].double(), h, atol=1e-5)


def test_conv_relu_block_formula() -> None:
    torch.manual_seed(3)
    model = build_model("conv", (2, 8, 8), 4, stages=[(3, 4, 2)], block="relu").eval()
    x = torch.randn(3, 2, 8, 8)
    with torch.no_grad():
        _, feats = model(x)
        stem = model.stem[0]
        assert stem.stride == (2, 2)
        h = torch.relu(F.conv2d(x.double(), stem.weight.double(), stem.bias.double(), 2, 1))
        assert torch.allclose(feats[0].double(), h.flatten(1), atol=1e-5)
        for i, blk in enumerate(model.blocks):
            conv = blk.branch[0]
            h = h + torch.relu(F.conv2d(h, conv.weight.double(), conv.bias.double(), 1, 1))
            assert torch.allclose(feats[i + 1].double(), h.flatten(1), atol=1e-5)


def test_relu_net_fits_a_small_set() -> None:
    """Behavioural check: the default block trains (40 random points, 10 classes, 300 steps)."""
    torch.manual_seed(4)
    x, y = torch.randn(40, 12), torch.arange(40) % 10
    model = build_model("fc", (12,), 10, width=32, blocks=3, block="relu")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only spin on a shared CPU
    try:
        for _ in range(300):
            loss = F.cross_entropy(model.forward_logits(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert (model.forward_logits(x).argmax(1) == y).all()


def test_presets_build_for_their_data_sets() -> None:
    for name, in_shape, k, blocks in [("digits", (1, 8, 8), 10, 10), ("gaussian", (20,), 5, 8)]:
        model = build_net(conf_arch(name), in_shape, k)
        logits, feats = model(torch.randn(2, *in_shape))
        assert logits.shape == (2, k)
        assert len(feats) == model.num_layers == blocks + 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "mlp", "width": 8, "blocks": 2}, "unknown model kind 'mlp'"),
        ({"kind": "fc", "width": 8, "blocks": 2, "block": "bottleneck"}, "unknown block"),
        ({"kind": "fc", "width": 8}, "needs width >= 1 and blocks >= 1"),
        ({"kind": "fc", "width": 0, "blocks": 2}, "needs width >= 1"),
        ({"kind": "fc", "stages": [(4, 4, 1)]}, "not stages"),
        ({"kind": "conv", "width": 8, "blocks": 1}, "not width"),
        ({"kind": "conv", "stages": []}, "non-empty stages"),
        ({"kind": "conv", "stages": [(4, 3, 1)]}, "size 3 must divide the previous size 8"),
        ({"kind": "conv", "stages": [(4, 4, 1), (8, 8, 1)]}, "must divide the previous size 4"),
        ({"kind": "conv", "stages": [(4, 4, 1), (8, 2, 0)]}, "last .studied. stage needs >= 1"),
        ({"kind": "conv", "stages": [(4, 4)]}, "must be .channels, size, blocks."),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(in_shape=(1, 8, 8), num_classes=10, **kwargs)


def test_bad_shapes() -> None:
    with pytest.raises(ValueError, match="square"):
        build_model("conv", (1, 8, 6), 10, stages=[(4, 4, 1)])
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        build_model("fc", (4,), 1, width=4, blocks=1)
    assert (
        math.prod((1, 8, 8))
        == build_model("fc", (1, 8, 8), 2, width=3, blocks=1).stem[1].in_features
    )


def test_layer_globs_match_one_level_in_order() -> None:
    from pfc_sweeps.nets.hooks import ModelSpecError, resolve_layers
    from pfc_sweeps.nets.resnets import torchvision_resnet

    net = torchvision_resnet("resnet18", num_classes=10, in_shape=(3, 32, 32))
    assert resolve_layers(net, ["layer4.*"]) == ["layer4.0", "layer4.1"]
    assert resolve_layers(net, ["layer3.1", "layer4.*"]) == ["layer3.1", "layer4.0", "layer4.1"]
    assert resolve_layers(net, ["layer4.?.conv*"]) == [
        "layer4.0.conv1",
        "layer4.0.conv2",
        "layer4.1.conv1",
        "layer4.1.conv2",
    ]
    with pytest.raises(
        ModelSpecError, match=r"no module 'layer5\.0' in ResNet; nearest: layer.\.0"
    ):
        resolve_layers(net, ["layer5.0"])


def test_torchvision_resnet_adapts_the_stem_to_small_inputs() -> None:
    from pfc_sweeps.nets.resnets import torchvision_resnet

    small = torchvision_resnet("resnet18", num_classes=7, in_shape=(1, 28, 28))
    assert small.conv1.in_channels == 1 and small.conv1.stride == (1, 1)
    assert small(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    big = torchvision_resnet("resnet18", num_classes=5, in_shape=(3, 96, 96))
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, torch.nn.MaxPool2d)


def test_feature_net_hooks_equal_a_manual_forward() -> None:
    """FeatureNet's layers: input of the first module, outputs of the others, classifier input."""
    from pfc_sweeps.nets.hooks import FeatureNet
    from pfc_sweeps.nets.resnets import torchvision_resnet

    torch.manual_seed(0)
    net = torchvision_resnet("resnet18", num_classes=10, in_shape=(3, 16, 16)).eval()
    fnet = FeatureNet(net, ["layer4.*"], "fc", 10).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        logits, feats, clf_in = fnet.extract(x)
        h = net.layer3(net.layer2(net.layer1(net.relu(net.bn1(net.conv1(x))))))
        h1 = net.layer4[0](h)
        h2 = net.layer4[1](h1)
        manual = [h, h1, h2]
        assert torch.equal(logits, net.fc(torch.flatten(net.avgpool(h2), 1)))
        assert torch.equal(fnet.forward_logits(x), logits)
    assert all(torch.equal(a, b) for a, b in zip(feats, manual, strict=True))
    assert torch.equal(clf_in, torch.flatten(net.avgpool(h2), 1))
    assert [k for k in fnet.state_dict() if "fc" in k] == ["net.fc.weight", "net.fc.bias"]
