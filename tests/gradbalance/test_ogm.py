"""OGM and OGM-GE against manual per-parameter computations."""

from __future__ import annotations

import copy
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import MultiTowerNet, make_batch
from torch import nn

import gradbalance as gb
from gradbalance.coefficients import ogm_coefficients


def plain_grads(model, inputs, target):
    """Gradients of the plain fused cross-entropy on an untouched copy of the model."""
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(*inputs), target).backward()
    return [p.grad.clone() for p in reference.parameters()]


def owner_of(model):
    owner = {}
    for m, tower in enumerate(model.towers):
        for p in tower.parameters():
            owner[id(p)] = m
    return owner


def slice_scores(model, inputs, target):
    """Mean true-class probability of W_m z_m + b/2, written out plainly."""
    with torch.no_grad():
        feats = [t(x) for t, x in zip(model.towers, inputs)]
        w, b = model.fusion.weight, model.fusion.bias
        out, start = [], 0
        for z in feats:
            logits = z @ w[:, start : start + z.shape[1]].T + b / 2
            start += z.shape[1]
            probs = torch.softmax(logits, 1)
            out.append(sum(probs[i, target[i]].item() for i in range(len(target))) / len(target))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_linear_slices_and_gradients_against_manual(seed):
    torch.manual_seed(seed)
    model = MultiTowerNet((5, 7))
    inputs, target = make_batch((5, 7), seed=seed)
    expected_plain = plain_grads(model, inputs, target)
    s = slice_scores(model, inputs, target)
    bal = gb.OGM(model, list(model.towers), num_classes=4, alpha=0.8, fusion_head=model.fusion)
    bal.loss(model(*inputs), target).backward()
    assert [v.item() for v in bal.scores.values()] == pytest.approx(s, rel=1e-5)
    rho_v = s[1] / s[0]
    k = [1.0, 1 - math.tanh(0.8 * rho_v)] if rho_v > 1 else [1 - math.tanh(0.8 / rho_v), 1.0]
    assert [v.item() for v in bal.coefficients.values()] == pytest.approx(k, rel=1e-5)
    owner = owner_of(model)
    for p, g in zip(model.parameters(), expected_plain):
        factor = k[owner[id(p)]] if id(p) in owner else 1.0  # the fused head is not scaled
        torch.testing.assert_close(p.grad, factor * g, atol=1e-5, rtol=1e-5)
    assert list(bal.parameters()) == [] and not bal.heads


def test_probes_when_no_fused_head_is_given(two_tower):
    inputs, target = make_batch((5, 7))
    expected_plain = plain_grads(two_tower, inputs, target)
    bal = gb.OGM(two_tower, list(two_tower.towers), num_classes=4, alpha=1.0, feature_dims=[12, 12])
    probes = copy.deepcopy(bal.heads)
    bal.loss(two_tower(*inputs), target).backward()
    with torch.no_grad():
        feats = [t(x) for t, x in zip(two_tower.towers, inputs)]
        scores = torch.stack(
            [
                torch.softmax(probes[n](z), 1)[torch.arange(10), target].mean()
                for n, z in zip(bal.names, feats)
            ]
        )
    torch.testing.assert_close(torch.stack(list(bal.scores.values())), scores)
    k = ogm_coefficients(scores, 1.0)
    torch.testing.assert_close(torch.stack(list(bal.coefficients.values())), k)
    owner = owner_of(two_tower)
    for p, g in zip(two_tower.parameters(), expected_plain):  # probes never reach the encoders
        factor = k[owner[id(p)]].item() if id(p) in owner else 1.0
        torch.testing.assert_close(p.grad, factor * g, atol=1e-6, rtol=1e-5)
    for name, z in zip(bal.names, feats):  # each probe is trained by its own loss only
        head = copy.deepcopy(probes[name])
        F.cross_entropy(head(z), target).backward()
        torch.testing.assert_close(bal.heads[name].weight.grad, head.weight.grad)


class SplitNet(nn.Module):
    """Two towers and a head exposing modality_logits (MMCosine or a LateLinear-like head)."""

    def __init__(self, head):
        super().__init__()
        self.towers = nn.ModuleList([nn.Linear(5, 6), nn.Linear(7, 4)])
        self.head = head

    def forward(self, a, v):
        return self.head(self.towers[0](a), self.towers[1](v))


class BlockLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(6, 4, bias=False), nn.Linear(4, 4, bias=False)])
        self.bias = nn.Parameter(torch.randn(4))

    def modality_logits(self, a, v):
        return [self.blocks[0](a) + self.bias / 2, self.blocks[1](v) + self.bias / 2]

    def forward(self, a, v):
        return sum(self.modality_logits(a, v))


@pytest.mark.parametrize("head", ["mmcosine", "blocks"])
def test_heads_with_modality_logits(head):
    torch.manual_seed(0)
    fusion = gb.MMCosineHead([6, 4], 4, scale=5.0) if head == "mmcosine" else BlockLinear()
    model = SplitNet(fusion)
    inputs, target = make_batch((5, 7))
    bal = gb.OGM(model, list(model.towers), num_classes=4, alpha=0.5, fusion_head=model.head)
    bal.loss(model(*inputs), target).backward()
    with torch.no_grad():
        parts = fusion.modality_logits(*(t(x) for t, x in zip(model.towers, inputs)))
    scores = torch.stack([torch.softmax(p, 1).gather(1, target[:, None]).mean() for p in parts])
    torch.testing.assert_close(torch.stack(list(bal.scores.values())), scores)
    torch.testing.assert_close(
        torch.stack(list(bal.coefficients.values())), ogm_coefficients(scores, 0.5)
    )
    torch.testing.assert_close(bal.modality_slices()["towers_1"], parts[1])


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3))
            for c in (1, 2)
        )
        self.fusion = nn.Linear(8, 3)

    def forward(self, a, v):
        feats = [t(x).mean((2, 3)) for t, x in zip(self.towers, (a, v))]
        return self.fusion(torch.cat(feats, 1))


@pytest.mark.parametrize("choice", ["conv", "callable"])
def test_conv_only_scales_just_the_4d_kernels(choice):
    torch.manual_seed(0)
    model = ConvNet()
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(6, 1, 7, 7, generator=g), torch.randn(6, 2, 7, 7, generator=g)]
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    expected_plain = plain_grads(model, inputs, target)
    parameters = (
        "conv" if choice == "conv" else (lambda name, p: name.endswith("weight") and p.dim() == 4)
    )
    bal = gb.OGM(
        model,
        list(model.towers),
        num_classes=3,
        alpha=1.0,
        parameters=parameters,
        fusion_head=model.fusion,
    )
    bal.loss(model(*inputs), target).backward()
    k = [v.item() for v in bal.coefficients.values()]
    assert min(k) < 0.9
    owner = owner_of(model)
    scaled = 0
    for p, g_plain in zip(model.parameters(), expected_plain):
        factor = k[owner[id(p)]] if id(p) in owner and p.dim() == 4 else 1.0
        scaled += factor != 1.0
        torch.testing.assert_close(p.grad, factor * g_plain, atol=1e-6, rtol=1e-5)
    assert scaled == 2
    bal.remove()
    model.zero_grad()
    F.cross_entropy(model(*inputs), target).backward()
    for p, g_plain in zip(model.parameters(), expected_plain):
        torch.testing.assert_close(p.grad, g_plain, rtol=0, atol=0)


@pytest.mark.parametrize("unit", ["step", "epoch"])
def test_modulation_window(two_tower, unit):
    inputs, target = make_batch((5, 7))
    bal = gb.OGM(
        two_tower,
        list(two_tower.towers),
        num_classes=4,
        alpha=2.0,
        fusion_head=two_tower.fusion,
        window=(1, 2),
        window_unit=unit,
    )
    modulated = []
    for _ in range(4):
        bal.loss(two_tower(*inputs), target)
        modulated.append(any(v.item() != 1.0 for v in bal.coefficients.values()))
        if unit == "epoch":
            bal.epoch_end()
    assert modulated == [False, True, True, False]
    assert len(bal.history["towers_0"]["scores"]) == 4
    bal.enabled = False
    bal.window = (0, None)
    bal.loss(two_tower(*inputs), target)
    assert all(v.item() == 1.0 for v in bal.coefficients.values())


def test_errors_leave_no_hooks():
    model = MultiTowerNet((5, 7, 3))
    with pytest.raises(ValueError, match="alpha"):
        gb.OGM(model, list(model.towers), num_classes=4, alpha=-1.0)
    with pytest.raises(TypeError, match="fusion_head"):
        gb.OGM(model, list(model.towers)[:2], num_classes=4, fusion_head=nn.ReLU())
    with pytest.raises(ValueError, match="parameters"):
        gb.OGM(model, list(model.towers)[:2], num_classes=4, parameters="all")
    with pytest.raises(ValueError, match="window"):
        gb.OGM(model, list(model.towers)[:2], num_classes=4, window=(3, 1))
    assert not any(t._forward_hooks for t in model.towers)


def test_linear_head_width_mismatch():
    model = MultiTowerNet((5, 7))
    bal = gb.OGM(model, list(model.towers), num_classes=4, fusion_head=nn.Linear(10, 4))
    inputs, target = make_batch((5, 7))
    with pytest.raises(ValueError, match="widths"):
        bal.loss(model(*inputs), target)


def test_validation_leaves_state_untouched(two_tower):
    inputs, target = make_batch((5, 7))
    bal = gb.OGM(two_tower, list(two_tower.towers), num_classes=4, fusion_head=two_tower.fusion)
    with torch.no_grad():
        loss = bal.loss(two_tower(*inputs), target)
    torch.testing.assert_close(loss, F.cross_entropy(two_tower(*inputs), target))
    assert bal.steps == 0 and all(v.item() == 1.0 for v in bal.coefficients.values())


# -- OGM-GE ---------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """The audio tower has a single-element bias (no noise: its std is undefined)."""

    def __init__(self):
        super().__init__()
        self.towers = nn.ModuleList(
            [nn.Sequential(nn.Linear(5, 1), nn.Linear(1, 4)), nn.Linear(7, 4)]
        )
        self.fusion = nn.Linear(8, 4)

    def forward(self, a, v):
        return self.fusion(torch.cat([self.towers[0](a), self.towers[1](v)], 1))


@pytest.mark.parametrize("seed", [0, 7])
def test_ogm_ge_noise_against_manual(seed):
    torch.manual_seed(seed)
    model = TinyNet()
    inputs, target = make_batch((5, 7), seed=seed)
    expected_plain = plain_grads(model, inputs, target)
    bal = gb.OGMGE(
        model, list(model.towers), num_classes=4, alpha=0.8, seed=seed, fusion_head=model.fusion
    )
    bal.loss(model(*inputs), target).backward()
    bal.after_backward()
    k = [v.item() for v in bal.coefficients.values()]
    assert min(k) < 0.9
    generator = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    expected = {id(p): g for p, g in zip(params, expected_plain)}  # fusion: untouched
    for m, tower in enumerate(model.towers):
        # The official update, g <- k g + N(0, (std(g) + 1e-8)^2), with the draws of each
        # modality taken as one block in parameter order.
        noised = [
            (p, g)
            for p, g in zip(params, expected_plain)
            if any(p is q for q in tower.parameters())
        ]
        for p, g in noised:
            expected[id(p)] = k[m] * g
        big = [(p, g) for p, g in noised if g.numel() > 1]
        draws = torch.randn(sum(g.numel() for _, g in big), generator=generator)
        for (p, g), noise in zip(big, draws.split([g.numel() for _, g in big])):
            std = g.std().item() + 1e-8
            expected[id(p)] = expected[id(p)] + noise.view_as(g) * std
        assert len(big) == len(noised) - (m == 0)  # the (1,)-bias of the audio tower: none
    for p in params:
        torch.testing.assert_close(p.grad, expected[id(p)], atol=1e-5, rtol=1e-5)


def test_ogm_ge_noise_once_per_step_only_in_window_and_not_on_non_finite(two_tower):
    inputs, target = make_batch((5, 7))
    bal = gb.OGMGE(
        two_tower,
        list(two_tower.towers),
        num_classes=4,
        fusion_head=two_tower.fusion,
        window=(0, 0),
        window_unit="step",
    )
    bal.loss(two_tower(*inputs), target).backward()
    first = two_tower.towers[0][0].weight
    first.grad[0, 0] = float("inf")
    before = [p.grad.clone() for p in two_tower.parameters()]
    bal.after_backward()
    after = [p.grad.clone() for p in two_tower.parameters()]
    assert torch.equal(after[0], before[0])  # a non-finite gradient is left alone
    changed = [not torch.equal(a, b) for a, b in zip(after, before)]
    assert changed == [False, True, True, True, True, True, True, True, False, False]
    bal.after_backward()  # a second call in the same step adds nothing
    assert all(torch.equal(p.grad, a) for p, a in zip(two_tower.parameters(), after))
    two_tower.zero_grad()
    bal.loss(two_tower(*inputs), target).backward()  # step 1: outside the window
    plain = [p.grad.clone() for p in two_tower.parameters()]
    bal.after_backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(two_tower.parameters(), plain))


def test_ogm_ge_conv_mode_noises_only_the_kernels():
    torch.manual_seed(0)
    model = ConvNet()
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(6, 1, 7, 7, generator=g), torch.randn(6, 2, 7, 7, generator=g)]
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    bal = gb.OGMGE(
        model, list(model.towers), num_classes=3, parameters="conv", fusion_head=model.fusion
    )
    bal.loss(model(*inputs), target).backward()
    before = [p.grad.clone() for p in model.parameters()]
    bal.after_backward()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.grad, b) == (p.dim() != 4)


def test_ogm_ge_warns_when_after_backward_is_never_called(two_tower):
    inputs, target = make_batch((5, 7))
    bal = gb.OGMGE(two_tower, list(two_tower.towers), num_classes=4, fusion_head=two_tower.fusion)
    with pytest.warns(UserWarning, match="after_backward"):
        for _ in range(51):
            bal.loss(two_tower(*inputs), target)


def _distributed_worker(rank, world, path, results):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"file://{path}")
    outcome = {}
    for sync in ("local", "global"):
        torch.manual_seed(0)
        model = MultiTowerNet((5, 7))
        bal = gb.OGMGE(
            model,
            list(model.towers),
            num_classes=4,
            alpha=1.0,
            seed=11,
            fusion_head=model.fusion,
            sync=sync,
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for step in range(3):
            inputs, target = make_batch((5, 7), seed=100 * rank + step)  # rank-local data
            opt.zero_grad()
            bal.loss(model(*inputs), target).backward()
            for p in model.parameters():  # what DDP has done when backward() returns
                dist.all_reduce(p.grad)
                p.grad /= world
            bal.after_backward()
            opt.step()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        ks = torch.stack([bal.coefficient_buffer(n) for n in bal.names])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        all_k = [torch.zeros_like(ks) for _ in range(world)]
        dist.all_gather(gathered, flat)
        dist.all_gather(all_k, ks)
        outcome[sync] = (torch.equal(gathered[0], gathered[1]), torch.equal(all_k[0], all_k[1]))
        bal.remove()
    if rank == 0:
        results.put(outcome)
    dist.barrier()  # no rank tears its connections down while another still uses them
    dist.destroy_process_group()


@pytest.mark.slow
def test_ogm_ge_replicas_stay_identical_across_ranks(tmp_path):
    """Two gloo ranks with rank-local data. After the gradient all-reduce (done by hand here,
    as DDP has done it when backward() returns; constructing DDP costs 5 s of imports per
    process) the noise comes from the balancer's own generator: the replicas stay bitwise
    equal, also with rank-local (sync="local") coefficients."""
    import torch.multiprocessing as mp

    here = os.path.dirname(os.path.abspath(__file__))
    for tests_dir in (here, os.path.dirname(here)):
        if tests_dir not in sys.path:
            sys.path.insert(0, tests_dir)
    # spawn: a fork of this process (threads of torch, OpenBLAS, xdist) could deadlock.
    results = mp.get_context("spawn").Queue()
    mp.start_processes(
        _distributed_worker,
        args=(2, str(tmp_path / "store"), results),
        nprocs=2,
        start_method="spawn",
    )
    outcome = results.get(timeout=120)
    assert outcome["local"] == (True, False)  # coefficients differ per rank, replicas do not
    assert outcome["global"] == (True, True)
