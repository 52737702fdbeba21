"""OGM and OGM-GE: On-the-fly Gradient Modulation (Peng et al., CVPR 2022)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradbalance._checks import check_alpha
from gradbalance._step import Step
from gradbalance.coefficients import ogm_coefficients
from gradbalance.errors import MissingCallWarning
from gradbalance.methods._base import (
    ParameterChoice,
    SlicedScoresMethod,
    WindowUnit,
    parameter_filter,
)
from gradbalance.methods._seeded import SeededGenerators

NOISE_EPSILON = 1e-8
"""Added to each gradient's std before drawing OGM-GE's noise (as the official code)."""

BACKWARD_FLOOR = 1e-4
"""OGM-GE's smallest factor applied in ``backward()``; :meth:`OGMGE.after_backward` applies
the rest of a smaller k, after reading the noise's std from the gradient ``k' g``."""


class OGM(SlicedScoresMethod):
    """OGM: slow the dominant modality by ``1 - tanh(alpha * rho)`` (any M >= 2 modalities).

    Every training step, each modality's score ``s_m`` is its mean true-class probability on
    the batch, read from the per-modality slices of a late-linear fused head
    (``W_m z_m + b / 2``) when ``fusion_head`` is given, or else from detached linear probes
    (stop-gradient heads that never reach the encoders). The modality whose ratio
    ``rho = s_m / s_other`` exceeds 1 gets ``k = 1 - tanh(alpha * rho)``, the other exactly 1
    (:func:`~gradbalance.coefficients.ogm_coefficients`; with M > 2 modalities ``s_other`` is
    the mean score of the other modalities, as MLB's ratio, and every modality above it is
    slowed); ``backward()`` multiplies the gradient
    reaching the dominant encoder by k. The loss is the fused cross-entropy (plus the probes'
    own, which reaches only the probes).

    Args:
        model: the multimodal model (unchanged by the balancer).
        encoders: the M >= 2 modality submodules (list or dict ``name -> module``).
        num_classes: number of classes.
        alpha: strength, >= 0 (the official README uses 0.8 for CREMA-D, 0.1 for VGGSound).
        fusion_head: the model's late-linear fused head, to read the unimodal scores from its
            slices: an ``nn.Linear`` over the concatenated features in encoder order (its
            weight is split by the features' widths, half the bias each) or any module with
            ``modality_logits(*features)`` (the reference ``LateLinear``,
            :class:`~gradbalance.MMCosineHead`). It receives the ``(B, D)`` features as the
            balancer sees them (``pool``/``features`` options). ``None``: detached probes.
        probes: with ``fusion_head``, also attach detached linear probes, so that
            :meth:`~gradbalance.Balancer.unimodal_logits` has a classifier of each modality
            alone (the scores still come from the slices, :meth:`modality_slices`). Without
            ``fusion_head`` the probes are always there (they give the scores).
        parameters: which gradients are modulated. ``"encoder"`` (default): every parameter
            reached through the encoder, by scaling the gradient into its output (one multiply
            per encoder). ``"conv"``: only the encoders' 4-D parameters (conv kernels), as the
            official code; a callable ``(name, parameter) -> bool`` (``name`` relative to the
            encoder, e.g. ``"0.weight"``) picks any subset. Both use one gradient hook per
            selected parameter, which runs before DDP's all-reduce like the default.
        enabled: modulate at all (False: every k is 1; scores are still recorded).
        window: ``(start, end)`` inclusive range of epochs (or steps) in which k is applied;
            ``end=None`` never ends. The official default is ``(0, 50)`` epochs.
        window_unit: ``"epoch"`` (counted by :meth:`epoch_end`) or ``"step"``.
        **common: the options of :class:`~gradbalance.balancer.Balancer` (``feature_dims``,
            ``pool``, ``features``, ``flush_every``).

    Example:
        >>> import torch, gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.OGM(model, encoders=[model.audio, model.video], num_classes=3,
        ...              alpha=0.8, fusion_head=model.fusion)
        >>> y = torch.tensor([0, 1, 2, 0])
        >>> bal.loss(model(torch.randn(4, 8), torch.randn(4, 6)), y).backward()
        >>> sorted(float(k) == 1.0 for k in bal.coefficients.values())  # one modality slowed
        [False, True]
    """

    head_mode = "probe"

    def __init__(
        self,
        model: nn.Module,
        encoders: Sequence[nn.Module] | Mapping[str, nn.Module],
        num_classes: int | None = None,
        *,
        alpha: float = 0.8,
        fusion_head: nn.Module | None = None,
        probes: bool = False,
        parameters: ParameterChoice = "encoder",
        enabled: bool = True,
        window: Sequence[int | None] = (0, None),
        window_unit: WindowUnit = "epoch",
        **common: Any,
    ) -> None:
        alpha = check_alpha(alpha)
        parameter_filter(parameters)
        # "encoder": scale the encoder's output gradient; otherwise per-parameter hooks only.
        self.scales_gradients = parameters == "encoder"
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
        self.alpha = alpha
        self.parameter_choice = parameters
        self._modulated = self._encoder_parameters(parameters)
        if parameters != "encoder":
            self.scale_parameter_gradients(
                self._modulated, lambda: self._encoder_parameters(parameters)
            )

    def _loss(self, step: Step) -> torch.Tensor:
        total = F.cross_entropy(step.logits, step.target) + self._probe_loss(step)
        if not step.training:
            return total
        scores = step.score_mean(step.score_sums(self._modality_logits(step)))
        active = self.active()
        coefficients = ogm_coefficients(scores, self.alpha) if active else torch.ones_like(scores)
        step.store(coefficients, scores)
        self._modulated_step(step, active)
        return total

    def _modulated_step(self, step: Step, active: bool) -> None:
        """Hook for OGM-GE: called after each training step's coefficients are stored."""

    def extra_repr(self) -> str:
        choice = self.parameter_choice if isinstance(self.parameter_choice, str) else "custom"
        return (
            f"{super().extra_repr()}, alpha={self.alpha}, parameters={choice!r}, "
            f"{self._window_repr()}"
        )


class OGMGE(OGM):
    """OGM-GE: OGM plus Gaussian noise on the modulated gradients (Generalization Enhancement).

    The update of every modulated parameter becomes ``g <- k g + N(0, (std(g) + 1e-8)^2)``
    with ``std(g)`` the unbiased std over all elements of that parameter's *unmodulated*
    gradient, as the official code; both modalities get noise, only inside the modulation
    window. OGM's scaling runs in ``backward()``; the noise is added by :meth:`after_backward`,
    which you call after ``loss.backward()`` and before ``opt.step()``::

        loss.backward()
        scaler.unscale_(opt)      # under AMP: the noise must see unscaled gradients
        bal.after_backward()      # adds the noise (once per optimizer step)
        opt.step()

    An explicit call, not a per-parameter hook: a ``register_post_accumulate_grad_hook`` fires
    (1) before DDP has finished all-reducing the gradient, so the noise would be reduced (and
    shrunk) or race with the reduction; (2) before ``GradScaler.unscale_``, on the scaled
    gradients of overflow steps; (3) once per micro-batch under gradient accumulation, adding
    the noise several times. After ``backward()`` returns all three are settled.

    Without host synchronisation: the std stays on the device (no ``.item()``), and all the
    modulated gradients of a modality are handled together, in about 20 kernels whatever
    their number. A gradient with a non-finite element gets no noise (an AMP overflow step,
    which the scaler skips anyway); a single-element gradient gets none (its std is
    undefined; the official code would add NaN). The noise comes from a ``torch.Generator``
    owned by the balancer, seeded with ``seed`` (part of ``state_dict``), so every DDP rank
    draws the same numbers. The std is that of the *unscaled* gradient g for every k, 0
    included: ``backward()`` applies ``k' = max(k, 1e-4)``, so the gradient arrives as
    ``k' g`` (g stays readable even where k underflows to 0, e.g. ``alpha=50``), and
    :meth:`after_backward` takes ``std(g) = std(k' g / k')``, then applies the rest ``k / k'``
    (1 unless k < 1e-4) and adds the noise. Without :meth:`after_backward` a k below 1e-4
    thus acts as 1e-4. With ``sync="local"`` under DDP, where k differs per rank, the ranks'
    k and k' are averaged first (one all-reduce of 2M numbers; with the default
    ``sync="global"`` they are equal already), so the noise is identical on every rank and
    the replicas stay equal.

    Args:
        seed: seed of the noise generator (use the same on every rank).
        **options: as :class:`OGM`.

    Example:
        >>> import torch, gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.OGMGE(model, encoders=[model.audio, model.video], num_classes=3, seed=0)
        >>> opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
        >>> y = torch.tensor([0, 1, 2, 0])
        >>> bal.loss(model(torch.randn(4, 8), torch.randn(4, 6)), y).backward()
        >>> bal.after_backward()
        >>> opt.step()
    """

    def __init__(self, *args: Any, seed: int = 0, **options: Any) -> None:
        self.generators = SeededGenerators(seed)
        super().__init__(*args, **options)
        self._noise_pending = False
        self._after_backward_calls = 0
        self._warned = False
        self._lengths: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    @property
    def seed(self) -> int:
        """The seed of the noise generator."""
        return self.generators.seed

    def _modulated_step(self, step: Step, active: bool) -> None:
        if step.binding is not None:  # backward applies max(k, floor); after_backward the rest
            step.binding.values.clamp_(min=BACKWARD_FLOOR)
        self._noise_pending = active
        if active and not self._after_backward_calls and self.steps >= 50 and not self._warned:
            self._warned = True
            warnings.warn(
                "OGMGE adds its noise in bal.after_backward(), which was never called: call it "
                "after loss.backward() (after scaler.unscale_(opt) under AMP) and before "
                "opt.step(); without it OGMGE trains as OGM",
                MissingCallWarning,
                stacklevel=4,
            )

    @torch.no_grad()
    def after_backward(self) -> None:
        """Add the noise to the final gradients; call before ``opt.step()`` (see the class).

        Does nothing outside the modulation window or when called twice for one step.
        """
        self._after_backward_calls += 1
        if not self._noise_pending:
            return
        self._noise_pending = False
        k = self.last_coefficients
        factors = self.replica_mean(torch.stack([k, k.clamp_min(BACKWARD_FLOOR)]))
        for index, name in enumerate(self.names):
            groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for param in self._modulated[name]:
                grad = param.grad
                if grad is not None and grad.numel() > 1:  # a 1-element std is undefined
                    groups.setdefault((grad.device, grad.dtype), []).append(grad)
            for (device, _), grads in groups.items():
                self._add_noise(grads, *factors[:, index].to(device).unbind())

    def _add_noise(self, grads: list[torch.Tensor], k: torch.Tensor, applied: torch.Tensor) -> None:
        """``g' <- (k / k') g' + N(0, (std(g' / k') + 1e-8)^2)`` for each gradient ``g' = k' g``
        (``k'`` the factor ``backward()`` applied), in ~20 kernels in all.

        The gradients are flattened into one vector and divided by ``k'`` (the unscaled
        gradients); per-gradient sums go through ``segment_reduce`` (two-pass std), the noise
        is one ``randn`` split back into the gradients' shapes (so the draws follow the
        parameters' order), ``_foreach_mul_`` applies the rest of k (1 unless k is below the
        floor) and ``_foreach_add_`` adds the noise. A gradient with a non-finite element gets
        no noise.
        """
        device = grads[0].device
        sizes = [g.numel() for g in grads]
        total = sum(sizes)
        key = (str(device), tuple(sizes))
        lengths = self._lengths.get(key)
        if lengths is None:
            lengths = self._lengths[key] = torch.tensor(sizes, device=device)
        flat = torch.cat([g.reshape(-1) for g in grads]).float() / applied
        counts = lengths.to(flat.dtype)
        # unsafe=True: skips the length checks, which read lengths on the host (a sync).
        sums = torch.segment_reduce(flat, "sum", lengths=lengths, unsafe=True)
        means = torch.repeat_interleave(sums / counts, lengths, output_size=total)
        centered = flat - means
        std = (
            torch.segment_reduce(centered * centered, "sum", lengths=lengths, unsafe=True)
            / (counts - 1)
        ).sqrt()
        sigma = std + NOISE_EPSILON
        finite = torch.isfinite(sigma)  # a NaN/inf gradient element makes its std non-finite
        sigma = torch.where(finite, sigma, torch.zeros_like(sigma))
        noise = torch.randn(total, generator=self.generators.get(device), device=device)
        noise = noise * torch.repeat_interleave(sigma, lengths, output_size=total)
        pieces = [n.view_as(g).to(g.dtype) for n, g in zip(noise.split(sizes), grads)]
        torch._foreach_mul_(grads, (k / applied).to(grads[0].dtype))
        torch._foreach_add_(grads, pieces)

    def get_extra_state(self) -> dict[str, Any]:
        return {
            **super().get_extra_state(),
            "generators": self.generators.states(),
            "noise_pending": self._noise_pending,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.generators.load(dict(state.get("generators", {})))
        self._noise_pending = bool(state.get("noise_pending", False))
