"""The training step of MLB, Multi-Loss and Joint makes no host synchronisation."""

from __future__ import annotations

import pytest
import torch
from conftest import MultiTowerNet, make_batch
from torch.utils._python_dispatch import TorchDispatchMode

import gradbalance as gb


class FailOnHostSync(TorchDispatchMode):
    """Raises on ``aten._local_scalar_dense``, the op behind ``.item()``/``bool()``/``float()``."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("host synchronisation inside the training step")
        return func(*args, **(kwargs or {}))


def test_the_guard_catches_item():
    with pytest.raises(AssertionError, match="host synchronisation"), FailOnHostSync():
        torch.ones(()).item()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", [gb.MLB, gb.MultiLoss, gb.Joint])
def test_loss_and_backward_never_sync(method, device):
    model = MultiTowerNet((5, 7, 3)).to(device)
    options = {"probes": True} if method is gb.Joint else {}
    bal = method(model, encoders=list(model.towers), num_classes=4, flush_every=1000, **options)
    opt = torch.optim.Adam([*model.parameters(), *bal.parameters()])
    inputs, target = make_batch((5, 7, 3))
    inputs, target = [x.to(device) for x in inputs], target.to(device)
    bal.loss(model(*inputs), target).backward()  # materialises the lazy heads
    opt.step()
    sync_debug = device == "cuda"
    for _ in range(3):
        if sync_debug:
            torch.cuda.set_sync_debug_mode("error")
        try:
            with FailOnHostSync():
                opt.zero_grad()
                loss = bal.loss(model(*inputs), target)
                loss.backward()
        finally:
            if sync_debug:
                torch.cuda.set_sync_debug_mode("default")
        opt.step()
    assert bal.steps == 4
