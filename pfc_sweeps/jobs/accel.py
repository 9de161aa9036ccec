"""Training speed options of ``train.*``, each off by default: mixed precision, channels_last,
TF32 matmuls and ``torch.compile``; and the process-wide numerics flags of a job.

Every job (training and ``task=measure``) calls :func:`configure_job` first: it sets every
TF32 flag from ``train.tf32`` (to False as well as True, so that one job of a one-process
sweep cannot leak TF32 into the next) and the determinism flags from
``train.deterministic``, before CUDA initialises. The trainer calls :func:`prepare_model`
once and runs each step through :class:`Accelerator`. The metric pass runs inside
:func:`full_float32` (no TF32, no autocast), in training and in ``task=measure`` alike, so
its features are the same whatever the training options (docs/gpu.md, docs/precision.md).

- ``train.precision``: ``fp32`` (default), ``bf16`` (CPU and CUDA) or ``fp16`` (CUDA only,
  with a gradient scaler, whose loss scale is saved in the checkpoint) through
  :func:`torch.autocast`;
- ``train.channels_last``: the conv nets' weights and input batches in NHWC memory format;
- ``train.tf32``: TF32 float32 matmuls and convolutions (Ampere and later GPUs);
- ``train.compile``: ``torch.compile`` of the training forward pass (the module and its
  ``state_dict`` keys are untouched, so checkpoints stay interchangeable).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from pfc_sweeps.choices import TRAIN_PRECISIONS
from pfc_sweeps.collapse.network import feature_width

__all__ = [
    "AUTOCAST_DTYPES",
    "CUBLAS_WORKSPACE",
    "Accelerator",
    "EpochLoss",
    "configure_job",
    "full_float32",
    "metric_cache_bytes",
    "prepare_model",
    "set_tf32",
]

log = logging.getLogger(__name__)

#: ``CUBLAS_WORKSPACE_CONFIG`` for deterministic cuBLAS (8 buffers of 4 MiB: about the size
#: PyTorch gives cuBLAS anyway, so no measurable cost).
CUBLAS_WORKSPACE = ":4096:8"

#: autocast dtype of each ``train.precision`` (None: no autocast).
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
assert tuple(AUTOCAST_DTYPES) == TRAIN_PRECISIONS


def _check(precision: str, device: torch.device) -> None:
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"train.precision must be one of {TRAIN_PRECISIONS}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"train.precision='fp16' needs a CUDA device (device is {device.type}); "
            "use bf16 or fp32 on CPU"
        )


def set_tf32(enabled: bool) -> None:
    """Set every TF32 flag (cuBLAS matmuls, cuDNN convolutions, the float32 matmul precision)
    to ``enabled``: False as well as True (PyTorch turns cuDNN's TF32 on by default).

    Args:
        enabled: TF32 on (Ampere and later GPUs) or off (full float32).
    """
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def _set_deterministic(enabled: bool) -> None:
    """PyTorch's reproducibility switches (https://pytorch.org/docs/stable/notes/randomness.html)."""
    if enabled and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        if torch.cuda.is_initialized():  # cuBLAS read its workspace size already
            log.warning(
                "train.deterministic=true but CUDA started before CUBLAS_WORKSPACE_CONFIG was "
                "set: export CUBLAS_WORKSPACE_CONFIG=%s for bit-identical matmuls",
                CUBLAS_WORKSPACE,
            )
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    # warn_only: an op with no deterministic CUDA kernel (adaptive pooling's backward, in
    # torchvision's ResNets) warns instead of stopping the job
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # a debugging aid: costs time
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False


def configure_job(tr: Any) -> None:
    """Set the process-wide numerics flags of a job from its ``train`` config; call it first,
    before anything touches CUDA.

    Every TF32 flag follows ``train.tf32`` (:func:`set_tf32`); ``train.deterministic`` sets
    ``torch.use_deterministic_algorithms``, ``cudnn.deterministic``, ``cudnn.benchmark=False``
    and ``CUBLAS_WORKSPACE_CONFIG`` (when unset), so that a resumed CUDA job repeats the
    uninterrupted one bit for bit (docs/gpu.md).

    Args:
        tr: the ``train`` config (``tf32``, ``deterministic``).
    """
    set_tf32(bool(tr.tf32))
    _set_deterministic(bool(getattr(tr, "deterministic", True)))


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """The metric pass's region: TF32 off and autocast disabled (CPU and CUDA), whatever the
    training job set; the flags are restored on exit.

    Yields:
        None.
    """
    saved = (
        torch.get_float32_matmul_precision(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    set_tf32(False)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1:]


#: Share of the free GPU memory the feature cache may take (the rest: the pass's own work).
CUDA_CACHE_SHARE = 0.75


@torch.no_grad()
def _feature_dims(model: nn.Module, data: Any, split: str) -> int:
    """Σ_l d_l over the metric pass's tracked features (studied layers, and the classifier's
    input when it is not the last layer's), from a forward of one or two samples."""
    x, _ = next(iter(data.batches(split, torch.arange(min(2, data.size(split))), 2)))
    was_training = model.training
    model.eval()
    try:
        with full_float32():
            return feature_width(model, x)
    finally:
        model.train(was_training)


def metric_cache_bytes(
    model: nn.Module, data: Any, split: str, budget: int, device: torch.device
) -> int:
    """The ``cache_bytes`` to give the metric pass, decided before its first pass: ``budget``
    when the features fit, else 0 (two passes over the data, nothing cached).

    The cache needs N·(4·Σ_l d_l + 8) bytes (float32 features of every tracked layer and the
    int64 labels). It must fit ``budget`` (``train.cache_gb``) and, on CUDA, where the cache
    lives on the GPU, :data:`CUDA_CACHE_SHARE` of the memory free now (``mem_get_info`` plus
    what PyTorch's allocator holds unused). Deciding first keeps a too-big cache from filling
    the GPU before the tracker drops it.

    Args:
        model: the network (built-in, or a FeatureNet), on ``device``.
        data: the job's data (``size``, ``batches``).
        split: the split the metric pass reads.
        budget: ``train.cache_gb`` in bytes.
        device: the job's device.

    Returns:
        ``budget`` or 0.
    """
    if budget <= 0:
        return 0
    need = data.size(split) * (4 * _feature_dims(model, data, split) + 8)
    limit = budget
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        idle = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        limit = min(limit, int(CUDA_CACHE_SHARE * (free + idle)))
    return budget if need <= limit else 0


def prepare_model(model: nn.Module, tr: Any, device: torch.device) -> nn.Module:
    """Apply ``train.tf32`` (both ways), ``train.channels_last`` and ``train.compile``."""
    _check(tr.precision, device)
    set_tf32(bool(tr.tf32))
    if tr.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if tr.compile:
        # compile the bound method only: the module (and its state_dict keys) stay as they are
        model.forward_logits = torch.compile(model.forward_logits)
    return model


class EpochLoss:
    """The sample-weighted mean training loss of an epoch, summed on the device (no host
    sync per batch).

    With a gradient scaler (fp16), a batch whose loss is inf/NaN is a step the scaler skips
    (it lowers the loss scale and tries again): such batches are left out of the mean and
    counted in ``skipped``. The mean is NaN only when no batch was finite, which the
    trainer's once-per-epoch divergence check stops on. Without a scaler every batch counts,
    so one non-finite loss makes the mean non-finite.
    """

    def __init__(self, device: torch.device, skip_nonfinite: bool) -> None:
        self.skip_nonfinite = skip_nonfinite
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, loss: Tensor, n: int) -> None:
        """Add one batch's mean ``loss`` (a 0-d tensor) over ``n`` samples."""
        loss = loss.detach().double()
        if not self.skip_nonfinite:
            self.total += loss * n
            self.count += n
            return
        ok = torch.isfinite(loss)
        self.total += torch.where(ok, loss, torch.zeros_like(loss)) * n
        self.count += ok.double() * n
        self.skipped += (~ok).long()

    def mean(self) -> float:
        """The mean loss over the counted samples (NaN when none counted)."""
        count = float(self.count)
        return float(self.total) / count if count else math.nan


class Accelerator:
    """One training step's options: input layout, autocast region, (scaled) backward + step."""

    def __init__(self, tr: Any, device: torch.device) -> None:
        _check(tr.precision, device)
        self.device = device
        self.dtype = AUTOCAST_DTYPES[tr.precision]
        self.channels_last = bool(tr.channels_last)
        fp16 = tr.precision == "fp16"
        self.scaler = torch.amp.GradScaler(device.type) if fp16 else None

    def inputs(self, x: Tensor) -> Tensor:
        """The batch in the model's memory format (NHWC for 4-D inputs with channels_last)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass and the loss run inside this (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(self, loss: Tensor, opt: torch.optim.Optimizer) -> None:
        """zero_grad, backward and optimiser step (through the gradient scaler for fp16)."""
        opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
            self.scaler.update()

    def epoch_loss(self) -> EpochLoss:
        """A fresh :class:`EpochLoss` (skipping non-finite batches only with a scaler)."""
        return EpochLoss(self.device, skip_nonfinite=self.scaler is not None)

    def state_dict(self) -> dict[str, Any]:
        """The gradient scaler's state (its loss scale and growth tracker); {} without one."""
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a checkpoint without a scaler state leaves it fresh)."""
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
