"""Regression metrics, including those of multimodal sentiment regression (CMU-MOSI/MOSEI).

Sentiment labels lie in [-3, 3] (strongly negative to strongly positive). Besides the mean
absolute error and Pearson's correlation, the customary report (Zadeh et al., ACL 2018;
Tsai et al., MulT, ACL 2019) has:

* binary accuracy without zeros: samples whose label is exactly 0 are left out, and the
  remaining ones are split non-negative vs negative, for the labels and the predictions;
* the weighted F1 of that binary split (each class's F1 weighted by its number of true
  samples);
* Acc-7 and Acc-5: predictions and labels clipped to [-3, 3] (resp. [-2, 2]) and rounded to
  the nearest integer (halves to even, as ``numpy.round``), then compared.

Every function takes the predictions and labels of a whole split, returns a 0-dim tensor on
their device and never synchronises with the host (samples are left out by masks, not by
indexing), so an evaluation loop can concatenate its batches and read the numbers once.
"""

from __future__ import annotations

import torch

__all__ = [
    "mean_absolute_error",
    "pearson_correlation",
    "sentiment_accuracy",
    "sentiment_binary_accuracy",
    "sentiment_binary_f1",
    "sentiment_metrics",
]


def _check_pair(prediction: torch.Tensor, target: torch.Tensor, flat: bool) -> None:
    if not isinstance(prediction, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("prediction and target must be tensors")
    if not prediction.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"prediction must be floating point and target real, got {prediction.dtype} and "
            f"{target.dtype}"
        )
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction and target must have one shape, got {tuple(prediction.shape)} and "
            f"{tuple(target.shape)}"
        )
    if flat and not (prediction.dim() == 1 or (prediction.dim() == 2 and prediction.shape[1] == 1)):
        raise ValueError(
            f"expected one value per sample, (N,) or (N, 1), got {tuple(prediction.shape)}"
        )
    if prediction.numel() == 0:
        raise ValueError("cannot compute a metric on zero samples")


def _flat(prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_pair(prediction, target, flat=True)
    return (
        prediction.reshape(-1).double(),
        target.to(prediction.device).reshape(-1).double(),
    )


def mean_absolute_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean |prediction - target|`` over every element (float64).

    Example:
        >>> mean_absolute_error(torch.tensor([0.5, -1.0]), torch.tensor([1.0, 1.0]))
        tensor(1.2500, dtype=torch.float64)
    """
    _check_pair(prediction, target, flat=False)
    difference = prediction.double() - target.to(prediction.device).double()
    return difference.abs().mean()


def pearson_correlation(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pearson's correlation coefficient of predictions and labels (float64).

    NaN when either has zero variance (the coefficient is undefined there).

    Example:
        >>> pearson_correlation(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 7.0]))
        tensor(0.9934, dtype=torch.float64)
    """
    x, y = _flat(prediction, target)
    x = x - x.mean()
    y = y - y.mean()
    return (x * y).sum() / ((x * x).sum().sqrt() * (y * y).sum().sqrt())


def _binary_split(
    prediction: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kept, predicted non-negative, label non-negative)``: kept = label != 0."""
    x, y = _flat(prediction, target)
    return y != 0, x >= 0, y >= 0


def sentiment_binary_accuracy(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary accuracy without zeros: non-negative vs negative over samples with label != 0.

    NaN when every label is 0.

    Example:
        >>> sentiment_binary_accuracy(torch.tensor([0.4, -1.0, 2.0, 1.0]),
        ...                           torch.tensor([1.0, 0.5, 0.0, 2.0]))
        tensor(0.6667, dtype=torch.float64)
    """
    kept, predicted, actual = _binary_split(prediction, target)
    correct = (predicted == actual) & kept
    return correct.double().sum() / kept.double().sum()


def sentiment_binary_f1(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Weighted F1 of the binary split of :func:`sentiment_binary_accuracy` (zeros left out).

    ``sum_c n_c F1_c / sum_c n_c`` over the two classes (non-negative, negative), with
    ``n_c`` the number of kept samples whose label is in class c and
    ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)`` (0 when the class never occurs in either).

    Example:
        >>> sentiment_binary_f1(torch.tensor([1.0, -1.0, 1.0, -1.0]),
        ...                     torch.tensor([1.0, -1.0, -1.0, -1.0]))
        tensor(0.7667, dtype=torch.float64)
    """
    kept, predicted, actual = _binary_split(prediction, target)
    weight = kept.double()
    total = torch.zeros((), dtype=torch.float64, device=weight.device)
    for positive in (True, False):
        is_predicted = predicted if positive else ~predicted
        is_actual = actual if positive else ~actual
        true_positive = (is_predicted & is_actual).double().mul(weight).sum()
        false_positive = (is_predicted & ~is_actual).double().mul(weight).sum()
        false_negative = (~is_predicted & is_actual).double().mul(weight).sum()
        denominator = 2 * true_positive + false_positive + false_negative
        f1 = torch.where(
            denominator > 0, 2 * true_positive / denominator.clamp_min(1), denominator * 0
        )
        support = is_actual.double().mul(weight).sum()
        total = total + support * f1
    return total / weight.sum()


def sentiment_accuracy(
    prediction: torch.Tensor, target: torch.Tensor, num_classes: int = 7
) -> torch.Tensor:
    """Acc-7 (``num_classes=7``) or Acc-5 (``num_classes=5``) of sentiment predictions.

    Predictions and labels are clipped to [-3, 3] (Acc-7) or [-2, 2] (Acc-5), rounded to the
    nearest integer (halves to even) and compared.

    Example:
        >>> p, y = torch.tensor([2.6, -0.4, 3.9]), torch.tensor([3.0, 0.2, 2.5])
        >>> sentiment_accuracy(p, y, 7), sentiment_accuracy(p, y, 5)
        (tensor(0.6667, dtype=torch.float64), tensor(1., dtype=torch.float64))
    """
    if num_classes not in (7, 5):
        raise ValueError(f"num_classes must be 7 (Acc-7) or 5 (Acc-5), got {num_classes!r}")
    bound = (num_classes - 1) / 2
    x, y = _flat(prediction, target)
    rounded_x = x.clamp(-bound, bound).round()
    rounded_y = y.clamp(-bound, bound).round()
    return (rounded_x == rounded_y).double().mean()


def sentiment_metrics(prediction: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every metric of a sentiment-regression report, as 0-dim float64 tensors.

    Keys: ``mae``, ``correlation``, ``binary_accuracy`` (without zeros), ``binary_f1``
    (weighted, without zeros), ``acc7``, ``acc5``.

    Example:
        >>> prediction, target = torch.tensor([1.2, -0.3, 2.8]), torch.tensor([1.0, -1.0, 3.0])
        >>> report = sentiment_metrics(prediction, target)
        >>> sorted(report)
        ['acc5', 'acc7', 'binary_accuracy', 'binary_f1', 'correlation', 'mae']
    """
    return {
        "mae": mean_absolute_error(prediction, target),
        "correlation": pearson_correlation(prediction, target),
        "binary_accuracy": sentiment_binary_accuracy(prediction, target),
        "binary_f1": sentiment_binary_f1(prediction, target),
        "acc7": sentiment_accuracy(prediction, target, 7),
        "acc5": sentiment_accuracy(prediction, target, 5),
    }
