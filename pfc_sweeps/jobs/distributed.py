"""One job on several processes: torchrun or a multi-task SLURM job (docs/distributed.md).

When the launcher started several processes (``WORLD_SIZE`` > 1 from torchrun, or a
submitit job with several tasks, whose :class:`submitit.helpers.TorchDistributedEnvironment`
gives the rank, world size and master address) and ``train.distributed=auto``, every
process joins one ``torch.distributed`` process group (:func:`join`): NCCL on CUDA, one GPU
per rank (``LOCAL_RANK``), gloo on CPU, with ``train.dist_timeout_s`` as its timeout.

- Rank 0 is the job as a single process runs it: it holds the job dir's lock, checks the
  fingerprint, writes ``.hydra/``, the tables, the checkpoint and the W&B run, and is the
  only one that prints. It tells the other ranks the job dir and whether to run
  (:func:`announce`); they wait for that (:func:`receive`), then do the same work and write
  nothing.
- A collective that fails (a rank died or hung past the timeout) becomes one line naming
  this rank and the silent ones (:class:`RankLost`, :func:`translate`).
- ``launch.py`` calls :func:`prelaunch` first: torchrun's ranks 1.. run Hydra in a temporary
  dir, and every rank dies with the torchrun agent.
- DDP training and the sharded metric pass: :mod:`pfc_sweeps.jobs.ddp`.
"""

from __future__ import annotations

import atexit
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pfc_sweeps.errors import PFCError

__all__ = [
    "Group",
    "RankLost",
    "all_reduce_sum",
    "announce",
    "current",
    "is_main",
    "join",
    "launcher_world",
    "local_device",
    "prelaunch",
    "receive",
    "translate",
]


@dataclass
class Group:
    """The process group this process joined: its rank, the world size, its local rank."""

    rank: int
    world: int
    local_rank: int
    backend: str
    timeout_s: float
    announced: bool = False  # rank 0: the current job's go/stop sent to the other ranks


_GROUP: Group | None = None


def current() -> Group | None:
    """The joined group, or None for a single process."""
    return _GROUP


def is_main() -> bool:
    """Whether this process writes and speaks: rank 0, or a single process."""
    return _GROUP is None or _GROUP.rank == 0


# ----------------------------------------------------------------------------- joining


def launcher_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) that the launcher gave this process; (0, 1, 0) alone.

    torchrun (and ``python -m torch.distributed.run``) exports ``RANK``, ``WORLD_SIZE`` and
    ``LOCAL_RANK``; a submitit job (``SUBMITIT_EXECUTOR`` set) with several tasks has them
    in :class:`submitit.JobEnvironment`.
    """
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if env.get("SUBMITIT_EXECUTOR"):
        import submitit

        job = submitit.JobEnvironment()
        if job.num_tasks > 1:
            return job.global_rank, job.num_tasks, job.local_rank
    return 0, 1, 0


def _wants_cuda(device: str) -> bool:
    return device in ("auto", "cuda") and torch.cuda.is_available()


def join(cfg: Any) -> Group | None:
    """Join the launcher's process group; None for a single process or ``train.distributed=off``.

    Args:
        cfg: the job's config (``cfg.train.distributed``, ``.device``, ``.dist_timeout_s``).

    Returns:
        The :class:`Group` (the same one for every job of a sweep in this process).

    Raises:
        PFCError: the rendezvous failed (one line naming the master address).
    """
    global _GROUP
    if _GROUP is not None:
        return _GROUP
    tr = cfg.train
    rank, world, local = launcher_world()
    if str(tr.distributed) == "off" or world <= 1:
        return None
    if "MASTER_ADDR" not in os.environ:  # a submitit task: its rendezvous from SLURM's env
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    cuda = _wants_cuda(str(tr.device))
    if cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
    backend = "nccl" if cuda else "gloo"
    timeout = max(float(tr.dist_timeout_s), 1.0)
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout)
        )
    except Exception as e:
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise PFCError(
            f"rank {rank} of {world} could not join the process group at {where} "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
        ) from None
    _GROUP = Group(rank, world, local, backend, timeout)
    atexit.register(_leave)
    return _GROUP


def _leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """``device`` for this rank: CUDA device ``LOCAL_RANK`` (mod the visible count) in a group.

    Args:
        device: the device ``train.device`` names.

    Returns:
        ``device`` itself for one process or a CPU device, else this rank's GPU.
    """
    if _GROUP is None or device.type != "cuda":
        return device
    return torch.device("cuda", _GROUP.local_rank % torch.cuda.device_count())


# ----------------------------------------------------------------------------- rank 0's word


def announce(out_dir: Path, error: str | None) -> None:
    """Rank 0: tell the other ranks the job dir and whether to run (``error`` None) or stop.

    Sent once per job (later calls do nothing until :func:`new_job`); nothing for one process.

    Args:
        out_dir: the job dir (rank 0's Hydra output dir).
        error: None to start the job; else why rank 0 stopped before it (the others stop).

    Raises:
        RankLost: another rank is gone.
    """
    g = _GROUP
    if g is None or g.rank != 0 or g.announced:
        return
    g.announced = True
    _broadcast([str(out_dir), error])


def new_job() -> None:
    """Rank 0: a new job of the sweep starts; its :func:`announce` is still to be sent."""
    if _GROUP is not None:
        _GROUP.announced = False


def receive() -> tuple[Path, str | None]:
    """Ranks 1..: wait for rank 0's :func:`announce`.

    Returns:
        (the job dir, None to run or rank 0's reason to stop).

    Raises:
        RankLost: rank 0 is gone, or did not answer within ``train.dist_timeout_s``.
    """
    out_dir, error = _broadcast([None, None])
    return Path(out_dir), error


def _broadcast(payload: list[Any]) -> list[Any]:
    try:
        dist.broadcast_object_list(payload, src=0)
    except Exception as e:
        raise lost_rank(e) from None
    return payload


class RankLost(PFCError):
    """A collective failed: another rank died, hung past the timeout, or is unreachable."""


def _silent_ranks(wait_s: float = 2.0) -> list[int] | None:
    """After a failed collective: the ranks that do not check in at the group's store within
    ``wait_s`` (the survivors all do); None when the store is gone too."""
    g = _GROUP
    if g is None:
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"pfc_alive/{g.rank}", "1")
        time.sleep(wait_s)
        return [r for r in range(g.world) if not store.check([f"pfc_alive/{r}"])]
    except Exception:  # the store lived in the dead process
        return None


def lost_rank(e: BaseException) -> RankLost:
    """The one-line error of a failed collective, naming the silent ranks and the timeout.

    Args:
        e: the collective's exception.

    Returns:
        The :class:`RankLost` to raise.
    """
    g = _GROUP
    who = f"rank {g.rank} of {g.world}" if g is not None else "this rank"
    msg = " ".join(str(e).split())[:160]
    timeout = g.timeout_s if g is not None else float("nan")
    silent = _silent_ranks()
    lost = f"rank {', '.join(map(str, silent))}" if silent else "another rank"
    return RankLost(
        f"{who}: {lost} stopped answering (it died, or hung past "
        f"train.dist_timeout_s={timeout:g}): {type(e).__name__}: {msg}"
    )


def translate(e: BaseException) -> BaseException:
    """``e``, or :class:`RankLost` when it is a failed collective of the group (gloo, NCCL).

    Args:
        e: an exception raised in a job.

    Returns:
        The exception to report (one line naming this rank for a lost rank).
    """
    if _GROUP is None or isinstance(e, PFCError):
        return e
    text = str(e)
    dist_error = getattr(dist, "DistError", ())
    marks = ("gloo", "NCCL", "Connection closed", "Connection reset", "Timed out", "timed out")
    if isinstance(e, dist_error) or (isinstance(e, RuntimeError) and any(m in text for m in marks)):
        return lost_rank(e)
    return e


def all_reduce_sum(*values: Any) -> tuple[Any, ...]:
    """Each value (a tensor, float or int) summed over the ranks; unchanged for one process.

    Args:
        values: this rank's sums (floats are added in float64, ints in int64).

    Returns:
        The sums over all ranks, with the input types.

    Raises:
        RankLost: another rank is gone.
    """
    if _GROUP is None:
        return values
    out = []
    for v in values:
        t = v.detach().clone() if isinstance(v, Tensor) else torch.tensor(v)
        t64 = t.to(torch.float64 if t.is_floating_point() else torch.int64)
        dev = (
            torch.device("cuda", torch.cuda.current_device()) if _GROUP.backend == "nccl" else "cpu"
        )
        t64 = t64.to(dev)
        try:
            dist.all_reduce(t64)
        except Exception as e:
            raise lost_rank(e) from None
        res = t64.to(t.device, t.dtype)
        out.append(res if isinstance(v, Tensor) else type(v)(res.item()))
    return tuple(out)


# ----------------------------------------------------------------------------- launch.py


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent (torchrun's agent) dies, even by SIGKILL,
    so that no orphaned rank keeps the job dir busy."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def prelaunch(argv: list[str]) -> list[str]:
    """``launch.py``'s argv for this torchrun worker, before Hydra starts.

    Ranks 1.. run Hydra in a shared temporary dir without its log file (rank 0 tells them
    the job dir), so that they leave nothing in the output tree. Every torchrun worker dies with
    its agent (Linux), so that no orphan keeps the job dir busy.

    Args:
        argv: ``sys.argv``.

    Returns:
        The argv to run Hydra with.
    """
    rank, world, _ = launcher_world()
    if world <= 1:
        return argv
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:
        _die_with_parent()
    if rank == 0:
        return argv
    # one shared place per user, never cleaned: Hydra only creates empty dirs there (no log
    # file, no .hydra/), so that a rank killed by SIGKILL leaves nothing behind either
    tmp = Path(tempfile.gettempdir()) / f"pfc-sweeps-ranks-{os.getuid()}"
    drop = ("hydra.run.dir=", "hydra.sweep.dir=", "hydra/job_logging=")
    keep = [a for a in argv[1:] if not a.startswith(drop)]
    dirs = [f"hydra.run.dir={tmp}/run", f"hydra.sweep.dir={tmp}/sweep"]
    return [argv[0], *keep, *dirs, "hydra/job_logging=disabled"]
