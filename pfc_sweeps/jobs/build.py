"""From a validated config to the job's objects: device, data, network, loaded weights.

Shared by the training job (:mod:`pfc_sweeps.jobs.train`) and the measuring job
(:mod:`pfc_sweeps.collapse.network`), so that both see the same data and the same network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pfc_sweeps.config import ArchConfig, Config, ConfigError
from pfc_sweeps.data.builtin import load_dataset
from pfc_sweeps.data.bundles import DataBundle, StreamBundle
from pfc_sweeps.data.module import load_module_dataset
from pfc_sweeps.jobs.devices import local_job_device
from pfc_sweeps.jobs.distributed import local_device
from pfc_sweeps.nets.hooks import FeatureNet, ModelSpecError, build_module
from pfc_sweeps.nets.resnets import build_model

__all__ = ["build_data", "build_net", "load_weights", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a device: under several ranks CUDA device ``LOCAL_RANK``
    (jobs/distributed.py); in a job of a local sweep, its own GPU (jobs/devices.py)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available; use auto or cpu")
    return local_job_device(local_device(torch.device(name)))


def build_data(cfg: Config, device: torch.device) -> DataBundle | StreamBundle:
    """The configured data set: in memory, or streamed when it exceeds ``train.data_gb``."""
    d, g = cfg.dataset, cfg.gaussian
    try:
        if d.name == "module":
            return load_module_dataset(
                d.train,
                d.test,
                n_per_class=d.subset_per_class,
                seed=cfg.seed,
                device=device,
                data_gb=cfg.train.data_gb,
                num_workers=cfg.train.num_workers,
            )
        return load_dataset(
            d.name,
            root=d.root,
            download=d.download,
            n_per_class=d.subset_per_class,
            seed=cfg.seed,
            device=device,
            num_classes=g.num_classes,
            dim=g.dim,
            sigma=g.sigma,
            n=g.n_per_class,
            n_test=g.n_test_per_class,
        )
    except ValueError as e:  # the subset is checked against the data as soon as it loads
        if d.subset_per_class is None or "n_per_class" not in str(e):
            raise
        raise ConfigError(f"dataset.subset_per_class={d.subset_per_class}: {e}") from None


def build_net(a: ArchConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A built-in Table I net (``kind`` fc/conv) or a :class:`FeatureNet` (``kind=module``)."""
    if a.kind == "module":
        net = build_module(a.model, num_classes, in_shape)
        fnet = FeatureNet(net, a.layers, a.classifier, num_classes)
        fnet.check_forward(torch.zeros(2, *in_shape))  # the job's first forward: calls checked
        return fnet
    shape: dict[str, Any] = (
        {"width": a.width, "blocks": a.blocks} if a.kind == "fc" else {"stages": a.stages}
    )
    return build_model(a.kind, in_shape, num_classes, block=a.block, **shape)


def load_weights(net: nn.Module, path: str | Path, device: torch.device) -> int:
    """Load ``path`` into ``net``: this project's checkpoint (returns its epoch) or a plain
    state_dict of the model (of ``arch.model`` for ``kind=module``; returns 0)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelSpecError(f"arch.checkpoint={str(path)!r}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)  # load_state_dict moves
    except Exception as e:
        raise ModelSpecError(f"arch.checkpoint={str(path)!r} is not a torch file: {e}") from None
    epoch = 0
    target = net
    if isinstance(state, dict) and "model" in state and "epoch" in state:
        state, epoch = state["model"], int(state["epoch"])
    elif isinstance(net, FeatureNet):
        target = net.net
    if not isinstance(state, dict):
        raise ModelSpecError(
            f"arch.checkpoint={str(path)!r} holds a {type(state).__name__}, not a state_dict"
        )
    try:
        target.load_state_dict(state)
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        raise ModelSpecError(
            f"arch.checkpoint={str(path)!r} does not match the model: {msg[:300]}"
        ) from None
    return epoch
