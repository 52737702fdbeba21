"""Pure coefficient functions: per-modality statistics in, per-modality coefficients out.

Every function takes and returns tensors, keeps the modality order, and never synchronises
with the host (no ``.item()``, no Python ``if`` on tensor values), so it can run inside a
training step on any device and under ``torch.compile``. Gradient Blending's loss weights
(:func:`gblend_weights`) and MMPareto's gradient weights (:func:`mmpareto_weights`) are here too.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Literal

import torch

from gradbalance._checks import check_alpha, check_number
from gradbalance._coefficients_amss import amss_keep_rates as amss_keep_rates
from gradbalance._coefficients_amss import amss_label_entropy as amss_label_entropy
from gradbalance._coefficients_amss import amss_unit_masks as amss_unit_masks
from gradbalance._coefficients_cggm import cggm_balance as cggm_balance
from gradbalance._coefficients_cggm import cggm_coefficients as cggm_coefficients
from gradbalance._coefficients_cggm import cggm_direction_loss as cggm_direction_loss
from gradbalance._coefficients_inforeg import inforeg_betas as inforeg_betas
from gradbalance._coefficients_inforeg import inforeg_trace_change as inforeg_trace_change
from gradbalance._coefficients_opm import opm_drop_probabilities as opm_drop_probabilities
from gradbalance._coefficients_opm import opm_fusion_scale as opm_fusion_scale
from gradbalance.methods._loss_weights import gblend_estimates as gblend_estimates
from gradbalance.methods._loss_weights import gblend_scores as gblend_scores
from gradbalance.methods._loss_weights import gblend_weights as gblend_weights
from gradbalance.methods._loss_weights import mmpareto_weights as mmpareto_weights

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

    ``r_m > 1`` means modality m is weaker than the others on average (Kontras et al., BMVC 2024).
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
    """MLB's self-muting coefficients (Kontras et al., BMVC 2024).

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
    check_alpha(alpha)
    check_number("beta_max", beta_max, minimum=0.0, strict=True)
    return _tanh_coefficients(mlb_ratios(scores), alpha, beta_max)


def mlb_error_ratios(errors: torch.Tensor) -> torch.Tensor:
    """Regression: ``r_m = err_m / mean_{j != m} err_j`` (lower error is better, so inverted).

    ``r_m > 1`` means modality m errs more than the others on average (the regression
    variant of Kontras et al., BMVC 2024). Errors are clamped to :data:`SCORE_FLOOR` first.

    Example:
        >>> mlb_error_ratios(torch.tensor([2.0, 0.5]))
        tensor([4.0000, 0.2500])
    """
    _check_scores(errors)
    errors = errors.clamp_min(SCORE_FLOOR)
    return errors / others_mean(errors)


def mlb_error_coefficients(
    errors: torch.Tensor, alpha: float, beta_max: float = 2.0
) -> torch.Tensor:
    """MLB's coefficients for regression: the function of :func:`mlb_coefficients` applied to
    the inverted ratios :func:`mlb_error_ratios` of the heads' batch errors.

    Example:
        >>> k = mlb_error_coefficients(torch.tensor([2.0, 0.5]), alpha=1.0)
        >>> bool(k[0] > 1 > k[1])  # the modality with the larger error is sped up
        True
    """
    check_alpha(alpha)
    check_number("beta_max", beta_max, minimum=0.0, strict=True)
    return _tanh_coefficients(mlb_error_ratios(errors), alpha, beta_max)


def _tanh_coefficients(ratios: torch.Tensor, alpha: float, beta_max: float) -> torch.Tensor:
    shifted = torch.tanh(alpha * (ratios - 1.0))
    return 1.0 + torch.where(ratios > 1.0, (beta_max - 1.0) * shifted, shifted)


def true_class_probability(
    logits: torch.Tensor,
    target: torch.Tensor,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> torch.Tensor:
    """Batch mean (or sum) of ``softmax(logits)[i, target[i]]``, computed in float32.

    One ``log_softmax`` and one ``gather`` for the whole batch (no per-sample loop), in float32
    even when ``logits`` are half precision (under autocast). Leading dimensions are batched:
    logits of shape ``(M, B, K)`` (M modalities stacked) give M values in one computation.

    Args:
        logits: ``(..., B, K)``.
        target: ``(B,)`` class indices.
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` (one per sample).

    Example:
        >>> true_class_probability(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]))
        tensor(0.3333)
        >>> true_class_probability(torch.zeros(2, 4, 3), torch.tensor([0, 1, 2, 0]), "sum")
        tensor([1.3333, 1.3333])
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    index = target.expand(log_probs.shape[:-1]).unsqueeze(-1)
    probabilities = log_probs.gather(-1, index).squeeze(-1).exp()
    if reduction == "none":
        return probabilities
    return probabilities.sum(-1) if reduction == "sum" else probabilities.mean(-1)


def others_mean(scores: torch.Tensor) -> torch.Tensor:
    """``mean_{j != m} scores_j`` for every m: each modality's reference, the mean of the others.

    Summed with the own entry masked out (not ``sum - s_m``), so for two modalities the result
    is exactly the other score, bit for bit.

    Example:
        >>> others_mean(torch.tensor([1.0, 2.0, 6.0]))
        tensor([4.0000, 3.5000, 1.5000])
    """
    _check_scores(scores)
    num_modalities = scores.numel()
    own = torch.eye(num_modalities, dtype=torch.bool, device=scores.device)
    others = scores.unsqueeze(0).expand(num_modalities, -1).masked_fill(own, 0.0)
    return others.sum(1) / (num_modalities - 1)


def one_minus_tanh(x: torch.Tensor) -> torch.Tensor:
    """``1 - tanh(x)`` computed as ``2 * sigmoid(-2x)``, which keeps its precision for large x.

    ``1 - tanh(x)`` in float32 rounds to exactly 0 from x ≈ 9 on; the sigmoid form stays
    positive until x ≈ 44.

    Example:
        >>> one_minus_tanh(torch.tensor([0.0, 10.0]))
        tensor([1.0000e+00, 4.1223e-09])
    """
    return 2.0 * torch.sigmoid(-2.0 * x)


def _all_equal(scores: torch.Tensor) -> torch.Tensor:
    """A tie of all modalities (where the mean of the others may round off the common value)."""
    return (scores == scores[0]).all()


def ogm_coefficients(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """OGM's coefficients (Peng et al., CVPR 2022, eq. 10), for M >= 2.

    Each modality m is compared with the mean of the others (the rule of MLB's ratio):
    ``rho_m = s_m / mean_{j != m} s_j``. A dominant modality, one whose score exceeds that mean,
    gets ``1 - tanh(alpha * rho_m)``; every other gets exactly 1. The argument is rho, not
    rho - 1 (as the paper and the official code), so a dominant modality is slowed to at most
    ``1 - tanh(alpha)`` however small its lead. When no modality exceeds the mean of the others
    (all scores equal) modality 0 is slowed (the official two-modality code tests
    ``rho_1 > 1``). For M = 2 this is exactly the paper's rule: one dominant modality, the
    other at 1. Scores (summed or mean true-class probability: the ratio is the same) are
    clamped to 1e-8; never a host synchronisation.

    Args:
        scores: 1-D tensor of the M >= 2 modalities' scores.
        alpha: strength, >= 0.

    Returns:
        The M coefficients, same dtype and device as ``scores``.

    Example:
        >>> ogm_coefficients(torch.tensor([0.6, 0.3]), alpha=0.5)
        tensor([0.2384, 1.0000])
        >>> ogm_coefficients(torch.tensor([0.6, 0.2, 0.2]), alpha=0.5)
        tensor([0.0949, 1.0000, 1.0000])
    """
    _check_scores(scores)
    check_alpha(alpha)
    scores = scores.clamp_min(SCORE_FLOOR)
    reference = others_mean(scores)
    ratios = scores / reference
    first = torch.zeros_like(scores, dtype=torch.bool)
    first[0] = True
    dominant = torch.where(_all_equal(scores), first, scores > reference)
    return torch.where(dominant, one_minus_tanh(alpha * ratios), torch.ones_like(ratios))


AGM_LOSS_CAP = 18.420680743952367
"""``-log(1e-8)``: AGM's per-sample loss cap (the official code floors p at 1e-8)."""


def agm_losses(
    shapley_logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Per-modality cross-entropy of AGM's Shapley logits, each sample capped at 18.42.

    Args:
        shapley_logits: ``(M, B, K)``, one logit tensor per modality.
        target: ``(B,)`` class indices.
        reduction: ``"mean"`` (AGM's statistic) or ``"sum"`` over the batch, or ``"none"``
            (``(M, B)``, one per sample: the sums over each modality's present samples).

    Returns:
        ``(M,)`` float32: ``mean_i min(-log softmax(logits_m)[i, y_i], -log 1e-8)``, the
        vectorised form of the official code's per-sample floor ``p < 1e-8 -> 1e-8``.

    Example:
        >>> agm_losses(torch.zeros(2, 4, 3), torch.tensor([0, 1, 2, 0]))
        tensor([1.0986, 1.0986])
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    log_probs = torch.log_softmax(shapley_logits.float(), dim=-1)
    index = target.view(1, -1, 1).expand(log_probs.shape[0], -1, 1)
    nll = (-log_probs.gather(-1, index).squeeze(-1)).clamp_max(AGM_LOSS_CAP)
    if reduction == "none":
        return nll
    return nll.mean(dim=1) if reduction == "mean" else nll.sum(dim=1)


def agm_ratios(losses: torch.Tensor) -> torch.Tensor:
    """AGM's ratios ``r_m = exp((mean(losses) - losses_m) * M / (M - 1))``.

    For M = 2 this is ``r_a = exp(l_v - l_a)``: the ratio of the two modalities' geometric-mean
    true-class probabilities. ``r_m > 1`` means modality m is stronger than average.

    Example:
        >>> agm_ratios(torch.tensor([1.0, 2.0]))
        tensor([2.7183, 0.3679])
    """
    _check_scores(losses)
    num_modalities = losses.numel()
    return torch.exp((losses.mean() - losses) * (num_modalities / (num_modalities - 1)))


def agm_coefficients(
    losses: torch.Tensor,
    running_losses: torch.Tensor,
    alpha: float,
    max_exponent: float = 10.0,
) -> torch.Tensor:
    """AGM's coefficients (Li et al., ICCV 2023).

    With ``r = agm_ratios(losses)`` (this batch) and ``o = agm_ratios(running_losses)`` (the
    running "optimal" ratio), ``k_m = exp(alpha * min(o_m - r_m, max_exponent))``: a modality
    ahead of its usual standing (r > o) is slowed, one behind it is sped up, and k = 1 when the
    ratio equals the running one. There is no lower bound (k may underflow to 0, as in the
    official code); the class offers ``min_coefficient``.

    Args:
        losses: ``(M,)`` per-modality mean cross-entropy of the Shapley logits of this batch.
        running_losses: ``(M,)`` their running means before this step.
        alpha: strength, >= 0.
        max_exponent: upper clamp of ``o - r`` (10 in the two-modality code, 7 in the MLB authors'
            three-modality code).

    Example:
        >>> agm_coefficients(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 1.5]), alpha=1.0)
        tensor([0.1794, 1.8816])
    """
    _check_scores(losses)
    check_alpha(alpha)
    if running_losses.shape != losses.shape:
        raise ValueError(
            f"running_losses must have the shape of losses {tuple(losses.shape)}, "
            f"got {tuple(running_losses.shape)}"
        )
    gap = agm_ratios(running_losses.to(losses.dtype)) - agm_ratios(losses)
    return torch.exp(alpha * gap.clamp_max(max_exponent))


def mslr_coefficients(
    accuracies: torch.Tensor, memory_means: torch.Tensor, initial: torch.Tensor | float
) -> torch.Tensor:
    """MSLR's coefficients (Yao & Mihalcea 2022, "dynamic").

    ``accuracies / memory_means * initial``: each modality's validation accuracy relative to
    the mean of its last K epochs, times its initial factor λ_m.

    Args:
        accuracies: ``(M,)`` this epoch's per-modality validation accuracy.
        memory_means: ``(M,)`` the mean of each modality's accuracy over the last K epochs.
        initial: ``(M,)`` (or one number) the initial per-modality factors λ.

    Example:
        >>> mslr_coefficients(torch.tensor([0.6, 0.5]), torch.tensor([0.5, 0.5]),
        ...                   torch.tensor([0.9, 1.1]))
        tensor([1.0800, 1.1000])
    """
    _check_scores(accuracies)
    if memory_means.shape != accuracies.shape:
        raise ValueError(
            f"memory_means must have the shape of accuracies {tuple(accuracies.shape)}, "
            f"got {tuple(memory_means.shape)}"
        )
    return accuracies / memory_means * initial


def pmr_weights(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """PMR's prototype-loss weights (Fan et al., CVPR 2023), for M >= 2.

    ``alpha`` for every weaker modality, 0 for the others: the prototype cross-entropy is added,
    with a constant weight, for each modality whose prototype score is below the mean of the
    other modalities' scores (the rule of MLB's ratio). For two modalities that is the weaker
    one (as both the official code and the MLB authors' code); on a tie no modality gets the loss.

    Args:
        scores: ``(M,)`` prototype scores (true-class probability of ``softmax(-distance)``).
        alpha: weight of a weaker modality's prototype loss, >= 0.

    Example:
        >>> pmr_weights(torch.tensor([0.7, 0.4]), alpha=2.0)
        tensor([0., 2.])
        >>> pmr_weights(torch.tensor([0.7, 0.4, 0.6]), alpha=2.0)
        tensor([0., 2., 0.])
    """
    _check_scores(scores)
    check_alpha(alpha)
    weaker = (scores < others_mean(scores)) & ~_all_equal(scores)
    return torch.where(weaker, torch.full_like(scores, float(alpha)), torch.zeros_like(scores))


def shapley_matrix(num_modalities: int) -> tuple[list[frozenset[int]], torch.Tensor]:
    """The coalitions and weights of AGM's Shapley decomposition without the empty coalition.

    ``phi_m = sum_S C[m, S] * f(S)``, where f(S) is the fused output with only the modalities
    in S present (the others masked) and ``f(∅)`` is dropped (a constant offset, as in the
    official code), so ``sum_m phi_m = f(all)``. For M = 2 this is
    ``phi_a = (f - f(v) + f(a)) / 2``; for M = 3 the seven coalitions with weights 1/3, 1/6.

    Returns:
        ``(coalitions, C)``: the 2^M - 1 non-empty coalitions (the full one first) and the
        ``(M, 2^M - 1)`` float64 weight matrix.

    Example:
        >>> coalitions, weights = shapley_matrix(2)
        >>> [sorted(s) for s in coalitions]
        [[0, 1], [0], [1]]
        >>> weights
        tensor([[ 0.5000,  0.5000, -0.5000],
                [ 0.5000, -0.5000,  0.5000]], dtype=torch.float64)
    """
    if num_modalities < 2:
        raise ValueError(f"the Shapley decomposition needs >= 2 modalities, got {num_modalities}")
    factorial, m = math.factorial, num_modalities
    # Largest first, each size in lexicographic order (as combinations() yields them).
    coalitions = [frozenset(c) for s in range(m, 0, -1) for c in combinations(range(m), s)]
    # By coalition size s: + (s-1)!(M-s)!/M! for a member, - s!(M-s-1)!/M! for a non-member.
    plus = torch.tensor(
        [0.0] + [factorial(s - 1) * factorial(m - s) / factorial(m) for s in range(1, m + 1)],
        dtype=torch.float64,
    )
    minus = torch.tensor(
        [factorial(s) * factorial(m - s - 1) / factorial(m) for s in range(m)] + [0.0],
        dtype=torch.float64,
    )
    masks = torch.tensor([sum(1 << i for i in coalition) for coalition in coalitions])
    members = (masks.unsqueeze(0) >> torch.arange(m).unsqueeze(1)) & 1 == 1
    size = members.sum(0)
    weights = torch.where(members, plus[size], -minus[size])
    return coalitions, weights
