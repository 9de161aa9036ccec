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
- Training: :func:`training_forward` wraps the model in ``DistributedDataParallel``;
  :func:`train_batches` gives each rank its share of each global batch of the one seeded
  permutation, and :func:`rescale` weights its loss so that the averaged gradient is the
  global batch's; BatchNorm layers use the global batch's statistics (:func:`sync_batchnorm`).
- Measuring: :func:`shard` gives each rank whole batches of the pass (no sample dropped or
  repeated) and :func:`table_kwargs` passes the group to the metric engine, which
  all-reduces its sums (``pfc_sweeps.collapse.distributed``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pfc_sweeps.data.bundles import ShardedData, index_batches, train_shares
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
    "rescale",
    "shard",
    "sync_batchnorm",
    "table_kwargs",
    "train_batches",
    "training_forward",
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
    """``device`` for this rank: CUDA device ``LOCAL_RANK`` (mod the visible count) in a group."""
    if _GROUP is None or device.type != "cuda":
        return device
    return torch.device("cuda", _GROUP.local_rank % torch.cuda.device_count())


# ----------------------------------------------------------------------------- rank 0's word


def announce(out_dir: Path, error: str | None) -> None:
    """Rank 0: tell the other ranks the job dir and whether to run (``error`` None) or stop.

    Sent once per job (later calls do nothing until :func:`receive`'s next job)."""
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
    """Ranks 1..: wait for rank 0's :func:`announce`: (job dir, its error line or None)."""
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


def lost_rank(e: BaseException) -> RankLost:
    """The one-line error of a failed collective, naming this rank and the timeout."""
    g = _GROUP
    who = f"rank {g.rank} of {g.world}" if g is not None else "this rank"
    msg = " ".join(str(e).split())[:160]
    timeout = g.timeout_s if g is not None else float("nan")
    return RankLost(
        f"{who}: another rank stopped answering (it died, or hung past "
        f"train.dist_timeout_s={timeout:g}): {type(e).__name__}: {msg}"
    )


def translate(e: BaseException) -> BaseException:
    """``e``, or :class:`RankLost` when it is a failed collective of the group (gloo, NCCL)."""
    if _GROUP is None or isinstance(e, PFCError):
        return e
    text = str(e)
    dist_error = getattr(dist, "DistError", ())
    marks = ("gloo", "NCCL", "Connection closed", "Connection reset", "Timed out", "timed out")
    if isinstance(e, dist_error) or (isinstance(e, RuntimeError) and any(m in text for m in marks)):
        return lost_rank(e)
    return e


# ----------------------------------------------------------------------------- training


class _SumOverRanks(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of a sum over ranks is summed too."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm normalising with the statistics of the global batch over all ranks.

    torch's :class:`~torch.nn.SyncBatchNorm` needs a GPU; this one runs on any device (gloo).
    In training mode, the per-channel sums of x and x^2 (float64) and the sample count are
    all-reduced with a differentiable all-reduce, so the gradient is the global batch's too;
    the running statistics (unbiased variance) are updated as :class:`~torch.nn.BatchNorm1d`
    does. In eval mode it is a plain BatchNorm. Its ``state_dict`` keys are BatchNorm's.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {x.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        x64 = x.double()
        count = torch.full((1,), x.numel() / c, dtype=torch.float64, device=x.device)
        stats = _SumOverRanks.apply(
            torch.cat([x64.sum(dims), (x64 * x64).sum(dims), count])
        )  # (2C+1,)
        n = stats[-1]
        mean = stats[:c] / n  # (C,)
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)  # (C,) biased
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), n.detach())
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype).view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, n: Tensor) -> None:
        self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
        f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * n / (n - 1).clamp_min(1)
        self.running_mean.mul_(1 - f).add_(f * mean.to(self.running_mean.dtype))  # type: ignore[union-attr]
        self.running_var.mul_(1 - f).add_(f * unbiased.to(self.running_var.dtype))  # type: ignore[union-attr]


def _to_global_bn(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm replaced by a :class:`GlobalBatchNorm` (same tensors)."""
    out = module
    bn = nn.modules.batchnorm._BatchNorm
    if isinstance(module, bn) and not isinstance(module, (GlobalBatchNorm, nn.SyncBatchNorm)):
        out = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )  # fmt: skip
        for name, t in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]:
            setattr(out, name, t)
        out.train(module.training)
        out._forward_hooks, out._forward_pre_hooks = (
            module._forward_hooks,
            module._forward_pre_hooks,
        )
    for name, child in module.named_children():
        out.add_module(name, _to_global_bn(child))
    return out


def sync_batchnorm(model: nn.Module, tr: Any) -> nn.Module:
    """``model`` with BatchNorm over the global batch (``train.sync_bn``) in a group.

    SyncBatchNorm on CUDA, :class:`GlobalBatchNorm` elsewhere; unchanged for one process."""
    if _GROUP is None or not tr.sync_bn:
        return model
    if _GROUP.backend == "nccl":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _to_global_bn(model)


class _Logits(nn.Module):
    """``net.forward_logits`` as a module's forward, for DistributedDataParallel to wrap."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.forward_logits(x)


def training_forward(model: nn.Module, device: torch.device, unused: bool = False):
    """The training step's forward: ``model.forward_logits``, or its DDP wrapper in a group.

    Args:
        model: a net with ``forward_logits`` (on ``device``).
        device: its device (a CUDA device is this rank's).
        unused: some parameters may get no gradient (``arch=module``): DDP looks for them.
    """
    if _GROUP is None:
        return model.forward_logits
    from torch.nn.parallel import DistributedDataParallel

    ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(_Logits(model), device_ids=ids, find_unused_parameters=unused)


def train_batches(
    data: Any, order: Tensor, batch: int
) -> Iterator[tuple[Tensor, Tensor, float | None]]:
    """(x, y, loss weight) of each training step; the weight is None for one process.

    In a group, this rank's share of each global batch (:func:`train_shares`) and the
    weight B_r * world / B that makes DDP's mean of the ranks' gradients the gradient of
    the global batch's mean loss (shares may differ in size)."""
    if _GROUP is None:
        for xb, yb in data.batches("train", order, batch):
            yield xb, yb, None
        return
    r, w = _GROUP.rank, _GROUP.world
    shares = train_shares(order, batch, r, w)
    sizes = [len(g) for g in order.split(batch)]
    for (xb, yb), b in zip(index_batches(data, "train", shares), sizes, strict=True):
        yield xb, yb, len(yb) * w / b


def rescale(loss: Tensor, weight: float | None) -> Tensor:
    """The loss to back-propagate: ``loss`` itself for one process, else ``loss * weight``."""
    return loss if weight is None else loss * weight


def all_reduce_sum(*values: Any) -> tuple[Any, ...]:
    """Each value (a tensor, float or int) summed over the ranks; unchanged for one process.

    Floats are added in float64, ints in int64; the returned values have the input types."""
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


# ----------------------------------------------------------------------------- measuring


def check_shard_sizes(n_train: int, batch: int) -> None:
    """Raise PFCError when some rank would get no sample of a global training batch."""
    g = _GROUP
    if g is None:
        return
    last = n_train % batch
    if batch < g.world or 0 < last < g.world:
        raise PFCError(
            f"train.batch_size={batch} on {n_train} samples leaves a batch of "
            f"{last if last else batch} for {g.world} ranks: every rank needs a sample of every "
            "batch; choose a batch size (and a last batch) of at least the world size"
        )


def shard(data: Any) -> Any:
    """``data`` as this rank's shard of each pass (:class:`ShardedData`); itself alone."""
    if _GROUP is None:
        return data
    return ShardedData(data, _GROUP.rank, _GROUP.world)


class Float64Features(nn.Module):
    """``net`` for the metric pass with its features in float64, so that the tracker takes
    its exact path (``train.metric_precision=float64``); ``classifier`` is ``net``'s."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.classifier = net.classifier

    def extract(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """x -> logits (B, K), features [(B, *shape_l)] float64, classifier input (B, d_c)."""
        if hasattr(self.net, "extract"):
            logits, feats, clf_in = self.net.extract(x)
        else:
            logits, feats = self.net(x)
            clf_in = feats[-1].flatten(1)
        return logits, [f.double() for f in feats], clf_in.double()


def metric_net(net: nn.Module, tr: Any) -> nn.Module:
    """The network the metric pass reads: ``net``, or :class:`Float64Features` of it."""
    return Float64Features(net) if tr.metric_precision == "float64" else net


def table_kwargs() -> dict[str, Any]:
    """Keyword arguments of ``collapse_table`` for this process: the group, if any."""
    return {} if _GROUP is None else {"process_group": dist.group.WORLD}


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
    """``launch.py``'s argv for this torchrun worker: ranks 1.. run Hydra in a private temp
    dir (rank 0 tells them the job dir), so that they leave nothing in the output tree."""
    rank, world, _ = launcher_world()
    if world <= 1:
        return argv
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:
        _die_with_parent()
    if rank == 0:
        return argv
    tmp = tempfile.mkdtemp(prefix=f"pfc-rank{rank}-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    keep = [a for a in argv[1:] if not a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    return [argv[0], *keep, f"hydra.run.dir={tmp}/run", f"hydra.sweep.dir={tmp}/sweep"]
