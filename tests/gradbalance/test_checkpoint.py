"""Checkpoint and resume: bitwise the same training as the uninterrupted run.

Model, optimizer (Adam, with state) and balancer (heads, coefficients, running statistics,
step counters, random generators) are saved mid-training; a fresh process-like
setup (new objects, other random initial values) loads them and continues.
"""

from __future__ import annotations

import io

import pytest
import torch
from balancer_factories import FACTORIES, INPUT_DIMS, factory_params, flat_state, train_step
from conftest import MultiTowerNet, make_batch

BEFORE, AFTER = 3, 4


@pytest.fixture(autouse=True)
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def setup(name, seed, **options):
    torch.manual_seed(seed)
    model = MultiTowerNet(INPUT_DIMS)
    bal = FACTORIES[name](model, **options)
    opt = torch.optim.Adam([*model.parameters(), *bal.parameters()], lr=0.01)
    return model, bal, opt


def steps(model, bal, opt, start, stop):
    for step in range(start, stop):
        train_step(model, bal, opt, *make_batch(INPUT_DIMS, seed=step))
        if step % 2 == 1:
            inputs, target = make_batch(INPUT_DIMS, seed=100 + step)
            with torch.no_grad():  # validation (MSLR's accuracies come from it)
                bal.loss(model(*inputs), target)
            bal.epoch_end()


VARIANTS = [pytest.param(p.values[0], {}, id=p.id) for p in factory_params()]
VARIANTS.append(pytest.param("mlb", {"feature_dims": None}, id="mlb-lazy-heads"))


@pytest.mark.parametrize("name, options", VARIANTS)
def test_resume_is_bitwise_identical(name, options):
    model, bal, opt = setup(name, 0, **options)
    steps(model, bal, opt, 0, BEFORE)
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "balancer": bal.state_dict()},
        buffer,
    )
    steps(model, bal, opt, BEFORE, BEFORE + AFTER)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    resumed_model, resumed, resumed_opt = setup(name, 1, **options)  # other initial values
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["balancer"])  # before the optimizer: lazy heads
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    assert resumed.steps == BEFORE
    steps(resumed_model, resumed, resumed_opt, BEFORE, BEFORE + AFTER)

    assert torch.equal(flat_state(resumed_model, resumed), flat_state(model, bal))
    assert resumed.steps == bal.steps
    # The history is part of the state: the resumed run's history is the uninterrupted
    # run's whole history, bitwise, with the same step indices and epochs.
    for name_ in bal.names:
        for quantity in ("coefficients", "scores"):
            expected = bal.history[name_][quantity]
            assert torch.equal(resumed.history[name_][quantity], expected), quantity
    assert torch.equal(resumed.history.steps, bal.history.steps)
    assert torch.equal(resumed.history.epochs, bal.history.epochs)
    assert all(
        torch.equal(a, b) for a, b in zip(resumed.coefficients.values(), bal.coefficients.values())
    )


def test_state_dict_holds_the_counters():
    model, bal, opt = setup("mlb", 0, nonfinite="skip")
    steps(model, bal, opt, 0, 2)
    state = bal.state_dict()
    extra = state["_extra_state"]
    assert (extra["steps"], extra["epoch"]) == (2, 1)
    assert torch.equal(extra["history"]["steps"][:, 0], bal.history.steps)
    assert torch.equal(extra["history"]["table"][:, 0, 1], bal.history["towers_1"]["coefficients"])
    assert int(state["nonfinite_steps"]) == 0


def test_lazy_heads_loaded_from_a_state_dict_run_batched_like_materialised_ones():
    """A lazy head whose parameters came from ``load_state_dict`` stays an ``nn.LazyLinear``
    until called; it must take the same batched path as a head materialised by a forward,
    or a resumed run differs from the uninterrupted one in the last bits."""
    from gradbalance._head_logits import stackable

    features = {"a": torch.randn(3, 4), "b": torch.randn(3, 4)}
    source = {name: torch.nn.LazyLinear(2) for name in features}
    for name, head in source.items():
        head(features[name])
    loaded = {name: torch.nn.LazyLinear(2) for name in features}
    for name, head in loaded.items():
        head.load_state_dict(source[name].state_dict())
    assert all(type(head) is torch.nn.LazyLinear for head in loaded.values())
    assert stackable(source, features) and stackable(loaded, features)
    assert not stackable({name: torch.nn.LazyLinear(2) for name in features}, features)
