"""AGM against manual per-parameter computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import MultiTowerNet, make_batch
from torch import nn

import gradbalance as gb

DIMS = {2: (5, 7), 3: (5, 7, 3)}


def fusion_of(model):
    return lambda *z: model.fusion(torch.cat(z, 1))


def masked_value(model, feats, present):
    return model.fusion(
        torch.cat([z if i in present else torch.zeros_like(z) for i, z in enumerate(feats)], 1)
    )


def manual_shapley(model, feats):
    """The formulas of the spec, written out: M = 2 and the the MLB authors' later code M = 3."""
    f = lambda *present: masked_value(model, feats, set(present))  # noqa: E731
    if len(feats) == 2:
        full, a, v = f(0, 1), f(0), f(1)
        return [(full - v + a) / 2, (full - a + v) / 2]
    abc = f(0, 1, 2)
    out = []
    for i, j, k in [(0, 1, 2), (1, 0, 2), (2, 0, 1)]:
        out.append((abc - f(j, k)) / 3 + f(i) / 3 + (f(i, j) - f(j)) / 6 + (f(i, k) - f(k)) / 6)
    return out


def manual_losses(phis, target):
    values = []
    for phi in phis:
        p = torch.softmax(phi.detach().double(), 1)
        per_sample = [-math.log(max(p[i, target[i]].item(), 1e-8)) for i in range(len(target))]
        values.append(sum(per_sample) / len(per_sample))
    return values


def manual_k(losses, running, alpha, cap=10.0):
    m = len(losses)
    mean_l, mean_s = sum(losses) / m, sum(running) / m
    out = []
    for l_i, s_i in zip(losses, running):
        r = math.exp((mean_l - l_i) * m / (m - 1))
        o = math.exp((mean_s - s_i) * m / (m - 1))
        out.append(math.exp(alpha * min(o - r, cap)))
    return out


def manual_grads(model, inputs, target, k):
    """sum_m k_m * (dphi_m/dtheta)^T G with G = dCE(sum phi)/d(sum phi): plain autograd."""
    feats = [t(x) for t, x in zip(model.towers, inputs)]
    phis = manual_shapley(model, feats)
    combined = sum(phis).detach().requires_grad_(True)
    (g_out,) = torch.autograd.grad(F.cross_entropy(combined, target), combined)
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for k_m, phi in zip(k, phis):
        grads = torch.autograd.grad(phi, params, g_out, retain_graph=True, allow_unused=True)
        total = [t + k_m * (g if g is not None else 0) for t, g in zip(total, grads)]
    return total, phis


@pytest.mark.parametrize("m", [2, 3])
def test_shapley_logits_match_the_written_out_coalitions(m):
    torch.manual_seed(0)
    model = MultiTowerNet(DIMS[m])
    inputs, target = make_batch(DIMS[m])
    bal = gb.AGM(model, list(model.towers), num_classes=4, fusion=fusion_of(model))
    logits = model(*inputs)
    phi = bal.shapley_logits(logits)
    with torch.no_grad():
        expected = manual_shapley(model, [t(x) for t, x in zip(model.towers, inputs)])
    for got, want in zip(phi, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(phi.sum(0), logits, atol=1e-5, rtol=1e-5)  # efficiency


@pytest.mark.parametrize("m", [2, 3])
def test_gradients_and_running_means_against_manual(m):
    torch.manual_seed(1)
    model = MultiTowerNet(DIMS[m])
    reference = copy.deepcopy(model)
    bal = gb.AGM(model, list(model.towers), num_classes=4, alpha=1.3, fusion=fusion_of(model))
    running, count = [0.0] * m, 0
    for step in range(3):
        inputs, target = make_batch(DIMS[m], seed=10 + step)
        model.zero_grad()
        bal.loss(model(*inputs), target).backward()
        with torch.no_grad():
            phis = manual_shapley(reference, [t(x) for t, x in zip(reference.towers, inputs)])
        losses = manual_losses(phis, target)
        k = manual_k(losses, running, 1.3)
        assert [v.item() for v in bal.coefficients.values()] == pytest.approx(k, rel=1e-4)
        assert [v.item() for v in bal.scores.values()] == pytest.approx(
            [math.exp(-x) for x in losses], rel=1e-5
        )
        count += 1
        running = [s + (x - s) / count for s, x in zip(running, losses)]
        assert bal.running_losses.tolist() == pytest.approx(running, rel=1e-5)
        assert int(bal.running_count) == count
    assert max(abs(x - 1) for x in k) > 0.01, "the test needs non-trivial coefficients"
    expected, _ = manual_grads(reference, inputs, target, k)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


class BiasFreeNet(nn.Module):
    """Bias-free linear encoders (encoder(0) = 0) and a linear late-fusion head."""

    def __init__(self, dims, hidden=6, num_classes=4):
        super().__init__()
        self.towers = nn.ModuleList(nn.Linear(d, hidden, bias=False) for d in dims)
        self.fusion = nn.Linear(hidden * len(dims), num_classes)

    def forward(self, *inputs):
        return self.fusion(torch.cat([t(x) for t, x in zip(self.towers, inputs)], 1))


@pytest.mark.parametrize("m", [2, 3])
def test_feature_and_input_masking_agree_with_bias_free_encoders(m):
    torch.manual_seed(2)
    model = BiasFreeNet(DIMS[m])
    twin = copy.deepcopy(model)
    inputs = [None] * m
    by_feature = gb.AGM(
        model, list(model.towers), num_classes=4, alpha=2.0, fusion=fusion_of(model)
    )
    names = [f"towers_{i}" for i in range(m)]

    def forward_masked(masked):
        return twin(*(x * 0 if n in masked else x for n, x in zip(names, inputs)))

    by_input = gb.AGM(
        twin,
        list(twin.towers),
        num_classes=4,
        alpha=2.0,
        masking="input",
        forward_masked=forward_masked,
    )
    for step in range(2):
        inputs[:], target = make_batch(DIMS[m], seed=3 + step)
        for net, bal in ((model, by_feature), (twin, by_input)):
            net.zero_grad()
            bal.loss(net(*inputs), target).backward()
        for a, b in zip(by_feature.coefficients.values(), by_input.coefficients.values()):
            torch.testing.assert_close(a, b)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)
    assert any(abs(v.item() - 1) > 1e-3 for v in by_feature.coefficients.values())


class NoisyNet(nn.Module):
    """BatchNorm in the encoders and dropout in the fusion: train and eval mode differ."""

    def __init__(self):
        super().__init__()
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 6), nn.BatchNorm1d(6)) for d in (5, 7)
        )
        self.fusion = nn.Sequential(nn.Dropout(0.5), nn.Linear(12, 4))

    def forward(self, a, v):
        return self.fusion(torch.cat([self.towers[0](a), self.towers[1](v)], 1))


def test_input_masking_runs_in_eval_mode_and_restores_modes():
    torch.manual_seed(0)
    model = NoisyNet()
    model.towers[1][1].eval()  # a user's frozen BN stays frozen
    inputs, target = make_batch((5, 7))
    seen = []

    def forward_masked(masked):
        seen.append((masked, model.training, model.towers[0][1].training))
        return model(
            *(x * 0 if n in masked else x for n, x in zip(["towers_0", "towers_1"], inputs))
        )

    expected_stats = copy.deepcopy(model)
    expected_stats(*inputs)  # one train-mode forward
    bal = gb.AGM(
        model, list(model.towers), num_classes=4, masking="input", forward_masked=forward_masked
    )
    bal.loss(model(*inputs), target).backward()
    assert sorted(sorted(s[0]) for s in seen) == [["towers_0"], ["towers_1"]]
    assert all(not training and not bn for _, training, bn in seen)  # eval mode
    assert model.training and model.towers[0][1].training and not model.towers[1][1].training
    # The train-mode forward updated the BN statistics; the masked passes did not.
    for bn, want in zip(model.towers, expected_stats.towers):
        torch.testing.assert_close(bn[1].running_mean, want[1].running_mean, rtol=0, atol=0)
        torch.testing.assert_close(bn[1].running_var, want[1].running_var, rtol=0, atol=0)


def test_feature_masking_runs_the_fusion_in_eval_mode():
    torch.manual_seed(0)
    model = NoisyNet()
    inputs, target = make_batch((5, 7))
    calls = []

    def fusion(za, zv):
        calls.append(model.fusion.training)
        return model.fusion(torch.cat([za, zv], 1))

    bal = gb.AGM(model, list(model.towers), num_classes=4, fusion=fusion)
    logits = model(*inputs)
    phi = bal.shapley_logits(logits)
    assert calls == [False, False] and model.fusion.training
    with torch.no_grad():  # dropout off in the masked passes: f(a only) is deterministic
        za, zv = (t(x) for t, x in zip(model.towers, inputs))
        model.fusion.eval()
        only_a = model.fusion(torch.cat([za, torch.zeros_like(zv)], 1))
        only_v = model.fusion(torch.cat([torch.zeros_like(za), zv], 1))
        model.fusion.train()
    torch.testing.assert_close(phi[0], (logits - only_v + only_a) / 2)
    bal.remove()


def test_clip_rule_against_manual():
    torch.manual_seed(0)
    model = MultiTowerNet((5, 7))
    inputs, target = make_batch((5, 7))
    reference = copy.deepcopy(model)
    bal = gb.AGM(
        model,
        list(model.towers),
        num_classes=4,
        alpha=1.0,
        fusion=fusion_of(model),
        clip=True,
        clip_threshold=0.05,
        clip_max_norm=0.1,
    )
    bal.loss(model(*inputs), target).backward()
    before = [p.grad.clone() for p in model.parameters()]
    assert max(p.grad.abs().max().item() for p in model.fusion.parameters()) > 0.05
    bal.after_backward()
    for p, g in zip(reference.parameters(), before):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    # Below the threshold nothing changes.
    bal.clip_threshold = 1e6
    kept = [p.grad.clone() for p in model.parameters()]
    bal.after_backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), kept))


def test_clip_watch_follows_parameters_replaced_after_the_balancer():
    """FSDP2's fully_shard registers new parameter objects under the same names after the
    balancer: the clipping rule watches (and clips) those, found by name."""
    torch.manual_seed(0)
    model = MultiTowerNet((5, 7))
    inputs, target = make_batch((5, 7))
    options = {"clip": True, "clip_threshold": 0.05, "clip_max_norm": 0.1}
    bal = gb.AGM(model, list(model.towers), 4, fusion=fusion_of(model), **options)
    for module in (model.fusion, model.towers[0][0]):
        for name, param in list(module.named_parameters()):
            setattr(module, name, nn.Parameter(param.detach().clone()))
    bal.loss(model(*inputs), target).backward()
    before = [p.grad.clone() for p in model.parameters()]
    assert max(p.grad.abs().max().item() for p in model.fusion.parameters()) > 0.05
    bal.after_backward()
    scale = 0.1 / (torch.linalg.vector_norm(torch.stack([g.norm() for g in before])) + 1e-6)
    for p, g in zip(model.parameters(), before):
        torch.testing.assert_close(p.grad, g * scale)


def test_min_coefficient_max_exponent_and_update_order():
    torch.manual_seed(0)
    model = MultiTowerNet((5, 7))
    inputs, target = make_batch((5, 7))
    bal = gb.AGM(
        model,
        list(model.towers),
        num_classes=4,
        alpha=500.0,
        fusion=fusion_of(model),
        min_coefficient=0.25,
        max_exponent=0.01,
    )
    bal.loss(model(*inputs), target)
    k = [v.item() for v in bal.coefficients.values()]
    assert min(k) == pytest.approx(0.25) and max(k) == pytest.approx(math.exp(5.0))
    bal.remove()
    first = gb.AGM(
        model,
        list(model.towers),
        num_classes=4,
        alpha=1.0,
        fusion=fusion_of(model),
        update_running_first=True,
    )
    first.loss(model(*inputs), target)  # o from the running mean that includes this batch
    assert all(v.item() == pytest.approx(1.0) for v in first.coefficients.values())


def test_disabled_window_and_validation_run_no_masked_pass(two_tower):
    inputs, target = make_batch((5, 7))
    calls = []

    def forward_masked(masked):
        calls.append(masked)
        return two_tower(
            *(x * 0 if n in masked else x for n, x in zip(["towers_0", "towers_1"], inputs))
        )

    bal = gb.AGM(
        two_tower,
        list(two_tower.towers),
        num_classes=4,
        masking="input",
        forward_masked=forward_masked,
        window=(1, 1),
    )
    logits = two_tower(*inputs)
    torch.testing.assert_close(bal.loss(logits, target), F.cross_entropy(logits, target))
    with torch.no_grad():
        bal.loss(two_tower(*inputs), target)
    assert calls == [] and bal.steps == 0 and int(bal.running_count) == 0
    bal.epoch_end()
    bal.loss(two_tower(*inputs), target)
    assert len(calls) == 2 and bal.steps == 1
    bal.enabled = False
    bal.loss(two_tower(*inputs), target)
    assert len(calls) == 2


def test_state_dict_round_trip():
    torch.manual_seed(0)
    model = MultiTowerNet((5, 7))
    twin = copy.deepcopy(model)
    bal = gb.AGM(model, list(model.towers), num_classes=4, alpha=1.5, fusion=fusion_of(model))
    for step in range(3):
        inputs, target = make_batch((5, 7), seed=step)
        bal.loss(model(*inputs), target)
    bal.epoch_end()
    other = gb.AGM(twin, list(twin.towers), num_classes=4, alpha=1.5, fusion=fusion_of(twin))
    other.load_state_dict(bal.state_dict())
    assert int(other.running_count) == 3 and other.steps == 3 and other.epoch == 1
    for key, value in bal.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other.state_dict()[key]), key
    inputs, target = make_batch((5, 7), seed=9)
    for net, balancer in ((model, bal), (twin, other)):
        balancer.loss(net(*inputs), target).backward()
    assert bal.coefficients == other.coefficients
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_errors(two_tower):
    towers = list(two_tower.towers)
    with pytest.raises(ValueError, match="fusion="):
        gb.AGM(two_tower, towers, num_classes=4)
    with pytest.raises(ValueError, match="forward_masked="):
        gb.AGM(two_tower, towers, num_classes=4, masking="input")
    with pytest.raises(ValueError, match="masking"):
        gb.AGM(two_tower, towers, num_classes=4, masking="both", fusion=fusion_of(two_tower))
    with pytest.raises(ValueError, match="min_coefficient"):
        gb.AGM(two_tower, towers, num_classes=4, fusion=fusion_of(two_tower), min_coefficient=-1)
    assert not any(t._forward_hooks for t in towers)
    bal = gb.AGM(two_tower, towers, num_classes=4, fusion=lambda a, v: a[:, :3])
    inputs, target = make_batch((5, 7))
    with pytest.raises(ValueError, match="masked pass returned"):
        bal.loss(two_tower(*inputs), target)


def test_fusion_on_raw_outputs():
    """fusion_inputs="outputs": the fusion gets the encoders' raw outputs (here conv maps)."""
    torch.manual_seed(0)

    class MapNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.towers = nn.ModuleList([nn.Conv2d(1, 3, 3), nn.Conv2d(2, 3, 3)])
            self.fusion = nn.Linear(6, 4)

        def head(self, ma, mv):
            return self.fusion(torch.cat([ma.amax((2, 3)), mv.amax((2, 3))], 1))

        def forward(self, a, v):
            return self.head(self.towers[0](a), self.towers[1](v))

    model = MapNet()
    a, v = torch.randn(4, 1, 5, 5), torch.randn(4, 2, 5, 5)
    bal = gb.AGM(
        model, list(model.towers), num_classes=4, fusion=model.head, fusion_inputs="outputs"
    )
    logits = model(a, v)
    phi = bal.shapley_logits(logits)
    with torch.no_grad():
        ma, mv = model.towers[0](a), model.towers[1](v)
        only_a = model.head(ma, torch.zeros_like(mv))
        only_v = model.head(torch.zeros_like(ma), mv)
    torch.testing.assert_close(phi[1], (logits - only_a + only_v) / 2)
    bal.remove()
