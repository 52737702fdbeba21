"""Fusion heads provided by the library: :class:`MMCosineHead`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MMCosineHead(nn.Module):
    """MMCosine fusion head: ``logits = scale * sum_m cos(z_m, w_{m,k})`` with no bias.

    Each modality's features and each class's weight vector are L2-normalised, so no
    modality can dominate the fused logits by the norm of its features (Xu et al., ICASSP
    2023; METHODS.md §2.9). Works with any balancer.

    Args:
        feature_dims: feature width of each modality, in the order features are passed.
        num_classes: number of classes K.
        scale: the temperature ``s`` (10 in the paper's configurations).

    Example:
        >>> head = MMCosineHead([8, 6], num_classes=3)
        >>> a, v = torch.randn(4, 8), torch.randn(4, 6)
        >>> head(a, v).shape
        torch.Size([4, 3])
        >>> torch.allclose(head(a, v), sum(head.modality_logits(a, v)))
        True
    """

    def __init__(self, feature_dims: Sequence[int], num_classes: int, scale: float = 10.0) -> None:
        super().__init__()
        if len(feature_dims) < 2:
            raise ValueError(f"MMCosineHead needs at least two modalities, got {len(feature_dims)}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(num_classes, dim)) for dim in feature_dims]
        )
        for weight in self.weights:
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))

    def modality_logits(self, *features: torch.Tensor) -> list[torch.Tensor]:
        """The per-modality terms ``scale * cos(z_m, w_m)``, each ``(B, K)``."""
        if len(features) != len(self.weights):
            raise ValueError(
                f"MMCosineHead was built for {len(self.weights)} modalities, "
                f"got {len(features)} feature tensors"
            )
        return [
            self.scale * F.linear(F.normalize(z, dim=-1), F.normalize(w, dim=-1))
            for z, w in zip(features, self.weights)
        ]

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.modality_logits(*features)).sum(0)
