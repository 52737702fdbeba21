"""MMPareto against a manual computation: both gradients at each encoder's output from separate
``autograd.grad`` calls, combined by the rule written plainly."""

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
from gradbalance.coefficients import mmpareto_weights
from gradbalance.methods._pareto import pareto_combination


def plain_combination(g_mm, g_uni, gamma):
    """Wei & Hu's rule on two flat gradients, written out with Python floats."""
    a, b = g_mm.flatten().tolist(), g_uni.flatten().tolist()
    dot = sum(x * y for x, y in zip(a, b))
    n1, n2 = sum(x * x for x in a), sum(y * y for y in b)
    if dot < 0:  # conflict: min-norm point of the segment between the two gradients
        w = min(max((n2 - dot) / (n1 + n2 - 2 * dot), 0.0), 1.0)
    else:
        w = 0.5
    combined = [2 * w * x + 2 * (1 - w) * y for x, y in zip(a, b)]
    norm_sum = math.sqrt(sum((x + y) ** 2 for x, y in zip(a, b)))
    norm_combined = math.sqrt(sum(c * c for c in combined))
    factor = max(norm_sum / norm_combined, 1.0) if norm_combined > 0 else 1.0
    out = torch.tensor([c * factor * gamma for c in combined], dtype=torch.float64)
    return out.view_as(g_mm), dot / math.sqrt(n1 * n2)


@pytest.mark.parametrize("gamma", [1.0, 1.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradients_match_the_manual_combination(seed, gamma):
    torch.manual_seed(seed)
    model = MultiTowerNet((5, 7)).double()
    reference = copy.deepcopy(model)
    bal = gb.MMPareto(model, list(model.towers), num_classes=4, gamma=gamma, feature_dims=[12, 12])
    bal.double()
    heads = copy.deepcopy(bal.heads)
    inputs, y = make_batch((5, 7), batch=9, seed=seed)
    inputs = [x.double() for x in inputs]
    bal.loss(model(*inputs), y).backward()

    outputs = [tower(x) for tower, x in zip(reference.towers, inputs)]
    fused = F.cross_entropy(reference.fusion(torch.cat(outputs, -1)), y)
    expected = {}
    cosines = []
    for index, (name, z) in enumerate(zip(bal.names, outputs)):
        (g_mm,) = torch.autograd.grad(fused, z, retain_graph=True)
        # the library takes the heads' cross-entropy in float32
        head_loss = F.cross_entropy(heads[name](z).float(), y)
        (g_uni,) = torch.autograd.grad(head_loss, z, retain_graph=True)
        combined, cosine = plain_combination(g_mm, g_uni, gamma)
        cosines.append(cosine)
        params = list(reference.towers[index].parameters())
        expected[index] = torch.autograd.grad(z, params, combined, retain_graph=True)
    for index, grads in expected.items():
        for got, want in zip(model.towers[index].parameters(), grads):
            assert torch.allclose(got.grad, want, rtol=1e-9, atol=1e-12)
    assert [float(c) for c in bal.cosines.values()] == pytest.approx(cosines, rel=1e-5)
    assert bal.conflicts.tolist() == [int(c < 0) for c in cosines]
    # the fusion and the heads get their plain gradients (Multi-Loss's)
    plain = F.cross_entropy(reference.fusion(torch.cat(outputs, -1)), y)
    plain.backward()
    for got, want in zip(model.fusion.parameters(), reference.fusion.parameters()):
        assert torch.allclose(got.grad, want.grad)
    for name, z in zip(bal.names, outputs):
        head = heads[name]
        head.zero_grad()
        F.cross_entropy(head(z.detach()).float(), y).backward()
        for got, want in zip(bal.heads[name].parameters(), head.parameters()):
            assert torch.allclose(got.grad, want.grad)


def test_disabled_is_multiloss_and_gamma_scales_agreeing_gradients():
    grads = {}
    for label, options in (("multiloss", None), ("off", {"enabled": False})):
        torch.manual_seed(0)
        model = MultiTowerNet((5, 7))
        if options is None:
            bal = gb.MultiLoss(model, list(model.towers), num_classes=4, feature_dims=[12, 12])
        else:
            bal = gb.MMPareto(
                model, list(model.towers), num_classes=4, feature_dims=[12, 12], **options
            )
        inputs, y = make_batch((5, 7))
        bal.loss(model(*inputs), y).backward()
        grads[label] = [p.grad.clone() for p in (*model.parameters(), *bal.parameters())]
    assert all(torch.equal(a, b) for a, b in zip(grads["multiloss"], grads["off"]))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=6, max_size=6))
def test_weights_are_the_min_norm_point_under_conflict(values):
    g1, g2 = (
        torch.tensor(values[:3], dtype=torch.float64),
        torch.tensor(values[3:], dtype=torch.float64),
    )
    w = mmpareto_weights(g1 @ g2, g1 @ g1, g2 @ g2)
    assert float(w.sum()) == pytest.approx(1.0) and (w >= 0).all() and (w <= 1).all()
    if float(g1 @ g2) >= 0:
        assert w.tolist() == [0.5, 0.5]
        return
    best = (w[0] * g1 + w[1] * g2).norm()
    for t in torch.linspace(0, 1, 101, dtype=torch.float64):
        assert best <= (t * g1 + (1 - t) * g2).norm() + 1e-9


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_reduced_statistics_give_the_global_batch_combination(seed):
    """Under DDP with sync="global" each rank's three sums are averaged over the ranks: the
    batch-flattened output gradient of the global batch is the ranks' blocks concatenated, so
    each rank's combined block equals that block of the one-process combination."""
    g = torch.Generator().manual_seed(seed)
    g_mm, g_uni = torch.randn(10, 6, generator=g), torch.randn(10, 6, generator=g) - 0.3
    full, _ = pareto_combination(g_mm, g_uni, gamma=1.5)
    blocks = [(g_mm[:4], g_uni[:4]), (g_mm[4:], g_uni[4:])]  # unequal per-rank batches
    local = [pareto_combination(a, b, gamma=1.5)[1] for a, b in blocks]
    mean = (local[0] + local[1]) / 2  # what the all-reduce in the backward pass returns
    parts = [pareto_combination(a, b, 1.5, reduce=lambda stats: mean)[0] for a, b in blocks]
    torch.testing.assert_close(torch.cat(parts), full)
    expected, _ = plain_combination(g_mm.double(), g_uni.double(), 1.5)
    torch.testing.assert_close(full.double(), expected, rtol=1e-5, atol=1e-6)
