"""Regression metrics of ``gradbalance.metrics`` against torchmetrics and plain-Python
references (the sentiment report: binary accuracy and weighted F1 without zeros, Acc-7/5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics import F1Score, MeanAbsoluteError, PearsonCorrCoef

from gradbalance.metrics import (
    mean_absolute_error,
    pearson_correlation,
    sentiment_accuracy,
    sentiment_binary_accuracy,
    sentiment_binary_f1,
    sentiment_metrics,
)


def sentiment_pair(n=400, seed=0, zeros=True):
    """Labels in [-3, 3] on a grid of thirds (with exact zeros and halves) and noisy
    predictions, some outside the range."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(-9, 10, (n,), generator=g).double() / 3
    if not zeros:
        target = torch.where(target == 0, torch.ones_like(target), target)
    target[:4] = torch.tensor([2.5, -1.5, 0.5, -2.5], dtype=torch.float64)  # exact halves
    prediction = target + torch.randn(n, generator=g, dtype=torch.float64) * 1.2
    return prediction, target


def plain_binary(prediction, target):
    """The binary split written plainly: (predicted, actual) of samples whose label != 0."""
    pairs = [(p >= 0, y >= 0) for p, y in zip(prediction.tolist(), target.tolist()) if y != 0]
    return [p for p, _ in pairs], [a for _, a in pairs]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mae_matches_torchmetrics(seed):
    prediction, target = sentiment_pair(seed=seed)
    expected = MeanAbsoluteError()(prediction, target).item()  # float32 state
    numpy = float(np.mean(np.abs(prediction.numpy() - target.numpy())))
    value = mean_absolute_error(prediction, target).item()
    assert value == pytest.approx(expected, rel=1e-6)
    assert value == pytest.approx(numpy, rel=1e-12)


def test_mae_of_multi_output_targets_is_over_every_element():
    g = torch.Generator().manual_seed(3)
    prediction, target = torch.randn(20, 3, generator=g), torch.randn(20, 3, generator=g)
    expected = MeanAbsoluteError()(prediction, target)
    assert mean_absolute_error(prediction, target).item() == pytest.approx(expected.item(), 1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pearson_matches_torchmetrics_and_numpy(seed):
    prediction, target = sentiment_pair(seed=seed)
    expected = PearsonCorrCoef()(prediction, target).item()  # float32 state
    numpy = np.corrcoef(prediction.numpy(), target.numpy())[0, 1]
    value = pearson_correlation(prediction, target).item()
    assert value == pytest.approx(expected, abs=1e-6)
    assert value == pytest.approx(numpy, abs=1e-12)


def test_pearson_of_a_constant_is_nan():
    assert math.isnan(pearson_correlation(torch.ones(5), torch.arange(5.0)).item())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_accuracy_without_zeros_matches_plain_python(seed):
    prediction, target = sentiment_pair(seed=seed)
    assert (target == 0).any()
    predicted, actual = plain_binary(prediction, target)
    expected = sum(p == a for p, a in zip(predicted, actual)) / len(actual)
    assert sentiment_binary_accuracy(prediction, target).item() == pytest.approx(expected, 1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_f1_matches_torchmetrics_weighted_f1(seed):
    prediction, target = sentiment_pair(seed=seed)
    predicted, actual = plain_binary(prediction, target)
    f1 = F1Score(task="multiclass", num_classes=2, average="weighted")
    expected = f1(torch.tensor(predicted).long(), torch.tensor(actual).long()).item()
    assert sentiment_binary_f1(prediction, target).item() == pytest.approx(expected, abs=1e-6)


def test_binary_f1_with_one_class_absent_from_the_predictions():
    prediction = torch.tensor([1.0, 2.0, 0.5, 3.0])
    target = torch.tensor([1.0, -1.0, 2.0, -2.0])
    f1 = F1Score(task="multiclass", num_classes=2, average="weighted")
    expected = f1(torch.tensor([1, 1, 1, 1]), torch.tensor([1, 0, 1, 0])).item()
    assert sentiment_binary_f1(prediction, target).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("classes", [7, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_acc7_acc5_match_numpy(seed, classes):
    prediction, target = sentiment_pair(seed=seed)
    bound = (classes - 1) / 2
    rounded_p = np.round(np.clip(prediction.numpy(), -bound, bound))
    rounded_y = np.round(np.clip(target.numpy(), -bound, bound))
    expected = float(np.mean(rounded_p == rounded_y))
    assert sentiment_accuracy(prediction, target, classes).item() == pytest.approx(expected, 1e-12)


def test_report_has_every_metric_and_accepts_column_vectors():
    prediction, target = sentiment_pair(seed=4)
    report = sentiment_metrics(prediction.view(-1, 1).float(), target.view(-1, 1).float())
    assert sorted(report) == ["acc5", "acc7", "binary_accuracy", "binary_f1", "correlation", "mae"]
    assert report["acc7"].item() == pytest.approx(sentiment_accuracy(prediction, target).item())


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: mean_absolute_error(torch.ones(3), torch.ones(4)), ValueError),
        (lambda: pearson_correlation(torch.ones(3, 2), torch.ones(3, 2)), ValueError),
        (lambda: sentiment_accuracy(torch.ones(3), torch.ones(3), 3), ValueError),
        (lambda: sentiment_binary_f1(torch.ones(0), torch.ones(0)), ValueError),
        (lambda: sentiment_binary_accuracy(torch.ones(3).long(), torch.ones(3)), TypeError),
    ],
)
def test_bad_inputs_are_refused(call, error):
    with pytest.raises(error):
        call()


values = st.floats(min_value=-4.0, max_value=4.0, allow_nan=False)
pairs = st.integers(2, 30).flatmap(
    lambda n: st.tuples(*[st.lists(values, min_size=n, max_size=n)] * 2)
)


@settings(max_examples=150, deadline=None)
@given(pairs)
def test_properties_of_the_sentiment_metrics(pair):
    prediction, target = (torch.tensor(v, dtype=torch.float64) for v in pair)
    # MAE: symmetric, zero on itself.
    assert mean_absolute_error(prediction, target).item() == pytest.approx(
        mean_absolute_error(target, prediction).item()
    )
    assert mean_absolute_error(target, target).item() == 0
    # Accuracies and F1 lie in [0, 1] (NaN only when every label is 0).
    for metric in (sentiment_accuracy, sentiment_binary_accuracy, sentiment_binary_f1):
        value = metric(prediction, target).item()
        assert math.isnan(value) == (metric is not sentiment_accuracy and bool((target == 0).all()))
        assert math.isnan(value) or 0 <= value <= 1 + 1e-12
    # A perfect prediction scores 1 everywhere it is defined.
    if bool((target != 0).any()):
        assert sentiment_binary_accuracy(target, target).item() == 1
        assert sentiment_binary_f1(target, target).item() == pytest.approx(1.0)
    assert sentiment_accuracy(target, target, 5).item() == 1


@settings(max_examples=100, deadline=None)
@given(pairs, st.floats(0.1, 10.0), st.floats(-3.0, 3.0))
def test_pearson_is_invariant_to_positive_affine_maps(pair, scale, shift):
    prediction, target = (torch.tensor(v, dtype=torch.float64) for v in pair)
    if prediction.std() < 1e-3 or target.std() < 1e-3:
        return
    r = pearson_correlation(prediction, target).item()
    assert pearson_correlation(prediction * scale + shift, target).item() == pytest.approx(
        r, abs=1e-9
    )
    assert -1 - 1e-12 <= r <= 1 + 1e-12
