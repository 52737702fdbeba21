"""AMSS and AMSS+ against the official rule written out plainly, and per-parameter masks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import MultiTowerNet, make_batch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradbalance as gb
from gradbalance.coefficients import amss_keep_rates, amss_label_entropy, amss_unit_masks
from gradbalance.errors import ConfigurationError


def official_two_modality_rates(loss_a, loss_v, h_a, h_v, hy, temperature=0.2):
    """The official audio-video rule, scalar by scalar: coeff_a = e^{t_v} / (e^{t_v} + e^{t_a})
    with t_m = (-L_m + H_Y + 0.5) / H_m / T, 0.5 when undefined, clamped to [0.1, 0.9]."""
    score_a, score_v = -loss_a, -loss_v
    if score_a + hy + 0.5 <= 0 or score_v + hy + 0.5 <= 0:
        return 0.5, 0.5
    t_a = (score_a + hy + 0.5) / h_a / temperature
    t_v = (score_v + hy + 0.5) / h_v / temperature
    coeff_a = math.exp(t_v) / (math.exp(t_v) + math.exp(t_a))
    coeff_v = math.exp(t_a) / (math.exp(t_v) + math.exp(t_a))
    return min(max(coeff_a, 0.1), 0.9), min(max(coeff_v, 0.1), 0.9)


def official_many_modality_rates(losses, entropies, hy, temperature, offset, bias):
    """The official three-modality form: 1 - e^{t_m} / sum_j e^{t_j} + bias, clamped."""
    if any(-loss + hy + offset <= 0 for loss in losses):
        return [0.5] * len(losses)
    t = [(-loss + hy + offset) / h / temperature for loss, h in zip(losses, entropies)]
    total = sum(math.exp(x) for x in t)
    return [min(max(1 - math.exp(x) / total + bias, 0.1), 0.9) for x in t]


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.floats(0.0, 4.0), min_size=2, max_size=2),
    st.lists(st.floats(0.5, 5.0), min_size=2, max_size=2),
    st.floats(0.0, 2.5),
    st.floats(0.05, 2.0),
)
def test_keep_rates_match_the_official_two_modality_formula(losses, entropies, hy, temperature):
    expected = official_two_modality_rates(*losses, *entropies, hy, temperature)
    rates = amss_keep_rates(
        torch.tensor(losses, dtype=torch.float64),
        torch.tensor(entropies, dtype=torch.float64),
        torch.tensor(hy, dtype=torch.float64),
        temperature,
    )
    assert rates.tolist() == pytest.approx(expected, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 5).flatmap(
        lambda m: st.tuples(
            st.lists(st.floats(0.0, 3.0), min_size=m, max_size=m),
            st.lists(st.floats(0.5, 4.0), min_size=m, max_size=m),
        )
    ),
    st.floats(0.0, 2.0),
    st.floats(0.1, 2.0),
    st.floats(0.0, 3.0),
    st.floats(-0.3, 0.3),
)
def test_keep_rates_match_the_official_many_modality_formula(
    pair, hy, temperature, offset, bias
):
    losses, entropies = pair
    expected = official_many_modality_rates(losses, entropies, hy, temperature, offset, bias)
    rates = amss_keep_rates(
        torch.tensor(losses, dtype=torch.float64),
        torch.tensor(entropies, dtype=torch.float64),
        torch.tensor(hy, dtype=torch.float64),
        temperature,
        offset,
        bias,
    )
    assert rates.tolist() == pytest.approx(expected, abs=1e-9)


def test_a_non_finite_rate_falls_back_to_one_half():
    rates = amss_keep_rates(torch.zeros(2), torch.zeros(2), torch.tensor(1.0))  # t = inf
    assert rates.tolist() == [0.5, 0.5]


def test_label_entropy_is_the_official_cross_entropy_of_the_frequencies():
    p = torch.tensor([0.5, 0.25, 0.25, 0.0])
    official = F.cross_entropy(p, p)  # nn.CrossEntropyLoss()(label_probs, label_probs)
    torch.testing.assert_close(amss_label_entropy(p), official)
    uniform = torch.full((6,), 1 / 6)
    torch.testing.assert_close(amss_label_entropy(uniform), torch.tensor(math.log(6)))


def manual_rates(model, inputs, target, temperature=0.2):
    """Rates of one batch from the fused head's slices ``W_m z_m + b / 2``, plainly."""
    with torch.no_grad():
        feats = [tower(x) for tower, x in zip(model.towers, inputs)]
        w, b = model.fusion.weight, model.fusion.bias
        losses, entropies, start = [], [], 0
        for z in feats:
            logits = z @ w[:, start : start + z.shape[1]].T + b / 2
            start += z.shape[1]
            losses.append(F.cross_entropy(logits, target).item())
            p = torch.softmax(z, 1)
            entropies.append(-(p * p.log()).sum(1).mean().item())
        frequencies = torch.bincount(target, minlength=4).float() / len(target)
        hy = F.cross_entropy(frequencies, frequencies).item()
    return official_two_modality_rates(*losses, *entropies, hy, temperature)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rates_of_a_step_against_manual(seed):
    torch.manual_seed(seed)
    model = MultiTowerNet((5, 7))
    inputs, target = make_batch((5, 7), seed=seed)
    expected = manual_rates(model, inputs, target, temperature=0.5)
    bal = gb.AMSS(model, list(model.towers), 4, fusion_head=model.fusion, temperature=0.5)
    bal.loss(model(*inputs), target).backward()
    assert [float(k) for k in bal.coefficients.values()] == pytest.approx(expected, rel=1e-5)


def plain_tower_grads(model, inputs, target):
    """Each tower parameter's gradient of the plain fused cross-entropy, on a copy."""
    reference = copy.deepcopy(model)
    params = [p for tower in reference.towers for p in tower.parameters()]
    loss = F.cross_entropy(reference(*inputs), target)
    return torch.autograd.grad(loss, params)


def manual_masked(grads, rates_per_param, seed, unbiased):
    """The official sampling per parameter: ``ceil(N rate)`` output rows without replacement,
    with probability proportional to the row's squared gradient; the draws of all parameters
    are one uniform block in parameter order (keys ``w / -log u``, the exponential race)."""
    rows = [g.shape[0] for g in grads]
    uniforms = torch.rand(sum(rows), generator=torch.Generator().manual_seed(seed))
    out = []
    for g, rate, u in zip(grads, rates_per_param, uniforms.split(rows)):
        n = g.shape[0]
        w = (g.reshape(n, -1) ** 2).sum(1)
        keep = int(torch.ceil(torch.tensor(float(n)) * rate))
        kept = torch.topk(w / -u.log(), keep).indices
        mask = torch.zeros(n)
        if unbiased:
            q = w / w.sum()
            inclusion = (keep * q).clamp(max=1).clamp(min=1 / n)
            mask[kept] = 1 / inclusion[kept]
        else:
            mask[kept] = 1.0
        out.append(g * mask.view(-1, *([1] * (g.dim() - 1))))
    return out


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("seed", [0, 5])
def test_masked_gradients_against_manual_per_parameter(unbiased, seed):
    torch.manual_seed(seed)
    model = MultiTowerNet((5, 7))
    inputs, target = make_batch((5, 7), seed=seed)
    plain = plain_tower_grads(model, inputs, target)
    fusion_plain = copy.deepcopy(model)
    F.cross_entropy(fusion_plain(*inputs), target).backward()
    bal = gb.AMSS(
        model, list(model.towers), 4, fusion_head=model.fusion, seed=seed, unbiased=unbiased
    )
    bal.loss(model(*inputs), target).backward()
    bal.after_backward()
    rates = list(bal.coefficients.values())
    owners = [rates[m] for m, tower in enumerate(model.towers) for _ in tower.parameters()]
    expected = manual_masked(plain, owners, seed, unbiased)
    actual = [p.grad for tower in model.towers for p in tower.parameters()]
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)
    assert any((a == 0).any() for a in actual)
    torch.testing.assert_close(model.fusion.weight.grad, fusion_plain.fusion.weight.grad)


def test_the_exponential_race_samples_as_multinomial_without_replacement():
    """Inclusion frequencies of 4000 masks of one segment against torch.multinomial's."""
    w = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5, 0.0])
    draws, n, keep = 4000, 6, 2
    g = torch.Generator().manual_seed(0)
    masks = amss_unit_masks(
        w.repeat(draws),
        torch.full((draws,), n),
        torch.full((draws,), keep / n),
        torch.rand(draws * n, generator=g),
    ).view(draws, n)
    reference = torch.zeros(n)
    for _ in range(draws):
        reference[torch.multinomial(w / w.sum(), keep, replacement=False, generator=g)] += 1
    torch.testing.assert_close(masks.mean(0), reference / draws, atol=0.03, rtol=0)
    assert (masks.sum(1) == keep).all() and (masks[:, -1] == 0).all()


def test_amss_plus_is_unbiased_when_one_unit_is_kept():
    """With one unit kept, unit i is kept with probability q_i: E[mask_i] = q_i / pi_i, 1 for a
    share q_i >= 1 / N; the floor pi_i >= 1 / N biases the last (q = 1/8): 0.5."""
    w = torch.tensor([3.0, 2.0, 2.0, 1.0])
    draws = 20000
    masks = amss_unit_masks(
        w.repeat(draws),
        torch.full((draws,), 4),
        torch.full((draws,), 0.2),  # ceil(4 * 0.2) = 1
        torch.rand(draws * 4, generator=torch.Generator().manual_seed(1)),
        unbiased=True,
    ).view(draws, 4)
    expected = torch.tensor([1.0, 1.0, 1.0, 0.5])
    torch.testing.assert_close(masks.mean(0), expected, atol=0.05, rtol=0)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(1, 9), min_size=1, max_size=5),
    st.floats(0.0, 1.0),
    st.integers(0, 2**16),
    st.booleans(),
)
def test_each_segment_keeps_ceil_n_rate_units(lengths, rate, seed, unbiased):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    importance = torch.rand(total, generator=g)
    masks = amss_unit_masks(
        importance,
        torch.tensor(lengths),
        torch.full((len(lengths),), rate),
        torch.rand(total, generator=g),
        unbiased,
    )
    for n, piece in zip(lengths, masks.split(lengths)):
        assert int((piece > 0).sum()) == math.ceil(torch.tensor(n * rate).float().item())
        assert (piece[piece > 0] >= 1).all() and torch.isfinite(piece).all()


def test_element_units_keep_ceil_numel_rate_elements(two_tower):
    inputs, target = make_batch((5, 7))
    bal = gb.AMSS(two_tower, list(two_tower.towers), 4, unit="element", parameters="conv")
    assert all(p == [] for p in bal.masked_parameters.values())  # no 4-D kernel in an MLP
    bal.remove()
    bal = gb.AMSS(two_tower, list(two_tower.towers), 4, unit="element")
    bal.loss(two_tower(*inputs), target).backward()
    bal.after_backward()
    rates = list(bal.coefficients.values())
    for m, tower in enumerate(two_tower.towers):
        for p in tower.parameters():
            expected = math.ceil(p.numel() * float(rates[m]))
            assert int((p.grad != 0).sum()) <= expected  # a zero gradient may be kept


def test_masks_once_per_step_and_only_in_the_window(two_tower):
    inputs, target = make_batch((5, 7))
    bal = gb.AMSS(two_tower, list(two_tower.towers), 4, window=(0, 0), window_unit="step")
    bal.loss(two_tower(*inputs), target).backward()
    bal.after_backward()
    after = [p.grad.clone() for p in two_tower.parameters()]
    bal.after_backward()  # a second call in the same step masks nothing more
    assert all(torch.equal(p.grad, a) for p, a in zip(two_tower.parameters(), after))
    two_tower.zero_grad()
    bal.loss(two_tower(*inputs), target).backward()  # step 1: outside the window
    plain = [p.grad.clone() for p in two_tower.parameters()]
    bal.after_backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(two_tower.parameters(), plain))
    assert [float(k) for k in bal.coefficients.values()] == [1.0, 1.0]


def test_a_restored_generator_draws_the_same_masks(two_tower):
    inputs, target = make_batch((5, 7))
    bal = gb.AMSSPlus(two_tower, list(two_tower.towers), 4, seed=3)
    bal.loss(two_tower(*inputs), target).backward()
    bal.after_backward()
    state = copy.deepcopy(bal.state_dict())
    two_tower.zero_grad()
    bal.loss(two_tower(*inputs), target).backward()
    bal.after_backward()
    first = [p.grad.clone() for p in two_tower.parameters()]
    bal.load_state_dict(state)
    two_tower.zero_grad()
    bal.loss(two_tower(*inputs), target).backward()
    bal.after_backward()
    assert all(torch.equal(p.grad, f) for p, f in zip(two_tower.parameters(), first))


def test_make_names_and_options(two_tower):
    towers = list(two_tower.towers)
    bal = gb.make("AMSS+", two_tower, towers, num_classes=4)
    assert type(bal) is gb.AMSSPlus and bal.unbiased
    bal.remove()
    bal = gb.make("amss", two_tower, towers, num_classes=4)
    assert type(bal) is gb.AMSS and not bal.unbiased and bal.seed == 0
    assert "temperature=0.2" in repr(bal)
    bal.remove()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"unit": "row"}, "unit must be one of"),
        ({"seed": 1.5}, "seed must be an int"),
        ({"parameters": "all"}, "parameters must be"),
        ({"task": "regression"}, "does not support task='regression'"),
    ],
)
def test_bad_options_are_refused(two_tower, options, message):
    classes = () if options.get("task") else (4,)
    with pytest.raises(ConfigurationError, match=message):
        gb.AMSS(two_tower, list(two_tower.towers), *classes, **options)
