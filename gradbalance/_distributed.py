"""Statistics across ranks under ``torch.distributed``: means, head start values, head grads.

Every function is a no-op in a single process. Nothing here synchronises with the host.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradbalance._attach import Attachment, active_ddp


def world_size(group: Any) -> int:
    """The number of processes sharing the training (1 outside torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def local_mean(sums: torch.Tensor, count: torch.Tensor | float) -> torch.Tensor:
    """This process's ``sums / count`` (float32, detached)."""
    sums = sums.detach().float()
    if isinstance(count, torch.Tensor):
        count = count.detach().to(device=sums.device, dtype=torch.float32)
    return sums / count


def reduce_mean(
    sums: torch.Tensor,
    count: torch.Tensor | float,
    group: Any,
    extra: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Global mean ``sum_ranks(sums) / sum_ranks(count)`` in one all-reduce.

    Args:
        sums: this process's sums over its samples (any shape).
        count: its number of samples (a number, or a tensor broadcastable to ``sums``).
        group: the process group (None: the world).
        extra: an optional 1-D float tensor summed over the ranks in the same collective
            (e.g. a non-finite flag every rank must agree on).

    Returns:
        The float32 mean and the reduced ``extra`` (None when not given).
    """
    sums = sums.detach().float()
    if isinstance(count, torch.Tensor):
        counts = count.detach().to(device=sums.device, dtype=torch.float32)
    else:
        counts = torch.full((), float(count), device=sums.device)
    if world_size(group) == 1:
        return sums / counts, extra
    parts = [sums.reshape(-1), counts.reshape(-1)]
    if extra is not None:
        parts.append(extra.float().reshape(-1).to(sums.device))
    packed = torch.cat(parts)
    dist.all_reduce(packed, group=group)
    total = packed[: sums.numel()].view(sums.shape)
    end = sums.numel() + counts.numel()
    reduced = packed[sums.numel() : end].view(counts.shape)
    return total / reduced, (packed[end:] if extra is not None else None)


def reduce_sum(
    values: torch.Tensor, group: Any, extra: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``sum_ranks(values)`` (float32, detached) in one all-reduce, with ``extra`` (an optional
    1-D float tensor, e.g. a non-finite flag) summed in the same collective."""
    values = values.detach().float()
    if world_size(group) == 1:
        return values, extra
    parts = [values.reshape(-1)]
    if extra is not None:
        parts.append(extra.float().reshape(-1).to(values.device))
    packed = torch.cat(parts)
    dist.all_reduce(packed, group=group)
    total = packed[: values.numel()].view(values.shape)
    return total, (packed[values.numel() :] if extra is not None else None)


def broadcast_parameters(module: nn.Module, group: Any) -> None:
    """Give every rank the parameters of the group's first rank."""
    source = 0 if group is None else dist.get_global_rank(group, 0)
    with torch.no_grad():
        for param in module.parameters():
            dist.broadcast(param.detach(), src=source, group=group)


def average_gradient(grad: torch.Tensor, group: Any) -> torch.Tensor:
    """The mean of ``grad`` over the ranks (a head's gradient, as DDP averages its own)."""
    grad = grad.contiguous().clone()
    dist.all_reduce(grad, group=group)
    return grad.div_(dist.get_world_size(group))


class RankSync:
    """A balancer's heads across ranks: same start values, averaged gradients.

    Args:
        model: the user's model (to recognise its DDP wrapper).
        group: the process group (None: the world).
    """

    def __init__(self, model: nn.Module, group: Any) -> None:
        self.model = model
        self.group = group
        self.ready = False
        self.heads_in_ddp = False
        self._seen: weakref.ref | None = None

    def check_wrapper(self, balancer: nn.Module) -> None:
        """At a forward: refuse a DDP wrapper made before the balancer; note whether DDP's
        module contains the balancer (DDP then averages the heads' gradients itself)."""
        ddp = active_ddp(self.model)
        if ddp is None or (self._seen is not None and self._seen() is ddp):
            return
        self._seen = weakref.ref(ddp)
        self.heads_in_ddp = any(module is balancer for module in ddp.module.modules())

    def prepare(self, balancer: nn.Module, attachment: Attachment) -> None:
        """First training step with several ranks: rank 0's heads everywhere, and a gradient
        hook averaging each head parameter's gradient over the ranks."""
        if self.ready or world_size(self.group) == 1:
            return
        broadcast_parameters(balancer, self.group)
        trainable = [p for p in balancer.parameters() if p.requires_grad]
        attachment.add_gradient_hooks(trainable, self.average)
        self.ready = True

    def average(self, grad: torch.Tensor) -> torch.Tensor | None:
        """Gradient hook of a head parameter: the mean over the ranks (unless DDP does it)."""
        if self.heads_in_ddp or world_size(self.group) == 1:
            return None
        return average_gradient(grad, self.group)
