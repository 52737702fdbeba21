"""The balancers the reliability matrices run over (DDP, accumulation, AMP, compile, resume).

Each entry builds a balancer on a :class:`conftest.MultiTowerNet` with two towers (inputs of
width 5 and 7, hidden 12, 4 classes); ``**options`` are passed on (``sync=``, ``nonfinite=``,
...). Heads get explicit ``feature_dims`` unless an entry says otherwise.

To cover a new method, add one line to ``FACTORIES`` (its id -> a function of the model and
the options). The baselines' entries are guarded: they join the matrices as soon as
``gradbalance`` exports the class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradbalance as gb

INPUT_DIMS = (5, 7)
NUM_CLASSES = 4
HIDDEN = 12

Factory = Callable[..., gb.Balancer]


def _towers(model: nn.Module) -> list[nn.Module]:
    return list(model.towers)


def _fusion(model: nn.Module) -> Callable[..., torch.Tensor]:
    return lambda *features: model.fusion(torch.cat(features, dim=-1))


def mlb(model: nn.Module, **options: Any) -> gb.Balancer:
    options.setdefault("feature_dims", [HIDDEN, HIDDEN])
    return gb.MLB(model, _towers(model), NUM_CLASSES, alpha=2.0, beta_max=3.0, **options)


def multiloss(model: nn.Module, **options: Any) -> gb.Balancer:
    options.setdefault("feature_dims", [HIDDEN, HIDDEN])
    return gb.MultiLoss(model, _towers(model), NUM_CLASSES, **options)


def joint_probes(model: nn.Module, **options: Any) -> gb.Balancer:
    options.setdefault("feature_dims", [HIDDEN, HIDDEN])
    return gb.Joint(model, _towers(model), NUM_CLASSES, probes=True, **options)


FACTORIES: dict[str, Factory] = {
    "MLB": mlb,
    "MultiLoss": multiloss,
    "Joint": joint_probes,
}

# --- baselines (issue #7 names OGM-GE and AGM in the DDP test) --------------------------------
# Added here once gradbalance exports them; each must pass every matrix that uses FACTORIES.
if hasattr(gb, "OGMGE"):

    def ogm_ge(model: nn.Module, **options: Any) -> gb.Balancer:
        options.setdefault("feature_dims", [HIDDEN, HIDDEN])
        return gb.OGMGE(model, _towers(model), NUM_CLASSES, alpha=0.8, seed=3, **options)

    FACTORIES["OGMGE"] = ogm_ge

if hasattr(gb, "AGM"):

    def agm(model: nn.Module, **options: Any) -> gb.Balancer:
        # Clipping on (threshold low enough to trigger): non-linear work in after_backward().
        return gb.AGM(
            model,
            _towers(model),
            NUM_CLASSES,
            alpha=1.0,
            fusion=_fusion(model),
            clip=True,
            clip_threshold=0.05,
            clip_max_norm=0.5,
            **options,
        )

    FACTORIES["AGM"] = agm


def factory_params(exclude: tuple[str, ...] = ()) -> list[Any]:
    """``FACTORIES`` as pytest params with readable ids."""
    return [pytest.param(name, id=name) for name in FACTORIES if name not in exclude]


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
