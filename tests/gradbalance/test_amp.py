"""Mixed precision: bf16 autocast on the CPU for every balancer, and the GradScaler path."""

from __future__ import annotations

import pytest
import torch
from balancer_factories import (
    ALL_FACTORIES,
    HEAD_SCORES,
    INPUT_DIMS,
    REGRESSION_FACTORIES,
    factory_params,
    make_batch_for,
)
from conftest import MultiTowerNet


def build(name, seed=0, **options):
    torch.manual_seed(seed)
    model = MultiTowerNet(INPUT_DIMS)
    return model, ALL_FACTORIES[name](model, **options)


def twin_of(name, model, bal, **options):
    twin_model, twin = build(name, seed=99, **options)
    twin_model.load_state_dict(model.state_dict())
    twin.load_state_dict(bal.state_dict())
    return twin_model, twin


REGRESSION_HEADS = ("joint_regression", "multiloss_regression", "mlb_regression")


@pytest.mark.parametrize("name", factory_params(regression=True))
def test_bf16_autocast_keeps_statistics_in_float32(name):
    model, bal = build(name)
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
    for step in range(3):
        inputs, target = make_batch_for(name, INPUT_DIMS, seed=step)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(*inputs)
            loss = bal.loss(logits, target)
            with_heads = name in HEAD_SCORES or name in REGRESSION_HEADS
            heads = bal.unimodal_logits() if with_heads else {}
        assert logits.dtype == torch.bfloat16
        loss.backward()
        bal.after_backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        for values in (bal.coefficients, bal.scores):
            assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in values.values())
        if heads and name in REGRESSION_FACTORIES:
            # The scores (batch MSE) are computed in float32 from the bf16 head predictions.
            expected = [((heads[n].float() - target) ** 2).mean() for n in bal.names]
            torch.testing.assert_close(
                torch.stack(list(bal.scores.values())), torch.stack(expected)
            )
        elif heads:
            # The scores are computed in float32 from the bf16 head logits.
            expected = [
                torch.softmax(heads[n].float(), -1).gather(1, target[:, None]).mean()
                for n in bal.names
            ]
            torch.testing.assert_close(
                torch.stack(list(bal.scores.values())), torch.stack(expected)
            )
    assert len(bal.history[bal.names[0]]["coefficients"]) == 3


@pytest.mark.parametrize("name", factory_params(regression=True))
def test_bf16_statistics_are_close_to_float32(name):
    model, bal = build(name)
    low_model, low = twin_of(name, model, bal)
    inputs, target = make_batch_for(name, INPUT_DIMS, seed=5)
    bal.loss(model(*inputs), target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low.loss(low_model(*inputs), target)
    for full, half in ((bal.scores, low.scores), (bal.coefficients, low.coefficients)):
        torch.testing.assert_close(
            torch.stack(list(half.values())), torch.stack(list(full.values())), rtol=0.05, atol=0.03
        )


def fp16_step(model, bal, opt, scaler, inputs, target):
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = bal.loss(model(*inputs), target)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # per-parameter, non-linear work must see unscaled gradients
    bal.after_backward()
    grads = [p.grad.clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    return grads


@pytest.mark.parametrize("name", factory_params(regression=True))
def test_grad_scaler_path_sees_unscaled_gradients(name):
    """After ``scaler.unscale_``, ``after_backward()`` and the optimizer see the gradients a run
    without loss scaling would see (a method's per-parameter noise or clipping included)."""
    model, bal = build(name)
    plain_model, plain = twin_of(name, model, bal)
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
    plain_opt = torch.optim.SGD([*plain_model.parameters(), *plain.parameters()], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    unit = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=10**6)
    for step in range(2):
        inputs, target = make_batch_for(name, INPUT_DIMS, seed=step)
        scaled = fp16_step(model, bal, opt, scaler, inputs, target)
        reference = fp16_step(plain_model, plain, plain_opt, unit, inputs, target)
        for a, b in zip(scaled, reference):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("name", factory_params(regression=True))
def test_grad_scaler_overflow_step_leaves_the_balancer_unchanged(name):
    """An fp16 overflow: the scaler skips the step, the balancer (nonfinite="skip") keeps its
    coefficients, scores, history and running statistics, and training goes on."""
    model, bal = build(name, nonfinite="skip")
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    fp16_step(model, bal, opt, scaler, *make_batch_for(name, INPUT_DIMS, seed=0))
    before = {
        key: value.clone() for key, value in bal.state_dict().items() if torch.is_tensor(value)
    }
    params = [p.detach().clone() for p in model.parameters()]
    history = len(bal.history[bal.names[0]]["coefficients"])
    scale = scaler.get_scale()

    inputs, target = make_batch_for(name, INPUT_DIMS, seed=1)
    inputs[1] = inputs[1] * 1e6  # overflows float16 in the second tower
    fp16_step(model, bal, opt, scaler, inputs, target)
    assert scaler.get_scale() < scale  # the scaler saw inf and skipped the step
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    for key, value in bal.state_dict().items():
        if key == "nonfinite_steps":
            assert int(value) == int(before[key]) + 1
        elif torch.is_tensor(value) and key in before and not key.startswith("heads"):
            assert torch.equal(value, before[key]), key
    assert len(bal.history[bal.names[0]]["coefficients"]) == history
    assert not bool(bal.last_step_finite)

    fp16_step(model, bal, opt, scaler, *make_batch_for(name, INPUT_DIMS, seed=2))
    assert bool(bal.last_step_finite)
    assert all(torch.isfinite(p).all() for p in model.parameters())
