"""PMR's prototype maths: distances to class prototypes as logits, the batch standardisation
of the MLB authors' code, and the prototype cross-entropy (Fan et al., CVPR 2023)."""

from __future__ import annotations

import torch


def prototype_logits(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``-||z_i - c_k||_2``: the ``(B, K)`` prototype logits (float32, one ``cdist``).

    Example:
        >>> prototype_logits(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        tensor([[-5., -1.]])
    """
    return -torch.cdist(
        features.float(), prototypes.float(), compute_mode="donot_use_mm_for_euclid_dist"
    )


BATCH_NORM_EPS = 1e-5
"""The ``eps`` of PMR's ``batch_norm`` standardisation (``BatchNorm1d``'s default)."""


def batch_standardise(
    features: torch.Tensor, present: torch.Tensor | None = None
) -> torch.Tensor:
    """``(z - mean) / sqrt(var + 1e-5)`` over the batch, with the biased variance: the
    training-mode ``BatchNorm1d(affine=False)`` of the MLB authors' PMR code.

    Defined for a batch of one as the same formula: the sample equals the batch mean, so its
    standardised feature is 0 (and so is its gradient); ``BatchNorm1d`` refuses that batch.
    With ``present`` (``(B,)`` bool) the mean and variance are those of the present samples
    only (the rows of absent ones are standardised with them and read by nobody).

    Example:
        >>> batch_standardise(torch.tensor([[1.0, 2.0], [3.0, 2.0]]))
        tensor([[-1.0000,  0.0000],
                [ 1.0000,  0.0000]])
        >>> batch_standardise(torch.tensor([[5.0, -1.0]]))
        tensor([[0., 0.]])
        >>> rows = torch.tensor([True, True, False])
        >>> batch_standardise(torch.tensor([[1.0], [3.0], [9.0]]), rows)
        tensor([[-1.0000],
                [ 1.0000],
                [ 7.0000]])
    """
    if present is None:
        centered = features - features.mean(0, keepdim=True)
        variance = centered.square().mean(0, keepdim=True)
    else:
        rows = present.to(features.device).unsqueeze(1)
        count = rows.sum(0, keepdim=True).clamp_min(1).to(features.dtype)
        mean = torch.where(rows, features, 0).sum(0, keepdim=True) / count
        centered = features - mean
        variance = torch.where(rows, centered.square(), 0).sum(0, keepdim=True) / count
    return centered * torch.rsqrt(variance + BATCH_NORM_EPS)


def mask_missing_prototypes(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Classes without a prototype yet get the lowest logit (probability 0)."""
    return logits.masked_fill(~valid, torch.finfo(logits.dtype).min)


def prototype_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    present: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of the prototype logits over the samples whose class has a prototype
    (and, with ``present``, a ``(B,)`` bool mask, where the modality is present; the others
    get exactly no gradient).

    Example:
        >>> logits = torch.tensor([[-1.0, -2.0], [-3.0, -1.0]])
        >>> prototype_cross_entropy(logits, torch.tensor([0, 1]), torch.tensor([True, True]))
        tensor(0.2201)
        >>> prototype_cross_entropy(logits, torch.tensor([0, 1]), torch.tensor([True, True]),
        ...                         torch.tensor([True, False]))
        tensor(0.3133)
    """
    log_probs = torch.log_softmax(mask_missing_prototypes(logits, valid), dim=-1)
    nll = -log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
    keep = valid.gather(0, target)
    if present is not None:
        keep = keep & present.to(keep.device)
    nll = torch.where(keep, nll, torch.zeros_like(nll))
    return nll.sum() / keep.sum().clamp_min(1)
