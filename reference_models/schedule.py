"""The paper's learning-rate schedule: a constant warm-up, then cosine annealing with warm restarts.

Two readings are offered (appendix B.2):

* ``"step"`` (the official code): for optimizer step ``t`` (0-based) the LR is ``lr`` while
  ``t < warmup_steps``; afterwards it is SGDR (``CosineAnnealingWarmRestarts``, T_0 = 4,
  T_mult = 2, eta_min = 0) evaluated at the **absolute** step ``t``, so the cycles are counted
  in steps from the start of training and the LR enters the schedule mid-cycle (0.451·lr at
  ``t = 780``, the CREMA-D warm-up).
* ``"epoch"`` (the appendix's words): the LR is ``lr`` for the first ``warmup_epochs`` epochs;
  afterwards SGDR with T_0 = 4 and T_mult = 2 **epochs**, restarted at the end of the warm-up
  and evaluated at the fractional epoch ``t / steps_per_epoch - warmup_epochs``, so the LR
  falls smoothly within an epoch (PyTorch's recommended use of the scheduler).

``"constant"`` keeps ``lr`` throughout. The schedule is a pure function of the step, so a
resumed run reproduces it exactly (:class:`WarmupCosineRestarts` stores only the step).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["SCHEDULES", "WarmupCosineRestarts", "lr_factor", "sgdr_factor"]

Schedule = Literal["step", "epoch", "constant"]
SCHEDULES: tuple[str, ...] = ("step", "epoch", "constant")


def sgdr_factor(t: float, t_0: float = 4.0, t_mult: float = 2.0) -> float:
    """Cosine annealing with warm restarts, as a fraction of the base LR (eta_min = 0).

    With ``j = floor(log_{t_mult}(t / t_0 * (t_mult - 1) + 1))`` cycles completed, the current
    cycle has length ``T_i = t_0 * t_mult**j`` and position ``T_cur = t - t_0 * (t_mult**j - 1)
    / (t_mult - 1)``; the factor is ``(1 + cos(pi * T_cur / T_i)) / 2``. For ``t_mult = 1`` the
    cycles all have length ``t_0``.

    Args:
        t: position (steps or epochs, may be fractional), >= 0.
        t_0: length of the first cycle.
        t_mult: growth factor of the cycle length (>= 1).

    Example:
        >>> [round(sgdr_factor(t), 4) for t in (0, 2, 4, 8, 12)]
        [1.0, 0.5, 1.0, 0.5, 1.0]
        >>> round(sgdr_factor(780), 3)  # the first post-warm-up step of CREMA-D (official code)
        0.451
    """
    if t < 0:
        raise ValueError(f"the position t must be >= 0, got {t}")
    if not t_0 > 0 or not t_mult >= 1:
        raise ValueError(f"need t_0 > 0 and t_mult >= 1, got t_0={t_0}, t_mult={t_mult}")
    if t_mult == 1:
        position, length = math.fmod(t, t_0), t_0
    else:
        cycles = math.floor(math.log(t / t_0 * (t_mult - 1) + 1, t_mult))
        start = t_0 * (t_mult**cycles - 1) / (t_mult - 1)
        length = t_0 * t_mult**cycles
        position = t - start
        if position >= length:  # float rounding at a boundary: the next cycle has begun
            position, length = position - length, length * t_mult
        elif position < 0:
            length = length / t_mult
            position = position + length
    return 0.5 * (1.0 + math.cos(math.pi * position / length))


def lr_factor(
    step: int,
    schedule: Schedule = "step",
    *,
    warmup_steps: int = 0,
    warmup_epochs: float = 3.0,
    steps_per_epoch: int | None = None,
    t_0: float = 4.0,
    t_mult: float = 2.0,
) -> float:
    """The LR of optimizer step ``step`` (0-based) as a fraction of the base LR.

    Args:
        step: 0-based index of the optimizer step about to be taken.
        schedule: ``"step"``, ``"epoch"`` or ``"constant"`` (see the module docstring).
        warmup_steps: constant-LR steps of the ``"step"`` schedule (780 for CREMA-D in the
            official code).
        warmup_epochs: constant-LR epochs of the ``"epoch"`` schedule (3 in the appendix).
        steps_per_epoch: optimizer steps per epoch; needed by ``"epoch"``.
        t_0: first cycle length (steps for ``"step"``, epochs for ``"epoch"``).
        t_mult: cycle growth factor.

    Example:
        >>> lr_factor(779, "step", warmup_steps=780)
        1.0
        >>> round(lr_factor(780, "step", warmup_steps=780), 3)
        0.451
        >>> epoch = dict(warmup_epochs=3, steps_per_epoch=10)
        >>> [round(lr_factor(s, "epoch", **epoch), 3) for s in (29, 30, 50, 70)]
        [1.0, 1.0, 0.5, 1.0]
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        if step < warmup_steps:
            return 1.0
        return sgdr_factor(step, t_0, t_mult)
    if not steps_per_epoch or steps_per_epoch < 1:
        raise ValueError("the 'epoch' schedule needs steps_per_epoch >= 1")
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return 1.0
    return sgdr_factor(epoch - warmup_epochs, t_0, t_mult)


class WarmupCosineRestarts(LRScheduler):
    """Constant warm-up, then cosine annealing with warm restarts; call ``step()`` per batch.

    After ``n`` calls of :meth:`step` the optimizer's LR is ``base_lr * lr_factor(n, ...)``:
    the LR of the ``n``-th optimizer step (0-based). Its ``state_dict`` is the step count (and
    the options), so a resumed run continues exactly.

    Args:
        optimizer: the optimizer (every parameter group follows the schedule).
        schedule: ``"step"`` (official code), ``"epoch"`` (appendix) or ``"constant"``.
        warmup_steps: warm-up length of ``"step"``.
        warmup_epochs: warm-up length of ``"epoch"``.
        steps_per_epoch: optimizer steps per epoch (for ``"epoch"``).
        t_0: first cycle length (steps or epochs).
        t_mult: cycle growth factor.

    Example:
        >>> opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        >>> sched = WarmupCosineRestarts(opt, "step", warmup_steps=2)
        >>> lrs = []
        >>> for _ in range(6):
        ...     lrs.append(round(opt.param_groups[0]["lr"] / 1e-3, 3))
        ...     opt.step(); sched.step()
        >>> lrs  # steps 0-1 warm-up, then SGDR at the absolute step: t=2 (mid-cycle), 3, 4, 5
        [1.0, 1.0, 0.5, 0.146, 1.0, 0.962]
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule = "step",
        *,
        warmup_steps: int = 0,
        warmup_epochs: float = 3.0,
        steps_per_epoch: int | None = None,
        t_0: float = 4.0,
        t_mult: float = 2.0,
    ) -> None:
        # Validate once, at construction, with the same function the schedule uses.
        lr_factor(
            0,
            schedule,
            warmup_steps=warmup_steps,
            warmup_epochs=warmup_epochs,
            steps_per_epoch=steps_per_epoch,
            t_0=t_0,
            t_mult=t_mult,
        )
        sgdr_factor(0.0, t_0, t_mult)
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.warmup_epochs = warmup_epochs
        self.steps_per_epoch = steps_per_epoch
        self.t_0 = t_0
        self.t_mult = t_mult
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        """The LR factor of optimizer step ``step``."""
        return lr_factor(
            step,
            self.schedule,
            warmup_steps=self.warmup_steps,
            warmup_epochs=self.warmup_epochs,
            steps_per_epoch=self.steps_per_epoch,
            t_0=self.t_0,
            t_mult=self.t_mult,
        )

    def get_lr(self) -> list[float]:  # type: ignore[override]
        factor = self.factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]
