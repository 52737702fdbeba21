"""InfoReg against its rule written plainly: the official per-batch formulas, the official
trace list, and manual per-parameter gradients (torch.autograd.grad on deep copies)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import MultiTowerNet, make_batch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import gradbalance as gb
from gradbalance.coefficients import inforeg_betas, inforeg_trace_change
from gradbalance.errors import ConfigurationError, InputError

DIMS = (5, 7)


def official_betas(scores_a: float, scores_v: float, c_a: float, c_v: float) -> list[float]:
    """The official two-modality rule, on batch sums of the true-class probability."""
    if scores_a > scores_v:
        return [c_a * math.exp(math.tanh(scores_a - scores_v)), 0.0]
    if scores_a < scores_v:
        return [0.0, c_v * math.exp(math.tanh(scores_v - scores_a))]
    return [0.0, 0.0]


def official_changes(epoch_traces: list[float]) -> list[float]:
    """The official loop's ``k`` at each epoch's start: 1 at epoch 0, then ``(mean(last 10) -
    mean(the 10 before the last)) / mean(last 10)`` of the trace list that starts with ten
    zeros."""
    trace_list = [0.0] * 10
    changes = []
    for epoch, trace in enumerate(epoch_traces):
        if epoch == 0:
            changes.append(1.0)
        else:
            tr1 = sum(trace_list[-10:]) / 10
            tr2 = sum(trace_list[-11:-1]) / 10
            changes.append((tr1 - tr2) / tr1)
        trace_list.append(trace)
    return changes


def batch_sums(logits: torch.Tensor, target: torch.Tensor) -> float:
    probs = torch.softmax(logits, 1)
    return sum(float(probs[i, target[i]]) for i in range(len(target)))


@settings(max_examples=80, deadline=None)
@given(
    st.floats(0.0, 64.0), st.floats(0.0, 64.0), st.floats(0.0, 2.0), st.floats(0.0, 2.0)
)
def test_betas_are_the_official_rule_on_batch_sums(sum_a, sum_v, c_a, c_v):
    """Mean scores with ``gap_scale = B`` are the official batch sums' rule."""
    batch = 64
    scores = torch.tensor([sum_a / batch, sum_v / batch], dtype=torch.float64)
    strength = torch.tensor([c_a, c_v], dtype=torch.float64)
    betas = inforeg_betas(scores, strength, gap_scale=batch)
    expected = official_betas(float(scores[0]) * batch, float(scores[1]) * batch, c_a, c_v)
    assert betas.tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=3, max_size=5), st.floats(0.1, 10.0))
def test_betas_compare_each_modality_with_the_mean_of_the_others(scores, gap_scale):
    s = torch.tensor(scores, dtype=torch.float64)
    betas = inforeg_betas(s, 0.5, gap_scale)
    for m, score in enumerate(scores):
        others = (sum(scores) - score) / (len(scores) - 1)
        gap = score - others
        expected = 0.5 * math.exp(math.tanh(gap_scale * gap)) if gap > 1e-12 else 0.0
        if abs(gap) > 1e-12:  # the sign of a gap at rounding level is not the test's business
            assert float(betas[m]) == pytest.approx(expected, rel=1e-9)
    assert (betas >= 0).all() and betas.max() <= 0.5 * math.e + 1e-12


def test_betas_refuse_a_single_score():
    with pytest.raises(InputError, match="1-D tensor of M >= 2"):
        inforeg_betas(torch.tensor([0.5]), 1.0)


@example(epoch_traces=[1.0, 1.0, 1.0, 1.0, 1.0], threshold=0.25)  # a tie at k = 1/4
@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.01, 100.0), min_size=1, max_size=30), st.floats(-0.5, 0.5))
def test_prime_window_is_the_official_trace_rule(epoch_traces, threshold):
    """Feed the epochs' traces through epoch_end(); the window of every epoch must be the
    official loop's decision."""
    model = MultiTowerNet(DIMS)
    bal = gb.InfoReg(model, list(model.towers), num_classes=4, threshold=threshold)
    changes = official_changes(epoch_traces)
    for epoch, trace in enumerate(epoch_traces):
        # k equal to the threshold up to rounding (k = 1/4, the official float64 means give
        # 0.25000000000000006): which side is the official code's rounding, not the rule
        if abs(changes[epoch] - threshold) > 1e-9:
            assert bool(bal.in_prime_window) == (changes[epoch] > threshold)
        bal.epoch_trace.fill_(trace)
        bal.epoch_end()


def test_trace_change_is_the_relative_growth_of_the_moving_average():
    traces = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)  # h = 3
    newer, older = traces[1:].mean(), traces[:-1].mean()
    torch.testing.assert_close(inforeg_trace_change(traces), (newer - older) / newer)


def manual_step(model, heads, inputs, target, starts, betas):
    """The final encoder gradients of one step, per parameter, on deep copies: autograd of
    CE(fused) + sum_m CE(head_m(z_m)), plus beta_m (theta - theta_0) on encoder m."""
    model, heads = copy.deepcopy(model), copy.deepcopy(heads)
    features = [tower(x) for tower, x in zip(model.towers, inputs)]
    logits = model.fusion(torch.cat(features, dim=-1))
    head_logits = [head(z) for head, z in zip(heads, features)]
    loss = F.cross_entropy(logits, target) + sum(F.cross_entropy(u, target) for u in head_logits)
    params = [p for tower in model.towers for p in tower.parameters()]
    grads = torch.autograd.grad(loss, params)
    owners = [m for m, tower in enumerate(model.towers) for _ in tower.parameters()]
    final = [
        g + betas[m] * (p.detach() - s) for g, p, s, m in zip(grads, params, starts, owners)
    ]
    scores = [batch_sums(u.detach(), target) / len(target) for u in head_logits]
    return final, scores


@pytest.mark.parametrize("strength", [(0.95, 0.1), (2.0, 3.0)])
def test_final_gradients_against_manual_per_parameter(strength):
    torch.manual_seed(0)
    model = MultiTowerNet(DIMS)
    bal = gb.InfoReg(
        model, list(model.towers), num_classes=4, strength=list(strength), feature_dims=12
    )
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.5)
    starts = [p.detach().clone() for tower in model.towers for p in tower.parameters()]
    trace = 0.0
    for step in range(3):
        inputs, target = make_batch(DIMS, seed=step)
        heads = [bal.heads[name] for name in bal.names]
        with bal.paused():  # not a training step of the balancer
            head_logits = [h(t(x)) for h, t, x in zip(heads, model.towers, inputs)]
        sums = [batch_sums(u.detach(), target) for u in head_logits]
        betas = official_betas(sums[0], sums[1], *strength)
        expected, scores = manual_step(model, heads, inputs, target, starts, betas)
        opt.zero_grad()
        bal.loss(model(*inputs), target).backward()
        bal.after_backward()
        assert [float(s) for s in bal.scores.values()] == pytest.approx(scores, rel=1e-5)
        assert [float(b) for b in bal.coefficients.values()] == pytest.approx(betas, rel=1e-5)
        got = [p.grad for tower in model.towers for p in tower.parameters()]
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
        # The trace: the mean squared final gradient of each weight matrix, summed.
        trace += sum(float((g.double() ** 2).mean()) for g in got if g.dim() >= 2)
        opt.step()
    assert float(bal.epoch_trace) == pytest.approx(trace, rel=1e-5)
    bal.epoch_end()
    assert float(bal.traces[-1]) == pytest.approx(trace, rel=1e-5)
    assert float(bal.trace_change) == pytest.approx(1.0) and bool(bal.in_prime_window)
    for tower in model.towers:  # the new epoch starts from the current parameters
        for p in tower.parameters():
            assert any(torch.equal(p, s) for s in bal.state_dict().values())


def test_outside_the_prime_window_it_trains_as_multiloss():
    torch.manual_seed(0)
    model = MultiTowerNet(DIMS)
    twin = copy.deepcopy(model)
    bal = gb.InfoReg(model, list(model.towers), num_classes=4, strength=5.0, feature_dims=12)
    ref = gb.MultiLoss(twin, list(twin.towers), num_classes=4, feature_dims=12)
    ref.heads.load_state_dict(bal.heads.state_dict())
    bal.epoch_trace.fill_(1.0)
    bal.epoch_end()  # change 1: in the window
    bal.traces.copy_(torch.ones_like(bal.traces))  # a flat trace: growth 0
    bal.epoch_end()
    # The last h + 1 traces are [1, ..., 1, 0]: growth (0 - 1) / 9.
    assert not bool(bal.in_prime_window)
    assert float(bal.trace_change) == pytest.approx(-1 / 9)
    opts = [torch.optim.SGD([*m.parameters(), *b.parameters()], lr=0.5) for m, b in
            ((model, bal), (twin, ref))]  # fmt: skip
    for step in range(3):
        inputs, target = make_batch(DIMS, seed=step)
        for m, b, opt in ((model, bal, opts[0]), (twin, ref, opts[1])):
            opt.zero_grad()
            b.loss(m(*inputs), target).backward()
            b.after_backward()
            opt.step()
        assert all(float(k) == 0.0 for k in bal.coefficients.values())
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_disabled_or_outside_the_window_gives_zero_betas():
    for options in ({"enabled": False}, {"window": (1, None)}):
        model = MultiTowerNet(DIMS)
        bal = gb.InfoReg(model, list(model.towers), num_classes=4, **options)
        inputs, target = make_batch(DIMS)
        bal.loss(model(*inputs), target).backward()
        bal.after_backward()
        assert all(float(k) == 0.0 for k in bal.coefficients.values())
        assert float(bal.epoch_trace) > 0  # the trace is still read


def test_three_modalities_regulate_those_ahead_of_the_others():
    torch.manual_seed(1)
    dims = (5, 7, 3)
    model = MultiTowerNet(dims)
    bal = gb.InfoReg(model, list(model.towers), num_classes=4, gap_scale=2.0)
    inputs, target = make_batch(dims)
    bal.loss(model(*inputs), target).backward()
    scores = torch.stack(list(bal.scores.values()))
    expected = inforeg_betas(scores, 0.95, 2.0)
    torch.testing.assert_close(torch.stack(list(bal.coefficients.values())), expected)
    assert (expected > 0).any() and (expected == 0).any()


def test_trace_encoders_restricts_the_trace():
    torch.manual_seed(0)
    model = MultiTowerNet(DIMS)
    bal = gb.InfoReg(model, list(model.towers), num_classes=4, trace_encoders=["towers_0"])
    inputs, target = make_batch(DIMS)
    bal.loss(model(*inputs), target).backward()
    bal.after_backward()
    expected = sum(float((p.grad.double() ** 2).mean()) for p in model.towers[0].parameters()
                   if p.dim() >= 2)  # fmt: skip
    assert float(bal.epoch_trace) == pytest.approx(expected, rel=1e-5)


def test_state_dict_holds_the_epoch_start_and_resumes_exactly():
    torch.manual_seed(0)
    model = MultiTowerNet(DIMS)
    bal = gb.InfoReg(model, list(model.towers), num_classes=4, feature_dims=12)
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.5)
    for step in range(2):
        inputs, target = make_batch(DIMS, seed=step)
        opt.zero_grad()
        bal.loss(model(*inputs), target).backward()
        bal.after_backward()
        opt.step()
    state = bal.state_dict()
    encoder_size = sum(p.numel() for tower in model.towers for p in tower.parameters())
    starts = [v for k, v in state.items() if k.startswith("epoch_start_")]
    assert sum(v.numel() for v in starts) == encoder_size  # the memory the copy costs
    twin = copy.deepcopy(model)
    other = gb.InfoReg(twin, list(twin.towers), num_classes=4, feature_dims=12)
    other.load_state_dict(state)
    inputs, target = make_batch(DIMS, seed=5)
    for m, b in ((model, bal), (twin, other)):
        m.zero_grad()
        b.loss(m(*inputs), target).backward()
        b.after_backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"strength": -1.0}, "strength for 'towers_0' must be >= 0"),
        ({"strength": [1.0]}, "strength has 1 entries for 2 encoders"),
        ({"gap_scale": 0.0}, "gap_scale must be > 0"),
        ({"threshold": float("nan")}, "threshold must be finite"),
        ({"trace_epochs": 0}, "trace_epochs must be an int >= 1"),
        ({"trace_encoders": ["x"]}, "trace_encoders must name one or more of the encoders"),
        ({"trace_encoders": "towers_0"}, "trace_encoders must be a list of encoder names"),
    ],
)
def test_bad_options(options, match):
    model = MultiTowerNet(DIMS)
    with pytest.raises(ConfigurationError, match=match):
        gb.InfoReg(model, list(model.towers), num_classes=4, **options)


def test_regression_is_refused():
    model = MultiTowerNet(DIMS, num_classes=1)
    with pytest.raises(ConfigurationError, match="InfoReg does not support task='regression'"):
        gb.InfoReg(model, list(model.towers), task="regression")


def test_after_backward_twice_adds_the_term_once():
    torch.manual_seed(0)
    model = MultiTowerNet(DIMS)
    bal = gb.InfoReg(model, list(model.towers), num_classes=4, strength=3.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # away from the epoch start, so that the term is not 0
    bal.epoch_end()
    with torch.no_grad():
        model.towers[0][0].weight.add_(0.5)
    inputs, target = make_batch(DIMS)
    bal.loss(model(*inputs), target).backward()
    bal.after_backward()
    once = model.towers[0][0].weight.grad.clone()
    trace = bal.epoch_trace.clone()
    bal.after_backward()
    assert torch.equal(model.towers[0][0].weight.grad, once)
    assert torch.equal(bal.epoch_trace, trace)
