"""Shared pieces of the missing-modality tests (``loss(..., present=)``).

``test_missing.py`` (the Step services, Joint, Multi-Loss, MLB, OGM, OGM-GE, regression) and
``test_missing_methods.py`` (the other methods) build on them:

* :func:`masks`: a hypothesis strategy of ``(B, M)`` masks, every sample with a modality;
* :func:`build` / :func:`step`: a balancer of ``balancer_factories.ALL_FACTORIES`` and one
  training step (``loss(..., present=)`` and ``backward()``) from a fixed initial state;
* :func:`sub_batch_scores`: the reference of a per-sample-mean statistic: for each modality
  m, the score m of a copy of the balancer run on the samples where m is present, unmasked;
* :func:`head_gradients`: the heads' parameter gradients, by modality.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from balancer_factories import ALL_FACTORIES, INPUT_DIMS, make_batch_for
from conftest import MultiTowerNet
from hypothesis import strategies as st

CORE = (
    "joint",
    "multiloss",
    "mlb",
    "ogm",
    "ogm_ge",
    "joint_regression",
    "multiloss_regression",
    "mlb_regression",
)
"""The entries whose masked statistics ``test_missing.py`` and ``test_missing_ddp.py`` check
(the other methods: ``test_missing_methods.py``)."""


@st.composite
def masks(draw: Any, modalities: int = 2, min_batch: int = 4, max_batch: int = 10) -> torch.Tensor:
    """A ``(B, M)`` bool mask with at least one present modality per sample."""
    batch = draw(st.integers(min_batch, max_batch))
    rows = st.lists(st.booleans(), min_size=modalities, max_size=modalities).filter(any)
    return torch.tensor(draw(st.lists(rows, min_size=batch, max_size=batch)), dtype=torch.bool)


def build(name: str, seed: int = 0, dims: tuple[int, ...] = INPUT_DIMS, **options: Any):
    """``(model, balancer)``: a fresh :class:`conftest.MultiTowerNet` with the entry ``name``."""
    torch.manual_seed(seed)
    model = MultiTowerNet(dims)
    return model, ALL_FACTORIES[name](model, **options)


def batch(name: str, size: int, seed: int = 0, dims: tuple[int, ...] = INPUT_DIMS):
    """Inputs and targets of ``size`` samples for the entry ``name``."""
    return make_batch_for(name, dims, batch=size, seed=seed)


def step(model, bal, inputs, target, present=None) -> torch.Tensor:
    """One training step's ``loss(..., present=)`` and ``backward()`` (no optimizer step)."""
    loss = bal.loss(model(*inputs), target, present=present)
    loss.backward()
    return loss.detach()


def optimizer_step(model, bal, opt, inputs, target, present=None) -> None:
    """One step of a user's loop with ``present=``: loss, backward, after_backward, step."""
    opt.zero_grad(set_to_none=True)
    step(model, bal, inputs, target, present)
    bal.after_backward()
    opt.step()


def twin(model, bal):
    """A deep copy of the model and its balancer (the balancer attached to the copy)."""
    pair = copy.deepcopy({"model": model, "bal": bal})
    return pair["model"], pair["bal"]


def sub_batch_scores(model, bal, inputs, target, present: torch.Tensor) -> torch.Tensor:
    """``(M,)``: for each modality m present somewhere, the score m of an unmasked training step
    of a copy of ``(model, bal)`` on the samples where m is present; the copy's previous score
    where m is absent from the whole batch."""
    scores = []
    for index in range(present.shape[1]):
        rows = present[:, index]
        copy_model, copy_bal = twin(model, bal)
        if rows.any():
            step(copy_model, copy_bal, [x[rows] for x in inputs], target[rows])
        scores.append(copy_bal.last_scores[index])
    return torch.stack(scores)


def head_gradients(bal) -> list[torch.Tensor]:
    """Each head's parameter gradients, flattened (zeros for a parameter without one)."""
    return [
        torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                for p in head.parameters()
            ]
        )
        for head in bal.heads.values()
    ]
