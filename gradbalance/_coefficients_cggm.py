"""CGGM's rule as pure functions (Guo et al., "Classifier-guided Gradient Modulation for
Enhanced Multimodal Learning", NeurIPS 2024).

Each modality m has a classifier on its encoder's features; ``gain_m`` is the change of its
metric (batch accuracy) since the previous step. The balance term of the paper is

    B_m = (sum_j gain_j + eps - gain_m) / (sum_j gain_j + eps),    eps = 1e-8,

the share of the *other* modalities in the total gain; encoder m's gradient is multiplied by
``rho * B_m`` (:func:`cggm_coefficients`), and the direction term
``L_gm = (sum_m |B_m| - sum_m B_m cos_m) / M`` (:func:`cggm_direction_loss`) pulls each
modality's part of the fused classifier towards that modality's own classifier. Nothing here
synchronises with the host.
"""

from __future__ import annotations

import torch

from gradbalance._checks import check_number

GAIN_EPSILON = 1e-8
"""Added to the total gain before dividing (as the official code): equal zero gains give
``B_m = 1``."""


def _check_vector(name: str, values: torch.Tensor) -> None:
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() != 1 or values.numel() < 2:
        raise ValueError(
            f"{name} must be a 1-D tensor with one entry per modality (at least 2), "
            f"got shape {tuple(values.shape)}"
        )
    if not values.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {values.dtype}")


def cggm_balance(gains: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """CGGM's balance terms ``B_m = (G + eps - gain_m) / (G + eps)``, ``G = sum_j gain_j``.

    With every gain of one sign, each ``B_m`` lies in ``[0, 1]`` and they sum to ``M - 1``:
    the modality that gained the most gets the smallest share. When the gains have mixed
    signs, ``G`` can be near 0 and ``B_m`` huge or negative (a negative factor reverses the
    encoder's gradient); ``clamp=True`` bounds ``B_m`` to ``[0, 1]``, ``clamp=False`` keeps the
    paper's unbounded value (the official code then relies on gradient-norm clipping).

    Args:
        gains: ``(M,)`` each classifier's metric gain since the previous step.
        clamp: bound each ``B_m`` to ``[0, 1]``.

    Example:
        >>> cggm_balance(torch.tensor([0.3, 0.1]))
        tensor([0.2500, 0.7500])
        >>> cggm_balance(torch.tensor([0.3, -0.1]), clamp=False)
        tensor([-0.5000,  1.5000])
    """
    _check_vector("gains", gains)
    total = gains.sum() + GAIN_EPSILON
    balance = (total - gains) / total
    return balance.clamp(0.0, 1.0) if clamp else balance


def cggm_coefficients(gains: torch.Tensor, rho: float = 1.3, clamp: bool = True) -> torch.Tensor:
    """CGGM's gradient factors ``k_m = rho * B_m`` (:func:`cggm_balance`).

    Args:
        gains: ``(M,)`` each classifier's metric gain since the previous step (the paper's
            accuracy improvement between two iterations).
        rho: the paper's scale ``rho`` (> 0; 1.3 in the official code for every dataset).
        clamp: bound ``B_m`` to ``[0, 1]`` (see :func:`cggm_balance`).

    Example:
        >>> cggm_coefficients(torch.tensor([0.3, 0.1]), rho=1.3)
        tensor([0.3250, 0.9750])
    """
    rho = check_number("rho", rho, minimum=0.0, strict=True)
    return rho * cggm_balance(gains, clamp)


def cggm_direction_loss(balance: torch.Tensor, cosines: torch.Tensor) -> torch.Tensor:
    """CGGM's direction term ``L_gm = (sum_m |B_m| - sum_m B_m cos_m) / M``.

    ``cos_m`` is the cosine similarity between modality m's classifier and the fused
    classifier (with graph: its gradient turns the fused classifier); ``B_m`` is a constant.
    ``L_gm >= 0`` and it is 0 when every weighted cosine is 1.

    Args:
        balance: ``(M,)`` the balance terms (:func:`cggm_balance`), detached.
        cosines: ``(M,)`` the cosine similarities.

    Example:
        >>> cggm_direction_loss(torch.tensor([0.25, 0.75]), torch.tensor([1.0, 0.0]))
        tensor(0.3750)
    """
    _check_vector("balance", balance)
    if cosines.shape != balance.shape:
        raise ValueError(
            f"cosines must have the shape of balance {tuple(balance.shape)}, "
            f"got {tuple(cosines.shape)}"
        )
    balance = balance.detach().to(cosines.dtype)
    return (balance.abs().sum() - (balance * cosines).sum()) / balance.numel()
