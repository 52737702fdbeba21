"""Missing modalities (``loss(..., present=)``) with OPM and InfoReg.

OPM: each score is the mean true-class probability over the samples where the modality is
present (its fused-head slice, or its probe), the drop probabilities follow from those scores,
and a modality absent from the whole batch keeps its score and its drop probability. InfoReg:
each head's score is its present-sample mean, beta follows from those scores (the default
``gap_scale`` is the number of samples), a modality absent from the batch keeps its score and
beta, and ``after_backward()`` pulls its encoder with the kept beta only inside the prime
learning window. Absent rows give the probes and heads exactly no gradient; under DDP with
uneven presence both equal one process on the concatenated batch and mask.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from missing_cases import (
    batch,
    build,
    head_gradients,
    masks,
    step,
    sub_batch_scores,
    twin,
)
from test_missing import first_step_scores
from test_missing_ddp import check_one_process, missing_ranks  # noqa: F401  (the fixture)

PROPERTY = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _opm_q(scores: torch.Tensor, q_base: float, lam: float) -> torch.Tensor:
    """OPM's drop probabilities for two modalities, written out: the leader's
    clip(q_base (1 + lam tanh(rho - 1)), 0, 1) with rho = s_m / s_other, 0 for the other."""
    a, b = (float(s) for s in scores)
    q = []
    for mine, other in ((a, b), (b, a)):
        rho = mine / other
        q.append(min(max(q_base * (1 + lam * math.tanh(rho - 1)), 0.0), 1.0) if rho > 1 else 0.0)
    return torch.tensor(q)


def _inforeg_betas(scores: torch.Tensor, strength: float, gap: float) -> torch.Tensor:
    """InfoReg's beta for two modalities: strength exp(tanh(gap (s_m - s_other))) for the
    modality ahead, 0 for the other."""
    a, b = (float(s) for s in scores)
    return torch.tensor(
        [
            strength * math.exp(math.tanh(gap * (mine - other))) if mine > other else 0.0
            for mine, other in ((a, b), (b, a))
        ]
    )


def _expected_k(name: str, bal, scores: torch.Tensor, batch_size: int) -> torch.Tensor:
    """OPM scales nothing (k = 1); InfoReg's k is beta with the default gap (the batch size)."""
    if name == "opm":
        return torch.ones(2)
    return _inforeg_betas(scores, bal.strength["towers_0"], float(batch_size))


# --- the statistics are those of the present samples --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["opm", "inforeg"])
@PROPERTY
@given(present=masks())
def test_scores_and_coefficients_are_those_of_the_present_sub_batches(name, present):
    model, bal = build(name)
    inputs, target = batch(name, present.shape[0])
    expected_scores = first_step_scores(
        sub_batch_scores(model, bal, inputs, target, present), present
    )
    previous = bal.last_coefficients.clone()
    step(model, bal, inputs, target, present)
    torch.testing.assert_close(bal.last_scores, expected_scores, rtol=1e-5, atol=1e-6)
    seen = present.any(0)  # a modality absent from the batch keeps its coefficient
    k = _expected_k(name, bal, expected_scores, present.shape[0])
    torch.testing.assert_close(bal.last_coefficients, torch.where(seen, k, previous))
    if name == "opm":  # the next forward's drop probabilities (none before: 0 kept)
        q = torch.where(seen, _opm_q(expected_scores, bal.q_base, bal.lam), torch.zeros(2))
        torch.testing.assert_close(bal.drop_probabilities, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name, options", [("opm", {"probes": True, "feature_dims": [12, 12]}), ("inforeg", {})]
)
@PROPERTY
@given(present=masks(), seed=st.integers(0, 99))
def test_absent_rows_give_the_heads_exactly_no_gradient(name, options, present, seed):
    model, bal = build(name, **options)
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


# --- a modality absent from the whole batch ---------------------------------------------------


@pytest.mark.parametrize("name", ["opm", "inforeg"])
@pytest.mark.parametrize("absent", [0, 1])
def test_a_modality_absent_from_the_batch_keeps_its_coefficient_score_and_q(name, absent):
    """Its k, score (and OPM's drop probability) stay those of the step before, with no NaN;
    the other modality's follow from the kept score."""
    model, bal = build(name)
    for seed in range(3):  # complete steps: OPM's q of the leader is > 0
        step(model, bal, *batch(name, 8, seed=seed))
    before_k, before_s = bal.last_coefficients.clone(), bal.last_scores.clone()
    before_q = bal.drop_probabilities.clone() if name == "opm" else None
    bal.zero_grad(set_to_none=True)
    present = torch.ones(8, 2, dtype=torch.bool)
    present[:, absent] = False
    assert torch.isfinite(step(model, bal, *batch(name, 8, seed=5), present))
    assert bal.last_coefficients[absent] == before_k[absent]
    assert bal.last_scores[absent] == before_s[absent]
    other = 1 - absent
    scores = bal.last_scores.clone()
    expected = _expected_k(name, bal, scores, 8)
    torch.testing.assert_close(bal.last_coefficients[other], expected[other])
    if before_q is not None:
        assert before_q.max() > 0
        assert bal.drop_probabilities[absent] == before_q[absent]
        q = _opm_q(scores, bal.q_base, bal.lam)
        torch.testing.assert_close(bal.drop_probabilities[other], q[other])
    if bal.heads:
        assert not head_gradients(bal)[absent].any()
        assert head_gradients(bal)[other].any()


def _encoder_gradients(model) -> list[torch.Tensor]:
    return [torch.cat([p.grad.reshape(-1) for p in tower.parameters()]) for tower in model.towers]


@pytest.mark.parametrize("window_open", [True, False])
def test_inforeg_pulls_with_a_kept_beta_only_inside_the_prime_window(window_open):
    """The leader is absent for two steps after an epoch: its beta is kept; the pull
    ``beta (theta - theta^0)`` is added inside the window, nothing once epoch_end closed it."""
    model, bal = build("inforeg", threshold=-1.0 if window_open else 1e9)
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.5)
    step(model, bal, *batch("inforeg", 8, seed=0))
    leader = int(bal.last_coefficients.argmax())
    kept = bal.last_coefficients[leader].clone()
    assert kept > 0
    bal.after_backward()
    bal.epoch_end()
    assert bool(bal.in_prime_window) == window_open
    present = torch.ones(8, 2, dtype=torch.bool)
    present[:, leader] = False
    for seed in (1, 2):
        opt.zero_grad(set_to_none=True)
        step(model, bal, *batch("inforeg", 8, seed=seed), present)
        assert bal.last_coefficients[leader] == kept
        before = _encoder_gradients(model)[leader]
        bal.after_backward()
        opt.step()
    tower = model.towers[leader]
    starts = [getattr(bal, name) for name in bal._starts[f"towers_{leader}"]]
    with torch.no_grad():  # theta before this last opt.step(): undo it (plain SGD)
        theta = [p + 0.5 * p.grad for p in tower.parameters()]
    pull = torch.cat([(t - s).reshape(-1) for t, s in zip(theta, starts)])
    assert pull.abs().max() > 0  # the encoder has moved since the epoch started
    got = torch.cat([p.grad.reshape(-1) for p in tower.parameters()])
    torch.testing.assert_close(got, before + kept * pull if window_open else before)


# --- DDP with uneven presence -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["opm", "inforeg"])
def test_uneven_presence_equals_one_process_on_the_concatenated_batch(missing_ranks, name):  # noqa: F811
    check_one_process(missing_ranks, name)
