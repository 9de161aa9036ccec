"""Checkpoints written off the training thread, so an epoch does not wait for the disk."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from pfc_sweeps.results.schema import atomic_write

__all__ = ["CheckpointWriter", "cpu_copy"]


def cpu_copy(obj: Any) -> Any:
    """``obj`` with every tensor (in nested dicts, lists and tuples) copied to CPU memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


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
