"""One GPU per running job of a local sweep (``hydra/launcher=local``).

submitit's local executor starts every job of a sweep at once, each with
``CUDA_VISIBLE_DEVICES=0..gpus_per_node-1``; ``conf/hydra/launcher/local.yaml`` makes that
every GPU of the machine (``${pfc_gpu_count:}``, :func:`gpu_count`). Without more, every job would train on
GPU 0, each with its data and feature cache. Here job ``num`` of the sweep takes GPU
``num mod G`` (of the G visible) and holds an exclusive lock on it for its whole life
(``<sweep dir>/.submitit/gpu-<i>.lock``): with as many GPUs as jobs each job has its own,
with fewer the jobs sharing a GPU run one at a time. The lock is released when the job's
process exits (a killed job too: ``flock`` locks die with their process). See docs/gpu.md.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path
from typing import IO

import torch

__all__ = ["claim_gpu_slot", "gpu_count", "local_job_device"]

#: Lock files of the GPUs this process holds (kept open until it exits).
_HELD: dict[Path, IO[bytes]] = {}


def gpu_count() -> int:
    """The CUDA devices this process sees (0 without CUDA): the ``${pfc_gpu_count:}`` resolver
    (:func:`pfc_sweeps.config.register_configs`) that ``conf/hydra/launcher/local.yaml`` uses.

    Returns:
        ``torch.cuda.device_count()`` (it does not initialise CUDA).
    """
    return torch.cuda.device_count()


def claim_gpu_slot(lock_dir: Path, slot: int, *, wait: bool = True) -> bool:
    """Hold GPU ``slot``'s lock in ``lock_dir`` for the rest of this process.

    Args:
        lock_dir: the folder of the lock files (the sweep's ``.submitit``).
        slot: the GPU index.
        wait: block until the lock is free (saying so once), else return at once.

    Returns:
        True when this process holds the lock now; False when ``wait`` is False and
        another process holds it.
    """
    path = lock_dir / f"gpu-{slot}.lock"
    if path in _HELD:
        return True
    lock_dir.mkdir(parents=True, exist_ok=True)
    f = open(path, "ab")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not wait:
            f.close()
            return False
        print(f"waiting for GPU {slot}: another job of the sweep uses it ({path})", file=sys.stderr)
        fcntl.flock(f, fcntl.LOCK_EX)
    _HELD[path] = f
    return True


def local_job_device(device: torch.device) -> torch.device:
    """The GPU of this job when it is a job of a ``hydra/launcher=local`` sweep, else
    ``device`` unchanged.

    Args:
        device: the resolved ``train.device`` (``cuda`` without an index is the case here).

    Returns:
        ``cuda:<num mod G>`` (also made the current device) after taking its lock, or
        ``device``.
    """
    if device.type != "cuda" or device.index is not None:
        return device
    if os.environ.get("SUBMITIT_EXECUTOR") != "local":
        return device
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return device
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN or hc.job.num is None:
        return device
    slot = int(hc.job.num) % torch.cuda.device_count()
    claim_gpu_slot(Path(str(hc.sweep.dir)) / ".submitit", slot)
    torch.cuda.set_device(slot)
    return torch.device("cuda", slot)
