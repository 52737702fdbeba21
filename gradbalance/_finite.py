"""The non-finite guard: device-side flags for a step's inputs and gradients, no host sync.

A tensor's float32 sum is finite exactly when every element is (short of an overflow of the
sum itself), and ``x * 0 == 0`` is the cheapest finiteness test of a number.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradbalance.errors import NonFiniteError


def nonfinite_message(what: str, step: int) -> str:
    """The error of a non-finite training step, with the fixes."""
    return (
        f"gradbalance: non-finite values (NaN or inf) in {what} at training step {step}. "
        "Check that modality's inputs, the learning rate and the loss scale. To skip such "
        "steps instead (e.g. float16 autocast with a GradScaler, which drops overflow "
        "steps), create the balancer with nonfinite='skip'."
    )


def finite_flags(
    features: torch.Tensor | Sequence[torch.Tensor], logits: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """``(M + 1,)`` bool on ``device``: whether each feature and the logits are all finite.

    Args:
        features: the M features, as a list or stacked into one ``(M, B, D)`` tensor (one
            reduction for all).
        logits: the fused logits.
        device: where the flags live.
    """
    if isinstance(features, torch.Tensor):
        sums = [features.sum(dim=(1, 2), dtype=torch.float32).to(device)]
    else:
        sums = [f.sum(dtype=torch.float32).to(device).reshape(1) for f in features]
    sums.append(logits.sum(dtype=torch.float32).to(device).reshape(1))
    return torch.cat(sums) * 0 == 0


def is_finite(tensor: torch.Tensor) -> torch.Tensor:
    """0-dim bool: whether every element of ``tensor`` is finite (no host sync)."""
    return tensor.detach().sum(dtype=torch.float32) * 0 == 0


class GradientGuard:
    """Per-encoder flags of whether the gradients into the encoders' outputs were finite.

    :meth:`watch` gives the callable each tap's backward calls with its gradient; the flags
    collect every backward since the last :meth:`reset` (so gradient accumulation is
    covered). On the CPU a non-finite gradient can raise at once (``raise_at_once``): reading
    a CPU tensor is no device synchronisation.

    Args:
        names: the encoders' names.
        device: where the flags live.
    """

    def __init__(self, names: Sequence[str], device: torch.device) -> None:
        self.names = list(names)
        self.flags = torch.ones(len(self.names), dtype=torch.bool, device=device)
        self.raise_at_once = False
        self.step = 0

    def watch(self, index: int):
        """The gradient callback of encoder ``index``."""

        def record(grad: torch.Tensor) -> None:
            finite = is_finite(grad).to(self.flags.device)
            if self.raise_at_once and not bool(finite):
                raise NonFiniteError(
                    nonfinite_message(f"the gradient into encoder {self.names[index]!r}", self.step)
                )
            self.flags[index] &= finite

        return record

    def all_finite(self) -> torch.Tensor:
        """0-dim bool: every gradient since the last reset was finite."""
        return self.flags.all()

    def reset(self) -> None:
        """Start collecting for the next optimizer step."""
        self.flags.fill_(True)
