"""Which forward a ``loss()`` uses, for every method of ``gb.METHODS``: an abandoned training
forward is superseded by the next one; a capture is only used by the ``loss()`` of the forward
that produced it (never a stale output of an earlier pass); every method sees an encoder's
output as the encoder returned it, also when the model changes it in place afterwards."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from balancer_factories import FACTORIES, INPUT_DIMS, factory_params
from conftest import make_batch
from contract_models import TowerNet

import gradbalance as gb


def twins(name, **options):
    torch.manual_seed(0)
    model = TowerNet(INPUT_DIMS)
    twin = copy.deepcopy(model)
    balancers = []
    for m in (model, twin):
        torch.manual_seed(1)
        balancers.append(FACTORIES[name](m, **options))
    return (model, balancers[0]), (twin, balancers[1])


def step(model, bal, opt, seed):
    """One complete training step; returns the coefficients and the gradients it produced."""
    opt.zero_grad(set_to_none=True)
    inputs, target = make_batch(INPUT_DIMS, seed=seed)
    bal.loss(model(*inputs), target).backward()
    bal.after_backward()
    grads = [p.grad.clone() for p in (*model.parameters(), *bal.parameters()) if p.grad is not None]
    opt.step()
    return bal.coefficients, grads


def sgd(model, bal):
    return torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)


def abandon(model, how, seed):
    """A training forward that never reaches loss()."""
    inputs, _ = make_batch(INPUT_DIMS, batch=2 if how == "dry-run" else 10, seed=seed)
    if how == "exception":
        try:
            model(*inputs)
            raise KeyError("the loop failed between the forward and loss()")
        except KeyError:
            pass
    else:  # a dry run to initialise lazy modules, or a model summary, in train mode
        model(*inputs)


# --- row 6: abandoned forwards ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["exception", "dry-run", "summary"])
@pytest.mark.parametrize("name", factory_params())
def test_abandoned_forward_is_superseded_by_the_next_forward(name, how):
    options = {"feature_dims": None} if how == "dry-run" else {}
    (model, bal), (twin, ref) = twins(name, **options)
    opt, ref_opt = sgd(model, bal), sgd(twin, ref)
    torch.manual_seed(2)  # lazy heads take their initial values from the global generator
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        abandon(model, how, seed=10)
        got = [step(model, bal, opt, seed=0)]
        abandon(model, how, seed=11)
        abandon(model, how, seed=12)
        got.append(step(model, bal, opt, seed=1))
    torch.manual_seed(2)
    expected = [step(twin, ref, ref_opt, seed=s) for s in (0, 1)]
    for (k, grads), (ref_k, ref_grads) in zip(got, expected):
        assert k == ref_k
        assert len(grads) == len(ref_grads)
        assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
    user_warnings = [w for w in caught if issubclass(w.category, UserWarning)]
    assert len(user_warnings) <= 1, [str(w.message) for w in user_warnings]
    assert bal.steps == ref.steps == 2


@pytest.mark.parametrize("name", factory_params())
def test_encoder_called_twice_in_one_forward_is_an_error(name):
    torch.manual_seed(0)
    model = TowerNet(INPUT_DIMS)
    bal = FACTORIES[name](model)
    model.repeat = 0
    inputs, target = make_batch(INPUT_DIMS)
    with pytest.raises(RuntimeError, match="twice"):
        bal.loss(model(*inputs), target)
    model.repeat = None
    bal.loss(model(*inputs), target).backward()  # the next step works
    assert bal.steps == 1


# --- row 7: a capture belongs to its forward -------------------------------------------------


@pytest.mark.parametrize("earlier", ["eval-mode", "no_grad", "training-step"])
@pytest.mark.parametrize("name", factory_params())
def test_loss_after_a_forward_that_skipped_an_encoder_names_it(name, earlier):
    """The earlier pass ran every encoder; its outputs are never used by a later loss()."""
    torch.manual_seed(0)
    model = TowerNet(INPUT_DIMS)
    bal = FACTORIES[name](model)
    inputs, target = make_batch(INPUT_DIMS)
    if earlier == "eval-mode":
        model.eval()
        model(*inputs)
        model.train()
    elif earlier == "no_grad":
        with torch.no_grad():
            model(*inputs)
    else:
        bal.loss(model(*inputs), target).backward()
    model.skip = 1
    logits = model(*make_batch(INPUT_DIMS, batch=6, seed=1)[0])
    with pytest.raises(RuntimeError, match="towers_1"):
        bal.loss(logits, target[:6])
    model.skip = None
    bal.loss(model(*inputs), target).backward()  # the next complete step works


@pytest.mark.parametrize("grad", [True, False], ids=["training", "no_grad"])
@pytest.mark.parametrize("name", factory_params())
def test_features_after_a_forward_that_skipped_an_encoder_name_it(name, grad):
    torch.manual_seed(0)
    model = TowerNet(INPUT_DIMS)
    bal = FACTORIES[name](model)
    inputs, target = make_batch(INPUT_DIMS)
    bal.loss(model(*inputs), target).backward()
    with torch.set_grad_enabled(grad):
        model(*inputs)  # every encoder ran: its features are available
        assert sorted(bal.features()) == bal.names
        model.skip = 1
        model(*inputs)
        with pytest.raises(RuntimeError, match="towers_1"):
            bal.features()
        with pytest.raises(RuntimeError, match="towers_1"):
            bal.unimodal_logits()


# --- row 8: an encoder output changed in place by the model ---------------------------------


@pytest.mark.parametrize("name", factory_params())
def test_every_method_sees_the_encoder_output_before_an_in_place_change(name):
    torch.manual_seed(0)
    model = TowerNet(INPUT_DIMS)
    model.inplace_relu = True
    plain = copy.deepcopy(model)
    bal = FACTORIES[name](model)
    opt = sgd(model, bal)
    inputs, target = make_batch(INPUT_DIMS)
    logits = model(*inputs)
    with torch.no_grad():
        expected = [tower(x) for tower, x in zip(plain.towers, inputs)]
        torch.testing.assert_close(logits, plain(*inputs), rtol=0, atol=0)
    assert any((z < 0).any() for z in expected)  # the ReLU did change them
    features = bal.features()
    for name_, z in zip(bal.names, expected):
        assert torch.equal(features[name_].detach(), z)
    loss = bal.loss(logits, target)
    loss.backward()
    bal.after_backward()
    opt.step()
    assert torch.isfinite(loss)


def test_mlb_with_alpha_zero_equals_multiloss_when_the_model_changes_features_in_place():
    torch.manual_seed(0)
    model = TowerNet(INPUT_DIMS)
    model.inplace_relu = True
    twin = copy.deepcopy(model)
    torch.manual_seed(1)
    mlb = gb.MLB(model, list(model.towers), 4, alpha=0.0, feature_dims=[12, 12])
    torch.manual_seed(1)
    multiloss = gb.MultiLoss(twin, list(twin.towers), 4, feature_dims=[12, 12])
    inputs, target = make_batch(INPUT_DIMS)
    mlb.loss(model(*inputs), target).backward()
    multiloss.loss(twin(*inputs), target).backward()
    for p, q in zip(
        (*model.parameters(), *mlb.parameters()), (*twin.parameters(), *multiloss.parameters())
    ):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6)
