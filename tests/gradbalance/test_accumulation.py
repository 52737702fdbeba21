"""Gradient accumulation: each micro-batch's gradient is scaled by its own coefficients, once.

The accumulated gradient after two micro-batches must equal the sum of the two gradients
computed separately (each from zero, with the balancer in the state it had before that
micro-batch). The official post-hoc ``p.grad *= k`` instead rescales the first micro-batch's
gradient with the second one's k.
"""

from __future__ import annotations

import pytest
import torch
from balancer_factories import FACTORIES, INPUT_DIMS, factory_params
from conftest import MultiTowerNet, make_batch


def build(name, seed=0):
    torch.manual_seed(seed)
    model = MultiTowerNet(INPUT_DIMS)
    return model, FACTORIES[name](model)


def clone(name, model, bal):
    """A fresh model and balancer in the same state (hooks of their own, zero gradients)."""
    twin_model, twin = build(name, seed=123)
    twin_model.load_state_dict(model.state_dict())
    twin.load_state_dict(bal.state_dict())
    return twin_model, twin


def gradients(model, bal):
    return [
        p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for p in (*model.parameters(), *bal.parameters())
    ]


def micro_batch(model, bal, inputs, target):
    bal.loss(model(*inputs), target).backward()


@pytest.mark.parametrize("name", factory_params())
def test_accumulated_gradient_is_the_sum_of_the_micro_batch_gradients(name):
    model, bal = build(name)
    first, second = make_batch(INPUT_DIMS, batch=8, seed=1), make_batch(INPUT_DIMS, seed=2)

    expected = []
    for inputs, target in (first, second):
        twin_model, twin = clone(name, model, bal)
        micro_batch(twin_model, twin, inputs, target)
        expected.append((gradients(twin_model, twin), twin.coefficients))
        micro_batch(model, bal, inputs, target)  # the accumulating run

    got = gradients(model, bal)
    for g, e1, e2 in zip(got, expected[0][0], expected[1][0]):
        torch.testing.assert_close(g, e1 + e2, rtol=1e-5, atol=1e-6)
    if name == "mlb":  # the test is only meaningful when k changed between micro-batches
        k1, k2 = expected[0][1], expected[1][1]
        assert any(abs(float(k1[n] - k2[n])) > 1e-3 for n in k1)
