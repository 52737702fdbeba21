"""OPM's drop probabilities and fusion-input rescale (Wei et al., TPAMI 2024), re-exported by
:mod:`gradbalance.coefficients`. Tensors in, tensors out, no host synchronisation."""

from __future__ import annotations

import torch

from gradbalance._checks import check_number

OPM_SCORE_FLOOR = 1e-8
"""Scores are clamped to at least this value, so a score that underflowed to 0 stays finite."""


def _check_vector(name: str, value: torch.Tensor) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 1 or value.numel() < 2 or not value.is_floating_point():
        raise ValueError(
            f"{name} must be a 1-D floating-point tensor with one entry per modality (at "
            f"least 2), got shape {tuple(value.shape)} and dtype {value.dtype}"
        )


def opm_drop_probabilities(scores: torch.Tensor, q_base: float, lam: float) -> torch.Tensor:
    """OPM's probability of dropping each modality's feature (Wei et al., TPAMI 2024, OPM).

    With ``rho_m = s_m / mean_{j != m} s_j`` (the mean of the other modalities' scores, as
    :func:`ogm_coefficients`; for M = 2 the other score), a dominant modality (``rho_m > 1``)
    gets ``q_m = clip(q_base * (1 + lam * tanh(rho_m - 1)), 0, 1)`` and every other modality
    ``q_m = 0``, as the authors' ``calcu_q``: the probability jumps to ``q_base`` as soon as a
    modality leads and grows to ``q_base (1 + lam)`` with its lead. Equal scores drop nothing.
    Scores (summed or mean true-class probability: the ratio is the same) are clamped to 1e-8.

    Args:
        scores: 1-D tensor of the M >= 2 modalities' scores.
        q_base: base drop probability, in [0, 1].
        lam: growth with the lead (``lambda``), >= 0.

    Returns:
        The M drop probabilities, in [0, 1], same dtype and device as ``scores``.

    Example:
        >>> opm_drop_probabilities(torch.tensor([0.6, 0.3]), q_base=0.5, lam=0.5)
        tensor([0.6904, 0.0000])
        >>> opm_drop_probabilities(torch.tensor([0.4, 0.4]), q_base=0.5, lam=0.5)
        tensor([0., 0.])
    """
    _check_vector("scores", scores)
    q_base = check_number("q_base", q_base, minimum=0.0, maximum=1.0)
    lam = check_number("lam", lam, minimum=0.0)
    scores = scores.clamp_min(OPM_SCORE_FLOOR)
    m = scores.numel()
    own = torch.eye(m, dtype=torch.bool, device=scores.device)
    others = scores.unsqueeze(0).expand(m, -1).masked_fill(own, 0.0).sum(1) / (m - 1)
    lead = scores / others - 1
    grown = (q_base * (1 + lam * torch.tanh(lead))).clamp(0.0, 1.0)
    return torch.where(lead > 0, grown, torch.zeros_like(grown))


def opm_fusion_scale(probabilities: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """The factor ``1 / (1 - theta)`` on the fusion input when OPM drops features.

    ``theta = sum_m d_m q_m / sum_m d_m`` is the expected fraction of the concatenated fusion
    input that is dropped (``d_m`` the width of modality m's feature), as the authors'
    ``Modality_drop``: every kept feature, of every modality, is divided by ``1 - theta``.

    Args:
        probabilities: the M drop probabilities (:func:`opm_drop_probabilities`); at least
            one must be below 1 where the widths are positive.
        widths: the M feature widths ``d_m`` (> 0).

    Returns:
        A 0-dim tensor, dtype and device of ``probabilities``.

    Example:
        >>> opm_fusion_scale(torch.tensor([0.5, 0.0]), torch.tensor([512, 512]))
        tensor(1.3333)
    """
    _check_vector("probabilities", probabilities)
    if not isinstance(widths, torch.Tensor) or widths.shape != probabilities.shape:
        raise ValueError(
            f"widths must be a tensor of shape {tuple(probabilities.shape)} (one feature width "
            f"per modality), got {widths!r}"
        )
    d = widths.to(probabilities)
    theta = (d * probabilities).sum() / d.sum()
    return 1 / (1 - theta)
