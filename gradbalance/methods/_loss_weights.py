"""Pure weight functions of Gradient Blending and MMPareto (re-exported by
:mod:`gradbalance.coefficients`). Tensors in, tensors out, no host synchronisation.
"""

from __future__ import annotations

import torch

GBLEND_MIN_OVERFITTING = 1e-3
"""Default floor of the overfitting change O in :func:`gblend_weights` (in nats)."""


def _check_losses(name: str, value: torch.Tensor, like: torch.Tensor | None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point() or value.dim() != 1 or value.numel() < 2:
        raise ValueError(
            f"{name} must be a 1-D floating-point tensor with one loss per component "
            f"(at least 2), got shape {tuple(value.shape)} and dtype {value.dtype}"
        )
    if like is not None and value.shape != like.shape:
        raise ValueError(
            f"{name} must have the shape {tuple(like.shape)}, got {tuple(value.shape)}"
        )


def gblend_estimates(
    train_losses_prev: torch.Tensor,
    train_losses_now: torch.Tensor,
    val_losses_prev: torch.Tensor,
    val_losses_now: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalisation gain G and overfitting change O of each component between two checkpoints.

    Wang, Tran & Feiszli, "What Makes Training Multi-modal Classification Networks Hard?"
    (CVPR 2020), Section 3: with the overfitting ``O_N = L^V_N - L^T_N`` (held-out minus
    training loss at checkpoint N), ``G = L^V_prev - L^V_now`` (the held-out loss decrease) and
    ``O = O_now - O_prev`` (the change of the gap).

    Example:
        >>> gain, change = gblend_estimates(torch.tensor([1.0, 1.2]), torch.tensor([0.6, 0.7]),
        ...                                 torch.tensor([1.1, 1.3]), torch.tensor([0.9, 1.0]))
        >>> gain, change
        (tensor([0.2000, 0.3000]), tensor([0.2000, 0.2000]))
    """
    _check_losses("train_losses_prev", train_losses_prev, None)
    for name, value in (
        ("train_losses_now", train_losses_now),
        ("val_losses_prev", val_losses_prev),
        ("val_losses_now", val_losses_now),
    ):
        _check_losses(name, value, train_losses_prev)
    gain = val_losses_prev - val_losses_now
    change = (val_losses_now - train_losses_now) - (val_losses_prev - train_losses_prev)
    return gain, change


def gblend_scores(
    gain: torch.Tensor, change: torch.Tensor, min_overfitting: float = GBLEND_MIN_OVERFITTING
) -> torch.Tensor:
    """Unnormalised Gradient-Blending scores ``max(G, 0) / max(O, min_overfitting)^2``.

    The degenerate cases of ``G / O^2``: a component whose held-out loss did not decrease
    (``G <= 0``) scores 0 (it brought no generalisation); one whose train/held-out gap did not
    grow (``O <= min_overfitting``, the best case) is scored with ``O = min_overfitting``, the
    largest admissible score, instead of dividing by zero or by a negative square.

    Example:
        >>> gblend_scores(torch.tensor([0.2, -0.1, 0.1]), torch.tensor([0.1, 0.1, -0.5]), 0.05)
        tensor([20.0000,  0.0000, 40.0000])
    """
    if not min_overfitting > 0:
        raise ValueError(f"min_overfitting must be > 0, got {min_overfitting}")
    return gain.clamp_min(0) / change.clamp_min(min_overfitting).square()


def gblend_weights(
    train_losses_prev: torch.Tensor,
    train_losses_now: torch.Tensor,
    val_losses_prev: torch.Tensor,
    val_losses_now: torch.Tensor,
    min_overfitting: float = GBLEND_MIN_OVERFITTING,
) -> torch.Tensor:
    """Gradient-Blending loss weights ``w_k ∝ G_k / O_k^2``, normalised to sum 1.

    Wang, Tran & Feiszli (CVPR 2020), Proposition 1 with the estimates of Section 3.3: each
    component k (the fused output and every unimodal head) gets a weight proportional to its
    generalisation gain over the square of its overfitting change between two checkpoints
    (:func:`gblend_estimates`), with the degenerate cases of :func:`gblend_scores`. When no
    component has a positive gain the weights are uniform (``1 / n``).

    Args:
        train_losses_prev, train_losses_now: ``(n,)`` training losses at the two checkpoints.
        val_losses_prev, val_losses_now: ``(n,)`` held-out losses at the two checkpoints.
        min_overfitting: floor of O (> 0).

    Returns:
        ``(n,)`` non-negative weights summing to 1, in the components' order.

    Example:
        >>> gblend_weights(torch.tensor([1.0, 1.2]), torch.tensor([0.6, 0.7]),
        ...                torch.tensor([1.1, 1.3]), torch.tensor([0.9, 1.0]))
        tensor([0.4000, 0.6000])
    """
    gain, change = gblend_estimates(
        train_losses_prev, train_losses_now, val_losses_prev, val_losses_now
    )
    scores = gblend_scores(gain, change, min_overfitting)
    total = scores.sum()
    uniform = torch.full_like(scores, 1.0 / scores.numel())
    return torch.where(total > 0, scores / total.clamp_min(torch.finfo(scores.dtype).tiny), uniform)


def mmpareto_weights(
    dot: torch.Tensor, norm_multimodal: torch.Tensor, norm_unimodal: torch.Tensor
) -> torch.Tensor:
    """MMPareto's weights ``(a_multimodal, a_unimodal)`` of two gradients (Wei & Hu, ICML 2024).

    From the inner product ``dot = <g_mm, g_uni>`` and the squared norms of the two gradients:
    when they conflict (negative cosine) the two-task min-norm (MGDA) point of their convex hull,
    ``a_mm = clamp((|g_uni|^2 - dot) / |g_mm - g_uni|^2, 0, 1)`` and ``a_uni = 1 - a_mm``;
    otherwise ``(1/2, 1/2)``. The combined gradient is ``2 (a_mm g_mm + a_uni g_uni)`` (the plain
    sum without conflict). Works elementwise on tensors of any (equal) shape; the weights are
    stacked on a new last dimension.

    Example:
        >>> mmpareto_weights(torch.tensor(-1.0), torch.tensor(4.0), torch.tensor(1.0))
        tensor([0.2857, 0.7143])
        >>> mmpareto_weights(torch.tensor(1.0), torch.tensor(4.0), torch.tensor(1.0))
        tensor([0.5000, 0.5000])
    """
    gap = (norm_multimodal + norm_unimodal - 2 * dot).clamp_min(torch.finfo(dot.dtype).tiny)
    pareto = ((norm_unimodal - dot) / gap).clamp(0, 1)
    multimodal = torch.where(dot < 0, pareto, torch.full_like(pareto, 0.5))
    return torch.stack([multimodal, 1 - multimodal], dim=-1)
