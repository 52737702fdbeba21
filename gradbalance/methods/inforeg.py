"""InfoReg: Information Acquisition Regulation (Huang et al., CVPR 2025)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from gradbalance._checks import check_int, check_number, per_encoder
from gradbalance._step import Step
from gradbalance.coefficients import inforeg_betas, inforeg_trace_change
from gradbalance.errors import ConfigurationError, MissingCallWarning
from gradbalance.methods._base import Method, WindowUnit


class InfoReg(Method):
    """InfoReg: hold the information-sufficient modality back during the prime learning window.

    Huang, Wei, Yang and Hu, "Adaptive Unimodal Regulation for Balanced Multimodal Information
    Acquisition" (CVPR 2025). The loss is Multi-Loss's, ``CE(fused) + sum_m CE(head_m(z_m))``
    (the official code trains the fused loss and one loss per modality). Every training step,
    each head's score ``s_m`` (its mean true-class probability over the global batch) gives
    the proximal strength of every modality
    (:func:`~gradbalance.coefficients.inforeg_betas`)::

        beta_m = strength_m * exp(tanh(gap_scale * (s_m - mean_{j != m} s_j)))

    for a modality ahead of the mean of the others, 0 for the rest, and 0 outside the prime
    learning window. :meth:`after_backward` then adds the gradient of the proximal term
    ``beta_m / 2 * ||theta_m - theta_m^0||^2`` to encoder m's parameter gradients::

        grad(theta_m) <- grad(theta_m) + beta_m * (theta_m - theta_m^0)

    with ``theta_m^0`` encoder m's parameters at the start of the epoch (copied by
    :meth:`epoch_end`; at construction for the first epoch). The regulation thus pulls the
    dominant encoder back towards where the epoch started, more strongly the larger its lead.

    The prime learning window is read from the Fisher-information trace: each step,
    :meth:`after_backward` adds ``sum_W mean(grad(W)^2)`` over the encoders' weight tensors
    (``dim >= 2``: conv kernels and linear weights, as the official code's Conv2d/Linear
    weights; biases and norm parameters are left out) to the epoch's trace ``T_e``. At each
    :meth:`epoch_end`, with ``T`` the last ``trace_epochs + 1`` epochs' traces (zeros before the
    first), the relative growth ``(T[-1] - T[0]) / sum(T[1:])``
    (:func:`~gradbalance.coefficients.inforeg_trace_change`) decides the next epoch: it is in
    the window while the growth exceeds ``threshold``. The first epoch is in the window.

    Call :meth:`after_backward` after ``loss.backward()`` (after ``scaler.unscale_(opt)`` under
    AMP) and before ``opt.step()``, and :meth:`epoch_end` once per epoch. After DDP's
    all-reduce the gradients, the parameters and the strengths are the same on every rank,
    so the added term is too. The trace is read over the ranks (one all-reduce per epoch).
    No host synchronisation: the window's flag stays on the device and multiplies beta.

    Memory: the epoch-start copy ``theta^0`` doubles the encoders' parameter memory (it is
    part of ``state_dict()``, so checkpoints grow by the encoders' size as well), and
    :meth:`after_backward` allocates ``theta - theta^0`` for the pull (a temporary of the
    encoders' size, freed before ``opt.step()``).

    Missing modalities (``loss(..., present=)``): each head's loss and score are its mean over
    the samples where the modality is present (as :class:`MultiLoss`), so beta comes from the
    present samples only; the default ``gap_scale`` stays the (global) number of samples. A
    modality absent from the whole global batch keeps its score and beta (its encoder is still
    pulled with that beta, inside the prime learning window only); the Fisher trace reads the
    gradients as they are.

    ``coefficients`` are the strengths ``beta_m`` of the step (not gradient scales: nothing
    is scaled in ``backward()``); :attr:`trace_change` and :attr:`in_prime_window` show the
    window.

    Args:
        model: the multimodal model (unchanged by the balancer).
        encoders: the M >= 2 modality submodules (list or dict ``name -> module``).
        num_classes: number of classes (classification only).
        strength: the factor ``strength_m`` of beta, >= 0, once or per encoder (list or dict).
            The official code uses 0.95 for audio and 0.1 for video on CREMA-D.
        gap_scale: multiplies the mean-score gap inside ``tanh``, > 0. ``None`` (default):
            the global batch size, which is the official rule (its scores are the batch sums
            of the true-class probability, so ``tanh`` is nearly saturated).
        threshold: the window is open while the trace's relative growth exceeds it (0.05).
        trace_epochs: ``h``, the epochs of the trace's moving average (10), an int >= 1.
        trace_encoders: the encoders whose weights' trace decides the window; ``None``
            (default): every encoder (the official code reads the audio encoder's alone).
        enabled: regulate at all (False: every beta is 0; scores are still recorded).
        window: ``(start, end)`` inclusive range of epochs (or steps) in which InfoReg may
            regulate (inside it, the prime learning window decides).
        window_unit: ``"epoch"`` or ``"step"``.
        **common: the options of :class:`~gradbalance.Balancer` (``feature_dims``, ``pool``,
            ``features``, ``flush_every``, ``sync``, ...).

    Example:
        >>> import torch, gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.InfoReg(model, encoders=[model.audio, model.video], num_classes=3)
        >>> opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
        >>> for epoch in range(2):
        ...     for _ in range(3):
        ...         x_a, x_v, y = torch.randn(8, 8), torch.randn(8, 6), torch.randint(0, 3, (8,))
        ...         bal.loss(model(x_a, x_v), y).backward()
        ...         bal.after_backward()  # adds beta * (theta - theta_epoch_start)
        ...         opt.step()
        ...         opt.zero_grad()
        ...     bal.epoch_end()  # new theta_epoch_start, the window for the next epoch
        >>> sorted(float(b) > 0 for b in bal.coefficients.values())  # one modality regulated
        [False, True]
        >>> bool(bal.in_prime_window)  # the trace is still growing
        True
    """

    strengths: torch.Tensor
    traces: torch.Tensor
    epoch_trace: torch.Tensor
    prime: torch.Tensor
    trace_change: torch.Tensor
    """The trace's relative growth at the last :meth:`epoch_end` (1 before the first)."""

    scales_gradients = False

    def __init__(
        self,
        model: nn.Module,
        encoders: Sequence[nn.Module] | Mapping[str, nn.Module],
        num_classes: int | None = None,
        *,
        strength: float | Sequence[float] | Mapping[str, float] = 0.95,
        gap_scale: float | None = None,
        threshold: float = 0.05,
        trace_epochs: int = 10,
        trace_encoders: Sequence[str] | None = None,
        enabled: bool = True,
        window: Sequence[int | None] = (0, None),
        window_unit: WindowUnit = "epoch",
        **common: Any,
    ) -> None:
        if gap_scale is not None:
            gap_scale = check_number("gap_scale", gap_scale, minimum=0.0, strict=True)
        threshold = check_number("threshold", threshold)
        trace_epochs = check_int("trace_epochs", trace_epochs, 1)
        super().__init__(
            model, encoders, num_classes, enabled=enabled, window=window,
            window_unit=window_unit, **common,
        )  # fmt: skip
        strengths = per_encoder(strength, self.names, "strength")
        self.strength = {
            name: check_number(f"strength for {name!r}", value, minimum=0.0)
            for name, value in strengths.items()
        }
        self.gap_scale = gap_scale
        self.threshold = threshold
        self.trace_epochs = trace_epochs
        self.trace_encoders = self._check_trace_encoders(trace_encoders)
        self._parameters_by_encoder = self._encoder_parameters("encoder")
        self.watch_parameters(  # a partial, not a lambda: the balancer pickles
            self._parameters_by_encoder, partial(self._encoder_parameters, "encoder")
        )
        self._starts: dict[str, list[str]] = {}
        for name, params in self._parameters_by_encoder.items():
            self._starts[name] = []
            for param in params:
                state = f"epoch_start_{sum(map(len, self._starts.values()))}"
                self.add_state(state, param.detach())
                self._starts[name].append(state)
        self.add_state("strengths", torch.tensor(list(self.strength.values())))
        self.add_state("traces", torch.zeros(trace_epochs + 1))
        self.add_state("epoch_trace", torch.zeros(()), reduce="mean")
        self.add_state("prime", torch.ones(()))
        self.add_state("trace_change", torch.ones(()))
        self._step_pending = False
        self._regulate = False
        self._epoch_start_taken = False  # at the first step (after DDP aligned the replicas)
        self._after_backward_calls = 0
        self._warned = False

    def _check_trace_encoders(self, trace_encoders: Sequence[str] | None) -> tuple[str, ...]:
        if trace_encoders is None:
            return tuple(self.names)
        if isinstance(trace_encoders, str) or not all(
            isinstance(name, str) for name in trace_encoders
        ):
            raise ConfigurationError(
                f"trace_encoders must be a list of encoder names, got {trace_encoders!r}"
            )
        unknown = sorted(set(trace_encoders) - set(self.names))
        if unknown or not trace_encoders:
            raise ConfigurationError(
                f"trace_encoders must name one or more of the encoders {list(self.names)}, "
                f"got {list(trace_encoders)!r}"
            )
        return tuple(name for name in self.names if name in trace_encoders)

    @property
    def in_prime_window(self) -> torch.Tensor:
        """0-dim bool tensor: whether this epoch is in the prime learning window."""
        return self.prime > 0

    def epoch_end_reason(self) -> str | None:
        return "it copies the encoders' parameters and decides the prime learning window there"

    def _loss(self, step: Step) -> torch.Tensor:
        losses, scores = step.head_terms(scaled=False)
        fused = step.fused_loss()
        if step.training:
            self._regulate = self.active()
            self._step_pending = True
            if self._regulate:
                betas = inforeg_betas(scores, self.strengths, self._gap_scale(step)) * self.prime
            else:
                betas = torch.zeros_like(scores)
            step.store(betas, scores)
            self._warn_without_after_backward()
        return fused + losses.sum().to(fused.device)

    def _gap_scale(self, step: Step) -> float | torch.Tensor:
        """``gap_scale``, or the batch size (the global one with ``sync="global"``)."""
        if self.gap_scale is not None:
            return self.gap_scale
        if self.sync != "global" or self.world_size() == 1:
            return float(step.batch_size)
        local = torch.full((1,), float(step.batch_size), device=self.last_scores.device)
        return step.mean(local, 1.0)[0] * self.world_size()  # sum over the ranks

    def _warn_without_after_backward(self) -> None:
        if not self._after_backward_calls and self.steps >= 50 and not self._warned:
            self._warned = True
            warnings.warn(
                "InfoReg adds its proximal term and reads the Fisher trace in "
                "bal.after_backward(), which was never called: call it after loss.backward() "
                "(after scaler.unscale_(opt) under AMP) and before opt.step()",
                MissingCallWarning,
                stacklevel=4,
            )

    def _state_list(self, names: list[str]) -> list[torch.Tensor]:
        return [getattr(self, name) for name in names]

    @torch.no_grad()
    def after_backward(self) -> None:
        """Add ``beta_m (theta_m - theta_m^0)`` to encoder m's gradients and the step's
        squared weight gradients to the epoch's Fisher trace; call before ``opt.step()``.

        Once per training step: a second call before the next ``loss()`` does nothing.
        """
        self._after_backward_calls += 1
        if not self._step_pending:
            return
        self._step_pending = False
        if not self._epoch_start_taken:
            self._take_epoch_start()
        # A modality absent from the step's global batch kept the beta of an earlier step:
        # the current window still decides (prime is 1 for the others' betas already).
        betas = self.replica_mean(self.last_coefficients) * self.prime
        step_trace = torch.zeros((), device=self.epoch_trace.device)
        for index, name in enumerate(self.names):
            params, starts = self._parameters_by_encoder[name], self._starts[name]
            pairs = [(p, s) for p, s in zip(params, self._state_list(starts)) if p.grad is not None]
            if not pairs:
                continue
            grads = [p.grad for p, _ in pairs if p.grad is not None]  # (for the type checker)
            if self._regulate:
                beta = betas[index].to(grads[0].device)
                pulls = torch._foreach_sub([p for p, _ in pairs], [s for _, s in pairs])
                torch._foreach_mul_(pulls, beta)
                torch._foreach_add_(grads, pulls)
            if name in self.trace_encoders:
                step_trace = step_trace + self._trace([g for g in grads if g.dim() >= 2])
        finite = torch.isfinite(step_trace)  # an AMP overflow step adds nothing
        self.epoch_trace += torch.where(finite, step_trace, torch.zeros_like(step_trace))

    def _trace(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """``sum_g mean(g^2)`` over ``grads`` (float32, on the balancer's device)."""
        device = self.epoch_trace.device
        if not grads:
            return torch.zeros((), device=device)
        norms = torch._foreach_norm(grads)  # one kernel for all, not one per gradient
        torch._foreach_div_(norms, [math.sqrt(max(g.numel(), 1)) for g in grads])
        uniform = all(n.device == device and n.dtype == norms[0].dtype for n in norms)
        stacked = torch.stack(norms if uniform else [n.float().to(device) for n in norms])
        return stacked.float().square().sum()

    @torch.no_grad()
    def epoch_end(self) -> None:
        """Close the epoch: the window of the next from the trace, and ``theta^0`` anew."""
        super().epoch_end()
        trace = self.synced_state("epoch_trace").to(self.traces.dtype).reshape(1)
        self.traces.copy_(torch.cat([self.traces[1:], trace]))
        change = inforeg_trace_change(self.traces)
        self.trace_change.copy_(change)
        self.prime.copy_((change > self.threshold).to(self.prime.dtype))
        self.epoch_trace.zero_()
        self._take_epoch_start()

    def _take_epoch_start(self) -> None:
        """``theta^0 <- theta`` for every encoder (one foreach copy each)."""
        for name, params in self._parameters_by_encoder.items():
            if params:
                sources: list[torch.Tensor] = list(params)
                torch._foreach_copy_(self._state_list(self._starts[name]), sources)
        self._epoch_start_taken = True

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "epoch_start_taken": self._epoch_start_taken}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self._epoch_start_taken = bool(state.get("epoch_start_taken", False))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, strength={self.strength}, gap_scale={self.gap_scale}, "
            f"threshold={self.threshold}, trace_epochs={self.trace_epochs}, "
            f"trace_encoders={list(self.trace_encoders)}, {self._window_repr()}"
        )
