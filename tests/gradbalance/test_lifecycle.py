"""Lifecycle rules around a user's loop, for every method of ``gb.METHODS``: two losses summed
before one backward, one balancer per encoder, and a model that is saved, deep-copied or
wrapped in ``AveragedModel`` is the user's plain model."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from balancer_factories import (
    ALL_FACTORIES,
    FACTORIES,
    INPUT_DIMS,
    factory_params,
    flat_parameters,
    make_batch_for,
    train_step,
)
from conftest import make_batch
from contract_models import (
    ConvTowerNet,
    TowerNet,
    conv_batch,
    cross_entropy_gradients,
    footprint,
    plain_copy,
)
from torch.optim.swa_utils import AveragedModel

import gradbalance as gb

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

CHANGING = ("mlb", "ogm", "ogm_ge", "agm", "pmr", "mlb_regression", "agm_regression")
"""Methods whose coefficients differ between the two batches of these tests."""


def twins(name, model, **options):
    """The model with a balancer, and a deep copy (made before the balancer) with its own."""
    twin = copy.deepcopy(model)
    balancers = []
    for m in (model, twin):
        torch.manual_seed(1)
        balancers.append(ALL_FACTORIES[name](m, **options))
    return (model, balancers[0]), (twin, balancers[1])


def gradients(*modules):
    return [p.grad for m in modules for p in m.parameters()]


def assert_same_gradients(got, expected, exact=False):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert (g is None) == (e is None)
        if g is None:
            continue
        if exact:
            assert torch.equal(g, e)
        else:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def losses_of(model, bal, batches, summed):
    """Forward + loss() per batch; one backward of the sum, or one backward per loss. Returns
    the coefficients of each loss()."""
    coefficients, total = [], 0
    for inputs, target in batches:
        loss = bal.loss(model(*inputs), target)
        coefficients.append(bal.coefficients)
        if summed:
            total = total + loss
        else:
            loss.backward()
    if summed:
        total.backward()
    return coefficients


BATCHES = [make_batch(INPUT_DIMS, batch=8, seed=1), make_batch(INPUT_DIMS, seed=2)]


# --- row 1: two losses, one backward ----------------------------------------------------------


@pytest.mark.parametrize("name", factory_params(regression=True))
def test_two_losses_summed_before_one_backward_are_each_scaled_by_their_own_coefficients(name):
    torch.manual_seed(0)
    (model, bal), (twin, ref) = twins(name, TowerNet(INPUT_DIMS))
    batches = BATCHES
    if name not in FACTORIES:  # regression: real targets
        batches = [make_batch_for(name, INPUT_DIMS, batch=8, seed=1)]
        batches.append(make_batch_for(name, INPUT_DIMS, seed=2))
    got_k = losses_of(model, bal, batches, summed=True)
    expected_k = losses_of(twin, ref, batches, summed=False)
    assert got_k == expected_k
    assert_same_gradients(gradients(model, bal), gradients(twin, ref))
    if name in CHANGING:  # otherwise the test could not tell k1 from k2
        assert any(abs(float(got_k[0][n] - got_k[1][n])) > 1e-4 for n in bal.names)


def _mlb_extra(model, enabled=True):
    return gb.MLB(
        model,
        list(model.towers),
        4,
        alpha=2.0,
        feature_dims=[12, 12],
        extra_parameters={"towers_0": [model.fusion.weight]},
        enabled=enabled,
    )


def _ogm_conv(model, enabled=True):
    return gb.OGM(
        model, list(model.towers), 4, parameters="conv", feature_dims=[4, 4], enabled=enabled
    )


PER_PARAMETER = {
    "mlb-extra_parameters": (TowerNet, _mlb_extra, lambda seed: make_batch(INPUT_DIMS, seed=seed)),
    "ogm-conv": (ConvTowerNet, _ogm_conv, conv_batch),
}
"""Per-parameter scaling modes: each builder, its model class and batches."""


def _scaled_sets(mode, model, bal):
    """``{modality: ids of the parameters whose gradient that modality's k scales}``."""
    if mode == "ogm-conv":
        return {
            f"towers_{i}": {id(p) for p in tower.parameters() if p.dim() == 4}
            for i, tower in enumerate(model.towers)
        }
    sets = {
        f"towers_{i}": {
            id(p) for p in (*tower.parameters(), *bal.heads[f"towers_{i}"].parameters())
        }
        for i, tower in enumerate(model.towers)
    }
    sets["towers_0"].add(id(model.fusion.weight))
    return sets


@pytest.mark.parametrize("mode", list(PER_PARAMETER))
def test_per_parameter_scaling_refuses_two_losses_summed_before_one_backward(mode):
    model_class, builder, batch = PER_PARAMETER[mode]
    torch.manual_seed(0)
    model = model_class()
    bal = builder(model)
    total = sum(bal.loss(model(*inputs), target) for inputs, target in map(batch, (1, 2)))
    with pytest.raises(RuntimeError, match="one backward"):
        total.backward()


@pytest.mark.parametrize("mode", list(PER_PARAMETER))
def test_per_parameter_scaling_is_exact_with_one_backward_per_loss(mode):
    """Each loss's gradient of a scaled parameter is its own k times the unscaled one."""
    model_class, builder, batch = PER_PARAMETER[mode]
    torch.manual_seed(0)
    model = model_class()
    reference = copy.deepcopy(model)
    torch.manual_seed(1)
    bal = builder(model)
    torch.manual_seed(1)
    unscaled = builder(reference, enabled=False)
    sets = _scaled_sets(mode, model, bal)
    expected = {id(p): torch.zeros_like(p) for p in (*model.parameters(), *bal.parameters())}
    for seed in (1, 2):
        inputs, target = batch(seed)
        reference.zero_grad(set_to_none=True)
        unscaled.zero_grad(set_to_none=True)
        unscaled.loss(reference(*inputs), target).backward()
        bal.loss(model(*inputs), target).backward()
        k = bal.coefficients
        pairs = zip(
            (*model.parameters(), *bal.parameters()),
            (*reference.parameters(), *unscaled.parameters()),
        )
        for p, q in pairs:
            factor = next((k[n] for n, ids in sets.items() if id(p) in ids), torch.tensor(1.0))
            if q.grad is not None:
                expected[id(p)] += factor * q.grad
    assert any(abs(float(v) - 1) > 1e-3 for v in bal.coefficients.values())
    for p in (*model.parameters(), *bal.parameters()):
        torch.testing.assert_close(p.grad, expected[id(p)], rtol=1e-5, atol=1e-6)


# --- row 3: one balancer per encoder ----------------------------------------------------------


@pytest.mark.parametrize("name", factory_params(regression=True))
def test_second_balancer_on_the_same_encoders_is_refused_until_remove(name):
    torch.manual_seed(0)
    model = TowerNet(INPUT_DIMS)
    never_balanced = copy.deepcopy(model)
    first = ALL_FACTORIES[name](model)
    with pytest.raises(ValueError, match=r"remove\(\)"):
        ALL_FACTORIES[name](model)
    with pytest.raises(ValueError, match=r"remove\(\)"):
        FACTORIES["mlb" if name != "mlb" else "joint"](model)
    first.remove()
    runs = []
    for m in (model, never_balanced):
        torch.manual_seed(5)
        second = ALL_FACTORIES[name](m)
        opt = torch.optim.SGD([*m.parameters(), *second.parameters()], lr=0.1)
        for step in range(2):
            train_step(m, second, opt, *make_batch_for(name, INPUT_DIMS, seed=step))
        runs.append(flat_parameters(m, second))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("name", factory_params(regression=True))
def test_second_balancer_sharing_one_encoder_is_refused_until_remove(name):
    model = TowerNet((5, 7, 3))
    towers = list(model.towers)
    first = FACTORIES["mlb"](model, encoders=towers[:2])
    with pytest.raises(ValueError, match=r"remove\(\)"):
        ALL_FACTORIES[name](model, encoders=towers[1:])
    first.remove()
    ALL_FACTORIES[name](model, encoders=towers[1:])


# --- row 4: torch.save(model) ------------------------------------------------------------------

LOAD_IN_A_FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    import torch
    import torch.nn.functional as F
    from contract_models import cross_entropy_gradients, footprint
    saved, plain, out = sys.argv[1:4]
    inputs, target = torch.load(sys.argv[4])
    result = {}
    for key, path in (("saved", saved), ("plain", plain)):
        model = torch.load(path, weights_only=False)
        result[key] = {
            "footprint": footprint(model),
            "gradients": cross_entropy_gradients(model, inputs, target),
        }
    torch.save(result, out)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("name", factory_params(regression=True))
def test_saved_model_is_the_plain_model(name, tmp_path):
    torch.manual_seed(0)
    model = TowerNet(INPUT_DIMS)
    before = footprint(model)
    bal = ALL_FACTORIES[name](model)
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
    train_step(model, bal, opt, *make_batch_for(name, INPUT_DIMS, seed=0))
    saved, plain, out, batch = (tmp_path / f for f in ("m.pt", "p.pt", "r.pt", "b.pt"))
    torch.save(model, saved)
    assert b"gradbalance" not in saved.read_bytes()
    torch.save(plain_copy(model), plain)
    torch.save(make_batch(INPUT_DIMS, seed=3), batch)
    done = subprocess.run(
        [sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, *map(str, (saved, plain, out, batch))],
        cwd=HERE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (HERE, ROOT)))},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = torch.load(out, weights_only=False)
    assert result["saved"]["footprint"] == result["plain"]["footprint"] == before
    assert_same_gradients(result["saved"]["gradients"], result["plain"]["gradients"], exact=True)


# --- row 5: deepcopy and AveragedModel ---------------------------------------------------------


@pytest.mark.parametrize("copier", ["deepcopy", "AveragedModel"])
@pytest.mark.parametrize("name", factory_params(regression=True))
def test_copy_after_a_step_is_a_plain_model_that_leaves_the_balancer_alone(name, copier):
    torch.manual_seed(0)
    model = TowerNet(INPUT_DIMS)
    before = footprint(model)
    (model, bal), (twin, ref) = twins(name, model)
    opts = [
        torch.optim.SGD([*m.parameters(), *b.parameters()], lr=0.1)
        for m, b in ((model, bal), (twin, ref))
    ]
    inputs, target = make_batch_for(name, INPUT_DIMS, seed=0)
    train_step(model, bal, opts[0], inputs, target)
    train_step(twin, ref, opts[1], inputs, target)
    if copier == "deepcopy":
        plain = copy.deepcopy(model)
    else:
        averaged = AveragedModel(model)
        averaged.update_parameters(model)
        plain = averaged.module
    assert footprint(plain) == before
    plain.train()
    probe = make_batch(INPUT_DIMS, seed=5)
    assert_same_gradients(
        cross_entropy_gradients(plain, *probe),
        cross_entropy_gradients(plain_copy(model), *probe),
        exact=True,
    )
    for m, b, opt in ((model, bal, opts[0]), (twin, ref, opts[1])):
        train_step(m, b, opt, *make_batch_for(name, INPUT_DIMS, seed=1))
    assert bal.coefficients == ref.coefficients
    assert torch.equal(flat_parameters(model, bal), flat_parameters(twin, ref))
