"""Classification metrics of the paper: accuracy and expected calibration error (ECE); and
regression metrics: mean absolute error, Pearson's correlation and the sentiment-regression
report (binary accuracy and weighted F1 without zero labels, Acc-7, Acc-5), see
:func:`sentiment_metrics`.

Both take the logits (or probabilities) of a whole split at once and return 0-dim tensors on
the inputs' device, so an evaluation loop can concatenate its batches and synchronise with the
host once, at the end.

ECE follows eq. 10 of the paper's appendix: the top-label confidences are sorted into
``n_bins`` equal-width bins and ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``. Two binnings
are offered:

* ``binning="classical"`` (default): bins ``(lo, hi]`` as Guo et al. (2017) and Naeini et al.
  (2015); a confidence of exactly 1.0 falls into the last bin.
* ``binning="torchmetrics"``: bins ``[lo, hi)`` plus a separate bin for confidence 1.0, as
  ``torchmetrics.classification.MulticlassCalibrationError`` since v1.0. The official MLB
  numbers were computed this way.

The two agree whenever no confidence lies exactly on a bin boundary or at 1.0; with ties or
saturated (== 1.0) confidences they differ.
"""

from __future__ import annotations

from typing import Literal

import torch

from gradbalance._regression_metrics import (
    mean_absolute_error,
    pearson_correlation,
    sentiment_accuracy,
    sentiment_binary_accuracy,
    sentiment_binary_f1,
    sentiment_metrics,
)

__all__ = [
    "BINNINGS",
    "accuracy",
    "expected_calibration_error",
    "mean_absolute_error",
    "pearson_correlation",
    "sentiment_accuracy",
    "sentiment_binary_accuracy",
    "sentiment_binary_f1",
    "sentiment_metrics",
    "top_label_confidence",
]

Binning = Literal["classical", "torchmetrics"]
Inputs = Literal["logits", "probabilities"]
BINNINGS: tuple[str, ...] = ("classical", "torchmetrics")


def _check(scores: torch.Tensor, target: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("scores and target must be tensors")
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape (N, num_classes), got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(
            f"scores must be floating point (logits or probabilities), got {scores.dtype}"
        )
    if target.dim() != 1 or target.shape[0] != scores.shape[0]:
        raise ValueError(
            f"target must have shape ({scores.shape[0]},) to match the scores, "
            f"got {tuple(target.shape)}"
        )
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    if scores.shape[0] == 0:
        raise ValueError("cannot compute a metric on zero samples")


def accuracy(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy: the fraction of rows whose largest score is at the target class.

    Args:
        scores: ``(N, K)`` logits or probabilities.
        target: ``(N,)`` integer labels.

    Returns:
        A 0-dim float32 tensor in [0, 1] on the scores' device (no host synchronisation).

    Example:
        >>> logits = torch.tensor([[2.0, 0.1], [0.3, 0.9], [1.0, 0.0]])
        >>> accuracy(logits, torch.tensor([0, 1, 1]))
        tensor(0.6667)
    """
    _check(scores, target)
    return (scores.argmax(dim=1) == target.to(scores.device)).float().mean()


def top_label_confidence(
    scores: torch.Tensor, inputs: Inputs = "logits", dtype: torch.dtype | None = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence (largest class probability) and predicted class of each row.

    Args:
        scores: ``(N, K)`` logits or probabilities.
        inputs: ``"logits"`` (softmax is applied) or ``"probabilities"`` (used as given).
        dtype: precision of the softmax (float64 by default; ``None`` keeps the input's).

    Returns:
        ``(confidence (N,), prediction (N,))``.

    Example:
        >>> conf, pred = top_label_confidence(torch.tensor([[0.0, 0.0], [3.0, 1.0]]))
        >>> conf.tolist(), pred.tolist()
        ([0.5, 0.8807970779778823], [0, 0])
    """
    if inputs not in ("logits", "probabilities"):
        raise ValueError(f"inputs must be 'logits' or 'probabilities', got {inputs!r}")
    values = scores if dtype is None else scores.to(dtype)
    probabilities = values.softmax(dim=1) if inputs == "logits" else values
    return probabilities.max(dim=1)


def expected_calibration_error(
    scores: torch.Tensor,
    target: torch.Tensor,
    n_bins: int = 15,
    *,
    binning: Binning = "classical",
    inputs: Inputs = "logits",
) -> torch.Tensor:
    """Expected calibration error with ``n_bins`` equal-width confidence bins (appendix eq. 10).

    ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` over the top-label confidences, where
    ``acc`` is the fraction of correct predictions in the bin and ``conf`` their mean confidence.

    Args:
        scores: ``(N, K)`` logits (default) or probabilities (``inputs="probabilities"``; unlike
            torchmetrics nothing is guessed from the value range).
        target: ``(N,)`` integer labels.
        n_bins: number of equal-width bins over [0, 1] (15 in the paper).
        binning: ``"classical"``: bins ``(lo, hi]``, confidence 1.0 in the last bin, computed in
            float64. ``"torchmetrics"``: bins ``[lo, hi)`` plus one bin for confidence exactly
            1.0, with the softmax in the input's precision and float32 confidences and
            boundaries, reproducing
            ``torchmetrics.functional.classification.multiclass_calibration_error(...,
            n_bins=15, norm="l1")``.
        inputs: ``"logits"`` or ``"probabilities"``.

    Returns:
        A 0-dim float64 tensor in [0, 1] on the scores' device (no host synchronisation).

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
        >>> target = torch.tensor([0, 1, 1, 0])
        >>> round(expected_calibration_error(probs, target, inputs="probabilities").item(), 4)
        0.4
        >>> saturated = torch.tensor([[1.0, 0.0], [0.95, 0.05]])  # a wrong 1.0 beside a right 0.95
        >>> y = torch.tensor([1, 0])
        >>> [round(expected_calibration_error(saturated, y, binning=b,
        ...        inputs="probabilities").item(), 4) for b in ("classical", "torchmetrics")]
        [0.475, 0.525]
    """
    _check(scores, target)
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be an int >= 1, got {n_bins!r}")
    if binning not in BINNINGS:
        raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}")
    if binning == "classical":
        confidence, prediction = top_label_confidence(scores, inputs, torch.float64)
        boundaries = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=scores.device)
        # bucketize(right=False) gives i with boundaries[i-1] < x <= boundaries[i]: bins (lo, hi].
        index = (torch.bucketize(confidence, boundaries, right=False) - 1).clamp(0, n_bins - 1)
        slots = n_bins
    else:
        confidence, prediction = top_label_confidence(scores, inputs, None)
        confidence = confidence.float()  # torchmetrics bins float32 confidences
        boundaries = torch.linspace(
            0.0, 1.0, n_bins + 1, dtype=confidence.dtype, device=scores.device
        )
        # [lo, hi) bins; confidence == 1.0 lands in the extra slot n_bins.
        index = (torch.bucketize(confidence, boundaries, right=True) - 1).clamp(0, n_bins)
        slots = n_bins + 1
    correct = (prediction == target.to(scores.device)).to(torch.float64)
    confidence = confidence.to(torch.float64)
    counts = torch.zeros(slots, dtype=torch.float64, device=scores.device)
    counts.index_add_(0, index, torch.ones_like(confidence))
    confidence_sums = torch.zeros_like(counts).index_add_(0, index, confidence)
    correct_sums = torch.zeros_like(counts).index_add_(0, index, correct)
    # |sum correct - sum confidence| / N per bin equals |B|/N * |acc(B) - conf(B)|.
    return (correct_sums - confidence_sums).abs().sum() / confidence.shape[0]
