"""The baselines' pure coefficient functions against plainly written references, plus
hypothesis properties."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_no_host_sync import FailOnHostSync

from gradbalance.coefficients import (
    AGM_LOSS_CAP,
    agm_coefficients,
    agm_losses,
    agm_ratios,
    mslr_coefficients,
    ogm_coefficients,
    pmr_weights,
    shapley_matrix,
)

score = st.floats(min_value=1e-6, max_value=1.0, allow_nan=False)
alpha_st = st.floats(min_value=0.0, max_value=5.0)
loss_st = st.floats(min_value=0.0, max_value=AGM_LOSS_CAP)


# -- plain references, written as the official code reads ---------------------------------


def reference_ogm(s_a: float, s_v: float, alpha: float) -> list[float]:
    """The official ``main.py``: video is slowed when ratio_v > 1, else audio."""
    ratio_v = s_v / s_a
    ratio_a = 1 / ratio_v
    if ratio_v > 1:
        return [1.0, 1 - math.tanh(alpha * max(ratio_v, 0.0))]
    return [1 - math.tanh(alpha * max(ratio_a, 0.0)), 1.0]


def reference_agm(losses: list[float], running: list[float], alpha: float, cap: float):
    m = len(losses)

    def ratios(values):
        mean = sum(values) / m
        return [math.exp((mean - v) * m / (m - 1)) for v in values]

    r, o = ratios(losses), ratios(running)
    return [math.exp(alpha * min(o_i - r_i, cap)) for o_i, r_i in zip(o, r)]


def reference_pmr(s_a: float, s_v: float, alpha: float) -> list[float]:
    rho = s_a / s_v
    if rho > 1:
        return [0.0, alpha]
    if rho < 1:
        return [alpha, 0.0]
    return [0.0, 0.0]


def reference_shapley(m: int, values: dict[frozenset[int], float]) -> list[float]:
    """Textbook Shapley value with v(∅) = 0."""
    players = range(m)
    out = []
    for i in players:
        others = [j for j in players if j != i]
        total = 0.0
        for size in range(m):
            for subset in itertools.combinations(others, size):
                s = frozenset(subset)
                weight = math.factorial(size) * math.factorial(m - size - 1) / math.factorial(m)
                total += weight * (values[s | {i}] - values.get(s, 0.0))
        out.append(total)
    return out


# -- OGM ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(score, score, alpha_st)
def test_ogm_matches_official_formula(s_a, s_v, alpha):
    k = ogm_coefficients(torch.tensor([s_a, s_v], dtype=torch.float64), alpha)
    assert k.tolist() == pytest.approx(reference_ogm(s_a, s_v, alpha), rel=1e-9, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(score, score, alpha_st)
def test_ogm_non_dominant_is_exactly_one(s_a, s_v, alpha):
    k = ogm_coefficients(torch.tensor([s_a, s_v], dtype=torch.float64), alpha)
    weaker = 0 if s_a < s_v else 1
    assert k[weaker].item() == 1.0 or s_a == s_v
    dominant = 1 - weaker if s_a != s_v else 0
    assert 0 <= k[dominant].item() <= 1 - math.tanh(alpha) + 1e-6  # may underflow to 0


def test_ogm_tie_slows_modality_zero_and_random_inputs():
    k = ogm_coefficients(torch.tensor([0.4, 0.4]), 1.0)
    assert k.tolist() == pytest.approx([1 - math.tanh(1.0), 1.0])
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        s = torch.rand(2, generator=g, dtype=torch.float64)
        expected = reference_ogm(s[0].item(), s[1].item(), 0.8)
        assert ogm_coefficients(s, 0.8).tolist() == pytest.approx(expected, rel=1e-12)


def test_ogm_stays_positive_where_one_minus_tanh_rounds_to_zero():
    k = ogm_coefficients(torch.tensor([1.0, 0.05]), alpha=1.0)  # alpha * rho = 20
    assert 0 < k[0].item() < 1e-16
    assert 1 - math.tanh(20.0) == 0.0


def test_ogm_errors():
    with pytest.raises(ValueError, match="at least 2"):
        ogm_coefficients(torch.tensor([0.1]), 1.0)
    with pytest.raises(ValueError, match="alpha"):
        ogm_coefficients(torch.tensor([0.1, 0.2]), -1.0)
    with pytest.raises(TypeError):
        ogm_coefficients([0.1, 0.2], 1.0)


# -- AGM ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.integers(2, 5).flatmap(
        lambda m: st.tuples(
            st.lists(loss_st, min_size=m, max_size=m), st.lists(loss_st, min_size=m, max_size=m)
        )
    ),
    alpha_st,
    st.floats(min_value=0.5, max_value=10.0),
)
def test_agm_matches_plain_formula(pair, alpha, cap):
    losses, running = pair
    k = agm_coefficients(
        torch.tensor(losses, dtype=torch.float64),
        torch.tensor(running, dtype=torch.float64),
        alpha,
        cap,
    )
    expected = reference_agm(losses, running, alpha, cap)
    assert k.tolist() == pytest.approx(expected, rel=1e-9)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 5).flatmap(lambda m: st.lists(loss_st, min_size=m, max_size=m)), alpha_st)
def test_agm_is_one_when_the_ratio_equals_the_running_ratio(losses, alpha):
    current = torch.tensor(losses, dtype=torch.float64)
    k = agm_coefficients(current, current.clone(), alpha)
    assert torch.equal(k, torch.ones_like(k))
    # A common shift leaves the ratios unchanged up to rounding, which grows with their size.
    shifted = agm_coefficients(current, current + 0.7, alpha)
    rounding = 1e-12 * agm_ratios(current).max()
    assert (shifted.log().abs() <= alpha * rounding + 1e-12).all()


def test_agm_two_modalities_is_the_official_ratio():
    losses = torch.tensor([0.3, 1.2], dtype=torch.float64)
    r = agm_ratios(losses)
    assert r.tolist() == pytest.approx([math.exp(1.2 - 0.3), math.exp(0.3 - 1.2)])
    k = agm_coefficients(losses, torch.zeros(2, dtype=torch.float64), alpha=2.0)
    assert k.tolist() == pytest.approx(
        [math.exp(2 * (1 - math.exp(0.9))), math.exp(2 * (1 - math.exp(-0.9)))]
    )


def test_agm_exponent_cap_and_errors():
    k = agm_coefficients(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 15.0]), 1.0, 10.0)
    assert k[0].item() == pytest.approx(math.exp(10.0))  # o - r = e^15 - 1, capped at 10
    k = agm_coefficients(torch.tensor([0.0, 15.0]), torch.tensor([0.0, 0.0]), 1.0, 10.0)
    assert k[0].item() == 0.0  # no lower bound: underflows, as the official code
    with pytest.raises(ValueError, match="shape"):
        agm_coefficients(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]), 1.0)


def test_agm_losses_match_a_per_sample_loop():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 9, 5, generator=g) * 8
    logits[0, 2] = torch.tensor([-1e4, 0, 0, 0, 0])  # p -> 0: capped at -log(1e-8)
    target = torch.randint(0, 5, (9,), generator=g)
    target[2] = 0
    expected = []
    for m in range(3):
        values = []
        for i in range(9):
            p = torch.softmax(logits[m, i].double(), 0)[target[i]].item()
            values.append(-math.log(1e-8) if p < 1e-8 else -math.log(p))
        expected.append(sum(values) / 9)
    assert agm_losses(logits, target).tolist() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_shapley_matrix_is_the_textbook_shapley_value(m):
    coalitions, weights = shapley_matrix(m)
    assert len(coalitions) == 2**m - 1 and coalitions[0] == frozenset(range(m))
    g = torch.Generator().manual_seed(m)
    values = {c: torch.randn((), generator=g).item() for c in coalitions}
    got = weights @ torch.tensor([values[c] for c in coalitions], dtype=torch.float64)
    assert got.tolist() == pytest.approx(reference_shapley(m, values), abs=1e-12)
    assert got.sum().item() == pytest.approx(values[frozenset(range(m))])  # efficiency


# -- MSLR ---------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    st.integers(2, 5).flatmap(
        lambda m: st.lists(st.tuples(score, score, st.floats(0.1, 2.0)), min_size=m, max_size=m)
    )
)
def test_mslr_matches_plain_formula(rows):
    acc, mean, lam = (torch.tensor(col, dtype=torch.float64) for col in zip(*rows))
    expected = [a / b * c for a, b, c in rows]
    assert mslr_coefficients(acc, mean, lam).tolist() == pytest.approx(expected, rel=1e-12)


def test_mslr_shape_error():
    with pytest.raises(ValueError, match="shape"):
        mslr_coefficients(torch.ones(2), torch.ones(3), 1.0)


# -- PMR ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(score, score, alpha_st)
def test_pmr_weights_match_official_rule(s_a, s_v, alpha):
    w = pmr_weights(torch.tensor([s_a, s_v], dtype=torch.float64), alpha)
    assert w.tolist() == pytest.approx(reference_pmr(s_a, s_v, alpha))


@settings(max_examples=200, deadline=None)
@given(score, score, st.floats(min_value=0.01, max_value=5.0))
def test_pmr_loss_term_only_on_the_weaker_modality(s_a, s_v, alpha):
    w = pmr_weights(torch.tensor([s_a, s_v], dtype=torch.float64), alpha)
    assert int((w > 0).sum()) == (0 if s_a == s_v else 1)
    if s_a != s_v:
        assert w[0 if s_a < s_v else 1].item() == pytest.approx(alpha)


# -- all: tensors in, tensors out, no sync ------------------------------------------------


def test_pure_functions_never_sync_and_keep_device_and_dtype():
    s = torch.tensor([0.3, 0.6], dtype=torch.float64)
    with FailOnHostSync():
        outs = [
            ogm_coefficients(s, 0.8),
            agm_coefficients(s, s.flip(0), 1.0),
            agm_losses(torch.randn(2, 4, 3), torch.tensor([0, 1, 2, 0])),
            mslr_coefficients(s, s.flip(0), s),
            pmr_weights(s, 1.0),
        ]
    for out in outs:
        assert isinstance(out, torch.Tensor) and out.shape == (2,)
    assert outs[0].dtype == outs[1].dtype == outs[4].dtype == torch.float64
