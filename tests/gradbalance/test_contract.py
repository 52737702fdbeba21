"""The public contract every method of ``gb.METHODS`` keeps: construction, refusal of bad
arguments (nothing attached before every argument is validated), ``remove()``, the state round
trip and a training step without host synchronisation.

Every test runs over ``balancer_factories.FACTORIES`` (one entry per ``gb.METHODS`` name) and,
except the checks of the classification hyperparameters, over
``balancer_factories.REGRESSION_FACTORIES`` (the methods with ``task="regression"``).
"""

from __future__ import annotations

import copy
import inspect
import io
import math

import pytest
import torch
import torch.nn.functional as F
from balancer_factories import (
    ALL_FACTORIES,
    FACTORIES,
    INPUT_DIMS,
    factory_params,
    flat_parameters,
    make_batch_for,
    method_class,
    train_step,
)
from conftest import make_batch
from contract_models import TowerNet, footprint
from test_no_host_sync import FailOnHostSync
from torch import nn

import gradbalance as gb

NAN, INF = float("nan"), float("inf")


def build(name, seed=0, model=None, **options):
    torch.manual_seed(seed)
    model = TowerNet(INPUT_DIMS) if model is None else model
    torch.manual_seed(seed + 1)
    return model, ALL_FACTORIES[name](model, **options)


def sgd(model, bal):
    return torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)


def tensors_of(bal):
    return {k: v.clone() for k, v in bal.state_dict().items() if torch.is_tensor(v)}


def test_every_method_has_a_factory():
    assert sorted(FACTORIES) == sorted(gb.METHODS), (
        "add an entry to balancer_factories.FACTORIES for every name in gb.METHODS"
    )


# --- construction -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", factory_params(regression=True))
def test_construction_names_the_encoders_and_holds_no_model_state(name):
    model, bal = build(name)
    assert type(bal) is method_class(name)
    assert isinstance(bal, gb.Balancer) and isinstance(bal, nn.Module)
    assert bal.names == ["towers_0", "towers_1"]
    assert not {id(p) for p in bal.parameters()} & {id(p) for p in model.parameters()}
    assert not any(key.startswith(("towers.", "fusion.")) for key in bal.state_dict())
    train_step(model, bal, sgd(model, bal), *make_batch_for(name, INPUT_DIMS))
    assert bal.steps == 1
    for values in (bal.coefficients, bal.scores):
        assert list(values) == bal.names
        assert all(v.dim() == 0 and torch.isfinite(v) for v in values.values())


# --- refused arguments: nothing attached ------------------------------------------------------


def _unknown_extra(model):
    return {"extra_parameters": {"unknown": [model.fusion.bias]}}


def _nested_encoders(model):
    return {"encoders": [model.towers[0], model.towers[0][0]]}


REFUSED = [
    ("joint", {"nonfinite": "ignore"}, "nonfinite"),
    ("joint", {"pool": "max"}, "pool"),
    ("joint", {"flush_every": 0}, "flush_every"),
    ("multiloss", {"unimodal_weight": -1.0}, "weight"),
    ("multiloss", {"fused_weight": -1.0}, "weight"),
    ("mlb", {"alpha": -1.0}, "alpha"),
    ("mlb", {"beta_max": 0.0}, "beta_max"),
    ("mlb", {"unimodal_weight": -1.0}, "weight"),
    ("mlb", _unknown_extra, "unknown"),
    ("mlb", {"scale": "some"}, "scale"),
    ("ogm", {"alpha": -1.0}, "alpha"),
    ("ogm", {"parameters": "all"}, "parameters"),
    ("ogm_ge", {"alpha": -1.0}, "alpha"),
    ("ogm_ge", {"seed": "x"}, "seed"),
    ("agm", {"alpha": -1.0}, "alpha"),
    ("agm", {"masking": "none"}, "masking"),
    ("pmr", {"alpha": -1.0}, "alpha"),
    ("pmr", {"momentum": 1.0}, "momentum"),
    ("mslr", {"initial": -1.0}, "initial"),
    ("mslr", {"memory_epochs": 0}, "memory_epochs"),
    ("gblend", {"every": 0}, "every"),
    ("gblend", {"min_overfitting": 0.0}, "min_overfitting"),
    ("mmpareto", {"gamma": 0.0}, "gamma"),
    ("mmpareto", {"unimodal_weight": -1.0}, "weight"),
    ("amss", {"temperature": 0.0}, "temperature"),
    ("amss", {"unit": "row"}, "unit"),
    ("amss", {"parameters": "all"}, "parameters"),
    ("amss_plus", {"seed": "x"}, "seed"),
    ("mlb_regression", {"loss": "l2"}, "loss"),
    ("mlb_regression", {"error": "rmse"}, "error"),
    ("mlb_regression", {"alpha": -1.0}, "alpha"),
    ("multiloss_regression", {"output_dim": 0}, "output_dim"),
    ("joint_regression", {"num_classes": 4}, "no classes"),
    ("agm_regression", {"error": "mae"}, "error="),
    ("mlb", {"loss": "l1"}, "loss= only for task='regression'"),
    ("mlb", {"task": "ranking"}, "task"),
    ("ogm", {"task": "regression"}, "does not support task='regression'"),
    ("ogm_ge", {"task": "regression"}, "does not support task='regression'"),
    ("pmr", {"task": "regression"}, "does not support task='regression'"),
    ("mslr", {"task": "regression"}, "does not support task='regression'"),
    ("gblend", {"task": "regression"}, "does not support task='regression'"),
    ("mmpareto", {"task": "regression"}, "does not support task='regression'"),
    ("amss", {"task": "regression"}, "does not support task='regression'"),
    ("amss_plus", {"task": "regression"}, "does not support task='regression'"),
]
REFUSED += [
    case
    for name in ALL_FACTORIES
    for case in (
        (name, {"sync": "all"}, "sync"),
        (name, {"pool": {"nope": "tokens"}}, "unknown encoders"),
        (name, {"feature_dims": [3]}, "feature_dims"),
        (name, _nested_encoders, "nested"),
    )
]

NONFINITE_HYPERPARAMETERS = [
    ("multiloss", "fused_weight", NAN),
    ("multiloss", "unimodal_weight", NAN),
    ("mlb", "alpha", INF),
    ("mlb", "alpha", NAN),
    ("mlb", "beta_max", INF),
    ("mlb", "beta_max", NAN),
    ("mlb", "fused_weight", NAN),
    ("mlb", "unimodal_weight", NAN),
    ("ogm", "alpha", INF),
    ("ogm", "alpha", NAN),
    ("ogm_ge", "alpha", INF),
    ("ogm_ge", "alpha", NAN),
    ("agm", "alpha", INF),
    ("agm", "alpha", NAN),
    ("agm", "max_exponent", NAN),
    ("agm", "min_coefficient", NAN),
    ("agm", "clip_threshold", NAN),
    ("agm", "clip_max_norm", NAN),
    ("pmr", "alpha", INF),
    ("pmr", "alpha", NAN),
    ("pmr", "momentum", NAN),
    ("mslr", "initial", NAN),
    ("gblend", "min_overfitting", NAN),
    ("mmpareto", "gamma", NAN),
    ("mmpareto", "fused_weight", NAN),
    ("mmpareto", "unimodal_weight", NAN),
    ("cggm", "rho", INF),
    ("cggm", "rho", NAN),
    ("cggm", "lam", INF),
    ("cggm", "lam", NAN),
    ("inforeg", "strength", INF),
    ("inforeg", "strength", NAN),
    ("inforeg", "gap_scale", NAN),
    ("inforeg", "threshold", NAN),
    *((name, "temperature", NAN) for name in ("amss", "amss_plus")),
    *((name, "offset", NAN) for name in ("amss", "amss_plus")),
    *((name, "bias", NAN) for name in ("amss", "amss_plus")),
    ("opm", "q_base", NAN),
    ("opm", "lam", INF),
    ("opm", "lam", NAN),
    ("opm", "p_exe", NAN),
]
"""Every float hyperparameter of every constructor with NaN, and ``alpha``/``beta_max`` inf
(Joint has none)."""


def _float_hyperparameters(method):
    """The constructor options annotated as floats, over the method's classes."""
    found = set()
    for cls in method.__mro__:
        if "__init__" in vars(cls) and cls.__module__.startswith("gradbalance"):
            for parameter in inspect.signature(cls.__init__).parameters.values():
                if "float" in str(parameter.annotation):
                    found.add(parameter.name)
    return found


@pytest.mark.parametrize("name", factory_params())
def test_every_float_hyperparameter_is_checked_with_nan(name):
    covered = {option for method, option, value in NONFINITE_HYPERPARAMETERS if method == name}
    checked_with_nan = {o for m, o, v in NONFINITE_HYPERPARAMETERS if m == name and v != v}
    assert _float_hyperparameters(gb.METHODS[name]) == covered == checked_with_nan


def _refuse_then_train(name, options, match):
    """The constructor refuses; the model is exactly as before; a valid balancer built next
    trains 3 steps exactly like one built on a copy that never saw the refused one."""
    torch.manual_seed(0)
    model = TowerNet(INPUT_DIMS)
    fresh = copy.deepcopy(model)
    before = footprint(model)
    options = options(model) if callable(options) else options
    with pytest.raises(ValueError, match=match):
        ALL_FACTORIES[name](model, **options)
    assert footprint(model) == before
    runs = []
    for m in (model, fresh):
        torch.manual_seed(7)
        bal = ALL_FACTORIES[name](m)
        opt = sgd(m, bal)
        for step in range(3):
            train_step(m, bal, opt, *make_batch_for(name, INPUT_DIMS, seed=step))
        runs.append(flat_parameters(m, bal))
    assert torch.equal(runs[0], runs[1])


def _case_id(name, options, match):
    shown = ",".join(options) if isinstance(options, dict) else options.__name__.strip("_")
    return f"{name}-{shown}"


@pytest.mark.parametrize(
    "name, options, match", [pytest.param(*case, id=_case_id(*case)) for case in REFUSED]
)
def test_refused_constructor_leaves_the_model_exactly_as_it_was(name, options, match):
    _refuse_then_train(name, dict(options) if isinstance(options, dict) else options, match)


@pytest.mark.parametrize(
    "name, option, value",
    [pytest.param(*c, id=f"{c[0]}-{c[1]}={c[2]}") for c in NONFINITE_HYPERPARAMETERS],
)
def test_nonfinite_hyperparameters_are_refused_at_construction(name, option, value):
    """The message names the option (``weight`` for the loss weights)."""
    match = "weight" if option.endswith("_weight") else option
    _refuse_then_train(name, {option: value}, match)


# --- remove -----------------------------------------------------------------------------------


@pytest.mark.parametrize("lazy", [False, True], ids=["dims", "lazy-heads"])
@pytest.mark.parametrize("name", factory_params(regression=True))
def test_remove_leaves_forward_and_backward_bitwise_as_before(name, lazy):
    torch.manual_seed(0)
    model = TowerNet(INPUT_DIMS)
    untouched = copy.deepcopy(model)
    before = footprint(model)
    inputs, target = make_batch(INPUT_DIMS)
    bal = ALL_FACTORIES[name](model, **({"feature_dims": None} if lazy else {}))
    for step in range(2):
        step_inputs, step_target = make_batch_for(name, INPUT_DIMS, seed=step)
        bal.loss(model(*step_inputs), step_target).backward()
        bal.after_backward()
    model.zero_grad(set_to_none=True)
    bal.remove()
    assert footprint(model) == before
    out = model(*inputs)
    F.cross_entropy(out, target).backward()
    expected = untouched(*inputs)
    F.cross_entropy(expected, target).backward()
    assert torch.equal(out, expected)
    for p, q in zip(model.parameters(), untouched.parameters()):
        assert torch.equal(p.grad, q.grad)


# --- state round trip -------------------------------------------------------------------------


def _epoch(name, model, bal, opt, first_step):
    for step in range(first_step, first_step + 2):
        train_step(model, bal, opt, *make_batch_for(name, INPUT_DIMS, seed=step))
    with torch.no_grad():
        inputs = make_batch(INPUT_DIMS, seed=50 + first_step)[0]
        bal.loss(model(*inputs), make_batch_for(name, INPUT_DIMS)[1])
    bal.epoch_end()


@pytest.mark.parametrize("lazy", [False, True], ids=["dims", "lazy-heads"])
@pytest.mark.parametrize("name", factory_params(regression=True))
def test_state_dict_round_trip_continues_identically(name, lazy):
    options = {"feature_dims": None} if lazy else {}
    model, bal = build(name, **options)
    opt = sgd(model, bal)
    _epoch(name, model, bal, opt, 0)
    _epoch(name, model, bal, opt, 2)
    buffer = io.BytesIO()
    torch.save(bal.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)  # weights_only: plain tensors and containers
    twin_model, twin = build(name, seed=11, **options)
    twin_model.load_state_dict(model.state_dict())
    twin.load_state_dict(state)
    assert (twin.steps, twin.epoch) == (bal.steps, bal.epoch) == (4, 2)
    for key, value in tensors_of(bal).items():
        assert torch.equal(value, tensors_of(twin)[key]), key
    assert twin.coefficients == bal.coefficients
    inputs, target = make_batch_for(name, INPUT_DIMS, seed=9)
    for m, b in ((model, bal), (twin_model, twin)):  # the next step is identical
        m.zero_grad(set_to_none=True)
        b.zero_grad(set_to_none=True)
        b.loss(m(*inputs), target).backward()
        b.after_backward()  # OGM-GE's noise: its generator state travelled too
    assert twin.coefficients == bal.coefficients
    for p, q in zip(
        (*model.parameters(), *bal.parameters()), (*twin_model.parameters(), *twin.parameters())
    ):
        assert torch.equal(p.grad, q.grad)


# --- no host synchronisation ------------------------------------------------------------------

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lazy", [False, True], ids=["dims", "lazy-heads"])
@pytest.mark.parametrize("name", factory_params(regression=True))
def test_training_step_makes_no_host_sync(name, lazy, device):
    """loss(), backward(), after_backward(), an evaluation loss() and epoch_end() never
    synchronise with the host (with M = 3 encoders)."""
    dims = (*INPUT_DIMS, 3)
    torch.manual_seed(0)
    model = TowerNet(dims).to(device)
    bal = ALL_FACTORIES[name](model, flush_every=1000, **({"feature_dims": None} if lazy else {}))
    opt = sgd(model, bal)

    def batch(seed):
        inputs, target = make_batch_for(name, dims, seed=seed)
        return [x.to(device) for x in inputs], target.to(device)

    train_step(model, bal, opt, *batch(0))  # materialises lazy heads
    for step in range(1, 3):
        inputs, target = batch(step)
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            with FailOnHostSync():
                opt.zero_grad()
                bal.loss(model(*inputs), target).backward()
                bal.after_backward()
                with torch.no_grad():
                    bal.loss(model(*inputs), target)
                bal.epoch_end()
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        opt.step()
    assert bal.steps == 3
    assert all(math.isfinite(float(v)) for v in bal.coefficients.values())
