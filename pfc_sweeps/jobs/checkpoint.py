"""Checkpoints written off the training thread, so an epoch does not wait for the disk, and
the RNG states they hold.

Every checkpoint tensor is saved from CPU memory (:func:`cpu_copy`) and loaded back to CPU
memory (``map_location="cpu"``); ``load_state_dict`` then places the model's and the
optimiser's tensors on the job's device. The RNG states must stay on the CPU:
``torch.set_rng_state``, ``torch.Generator.set_state`` and ``torch.cuda.set_rng_state``
only take CPU ``ByteTensor`` s (loading them onto a GPU made every resume on CUDA fail).
Only the CUDA RNG state of the job's own device is saved, so a job resumed on a node with
another number of GPUs restores what it can (docs/gpu.md).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from pfc_sweeps.results.schema import atomic_write

__all__ = ["CheckpointWriter", "cpu_copy", "restore_rng_state", "rng_state"]


def cpu_copy(obj: Any) -> Any:
    """``obj`` with every tensor (in nested dicts, lists and tuples) copied to CPU memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def rng_state(device: torch.device) -> dict[str, Any]:
    """The global RNG states a resumed job needs: the CPU generator's and, on CUDA, the
    generator of ``device`` only (not every visible GPU's).

    Args:
        device: the job's device.

    Returns:
        ``{"torch": ByteTensor}`` plus ``"cuda": ByteTensor`` when ``device`` is a GPU.
    """
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _cpu_bytes(t: torch.Tensor) -> torch.Tensor:
    """An RNG state as the CPU ByteTensor that every ``set_state`` requires."""
    return t.detach().to("cpu", torch.uint8)


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore :func:`rng_state` (as CPU ByteTensors, wherever the checkpoint was loaded).

    A CUDA state is restored only when the job runs on CUDA. Checkpoints from before this
    format hold a list with one state per visible GPU (``get_rng_state_all``); the entry of
    the job's device index is used, and none when that GPU did not exist (a job resumed on
    a node with fewer GPUs keeps the CUDA generator its seed gave it).

    Args:
        state: the checkpoint's ``"rng"`` entry.
        device: the job's device.
    """
    torch.set_rng_state(_cpu_bytes(state["torch"]))
    cuda = state.get("cuda")
    if device.type != "cuda" or cuda is None:
        return
    if isinstance(cuda, list | tuple):  # the old format: every GPU's state
        index = device.index or 0
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(_cpu_bytes(cuda), device)


class CheckpointWriter:
    """Writes one checkpoint at a time with :func:`~pfc_sweeps.results.schema.atomic_write`, in a
    background thread.

    :meth:`save` copies the state's tensors first (training changes the live ones right
    after), waits for the previous write, and hands the new one to the thread. The file on
    disk is always a whole checkpoint: the old one until the rename swaps in the new one; a
    process killed mid-write leaves a temporary file that the next run of the job removes.
    :meth:`wait` blocks until the last write is on disk and re-raises its error.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pfc-checkpoint")
        self._pending: Future | None = None

    def save(self, path: str | os.PathLike[str], state: dict[str, Any]) -> None:
        snapshot = cpu_copy(state)
        self.wait()
        self._pending = self._pool.submit(atomic_write, path, lambda f: torch.save(snapshot, f))

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the last write, then stop the thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
