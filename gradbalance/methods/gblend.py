"""Gradient Blending (Wang, Tran & Feiszli, CVPR 2020), online form."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradbalance._checks import check_int, check_number
from gradbalance._step import Step
from gradbalance.errors import ConfigurationError, InputError, OrderError
from gradbalance.methods._base import Method
from gradbalance.methods._earlier_states import per_component_counts
from gradbalance.methods._loss_weights import (
    GBLEND_MIN_OVERFITTING,
    gblend_estimates,
    gblend_scores,
)
from gradbalance.methods._presence import means_and_seen, present_counts

Losses = torch.Tensor | Sequence[float] | Mapping[str, float]

FUSED = "fused"
"""The key of the fused output among the components of :attr:`GBlend.weights`."""


class GBlend(Method):
    """Gradient Blending: loss weights from each head's overfitting-to-generalisation ratio.

    The training loss is ``w_fused * CE(fused) + sum_m w_m * CE(head_m(z_m))``, with an
    auxiliary linear head per encoder (as :class:`MultiLoss`). Every ``every`` epochs the
    weights are re-estimated (Wang, Tran & Feiszli, "What Makes Training Multi-modal
    Classification Networks Hard?", CVPR 2020, the online G-Blend of Section 3.3): between the
    previous checkpoint and this one, each component k (the fused output and each head) has the
    generalisation gain ``G_k`` (decrease of its held-out loss) and the overfitting change
    ``O_k`` (change of its held-out minus training loss), and ``w_k ∝ G_k / O_k^2``, normalised
    to sum 1 (:func:`~gradbalance.coefficients.gblend_weights`). Until two checkpoints exist the
    weights are uniform, ``1 / (M + 1)``.

    The balancer collects the losses itself: every training ``loss()`` adds its batch's
    per-component cross-entropies to the epoch's training losses; every ``loss()`` under
    ``torch.no_grad()`` (your loop over the held-out split) to the held-out losses. A checkpoint
    uses the last epoch's means (over all ranks with ``sync="global"``). You can also pass them:
    ``bal.epoch_end(train_losses=..., val_losses=...)``. The held-out split must not be the
    test split: the paper holds out part of the training set.

    Degenerate estimates (documented, counted, never a division by zero): a component whose
    held-out loss did not decrease (``G <= 0``) gets weight 0; one whose gap did not grow
    (``O <= min_overfitting``) is weighted with ``O = min_overfitting``. If no component has a
    positive gain, or the losses are not finite, the weights are kept. :attr:`degenerate`
    counts the first two cases per component, :attr:`kept_estimates` the last; :attr:`gains`
    and :attr:`overfitting` hold the last estimates.

    ``bal.coefficients`` shows each head's weight ``w_m`` (the gradients are not scaled
    otherwise); :attr:`weights` shows every component's, the fused one included.

    Args:
        model: the multimodal model (unchanged by the balancer).
        encoders: one submodule per modality (list or dict ``name -> module``).
        num_classes: number of classes.
        every: re-estimate every this many epochs (the paper's super-epoch; default 1).
        min_overfitting: floor of O in nats (> 0, default 1e-3).
        enabled: modulate at all (False: uniform weights).
        **common: the options of :class:`~gradbalance.Balancer` (``window`` included).

    Example:
        >>> import torch, gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.GBlend(model, encoders=[model.audio, model.video], num_classes=3)
        >>> opt = torch.optim.Adam([*model.parameters(), *bal.parameters()], lr=1e-2)
        >>> a, v, y = torch.randn(6, 8), torch.randn(6, 6), torch.tensor([0, 1, 2, 0, 1, 2])
        >>> for epoch in range(3):
        ...     opt.zero_grad()
        ...     bal.loss(model(a, v), y).backward()            # training step
        ...     opt.step()
        ...     with torch.no_grad():
        ...         _ = bal.loss(model(a + 1, v), y)           # held-out split: collected
        ...     bal.epoch_end()                                # re-estimates the weights
        >>> sorted(bal.weights)
        ['audio', 'fused', 'video']
        >>> round(float(sum(bal.weights.values())), 4)
        1.0
    """

    loss_weights: torch.Tensor
    sums: torch.Tensor
    counts: torch.Tensor
    previous: torch.Tensor
    gains: torch.Tensor
    overfitting: torch.Tensor
    degenerate: torch.Tensor
    kept_estimates: torch.Tensor
    referenced: torch.Tensor

    scales_gradients = False

    def __init__(
        self,
        model: nn.Module,
        encoders: Sequence[nn.Module] | Mapping[str, nn.Module],
        num_classes: int | None = None,
        *,
        every: int = 1,
        min_overfitting: float = GBLEND_MIN_OVERFITTING,
        enabled: bool = True,
        **common: Any,
    ) -> None:
        self.every = check_int("every", every, 1)
        self.min_overfitting = check_number(
            "min_overfitting", min_overfitting, minimum=0.0, strict=True
        )
        super().__init__(model, encoders, num_classes, enabled=enabled, **common)
        if FUSED in self.names:
            raise ConfigurationError(
                f"GBlend names the fused output {FUSED!r}: give the encoders other names "
                "(encoders={name: module})"
            )
        n = len(self.names) + 1
        device = self.last_scores.device
        buffers = {
            "loss_weights": torch.full((n,), 1.0 / n, device=device),
            "sums": torch.zeros(2, n, device=device),  # training, held-out loss sums
            "counts": torch.zeros(2, n, device=device),  # their samples, per component
            "previous": torch.zeros(2, n, device=device),  # the last checkpoint's means
            "gains": torch.zeros(n, device=device),
            "overfitting": torch.zeros(n, device=device),
            "degenerate": torch.zeros(n, dtype=torch.int64, device=device),
            "kept_estimates": torch.zeros((), dtype=torch.int64, device=device),
            # whether each component has losses at a past checkpoint (its reference)
            "referenced": torch.zeros(n, dtype=torch.bool, device=device),
        }
        for name, value in buffers.items():
            self.add_state(name, value)
        self.checkpoints = 0
        self._train_seen = 0
        self._validation_seen = 0
        self._show_weights()

    @property
    def components(self) -> list[str]:
        """The weighted components, in order: ``"fused"`` then the encoders."""
        return [FUSED, *self.names]

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """``{component: 0-dim tensor}``: the loss weights of the coming training steps."""
        values = self._current_weights().detach().clone()
        return {name: values[index] for index, name in enumerate(self.components)}

    def _current_weights(self) -> torch.Tensor:
        if self.active():
            return self.loss_weights
        return torch.full_like(self.loss_weights, 1.0 / self.loss_weights.numel())

    def _loss(self, step: Step) -> torch.Tensor:
        losses, scores = step.head_terms(scaled=False)
        fused = F.cross_entropy(step.logits, step.target)
        components = torch.cat([fused.reshape(1), losses.to(fused.device)])
        weights = self._current_weights()
        total = components @ weights.to(device=components.device, dtype=components.dtype)
        with torch.no_grad():
            batch, sizes = self._batch_sums(step, components)
            n = batch.numel()
            if step.training:
                # Sums and counts over every rank with sync="global" (both divided by the number
                # of ranks: their ratio is the global mean), so the state stays rank-identical.
                reduced = step.mean(torch.cat([batch, sizes]), 1.0)
                step.store(weights[1:], scores)
                kept = step.keep_if_finite(
                    torch.cat([self.sums[0], self.counts[0]]) + reduced,
                    torch.cat([self.sums[0], self.counts[0]]),
                )
                self.sums[0].copy_(kept[:n])
                self.counts[0].copy_(kept[n:])
                self._train_seen += step.batch_size
            else:  # held-out: this rank's sums, reduced over the ranks by epoch_end()
                self.sums[1].add_(batch)
                self.counts[1].add_(sizes)
                self._validation_seen += step.batch_size
        return total

    def _batch_sums(
        self, step: Step, components: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This batch's ``(n,)`` loss sums and sample counts per component: the fused loss over
        the batch, each head's over the samples where its modality is present."""
        batch = components.detach().float().to(self.sums.device) * step.batch_size
        sizes = present_counts(step.present, step.batch_size, self.sums[0, 1:])
        if step.present is not None:
            outputs = step.head_outputs(scaled=False).detach()
            head_sums = step.loss_sums(outputs).to(batch.device)
            batch = torch.cat([batch[:1], head_sums])
        return batch, torch.cat([sizes.new_full((1,), float(step.batch_size)), sizes])

    def _as_tensor(self, losses: Losses, option: str) -> torch.Tensor:
        n = len(self.components)
        if isinstance(losses, Mapping):
            missing = set(self.components) - set(losses)
            if missing:
                raise InputError(f"{option} misses the component(s) {sorted(missing)}")
            values = torch.tensor([float(losses[c]) for c in self.components])
        else:
            values = torch.as_tensor(losses, dtype=torch.float32)
        if values.shape != (n,):
            raise InputError(
                f"{option} must hold one loss per component {self.components} ({n}), "
                f"got shape {tuple(values.shape)}"
            )
        return values.to(device=self.sums.device, dtype=torch.float32)

    def epoch_end_reason(self) -> str | None:
        """Why G-Blend needs :meth:`epoch_end` (see :meth:`Method.epoch_end_reason`)."""
        return (
            "its checkpoints re-estimate the loss weights there; without it the weights stay "
            "uniform and G-Blend trains as Multi-Loss with equal weights"
        )

    @torch.no_grad()
    def epoch_end(
        self, train_losses: Losses | None = None, val_losses: Losses | None = None
    ) -> None:
        """End a training epoch; every ``every`` epochs, a checkpoint re-estimates the weights.

        Args:
            train_losses, val_losses: the components' mean losses at this checkpoint
                (``{"fused": ..., name: ...}`` or a sequence in :attr:`components` order);
                omitted, the ones collected by ``loss()`` since the last ``epoch_end()``.

        Raises:
            OrderError: at a checkpoint, no losses were given and none were collected.
        """
        if (self.epoch + 1) % self.every == 0:
            self._checkpoint(train_losses, val_losses)
        self.sums.zero_()
        self.counts.zero_()
        self._train_seen = self._validation_seen = 0
        super().epoch_end()
        self._show_weights()

    def _checkpoint(self, train_losses: Losses | None, val_losses: Losses | None) -> None:
        for given, seen, what in (
            (train_losses, self._train_seen, "training steps (bal.loss() with gradients)"),
            (val_losses, self._validation_seen, "held-out loss() calls under torch.no_grad()"),
        ):
            if given is None and not seen:
                raise OrderError(
                    f"GBlend's checkpoint at the end of epoch {self.epoch} has no {what} since "
                    "the last epoch_end(): run them, or pass epoch_end(train_losses=..., "
                    "val_losses=...)"
                )
        train_now = self.sums[0] / self.counts[0]  # reduced over the ranks in each step
        # One collective over all ranks with sync="global" (every rank calls epoch_end()).
        val_now, val_seen = means_and_seen(self.reduce_mean, self.sums[1], self.counts[1])
        # A component without samples (a modality missing from the epoch) is left out.
        sampled = torch.ones_like(val_seen)
        if train_losses is None:
            sampled = sampled & (self.counts[0] > 0)
        else:
            train_now = self._as_tensor(train_losses, "train_losses")
        if val_losses is None:
            sampled = sampled & val_seen
        else:
            val_now = self._as_tensor(val_losses, "val_losses")
        now = torch.stack([train_now, val_now])
        if self.checkpoints:
            self._estimate(now, sampled & self.referenced)
        self.previous.copy_(torch.where(sampled, now, self.previous))
        self.referenced |= sampled
        self.checkpoints += 1

    def _estimate(self, now: torch.Tensor, estimable: torch.Tensor) -> None:
        """New weights from the estimates since each component's last checkpoint.

        A component that cannot be estimated (no samples now or at any earlier checkpoint)
        keeps its weight; the others share the rest in proportion to their scores.
        """
        gain, change = gblend_estimates(self.previous[0], now[0], self.previous[1], now[1])
        scores = torch.where(estimable, gblend_scores(gain, change, self.min_overfitting), 0)
        total = scores.sum()
        valid = torch.isfinite(total) & (total > 0)
        share = 1 - torch.where(estimable, 0, self.loss_weights).sum()
        estimated = share * scores / total.clamp_min(1e-30)
        estimated = torch.where(estimable, estimated, self.loss_weights)
        self.loss_weights.copy_(torch.where(valid, estimated, self.loss_weights))
        self.kept_estimates.add_((~valid).long())
        degenerate = (gain <= 0) | (change <= self.min_overfitting)
        self.degenerate.add_((degenerate & estimable).long())
        self.gains.copy_(torch.where(estimable, gain, self.gains))
        self.overfitting.copy_(torch.where(estimable, change, self.overfitting))

    def _show_weights(self) -> None:
        """``bal.coefficients`` shows the heads' weights of the coming epoch at once."""
        self.last_coefficients.copy_(self._current_weights()[1:])

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        state_dict = per_component_counts(state_dict, prefix, len(self.components))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self) -> dict[str, Any]:
        return {
            **super().get_extra_state(),
            "checkpoints": self.checkpoints,
            "train_seen": self._train_seen,
            "validation_seen": self._validation_seen,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.checkpoints = int(state.get("checkpoints", 0))
        self._train_seen = int(state.get("train_seen", 0))
        self._validation_seen = int(state.get("validation_seen", 0))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, every={self.every}, "
            f"min_overfitting={self.min_overfitting}, {self._window_repr()}"
        )
