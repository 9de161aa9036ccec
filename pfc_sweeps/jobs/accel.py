"""Training speed options of ``train.*``, each off by default: mixed precision, channels_last,
TF32 matmuls and ``torch.compile``. The trainer calls :func:`prepare_model` once and runs each
step through :class:`Accelerator`; the metric pass is unaffected (the tracker turns autocast
and TF32 off inside itself, see docs/precision.md).

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
from typing import Any

import torch
from torch import Tensor, nn

from pfc_sweeps.choices import TRAIN_PRECISIONS

__all__ = ["AUTOCAST_DTYPES", "Accelerator", "prepare_model"]

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


def prepare_model(model: nn.Module, tr: Any, device: torch.device) -> nn.Module:
    """Apply ``train.tf32``, ``train.channels_last`` and ``train.compile`` to ``model``."""
    _check(tr.precision, device)
    if tr.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    if tr.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if tr.compile:
        # compile the bound method only: the module (and its state_dict keys) stay as they are
        model.forward_logits = torch.compile(model.forward_logits)
    return model


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

    def state_dict(self) -> dict[str, Any]:
        """The gradient scaler's state (its loss scale and growth tracker); {} without one."""
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a checkpoint without a scaler state leaves it fresh)."""
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
