"""OGM, OGM-GE and PMR for M >= 2 modalities: each modality against the mean of the others.

M = 2 is checked bitwise against the two-modality formulas as they were written before the
generalisation; M = 2..5 against plain per-modality references; the methods end to end with
M = 3..5 encoders against scores computed by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MultiTowerNet, make_batch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import gradbalance as gb
from gradbalance.coefficients import ogm_coefficients, others_mean, pmr_weights

score = st.floats(min_value=1e-6, max_value=1.0, allow_nan=False)
alpha_st = st.floats(min_value=0.0, max_value=5.0)
many_scores = st.integers(2, 5).flatmap(lambda m: st.lists(score, min_size=m, max_size=m))
dtypes = st.sampled_from([torch.float32, torch.float64])


def two_modality_ogm(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """OGM for two scores, as written before M > 2 existed (the ratio of the two scores)."""
    s = scores.clamp_min(1e-8)
    ratios = torch.stack([s[0] / s[1], s[1] / s[0]])
    second = s[1] > s[0]
    dominant = torch.stack([~second, second])
    return torch.where(dominant, 2.0 * torch.sigmoid(-2.0 * (alpha * ratios)), torch.ones(2))


def two_modality_pmr(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """PMR for two scores, as written before M > 2 existed: alpha for the lower score."""
    weaker = torch.stack([scores[0] < scores[1], scores[1] < scores[0]])
    return torch.where(weaker, torch.full_like(scores, alpha), torch.zeros_like(scores))


def clear_order(scores: list[float]) -> bool:
    """All equal, or every score clearly apart from the mean of the others (no rounding tie)."""
    if len(set(scores)) == 1:
        return True
    m = len(scores)
    return all(abs(s - (sum(scores) - s) / (m - 1)) > 1e-9 for s in scores)


def reference_ogm(scores: list[float], alpha: float) -> list[float]:
    """Per modality: slowed by 1 - tanh(alpha * s_m / mean of the others) when above it."""
    m = len(scores)
    means = [(sum(scores) - s) / (m - 1) for s in scores]
    dominant = [s > ref for s, ref in zip(scores, means)] if len(set(scores)) > 1 else [False] * m
    if not any(dominant):
        dominant[0] = True
    return [
        1 - math.tanh(alpha * s / ref) if d else 1.0 for s, ref, d in zip(scores, means, dominant)
    ]


def slice_scores(model, inputs, target) -> list[float]:
    """Mean true-class probability of ``W_m z_m + b / M`` (the bias shared equally)."""
    with torch.no_grad():
        feats = [t(x) for t, x in zip(model.towers, inputs)]
        w, b = model.fusion.weight, model.fusion.bias
        out, start = [], 0
        for z in feats:
            logits = z @ w[:, start : start + z.shape[1]].T + b / len(feats)
            start += z.shape[1]
            probs = torch.softmax(logits, 1)
            out.append(probs[torch.arange(len(target)), target].mean().item())
    return out


def reference_pmr(scores: list[float], alpha: float) -> list[float]:
    m = len(scores)
    if len(set(scores)) == 1:
        return [0.0] * m
    return [alpha if s < (sum(scores) - s) / (m - 1) else 0.0 for s in scores]


@settings(max_examples=300, deadline=None)
@given(score, score, alpha_st, dtypes)
def test_two_modalities_stay_bitwise(s_a, s_v, alpha, dtype):
    s = torch.tensor([s_a, s_v], dtype=dtype)
    assert torch.equal(ogm_coefficients(s, alpha), two_modality_ogm(s, alpha).to(dtype))
    assert torch.equal(pmr_weights(s, alpha), two_modality_pmr(s, alpha))
    assert torch.equal(others_mean(s), s.flip(0))


def test_two_modalities_stay_bitwise_on_ties_and_extremes():
    for pair in ([0.4, 0.4], [1.0, 0.05], [0.0, 0.0], [1e-9, 0.3], [0.3, 0.30000001]):
        s = torch.tensor(pair)
        assert torch.equal(ogm_coefficients(s, 0.8), two_modality_ogm(s, 0.8))
        assert torch.equal(pmr_weights(s, 2.0), two_modality_pmr(s, 2.0))


@settings(max_examples=300, deadline=None)
@given(many_scores, alpha_st)
def test_ogm_against_the_mean_of_the_others(scores, alpha):
    assume(clear_order(scores))
    k = ogm_coefficients(torch.tensor(scores, dtype=torch.float64), alpha)
    assert k.tolist() == pytest.approx(reference_ogm(scores, alpha), rel=1e-9, abs=1e-12)


@settings(max_examples=300, deadline=None)
@given(many_scores, alpha_st)
def test_ogm_properties(scores, alpha):
    k = ogm_coefficients(torch.tensor(scores, dtype=torch.float64), alpha)
    assert bool(((k >= 0) & (k <= 1)).all())
    slowed = k < 1
    assert int(slowed.sum()) <= len(scores) - 1 or alpha == 0 or len(set(scores)) == 1
    # the lowest score is never slowed unless all are equal
    lowest = min(range(len(scores)), key=scores.__getitem__)
    assert k[lowest].item() == 1.0 or len(set(scores)) == 1 or alpha == 0 or lowest == 0


@settings(max_examples=300, deadline=None)
@given(many_scores, alpha_st)
def test_pmr_against_the_mean_of_the_others(scores, alpha):
    assume(clear_order(scores))
    w = pmr_weights(torch.tensor(scores, dtype=torch.float64), alpha)
    assert w.tolist() == pytest.approx(reference_pmr(scores, alpha))
    highest = max(range(len(scores)), key=scores.__getitem__)
    assert w[highest].item() == 0.0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=2, max_size=5))
def test_others_mean_is_the_mean_of_the_others(values):
    got = others_mean(torch.tensor(values, dtype=torch.float64)).tolist()
    m = len(values)
    expected = [sum(v for j, v in enumerate(values) if j != i) / (m - 1) for i in range(m)]
    assert got == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("m", [3, 4, 5])
@pytest.mark.parametrize("method", [gb.OGM, gb.OGMGE])
def test_ogm_end_to_end_with_m_encoders(method, m):
    dims = (5, 7, 3, 4, 6)[:m]
    torch.manual_seed(m)
    model = MultiTowerNet(dims)
    inputs, target = make_batch(dims, seed=m)
    expected = slice_scores(model, inputs, target)
    bal = method(model, list(model.towers), num_classes=4, alpha=0.8, fusion_head=model.fusion)
    bal.loss(model(*inputs), target).backward()
    bal.after_backward()
    scores = [v.item() for v in bal.scores.values()]
    assert scores == pytest.approx(expected, rel=1e-5)
    k = [v.item() for v in bal.coefficients.values()]
    assert k == pytest.approx(reference_ogm(expected, 0.8), rel=1e-4)


@pytest.mark.parametrize("m", [3, 4, 5])
def test_pmr_end_to_end_with_m_encoders(m):
    dims = (5, 7, 3, 4, 6)[:m]
    torch.manual_seed(m)
    model = MultiTowerNet(dims)
    inputs, target = make_batch(dims, batch=16, seed=m)
    target = torch.arange(16) % 4
    bal = gb.PMR(model, list(model.towers), num_classes=4, alpha=1.5, prototypes="explicit")
    with torch.no_grad():
        model(*inputs)
        bal.collect(target)
    bal.update_prototypes()
    total = bal.loss(model(*inputs), target)
    with torch.no_grad():
        feats = [t(x) for t, x in zip(model.towers, inputs)]
    protos = [torch.stack([z[target == c].mean(0) for c in range(4)]) for z in feats]
    logits = [-torch.cdist(z, c) for z, c in zip(feats, protos)]
    scores = [torch.softmax(z, 1)[torch.arange(16), target].mean().item() for z in logits]
    assert [v.item() for v in bal.scores.values()] == pytest.approx(scores, rel=1e-4)
    weights = reference_pmr(scores, 1.5)
    assert [v.item() for v in bal.coefficients.values()] == pytest.approx(weights)
    expected = torch.nn.functional.cross_entropy(model(*inputs), target) + sum(
        w * torch.nn.functional.cross_entropy(z, target) for w, z in zip(weights, logits)
    )
    assert total.item() == pytest.approx(expected.item(), rel=1e-4)
