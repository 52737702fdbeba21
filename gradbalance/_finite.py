"""The non-finite guard: device-side flags for a step's inputs and gradients, no host sync.

A tensor's float32 sum is finite exactly when every element is (short of an overflow of the
sum itself), and ``x * 0 == 0`` is the cheapest finiteness test of a number.

With ``nonfinite="raise"`` a non-finite step raises at once when its tensors are on the CPU
(reading a CPU tensor is no device synchronisation); on an accelerator the guard records on
the device the first step at which each checked tensor was non-finite and raises at the next
:meth:`NonFiniteGuard.raise_recorded` (the balancer calls it at each history flush). With
``"skip"`` the step's flag tells the balancer to leave its state unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def is_finite(tensor: torch.Tensor) -> torch.Tensor:
    """0-dim bool: whether every element of ``tensor`` is finite (no host sync)."""
    return tensor.detach().sum(dtype=torch.float32) * 0 == 0


def finite_flags(
    features: torch.Tensor | Sequence[torch.Tensor], logits: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """``(M + 1,)`` bool on ``device``: whether each feature and the logits are all finite.

    Call under ``torch.no_grad()``.

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


class NonFiniteGuard:
    """The non-finite policy of one balancer, for its inputs and (optionally) gradients.

    Args:
        names: the encoders' names.
        device: where the flags live.
        policy: ``"raise"`` or ``"skip"``.
        check_gradients: also watch the gradients into the encoders' outputs.
    """

    def __init__(
        self, names: Sequence[str], device: torch.device, policy: str, check_gradients: bool
    ) -> None:
        self.names = list(names)
        self.policy = policy
        self.check_gradients = check_gradients
        self.defer_errors = False
        self.step = 0
        self.last_finite: torch.Tensor | None = None
        self.first: torch.Tensor | None = None
        self.gradients = torch.ones(len(self.names), dtype=torch.bool, device=device)
        self.labels = [f"the feature of encoder {n!r}" for n in self.names]
        self.labels += ["the fused logits", "the gradients into the encoders"]

    def raises_at_once(self, tensor: torch.Tensor) -> bool:
        """Whether a non-finite step raises at once (``"raise"`` with tensors on the CPU)."""
        cpu = tensor.device.type == "cpu" and self.gradients.device.type == "cpu"
        return self.policy == "raise" and not self.defer_errors and cpu

    def assert_finite(self, flags: torch.Tensor, labels: Sequence[str]) -> None:
        """Raise at once naming the first non-finite tensor (CPU tensors only)."""
        try:  # on the CPU the assertion is synchronous, and no device synchronisation
            torch._assert_async(flags.all(), "non-finite")
        except RuntimeError:
            label = labels[flags.tolist().index(False)]
            raise NonFiniteError(nonfinite_message(label, self.step)) from None

    def check_inputs(
        self, features: torch.Tensor | Sequence[torch.Tensor], logits: torch.Tensor
    ) -> torch.Tensor | None:
        """This step's finite flag (None: checked, and raised at once, on the CPU)."""
        with torch.no_grad():
            flags = finite_flags(features, logits, self.gradients.device)
            if self.raises_at_once(logits):
                self.assert_finite(flags, self.labels)
                return None
            if self.policy == "raise":
                self.record(flags, 0)
            return flags.all()

    def record(self, flags: torch.Tensor, offset: int) -> None:
        """Remember on the device the first step at which each checked tensor was non-finite."""
        first = self.first
        if first is None or first.device != flags.device:
            first = torch.full((len(self.labels),), -1, dtype=torch.int64, device=flags.device)
        end = offset + flags.numel()
        part = torch.where(~flags & (first[offset:end] < 0), self.step, first[offset:end])
        self.first = torch.cat([first[:offset], part, first[end:]])

    def raise_recorded(self) -> None:
        """Raise the error of a recorded non-finite step (one host synchronisation)."""
        first = self.first
        if first is None:
            return
        for label, step in zip(self.labels, first.tolist()):
            if step >= 0:
                self.first = None
                raise NonFiniteError(nonfinite_message(label, step))

    def watch(self, index: int) -> Callable[[torch.Tensor], None] | None:
        """The gradient callback of encoder ``index`` (None without ``check_gradients``)."""
        if not self.check_gradients:
            return None

        def record(grad: torch.Tensor) -> None:
            finite = is_finite(grad).to(self.gradients.device)
            if self.raises_at_once(grad):
                name = self.names[index]
                self.assert_finite(finite.reshape(1), [f"the gradient into encoder {name!r}"])
            self.gradients[index] &= finite

        return record

    def gradients_finite(self) -> torch.Tensor:
        """0-dim bool: every gradient watched since the last optimizer step was finite."""
        return self.gradients.all()

    def close_step(self, optimizer: torch.optim.Optimizer, skipped: torch.Tensor) -> None:
        """At an optimizer step over the model, with ``check_gradients``: ``"raise"`` records
        a non-finite gradient (device-side); ``"skip"`` skips the step (the gradients of the
        optimizer's parameters are set to None, one host synchronisation) and counts it in
        ``skipped``. The flags then restart for the next step."""
        if not self.check_gradients:
            return
        finite = self.gradients.all()
        self.gradients = torch.ones_like(self.gradients)
        if self.policy == "raise":
            self.record(finite.reshape(1), len(self.names) + 1)
            return
        self.last_finite = finite if self.last_finite is None else finite & self.last_finite
        if not bool(finite):  # the documented host synchronisation of check_gradients="skip"
            skipped.add_(1)
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None

    def step_finite(self) -> torch.Tensor:
        """0-dim bool: whether the last training step (and the gradients since) was finite."""
        finite = self.last_finite
        if finite is None:
            finite = torch.ones((), dtype=torch.bool, device=self.gradients.device)
        return finite & self.gradients.all() if self.check_gradients else finite
