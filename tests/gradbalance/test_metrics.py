"""Accuracy and ECE of ``gradbalance.metrics`` against torchmetrics and a direct reference."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
)

from gradbalance.metrics import accuracy, expected_calibration_error, top_label_confidence


def reference_classical_ece(probabilities: torch.Tensor, target: torch.Tensor, n_bins=15):
    """Guo et al.'s loop: bins (lo, hi], written independently of the library (float64)."""
    confidence, prediction = probabilities.double().max(dim=1)
    correct = (prediction == target).double()
    total = torch.zeros((), dtype=torch.float64)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            share = inside.double().mean()
            total += share * (correct[inside].mean() - confidence[inside].mean()).abs()
    return total


def tie_free_logits(n=500, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 2.0
    target = torch.randint(0, k, (n,), generator=g)
    return logits, target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_matches_torchmetrics(seed):
    logits, target = tie_free_logits(seed=seed)
    expected = multiclass_accuracy(logits, target, num_classes=6, average="micro")
    assert accuracy(logits, target).item() == pytest.approx(expected.item(), abs=1e-7)


def test_accuracy_counts_exactly():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    assert accuracy(logits, torch.tensor([1, 0, 0, 0])).item() == pytest.approx(0.5)


@pytest.mark.parametrize("binning", ["classical", "torchmetrics"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_equals_torchmetrics_without_ties(binning, seed):
    logits, target = tie_free_logits(seed=seed)
    probabilities = logits.float().softmax(dim=1)
    expected = multiclass_calibration_error(probabilities, target, num_classes=6, n_bins=15)
    ours = expected_calibration_error(
        probabilities, target, binning=binning, inputs="probabilities"
    )
    assert ours.item() == pytest.approx(expected.item(), abs=1e-6)
    # And from logits: softmax is applied for us.
    from_logits = expected_calibration_error(logits.float(), target, binning=binning)
    assert from_logits.item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_classical_ece_equals_the_reference_loop(seed):
    logits, target = tie_free_logits(seed=seed)
    probabilities = logits.softmax(dim=1)
    ours = expected_calibration_error(probabilities, target, inputs="probabilities")
    assert ours.item() == pytest.approx(
        reference_classical_ece(probabilities, target).item(), abs=1e-12
    )


def _two_class(confidences, correct):
    """Two-class probabilities with the given top confidence, predicting class 0."""
    conf = torch.tensor(confidences, dtype=torch.float32)
    probabilities = torch.stack([conf, 1 - conf], dim=1)
    target = torch.where(torch.tensor(correct), 0, 1)
    return probabilities, target


def test_saturated_confidence_differs_as_documented():
    # A wrong prediction at exactly 1.0 beside right ones just below: torchmetrics keeps 1.0 in
    # a bin of its own, the classical binning puts it with 0.95 and 0.96 (bin (14/15, 1]).
    probabilities, target = _two_class([1.0, 0.95, 0.96], [False, True, True])
    classical = expected_calibration_error(probabilities, target, inputs="probabilities")
    ours_tm = expected_calibration_error(
        probabilities, target, binning="torchmetrics", inputs="probabilities"
    )
    expected_tm = multiclass_calibration_error(probabilities, target, num_classes=2, n_bins=15)
    assert ours_tm.item() == pytest.approx(expected_tm.item(), abs=1e-6)
    assert classical.item() == pytest.approx(abs(2 - (1.0 + 0.95 + 0.96)) / 3, abs=1e-6)
    assert ours_tm.item() == pytest.approx((1.0 + 0.05 + 0.04) / 3, abs=1e-6)
    assert classical.item() < ours_tm.item()
    assert classical.item() == pytest.approx(
        reference_classical_ece(probabilities, target).item(), abs=1e-6
    )


def test_confidence_on_a_boundary_differs_as_documented():
    # 12/15 = 0.8 is a bin edge in float64 and, cast to float32 (as torchmetrics casts the
    # confidences), equals torchmetrics' float32 edge too: a tie for both binnings.
    edge = torch.linspace(0, 1, 16, dtype=torch.float64)[12]
    assert edge.float() == torch.linspace(0, 1, 16)[12]
    conf = torch.stack([edge, edge + 0.02, edge - 0.02])
    probabilities = torch.stack([conf, 1 - conf], dim=1)
    target = torch.tensor([0, 1, 0])  # right, wrong, right
    ours_tm = expected_calibration_error(
        probabilities, target, binning="torchmetrics", inputs="probabilities"
    )
    expected_tm = multiclass_calibration_error(probabilities, target, num_classes=2, n_bins=15)
    assert ours_tm.item() == pytest.approx(expected_tm.item(), abs=1e-6)
    classical = expected_calibration_error(probabilities, target, inputs="probabilities")
    # Classical: {below, edge} share (11/15, 12/15];
    # torchmetrics: {edge, above} share [12/15, 13/15).
    expected_classical = (abs(2 - conf[0] - conf[2]) + abs(0 - conf[1])) / 3
    expected_torchmetrics = (abs(1 - conf[0] - conf[1]) + abs(1 - conf[2])) / 3
    assert classical.item() == pytest.approx(expected_classical.item(), abs=1e-9)
    assert classical.item() == pytest.approx(
        reference_classical_ece(probabilities, target).item(), abs=1e-12
    )
    assert ours_tm.item() == pytest.approx(expected_torchmetrics.item(), abs=1e-6)
    assert classical.item() != pytest.approx(ours_tm.item(), abs=1e-3)


def test_perfectly_calibrated_bins_give_zero():
    probabilities, target = _two_class([0.75] * 4, [True, True, True, False])
    assert expected_calibration_error(probabilities, target, inputs="probabilities").item() == (
        pytest.approx(0.0, abs=1e-7)
    )


def test_logits_are_not_guessed_from_their_range():
    # Logits inside [0, 1] are still logits (torchmetrics would take them as probabilities).
    logits = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    target = torch.tensor([0, 0])
    from_logits = expected_calibration_error(logits, target)
    as_probabilities = expected_calibration_error(logits, target, inputs="probabilities")
    assert from_logits.item() != pytest.approx(as_probabilities.item())
    conf, _ = top_label_confidence(logits)
    assert conf[0].item() == pytest.approx(torch.tensor([0.9, 0.1]).softmax(0)[0].item())


def test_metrics_stay_on_device_and_take_no_host_sync():
    logits, target = tie_free_logits()
    assert accuracy(logits, target).shape == ()
    ece = expected_calibration_error(logits, target)
    assert ece.shape == () and ece.dtype == torch.float64


@pytest.mark.parametrize(
    ("scores", "target", "error"),
    [
        (torch.randn(4), torch.zeros(4, dtype=torch.long), ValueError),
        (torch.randn(4, 3), torch.zeros(3, dtype=torch.long), ValueError),
        (torch.randn(4, 3), torch.zeros(4), TypeError),
        (torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long), TypeError),
        (torch.randn(0, 3), torch.zeros(0, dtype=torch.long), ValueError),
    ],
)
def test_bad_inputs_are_refused(scores, target, error):
    with pytest.raises(error):
        expected_calibration_error(scores, target)
    with pytest.raises(error):
        accuracy(scores, target)


def test_bad_options_are_refused():
    logits, target = tie_free_logits(n=10)
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(logits, target, n_bins=0)
    with pytest.raises(ValueError, match="binning"):
        expected_calibration_error(logits, target, binning="guo")
    with pytest.raises(ValueError, match="inputs"):
        expected_calibration_error(logits, target, inputs="log_probabilities")
