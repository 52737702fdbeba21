"""Fusion heads provided by the library: :class:`MMCosineHead`."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class MMCosineHead(nn.Module):
    """MMCosine fusion head: ``logits = scale * sum_m cos(z_m, w_{m,k})`` with no bias.

    Each modality's features and each class's weight vector are L2-normalised, so no
    modality can dominate the fused logits by the norm of its features (Xu et al., ICASSP
    2023). Works with any balancer.

    Call convention: one ``(B, D_m)`` feature tensor per modality, in the order of
    ``feature_dims``, either as separate arguments ``head(z_1, ..., z_M)`` or as one list or
    tuple ``head([z_1, ..., z_M])`` (the same result).

    ``modality_logits(*features)`` returns the per-modality terms (they sum to the forward
    output), so OGM and MSLR read their unimodal scores from it (``fusion_head=head``), and
    ``modality_parameters()`` gives each modality's weight block (for MLB's
    ``extra_parameters``).

    Args:
        feature_dims: feature width of each modality, in the order features are passed.
        num_classes: number of classes K.
        scale: the temperature ``s`` (10 in the paper's configurations).

    Raises:
        ValueError: fewer than two modalities, a width or ``num_classes`` < 1, ``scale <= 0``;
            at call time, the wrong number of features or a wrong feature width.

    Example:
        >>> head = MMCosineHead([8, 6], num_classes=3)
        >>> a, v = torch.randn(4, 8), torch.randn(4, 6)
        >>> head(a, v).shape
        torch.Size([4, 3])
        >>> torch.allclose(head(a, v), sum(head.modality_logits(a, v)))
        True
        >>> torch.equal(head([a, v]), head(a, v))  # a list (or tuple) of features works too
        True
    """

    def __init__(self, feature_dims: Sequence[int], num_classes: int, scale: float = 10.0) -> None:
        super().__init__()
        try:
            dims = [operator.index(d) for d in feature_dims]
        except TypeError as error:
            raise ValueError(f"feature_dims must be ints, got {feature_dims!r}") from error
        if len(dims) < 2:
            raise ValueError(f"MMCosineHead needs at least two modalities, got {len(dims)}")
        if any(d < 1 for d in dims):
            raise ValueError(f"feature_dims must be positive ints, got {dims}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.feature_dims = dims
        self.num_classes = num_classes
        self.scale = float(scale)
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(num_classes, dim)) for dim in dims]
        )
        for weight in self.weights:
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))

    def modality_logits(
        self, *features: torch.Tensor | Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """The per-modality terms ``scale * cos(z_m, w_m)``, each ``(B, K)``.

        Called as ``modality_logits(z_1, ..., z_M)`` or ``modality_logits([z_1, ..., z_M])``.
        """
        tensors = _feature_list(features)
        if len(tensors) != len(self.weights):
            raise ValueError(
                "MMCosineHead takes one feature tensor per modality, as head(z_1, ..., z_M) or "
                f"head([z_1, ..., z_M]): it was built for {len(self.weights)} modalities, "
                f"got {len(tensors)}"
            )
        for index, (z, dim) in enumerate(zip(tensors, self.feature_dims)):
            if z.shape[-1] != dim:
                raise ValueError(
                    f"MMCosineHead: modality {index} should have feature width {dim}, "
                    f"got shape {tuple(z.shape)}"
                )
        return [
            self.scale * F.linear(F.normalize(z, dim=-1), F.normalize(w, dim=-1))
            for z, w in zip(tensors, self.weights)
        ]

    def modality_parameters(self) -> list[list[nn.Parameter]]:
        """Each modality's class-weight block ``[[W_m]]`` (there is no bias)."""
        return [[weight] for weight in self.weights]

    def forward(self, *features: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """The fused logits ``(B, K)``: ``head(z_1, ..., z_M)`` or ``head([z_1, ..., z_M])``."""
        return torch.stack(self.modality_logits(*features)).sum(0)

    def extra_repr(self) -> str:
        return (
            f"feature_dims={self.feature_dims}, num_classes={self.num_classes}, scale={self.scale}"
        )


def _feature_list(features: tuple[torch.Tensor | Sequence[torch.Tensor], ...]) -> list[Any]:
    """The features given as separate arguments, or as one list or tuple of tensors."""
    if len(features) == 1 and isinstance(features[0], (list, tuple)):
        return list(features[0])
    return list(features)
