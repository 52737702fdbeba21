"""FSDP2 scenarios on 2 gloo processes on the CPU; started by tests/gradbalance/test_fsdp.py.

``python tests/gradbalance/fsdp_worker.py OUT_DIR`` spawns two ranks; each runs every scenario
and saves ``OUT_DIR/rank{r}.pt``: ``{scenario: {...results...} | {"error": traceback}}``.
In every scenario the balancer is built on the plain model first, then ``fully_shard`` wraps
each encoder and the model, then the optimizer takes the (sharded) model parameters and the
balancer's. Both ranks start from the same values (seed 0: ``fully_shard`` keeps each rank's
shard of its own full tensor) and see halves of equal size of each step's batch, so the test
process can compare them with one process on the concatenated batch (:func:`reference`).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

HERE = os.path.dirname(os.path.abspath(__file__))
# This folder (balancer_factories), tests/ (conftest) and, first, the repository root: the
# folder tests/gradbalance must never shadow the package of the same name.
for path in (HERE, os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))):
    sys.path.insert(0, path)

from balancer_factories import FACTORIES, INPUT_DIMS, NUM_CLASSES, train_step  # noqa: E402
from conftest import MultiTowerNet  # noqa: E402
from two_ranks import serve  # noqa: E402

STEPS = 5
PER_RANK = 8
"""Samples per rank and step: equal, so FSDP's mean of the ranks' gradients is the gradient
of the concatenated batch."""
METHODS = ("mlb", "multiloss", "ogm", "agm", "cggm", "opm")
"""The methods compared with one process (output scaling, heads, fused-head slices, AGM's
masked fusion passes and clipping in ``after_backward()``)."""


def global_batch(step: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The concatenated batch of ``step`` (rank 0's samples first)."""
    g = torch.Generator().manual_seed(2000 + step)
    n = 2 * PER_RANK
    inputs = [torch.randn(n, d, generator=g) for d in INPUT_DIMS]
    return inputs, torch.randint(0, NUM_CLASSES, (n,), generator=g)


def local_batch(step: int, rank: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    inputs, target = global_batch(step)
    part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return [x[part] for x in inputs], target[part]


def make_optimizer(model: torch.nn.Module, bal: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.2, momentum=0.5)


def reference(name: str) -> dict:
    """One process on the concatenated batches (run by the test process, not a rank)."""
    torch.manual_seed(0)
    model = MultiTowerNet(INPUT_DIMS)
    bal = FACTORIES[name](model)
    opt = make_optimizer(model, bal)
    coefficients = []
    for step in range(STEPS):
        train_step(model, bal, opt, *global_batch(step))
        coefficients.append(torch.stack(list(bal.coefficients.values())))
    return {"coefficients": torch.stack(coefficients), "parameters": full_parameters(model, bal)}


def full_parameters(*modules: torch.nn.Module) -> torch.Tensor:
    """Every parameter as one vector; sharded ones gathered into full tensors (collective)."""
    tensors = []
    for module in modules:
        for param in module.parameters():
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            tensors.append(full.detach().reshape(-1))
    return torch.cat(tensors)


def shard(model: MultiTowerNet, **options) -> None:
    """fully_shard each encoder, then the model (the root)."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for tower in model.towers:
        fully_shard(tower, mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)


def train(rank: int, name: str, options: dict, balancer_options: dict | None = None) -> dict:
    torch.manual_seed(0)
    model = MultiTowerNet(INPUT_DIMS)
    bal = FACTORIES[name](model, **(balancer_options or {}))
    shard(model, **options)
    opt = make_optimizer(model, bal)
    coefficients, scores = [], []
    for step in range(STEPS):
        train_step(model, bal, opt, *local_batch(step, rank))
        coefficients.append(torch.stack(list(bal.coefficients.values())))
        scores.append(torch.stack(list(bal.scores.values())))
    return {
        "coefficients": torch.stack(coefficients),
        "scores": torch.stack(scores),
        "parameters": full_parameters(model, bal),
        "sharded": all(hasattr(p, "full_tensor") for p in model.parameters()),
    }


def refused(rank: int, name: str, options: dict, balancer_options: dict, heads: bool) -> dict:
    """The error message of a configuration refused at a training step (two steps)."""
    torch.manual_seed(0)
    model = MultiTowerNet(INPUT_DIMS)
    bal = FACTORIES[name](model, **balancer_options)
    shard(model, **options)
    opt = make_optimizer(model, bal) if heads else torch.optim.SGD(model.parameters(), lr=0.2)
    try:
        for step in range(2):
            train_step(model, bal, opt, *local_batch(step, rank))
    except RuntimeError as error:
        return {"type": type(error).__name__, "message": str(error)}
    return {"type": None, "message": ""}


def jobs(rank: int) -> list[tuple[str, object]]:
    found: list[tuple[str, object]] = [
        (name, lambda n=name: train(rank, n, {})) for name in METHODS
    ]
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    per_weight = {"parameters": lambda name, param: name.endswith("weight")}
    reshard = {"reshard_after_forward": True}
    found += [
        ("mlb-reshard-root", lambda: train(rank, "mlb", reshard)),
        ("mlb-bf16-params", lambda: train(rank, "mlb", {"mp_policy": bf16})),
        ("ogm-reshard-root", lambda: refused(rank, "ogm", reshard, {}, True)),
        ("ogm-per-parameter", lambda: refused(rank, "ogm", {}, per_weight, True)),
        ("optimizer-without-heads", lambda: refused(rank, "mlb", {}, {}, False)),
        ("amss-after-balancer", lambda: refused(rank, "amss", {}, {}, True)),
        ("inforeg-after-balancer", lambda: refused(rank, "inforeg", {}, {}, True)),
    ]
    return found


if __name__ == "__main__":
    serve(jobs)
