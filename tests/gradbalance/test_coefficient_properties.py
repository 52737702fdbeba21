"""Shared properties of every coefficient function of ``gradbalance.coefficients``.

Each function is adapted to one signature, ``f(scores, alpha) -> (M,)``, in ``FUNCTIONS``
(the other inputs of a method, a running statistic or the last epochs' mean, are set to
what the property needs), and each property runs over every entry it applies to:

* equal scores give equal coefficients — except OGM, which slows modality 0 on a tie (the
  official two-modality code tests ``rho_1 > 1``);
* permutation equivariance ``f(P s) = P f(s)`` — OGM only for distinct scores (same tie rule);
* finite coefficients at zero scores — except MSLR, whose memory means divide (the method
  never passes zero: it starts them at 1);
* the neutral setting gives 1: ``alpha = 0`` (MLB, MLB-regression, OGM, AGM), accuracies
  equal to their memory with initial factors 1 (MSLR) — except PMR, whose neutral weight is
  0 (no prototype loss), G-Blend, whose neutral weights are uniform ``1 / n`` (they sum to 1),
  MMPareto, whose weights without conflict are ``(1/2, 1/2)`` (the combined gradient
  ``2 (a g_mm + (1 - a) g_uni)`` is then the plain sum), and InfoReg, whose neutral
  proximal strength (``strength = 0``, passed as ``alpha``) is 0.
  ``2 (a g_mm + (1 - a) g_uni)`` is then the plain sum), and OPM, whose neutral drop
  probability is 0 (``q_base = 0``).

A new public function of ``gradbalance.coefficients`` must join ``FUNCTIONS`` or ``HELPERS``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradbalance import coefficients as c

Coefficients = Callable[[torch.Tensor, float], torch.Tensor]


def _agm(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """AGM with this batch's losses ``scores`` and running losses equal to their mean."""
    return c.agm_coefficients(scores, torch.full_like(scores, float(scores.mean())), alpha)


def _mslr(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """MSLR with accuracies ``scores``, a memory of ``1`` and initial factors ``1 + alpha``."""
    return c.mslr_coefficients(scores, torch.ones_like(scores), 1.0 + alpha)


def _gblend(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """G-Blend whose held-out losses fell by ``scores`` (training losses fell by ``alpha``
    more)."""
    ones = torch.ones_like(scores)
    return c.gblend_weights(2 * ones, ones - alpha, 2 * ones + 0.5, 2 * ones + 0.5 - scores)


def _mmpareto(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """MMPareto's multimodal weight per modality for ``<g_mm, g_uni> = scores - alpha`` and
    unit squared norms."""
    ones = torch.ones_like(scores)
    return c.mmpareto_weights(scores - alpha, ones, ones)[..., 0]


def _cggm(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """CGGM with gains ``scores`` and ``rho = 1 + alpha`` (rho must be > 0)."""
    return c.cggm_coefficients(scores, 1.0 + alpha)
def _amss(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """AMSS's keep rates for head losses ``-log(scores)``, unit feature entropies, the label
    term ``ln M`` and temperature ``0.1 + alpha``."""
    label_entropy = torch.tensor(math.log(scores.shape[0]), dtype=scores.dtype)
    losses = -scores.log()
    return c.amss_keep_rates(losses, torch.ones_like(scores), label_entropy, 0.1 + alpha)
def _opm(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """OPM's drop probabilities with ``q_base = alpha / 3`` (in [0, 1]) and ``lam = 0.5``."""
    return c.opm_drop_probabilities(scores, alpha / 3, 0.5)


FUNCTIONS: dict[str, Coefficients] = {
    "mlb_coefficients": c.mlb_coefficients,
    "mlb_error_coefficients": c.mlb_error_coefficients,
    "ogm_coefficients": c.ogm_coefficients,
    "agm_coefficients": _agm,
    "mslr_coefficients": _mslr,
    "pmr_weights": c.pmr_weights,
    "gblend_weights": _gblend,
    "mmpareto_weights": _mmpareto,
    "cggm_coefficients": _cggm,
    "inforeg_betas": c.inforeg_betas,
    "amss_keep_rates": _amss,
    "opm_drop_probabilities": _opm,
}
"""Every coefficient function as ``f(scores, alpha)``."""

HELPERS = {
    "mlb_ratios",
    "mlb_error_ratios",
    "true_class_probability",
    "others_mean",
    "one_minus_tanh",
    "agm_losses",
    "agm_ratios",
    "shapley_matrix",
    "gblend_estimates",
    "gblend_scores",
    "cggm_balance",
    "cggm_direction_loss",
    "inforeg_trace_change",  # InfoReg's prime-window statistic of the Fisher trace
    "amss_label_entropy",
    "amss_unit_masks",  # the masks of gradient units, not per-modality coefficients
    "opm_fusion_scale",  # OPM's rescale of the fusion input, from the probabilities
}
"""Public functions that are not coefficients (statistics and the parts of the rules)."""

TIE_BREAKING = {"ogm_coefficients"}
UNSAFE_AT_ZERO = {"mslr_coefficients"}
NEUTRAL = {
    "mlb_coefficients": (0.0, 1.0),
    "mlb_error_coefficients": (0.0, 1.0),
    "ogm_coefficients": (0.0, 1.0),
    "agm_coefficients": (0.0, 1.0),
    "pmr_weights": (0.0, 0.0),
    "mmpareto_weights": (-2.0, 0.5),  # <g_mm, g_uni> = s + 2 > 0: no conflict
    "inforeg_betas": (0.0, 0.0),  # strength 0: no proximal term
    "opm_drop_probabilities": (0.0, 0.0),  # q_base = 0: nothing dropped
}
"""``name -> (alpha, the coefficient every modality gets)`` for any scores."""

scores_st = st.integers(2, 5).flatmap(
    lambda m: st.lists(st.floats(0.01, 1.0, allow_nan=False), min_size=m, max_size=m)
)
alpha_st = st.floats(0.0, 3.0)


def test_every_public_function_is_classified():
    """Its own functions and those it re-exports (not the option validators it imports)."""
    public = {
        name
        for name, value in vars(c).items()
        if inspect.isfunction(value)
        and not name.startswith("_")
        and value.__module__.startswith("gradbalance")
        and not value.__module__.endswith("_checks")
    }
    assert public == set(FUNCTIONS) | HELPERS


@pytest.mark.parametrize("name", sorted(set(FUNCTIONS) - TIE_BREAKING))
@settings(max_examples=60, deadline=None)
@given(st.integers(2, 5), st.floats(0.01, 1.0), alpha_st)
def test_equal_scores_give_equal_coefficients(name, m, score, alpha):
    k = FUNCTIONS[name](torch.full((m,), score), alpha)
    torch.testing.assert_close(k, torch.full_like(k, float(k[0])))


def test_ogm_breaks_a_tie_by_slowing_modality_zero():
    k = c.ogm_coefficients(torch.full((3,), 0.4), alpha=1.0)
    assert k[0] < 1 and torch.equal(k[1:], torch.ones(2))


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@settings(max_examples=60, deadline=None)
@given(scores_st, alpha_st, st.randoms(use_true_random=False))
def test_permuting_the_scores_permutes_the_coefficients(name, scores, alpha, rng):
    if name in TIE_BREAKING and len(set(scores)) < len(scores):
        return  # the tie rule names modality 0
    s = torch.tensor(scores, dtype=torch.float64)
    order = list(range(len(scores)))
    rng.shuffle(order)
    permutation = torch.tensor(order)
    f = FUNCTIONS[name]
    torch.testing.assert_close(f(s[permutation], alpha), f(s, alpha)[permutation])


@pytest.mark.parametrize("name", sorted(set(FUNCTIONS) - UNSAFE_AT_ZERO))
@settings(max_examples=30, deadline=None)
@given(st.integers(2, 5), alpha_st)
def test_zero_scores_give_finite_coefficients(name, m, alpha):
    assert torch.isfinite(FUNCTIONS[name](torch.zeros(m), alpha)).all()
    one_zero = torch.linspace(0.0, 1.0, m)
    assert torch.isfinite(FUNCTIONS[name](one_zero, alpha)).all()


def test_mslr_divides_by_its_memory():
    k = c.mslr_coefficients(torch.tensor([0.5, 0.5]), torch.zeros(2), 1.0)
    assert torch.isinf(k).all()


@pytest.mark.parametrize("name", sorted(NEUTRAL))
@settings(max_examples=60, deadline=None)
@given(scores_st)
def test_the_neutral_setting_gives_its_neutral_coefficient(name, scores):
    alpha, neutral = NEUTRAL[name]
    k = FUNCTIONS[name](torch.tensor(scores), alpha)
    torch.testing.assert_close(k, torch.full_like(k, neutral))


@settings(max_examples=60, deadline=None)
@given(scores_st)
def test_mslr_is_neutral_when_the_accuracies_match_their_memory(scores):
    s = torch.tensor(scores)
    torch.testing.assert_close(c.mslr_coefficients(s, s.clone(), 1.0), torch.ones_like(s))


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 6), st.floats(0.0, 1.0))
def test_gblend_is_uniform_without_a_gain(n, loss):
    ones = torch.full((n,), loss)
    torch.testing.assert_close(c.gblend_weights(ones, ones, ones, ones), torch.full((n,), 1 / n))
