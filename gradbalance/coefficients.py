"""Pure coefficient functions: per-modality statistics in, per-modality coefficients out.

Every function takes and returns tensors, keeps the modality order, and never synchronises
with the host (no ``.item()``, no Python ``if`` on tensor values), so it can run inside a
training step on any device and under ``torch.compile``.
"""

from __future__ import annotations

import torch

SCORE_FLOOR = 1e-8
"""Scores are clamped to at least this value, so a score that underflowed to 0 stays finite."""


def _check_scores(scores: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 1 or scores.numel() < 2:
        raise ValueError(
            f"scores must be a 1-D tensor with one entry per modality (at least 2), "
            f"got shape {tuple(scores.shape)}"
        )
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got {scores.dtype}")


def mlb_ratios(scores: torch.Tensor) -> torch.Tensor:
    """Ratio r_m of the other modalities' mean score to modality m's own score.

    ``r_m > 1`` means modality m is weaker than the others on average (METHODS.md §2.3).
    Scores are clamped to :data:`SCORE_FLOOR` first.

    Example:
        >>> mlb_ratios(torch.tensor([0.2, 0.8]))
        tensor([4.0000, 0.2500])
    """
    _check_scores(scores)
    scores = scores.clamp_min(SCORE_FLOOR)
    num_modalities = scores.numel()
    others_mean = (scores.sum() - scores) / (num_modalities - 1)
    return others_mean / scores


def mlb_coefficients(scores: torch.Tensor, alpha: float, beta_max: float = 2.0) -> torch.Tensor:
    """MLB's self-muting coefficients (Kontras et al., BMVC 2024; METHODS.md §2.3).

    With r_m from :func:`mlb_ratios`,
    ``k_m = 1 + (beta_max - 1) * tanh(alpha * (r_m - 1))`` when ``r_m > 1`` (the weaker
    modality is sped up, at most to ``beta_max``) and ``k_m = 1 + tanh(alpha * (r_m - 1))``
    otherwise (the stronger modality is slowed, at least to ``1 - tanh(alpha)``).
    ``beta_max = 2`` is the symmetric form used by every BMVC-era configuration.

    Args:
        scores: 1-D tensor of M >= 2 per-modality scores (mean true-class probability of each
            unimodal head). Values are clamped to 1e-8, so zeros give finite coefficients.
        alpha: strength, >= 0. ``alpha = 0`` gives all ones (plain Multi-Loss).
        beta_max: upper bound of the acceleration, > 0.

    Returns:
        Tensor of M coefficients, same dtype and device as ``scores``.

    Example:
        >>> mlb_coefficients(torch.tensor([0.5, 0.5]), alpha=1.0)
        tensor([1., 1.])
        >>> k = mlb_coefficients(torch.tensor([0.2, 0.8]), alpha=1.0)
        >>> bool(k[0] > 1 > k[1])
        True
    """
    _check_alpha_beta(alpha, beta_max)
    ratios = mlb_ratios(scores)
    shifted = torch.tanh(alpha * (ratios - 1.0))
    return 1.0 + torch.where(ratios > 1.0, (beta_max - 1.0) * shifted, shifted)


def _check_alpha_beta(alpha: float, beta_max: float) -> None:
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if not beta_max > 0:
        raise ValueError(
            f"beta_max must be > 0 (it bounds the weaker modality's coefficient), got {beta_max}"
        )


def true_class_probability(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``softmax(logits)[i, target[i]]``, computed in float32.

    One ``log_softmax`` and one ``gather`` for the whole batch (no per-sample loop), in float32
    even when ``logits`` are half precision (under autocast).

    Example:
        >>> true_class_probability(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]))
        tensor(0.3333)
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return log_probs.gather(-1, target.unsqueeze(-1)).exp().mean()
