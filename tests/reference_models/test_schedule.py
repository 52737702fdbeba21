"""The warm-up + cosine-restart schedule against its formulas and PyTorch's SGDR."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts

from reference_models.schedule import WarmupCosineRestarts, lr_factor, sgdr_factor


def official_formula(t: int) -> float:
    """Cosine restarts with T_0 4, T_mult 2: j = floor(log2(t/4 + 1)),
    T_cur = t - 4(2^j - 1), T_i = 4 * 2^j."""
    j = math.floor(math.log2(t / 4 + 1))
    t_cur = t - 4 * (2**j - 1)
    t_i = 4 * 2**j
    return 0.5 * (1 + math.cos(math.pi * t_cur / t_i))


@pytest.mark.parametrize(
    "t",
    [
        0,
        1,
        3,
        4,
        5,
        11,
        12,
        27,
        28,
        59,
        60,
        123,
        124,
        500,
        780,
        1019,
        1020,
        1021,
        1500,
        2043,
        2044,
        5000,
    ],
)
def test_sgdr_matches_the_closed_form(t):
    assert sgdr_factor(t) == pytest.approx(official_formula(t), abs=1e-12)


def test_sgdr_matches_pytorch_at_absolute_steps():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    reference = CosineAnnealingWarmRestarts(opt, T_0=4, T_mult=2, eta_min=0.0)
    for t in list(range(0, 130)) + [780, 1019, 1020, 3000]:
        reference.step(t)
        assert sgdr_factor(t) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-9), t


def test_cycle_boundaries_restart_at_4_12_28_60():
    for boundary in (4, 12, 28, 60, 124, 252, 508, 1020, 2044):
        assert sgdr_factor(boundary) == pytest.approx(1.0)
        assert sgdr_factor(boundary - 1) < sgdr_factor(boundary - 2) < 1.0


def test_official_step_schedule_values():
    # CREMA-D: W = 780 steps of constant LR, then 0.451 * lr decaying to 0 at step 1020.
    assert lr_factor(0, "step", warmup_steps=780) == 1.0
    assert lr_factor(779, "step", warmup_steps=780) == 1.0
    assert lr_factor(780, "step", warmup_steps=780) == pytest.approx(0.4510, abs=5e-4)
    assert lr_factor(1019, "step", warmup_steps=780) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 511 / 512))
    )
    assert lr_factor(1020, "step", warmup_steps=780) == pytest.approx(1.0)
    # AVE (the MLB authors' later code): W = 1500 gives 0.549 * lr.
    assert lr_factor(1500, "step", warmup_steps=1500) == pytest.approx(0.549, abs=5e-4)


def test_epoch_schedule_values():
    kwargs = dict(warmup_epochs=3, steps_per_epoch=10)
    assert [lr_factor(s, "epoch", **kwargs) for s in (0, 15, 29)] == [1.0, 1.0, 1.0]
    # Restarted at the end of the warm-up, T_0 = 4 epochs: half-way at epoch 5, 0 just before 7.
    assert lr_factor(30, "epoch", **kwargs) == pytest.approx(1.0)
    assert lr_factor(45, "epoch", **kwargs) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 1.5 / 4))
    )
    assert lr_factor(50, "epoch", **kwargs) == pytest.approx(0.5)
    assert lr_factor(69, "epoch", **kwargs) < 0.01
    assert lr_factor(70, "epoch", **kwargs) == pytest.approx(1.0)  # restart; next cycle 8 epochs
    assert lr_factor(110, "epoch", **kwargs) == pytest.approx(0.5)


def test_constant_schedule():
    assert {lr_factor(s, "constant") for s in range(0, 5000, 97)} == {1.0}


def test_scheduler_sets_the_lr_of_each_step_and_resumes_exactly():
    def make():
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.Adam([param], lr=2e-3)
        return opt, WarmupCosineRestarts(opt, "step", warmup_steps=7)

    opt, sched = make()
    seen = []
    for step in range(40):
        seen.append(opt.param_groups[0]["lr"])
        assert seen[-1] == pytest.approx(2e-3 * lr_factor(step, "step", warmup_steps=7))
        opt.step()
        sched.step()
        if step == 19:
            saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    resumed_opt, resumed_sched = make()
    resumed_opt.load_state_dict(saved_opt)
    resumed_sched.load_state_dict(saved_sched)
    for step in range(20, 40):
        assert resumed_opt.param_groups[0]["lr"] == pytest.approx(seen[step])
        resumed_opt.step()
        resumed_sched.step()


def test_epoch_scheduler_needs_steps_per_epoch():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        WarmupCosineRestarts(opt, "epoch")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(schedule="linear"), "schedule"),
        (dict(step=-1), "step"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(step=0, schedule="step")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        lr_factor(args.pop("step"), **args)


def test_sgdr_refuses_bad_cycles():
    with pytest.raises(ValueError):
        sgdr_factor(1.0, t_0=0)
    with pytest.raises(ValueError):
        sgdr_factor(1.0, t_mult=0.5)
    assert sgdr_factor(6.0, t_0=4, t_mult=1) == pytest.approx(0.5)
