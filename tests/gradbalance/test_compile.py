"""torch.compile: a model compiled after the balancer is attached trains like eager.

Backend ``aot_eager`` (traces forward and backward like inductor, without generating code:
inductor needs a C++ compiler and ~40 s per model on 2 CPU cores).
"""

from __future__ import annotations

import pytest
import torch
from balancer_factories import ALL_FACTORIES, INPUT_DIMS, factory_params, make_batch_for, train_step
from conftest import MultiTowerNet, make_batch
from torch._dynamo.testing import CompileCounterWithBackend

import gradbalance as gb

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def build(name, seed=0):
    torch.manual_seed(seed)
    model = MultiTowerNet(INPUT_DIMS)
    return model, ALL_FACTORIES[name](model)


@pytest.mark.parametrize("name", factory_params(regression=True))
def test_compiled_model_matches_eager_without_recompiling(name):
    model, bal = build(name)
    eager_model, eager = build(name, seed=1)
    eager_model.load_state_dict(model.state_dict())
    eager.load_state_dict(bal.state_dict())
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)  # after the balancer
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.3)
    eager_opt = torch.optim.SGD([*eager_model.parameters(), *eager.parameters()], lr=0.3)
    seen = []
    for step in range(4):
        inputs, target = make_batch_for(name, INPUT_DIMS, seed=step)
        train_step(compiled, bal, opt, inputs, target)
        train_step(eager_model, eager, eager_opt, inputs, target)
        seen.append(torch.stack(list(bal.coefficients.values())))
        torch.testing.assert_close(seen[-1], torch.stack(list(eager.coefficients.values())))
        for p, q in zip(
            (*model.parameters(), *bal.parameters()),
            (*eager_model.parameters(), *eager.parameters()),
        ):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1  # one graph, no graph break, no recompile
    if name in ("mlb", "mlb_regression"):  # the coefficients did change between the steps
        assert not torch.allclose(seen[0], seen[-1])
    # Evaluation under no_grad compiles its own graph once and leaves the balancer alone.
    before = bal.coefficients
    with torch.no_grad():
        for step in range(2):
            inputs = make_batch(INPUT_DIMS, seed=step)[0]
            bal.loss(compiled(*inputs), make_batch_for(name, INPUT_DIMS)[1])
    assert counter.frame_count == 2
    assert bal.coefficients == before


def test_compiling_before_the_balancer_is_reported():
    model = MultiTowerNet(INPUT_DIMS)
    compiled = torch.compile(model, backend="aot_eager")
    inputs, target = make_batch(INPUT_DIMS)
    compiled(*inputs)  # traced without the balancer's hooks
    bal = gb.MLB(model, list(model.towers), num_classes=4)
    with pytest.raises(RuntimeError, match="compiled before the balancer was created"):
        bal.loss(compiled(*inputs), target)


@pytest.mark.parametrize("name", factory_params())
def test_compiled_two_losses_summed_before_one_backward_match_eager_without_recompiling(name):
    """Two forward + loss() pairs, one backward of the sum: each part scaled by its own
    loss()'s coefficients (as eager with a backward after each loss), one graph throughout."""
    model, bal = build(name)
    eager_model, eager = build(name, seed=1)
    eager_model.load_state_dict(model.state_dict())
    eager.load_state_dict(bal.state_dict())
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.3)
    eager_opt = torch.optim.SGD([*eager_model.parameters(), *eager.parameters()], lr=0.3)
    seen = []
    for step in range(3):
        batches = [make_batch(INPUT_DIMS, seed=10 * step + part) for part in (0, 1)]
        opt.zero_grad()
        eager_opt.zero_grad()
        total = 0
        for inputs, target in batches:
            total = total + bal.loss(compiled(*inputs), target)
            seen.append(torch.stack(list(bal.coefficients.values())))
            eager.loss(eager_model(*inputs), target).backward()
            torch.testing.assert_close(seen[-1], torch.stack(list(eager.coefficients.values())))
        total.backward()
        for p, q in zip(
            (*model.parameters(), *bal.parameters()),
            (*eager_model.parameters(), *eager.parameters()),
        ):
            assert (p.grad is None) == (q.grad is None)
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
        opt.step()
        eager_opt.step()
    assert counter.frame_count == 1  # one graph, no graph break, no recompile
    if name == "mlb":  # the coefficients changed between the two losses of a step
        assert not torch.allclose(seen[0], seen[1])
