"""MSLR: Modality-Specific Learning Rates, "dynamic" strategy (Yao & Mihalcea, 2022)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradbalance._checks import check_int, check_number, per_encoder
from gradbalance._step import Step
from gradbalance.coefficients import mslr_coefficients
from gradbalance.errors import InputError, OrderError
from gradbalance.methods._base import SlicedScoresMethod
from gradbalance.methods._earlier_states import per_modality_validation_counts
from gradbalance.methods._presence import means_and_seen, present_counts

Accuracies = torch.Tensor | Sequence[float] | Mapping[str, float]


class MSLR(SlicedScoresMethod):
    """MSLR: per-epoch gradient scales from each modality's validation-accuracy trend.

    Within an epoch each encoder's gradient is multiplied by a constant ``k_m`` (standing in
    for a per-modality learning rate, as every re-implementation does). At :meth:`epoch_end`,
    with ``acc_m`` this epoch's validation accuracy of modality m and ``mean_m`` the mean of
    its last ``memory_epochs`` accuracies, ``k_m = acc_m / mean_m * initial_m``
    (:func:`~gradbalance.coefficients.mslr_coefficients`); while fewer than ``memory_epochs``
    accuracies are remembered, ``k_m = initial_m``. The loss is the fused cross-entropy only
    (plus the probes' own, which reaches only the probes).

    The per-modality accuracies come from the fused head's slices (``fusion_head``, as the MLB
    authors' code) or from detached linear probes trained alongside. The balancer collects
    them itself: every ``bal.loss(logits, y)`` called under ``torch.no_grad()`` (your
    validation loop) adds the batch to this epoch's counts; then :meth:`epoch_end` applies
    them. You can also pass the accuracies:
    ``bal.epoch_end(accuracies={"audio": 0.61, "video": 0.48})``. Every evaluation ``loss()``
    counts (under ``torch.no_grad()``, or after ``bal.eval()``), so run only
    validation batches through it between two ``epoch_end()`` calls.

    Args:
        model: the multimodal model (unchanged by the balancer).
        encoders: one submodule per modality (list or dict ``name -> module``).
        num_classes: number of classes.
        initial: the initial factors λ_m, once or per encoder (the configs use 0.9 for audio
            and 1.1 for video; default 1.0).
        memory_epochs: K, how many past accuracies the trend is measured against (5 in the
            configs).
        fusion_head: as :class:`OGM` (``None``: detached probes).
        probes: as :class:`OGM` (with ``fusion_head``: also detached probes, for
            :meth:`~gradbalance.Balancer.unimodal_logits`).
        enabled: modulate at all (False: every k is 1).
        **common: the options of :class:`~gradbalance.balancer.Balancer`.

    Example:
        >>> import torch, gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.MSLR(model, encoders=[model.audio, model.video], num_classes=3,
        ...               initial=[0.9, 1.1], memory_epochs=1)
        >>> a, v, y = torch.randn(6, 8), torch.randn(6, 6), torch.tensor([0, 1, 2, 0, 1, 2])
        >>> for epoch in range(3):
        ...     bal.loss(model(a, v), y).backward()          # training step
        ...     with torch.no_grad():
        ...         _ = bal.loss(model(a, v), y)             # validation: collected
        ...     bal.epoch_end()
        >>> bal.epoch, bal.memory_size  # from now on k = acc / mean(last accuracy) * initial
        (3, 1)
        >>> bal.epoch_end(accuracies={"audio": 0.5, "video": 0.5})  # or pass them yourself
    """

    initial: torch.Tensor
    epoch_coefficients: torch.Tensor
    memory: torch.Tensor
    accuracies: torch.Tensor
    validation_correct: torch.Tensor
    validation_counts: torch.Tensor

    head_mode = "probe"

    def __init__(
        self,
        model: nn.Module,
        encoders: Sequence[nn.Module] | Mapping[str, nn.Module],
        num_classes: int | None = None,
        *,
        initial: float | Sequence[float] | Mapping[str, float] = 1.0,
        memory_epochs: int = 5,
        fusion_head: nn.Module | None = None,
        probes: bool = False,
        enabled: bool = True,
        **common: Any,
    ) -> None:
        check_int("memory_epochs", memory_epochs, 1)
        super().__init__(
            model,
            encoders,
            num_classes,
            enabled=enabled,
            fusion_head=fusion_head,
            probes=probes,
            **common,
        )
        factors = {
            name: check_number(f"initial factor for {name!r}", value, minimum=0.0, strict=True)
            for name, value in per_encoder(initial, self.names, "initial").items()
        }
        self.memory_epochs = memory_epochs
        device = self.last_scores.device
        m = len(self.names)
        self.register_buffer(
            "initial", torch.tensor([float(factors[n]) for n in self.names], device=device)
        )
        self.add_state("epoch_coefficients", self.initial)
        self.add_state("memory", torch.zeros(memory_epochs, m))
        self.add_state("accuracies", torch.zeros(m))
        self.add_state("validation_correct", torch.zeros(m))
        self.add_state("validation_counts", torch.zeros(m))
        self.memory_size = 0
        self._validation_seen = 0
        self._validation_masked = False  # a loss(..., present=) was collected this epoch
        self._show_epoch_coefficients()

    def _loss(self, step: Step) -> torch.Tensor:
        total = F.cross_entropy(step.logits, step.target) + self._probe_loss(step)
        if step.training:
            coefficients = self.epoch_coefficients
            if not self.active():
                coefficients = torch.ones_like(coefficients)
            step.store(coefficients, self.accuracies)
        else:  # an evaluation loss(): count each modality's correct predictions
            self._collect_validation(step)
        return total

    @torch.no_grad()
    def _collect_validation(self, step: Step) -> None:
        """Each modality's correct predictions and samples, over the samples where it is
        present (``loss(..., present=)``)."""
        logits = self._modality_logits(step)
        correct = self.validation_correct
        if isinstance(logits, torch.Tensor):
            hits = logits.argmax(dim=-1) == step.target.to(logits.device)
        else:
            hits = torch.stack(
                [(u.argmax(dim=-1) == step.target.to(u.device)).to(correct.device) for u in logits]
            )
        correct += step.present_sums(hits.to(torch.float32)).to(correct.device)
        self.validation_counts += present_counts(step.present, step.batch_size, correct)
        self._validation_seen += step.batch_size
        self._validation_masked |= step.present is not None

    def _as_tensor(self, accuracies: Accuracies) -> torch.Tensor:
        device = self.initial.device
        if isinstance(accuracies, Mapping):
            missing = set(self.names) - set(accuracies)
            if missing:
                raise InputError(f"accuracies miss the encoder(s) {sorted(missing)}")
            values = torch.stack(
                [torch.as_tensor(accuracies[n], dtype=torch.float32) for n in self.names]
            )
        else:
            values = torch.as_tensor(accuracies, dtype=torch.float32)
        if values.shape != (len(self.names),):
            raise InputError(
                f"accuracies must hold one value per encoder ({len(self.names)}), "
                f"got shape {tuple(values.shape)}"
            )
        return values.to(device)

    @torch.no_grad()
    def epoch_end(self, accuracies: Accuracies | None = None) -> None:
        """Apply this epoch's validation accuracies; the next epoch uses the new coefficients.

        Args:
            accuracies: per-modality accuracies (tensor, sequence or ``{name: value}``);
                omitted, the ones collected by ``loss()`` calls under ``torch.no_grad()``
                since the last ``epoch_end()``.

        Raises:
            OrderError: no accuracies were given and none were collected (a RuntimeError).
        """
        if accuracies is None:
            if not self._validation_seen:
                raise OrderError(
                    "MSLR has no validation accuracy for this epoch: run your validation loop "
                    "with bal.loss(model(...), y) under torch.no_grad() before epoch_end(), or "
                    "pass epoch_end(accuracies={name: accuracy})"
                )
            current, seen = self._validation_accuracies()
        else:
            current = self._as_tensor(accuracies)
            seen = torch.ones_like(current, dtype=torch.bool)
        if self.memory_size >= self.memory_epochs:
            means = self.memory.mean(dim=0)
            ratio_k = mslr_coefficients(current, means.clamp_min(1e-12), self.initial)
            new = torch.where(means > 0, ratio_k, self.initial)
        else:
            new = self.initial.clone()
        new = torch.where(seen, new, self.epoch_coefficients)
        self.epoch_coefficients.copy_(new)
        self.memory.copy_(torch.roll(self.memory, -1, dims=0))
        self.memory[-1].copy_(current)
        self.memory_size = min(self.memory_size + 1, self.memory_epochs)
        self.accuracies.copy_(current)
        self.validation_correct.zero_()
        self.validation_counts.zero_()
        self._validation_seen = 0
        self._validation_masked = False
        self._show_epoch_coefficients()
        super().epoch_end()

    def _validation_accuracies(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This epoch's collected accuracies and which modalities had a validation sample.

        Over all ranks with sync="global" (one all-reduce, the same on every rank whatever its
        masks; every rank calls epoch_end). With a mask, each modality over its present
        samples; one without any keeps its accuracy.
        """
        correct = self.validation_correct
        synced = self.sync == "global" and self.world_size() > 1
        if not (self._validation_masked or synced):  # as before masks: correct / seen
            current = self.reduce_mean(correct, self._validation_seen)
            return current, torch.ones_like(current, dtype=torch.bool)
        current, seen = means_and_seen(self.reduce_mean, correct, self.validation_counts)
        return torch.where(seen, current, self.accuracies), seen

    def epoch_end_reason(self) -> str | None:
        """Why MSLR needs :meth:`epoch_end` (see :meth:`Method.epoch_end_reason`)."""
        return (
            "it updates the coefficients from the validation accuracies there; without it "
            "every k stays at its initial value"
        )

    def _show_epoch_coefficients(self) -> None:
        """``bal.coefficients`` shows the coefficients of the coming epoch at once."""
        values = self.epoch_coefficients if self.enabled else torch.ones_like(self.initial)
        self.last_coefficients.copy_(values)

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        state_dict = per_modality_validation_counts(state_dict, prefix, len(self.names))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self) -> dict[str, Any]:
        return {
            **super().get_extra_state(),
            "memory_size": self.memory_size,
            "validation_seen": self._validation_seen,
            "validation_masked": self._validation_masked,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.memory_size = int(state.get("memory_size", 0))
        self._validation_seen = int(state.get("validation_seen", 0))
        self._validation_masked = bool(state.get("validation_masked", False))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, initial={self.initial.tolist()}, "
            f"memory_epochs={self.memory_epochs}, {self._window_repr()}"
        )
