"""Multi-Loss and MLB (Multi-Loss Balanced): fused loss plus one loss per unimodal head."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from gradbalance._checks import check_alpha, check_choice, check_number, check_weights
from gradbalance._step import Step
from gradbalance.coefficients import mlb_coefficients, mlb_error_coefficients
from gradbalance.methods._base import Method

Scale = Literal["all", "multimodal"]


class MultiLoss(Method):
    """Multi-Loss training: ``CE(fused) + sum_m CE(head_m(z_m))``, no modulation.

    Each encoder gets an auxiliary linear head trained on its feature; every coefficient is 1
    (MLB with ``alpha = 0``). Scores (each head's mean true-class probability) are still
    recorded, so the balance can be watched.

    Args:
        model: the multimodal model (unchanged by the balancer).
        encoders: one submodule per modality (list or dict ``name -> module``).
        num_classes: number of classes (left out with ``task="regression"``).
        fused_weight: weight of the fused cross-entropy.
        unimodal_weight: weight of each head's cross-entropy (once, or per encoder).
        **common: the options of :class:`~gradbalance.methods._base.Method` and
            :class:`~gradbalance.Balancer` (``enabled``, ``window``, ``feature_dims``,
            ``pool``, ``features``, ``flush_every``, ...). ``task="regression"`` (with
            ``loss``, ``output_dim``, ``error``): heads are linear regressors, every loss a
            regression loss (L1 by default) and the scores the heads' batch errors.

    Example:
        >>> import torch, gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.MultiLoss(model, encoders=[model.audio, model.video], num_classes=3)
        >>> y = torch.tensor([0, 1, 2, 0])
        >>> bal.loss(model(torch.randn(4, 8), torch.randn(4, 6)), y).backward()
        >>> bal.coefficients["audio"]
        tensor(1.)
    """

    _unimodal_weight_vector: torch.Tensor

    scales_gradients = False
    supported_tasks: tuple[str, ...] = ("classification", "regression")

    def __init__(
        self,
        model: nn.Module,
        encoders: Sequence[nn.Module] | Mapping[str, nn.Module],
        num_classes: int | None = None,
        *,
        fused_weight: float = 1.0,
        unimodal_weight: float | Sequence[float] | Mapping[str, float] = 1.0,
        **common: Any,
    ) -> None:
        super().__init__(model, encoders, num_classes, **common)
        self.fused_weight = check_number("loss weight fused_weight", fused_weight, minimum=0.0)
        weights = check_weights("unimodal_weight", unimodal_weight, self.names)
        self.unimodal_weights: dict[str, float] = weights
        self._unit_weights = self.fused_weight == 1.0 and all(w == 1.0 for w in weights.values())
        self.register_buffer(
            "_unimodal_weight_vector",
            torch.tensor(list(weights.values()), device=self.last_scores.device),
            persistent=False,
        )

    def _coefficients(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(scores)

    def _scales_head_loss(self) -> bool:
        return False

    def _loss(self, step: Step) -> torch.Tensor:
        scaled = self._scales_head_loss() and step.training
        losses, scores = step.head_terms(scaled)
        if step.training:
            modulated = self.active()
            step.store(self._coefficients(scores) if modulated else torch.ones_like(scores), scores)
        fused = step.fused_loss()
        if self._unit_weights:
            return fused + losses.sum().to(fused.device)
        weights = self._unimodal_weight_vector.to(device=losses.device, dtype=losses.dtype)
        return self.fused_weight * fused + (losses @ weights).to(fused.device)


class MLB(MultiLoss):
    """Multi-Loss Balanced (Kontras et al., BMVC 2024).

    Multi-Loss, plus self-muting coefficients: every step, each auxiliary head's mean
    true-class probability ``s_m`` on the batch gives ``r_m = mean_{j != m} s_j / s_m`` and
    ``k_m`` (:func:`~gradbalance.coefficients.mlb_coefficients`). During ``backward()`` the
    gradient reaching encoder m (and, with ``scale="all"``, head m) is multiplied by ``k_m``:
    the weaker modality is sped up (``k > 1``), the stronger slowed (``k < 1``), and k returns
    to 1 as the heads converge.

    Args:
        model: the multimodal model (unchanged by the balancer).
        encoders: one submodule per modality (list or dict ``name -> module``).
        num_classes: number of classes (left out with ``task="regression"``).
        alpha: strength of the modulation (>= 0; 0 gives Multi-Loss).
        beta_max: bound of the acceleration (> 0). 2.0 is the symmetric BMVC form.
        scale: ``"all"`` (default, as the official code) scales the gradient of every loss
            reaching encoder m and head m; ``"multimodal"`` scales only the fused loss's
            gradient into the encoders (the paper's "balance only multi" ablation).
        extra_parameters: ``{name: parameters}`` outside the encoders also scaled by
            ``k_name`` (e.g. the fused head's weight block for that modality, as the official
            code does).
        enabled: start with the modulation on (switch later with ``bal.enabled = False``: the
            coefficients are then 1 and MLB trains as Multi-Loss).
        **options: as :class:`MultiLoss` (``fused_weight``, ``unimodal_weight`` and the
            common options; ``task``, ``loss``, ``output_dim`` and ``error`` for regression).

    Example:
        >>> import torch, gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.MLB(model, encoders=[model.audio, model.video], num_classes=3, alpha=1.0)
        >>> opt = torch.optim.Adam([*model.parameters(), *bal.parameters()], lr=1e-3)
        >>> loss = bal.loss(model(torch.randn(4, 8), torch.randn(4, 6)), torch.tensor([0, 1, 2, 0]))
        >>> loss.backward()
        >>> opt.step()
        >>> sorted(bal.coefficients)
        ['audio', 'video']

        Regression (``task="regression"``): every head predicts the target, every loss is L1
        (``loss=``), each score is the head's batch error ``err_m`` (MSE by default,
        ``error=``), and ``r_m = err_m / mean_{j != m} err_j``
        (:func:`~gradbalance.coefficients.mlb_error_coefficients`), so the modality with the
        larger error is sped up:

        >>> net = gb.testing.TwoTowerNet(num_classes=1)  # one output per sample
        >>> reg = gb.MLB(net, encoders=[net.audio, net.video], task="regression", alpha=1.0)
        >>> reg.loss(net(torch.randn(4, 8), torch.randn(4, 6)), torch.randn(4)).backward()
        >>> reg.unimodal_logits()["audio"].shape  # the heads' predictions
        torch.Size([4, 1])
    """

    scales_gradients = True

    def __init__(
        self,
        model: nn.Module,
        encoders: Sequence[nn.Module] | Mapping[str, nn.Module],
        num_classes: int | None = None,
        *,
        alpha: float = 1.0,
        beta_max: float = 2.0,
        scale: Scale = "all",
        extra_parameters: Mapping[str, Iterable[nn.Parameter]] | None = None,
        enabled: bool = True,
        **options: Any,
    ) -> None:
        alpha = check_alpha(alpha)
        beta_max = check_number("beta_max", beta_max, minimum=0.0, strict=True)
        check_choice("scale", scale, ("all", "multimodal"))
        super().__init__(model, encoders, num_classes, enabled=enabled, **options)
        self.alpha = alpha
        self.beta_max = beta_max
        self.scale = scale
        if extra_parameters:
            self.scale_parameter_gradients(extra_parameters)

    def _coefficients(self, scores: torch.Tensor) -> torch.Tensor:
        if self.task == "regression":  # scores are batch errors: lower is better
            return mlb_error_coefficients(scores, self.alpha, self.beta_max)
        return mlb_coefficients(scores, self.alpha, self.beta_max)

    def _scales_head_loss(self) -> bool:
        return self.scale == "all"

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, alpha={self.alpha}, beta_max={self.beta_max}, "
            f"scale={self.scale!r}, {self._window_repr()}"
        )
