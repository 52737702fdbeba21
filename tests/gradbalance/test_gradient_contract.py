"""MLB's gradient contract against a manual per-parameter computation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import MultiTowerNet, make_batch

import gradbalance as gb

INPUT_DIMS = {2: (5, 7), 3: (5, 7, 3), 4: (5, 7, 3, 6)}


def build(m, seed=0):
    torch.manual_seed(seed)
    model = MultiTowerNet(INPUT_DIMS[m])
    bal = gb.MLB(
        model,
        encoders=list(model.towers),
        num_classes=4,
        alpha=1.5,
        beta_max=3.0,
        feature_dims=[12] * m,
    )
    return model, bal


def manual_gradients(model, heads, inputs, target, k, scale):
    """Plain backward of each loss separately, then multiply each parameter's grad by hand."""
    features = [t(x) for t, x in zip(model.towers, inputs)]
    fused = model.fusion(torch.cat(features, dim=-1))
    fused_loss = F.cross_entropy(fused, target)
    head_losses = [F.cross_entropy(h(z), target) for h, z in zip(heads, features)]
    params = [*model.parameters(), *(p for h in heads for p in h.parameters())]
    g_fused = torch.autograd.grad(fused_loss, params, allow_unused=True, retain_graph=True)
    g_heads = torch.autograd.grad(sum(head_losses), params, allow_unused=True)
    zero = [torch.zeros_like(p) for p in params]
    g_fused = [g if g is not None else z for g, z in zip(g_fused, zero)]
    g_heads = [g if g is not None else z for g, z in zip(g_heads, zero)]
    owner = {}
    for m, (tower, head) in enumerate(zip(model.towers, heads)):
        for p in tower.parameters():
            owner[id(p)] = ("encoder", m)
        for p in head.parameters():
            owner[id(p)] = ("head", m)
    expected = []
    for p, gf, gh in zip(params, g_fused, g_heads):
        kind, m = owner.get(id(p), ("other", None))
        if kind == "other":
            expected.append(gf + gh)
        elif scale == "all":
            expected.append(k[m] * (gf + gh))
        elif kind == "encoder":
            expected.append(k[m] * gf + gh)
        else:
            expected.append(gh)
    return params, expected


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("scale", ["all", "multimodal"])
def test_gradients_equal_manual_scaling(m, scale):
    model, bal = build(m)
    bal.scale = scale
    reference_model = copy.deepcopy(model)
    reference_heads = [copy.deepcopy(bal.heads[name]) for name in bal.names]
    inputs, target = make_batch(INPUT_DIMS[m])

    loss = bal.loss(model(*inputs), target)
    loss.backward()
    k = [bal.coefficients[name].item() for name in bal.names]
    assert any(abs(v - 1) > 0.05 for v in k), "the test needs non-trivial coefficients"

    ref_params, expected = manual_gradients(
        reference_model, reference_heads, inputs, target, k, scale
    )
    got = [
        *(p.grad for p in model.parameters()),
        *(p.grad for h in bal.heads.values() for p in h.parameters()),
    ]
    assert len(got) == len(expected) == len(ref_params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_coefficients_follow_the_head_scores():
    model, bal = build(3)
    inputs, target = make_batch(INPUT_DIMS[3])
    bal.loss(model(*inputs), target)
    with torch.no_grad():
        features = [t(x) for t, x in zip(model.towers, inputs)]
        scores = torch.stack(
            [
                torch.softmax(bal.heads[n](z), 1)[torch.arange(10), target].mean()
                for n, z in zip(bal.names, features)
            ]
        )
    torch.testing.assert_close(torch.stack(list(bal.scores.values())), scores)
    torch.testing.assert_close(
        torch.stack(list(bal.coefficients.values())),
        gb.coefficients.mlb_coefficients(scores, 1.5, 3.0),
    )


def test_extra_parameters_are_scaled_like_their_encoder():
    torch.manual_seed(0)

    class SplitHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 2)
            self.b = torch.nn.Linear(3, 2)
            self.wa = torch.nn.Linear(4, 3, bias=False)
            self.wb = torch.nn.Linear(2, 3, bias=False)
            self.bias = torch.nn.Parameter(torch.zeros(3))

        def forward(self, xa, xb):
            return self.wa(self.a(xa).repeat(1, 2)) + self.wb(self.b(xb)) + self.bias

    model = SplitHead()
    inputs = [torch.randn(6, 4), torch.randn(6, 3)]
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    plain = copy.deepcopy(model)
    bal = gb.MLB(
        model,
        encoders=[model.a, model.b],
        num_classes=3,
        alpha=2.0,
        feature_dims=[2, 2],
        scale="multimodal",
        unimodal_weight=0.0,
        extra_parameters={"a": [model.wa.weight], "b": [model.wb.weight]},
    )
    bal.loss(model(*inputs), target).backward()
    k = bal.coefficients
    F.cross_entropy(plain(*inputs), target).backward()
    torch.testing.assert_close(model.wa.weight.grad, k["a"] * plain.wa.weight.grad)
    torch.testing.assert_close(model.wb.weight.grad, k["b"] * plain.wb.weight.grad)
    torch.testing.assert_close(model.bias.grad, plain.bias.grad)
    torch.testing.assert_close(model.a.weight.grad, k["a"] * plain.a.weight.grad)


def test_shared_parameter_gets_each_path_scaled():
    """A parameter used inside both encoders receives k_a * g_a + k_v * g_v."""
    torch.manual_seed(0)
    shared = torch.nn.Linear(3, 3)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.audio = torch.nn.Sequential(shared, torch.nn.Linear(3, 3))
            self.video = torch.nn.Sequential(shared, torch.nn.Linear(3, 3))
            self.fusion = torch.nn.Linear(6, 3)

        def forward(self, a, v):
            return self.fusion(torch.cat([self.audio(a), self.video(v)], 1))

    model = Net()
    a, v = torch.randn(5, 3), torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 0, 1])
    bal = gb.MLB(
        model,
        encoders=[model.audio, model.video],
        num_classes=3,
        alpha=3.0,
        feature_dims=[3, 3],
        scale="multimodal",
        unimodal_weight=0.0,
    )
    bal.loss(model(a, v), y).backward()
    k = bal.coefficients
    got = shared.weight.grad.clone()
    bal.remove()
    za, zv = model.audio(a), model.video(v)
    loss = F.cross_entropy(model.fusion(torch.cat([za, zv], 1)), y)
    ga, gv = torch.autograd.grad(loss, [za, zv])
    grad_a = torch.autograd.grad(za, shared.weight, ga, retain_graph=True)[0]
    grad_v = torch.autograd.grad(zv, shared.weight, gv)[0]
    torch.testing.assert_close(got, k["audio"] * grad_a + k["video"] * grad_v)
