"""Missing modalities (``bal.loss(logits, target, present=mask)``) with CGGM, AMSS and AMSS+.

CGGM: each probe's metric (batch accuracy, or score) is its mean over the samples where its
modality is present, the gain compares it with the previous step's, and a modality absent from
the whole batch keeps its metric (gain 0) and coefficient. AMSS / AMSS+: each modality's loss,
feature entropy, score and label term are means over its present samples; a modality absent from
the batch keeps its keep rate and enters the softmax with the present ones' mean significance.
The references are written plainly here (sub-batches, the formulas by hand); the all-true mask
is checked bitwise for every method by ``test_missing.py``; DDP with uneven presence by
:func:`test_missing_ddp.check_one_process`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from missing_cases import batch, build, head_gradients, masks, step, sub_batch_scores, twin
from test_missing_ddp import check_one_process, missing_ranks  # noqa: F401  (the fixture)

from gradbalance.coefficients import amss_keep_rates

NAMES = ("cggm", "cggm_regression", "amss", "amss_plus")
PROPERTY = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _cggm(bal, metric: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """CGGM's k by hand: gain_m = a_m - a_m^prev (errors: the decrease),
    B_m = clamp((G + eps - gain_m) / (G + eps), 0, 1), k_m = rho B_m."""
    gains = (metric - previous).double()
    if bal.task == "regression":
        gains = -gains
    total = gains.sum() + 1e-8
    return (bal.rho * ((total - gains) / total).clamp(0, 1)).float()


def _amss_significance(model, bal, inputs, target, rows: torch.Tensor, index: int) -> torch.Tensor:
    """t_m = (H_Y - L_m + offset) / (H(z_m) T) of modality ``index`` on the samples ``rows``."""
    with torch.no_grad(), bal.paused():
        features = model.towers[index](inputs[index][rows])
        logits = bal.heads[bal.names[index]](features)
    labels = target[rows]
    loss = F.cross_entropy(logits, labels)
    log_p = torch.log_softmax(features, -1)
    entropy = -(log_p.exp() * log_p).sum(-1).mean()
    frequencies = torch.bincount(labels, minlength=logits.shape[-1]).float() / labels.numel()
    label_entropy = -(frequencies * torch.log_softmax(frequencies, -1)).sum()
    information = label_entropy - loss + bal.offset
    return torch.stack([information / (entropy * bal.temperature), information])


def _amss(model, bal, inputs, target, present: torch.Tensor) -> torch.Tensor:
    """AMSS's keep rates by hand on each modality's present samples; an absent modality enters
    the softmax with the mean significance of the present ones."""
    seen = present.any(0)
    values = [
        _amss_significance(model, bal, inputs, target, present[:, m], m)
        if seen[m]
        else torch.zeros(2)
        for m in range(present.shape[1])
    ]
    significance, information = torch.stack(values).unbind(1)
    significance = torch.where(seen, significance, significance[seen].mean())
    rates = (1 - torch.softmax(significance, 0) + bal.bias).clamp(0.1, 0.9)
    if (information[seen] <= 0).any() or torch.isnan(rates).any():
        return torch.full_like(rates, 0.5)
    return rates


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(present=masks())
def test_scores_and_coefficients_are_those_of_the_present_sub_batches(name, present):
    model, bal = build(name)
    inputs, target = batch(name, present.shape[0])
    seen = present.any(0)
    previous = bal.last_coefficients.clone()
    sub = sub_batch_scores(model, bal, inputs, target, present)
    if name.startswith("cggm"):  # an absent modality keeps its metric (0 before the first step)
        scores = torch.where(seen, sub, 0.0)
        expected = _cggm(bal, scores, torch.zeros(2))
    else:
        scores = sub
        expected = _amss(model, bal, inputs, target, present)
    step(model, bal, inputs, target, present)
    torch.testing.assert_close(bal.last_scores[seen], scores[seen], rtol=1e-5, atol=1e-6)
    expected = torch.where(seen, expected, previous)
    torch.testing.assert_close(bal.last_coefficients, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("absent", [0, 1])
def test_a_modality_absent_from_the_batch_keeps_its_coefficient_score_and_metric(name, absent):
    model, bal = build(name)
    inputs, target = batch(name, 8, seed=1)
    step(model, bal, inputs, target)  # a first, complete step
    before_k, before_s = bal.last_coefficients.clone(), bal.last_scores.clone()
    bal.zero_grad(set_to_none=True)
    present = torch.ones(8, 2, dtype=torch.bool)
    present[:, absent] = False
    inputs, target = batch(name, 8, seed=2)
    loss = step(model, bal, inputs, target, present)
    assert torch.isfinite(loss)
    assert bal.last_coefficients[absent] == before_k[absent]
    assert bal.last_scores[absent] == before_s[absent]
    other = 1 - absent
    if name.startswith("cggm"):  # the absent modality's gain is 0: the other took all the gain
        assert bal.previous_metric[absent] == before_s[absent]
        expected = _cggm(bal, bal.last_scores, before_s)
    else:  # equal significances: each softmax share is 1/2
        expected = torch.full((2,), 0.5 + bal.bias).clamp(0.1, 0.9)
    torch.testing.assert_close(bal.last_coefficients[other], expected[other])
    assert not head_gradients(bal)[absent].any()
    assert head_gradients(bal)[other].any()


@pytest.mark.parametrize("name", ["cggm", "cggm_regression"])
def test_cggm_a_modality_absent_from_the_first_batch_gains_nothing(name):
    """No previous metric to compare with: the absent modality's metric stays 0 (no fake gain
    from the present modality's), and the present one takes the whole gain."""
    model, bal = build(name)
    present = torch.ones(8, 2, dtype=torch.bool)
    present[:, 1] = False
    step(model, bal, *batch(name, 8), present)
    assert bal.previous_metric[1] == 0 and bal.last_scores[1] == 0
    expected = _cggm(bal, bal.last_scores, torch.zeros(2))
    torch.testing.assert_close(bal.last_coefficients[0], expected[0])


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(present=masks(), seed=st.integers(0, 99))
def test_absent_rows_give_the_probes_exactly_no_gradient(name, present, seed):
    model, bal = build(name)
    inputs, target = batch(name, present.shape[0])
    other_model, other_bal = twin(model, bal)
    g = torch.Generator().manual_seed(seed)
    noisy = [
        torch.where(present[:, m : m + 1], x, 1e3 * torch.randn(x.shape, generator=g))
        for m, x in enumerate(inputs)
    ]
    step(model, bal, inputs, target, present)
    step(other_model, other_bal, noisy, target, present)
    for got, want in zip(head_gradients(other_bal), head_gradients(bal)):
        assert torch.equal(got, want)
    assert torch.equal(other_bal.last_coefficients, bal.last_coefficients)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(present=masks())
def test_probe_gradients_are_those_of_the_present_sub_batches(name, present):
    """Probe m's parameter gradient is that of its mean loss over the samples where m is present
    (the probes are fed detached features; nothing else reaches them)."""
    model, bal = build(name)
    inputs, target = batch(name, present.shape[0])
    expected = []
    for index in range(present.shape[1]):
        rows = present[:, index]
        copy_model, copy_bal = twin(model, bal)
        if rows.any():
            step(copy_model, copy_bal, [x[rows] for x in inputs], target[rows])
        expected.append(head_gradients(copy_bal)[index])  # zeros where absent from the batch
    step(model, bal, inputs, target, present)
    for got, want in zip(head_gradients(bal), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_amss_keep_rates_give_an_absent_modality_the_mean_significance():
    """Three modalities, the second absent (its statistics undefined: 0/0): it enters the softmax
    with the mean of the others' t_m and is left out of the information test."""
    losses = torch.tensor([0.5, 0.0, 0.9])
    entropies = torch.tensor([2.0, 0.0, 1.5])
    label_entropy = torch.tensor([1.3, 0.0, 1.2])
    seen = torch.tensor([True, False, True])
    t_a, t_c = (1.3 - 0.5 + 0.5) / (2.0 * 0.2), (1.2 - 0.9 + 0.5) / (1.5 * 0.2)
    t = torch.tensor([t_a, (t_a + t_c) / 2, t_c])
    expected = (1 - torch.softmax(t, 0)).clamp(0.1, 0.9)
    rates = amss_keep_rates(losses, entropies, label_entropy, 0.2, 0.5, 0.0, seen=seen)
    torch.testing.assert_close(rates, expected)
    everything = amss_keep_rates(losses, entropies, label_entropy, 0.2, 0.5, 0.0)
    assert torch.equal(everything, torch.full((3,), 0.5))  # unmasked: undefined, the fallback


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_uneven_presence_under_ddp_equals_one_process(missing_ranks, name):  # noqa: F811
    check_one_process(missing_ranks, name)
