"""The balancers every contract and reliability matrix runs over: one per name in ``gb.METHODS``
(the built-in methods and every method registered with ``gb.register_method``, the test method
of ``custom_method`` included).

Each entry builds a balancer on a :class:`conftest.MultiTowerNet` (or a subclass with the same
towers; two towers of inputs 5 and 7, hidden 12, 4 classes) with options that make its
modulation active from the first training steps; ``**options`` override them (``sync=``,
``nonfinite=``, ``alpha=``, ...). Heads get explicit ``feature_dims`` unless an entry says
otherwise (pass ``feature_dims=None`` for lazy heads); ``encoders=`` replaces the towers.

* ``ogm`` scores the fused head's slices (``fusion_head=model.fusion``); ``ogm_ge`` uses
  probes, so both score sources are covered.
* ``pmr`` uses explicit prototypes built by one ``torch.no_grad()`` pass over a fixed batch in
  the factory (the official prototype pass): the prototype loss is active from step 0.
* ``mslr`` starts from unequal initial factors, so its gradients are scaled from step 0.
* ``agm`` clips (threshold low enough to trigger): non-linear work in ``after_backward()``.
* ``gblend`` re-estimates its loss weights at every ``epoch_end()`` (``every=1``).
* ``mmpareto`` combines the two gradients into each encoder in every backward pass.
* ``cggm`` adds its direction term on the fused head's weight blocks (``lam=0.2``).

A registered method joins every matrix by itself: :func:`default_factory` builds it with
explicit ``feature_dims`` and its defaults (a method whose options need wiring to the model
gets a line in ``WIRED``), and a method whose ``supported_tasks`` include ``"regression"`` also
joins ``REGRESSION_FACTORIES``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import custom_method  # noqa: F401  (registers the test method before the matrices are built)
import pytest
import torch
from conftest import make_batch
from torch import nn

import gradbalance as gb

INPUT_DIMS = (5, 7)
NUM_CLASSES = 4
HIDDEN = 12

Factory = Callable[..., gb.Balancer]


def _encoders(model: nn.Module, options: dict) -> list[nn.Module]:
    """``encoders=`` from the options (removed from them), else the model's towers."""
    encoders = options.pop("encoders", None)
    return list(model.towers) if encoders is None else list(encoders)


def _fusion(model: nn.Module) -> Callable[..., torch.Tensor]:
    return lambda *features: model.fusion(torch.cat(features, dim=-1))


def _build(method: type[gb.Balancer], model, encoders, defaults: dict, options: dict):
    """``options`` override ``defaults``; a regression task takes no ``num_classes``."""
    merged = {**defaults, **options}
    classes = () if merged.get("task") == "regression" else (NUM_CLASSES,)
    return method(model, encoders, *classes, **merged)


def joint(model: nn.Module, **options: Any) -> gb.Balancer:
    encoders = _encoders(model, options)
    defaults = {"probes": True, "feature_dims": [HIDDEN] * len(encoders)}
    return _build(gb.Joint, model, encoders, defaults, options)


def multiloss(model: nn.Module, **options: Any) -> gb.Balancer:
    encoders = _encoders(model, options)
    defaults = {"feature_dims": [HIDDEN] * len(encoders)}
    return _build(gb.MultiLoss, model, encoders, defaults, options)


def mlb(model: nn.Module, **options: Any) -> gb.Balancer:
    encoders = _encoders(model, options)
    defaults = {"alpha": 2.0, "beta_max": 3.0, "feature_dims": [HIDDEN] * len(encoders)}
    return _build(gb.MLB, model, encoders, defaults, options)


def ogm(model: nn.Module, **options: Any) -> gb.Balancer:
    encoders = _encoders(model, options)
    defaults = {"alpha": 0.8, "fusion_head": model.fusion}
    return _build(gb.OGM, model, encoders, defaults, options)


def ogm_ge(model: nn.Module, **options: Any) -> gb.Balancer:
    encoders = _encoders(model, options)
    defaults = {"alpha": 0.8, "seed": 3, "feature_dims": [HIDDEN] * len(encoders)}
    return _build(gb.OGMGE, model, encoders, defaults, options)


def opm(model: nn.Module, **options: Any) -> gb.Balancer:
    """Every training forward drops (``p_exe=1``), so the suites run the masked branch."""
    encoders = _encoders(model, options)
    defaults = {"q_base": 0.5, "lam": 0.5, "p_exe": 1.0, "fusion_head": model.fusion}
    return _build(gb.OPM, model, encoders, defaults, options)


def agm(model: nn.Module, **options: Any) -> gb.Balancer:
    encoders = _encoders(model, options)
    defaults = {
        "alpha": 1.0,
        "fusion": _fusion(model),
        "clip": True,
        "clip_threshold": 0.05,
        "clip_max_norm": 0.5,
    }
    return _build(gb.AGM, model, encoders, defaults, options)


def prototype_batch(model: nn.Module) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The fixed batch of PMR's prototype pass (every class present)."""
    g = torch.Generator().manual_seed(4242)
    device = next(model.parameters()).device
    inputs = [torch.randn(16, tower[0].in_features, generator=g) for tower in model.towers]
    return [x.to(device) for x in inputs], (torch.arange(16) % NUM_CLASSES).to(device)


def pmr(model: nn.Module, **options: Any) -> gb.Balancer:
    encoders = _encoders(model, options)
    defaults = {"alpha": 1.0, "prototypes": "explicit", "feature_dims": [HIDDEN] * len(encoders)}
    bal = _build(gb.PMR, model, encoders, defaults, options)
    inputs, target = prototype_batch(model)
    with torch.no_grad():
        model(*inputs)
        bal.collect(target)
    bal.update_prototypes()
    return bal


def mslr(model: nn.Module, **options: Any) -> gb.Balancer:
    encoders = _encoders(model, options)
    defaults = {
        "initial": [0.8, 1.25, 1.1, 0.9][: len(encoders)],
        "memory_epochs": 1,
        "feature_dims": [HIDDEN] * len(encoders),
    }
    return _build(gb.MSLR, model, encoders, defaults, options)


def gblend(model: nn.Module, **options: Any) -> gb.Balancer:
    encoders = _encoders(model, options)
    defaults = {"feature_dims": [HIDDEN] * len(encoders)}
    return _build(gb.GBlend, model, encoders, defaults, options)


def mmpareto(model: nn.Module, **options: Any) -> gb.Balancer:
    encoders = _encoders(model, options)
    defaults = {"feature_dims": [HIDDEN] * len(encoders)}
    return _build(gb.MMPareto, model, encoders, defaults, options)


def cggm(model: nn.Module, **options: Any) -> gb.Balancer:
    towers = "encoders" not in options  # then the fused head takes the towers' features
    encoders = _encoders(model, options)
    defaults: dict[str, Any] = {"feature_dims": [HIDDEN] * len(encoders)}
    if towers:  # the direction term turns the fused head's weight blocks
        defaults.update(lam=0.2, fusion_weights=model.fusion)
    return _build(gb.CGGM, model, encoders, defaults, options)


WIRED: dict[str, Factory] = {
    "joint": joint,
    "multiloss": multiloss,
    "mlb": mlb,
    "ogm": ogm,
    "ogm_ge": ogm_ge,
    "opm": opm,
    "agm": agm,
    "pmr": pmr,
    "mslr": mslr,
    "gblend": gblend,
    "mmpareto": mmpareto,
    "cggm": cggm,
}
"""The built-in methods' factories (options that make their modulation active at once)."""


def default_factory(method: type[gb.Balancer]) -> Factory:
    """A registered method with its own defaults and explicit ``feature_dims``."""

    def build(model: nn.Module, **options: Any) -> gb.Balancer:
        encoders = _encoders(model, options)
        return _build(method, model, encoders, {"feature_dims": [HIDDEN] * len(encoders)}, options)

    return build


FACTORIES: dict[str, Factory] = {
    name: WIRED.get(name) or default_factory(cls) for name, cls in gb.METHODS.items()
}
"""One factory per name in ``gb.METHODS``."""

REGRESSION = {"task": "regression", "output_dim": NUM_CLASSES}
"""The regression entries predict NUM_CLASSES real values (the towers' fused output width)."""


def _regression(factory: Factory) -> Factory:
    def build(model: nn.Module, **options: Any) -> gb.Balancer:
        return factory(model, **{**REGRESSION, **options})

    return build


REGRESSION_FACTORIES: dict[str, Factory] = {
    f"{name}_regression": _regression(FACTORIES[name])
    for name, cls in gb.METHODS.items()
    if "regression" in getattr(cls, "supported_tasks", ())
}
"""The methods that take ``task="regression"`` (L1 losses; heads regress; MLB's scores are
batch errors), run by the contract suite (``test_contract.py``) next to ``FACTORIES``."""

ALL_FACTORIES: dict[str, Factory] = {**FACTORIES, **REGRESSION_FACTORIES}


def method_class(name: str) -> type[gb.Balancer]:
    """The class an entry of ``ALL_FACTORIES`` builds."""
    return gb.METHODS[name.removesuffix("_regression")]


def make_batch_for(name: str, input_dims, batch=10, seed=0):
    """``conftest.make_batch`` (integer labels), with real ``(batch, NUM_CLASSES)`` targets
    for the regression entries."""
    inputs, target = make_batch(input_dims, batch=batch, num_classes=NUM_CLASSES, seed=seed)
    if name in REGRESSION_FACTORIES:
        g = torch.Generator().manual_seed(1000 + seed)
        target = torch.randn(batch, NUM_CLASSES, generator=g)
    return inputs, target


HEAD_SCORES = ("joint", "multiloss", "mlb")
"""Methods whose scores are their heads' mean true-class probabilities."""


def factory_params(exclude: tuple[str, ...] = (), regression: bool = False) -> list[Any]:
    """``FACTORIES`` (with ``regression``, also ``REGRESSION_FACTORIES``) as pytest params
    with readable ids."""
    names = ALL_FACTORIES if regression else FACTORIES
    return [pytest.param(name, id=name) for name in names if name not in exclude]


def train_step(model: nn.Module, bal: gb.Balancer, opt: torch.optim.Optimizer, inputs, target):
    """One ordinary step of a user's loop (the same for every method)."""
    opt.zero_grad(set_to_none=True)
    loss = bal.loss(model(*inputs), target)
    loss.backward()
    bal.after_backward()
    opt.step()
    return loss.detach()


def flat_parameters(*modules: nn.Module) -> torch.Tensor:
    """Every parameter of the modules, as one vector (for bitwise checks)."""
    return torch.cat([p.detach().reshape(-1) for m in modules for p in m.parameters()])


def flat_state(*modules: nn.Module) -> torch.Tensor:
    """Every parameter and floating buffer of the modules, as one vector (for bitwise checks)."""
    tensors = [flat_parameters(*modules)]
    for module in modules:
        tensors += [
            b.detach().reshape(-1).float() for b in module.buffers() if b.is_floating_point()
        ]
    return torch.cat(tensors)
