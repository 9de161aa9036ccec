"""The FC ResNet and the conv ResNets of paper Table I (paper section IV-A).

A :class:`PFCNet` is ``stem -> trunk -> studied blocks -> classifier``:

- ``kind="fc"``: stem = flatten + ``nn.Linear(prod(in_shape), width)`` (the linear
  embedding is layer 0), trunk empty, ``blocks`` studied residual blocks of width
  ``width``.
- ``kind="conv"``: ``stages = [(channels, size, blocks), ...]``. The stem is a 3x3 conv
  (stride ``H // size_1``) to the first stage's shape, followed by ReLU (BatchNorm first
  when the block uses BN); between stages a transition of the same form (3x3 conv,
  stride ``size_{s-1} // size_s``) changes channels and resolution. The blocks of all
  but the last stage form the trunk; the last stage's blocks are the studied ones, and
  layer 0 is the transition's output (the input of the studied blocks).

``forward(x)`` returns ``(logits, features)`` with ``features[l]`` the flattened
(B, C*H*W) map of layer l = 0..L: layer 0 the input of the studied blocks, layer l the
output of studied block l, ``features[L]`` the classifier's input. The classifier is
an ``nn.Linear`` on the flattened last map (no pooling: a choice of this project, the paper does not say).

Residual blocks (``block=``), with W a linear map (fc) or a 3x3 conv (conv):

- ``"relu"``:      h + relu(W h + b)                  -- the paper's v_l = sigma(W_l .)
- ``"mlp"``:       h + W2 relu(W1 h + b1) + b2
- ``"preact_bn"``: h + W2 relu(BN(W1 relu(BN(h))))     -- pre-activation ResNet
- ``"mlp_bn"``:    h + BN(W2 relu(BN(W1 h)))          -- post-norm branch, no final ReLU

BatchNorm blocks normalise with batch statistics in train mode and running statistics
in eval mode, so the features that are measured (eval mode) are not exactly
the ones the optimiser saw; the BN-free blocks ("relu", "mlp") have no such gap and no
batch coupling. Unlike a textbook pre-activation ResNet there is no final BN + ReLU
after the last block: the classifier reads the residual stream itself (layer L).

Default block: ``"preact_bn"`` (:data:`DEFAULT_BLOCK`); the measurements that chose it are in
docs/nets.md ("The residual block").
All weights use PyTorch's default initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from pfc_sweeps.choices import ARCH_KINDS, BLOCKS

__all__ = [
    "DEFAULT_BLOCK",
    "PFCNet",
    "build_model",
    "torchvision_resnet",
]

DEFAULT_BLOCK = "preact_bn"
_KINDS = tuple(k for k in ARCH_KINDS if k != "module")  # what build_model builds


# ----------------------------------------------------------------------------- blocks

_Factory = Callable[[], nn.Module]


class _Residual(nn.Module):
    """h + branch(h), for the four block types (see the module docstring)."""

    def __init__(self, block: str, op: Callable[[bool], nn.Module], norm: _Factory) -> None:
        super().__init__()
        self.block = block
        if block == "relu":
            self.branch = nn.Sequential(op(True), nn.ReLU())
        elif block == "mlp":
            self.branch = nn.Sequential(op(True), nn.ReLU(), op(True))
        elif block == "preact_bn":
            self.branch = nn.Sequential(norm(), nn.ReLU(), op(False), norm(), nn.ReLU(), op(False))
        elif block == "mlp_bn":
            self.branch = nn.Sequential(op(False), norm(), nn.ReLU(), op(False), norm())
        else:  # validated by build_model
            raise ValueError(f"unknown block {block!r}; allowed: {', '.join(BLOCKS)}")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.branch(h)


def _fc_block(block: str, width: int) -> _Residual:
    return _Residual(
        block, lambda bias: nn.Linear(width, width, bias=bias), lambda: nn.BatchNorm1d(width)
    )


def _conv_block(block: str, channels: int) -> _Residual:
    return _Residual(
        block,
        lambda bias: nn.Conv2d(channels, channels, 3, padding=1, bias=bias),
        lambda: nn.BatchNorm2d(channels),
    )


def _conv_transition(c_in: int, c_out: int, stride: int, bn: bool) -> nn.Sequential:
    """3x3 conv with ``stride`` (size -> size // stride), [BN], ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------- network


class PFCNet(nn.Module):
    """``stem -> trunk -> blocks (studied) -> flatten -> classifier``.

    Attributes:
        blocks: the L studied residual blocks (``nn.ModuleList``).
        classifier: ``nn.Linear(feature_dims[-1], num_classes)``.
        num_blocks: L.
        num_layers: L + 1, the number of feature tensors (layers 0..L).
        feature_dims: per layer, d = prod(feature_shape).
    """

    def __init__(
        self,
        stem: nn.Module,
        trunk: nn.Module,
        blocks: Sequence[nn.Module],
        feature_shape: tuple[int, ...],
        num_classes: int,
        *,
        kind: str,
        block: str,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.block = block
        self.stem = stem
        self.trunk = trunk
        self.blocks = nn.ModuleList(blocks)
        d = math.prod(feature_shape)
        self.classifier = nn.Linear(d, num_classes)
        self.num_classes = num_classes
        self.num_blocks = len(self.blocks)
        self.num_layers = self.num_blocks + 1
        self.feature_dims = [d] * self.num_layers

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x (B, *in_shape) -> logits (B, K), features [(B, d)] * (L + 1)."""
        h = self.trunk(self.stem(x))
        feats = [h.flatten(1)]  # layer 0
        for blk in self.blocks:
            h = blk(h)
            feats.append(h.flatten(1))
        return self.classifier(feats[-1]), feats

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits only (B, K), for the training step."""
        h = self.trunk(self.stem(x))
        for blk in self.blocks:
            h = blk(h)
        return self.classifier(h.flatten(1))


def build_model(
    kind: str,
    in_shape: Sequence[int],
    num_classes: int,
    *,
    width: int | None = None,
    blocks: int | None = None,
    stages: Sequence[Sequence[int]] | None = None,
    block: str = DEFAULT_BLOCK,
) -> PFCNet:
    """Build a :class:`PFCNet` from plain parameters.

    Args:
        kind: ``"fc"`` (needs ``width``, ``blocks``) or ``"conv"`` (needs ``stages``).
        in_shape: input shape without batch, e.g. (1, 28, 28); conv needs (C, H, H).
        num_classes: K.
        width, blocks: FC ResNet width and number of (studied) blocks.
        stages: conv stages ``[(channels, size, blocks), ...]``, sizes decreasing by
            integer factors; the last stage is studied and needs >= 1 block.
        block: residual block type, one of :data:`BLOCKS`.

    Example: ``build_model("conv", (3, 32, 32), 10, stages=[(64, 16, 2), (128, 8, 3), (256, 4, 4)])``
    (paper Table I, CIFAR10; the Table I networks are the ``conf/arch/*.yaml`` files).
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown model kind {kind!r}; allowed: {', '.join(_KINDS)}")
    if block not in BLOCKS:
        raise ValueError(f"unknown block {block!r}; allowed: {', '.join(BLOCKS)}")
    in_shape = tuple(int(s) for s in in_shape)
    if not in_shape or any(s < 1 for s in in_shape):
        raise ValueError(f"in_shape must be a non-empty tuple of positive ints, got {in_shape}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    num_classes = int(num_classes)
    if kind == "fc":
        if stages is not None:
            raise ValueError("kind='fc' takes width and blocks, not stages")
        if width is None or blocks is None or int(width) < 1 or int(blocks) < 1:
            raise ValueError(
                f"kind='fc' needs width >= 1 and blocks >= 1, got width={width}, blocks={blocks}"
            )
        return _build_fc(in_shape, num_classes, int(width), int(blocks), block)
    if width is not None or blocks is not None:
        raise ValueError("kind='conv' takes stages, not width/blocks")
    return _build_conv(in_shape, num_classes, _check_stages(stages, in_shape), block)


def _build_fc(
    in_shape: tuple[int, ...], num_classes: int, width: int, blocks: int, block: str
) -> PFCNet:
    """Flatten + linear embedding (layer 0), then ``blocks`` studied residual blocks."""
    stem = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), width))
    studied = [_fc_block(block, width) for _ in range(blocks)]
    return PFCNet(stem, nn.Identity(), studied, (width,), num_classes, kind="fc", block=block)


def _build_conv(
    in_shape: tuple[int, ...], num_classes: int, stages: list[tuple[int, int, int]], block: str
) -> PFCNet:
    """Stem and transitions (3x3 conv, stride size_{s-1} // size_s), trunk, studied stage."""
    bn = block.endswith("bn")
    c_prev, size_prev = in_shape[0], in_shape[1]
    pre: list[nn.Module] = []
    stem: nn.Module = nn.Identity()
    for s, (c, size, n) in enumerate(stages):
        transition = _conv_transition(c_prev, c, size_prev // size, bn)
        if s == 0:
            stem = transition
        else:
            pre.append(transition)
        if s < len(stages) - 1:
            pre.extend(_conv_block(block, c) for _ in range(n))
        c_prev, size_prev = c, size
    c, size, n = stages[-1]
    studied = [_conv_block(block, c) for _ in range(n)]
    shape = (c, size, size)
    return PFCNet(stem, nn.Sequential(*pre), studied, shape, num_classes, kind="conv", block=block)


def _check_stages(
    stages: Sequence[Sequence[int]] | None, in_shape: tuple[int, ...]
) -> list[tuple[int, int, int]]:
    if len(in_shape) != 3 or in_shape[1] != in_shape[2]:
        raise ValueError(f"kind='conv' needs a square (C, H, H) in_shape, got {in_shape}")
    if not stages:
        raise ValueError(
            "kind='conv' needs a non-empty stages list [(channels, size, blocks), ...]"
        )
    out = []
    size_prev = in_shape[1]
    for i, st in enumerate(stages):
        if len(st) != 3:
            raise ValueError(f"stage {i} must be (channels, size, blocks), got {tuple(st)}")
        c, size, n = (int(v) for v in st)
        if c < 1 or size < 1 or n < 0:
            raise ValueError(f"stage {i} {tuple(st)}: channels, size must be >= 1, blocks >= 0")
        if size > size_prev or size_prev % size != 0:
            raise ValueError(
                f"stage {i} size {size} must divide the previous size {size_prev} "
                f"(downsampling by an integer stride)"
            )
        out.append((c, size, n))
        size_prev = size
    if out[-1][2] < 1:
        raise ValueError(f"the last (studied) stage needs >= 1 block, got {tuple(stages[-1])}")
    return out


def torchvision_resnet(
    name: str = "resnet18", num_classes: int | None = None, in_shape: Sequence[int] | None = None
) -> nn.Module:
    """torchvision's ResNet ``name`` (random init) for ``num_classes`` and inputs ``in_shape``.

    ``in_shape`` (C, H, W): with C != 3 or H < 64 the first conv becomes a 3x3 stride-1 conv
    from C channels and the max-pool is dropped (the usual CIFAR adaptation), so that a 32x32
    image still reaches the last stage at 4x4. ``arch=module`` fills both arguments from the
    data when the config leaves them null.
    """
    import torchvision

    if num_classes is None or in_shape is None:
        raise ValueError("torchvision_resnet needs num_classes and in_shape")
    net = getattr(torchvision.models, name)(weights=None, num_classes=int(num_classes))
    c, h = int(in_shape[0]), int(in_shape[-1])
    if c != 3 or h < 64:
        net.conv1 = nn.Conv2d(c, net.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net
