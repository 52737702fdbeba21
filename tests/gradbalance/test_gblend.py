"""Gradient Blending against the formula written plainly and manual computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import MultiTowerNet, make_batch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradbalance as gb
from gradbalance.coefficients import gblend_estimates, gblend_weights


def plain_weights(train_prev, train_now, val_prev, val_now, floor=1e-3):
    """w_k = max(G_k, 0) / max(O_k, floor)^2 normalised to sum 1; uniform without any gain."""
    scores = []
    for tp, tn, vp, vn in zip(train_prev, train_now, val_prev, val_now):
        gain = vp - vn
        change = (vn - tn) - (vp - tp)
        scores.append(max(gain, 0.0) / max(change, floor) ** 2)
    total = sum(scores)
    if total == 0:
        return [1.0 / len(scores)] * len(scores)
    return [s / total for s in scores]


def test_weights_against_the_formula_written_plainly():
    train_prev, train_now = [1.2, 1.5, 1.0], [0.8, 0.9, 0.3]
    val_prev, val_now = [1.3, 1.6, 1.2], [1.0, 1.4, 1.25]
    got = gblend_weights(*(torch.tensor(v) for v in (train_prev, train_now, val_prev, val_now)))
    # G = (0.3, 0.2, -0.05); O = (0.2 - 0.1, 0.5 - 0.1, 0.95 - 0.2) = (0.1, 0.4, 0.75)
    # scores = (0.3 / 0.01, 0.2 / 0.16, 0) = (30, 1.25, 0)
    assert got.tolist() == pytest.approx([30 / 31.25, 1.25 / 31.25, 0.0], rel=1e-5)
    expected = plain_weights(train_prev, train_now, val_prev, val_now)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)  # float32


# Losses on a grid of 1/64 nats (exact in float64, also after the shift below), so the shift
# invariance is exact rather than up to the rounding of tiny differences.
losses = st.lists(st.integers(0, 320).map(lambda i: i / 64), min_size=4, max_size=4)


@settings(max_examples=80, deadline=None)
@given(st.lists(losses, min_size=2, max_size=5), st.floats(1e-4, 0.5))
def test_weight_properties(columns, floor):
    """Non-negative, summing to 1, equal to the plain formula, permutation-equivariant and
    unchanged by adding one constant to a component's four losses."""
    rows = [torch.tensor(r, dtype=torch.float64) for r in zip(*columns)]
    w = gblend_weights(*rows, min_overfitting=floor)
    assert (w >= 0).all() and float(w.sum()) == pytest.approx(1.0)
    assert w.tolist() == pytest.approx(plain_weights(*(r.tolist() for r in rows), floor), rel=1e-6)
    order = torch.randperm(len(columns), generator=torch.Generator().manual_seed(len(columns)))
    assert torch.allclose(
        gblend_weights(*(r[order] for r in rows), min_overfitting=floor), w[order]
    )
    shift = torch.arange(1, len(columns) + 1, dtype=torch.float64) * 0.25
    shifted = gblend_weights(*(r + shift for r in rows), min_overfitting=floor)
    assert torch.allclose(shifted, w, atol=1e-6)


def test_estimates_and_refused_inputs():
    gain, change = gblend_estimates(
        torch.tensor([1.0, 1.0]),
        torch.tensor([0.5, 0.9]),
        torch.tensor([1.2, 1.1]),
        torch.tensor([1.0, 1.3]),
    )
    assert gain.tolist() == pytest.approx([0.2, -0.2])
    assert change.tolist() == pytest.approx([0.3, 0.3])
    with pytest.raises(ValueError, match="shape"):
        gblend_weights(torch.ones(2), torch.ones(3), torch.ones(2), torch.ones(2))
    with pytest.raises(TypeError):
        gblend_weights([1.0, 2.0], torch.ones(2), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="min_overfitting"):
        gblend_weights(torch.ones(2), torch.ones(2), torch.ones(2), torch.ones(2), 0.0)


def _balancer(**options):
    torch.manual_seed(0)
    model = MultiTowerNet((5, 7))
    return model, gb.GBlend(
        model, list(model.towers), num_classes=4, feature_dims=[12, 12], **options
    )


def test_collected_losses_weights_and_training_loss():
    """The checkpoint means are the per-component cross-entropies of the batches (training
    losses when each step ran, held-out under no_grad); the weights follow the formula; the
    training loss is the weighted sum."""
    model, bal = _balancer()
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.5)
    means = []
    for epoch in range(2):
        train, count = torch.zeros(3), 0
        for step in range(3):
            inputs, y = make_batch((5, 7), batch=8, seed=10 * epoch + step)
            logits = model(*inputs)
            loss = bal.loss(logits, y)
            heads = bal.unimodal_logits()
            parts = [F.cross_entropy(logits, y)] + [F.cross_entropy(h, y) for h in heads.values()]
            parts = torch.stack(parts).detach()
            weights = torch.stack(list(bal.weights.values()))  # fused, towers_0, towers_1
            assert torch.allclose(loss, (parts * weights).sum())
            train, count = train + parts * 8, count + 8
            opt.zero_grad()
            loss.backward()
            opt.step()
        held_out = torch.zeros(3)
        with torch.no_grad():
            for step in range(2):
                inputs, y = make_batch((5, 7), batch=5, seed=100 + step)
                logits = model(*inputs)
                bal.loss(logits, y)
                heads = bal.unimodal_logits()
                parts = [F.cross_entropy(logits, y)] + [
                    F.cross_entropy(h, y) for h in heads.values()
                ]
                held_out += torch.stack(parts) * 5
        means.append((train / count, held_out / 10))
        bal.epoch_end()
        assert torch.allclose(bal.previous, torch.stack(means[-1]), atol=1e-6)
    (t0, v0), (t1, v1) = means
    expected = plain_weights(t0.tolist(), t1.tolist(), v0.tolist(), v1.tolist())
    assert [float(w) for w in bal.weights.values()] == pytest.approx(expected, rel=1e-4)
    assert [float(k) for k in bal.coefficients.values()] == pytest.approx(expected[1:], rel=1e-4)
    assert bal.checkpoints == 2


def test_uniform_until_two_checkpoints_and_every():
    model, bal = _balancer(every=2)
    uniform = [1 / 3] * 3
    train = [[1.0, 1.2, 1.4], [0.7, 0.8, 1.3], [0.5, 0.6, 1.2], [0.3, 0.5, 1.1]]
    val = [[1.1, 1.3, 1.5], [0.9, 1.0, 1.4], [0.85, 0.95, 1.3], [0.8, 0.9, 1.25]]
    for epoch in range(4):
        bal.epoch_end(train_losses=train[epoch], val_losses=dict(zip(bal.components, val[epoch])))
        got = [float(w) for w in bal.weights.values()]
        if epoch < 3:  # checkpoints at the end of epochs 1 and 3 (every=2)
            assert got == pytest.approx(uniform)
    assert got == pytest.approx(plain_weights(train[1], train[3], val[1], val[3]), rel=1e-5)
    bal.enabled = False
    assert [float(w) for w in bal.weights.values()] == pytest.approx(uniform)


def test_degenerate_estimates_are_counted_and_documented_rules_applied():
    _, bal = _balancer()
    bal.epoch_end(train_losses=[1.0, 1.0, 1.0], val_losses=[1.2, 1.2, 1.2])
    # fused: G = 0.2, O = 0.1; towers_0: G = -0.1 (weight 0); towers_1: O = -0.1 (floored)
    bal.epoch_end(train_losses=[0.7, 0.8, 0.9], val_losses=[1.0, 1.3, 1.0])
    expected = plain_weights([1.0] * 3, [0.7, 0.8, 0.9], [1.2] * 3, [1.0, 1.3, 1.0])
    assert bal.loss_weights.tolist() == pytest.approx(expected, rel=1e-5)
    assert bal.degenerate.tolist() == [0, 1, 1]
    assert bal.gains.tolist() == pytest.approx([0.2, -0.1, 0.2])
    assert bal.overfitting.tolist() == pytest.approx([0.1, 0.3, -0.1])
    kept = bal.loss_weights.clone()
    bal.epoch_end(train_losses=[0.6, 0.7, 0.8], val_losses=[1.1, 1.4, 1.1])  # no gain anywhere
    assert torch.equal(bal.loss_weights, kept) and int(bal.kept_estimates) == 1
    bal.epoch_end(train_losses=[math.nan] * 3, val_losses=[1.0] * 3)  # not finite: kept
    assert torch.equal(bal.loss_weights, kept) and int(bal.kept_estimates) == 2


def test_missing_statistics_and_bad_losses_are_refused():
    model, bal = _balancer()
    with pytest.raises(gb.errors.OrderError, match="training steps"):
        bal.epoch_end()
    inputs, y = make_batch((5, 7))
    bal.loss(model(*inputs), y).backward()
    with pytest.raises(gb.errors.OrderError, match="held-out"):
        bal.epoch_end()
    with pytest.raises(gb.errors.InputError, match="fused"):
        bal.epoch_end(val_losses={"towers_0": 1.0, "towers_1": 1.0})
    with pytest.raises(gb.errors.InputError, match="one loss per component"):
        bal.epoch_end(val_losses=[1.0, 1.0])
    fresh = MultiTowerNet((5, 7))
    with pytest.raises(gb.errors.ConfigurationError, match="fused"):
        gb.GBlend(fresh, {"fused": fresh.towers[0], "b": fresh.towers[1]}, num_classes=4)


def test_checkpoint_losses_with_a_graph_leave_the_state_without_one():
    """Losses passed to epoch_end() may carry a graph (the user's own evaluation); the state
    the checkpoint writes must not (it would hold the graph and require a gradient)."""
    _, bal = _balancer()
    for train, val in (([1.0, 1.2, 1.4], [1.1, 1.3, 1.5]), ([0.7, 0.8, 1.3], [0.9, 1.0, 1.4])):
        bal.epoch_end(
            train_losses=torch.tensor(train, requires_grad=True),
            val_losses=torch.tensor(val, requires_grad=True),
        )
    assert not any(buffer.requires_grad for buffer in bal.buffers())
