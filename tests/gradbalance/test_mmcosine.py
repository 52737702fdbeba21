"""MMCosineHead: the formula, its invariances and its use with balancers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradbalance as gb


def manual_logits(head, features):
    """s * sum_m cos(z_m, w_{m,k}), one cosine at a time."""
    batch = features[0].shape[0]
    out = torch.zeros(batch, head.num_classes, dtype=features[0].dtype)
    for z, w in zip(features, head.weights):
        for i in range(batch):
            for k in range(head.num_classes):
                out[i, k] += head.scale * F.cosine_similarity(z[i], w[k], dim=0, eps=1e-12)
    return out


@pytest.mark.parametrize("dims", [(8, 6), (4, 5, 3)])
def test_logits_and_gradients_match_the_formula(dims):
    torch.manual_seed(0)
    head = gb.MMCosineHead(list(dims), num_classes=3, scale=7.0)
    feats = [torch.randn(5, d, requires_grad=True) for d in dims]
    out = head(*feats)
    expected = manual_logits(head, feats)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    parts = head.modality_logits(*feats)
    assert len(parts) == len(dims)
    torch.testing.assert_close(sum(parts), out, atol=1e-6, rtol=1e-6)
    target = torch.tensor([0, 1, 2, 0, 1])
    params = [*head.parameters(), *feats]
    got = torch.autograd.grad(F.cross_entropy(out, target), params)
    want = torch.autograd.grad(F.cross_entropy(expected, target), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.floats(0.01, 100.0), st.floats(0.01, 100.0), st.integers(0, 2**16))
def test_invariant_to_feature_norms_and_bounded(scale_a, scale_v, seed):
    g = torch.Generator().manual_seed(seed)
    head = gb.MMCosineHead([4, 3], num_classes=5, scale=10.0)
    a, v = torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)
    torch.testing.assert_close(head(a * scale_a, v * scale_v), head(a, v), atol=1e-4, rtol=1e-4)
    assert head(a, v).abs().max() <= 2 * 10.0 + 1e-4


def test_no_bias_and_modality_parameters():
    head = gb.MMCosineHead([4, 3], num_classes=2)
    assert [n for n, _ in head.named_parameters()] == ["weights.0", "weights.1"]
    assert [[p.shape for p in block] for block in head.modality_parameters()] == [
        [torch.Size([2, 4])],
        [torch.Size([2, 3])],
    ]
    assert torch.equal(head(torch.zeros(2, 4), torch.zeros(2, 3)), torch.zeros(2, 2))
    assert "scale=10.0" in repr(head)


def test_errors():
    with pytest.raises(ValueError, match="two modalities"):
        gb.MMCosineHead([4], num_classes=2)
    with pytest.raises(ValueError, match="scale"):
        gb.MMCosineHead([4, 3], num_classes=2, scale=0)
    with pytest.raises(ValueError, match="num_classes"):
        gb.MMCosineHead([4, 3], num_classes=0)
    with pytest.raises(ValueError, match="positive"):
        gb.MMCosineHead([4, 0], num_classes=2)
    head = gb.MMCosineHead([4, 3], num_classes=2)
    with pytest.raises(ValueError, match="2 modalities"):
        head(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="width 3"):
        head(torch.zeros(1, 4), torch.zeros(1, 5))


class CosineNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.towers = nn.ModuleList([nn.Linear(5, 6), nn.Linear(7, 4)])
        self.head = gb.MMCosineHead([6, 4], num_classes=4)

    def forward(self, a, v):
        return self.head(self.towers[0](a), self.towers[1](v))


@pytest.mark.parametrize("method", ["mlb", "ogm", "joint"])
def test_works_with_balancers(method):
    torch.manual_seed(0)
    model = CosineNet()
    reference = copy.deepcopy(model)
    inputs, target = make_batch((5, 7))
    towers = list(model.towers)
    if method == "mlb":
        blocks = model.head.modality_parameters()
        bal = gb.MLB(
            model,
            towers,
            num_classes=4,
            alpha=2.0,
            scale="multimodal",
            unimodal_weight=0.0,
            extra_parameters=dict(zip(["towers_0", "towers_1"], blocks)),
        )
    elif method == "ogm":
        bal = gb.OGM(model, towers, num_classes=4, alpha=1.0, fusion_head=model.head)
    else:
        bal = gb.Joint(model, towers, num_classes=4)
    bal.loss(model(*inputs), target).backward()
    F.cross_entropy(reference(*inputs), target).backward()
    k = [v.item() for v in bal.coefficients.values()]
    if method != "joint":
        assert any(abs(x - 1) > 1e-3 for x in k)
    for m in range(2):  # the encoders (and, for MLB, the weight blocks) carry k_m
        for p, q in zip(model.towers[m].parameters(), reference.towers[m].parameters()):
            torch.testing.assert_close(p.grad, k[m] * q.grad, atol=1e-6, rtol=1e-5)
        factor = k[m] if method == "mlb" else 1.0
        torch.testing.assert_close(
            model.head.weights[m].grad, factor * reference.head.weights[m].grad
        )
