"""DDP scenarios on 2 gloo processes on the CPU; started by tests/test_ddp.py.

``python tests/ddp_worker.py OUT_DIR`` spawns two ranks; each runs every scenario and saves
``OUT_DIR/rank{r}.pt``: ``{scenario: {...results...} | {"error": traceback}}``. The test
process compares the ranks (bitwise) and checks the global statistics against a single
process on the concatenated batch.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

HERE = os.path.dirname(os.path.abspath(__file__))
# This folder (balancer_factories), tests/ (conftest) and, first, the repository root: the
# folder tests/gradbalance must never shadow the package of the same name.
for path in (HERE, os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))):
    sys.path.insert(0, path)

from balancer_factories import (  # noqa: E402
    ALL_FACTORIES,
    FACTORIES,
    INPUT_DIMS,
    NUM_CLASSES,
    REGRESSION_FACTORIES,
    flat_parameters,
    flat_state,
    train_step,
)
from conftest import MultiTowerNet  # noqa: E402
from two_ranks import serve  # noqa: E402

import gradbalance as gb  # noqa: E402

STEPS = 5
SIZES = (6, 10)
"""Per-rank batch sizes, deliberately unequal."""


def global_batch(step: int, name: str = "") -> tuple[list[torch.Tensor], torch.Tensor]:
    """The concatenated batch of ``step`` (rank 0's samples first); real targets of width
    NUM_CLASSES for the regression entries."""
    g = torch.Generator().manual_seed(1000 + step)
    n = sum(SIZES)
    inputs = [torch.randn(n, d, generator=g) for d in INPUT_DIMS]
    if name in REGRESSION_FACTORIES:
        return inputs, torch.randn(n, NUM_CLASSES, generator=g)
    return inputs, torch.randint(0, NUM_CLASSES, (n,), generator=g)


def local_batch(step: int, rank: int, name: str = "") -> tuple[list[torch.Tensor], torch.Tensor]:
    inputs, target = global_batch(step, name)
    start = sum(SIZES[:rank])
    stop = start + SIZES[rank]
    return [x[start:stop] for x in inputs], target[start:stop]


def scenarios() -> list[tuple[str, str, dict]]:
    found = [
        (f"{name}-{sync}", name, {"sync": sync})
        for name in ALL_FACTORIES
        for sync in ("global", "local")
    ]
    found.append(("mlb-lazy-heads", "mlb", {"feature_dims": None}))
    return found


def train(rank: int, name: str, options: dict) -> dict:
    torch.manual_seed(rank)  # different initial values per rank: DDP and the balancer align them
    model = MultiTowerNet(INPUT_DIMS)
    bal = ALL_FACTORIES[name](model, **options)
    init = (copy.deepcopy(model.state_dict()), copy.deepcopy(bal.state_dict()))
    ddp = DDP(model)
    opt = torch.optim.SGD([*ddp.parameters(), *bal.parameters()], lr=0.2, momentum=0.5)
    coefficients, scores = [], []
    for step in range(STEPS):
        inputs, target = local_batch(step, rank, name)
        train_step(ddp, bal, opt, inputs, target)
        coefficients.append(torch.stack(list(bal.coefficients.values())))
        scores.append(torch.stack(list(bal.scores.values())))
    return {
        "coefficients": torch.stack(coefficients),
        "scores": torch.stack(scores),
        "parameters": flat_parameters(model, bal),
        "state": flat_state(model, bal),
        "init": init if rank == 0 else None,
        "history": len(bal.history[bal.names[0]]["coefficients"]),
    }


def accumulate(rank: int) -> dict:
    """Two micro-batches per optimizer step, the first under ``ddp.no_sync()``."""
    torch.manual_seed(rank)
    model = MultiTowerNet(INPUT_DIMS)
    bal = FACTORIES["mlb"](model)
    ddp = DDP(model)
    opt = torch.optim.SGD([*ddp.parameters(), *bal.parameters()], lr=0.2)
    for step in range(3):
        opt.zero_grad()
        inputs, target = local_batch(step, rank)
        half = [x[: len(target) // 2] for x in inputs], target[: len(target) // 2]
        rest = [x[len(target) // 2 :] for x in inputs], target[len(target) // 2 :]
        with ddp.no_sync():
            bal.loss(ddp(*half[0]), half[1]).backward()
        bal.loss(ddp(*rest[0]), rest[1]).backward()
        opt.step()
    return {"state": flat_state(model, bal)}


def skip_nonfinite(rank: int) -> dict:
    """Rank 1 sees a NaN input at step 2; with nonfinite="skip" both ranks skip that step."""
    torch.manual_seed(0)
    model = MultiTowerNet(INPUT_DIMS)
    bal = FACTORIES["mlb"](model, nonfinite="skip")
    ddp = DDP(model)
    opt = torch.optim.SGD([*ddp.parameters(), *bal.parameters()], lr=0.2)
    coefficients, finite = [], []
    for step in range(4):
        inputs, target = local_batch(step, rank)
        if step == 2 and rank == 1:
            inputs[0] = inputs[0].clone()
            inputs[0][0, 0] = float("nan")
        opt.zero_grad()
        bal.loss(ddp(*inputs), target).backward()
        finite.append(bool(bal.last_step_finite))
        if finite[-1]:
            opt.step()
        coefficients.append(torch.stack(list(bal.coefficients.values())))
    return {
        "coefficients": torch.stack(coefficients),
        "finite": finite,
        "nonfinite_steps": int(bal.nonfinite_steps),
        "history": len(bal.history[bal.names[0]]["coefficients"]),
        "state": flat_state(model, bal),
    }


class WithBalancer(nn.Module):
    """The balancer as a submodule of what DDP wraps (the Lightning / HF Trainer pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = MultiTowerNet(INPUT_DIMS)
        self.balancer = FACTORIES["mlb"](self.model)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(*inputs)


def balancer_inside_ddp(rank: int) -> dict:
    """DDP then syncs the heads; the balancer detects it and does not reduce them again."""
    torch.manual_seed(rank)
    wrapper = WithBalancer()
    ddp = DDP(wrapper)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.2)
    bal = wrapper.balancer
    for step in range(3):
        inputs, target = local_batch(step, rank)
        train_step(ddp, bal, opt, inputs, target)
    return {"parameters": flat_parameters(wrapper), "heads_in_ddp": bal._ranks.heads_in_ddp}


def reduce_mean(rank: int) -> dict:
    """The base helper with per-class sums (C, D) and counts (C, 1), unequal per rank."""
    model = MultiTowerNet(INPUT_DIMS)
    bal = FACTORIES["mlb"](model)
    sums = torch.arange(6.0).reshape(3, 2) * (rank + 1)
    counts = torch.tensor([[1.0], [2.0], [3.0]]) + rank
    bal.add_state("summed", sums, reduce="sum")
    bal.add_state("averaged", counts, reduce="mean")
    return {
        "mean": bal.reduce_mean(sums, counts),
        "scalar": bal.reduce_mean(sums, 2 + rank),
        "summed": bal.synced_state("summed"),
        "averaged": bal.synced_state("averaged"),
    }


def wrong_order(rank: int) -> dict:
    """DDP created before the balancer: refused at the first forward; a DDP model refused."""
    messages = {}
    model = MultiTowerNet(INPUT_DIMS)
    ddp = DDP(model)
    try:
        gb.MLB(ddp, encoders=list(model.towers), num_classes=NUM_CLASSES)
    except ValueError as error:
        messages["construct"] = str(error)
    bal = gb.MLB(model, encoders=list(model.towers), num_classes=NUM_CLASSES)
    inputs, _ = local_batch(0, rank)
    try:
        ddp(*inputs)
    except RuntimeError as error:
        messages["forward"] = str(error)
    bal.remove()
    return messages


def jobs(rank: int) -> list[tuple[str, object]]:
    found = [
        (key, (lambda n=name, o=options: train(rank, n, o))) for key, name, options in scenarios()
    ]
    found += [
        ("accumulate", lambda: accumulate(rank)),
        ("skip-nonfinite", lambda: skip_nonfinite(rank)),
        ("inside-ddp", lambda: balancer_inside_ddp(rank)),
        ("reduce-mean", lambda: reduce_mean(rank)),
        ("wrong-order", lambda: wrong_order(rank)),
    ]
    return found


if __name__ == "__main__":
    serve(jobs)
