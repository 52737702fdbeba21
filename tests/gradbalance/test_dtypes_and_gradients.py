"""What every method of ``gb.METHODS`` does with unusual tensors: a first ``loss()`` under
``torch.inference_mode()``, an empty batch, a model cast to another dtype after the balancer,
and gradients that alone are non-finite (``check_gradients=True``)."""

from __future__ import annotations

import pytest
import torch
from balancer_factories import FACTORIES, INPUT_DIMS, factory_params, train_step
from conftest import make_batch
from contract_models import TowerNet


def build(name, **options):
    torch.manual_seed(0)
    model = TowerNet(INPUT_DIMS)
    torch.manual_seed(1)
    bal = FACTORIES[name](model, **options)
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
    return model, bal, opt


def snapshot(*modules):
    return [p.detach().clone() for m in modules for p in m.parameters()]


# --- row 9: a first loss() under inference_mode ----------------------------------------------


@pytest.mark.parametrize("name", factory_params())
def test_first_loss_under_inference_mode_leaves_lazy_heads_trainable(name):
    model, bal, opt = build(name, feature_dims=None)
    inputs, target = make_batch(INPUT_DIMS)
    with torch.inference_mode():  # a sanity validation pass before training
        bal.loss(model(*inputs), target)
    before = snapshot(model, bal)
    for step in range(3):
        loss = train_step(model, bal, opt, *make_batch(INPUT_DIMS, seed=step))
        assert torch.isfinite(loss)
    assert not any(p.is_inference() for p in bal.parameters())
    after = snapshot(model, bal)
    assert len(after) == len(before)
    assert all(not torch.equal(a, b) for a, b in zip(after, before))  # the optimizer updated them


# --- row 10: an empty batch ----------------------------------------------------------------


@pytest.mark.parametrize("grad", [True, False], ids=["training", "no_grad"])
@pytest.mark.parametrize("name", factory_params())
def test_empty_batch_is_a_clear_error(name, grad):
    model, bal, opt = build(name)
    train_step(model, bal, opt, *make_batch(INPUT_DIMS, seed=0))
    state = {k: v.clone() for k, v in bal.state_dict().items() if torch.is_tensor(v)}
    inputs, target = make_batch(INPUT_DIMS, batch=0)
    with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="empty"):
        bal.loss(model(*inputs), target)
    after = bal.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in state.items())
    train_step(model, bal, opt, *make_batch(INPUT_DIMS, seed=1))  # training goes on
    assert bal.steps == 2


# --- row 11: the model cast to another dtype after the balancer ------------------------------


@pytest.mark.parametrize("lazy", [False, True], ids=["dims", "lazy-heads"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["double", "bfloat16"])
@pytest.mark.parametrize("name", factory_params())
def test_heads_follow_the_encoders_dtype(name, dtype, lazy):
    model, bal, _ = build(name, **({"feature_dims": None} if lazy else {}))
    model.to(dtype)
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
    for step in range(3):
        inputs, target = make_batch(INPUT_DIMS, seed=step)
        loss = train_step(model, bal, opt, [x.to(dtype) for x in inputs], target)
        assert torch.isfinite(loss)
    assert all(p.dtype == dtype for p in bal.parameters())
    assert all(torch.isfinite(v) for v in bal.coefficients.values())


# --- row 12: non-finite gradients only -------------------------------------------------------


@pytest.mark.parametrize("name", factory_params())
def test_nonfinite_gradient_raises_naming_the_encoder(name):
    model, bal, opt = build(name, check_gradients=True, nonfinite="raise")
    train_step(model, bal, opt, *make_batch(INPUT_DIMS, seed=0))
    model.poison = 1  # finite features and logits, NaN gradient into towers_1's output
    inputs, target = make_batch(INPUT_DIMS, seed=1)
    with pytest.raises(RuntimeError, match="towers_1"):
        opt.zero_grad()
        bal.loss(model(*inputs), target).backward()
        bal.after_backward()
        bal.loss(model(*inputs), target)  # the error may come at the next loss()


@pytest.mark.parametrize("name", factory_params())
def test_nonfinite_gradient_with_skip_skips_the_optimizer_step(name):
    model, bal, opt = build(name, check_gradients=True, nonfinite="skip")
    train_step(model, bal, opt, *make_batch(INPUT_DIMS, seed=0))
    assert bool(bal.last_step_finite)
    model.poison = 1
    before = snapshot(model, bal)
    opt.zero_grad()
    inputs, target = make_batch(INPUT_DIMS, seed=1)
    loss = bal.loss(model(*inputs), target)
    assert torch.isfinite(loss)  # only the gradients are non-finite
    loss.backward()
    bal.after_backward()
    assert not bool(bal.last_step_finite)
    opt.step()
    after = snapshot(model, bal)
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert int(bal.nonfinite_steps) == 1
    model.poison = None
    train_step(model, bal, opt, *make_batch(INPUT_DIMS, seed=2))  # training goes on
    assert bool(bal.last_step_finite)
    assert all(torch.isfinite(p).all() for p in (*model.parameters(), *bal.parameters()))
    assert not torch.equal(snapshot(model)[0], before[0])
