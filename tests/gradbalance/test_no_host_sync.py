"""No host synchronisation in the training step of the baselines' variants that are not in
``balancer_factories`` (every method's default step is checked by
``test_contract.py::test_training_step_makes_no_host_sync``); the guard itself."""

from __future__ import annotations

import math

import pytest
import torch
from balancer_factories import ALL_FACTORIES, INPUT_DIMS, factory_params, make_batch_for
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


def _baseline(name, model, inputs):
    towers = list(model.towers)
    names = [f"towers_{i}" for i in range(len(towers))]
    common = {"num_classes": 4, "flush_every": 1000}
    if name == "agm-feature":
        fusion = lambda *z: model.fusion(torch.cat(z, 1))  # noqa: E731
        return gb.AGM(model, towers, fusion=fusion, clip=True, min_coefficient=0.1, **common)
    if name == "agm-sampled":  # a Shapley estimate from orders drawn every step
        fusion = lambda *z: model.fusion(torch.cat(z, 1))  # noqa: E731
        return gb.AGM(model, towers, fusion=fusion, shapley="sampled", shapley_samples=2, **common)
    if name == "agm-input":
        return gb.AGM(
            model,
            towers,
            masking="input",
            forward_masked=lambda masked: model(
                *(x * 0 if n in masked else x for n, x in zip(names, inputs))
            ),
            clip=True,
            **common,
        )
    if name == "ogm":
        return gb.OGM(model, towers, fusion_head=model.fusion, **common)
    if name == "ogm-conv":
        return gb.OGM(model, towers, parameters=lambda n, p: p.dim() == 2, **common)
    if name == "ogm-ge":
        return gb.OGMGE(model, towers, **common)
    if name == "pmr":
        return gb.PMR(model, towers, **common)
    return gb.MSLR(model, towers, **common)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "name",
    ["ogm", "ogm-conv", "ogm-ge", "agm-feature", "agm-sampled", "agm-input", "pmr", "mslr"],
)
def test_baseline_steps_never_sync(name, device):
    """The training step (loss, backward, after_backward) of every baseline, and the
    per-epoch calls of PMR (prototypes) and MSLR (validation accuracy, epoch_end), make no
    host synchronisation."""
    dims = (5, 7, 3) if name.startswith(("agm", "mslr")) else (5, 7)  # OGM, PMR: M = 2
    model = MultiTowerNet(dims).to(device)
    inputs, target = make_batch(dims)
    inputs, target = [x.to(device) for x in inputs], target.to(device)
    bal = _baseline(name, model, inputs)
    opt = torch.optim.Adam([*model.parameters(), *bal.parameters()])

    def step():
        opt.zero_grad()
        bal.loss(model(*inputs), target).backward()
        bal.after_backward()

    step()  # materialises lazy heads
    opt.step()
    if name == "pmr":
        bal.epoch_end()  # prototypes for the next steps
    sync_debug = device == "cuda"
    for _ in range(2):
        if sync_debug:
            torch.cuda.set_sync_debug_mode("error")
        try:
            with FailOnHostSync():
                step()
                if name in ("pmr", "mslr"):
                    with torch.no_grad():
                        bal.loss(model(*inputs), target)
                    bal.epoch_end()
        finally:
            if sync_debug:
                torch.cuda.set_sync_debug_mode("default")
        opt.step()
    assert bal.steps == 3
    if name == "pmr":
        assert bal.ready and any(v.item() > 0 for v in bal.coefficients.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("separate", [False, True], ids=["stacked-heads", "separate-heads"])
@pytest.mark.parametrize("loss", ["l1", "mse", "huber"])
def test_mlb_regression_step_never_syncs(loss, separate, device):
    """MLB with ``task="regression"`` (heads' regression losses, batch errors as scores, the
    inverted ratio) makes no host synchronisation in loss(), backward() or an evaluation
    loss(); with heads batched into one matmul or run one by one (unequal widths)."""
    dims = (5, 7, 3)
    torch.manual_seed(0)
    model = MultiTowerNet(dims, num_classes=2).to(device)
    widths = [12, 12, 12]
    if separate:  # a tower of another width: the heads cannot be stacked
        model.towers[2][2] = torch.nn.Linear(12, 9)
        model.fusion = torch.nn.Linear(33, 2)
        widths[2] = 9
    model = model.to(device)
    bal = gb.MLB(
        model, list(model.towers), task="regression", output_dim=2, loss=loss, alpha=1.5,
        feature_dims=widths, flush_every=1000,
    )
    opt = torch.optim.Adam([*model.parameters(), *bal.parameters()])
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(10, d, generator=g).to(device) for d in dims]
    target = torch.randn(10, 2, generator=g).to(device)
    for step in range(3):
        sync_debug = device == "cuda" and step > 0
        if sync_debug:
            torch.cuda.set_sync_debug_mode("error")
        try:
            with FailOnHostSync():
                opt.zero_grad()
                bal.loss(model(*inputs), target).backward()
                with torch.no_grad():
                    bal.loss(model(*inputs), target)
        finally:
            if sync_debug:
                torch.cuda.set_sync_debug_mode("default")
        opt.step()
    assert bal.steps == 3
    assert all(float(k) != 1.0 for k in bal.coefficients.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", factory_params(regression=True))
def test_a_step_with_a_presence_mask_never_syncs(name, device):
    """``loss(..., present=)``: the mask's checks (a sample with no modality included), the
    masked statistics and a modality absent from the whole batch (its k and score kept) make
    no host synchronisation, in training and evaluation."""
    torch.manual_seed(0)
    model = MultiTowerNet(INPUT_DIMS).to(device)
    bal = ALL_FACTORIES[name](model, flush_every=1000)
    opt = torch.optim.Adam([*model.parameters(), *bal.parameters()])
    inputs, target = make_batch_for(name, INPUT_DIMS)
    inputs, target = [x.to(device) for x in inputs], target.to(device)
    partly = torch.ones(10, 2, dtype=torch.bool)
    partly[::3, 0] = False
    partly[[1, 4, 8], 1] = False
    video_absent = torch.ones(10, 2, dtype=torch.bool)
    video_absent[:, 1] = False
    masks = [m.to(device) for m in (partly, partly, video_absent)]

    def step(present):
        opt.zero_grad()
        bal.loss(model(*inputs), target, present=present).backward()
        bal.after_backward()
        with torch.no_grad():
            bal.loss(model(*inputs), target, present=present)
        bal.epoch_end()

    step(masks[0])  # materialises lazy state
    opt.step()
    for present in masks[1:]:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            with FailOnHostSync():
                step(present)
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        opt.step()
    assert bal.steps == 3
    assert all(math.isfinite(float(v)) for v in bal.coefficients.values())
