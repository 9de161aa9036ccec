"""Exact distributed reduction of the tracker's sufficient statistics (docs/metrics.md
"Distributed use").

Every statistic the tracker accumulates is a sum over samples (class counts and sums, path
lengths, traces, K x K products, NCC hit counts), so ranks that each fed a shard of the data
add their sums and then all hold the single-process statistics. Real-valued sums are float64
(added exactly as the single process adds its chunks, up to the order of the additions);
counts are int64 and add exactly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_sums", "any_rank", "check_group"]


def check_group(group: object) -> object:
    """Validate a ``process_group`` argument.

    Args:
        group: None (one process) or a ``torch.distributed`` ProcessGroup (e.g.
            ``torch.distributed.group.WORLD`` for the default group).

    Returns:
        The group, unchanged.

    Raises:
        ValueError: the group is not a ProcessGroup, or torch.distributed is not initialised.
    """
    if group is None:
        return None
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "process_group given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first (or pass process_group=None)"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(
            "process_group must be a torch.distributed ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD) or None, got {type(group).__name__}"
        )
    return group


def _comm_device(group: object, device: torch.device) -> torch.device:
    """Where the group can reduce: NCCL reduces CUDA tensors, gloo CPU tensors."""
    backend = str(dist.get_backend(group)).lower()
    if device.type == "cpu" or "nccl" in backend:
        return device
    return torch.device("cpu")


def all_reduce_sums(tensors: list[Tensor], group: object) -> None:
    """Sum every tensor over the ranks of ``group``, in place (one all-reduce per dtype).

    Args:
        tensors: sums over samples of this rank's shard; float tensors must be float64,
            counts int64. All on one device; every rank passes the same shapes in the same
            order.
        group: a ProcessGroup, or None (nothing to do).

    Returns:
        None; afterwards every rank holds the sums over all ranks.

    Raises:
        ValueError: a floating tensor that is not float64 (it would lose precision).
    """
    if group is None or not tensors:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        if t.is_floating_point() and t.dtype != torch.float64:
            raise ValueError(f"distributed sums must be float64, got {t.dtype}")
        by_dtype.setdefault(t.dtype, []).append(t)
    for group_tensors in by_dtype.values():
        dev = _comm_device(group, group_tensors[0].device)
        flat = torch.cat([t.reshape(-1).to(dev) for t in group_tensors])  # (sum of numel,)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for t in group_tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def any_rank(flag: bool, group: object, device: torch.device) -> bool:
    """True when ``flag`` is True on any rank of ``group`` (all-reduce MAX); the flag itself
    when group is None. Every rank must call it (it is a collective).

    Args:
        flag: this rank's flag.
        group: a ProcessGroup or None.
        device: device of the tracker's tensors (the collective runs there or on the CPU).

    Returns:
        The agreed flag, the same on every rank.
    """
    if group is None:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=_comm_device(group, device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())
