"""Properties of the pure MLB coefficient function against its plainly written formula."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradbalance.coefficients import mlb_coefficients, mlb_ratios, true_class_probability

score = st.floats(min_value=1e-6, max_value=1.0, allow_nan=False)
scores_st = st.integers(2, 8).flatmap(lambda m: st.lists(score, min_size=m, max_size=m))
alpha_st = st.floats(min_value=0.0, max_value=5.0)
beta_st = st.floats(min_value=1.0, max_value=20.0)


def reference_coefficients(scores: list[float], alpha: float, beta_max: float) -> list[float]:
    out = []
    for m, s in enumerate(scores):
        others = [x for j, x in enumerate(scores) if j != m]
        r = (sum(others) / len(others)) / max(s, 1e-8)
        beta = beta_max if r > 1 else 2.0
        out.append(1 + (beta - 1) * math.tanh(alpha * (r - 1)))
    return out


@settings(max_examples=200, deadline=None)
@given(scores_st, alpha_st, st.floats(min_value=0.1, max_value=20.0))
def test_matches_plain_formula(scores, alpha, beta_max):
    k = mlb_coefficients(torch.tensor(scores, dtype=torch.float64), alpha, beta_max)
    assert k.tolist() == pytest.approx(reference_coefficients(scores, alpha, beta_max), rel=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 8), score, alpha_st, beta_st)
def test_equal_scores_give_ones(m, s, alpha, beta_max):
    k = mlb_coefficients(torch.full((m,), s, dtype=torch.float64), alpha, beta_max)
    assert torch.allclose(k, torch.ones(m, dtype=torch.float64), atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(scores_st, alpha_st, beta_st, st.randoms(use_true_random=False))
def test_permutation_equivariance(scores, alpha, beta_max, rnd):
    perm = list(range(len(scores)))
    rnd.shuffle(perm)
    s = torch.tensor(scores, dtype=torch.float64)
    k = mlb_coefficients(s, alpha, beta_max)
    assert torch.allclose(mlb_coefficients(s[perm], alpha, beta_max), k[perm], atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(scores_st, st.floats(min_value=0.1, max_value=5.0), beta_st, st.data())
def test_coefficient_decreases_as_own_score_rises(scores, alpha, beta_max, data):
    m = data.draw(st.integers(0, len(scores) - 1))
    low = torch.tensor(scores, dtype=torch.float64)
    high = low.clone()
    high[m] = min(1.0, low[m].item() * 1.5 + 1e-3)
    assert (
        mlb_coefficients(high, alpha, beta_max)[m]
        <= mlb_coefficients(low, alpha, beta_max)[m] + 1e-12
    )


@settings(max_examples=100, deadline=None)
@given(scores_st, alpha_st, beta_st)
def test_weakest_accelerated_strongest_slowed(scores, alpha, beta_max):
    s = torch.tensor(scores, dtype=torch.float64)
    k = mlb_coefficients(s, alpha, beta_max)
    assert k[s.argmin()] >= 1.0 - 1e-12
    assert k[s.argmax()] <= 1.0 + 1e-12


@settings(max_examples=200, deadline=None)
@given(scores_st, st.floats(min_value=0.0, max_value=3.0), beta_st)
def test_bounds(scores, alpha, beta_max):
    k = mlb_coefficients(torch.tensor(scores, dtype=torch.float64), alpha, beta_max)
    assert (k >= 1 - math.tanh(alpha) - 1e-12).all()
    assert (k <= beta_max + 1e-12).all()


@given(st.integers(2, 8), st.floats(min_value=0.01, max_value=5.0), beta_st)
def test_zero_scores_stay_finite(m, alpha, beta_max):
    zeros = torch.zeros(m)
    assert torch.isfinite(mlb_coefficients(zeros, alpha, beta_max)).all()
    one_zero = torch.full((m,), 0.5)
    one_zero[0] = 0.0
    k = mlb_coefficients(one_zero, alpha, beta_max)
    assert torch.isfinite(k).all() and k[0] >= 1 and (k[1:] < 1).all()


@given(scores_st, beta_st)
def test_alpha_zero_gives_ones(scores, beta_max):
    k = mlb_coefficients(torch.tensor(scores), 0.0, beta_max)
    assert torch.equal(k, torch.ones(len(scores)))


def test_ratios_two_modalities_are_reciprocal():
    r = mlb_ratios(torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert r.tolist() == pytest.approx([3.0, 1 / 3])


@pytest.mark.parametrize(
    "scores, error",
    [
        (torch.tensor([0.5]), ValueError),
        (torch.tensor([[0.5, 0.5]]), ValueError),
        (torch.tensor([1, 2]), TypeError),
        ([0.5, 0.5], TypeError),
    ],
)
def test_bad_scores(scores, error):
    with pytest.raises(error):
        mlb_coefficients(scores, 1.0, 2.0)


@pytest.mark.parametrize(
    "alpha, beta_max", [(-0.1, 2.0), (1.0, 0.0), (1.0, -1.0), (float("nan"), 2.0)]
)
def test_bad_hyperparameters(alpha, beta_max):
    with pytest.raises(ValueError):
        mlb_coefficients(torch.tensor([0.5, 0.5]), alpha, beta_max)


def test_true_class_probability_matches_loop_and_is_float32():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 5, generator=g).to(torch.bfloat16)
    target = torch.randint(0, 5, (7,), generator=g)
    probs = torch.softmax(logits.float(), dim=1)
    expected = sum(probs[i, target[i]].item() for i in range(7)) / 7
    got = true_class_probability(logits, target)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_true_class_probability_batches_leading_dims_and_sums():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 6, 4, generator=g)
    target = torch.randint(0, 4, (6,), generator=g)
    stacked = true_class_probability(logits, target, "sum")
    one_by_one = torch.stack([true_class_probability(u, target) * 6 for u in logits])
    torch.testing.assert_close(stacked, one_by_one)
