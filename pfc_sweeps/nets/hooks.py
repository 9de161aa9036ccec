"""Any ``nn.Module`` as a studied network (``arch=module``): its layers' features by hooks.

:class:`FeatureNet` wraps a model that the project has never seen (built from a Hydra
``_target_`` node) and gives it the interface of the built-in :class:`~pfc_sweeps.nets.resnets.PFCNet`:
``forward(x) -> (logits, features)`` and ``forward_logits(x)``, plus :meth:`FeatureNet.extract`,
which also returns the classifier's input.

The studied layers are module names or per-component globs (``layer4.*`` matches
``layer4.0`` and ``layer4.1``, not ``layer4.0.conv1``), in forward order. Layer 0 is the
input of the first studied module, layer l the output of the l-th; each is flattened per
sample, as for the built-in nets. NC3/NC4 use the classifier (an ``nn.Linear``) and the
features that enter it, captured separately: for torchvision's ResNets these are the
pooled features, not the last block's map.

Features are taken with forward hooks (a pre-hook on the first studied module, a hook on
each studied module, a pre-hook on the classifier), not with torchvision's
``create_feature_extractor``: hooks work on every module, including models whose
``forward`` has data-dependent control flow that FX cannot trace, and they give the *input*
of a module directly, which FX's ``return_nodes`` cannot name. The tensors are the ones
the model computes in its own forward, so there is one code path for all models. The
hooks only record while :meth:`FeatureNet.extract` runs; training calls the model as is.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from pfc_sweeps.errors import PFCError
from pfc_sweeps.nets.legacy import current_target

__all__ = ["FeatureNet", "ModelSpecError", "build_module", "resolve_layers"]


class ModelSpecError(PFCError):
    """``arch.model``/``arch.layers``/``arch.classifier``/``arch.checkpoint`` is unusable."""


#: Keys of ``arch.model`` that, when present and null, are filled from the data.
DATA_KEYS = ("num_classes", "in_shape", "in_channels")


def build_module(node: dict[str, Any], num_classes: int, in_shape: Sequence[int]) -> nn.Module:
    """``hydra.utils.instantiate(node)``, with null ``num_classes``/``in_shape``/``in_channels``
    keys filled from the data; a target that does not import is one line naming it."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    fill = {"num_classes": int(num_classes), "in_shape": list(in_shape)}
    fill["in_channels"] = int(in_shape[0])
    extra = {k: fill[k] for k in DATA_KEYS if k in node and node[k] is None}
    target = node.get("_target_")
    if current_target(target) != target:
        node = {**node, "_target_": current_target(target)}
    try:
        model = instantiate(node, **extra)
    except InstantiationException as e:
        cause = e.__cause__ or e
        msg = " ".join(str(cause).split())[:200]
        raise ModelSpecError(f"arch.model._target_={target!r} could not be built: {msg}") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"arch.model._target_={target!r} returned a {type(model).__name__}, not an nn.Module"
        )
    return model


def _glob_match(pattern: str, name: str) -> bool:
    p, n = pattern.split("."), name.split(".")
    return len(p) == len(n) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(n, p, strict=True))


def resolve_layers(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Module names matched by ``patterns`` (names or per-component globs), in order given
    and, within a glob, in registration order. Unknown names list the nearest ones."""
    names = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for pat in patterns:
        hits = [n for n in names if _glob_match(pat, n)]
        if not hits:
            near = difflib.get_close_matches(pat, names, n=5, cutoff=0.3)
            raise ModelSpecError(
                f"arch.layers: no module {pat!r} in {type(model).__name__}; nearest: "
                f"{', '.join(near) if near else ', '.join(names[:5])}"
            )
        out += [n for n in hits if n not in out]
    return out


class FeatureNet(nn.Module):
    """``net`` with hooks on ``layers`` and ``classifier``; see the module docstring."""

    def __init__(self, net: nn.Module, layers: Sequence[str], classifier: str, num_classes: int):
        super().__init__()
        self.net = net
        self.layer_names = resolve_layers(net, layers)
        modules = dict(net.named_modules())
        clf = modules.get(classifier)
        if clf is None:
            near = difflib.get_close_matches(classifier, list(modules), n=5, cutoff=0.3)
            raise ModelSpecError(
                f"arch.classifier: no module {classifier!r} in {type(net).__name__}; "
                f"nearest: {', '.join(near)}"
            )
        if not isinstance(clf, nn.Linear):
            raise ModelSpecError(
                f"arch.classifier={classifier!r} is a {type(clf).__name__}; it must be an "
                "nn.Linear (NC3/NC4 compare its weight rows with the class means)"
            )
        if clf.out_features != num_classes:
            raise ModelSpecError(
                f"arch.classifier={classifier!r} has {clf.out_features} outputs but the data "
                f"set has {num_classes} classes"
            )
        self.classifier_name = classifier  # a property, not a second registration of it
        self.num_layers = len(self.layer_names) + 1
        self._record: list[Tensor] | None = None
        self._clf_in: Tensor | None = None
        first = modules[self.layer_names[0]]
        first.register_forward_pre_hook(self._take_input)
        for n in self.layer_names:
            modules[n].register_forward_hook(self._take_output)
        clf.register_forward_pre_hook(self._take_classifier_input)

    def _take_input(self, _m: nn.Module, args: tuple) -> None:
        if self._record is not None and not self._record:
            self._record.append(_tensor(args, self.layer_names[0]))

    def _take_output(self, _m: nn.Module, _args: tuple, out: Any) -> None:
        if self._record is not None:
            self._record.append(_tensor(out, "output"))

    def _take_classifier_input(self, _m: nn.Module, args: tuple) -> None:
        if self._record is not None:
            self._clf_in = _tensor(args, "classifier input")

    @property
    def classifier(self) -> nn.Linear:
        """The final ``nn.Linear`` (``arch.classifier``) of the wrapped model."""
        return self.net.get_submodule(self.classifier_name)  # type: ignore[return-value]

    def forward_logits(self, x: Tensor) -> Tensor:
        """Logits (B, K) of the wrapped model (no recording)."""
        return self.net(x)

    def extract(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """x -> logits (B, K), features [(B, *shape_l)] * (L + 1) (as the modules give them),
        classifier input (B, d_c)."""
        self._record, self._clf_in = [], None
        try:
            logits = self.net(x)
            feats, clf_in = self._record, self._clf_in
        finally:
            self._record = None
        if len(feats) != self.num_layers or clf_in is None:
            raise ModelSpecError(
                f"arch.layers: expected {self.num_layers} feature tensors (the first layer's "
                f"input and {self.num_layers - 1} outputs) and the classifier's input, got "
                f"{len(feats)}{'' if clf_in is not None else ' and no classifier call'}; each "
                "studied module and the classifier must run exactly once per forward"
            )
        return logits, feats, clf_in.flatten(1)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """x -> logits (B, K), features [(B, d_l)] * (L + 1) (flattened per sample)."""
        logits, feats, _ = self.extract(x)
        return logits, [h.flatten(1) for h in feats]


def _tensor(value: Any, what: str) -> Tensor:
    if isinstance(value, tuple | list) and value:
        value = value[0]
    if not isinstance(value, Tensor):
        raise ModelSpecError(f"arch.layers: the {what} is a {type(value).__name__}, not a tensor")
    return value
