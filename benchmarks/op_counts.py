"""Balancing work as a count of dispatched aten ops (a GPU-free proxy for kernel launches).

For a model of M equal-width MLP encoders and a linear fusion, the ops dispatched by one
training step's ``bal.loss(logits, y)`` and ``loss.backward()`` are counted for MLB and for
plain Joint (no probes) on the same model and batch; their difference is the work MLB adds
(heads, scores, coefficients, checks, gradient scaling). The count after the model's forward
is the measured quantity; the table also shows it with the forward included (the encoder
taps run there). Two warm-up steps run first (lazy state, optimizer watch), and the counted
step starts from gradients set to ``None``, as after ``opt.zero_grad()``.

Run ``python -m benchmarks.op_counts`` for the table at M = 2 and M = 8.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradbalance as gb

INPUT_DIM, WIDTH, NUM_CLASSES, BATCH = 16, 32, 6, 32


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while it is active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class EqualTowers(nn.Module):
    """M encoders ``Linear(16, 32) -> ReLU -> Linear(32, 32)`` and a linear fusion."""

    def __init__(self, modalities: int) -> None:
        super().__init__()
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(INPUT_DIM, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH))
            for _ in range(modalities)
        )
        self.fusion = nn.Linear(WIDTH * modalities, NUM_CLASSES)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.fusion(torch.cat([t(x) for t, x in zip(self.towers, inputs)], dim=-1))


def _balancer(method: str, model: EqualTowers) -> gb.Balancer:
    towers = list(model.towers)
    if method == "mlb":
        return gb.MLB(model, towers, NUM_CLASSES, feature_dims=[WIDTH] * len(towers))
    if method == "multiloss":
        return gb.MultiLoss(model, towers, NUM_CLASSES, feature_dims=[WIDTH] * len(towers))
    return gb.Joint(model, towers, NUM_CLASSES)


def presence_mask(modalities: int) -> torch.Tensor:
    """``(BATCH, M)``: the second modality absent in every third sample."""
    present = torch.ones(BATCH, modalities, dtype=torch.bool)
    present[::3, 1] = False
    return present


def step_ops(
    method: str, modalities: int, with_forward: bool = False, masked: bool = False
) -> Counter[str]:
    """The ops of one counted training step of ``method`` ("mlb", "multiloss" or "joint", no
    probes); with ``masked``, every ``loss()`` gets ``present=`` :func:`presence_mask`."""
    torch.manual_seed(0)
    model = EqualTowers(modalities)
    bal = _balancer(method, model)
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(BATCH, INPUT_DIM, generator=g) for _ in range(modalities)]
    target = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
    present = presence_mask(modalities) if masked else None
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        bal.loss(model(*inputs), target, present).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    counter = OpCounter()
    logits = None if with_forward else model(*inputs)
    with counter:
        if logits is None:
            logits = model(*inputs)
        bal.loss(logits, target, present).backward()
    return counter.ops


def extra_ops(modalities: int, with_forward: bool = False) -> int:
    """Ops MLB dispatches beyond plain Joint on the same model and batch."""
    mlb = sum(step_ops("mlb", modalities, with_forward).values())
    joint = sum(step_ops("joint", modalities, with_forward).values())
    return mlb - joint


def mask_ops(method: str, modalities: int) -> int:
    """Ops a presence mask adds to ``method``'s ``loss()`` + ``backward()``."""
    masked = sum(step_ops(method, modalities, masked=True).values())
    return masked - sum(step_ops(method, modalities).values())


def table(modalities: tuple[int, ...] = (2, 8)) -> str:
    rows = ["| M | MLB ops beyond Joint: loss() + backward() | with the forward |", "|---|---|---|"]
    for m in modalities:
        rows.append(f"| {m} | {extra_ops(m)} | {extra_ops(m, with_forward=True)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
