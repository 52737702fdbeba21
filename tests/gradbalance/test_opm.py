"""OPM against the authors' rule written plainly and a manual masked forward.

The authors' ``calcu_q`` and ``Modality_drop.execute_drop`` (their public BML_TPAMI2024 code)
are re-derived below as plain formulas: their module does not import (a stray bracket in
``execute_drop``), so the comparison is by reading.
"""

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
from gradbalance.coefficients import opm_drop_probabilities, opm_fusion_scale
from gradbalance.errors import ConfigurationError
from gradbalance.methods._feature_drop import hash_uniform


def official_q(p1: float, p2: float, q_base: float, lam: float) -> list[float]:
    """The authors' ``calcu_q`` for two modalities, in plain Python."""
    r1 = math.tanh(max(p1 / p2 - 1, 0.0))
    r2 = math.tanh(max(p2 / p1 - 1, 0.0))
    q1 = q_base * (1 + lam * r1) if r1 > 0 else 0.0
    q2 = q_base * (1 + lam * r2) if r2 > 0 else 0.0
    return [min(max(q1, 0.0), 1.0), min(max(q2, 0.0), 1.0)]


def plain_q(scores, q_base, lam):
    """Each modality against the mean of the others (M >= 2), in plain Python."""
    s = [max(v, 1e-8) for v in scores]
    out = []
    for m, own in enumerate(s):
        others = [v for j, v in enumerate(s) if j != m]
        lead = own / (sum(others) / len(others)) - 1
        out.append(min(q_base * (1 + lam * math.tanh(lead)), 1.0) if lead > 0 else 0.0)
    return out


def official_fusion_input(features, keep, q, widths):
    """The authors' ``execute_drop`` given its Bernoulli mask ``keep`` ``(M, B)``: each feature
    times its mask, all divided by ``1 - sum(d q) / sum(d)``."""
    theta = sum(d * p for d, p in zip(widths, q)) / sum(widths)
    return [f * k[:, None] / (1 - theta) for f, k in zip(features, keep)]


def slice_scores(model, inputs, target):
    """Mean true-class probability of ``W_m z_m + b / M``, written out plainly."""
    with torch.no_grad():
        feats = [t(x) for t, x in zip(model.towers, inputs)]
        w, b = model.fusion.weight, model.fusion.bias
        out, start = [], 0
        for z in feats:
            logits = z @ w[:, start : start + z.shape[1]].T + b / len(feats)
            start += z.shape[1]
            probs = torch.softmax(logits, 1)
            out.append(sum(probs[i, target[i]].item() for i in range(len(target))) / len(target))
    return out


@settings(max_examples=80, deadline=None)
@given(st.floats(0.01, 1.0), st.floats(0.01, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 3.0))
def test_two_modality_probabilities_are_the_official_calcu_q(p1, p2, q_base, lam):
    q = opm_drop_probabilities(torch.tensor([p1, p2], dtype=torch.float64), q_base, lam)
    assert q.tolist() == pytest.approx(official_q(p1, p2, q_base, lam), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=6), st.floats(0.0, 1.0), st.floats(0, 3))
def test_probabilities_compare_each_modality_with_the_others_mean(scores, q_base, lam):
    q = opm_drop_probabilities(torch.tensor(scores, dtype=torch.float64), q_base, lam)
    assert q.tolist() == pytest.approx(plain_q(scores, q_base, lam), abs=1e-12)
    # Never every modality: some sample always keeps a feature, and the rescale is finite.
    assert (q == 0).any()
    scale = opm_fusion_scale(q, torch.full((len(scores),), 16))
    assert torch.isfinite(scale) and scale >= 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=5), st.integers(1, 64))
def test_fusion_scale_is_one_over_the_kept_fraction_of_the_concatenated_input(q, width):
    widths = [width * (i + 1) for i in range(len(q))]
    q = [min(v, 0.9) for v in q]
    theta = sum(d * p for d, p in zip(widths, q)) / sum(widths)
    scale = opm_fusion_scale(torch.tensor(q, dtype=torch.float64), torch.tensor(widths))
    assert float(scale) == pytest.approx(1 / (1 - theta), rel=1e-12)


def test_probability_examples_and_bad_inputs():
    q = opm_drop_probabilities(torch.tensor([0.6, 0.3]), q_base=0.5, lam=0.5)
    torch.testing.assert_close(q, torch.tensor([0.5 * (1 + 0.5 * math.tanh(1.0)), 0.0]))
    assert opm_drop_probabilities(torch.tensor([0.9, 0.1]), 0.9, 3.0)[0] == 1.0  # clipped
    with pytest.raises(ConfigurationError, match="q_base must be <= 1"):
        opm_drop_probabilities(torch.tensor([0.6, 0.3]), q_base=1.5, lam=0.5)
    with pytest.raises(ValueError, match="one entry per modality"):
        opm_drop_probabilities(torch.tensor([0.6]), q_base=0.5, lam=0.5)
    with pytest.raises(ValueError, match="one feature width per modality"):
        opm_fusion_scale(torch.tensor([0.5, 0.0]), torch.tensor([3]))


def test_uniforms_are_uniform_and_independent_across_streams_and_counters():
    n = 200_000
    u = hash_uniform(0, torch.tensor(7), 0, n)
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    counts = torch.histc(u, bins=10, min=0.0, max=1.0)
    chi2 = float(((counts - n / 10) ** 2 / (n / 10)).sum())
    assert chi2 < 30  # 9 degrees of freedom: p ~ 4e-4
    for other in (hash_uniform(0, torch.tensor(7), 1, n), hash_uniform(0, torch.tensor(8), 0, n),
                  hash_uniform(1, torch.tensor(7), 0, n)):
        assert abs(float(torch.corrcoef(torch.stack([u, other]))[0, 1])) < 0.01
    assert torch.equal(u, hash_uniform(0, torch.tensor(7), 0, n))


def build(init=0, dims=(5, 7), **options):
    torch.manual_seed(init)
    model = MultiTowerNet(dims)
    defaults = {"q_base": 0.5, "lam": 0.5, "p_exe": 1.0, "fusion_head": model.fusion}
    return model, gb.OPM(model, list(model.towers), num_classes=4, **{**defaults, **options})


@pytest.mark.parametrize(
    ("seed", "dims"), [(0, (5, 7)), (1, (5, 7)), (2, (5, 7)), (3, (5, 7, 3)), (4, (5, 7, 3, 4, 6))]
)
def test_training_step_against_a_manual_masked_forward(seed, dims):
    model, bal = build(seed, dims, lam=2.0)
    inputs, target = make_batch(dims, seed=seed)
    # Step 1: nothing dropped yet; the scores give the next forward's probabilities.
    s = slice_scores(model, inputs, target)
    bal.loss(model(*inputs), target).backward()
    assert [float(v) for v in bal.scores.values()] == pytest.approx(s, rel=1e-5)
    assert all(float(k) == 1.0 for k in bal.coefficients.values())
    q = official_q(s[0], s[1], 0.5, 2.0) if len(dims) == 2 else plain_q(s, 0.5, 2.0)
    assert bal.drop_probabilities.tolist() == pytest.approx(q, rel=1e-5)
    model.zero_grad()

    # Step 2: the manual forward with the same per-sample draws (the method's own numbers).
    inputs, target = make_batch(dims, batch=64, seed=seed + 10)
    reference = copy.deepcopy(model)
    draws = bal.draws.clone()
    keep = [(hash_uniform(0, draws, m, 64) >= q[m]).float() for m in range(len(dims))]
    leader = max(range(len(dims)), key=lambda m: q[m])
    assert 0 < int(keep[leader].sum()) < 64  # the dominant modality lost some samples
    features = [t(x) for t, x in zip(reference.towers, inputs)]
    fused = official_fusion_input(features, keep, q, [12] * len(dims))
    F.cross_entropy(reference.fusion(torch.cat(fused, dim=1)), target).backward()
    bal.loss(model(*inputs), target).backward()
    for p, r in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-6)
    # The heads and scores read the full features.
    for got, want in zip(bal.features().values(), features):
        torch.testing.assert_close(got, want)


def test_execution_draw_skips_whole_batches_at_rate_p_exe():
    model, bal = build(p_exe=0.3)
    inputs, target = make_batch((5, 7))
    executed = []
    for _ in range(300):
        bal.loss(model(*inputs), target)
        executed.append(float(bal.drop_executes))
        if float(bal.drop_executes) == 0:
            assert float(bal.fusion_scale) == 1.0
    assert abs(sum(executed) / len(executed) - 0.3) < 0.08


def test_drop_rate_per_sample_matches_the_probability():
    model, bal = build(q_base=0.4, lam=0.0)
    inputs, target = make_batch((5, 7), batch=4000)
    bal.loss(model(*inputs), target)  # sets q = 0.4 for the leader
    leader = int(bal.drop_probabilities.argmax())
    outputs = {}
    handle = model.fusion.register_forward_pre_hook(lambda mod, args: outputs.update(x=args[0]))
    bal.loss(model(*inputs), target)
    handle.remove()
    width = 12
    block = outputs["x"][:, leader * width : (leader + 1) * width]
    dropped = (block == 0).all(dim=1).float().mean()
    assert abs(float(dropped) - 0.4) < 0.03


@pytest.mark.filterwarnings("ignore:a training forward of the model was not followed")
def test_no_drop_in_evaluation_outside_the_window_or_when_disabled():
    model, bal = build()
    inputs, target = make_batch((5, 7))
    bal.loss(model(*inputs), target)
    assert float(bal.drop_probabilities.max()) > 0
    plain = copy.deepcopy(model)
    plain_logits = plain(*inputs)
    bal.eval()
    torch.testing.assert_close(model(*inputs), plain_logits)  # evaluation, with gradients
    bal.train()
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), plain_logits)
    model.eval()  # the encoders' own mode does not decide (frozen batch norm while training)
    assert not torch.allclose(model(*inputs), plain_logits)  # training forwards drop
    model.train()
    bal.enabled = False
    torch.testing.assert_close(model(*inputs), plain_logits)
    model, bal = build(window=(1, None))
    bal.loss(model(*inputs), target)
    torch.testing.assert_close(model(*inputs), copy.deepcopy(model)(*inputs))
    bal.epoch_end()
    assert not torch.allclose(model(*inputs), copy.deepcopy(model)(*inputs))


def test_same_seed_same_masks_other_seed_other_masks():
    logits = []
    for seed in (0, 0, 1):
        model, bal = build(3, lam=2.0, seed=seed)
        inputs, target = make_batch((5, 7), batch=64)
        bal.loss(model(*inputs), target)
        logits.append(model(*inputs))
    assert torch.equal(logits[0], logits[1])
    assert not torch.equal(logits[0], logits[2])


def test_probes_without_a_fused_head_give_the_scores():
    model, bal = build(fusion_head=None, feature_dims=[12, 12])
    inputs, target = make_batch((5, 7))
    bal.loss(model(*inputs), target).backward()
    probes = bal.unimodal_logits()
    expected = [
        float(torch.softmax(logits, 1)[torch.arange(10), target].mean())
        for logits in probes.values()
    ]
    assert [float(v) for v in bal.scores.values()] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"q_base": 1.5}, "q_base must be <= 1, got 1.5"),
        ({"q_base": -0.1}, "q_base must be >= 0, got -0.1"),
        ({"lam": -1.0}, "lam must be >= 0, got -1"),
        ({"p_exe": 2.0}, "p_exe must be <= 1, got 2"),
        ({"seed": -1}, "seed must be an int >= 0, got -1"),
        ({"seed": 1.5}, "seed must be an int >= 0, got 1.5"),
    ],
)
def test_bad_options_are_refused(options, match):
    with pytest.raises(ConfigurationError, match=match):
        build(**options)


def test_regression_is_refused():
    model = MultiTowerNet((5, 7))
    with pytest.raises(ConfigurationError, match="regression"):
        gb.OPM(model, list(model.towers), task="regression", output_dim=4)


def test_registered_and_repr():
    model = MultiTowerNet((5, 7))
    bal = gb.make("OPM", model, list(model.towers), num_classes=4, fusion_head=model.fusion)
    assert type(bal) is gb.OPM
    assert "q_base=0.5, lam=0.5, p_exe=0.7, seed=0" in repr(bal)


def test_update_state_replace_binds_a_new_buffer_and_keeps_it_on_a_nonfinite_step():
    """The service OPM needs: the old tensor (held by a forward's graph) is never written."""
    model, bal = build(nonfinite="skip")
    inputs, target = make_batch((5, 7))
    bal.loss(model(*inputs), target)
    held = bal.drop_probabilities
    before = held.clone()
    bal.loss(model(*inputs), target)
    assert bal.drop_probabilities is not held and torch.equal(held, before)
    assert "drop_probabilities" in dict(bal.named_buffers())
    assert torch.equal(bal.state_dict()["drop_probabilities"], bal.drop_probabilities)
    draws = bal.draws.clone()
    bal.loss(model(*inputs), target)  # a finite step advances the counter
    assert int(bal.draws) == int(draws) + 1
    bad = [x.clone() for x in inputs]
    bad[0][0, 0] = float("nan")
    kept = bal.drop_probabilities.clone()
    bal.loss(model(*bad), target)  # a non-finite step keeps every state
    assert int(bal.draws) == int(draws) + 1 and torch.equal(bal.drop_probabilities, kept)


def test_update_state_replace_refuses_another_shape():
    model, bal = build()
    inputs, target = make_batch((5, 7))
    logits = model(*inputs)

    class Step:  # the service reads only keep_if_finite
        @staticmethod
        def keep_if_finite(new, old):
            return new

    with pytest.raises(ConfigurationError, match=r"needs a value of the state's shape \(2,\)"):
        bal.update_state(Step(), "drop_probabilities", torch.zeros(3), replace=True)
    bal.loss(logits, target)
