"""DDP training and the sharded metric pass of a job on several ranks (docs/distributed.md).

The process group itself (joining it, rank 0's word, lost ranks) is
:mod:`pfc_sweeps.jobs.distributed`; here are what the training and measuring jobs call, each
a no-op (the object itself, or None) for a single process:

- :func:`sync_batchnorm`: BatchNorm over the global batch (``train.sync_bn``);
- :func:`training_forward`: the forward of a training step, through ``DistributedDataParallel``;
- :func:`train_batches` and :func:`rescale`: each rank's share of each global batch of the one
  seeded permutation, and the loss weight that makes the averaged gradient the global batch's;
- :func:`shard` and :func:`table_kwargs`: each rank's batches of a metric pass, and the group
  for the metric engine, which all-reduces its sums (``train.metric_precision`` reaches
  the tracker as its ``precision``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pfc_sweeps.data.bundles import ShardedData, index_batches, train_shares
from pfc_sweeps.errors import PFCError
from pfc_sweeps.jobs.distributed import current

__all__ = [
    "GlobalBatchNorm",
    "check_shard_sizes",
    "rescale",
    "shard",
    "sync_batchnorm",
    "table_kwargs",
    "train_batches",
    "training_forward",
]


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

    Args:
        model: the network (before DDP wraps it).
        tr: the ``train`` config (``sync_bn``).

    Returns:
        ``model`` with SyncBatchNorm (NCCL) or :class:`GlobalBatchNorm` (gloo) layers, whose
        ``state_dict`` keys are BatchNorm's; ``model`` unchanged for one process.
    """
    if current() is None or not tr.sync_bn:
        return model
    if current().backend == "nccl":
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

    Returns:
        A callable x (B, ...) -> logits (B, K).
    """
    if current() is None:
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
    the global batch's mean loss (shares may differ in size).

    Args:
        data: the training data (``pfc_sweeps.data.bundles``).
        order: (N,) the epoch's permutation, the same on every rank.
        batch: the global batch size ``train.batch_size``.

    Returns:
        An iterator of (x (B_r, *in_shape), y (B_r,), weight or None).
    """
    if current() is None:
        for xb, yb in data.batches("train", order, batch):
            yield xb, yb, None
        return
    r, w = current().rank, current().world
    shares = train_shares(order, batch, r, w)
    sizes = [len(g) for g in order.split(batch)]
    for (xb, yb), b in zip(index_batches(data, "train", shares), sizes, strict=True):
        yield xb, yb, len(yb) * w / b


def rescale(loss: Tensor, weight: float | None) -> Tensor:
    """The loss to back-propagate: ``loss`` itself for one process, else ``loss * weight``."""
    return loss if weight is None else loss * weight


def check_shard_sizes(n_train: int, batch: int) -> None:
    """Check that every rank gets a sample of every global training batch.

    Args:
        n_train: the training set's size.
        batch: ``train.batch_size``.

    Raises:
        PFCError: a batch (or the last one) has fewer samples than ranks (one line).
    """
    g = current()
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
    """``data`` as this rank's shard of each pass.

    Args:
        data: the job's data (``pfc_sweeps.data.bundles``).

    Returns:
        A :class:`~pfc_sweeps.data.bundles.ShardedData` in a group; ``data`` for one process.
    """
    if current() is None:
        return data
    return ShardedData(data, current().rank, current().world)


def table_kwargs() -> dict[str, Any]:
    """Keyword arguments of ``collapse_table`` for this process.

    Returns:
        ``{"process_group": WORLD}`` in a group, ``{}`` for one process (today's call).
    """
    return {} if current() is None else {"process_group": dist.group.WORLD}
