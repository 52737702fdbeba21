"""Missing modalities in the epoch statistics of MSLR and Gradient Blending.

A statistic collected over an epoch (validation accuracies, held-out losses) is a sum over the
samples where each modality is present and a count of them; at the epoch's end both are
reduced over the ranks in one collective, and a modality (or component) with no sample keeps
its previous value. No host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ReduceMean = Callable[[torch.Tensor, "torch.Tensor | float"], torch.Tensor]


def means_and_seen(
    reduce_mean: ReduceMean, sums: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums / counts, counts > 0)`` over all ranks, in one ``reduce_mean`` call.

    ``reduce_mean(values, count)`` is a balancer's mean over the ranks; the counts ride along
    as ``counts / 1`` (their sum over the ranks divided by the number of ranks, positive exactly
    where some rank has a sample). Entries without a sample are NaN in the means.

    Example:
        >>> mean = lambda values, count: values / count
        >>> means_and_seen(mean, torch.tensor([3.0, 0.0]), torch.tensor([4.0, 0.0]))
        (tensor([0.7500,    nan]), tensor([ True, False]))
    """
    counts = counts.to(sums.dtype)
    ones = torch.ones_like(counts)
    packed = reduce_mean(torch.stack([sums, counts]), torch.stack([counts, ones]))
    return packed[0], packed[1] > 0


def present_counts(
    present: torch.Tensor | None, batch_size: int, like: torch.Tensor
) -> torch.Tensor:
    """``(M,)`` float32 on ``like``'s device: the samples of each modality in this batch
    (``batch_size`` for every one without a mask; ``like`` is an ``(M,)`` buffer)."""
    if present is None:
        return torch.full_like(like, float(batch_size), dtype=torch.float32)
    return present.sum(0).to(device=like.device, dtype=torch.float32)
