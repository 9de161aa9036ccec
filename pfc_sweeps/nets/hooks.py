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

Each hook records its module's output under the module's name, and every recorded forward
(the job's first, :meth:`FeatureNet.check_forward`, and each batch of a metric pass) is
checked: each studied module ran exactly once and in the listed order, and the classifier
ran once. Anything else is one :class:`ModelSpecError` line naming the module (never ran,
ran n times, ran out of order; a module listed twice is refused when the layers are
resolved). A module that runs more than once per forward (weight sharing) is refused with
:data:`SHARED_HINT`: studying it needs one module per use (docs/own-model.md).
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
from collections.abc import Sequence
from typing import Any

import torch
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
    and, within a glob, in registration order.

    Args:
        model: the wrapped network.
        patterns: ``arch.layers``.

    Returns:
        The studied modules' names, each once.

    Raises:
        ModelSpecError: a pattern matches nothing (the nearest names are listed), or one
            module is listed twice (by two entries, or under two names of one module).
    """
    named = list(model.named_modules(remove_duplicate=False))
    names = [n for n, _ in named if n]
    out: list[str] = []
    by: dict[int, tuple[str, str]] = {}  # id(module) -> (its listed name, the entry)
    for pat in patterns:
        hits = [n for n in names if _glob_match(pat, n)]
        if not hits:
            near = difflib.get_close_matches(pat, names, n=5, cutoff=0.3)
            raise ModelSpecError(
                f"arch.layers: no module {pat!r} in {type(model).__name__}; nearest: "
                f"{', '.join(near) if near else ', '.join(names[:5])}"
            )
        for n in hits:
            key = id(model.get_submodule(n))
            if key in by:
                raise ModelSpecError(_listed_twice(n, pat, *by[key]))
            by[key] = (n, pat)
            out.append(n)
    return out


def _listed_twice(name: str, pat: str, old_name: str, old_pat: str) -> str:
    same = f"{name!r}" if name == old_name else f"{name!r} (the same module as {old_name!r})"
    return (
        f"arch.layers: module {same} is listed twice (by entries {old_pat!r} and {pat!r}); "
        "list each studied "
        "module once, in forward order"
    )


#: How to study a module that runs more than once per forward (docs/own-model.md).
SHARED_HINT = (
    "weight sharing is not studied as one layer: give each use its own module (e.g. "
    "self.use1 = nn.Sequential(shared), self.use2 = nn.Sequential(shared)) and list those"
)


class FeatureNet(nn.Module):
    """``net`` with hooks on ``layers`` and ``classifier``; see the module docstring.

    Each studied module's hook records its output under its name; every recorded forward is
    checked: each studied module ran once, in the listed order, and the classifier once.
    """

    def __init__(self, net: nn.Module, layers: Sequence[str], classifier: str, num_classes: int):
        super().__init__()
        self.net = net
        self.layer_names = resolve_layers(net, layers)
        clf = _classifier(net, classifier, num_classes)
        self.classifier_name = classifier  # a property, not a second registration of it
        self.num_layers = len(self.layer_names) + 1
        self._record: list[tuple[str, Tensor]] | None = None
        self._inputs: list[Tensor] = []
        self._clf_in: list[Tensor] = []
        first = net.get_submodule(self.layer_names[0])
        first.register_forward_pre_hook(self._take_input)
        for n in self.layer_names:
            net.get_submodule(n).register_forward_hook(functools.partial(self._take_output, n))
        clf.register_forward_pre_hook(self._take_classifier_input)

    def _take_input(self, _m: nn.Module, args: tuple) -> None:
        if self._record is not None:
            self._inputs.append(_tensor(args, f"input of {self.layer_names[0]!r}"))

    def _take_output(self, name: str, _m: nn.Module, _args: tuple, out: Any) -> None:
        if self._record is not None:
            self._record.append((name, _tensor(out, f"output of {name!r}")))

    def _take_classifier_input(self, _m: nn.Module, args: tuple) -> None:
        if self._record is not None:
            self._clf_in.append(_tensor(args, "classifier input"))

    @property
    def classifier(self) -> nn.Linear:
        """The final ``nn.Linear`` (``arch.classifier``) of the wrapped model."""
        return self.net.get_submodule(self.classifier_name)  # type: ignore[return-value]

    def forward_logits(self, x: Tensor) -> Tensor:
        """Logits (B, K) of the wrapped model (no recording)."""
        return self.net(x)

    def extract(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """x -> logits (B, K), features [(B, *shape_l)] * (L + 1) (as the modules give them),
        classifier input (B, d_c).

        Raises:
            ModelSpecError: a studied module did not run exactly once, in the listed
                order, or the classifier did not run exactly once (:meth:`check_calls`).
        """
        self._record, self._inputs, self._clf_in = [], [], []
        try:
            logits = self.net(x)
            record, inputs, clf_in = self._record, self._inputs, self._clf_in
        finally:
            self._record, self._inputs, self._clf_in = None, [], []
        self.check_calls([n for n, _ in record], len(clf_in))
        return logits, [inputs[0], *(h for _, h in record)], clf_in[0].flatten(1)

    def check_calls(self, ran: list[str], classifier_calls: int) -> None:
        """Raise :class:`ModelSpecError` unless ``ran`` (the studied modules that ran, in
        order) is ``layer_names`` and the classifier ran once; the line names the module."""
        if ran == self.layer_names and classifier_calls == 1:
            return
        model = type(self.net).__name__
        for n in self.layer_names:
            count = ran.count(n)
            if count == 0:
                raise ModelSpecError(
                    f"arch.layers: module {n!r} never ran in {model}.forward; list only "
                    "modules that the forward calls"
                )
            if count > 1:
                raise ModelSpecError(
                    f"arch.layers: module {n!r} ran {count} times in one {model}.forward; "
                    f"each studied module must run once: {SHARED_HINT}"
                )
        if ran != self.layer_names:
            i = next(
                i for i, (a, b) in enumerate(zip(ran, self.layer_names, strict=True)) if a != b
            )
            raise ModelSpecError(
                f"arch.layers: module {ran[i]!r} ran before {self.layer_names[i]!r} but is "
                f"listed after it; list the studied modules in forward order: {', '.join(ran)}"
            )
        raise ModelSpecError(
            f"arch.classifier: module {self.classifier_name!r} ran {classifier_calls} times in "
            f"one {model}.forward; the classifier must run exactly once"
        )

    @torch.no_grad()
    def check_forward(self, x: Tensor) -> None:
        """Run one eval-mode forward of ``x`` (B, *in_shape) and check the calls (the job's
        first forward, before training); a forward that raises is one line naming the model.

        Raises:
            ModelSpecError: the forward raised, or :meth:`check_calls` failed.
        """
        mode = self.training
        self.eval()
        try:
            self.extract(x)
        except ModelSpecError:
            raise
        except Exception as e:
            msg = " ".join(str(e).split())[:200]
            raise ModelSpecError(
                f"arch.model: {type(self.net).__name__}.forward failed on an input of shape "
                f"{tuple(x.shape)}: {type(e).__name__}: {msg}"
            ) from None
        finally:
            self.train(mode)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """x -> logits (B, K), features [(B, d_l)] * (L + 1) (flattened per sample)."""
        logits, feats, _ = self.extract(x)
        return logits, [h.flatten(1) for h in feats]


def _classifier(net: nn.Module, classifier: str, num_classes: int) -> nn.Linear:
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
    return clf


def _tensor(value: Any, what: str) -> Tensor:
    if isinstance(value, tuple | list) and value:
        value = value[0]
    if not isinstance(value, Tensor):
        raise ModelSpecError(f"arch.layers: the {what} is a {type(value).__name__}, not a tensor")
    return value
