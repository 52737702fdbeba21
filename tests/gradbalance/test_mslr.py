"""MSLR against manual computations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import MultiTowerNet, make_batch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradbalance as gb


def reference_schedule(accuracies, initial, memory_epochs):
    """The coefficients of each epoch after epoch_end(acc_e), written as the [AGM] code."""
    memory, out = [], []
    for acc in accuracies:
        if len(memory) >= memory_epochs:
            means = [sum(col) / memory_epochs for col in zip(*memory[-memory_epochs:])]
            out.append([a / m * lam for a, m, lam in zip(acc, means, initial)])
        else:
            out.append(list(initial))
        memory.append(acc)
    return out


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 4),
    st.lists(st.tuples(st.floats(0.05, 1.0), st.floats(0.05, 1.0)), min_size=1, max_size=8),
    st.tuples(st.floats(0.5, 1.5), st.floats(0.5, 1.5)),
)
def test_explicit_accuracies_follow_the_memory_rule(memory_epochs, accuracies, initial):
    model = MultiTowerNet((5, 7))
    bal = gb.MSLR(
        model,
        list(model.towers),
        num_classes=4,
        initial=list(initial),
        memory_epochs=memory_epochs,
        feature_dims=[12, 12],
    )
    expected = reference_schedule(accuracies, initial, memory_epochs)
    for epoch, (acc, want) in enumerate(zip(accuracies, expected)):
        bal.epoch_end(accuracies=list(acc) if epoch % 2 else dict(zip(bal.names, acc)))
        got = [v.item() for v in bal.coefficients.values()]
        assert got == pytest.approx(want, rel=1e-5)
    assert bal.epoch == len(accuracies)


@pytest.mark.parametrize("use_head", [False, True])
def test_collected_validation_accuracy_and_gradient_scaling(use_head):
    torch.manual_seed(0)
    model = MultiTowerNet((5, 7))
    reference = copy.deepcopy(model)
    head = model.fusion if use_head else None
    bal = gb.MSLR(
        model,
        list(model.towers),
        num_classes=4,
        initial=[0.8, 1.2],
        memory_epochs=1,
        fusion_head=head,
        feature_dims=[12, 12],
    )
    probes = copy.deepcopy(bal.heads)
    batches = [make_batch((5, 7), batch=9, seed=s) for s in range(3)]
    correct, seen = torch.zeros(2), 0
    for _ in range(2):
        with torch.no_grad():
            for inputs, target in batches:
                bal.loss(model(*inputs), target)
                feats = [t(x) for t, x in zip(model.towers, inputs)]
                if use_head:
                    w, b = model.fusion.weight, model.fusion.bias
                    logits = [feats[0] @ w[:, :12].T + b / 2, feats[1] @ w[:, 12:].T + b / 2]
                else:
                    logits = [probes[n](z) for n, z in zip(bal.names, feats)]
                correct += torch.tensor([(lg.argmax(1) == target).sum().item() for lg in logits])
                seen += len(target)
        accuracies = correct / seen
        previous = bal.accuracies.clone()
        bal.epoch_end()
        torch.testing.assert_close(bal.accuracies, accuracies)
        correct, seen = torch.zeros(2), 0
    expected_k = accuracies / previous * torch.tensor([0.8, 1.2])
    torch.testing.assert_close(torch.stack(list(bal.coefficients.values())), expected_k)
    assert bal.steps == 0  # validation never counts as a training step
    inputs, target = batches[0]
    bal.loss(model(*inputs), target).backward()
    F.cross_entropy(reference(*inputs), target).backward()
    owner = {id(p): m for m, t in enumerate(model.towers) for p in t.parameters()}
    for p, q in zip(model.parameters(), reference.parameters()):
        factor = expected_k[owner[id(p)]].item() if id(p) in owner else 1.0
        torch.testing.assert_close(p.grad, factor * q.grad, atol=1e-6, rtol=1e-5)
    assert [v.item() for v in bal.scores.values()] == pytest.approx(accuracies.tolist())


def test_initial_factors_before_the_memory_fills_and_disabled(two_tower):
    inputs, target = make_batch((5, 7))
    bal = gb.MSLR(
        two_tower, list(two_tower.towers), num_classes=4, initial={"towers_0": 0.9, "towers_1": 1.1}
    )
    bal.loss(two_tower(*inputs), target)
    assert [v.item() for v in bal.coefficients.values()] == pytest.approx([0.9, 1.1])
    bal.enabled = False
    bal.loss(two_tower(*inputs), target)
    assert [v.item() for v in bal.coefficients.values()] == [1.0, 1.0]


def test_errors(two_tower):
    towers = list(two_tower.towers)
    with pytest.raises(ValueError, match="memory_epochs"):
        gb.MSLR(two_tower, towers, num_classes=4, memory_epochs=0)
    with pytest.raises(ValueError, match="initial"):
        gb.MSLR(two_tower, towers, num_classes=4, initial=[1.0, -1.0])
    assert not any(t._forward_hooks for t in towers)
    bal = gb.MSLR(two_tower, towers, num_classes=4)
    with pytest.raises(RuntimeError, match="no validation accuracy"):
        bal.epoch_end()
    with pytest.raises(ValueError, match="one value per encoder"):
        bal.epoch_end(accuracies=[0.5])
    with pytest.raises(ValueError, match="miss"):
        bal.epoch_end(accuracies={"towers_0": 0.5})


def test_state_dict_round_trip():
    torch.manual_seed(0)
    model = MultiTowerNet((5, 7))
    twin = copy.deepcopy(model)
    options = dict(num_classes=4, initial=[0.9, 1.1], memory_epochs=2, feature_dims=[12, 12])
    bal = gb.MSLR(model, list(model.towers), **options)
    inputs, target = make_batch((5, 7))
    for acc in ([0.4, 0.3], [0.5, 0.35], [0.55, 0.3]):
        bal.loss(model(*inputs), target)
        bal.epoch_end(accuracies=acc)
    with torch.no_grad():
        bal.loss(model(*inputs), target)  # half-collected validation
    other = gb.MSLR(twin, list(twin.towers), **options)
    other.load_state_dict(bal.state_dict())
    assert other.memory_size == 2 and other.epoch == 3
    for key, value in bal.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other.state_dict()[key]), key
    for b in (bal, other):
        b.epoch_end()
    assert bal.coefficients == other.coefficients
    for net, b in ((model, bal), (twin, other)):
        b.loss(net(*inputs), target).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)
