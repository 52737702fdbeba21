"""DDP with uneven presence on 2 gloo processes on the CPU; started by test_missing_ddp.py.

``python tests/gradbalance/missing_ddp_worker.py OUT_DIR`` spawns two ranks; each trains every
entry of ``balancer_factories.ALL_FACTORIES`` for 3 steps with a presence mask (``loss(...,
present=)``) and saves ``OUT_DIR/rank{r}.pt``. Rank 0's samples all lack the second modality,
rank 1's miss either at random; at step 1 the second modality is absent on both ranks. The
test process compares step 0 with one process on the concatenated batch and mask.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (HERE, os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))):
    sys.path.insert(0, path)

from balancer_factories import ALL_FACTORIES, INPUT_DIMS, flat_parameters  # noqa: E402
from conftest import MultiTowerNet  # noqa: E402
from ddp_worker import SIZES, global_batch  # noqa: E402
from two_ranks import serve  # noqa: E402

STEPS = 3


def global_mask(step: int) -> torch.Tensor:
    """The concatenated batch's ``(B, 2)`` mask at ``step`` (rank 0's samples first)."""
    g = torch.Generator().manual_seed(2000 + step)
    mask = torch.rand(sum(SIZES), 2, generator=g) < 0.6
    mask[~mask.any(1), 0] = True  # every sample keeps a modality
    mask[: SIZES[0], 0], mask[: SIZES[0], 1] = True, False  # rank 0: the second one absent
    if step == 1:  # absent from the whole global batch
        mask[:, 0], mask[:, 1] = True, False
    return mask


def local(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    start = sum(SIZES[:rank])
    return tensor[start : start + SIZES[rank]]


def head_gradients(bal) -> torch.Tensor:
    """The heads' parameter gradients as one vector (zeros where none)."""
    grads = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
        for p in bal.heads.parameters()
    ]
    return torch.cat(grads) if grads else torch.zeros(0)


def train(rank: int, name: str, sync: str) -> dict:
    torch.manual_seed(rank)
    model = MultiTowerNet(INPUT_DIMS)
    bal = ALL_FACTORIES[name](model, sync=sync)
    init = (copy.deepcopy(model.state_dict()), copy.deepcopy(bal.state_dict()))
    ddp = DDP(model)
    opt = torch.optim.SGD([*ddp.parameters(), *bal.parameters()], lr=0.2, momentum=0.5)
    coefficients, scores, grads = [], [], []
    for step in range(STEPS):
        inputs, target = global_batch(step, name)
        present = local(global_mask(step), rank)
        opt.zero_grad(set_to_none=True)
        loss = bal.loss(ddp(*[local(x, rank) for x in inputs]), local(target, rank), present)
        loss.backward()
        bal.after_backward()
        grads.append(head_gradients(bal))
        opt.step()
        coefficients.append(bal.last_coefficients.clone())
        scores.append(bal.last_scores.clone())
    return {
        "coefficients": torch.stack(coefficients),
        "scores": torch.stack(scores),
        "head_gradients": grads,
        "parameters": flat_parameters(model, bal),
        "init": init if rank == 0 else None,
    }


def jobs(rank: int) -> list[tuple[str, object]]:
    return [
        (f"{name}-{sync}", (lambda n=name, s=sync: train(rank, n, s)))
        for name in ALL_FACTORIES
        for sync in ("global", "local")
    ]


if __name__ == "__main__":
    serve(jobs)
