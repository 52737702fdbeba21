"""Statistics across ranks under ``torch.distributed``: means, head start values, head grads.

Every function is a no-op in a single process. Nothing here synchronises with the host.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


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
