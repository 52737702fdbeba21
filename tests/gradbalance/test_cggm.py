"""CGGM against its rule written plainly and manual per-parameter gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import MultiTowerNet, make_batch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradbalance as gb
from gradbalance.coefficients import cggm_balance, cggm_coefficients, cggm_direction_loss
from gradbalance.errors import ConfigurationError

DIMS = (5, 7)
HIDDEN = 12


def make(model, **options):
    options.setdefault("feature_dims", [HIDDEN, HIDDEN])
    return gb.CGGM(model, list(model.towers), num_classes=4, **options)


def plain_balance(gains, clamp=True):
    """B_m = (sum gains + 1e-8 - gain_m) / (sum gains + 1e-8), in Python floats."""
    total = sum(gains) + 1e-8
    values = [(total - g) / total for g in gains]
    return [min(max(b, 0.0), 1.0) for b in values] if clamp else values


def probe_accuracies(bal, model, inputs, target):
    """Each probe's batch accuracy, one sample at a time."""
    with torch.no_grad():
        out = []
        for name, tower, x in zip(bal.names, model.towers, inputs):
            head = bal.heads[name]
            z = tower(x)
            hits = [int((head(z[i]).argmax() == target[i]).item()) for i in range(len(target))]
            out.append(sum(hits) / len(hits))
    return out


def manual_grads(model, bal, inputs, target, balance, rho, lam):
    """Gradients of CE(fused) + lam * L_gm on a copy, then encoder m's scaled by rho * B_m."""
    reference = copy.deepcopy(model)
    loss = F.cross_entropy(reference(*inputs), target)
    if lam:
        weight = reference.fusion.weight
        terms = []
        for m, name in enumerate(bal.names):
            block = weight[:, m * HIDDEN : (m + 1) * HIDDEN]
            probe = bal.heads[name].weight.detach()
            cos = (probe * block).sum() / (probe.norm() * block.norm())
            terms.append(abs(balance[m]) - balance[m] * cos)
        loss = loss + lam * sum(terms) / len(terms)
    params = list(reference.parameters())
    grads = torch.autograd.grad(loss, params)
    owner = {id(p): m for m, t in enumerate(reference.towers) for p in t.parameters()}
    return [g * rho * balance[owner[id(p)]] if id(p) in owner else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lam", [0.0, 0.2])
def test_gradients_against_manual(seed, lam):
    torch.manual_seed(seed)
    model = MultiTowerNet(DIMS)
    options = {"lam": lam, "fusion_weights": model.fusion} if lam else {}
    bal = make(model, rho=1.3, **options)
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.5)
    previous = [0.0, 0.0]
    for step in range(3):
        inputs, target = make_batch(DIMS, batch=16, seed=seed * 10 + step)
        accuracies = probe_accuracies(bal, model, inputs, target)
        balance = plain_balance([a - p for a, p in zip(accuracies, previous)])
        expected = manual_grads(model, bal, inputs, target, balance, 1.3, lam)
        opt.zero_grad()
        bal.loss(model(*inputs), target).backward()
        assert [float(v) for v in bal.scores.values()] == pytest.approx(accuracies)
        assert [float(k) for k in bal.coefficients.values()] == pytest.approx(
            [1.3 * b for b in balance], abs=1e-6
        )
        for p, g in zip(model.parameters(), expected):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
        opt.step()
        previous = accuracies


def test_official_rule_as_read_from_the_authors_code():
    """The official training loop (read, not run: it needs the datasets and transformers):
    diff = acc2 - acc1; diff_sum = sum(diff) + 1e-8; coeff = (diff_sum - d) / diff_sum;
    encoder grads *= coeff * rou; l_gm = (sum |coeff| - sum coeff * cos) / num_mod."""
    diff = [0.25, -0.0625, 0.125]
    diff_sum = sum(diff) + 1e-8
    coeff = [(diff_sum - d) / diff_sum for d in diff]
    cos = [0.5, -0.25, 0.9]
    l_gm = (sum(abs(c) for c in coeff) - sum(c * s for c, s in zip(coeff, cos))) / 3
    gains = torch.tensor(diff, dtype=torch.float64)
    k = cggm_coefficients(gains, rho=1.3, clamp=False)
    torch.testing.assert_close(k, torch.tensor([c * 1.3 for c in coeff], dtype=torch.float64))
    balance = cggm_balance(gains, clamp=False)
    loss = cggm_direction_loss(balance, torch.tensor(cos, dtype=torch.float64))
    assert float(loss) == pytest.approx(l_gm)


gains_st = st.integers(2, 5).flatmap(
    lambda m: st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=m, max_size=m)
)


@settings(max_examples=80, deadline=None)
@given(gains_st)
def test_balance_matches_the_plain_formula(gains):
    g = torch.tensor(gains, dtype=torch.float64)
    unbounded = cggm_balance(g, clamp=False)
    assert unbounded.tolist() == pytest.approx(plain_balance(gains, clamp=False), rel=1e-9)
    assert cggm_balance(g).tolist() == pytest.approx(plain_balance(gains), rel=1e-9, abs=1e-12)


@settings(max_examples=80, deadline=None)
@given(st.integers(2, 5).flatmap(lambda m: st.lists(st.floats(0.01, 1.0), min_size=m, max_size=m)))
def test_gains_of_one_sign_need_no_clamp_and_sum_to_m_minus_one(gains):
    for sign in (1.0, -1.0):
        g = sign * torch.tensor(gains, dtype=torch.float64)
        balance = cggm_balance(g, clamp=False)
        assert ((balance >= -1e-9) & (balance <= 1 + 1e-9)).all()
        assert float(balance.sum()) == pytest.approx(len(gains) - 1)
        torch.testing.assert_close(cggm_balance(g), balance.clamp(0, 1))


@settings(max_examples=60, deadline=None)
@given(gains_st, st.data())
def test_direction_loss_is_nonnegative_and_zero_when_aligned(gains, data):
    balance = cggm_balance(torch.tensor(gains, dtype=torch.float64))
    cos = data.draw(st.lists(st.floats(-1, 1), min_size=len(gains), max_size=len(gains)))
    assert float(cggm_direction_loss(balance, torch.tensor(cos, dtype=torch.float64))) >= -1e-12
    assert float(cggm_direction_loss(balance, torch.ones_like(balance))) == pytest.approx(0.0)


def test_mixed_gains_are_bounded_by_default():
    gains = torch.tensor([1 / 16, -1 / 16])  # the total gain is 0: the paper's B is ~1e6
    assert cggm_balance(gains, clamp=False).abs().max() > 1e5
    torch.testing.assert_close(cggm_balance(gains), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("unit", ["step", "epoch"])
def test_outside_the_window_k_is_one_and_no_direction_term(unit):
    torch.manual_seed(0)
    model = MultiTowerNet(DIMS)
    bal = make(model, lam=0.5, fusion_weights=model.fusion, window=(1, None), window_unit=unit)
    inputs, target = make_batch(DIMS, batch=16)
    loss = bal.loss(model(*inputs), target)
    with torch.no_grad():
        probes = sum(
            F.cross_entropy(bal.heads[n](t(x)), target)
            for n, t, x in zip(bal.names, model.towers, inputs)
        )
        expected = F.cross_entropy(model(*inputs), target) + probes
    torch.testing.assert_close(loss.detach(), expected)
    assert all(float(k) == 1.0 for k in bal.coefficients.values())
    accuracies = probe_accuracies(bal, model, inputs, target)
    assert bal.previous_metric.tolist() == pytest.approx(accuracies)  # tracked all the same


def test_score_metric_uses_the_true_class_probability():
    torch.manual_seed(1)
    model = MultiTowerNet(DIMS)
    bal = make(model, metric="score", rho=2.0)
    inputs, target = make_batch(DIMS, batch=16)
    with torch.no_grad():
        probs = [
            torch.softmax(bal.heads[n](t(x)), -1)[torch.arange(16), target].mean().item()
            for n, t, x in zip(bal.names, model.towers, inputs)
        ]
    bal.loss(model(*inputs), target).backward()
    k = [float(v) for v in bal.coefficients.values()]
    assert k == pytest.approx([2.0 * b for b in plain_balance(probs)], rel=1e-5)


def test_regression_gain_is_the_decrease_of_the_error():
    torch.manual_seed(2)
    model = MultiTowerNet(DIMS, num_classes=1)
    bal = gb.CGGM(model, list(model.towers), task="regression", feature_dims=[HIDDEN] * 2)
    assert bal.metric == "score"
    previous = torch.zeros(2)
    for seed in range(2):
        inputs, _ = make_batch(DIMS, batch=16, seed=seed)
        y = torch.randn(16, generator=torch.Generator().manual_seed(seed))
        bal.loss(model(*inputs), y).backward()
        errors = bal.last_scores.clone()
        gains = (previous - errors).tolist()
        k = [float(v) for v in bal.coefficients.values()]
        assert k == pytest.approx([1.3 * b for b in plain_balance(gains)], rel=1e-5, abs=1e-6)
        previous = errors


def test_weight_blocks_as_a_sequence_equal_the_split_linear():
    torch.manual_seed(3)
    model = MultiTowerNet(DIMS)
    blocks = list(model.fusion.weight.split(HIDDEN, dim=1))
    inputs, target = make_batch(DIMS, batch=16)
    a = make(model, lam=0.3, fusion_weights=model.fusion)
    b = make(copy.deepcopy(model), lam=0.3, fusion_weights=blocks)
    b.load_state_dict(a.state_dict())
    features = {n: t(x) for n, t, x in zip(a.names, model.towers, inputs)}
    torch.testing.assert_close(a.weight_cosines(features), b.weight_cosines(features))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rho": 0.0}, "rho must be"),
        ({"lam": -0.1}, "lam must be"),
        ({"lam": 0.2}, "pass fusion_weights="),
        ({"metric": "auc"}, "metric must be one of"),
        ({"lam": 0.2, "fusion_weights": torch.nn.ReLU()}, "fusion_weights must be an nn.Linear"),
        ({"lam": 0.2, "fusion_weights": [torch.zeros(4, 12)]}, "needs 2 2-D tensors"),
    ],
)
def test_bad_options(two_tower, options, message):
    with pytest.raises(ConfigurationError, match=message):
        make(two_tower, **options)


def test_regression_refuses_the_accuracy_metric():
    model = MultiTowerNet(DIMS, num_classes=1)
    with pytest.raises(ConfigurationError, match="metric must be 'score'"):
        gb.CGGM(model, list(model.towers), task="regression", metric="accuracy")


def test_mismatched_fusion_weights_are_refused_at_the_first_step(two_tower):
    inputs, target = make_batch(DIMS)
    bad = make(two_tower, lam=0.2, fusion_weights=[torch.zeros(4, 12), torch.zeros(4, 5)])
    with pytest.raises(ConfigurationError, match="weight block of each modality"):
        bad.loss(two_tower(*inputs), target)
    bad.remove()
    narrow = make(two_tower, lam=0.2, fusion_weights=torch.nn.Linear(20, 4))
    with pytest.raises(ConfigurationError, match="takes the concatenated features"):
        narrow.loss(two_tower(*inputs), target)
