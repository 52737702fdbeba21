"""Multi-Loss and MLB (Multi-Loss Balanced): fused loss plus one loss per unimodal head."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from gradbalance.balancer import Balancer, _per_encoder
from gradbalance.coefficients import _check_alpha_beta, mlb_coefficients

Scale = Literal["all", "multimodal"]


class MultiLoss(Balancer):
    """Multi-Loss training: ``CE(fused) + sum_m CE(head_m(z_m))``, no modulation.

    Each encoder gets an auxiliary linear head trained on its feature; every coefficient is 1
    (MLB with ``alpha = 0``). Scores (each head's mean true-class probability) are still
    recorded, so the balance can be watched.

    Args:
        model: the multimodal model (unchanged by the balancer).
        encoders: one submodule per modality (list or dict ``name -> module``).
        num_classes: number of classes.
        fused_weight: weight of the fused cross-entropy.
        unimodal_weight: weight of each head's cross-entropy (once, or per encoder).
        **common: the options of :class:`~gradbalance.balancer.Balancer`
            (``feature_dims``, ``pool``, ``features``, ``flush_every``).

    Example:
        >>> import torch, gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.MultiLoss(model, encoders=[model.audio, model.video], num_classes=3)
        >>> y = torch.tensor([0, 1, 2, 0])
        >>> bal.loss(model(torch.randn(4, 8), torch.randn(4, 6)), y).backward()
        >>> bal.coefficients["audio"]
        tensor(1.)
    """

    scales_gradients = False

    def __init__(
        self,
        model: nn.Module,
        encoders: Sequence[nn.Module] | Mapping[str, nn.Module],
        num_classes: int,
        *,
        fused_weight: float = 1.0,
        unimodal_weight: float | Sequence[float] | Mapping[str, float] = 1.0,
        **common: Any,
    ) -> None:
        super().__init__(model, encoders, num_classes, **common)
        weights = _per_encoder(unimodal_weight, self.names, "unimodal_weight")
        for name, weight in {"fused_weight": fused_weight, **weights}.items():
            if weight is None or not weight >= 0:
                raise ValueError(f"loss weight {name!r} must be >= 0, got {weight}")
        self.fused_weight = float(fused_weight)
        self.unimodal_weights: dict[str, float] = {k: float(v) for k, v in weights.items()}

    def _coefficients(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(scores)

    def _scales_head_loss(self) -> bool:
        return False

    def _loss(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        features: dict[str, torch.Tensor],
        unimodal: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        scores = self._head_scores(unimodal, target)
        if self._updating(logits):
            self._store(self._coefficients(scores), scores)
        total = self.fused_weight * F.cross_entropy(logits, target)
        scaled = self._scales_head_loss()
        for name, head_logits in unimodal.items():
            head_loss = self._scaled_head_loss(head_logits, target, name, scaled)
            total = total + self.unimodal_weights[name] * head_loss.to(total.device)
        return total


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
        num_classes: number of classes.
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
        fused_weight, unimodal_weight, **common: as :class:`MultiLoss`.

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
    """

    scales_gradients = True

    def __init__(
        self,
        model: nn.Module,
        encoders: Sequence[nn.Module] | Mapping[str, nn.Module],
        num_classes: int,
        *,
        alpha: float = 1.0,
        beta_max: float = 2.0,
        scale: Scale = "all",
        extra_parameters: Mapping[str, Iterable[nn.Parameter]] | None = None,
        enabled: bool = True,
        **options: Any,
    ) -> None:
        _check_alpha_beta(alpha, beta_max)
        if scale not in ("all", "multimodal"):
            raise ValueError(f"scale must be 'all' or 'multimodal', got {scale!r}")
        super().__init__(model, encoders, num_classes, **options)
        self.alpha = float(alpha)
        self.beta_max = float(beta_max)
        self.scale = scale
        self.enabled = enabled
        if extra_parameters:
            self.scale_parameters(extra_parameters)

    def _coefficients(self, scores: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return torch.ones_like(scores)
        return mlb_coefficients(scores, self.alpha, self.beta_max)

    def _scales_head_loss(self) -> bool:
        return self.scale == "all"

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, alpha={self.alpha}, beta_max={self.beta_max}, "
            f"scale={self.scale!r}, enabled={self.enabled}"
        )
