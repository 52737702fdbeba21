"""InfoReg's rule (Huang et al., CVPR 2025): the proximal strengths and the prime learning window.

Pure functions on tensors, without host synchronisation; re-exported by
:mod:`gradbalance.coefficients`.
"""

from __future__ import annotations

import torch

from gradbalance.errors import InputError


def inforeg_betas(
    scores: torch.Tensor,
    strength: torch.Tensor | float,
    gap_scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """InfoReg's proximal strengths ``beta_m``, for M >= 2 modalities.

    A modality whose score exceeds the mean of the others' (the information-sufficient one)
    gets ``beta_m = strength_m * exp(tanh(gap_scale * (s_m - mean_{j != m} s_j)))``; every
    other modality gets 0 (no regulation). For two modalities this is the official rule:
    the modality with the higher score gets ``strength * exp(tanh(s_m - s_other))``, the
    other 0, and neither on a tie. The official code's scores are the batch *sums* of the
    true-class probability, i.e. ``gap_scale`` = the batch size with mean scores.

    Args:
        scores: 1-D tensor of the M modalities' scores (higher is better).
        strength: the factor ``strength_m`` in front of the exponential, once or per modality
            (a tensor of M values); >= 0.
        gap_scale: multiplies the score gap inside ``tanh`` (a number or a 0-dim tensor).

    Returns:
        The M strengths, >= 0, same dtype and device as ``scores``.

    Example:
        >>> inforeg_betas(torch.tensor([0.6, 0.4]), strength=0.95)
        tensor([1.1573, 0.0000])
        >>> inforeg_betas(torch.tensor([0.5, 0.5]), strength=0.95)
        tensor([0., 0.])
    """
    if scores.dim() != 1 or scores.numel() < 2:
        raise InputError(
            f"scores must be a 1-D tensor of M >= 2 modalities' scores, got shape "
            f"{tuple(scores.shape)}"
        )
    num_modalities = scores.numel()
    # The others' sum with the own entry masked out: for M = 2 exactly the other score.
    others = torch.ones(num_modalities, num_modalities, dtype=scores.dtype, device=scores.device)
    others = (others.fill_diagonal_(0.0) * scores).sum(1) / (num_modalities - 1)
    gap = scores - others
    strength = torch.as_tensor(strength, dtype=scores.dtype, device=scores.device)
    beta = strength * torch.exp(torch.tanh(gap_scale * gap))
    return torch.where(gap > 0, beta, torch.zeros_like(beta))


def inforeg_trace_change(traces: torch.Tensor) -> torch.Tensor:
    """The relative growth of the Fisher-information trace over the last ``h`` epochs.

    ``traces`` holds the last ``h + 1`` epochs' traces, oldest first (zeros before the first
    epoch). The change is that of the ``h``-epoch moving average, relative to the newer one:
    ``(mean(T[1:]) - mean(T[:-1])) / mean(T[1:]) = (T[-1] - T[0]) / sum(T[1:])``
    (the official code, ``h = 10``). While it exceeds the threshold (0.05 officially) the
    model is in its prime learning window. NaN when the ``h`` newer traces are all 0.

    Example:
        >>> inforeg_trace_change(torch.tensor([0.0, 0.0, 2.0]))  # h = 2, the trace started
        tensor(1.)
        >>> inforeg_trace_change(torch.tensor([1.0, 2.0, 2.0]))  # grown by 1 over 2 epochs
        tensor(0.2500)
    """
    return (traces[-1] - traces[0]) / traces[1:].sum()
