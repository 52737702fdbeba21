"""AMSS and AMSS+: Adaptively Mask Subnetworks considering modal Significance (Yang et al.,
"Learning to Rebalance Multi-Modal Optimization by Adaptively Masking Subnetworks", IEEE
TPAMI 2025, arXiv:2404.08347)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from gradbalance._checks import check_choice, check_number
from gradbalance._step import Step
from gradbalance.coefficients import amss_keep_rates, amss_label_entropy, amss_unit_masks
from gradbalance.errors import MissingCallWarning
from gradbalance.methods._base import (
    ParameterChoice,
    SlicedScoresMethod,
    WindowUnit,
    parameter_filter,
)
from gradbalance.methods._seeded import SeededGenerators

Unit = Literal["channel", "element"]

Layout = tuple[torch.Tensor, torch.Tensor, list[int]]
"""Cached per set of gradients: units per parameter, owner per parameter, units per parameter
(as a list)."""


def feature_entropies(features: torch.Tensor) -> torch.Tensor:
    """``(B, D) -> (B,)``: each sample's entropy of the softmax of its features."""
    log_p = torch.log_softmax(features.detach().float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


class AMSS(SlicedScoresMethod):
    """AMSS: update only a sampled subnetwork of each encoder, fewer units for a stronger modality.

    Every training step gives each modality a keep rate from its significance
    (:func:`~gradbalance.coefficients.amss_keep_rates`): ``t_m = (H_Y - L_m + offset) /
    (H(z_m) T)`` with ``L_m`` its head's mean cross-entropy, ``H(z_m)`` the mean entropy of the
    softmax of its features and ``H_Y`` the label term
    (:func:`~gradbalance.coefficients.amss_label_entropy`), all over the global batch, and
    ``rate_m = clamp(1 - softmax(t)_m + bias, 0.1, 0.9)``. Then :meth:`after_backward`
    masks the final gradients of each encoder's selected parameters: in each parameter,
    ``ceil(N rate_m)`` of its N units (output channels, or elements) are drawn without
    replacement with probabilities proportional to their Fisher importance (the unit's
    summed squared gradient), and the others' gradients are set to 0
    (:func:`~gradbalance.coefficients.amss_unit_masks`). With ``unbiased=True`` (AMSS+,
    :class:`AMSSPlus`) a kept unit's gradient is divided by its inclusion probability.
    The loss is the fused cross-entropy (plus the probes' own, which reaches only the probes).
    The recorded coefficients are the keep rates, the scores the heads' mean true-class
    probability.

    Missing modalities (``loss(..., present=)``): modality m's ``L_m``, ``H(z_m)``, score and
    label term ``H_Y`` are means over the samples where m is present (its probe trains on them
    only); a modality absent from the whole (global) batch keeps its keep rate and score and
    enters the others' softmax with the mean significance of the present ones
    (``amss_keep_rates(..., seen=)``).

    Call :meth:`after_backward` after ``loss.backward()`` (after ``scaler.unscale_(opt)``
    under AMP) and before ``opt.step()``: the masks are drawn from the all-reduced gradients
    with the balancer's own generator (seeded with ``seed``, in ``state_dict``), so every DDP
    rank draws the same masks. All the masked gradients on a device are sampled together (two
    sorts over all the units); the only per-parameter work is one norm over each gradient's
    rows and the broadcast multiply of one ``_foreach_mul_``.

    Args:
        model: the multimodal model (unchanged by the balancer).
        encoders: the M >= 2 modality submodules (list or dict ``name -> module``).
        num_classes: number of classes (classification only).
        temperature: ``T > 0`` of the significance softmax (official default 0.2).
        offset: added to ``H_Y - L_m`` (0.5 in the official audio-video code).
        bias: added to every keep rate before the clamp (0 in the official CREMA-D and
            Kinetics-Sounds runs, 0.2 for the text-image ones).
        unbiased: divide each kept unit's gradient by its inclusion probability (AMSS+).
        unit: what a mask keeps or drops: ``"channel"`` (a slice along the first dimension:
            a conv kernel's output channel or a linear layer's row, as the official code) or
            ``"element"`` (every gradient element on its own).
        parameters: which encoder parameters are masked: ``"encoder"`` (default: all of
            them), ``"conv"`` (the 4-D kernels, as the official code) or a callable
            ``(name, parameter) -> bool`` (``name`` relative to the encoder).
        seed: seed of the mask generator (use the same on every rank).
        fusion_head: the model's late-linear fused head, to read each modality's logits from
            its slices (as the official code); ``None``: detached linear probes.
        probes: with ``fusion_head``, also attach detached probes (see
            :class:`~gradbalance.OGM`).
        enabled: modulate at all (False: no mask; every coefficient is 1).
        window: ``(start, end)`` inclusive range of epochs (or steps) in which masks apply.
        window_unit: ``"epoch"`` (counted by :meth:`epoch_end`) or ``"step"``.
        **common: the options of :class:`~gradbalance.Balancer`.

    Example:
        >>> import torch, gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.AMSS(model, encoders=[model.audio, model.video], num_classes=3,
        ...               fusion_head=model.fusion, seed=0)
        >>> opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
        >>> y = torch.tensor([0, 1, 2, 0])
        >>> bal.loss(model(torch.randn(4, 8), torch.randn(4, 6)), y).backward()
        >>> bal.after_backward()  # masks the encoders' gradients
        >>> opt.step()
        >>> all(0.1 <= float(k) <= 0.9 for k in bal.coefficients.values())
        True
    """

    head_mode = "probe"
    scales_gradients = False

    def __init__(
        self,
        model: nn.Module,
        encoders: Sequence[nn.Module] | Mapping[str, nn.Module],
        num_classes: int | None = None,
        *,
        temperature: float = 0.2,
        offset: float = 0.5,
        bias: float = 0.0,
        unbiased: bool = False,
        unit: Unit = "channel",
        parameters: ParameterChoice = "encoder",
        seed: int = 0,
        fusion_head: nn.Module | None = None,
        probes: bool = False,
        enabled: bool = True,
        window: Sequence[int | None] = (0, None),
        window_unit: WindowUnit = "epoch",
        **common: Any,
    ) -> None:
        self.temperature = check_number("temperature", temperature, minimum=0.0, strict=True)
        self.offset = check_number("offset", offset)
        self.bias = check_number("bias", bias)
        self.unit = check_choice("unit", unit, ("channel", "element"))
        self.unbiased = bool(unbiased)
        parameter_filter(parameters)
        self.generators = SeededGenerators(seed)
        super().__init__(
            model,
            encoders,
            num_classes,
            enabled=enabled,
            window=window,
            window_unit=window_unit,
            fusion_head=fusion_head,
            probes=probes,
            **common,
        )
        self.parameter_choice = parameters
        self.masked_parameters = self._encoder_parameters(parameters)
        self.watch_parameters(  # a partial, not a lambda: the balancer pickles
            self.masked_parameters, partial(self._encoder_parameters, parameters)
        )
        self._mask_pending = False
        self._after_backward_calls = 0
        self._warned = False
        self._layouts: dict[tuple[Any, ...], Layout] = {}

    @property
    def seed(self) -> int:
        """The seed of the mask generator."""
        return self.generators.seed

    def _loss(self, step: Step) -> torch.Tensor:
        total = F.cross_entropy(step.logits, step.target) + self._probe_loss(step)
        if not step.training:
            return total
        logits = self._modality_logits(step)
        device = step.logits.device
        stacked = torch.stack([u.detach().float().to(device) for u in logits])
        entropies = torch.stack([feature_entropies(step.features[n]) for n in self.names])
        classes = torch.arange(stacked.shape[-1], device=step.target.device)
        labels = step.target == classes[:, None]  # (K, B) one-hot (F.one_hot syncs)
        m = len(self.names)
        columns = [
            step.loss_sums(stacked),
            step.score_sums(stacked),
            step.sample_sums(entropies),
        ]
        frequencies = step.sample_sums(labels.expand(m, *labels.shape))  # (M, K)
        sums = torch.cat([torch.stack([c.to(frequencies) for c in columns], 1), frequencies], 1)
        means = step.modality_mean(sums)  # (M, 3 + K): over each modality's present samples
        losses, scores, entropy = means[:, :3].unbind(1)
        active = self.active()
        if active:
            label_entropy = amss_label_entropy(means[:, 3:])
            rates = amss_keep_rates(
                losses,
                entropy,
                label_entropy,
                self.temperature,
                self.offset,
                self.bias,
                seen=step.seen,
            )
        else:
            rates = torch.ones_like(scores)
        step.store(rates, scores)
        self._mask_pending = active
        self._warn_without_after_backward(active)
        return total

    def _warn_without_after_backward(self, active: bool) -> None:
        if active and not self._after_backward_calls and self.steps >= 50 and not self._warned:
            self._warned = True
            warnings.warn(
                f"{type(self).__name__} masks the gradients in bal.after_backward(), which was "
                "never called: call it after loss.backward() (after scaler.unscale_(opt) under "
                "AMP) and before opt.step(); without it the encoders train unmasked",
                MissingCallWarning,
                stacklevel=4,
            )

    @torch.no_grad()
    def after_backward(self) -> None:
        """Mask the final gradients; call before ``opt.step()`` (see the class).

        Does nothing outside the modulation window or when called twice for one step.
        """
        self._after_backward_calls += 1
        if not self._mask_pending:
            return
        self._mask_pending = False
        rates = self.replica_mean(self.last_coefficients)
        groups: dict[torch.device, tuple[list[torch.Tensor], list[int]]] = {}
        for index, name in enumerate(self.names):
            for param in self.masked_parameters[name]:
                grad = param.grad
                if grad is not None and grad.numel() > 0:
                    grads, owners = groups.setdefault(grad.device, ([], []))
                    grads.append(grad)
                    owners.append(index)
        for device, (grads, owners) in groups.items():
            self._mask(grads, owners, rates.to(device))

    def _layout(self, grads: list[torch.Tensor], owners: list[int]) -> Layout:
        """Units per parameter (a tensor and a list) and each parameter's owner (cached)."""
        device = grads[0].device
        key = (str(device), tuple(g.shape for g in grads), tuple(owners))
        layout = self._layouts.get(key)
        if layout is None:
            if self.unit == "element":
                counts = [g.numel() for g in grads]
            else:
                counts = [g.shape[0] if g.dim() else 1 for g in grads]
            layout = self._layouts[key] = (
                torch.tensor(counts, device=device),
                torch.tensor(owners, device=device),
                counts,
            )
        return layout

    def _mask(self, grads: list[torch.Tensor], owners: list[int], rates: torch.Tensor) -> None:
        """Draw and apply the masks of ``grads`` (one device).

        Channel units: one norm per parameter (its rows' squared norms), then the sampling of
        every unit at once, and one ``_foreach_mul_`` that broadcasts each parameter's
        ``(N, 1, ...)`` masks. Element units: the squared gradients flattened into one vector.
        """
        lengths, owner_index, counts = self._layout(grads, owners)
        if self.unit == "element":
            importance = torch.cat([g.reshape(-1) for g in grads]).float().square()
        else:
            norms = [  # in float32, or float64 for double gradients (no narrowing)
                torch.linalg.vector_norm(
                    g.reshape(n, -1), dim=1, dtype=torch.promote_types(g.dtype, torch.float32)
                ).float()
                for g, n in zip(grads, counts)
            ]
            importance = torch.cat(norms).square()
        device = importance.device
        uniforms = torch.rand(
            importance.shape[0], generator=self.generators.get(device), device=device
        )
        masks = amss_unit_masks(importance, lengths, rates[owner_index], uniforms, self.unbiased)
        if self.unit == "element":
            pieces = [m.view_as(g) for m, g in zip(masks.split(counts), grads)]
        else:
            pieces = [
                m.view(-1, *([1] * (g.dim() - 1))) if g.dim() else m.view(())
                for m, g in zip(masks.split(counts), grads)
            ]
        torch._foreach_mul_(grads, [p.to(g.dtype) for p, g in zip(pieces, grads)])

    def get_extra_state(self) -> dict[str, Any]:
        return {
            **super().get_extra_state(),
            "generators": self.generators.states(),
            "mask_pending": self._mask_pending,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.generators.load(dict(state.get("generators", {})))
        self._mask_pending = bool(state.get("mask_pending", False))

    def extra_repr(self) -> str:
        choice = self.parameter_choice if isinstance(self.parameter_choice, str) else "custom"
        return (
            f"{super().extra_repr()}, temperature={self.temperature}, offset={self.offset}, "
            f"bias={self.bias}, unbiased={self.unbiased}, unit={self.unit!r}, "
            f"parameters={choice!r}, seed={self.seed}, {self._window_repr()}"
        )


class AMSSPlus(AMSS):
    """AMSS+: AMSS whose kept gradient units are divided by their inclusion probability.

    The same masks as :class:`AMSS`; each kept unit's gradient is rescaled by ``1 / pi_i``,
    ``pi_i = clamp(n q_i, 1 / N, 1)`` (n units kept of the parameter's N, ``q_i`` the unit's
    share of its importance), so the masked update estimates the full gradient without the
    bias of dropping units (the paper's unbiased estimation). Takes every option of
    :class:`AMSS` (``unbiased`` is True).

    Example:
        >>> import torch, gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.make("AMSS+", model, [model.audio, model.video], num_classes=3, seed=0)
        >>> y = torch.tensor([0, 1, 2, 0])
        >>> bal.loss(model(torch.randn(4, 8), torch.randn(4, 6)), y).backward()
        >>> bal.after_backward()
        >>> type(bal).__name__, bal.unbiased
        ('AMSSPlus', True)
    """

    def __init__(self, *args: Any, unbiased: bool = True, **options: Any) -> None:
        super().__init__(*args, unbiased=unbiased, **options)
