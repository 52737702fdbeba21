"""What the fusion head sees in place of a missing modality: the model's fill.

A sample whose modality is absent (``present[:, m]`` False) reaches the model with a zero
input (:func:`reference_models.data.missing.with_missing`). Three ways to fuse it:

* ``"input"``: nothing changes; the encoder runs on the zeros and the fusion head sees its
  output (zero filling, the common default; the encoder also learns from those rows through
  the fused loss);
* ``"zero"``: the absent rows' features are replaced by zeros after the encoder (a constant
  fill: for a Late-Linear head the modality then adds nothing to the logits);
* ``"learned"``: they are replaced by a learned vector per modality (a "missing" token, trained
  through the fused loss).

With ``"zero"`` and ``"learned"`` the absent rows send no gradient into their encoder (the
replacement is a ``torch.where``, no host synchronisation); the balancer's capture of the
encoder's output is unchanged and ``bal.loss(..., present=...)`` leaves those rows out of the
unimodal heads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MISSING_FILLS", "MissingFill"]

MISSING_FILLS: tuple[str, ...] = ("input", "zero", "learned")
"""The fills a model takes (``missing_fill=``)."""


class MissingFill(nn.Module):
    """Replace the features of absent samples by zeros or a learned vector per modality.

    Args:
        feature_dims: the feature width of each modality.
        kind: ``"zero"`` or ``"learned"`` (``"input"`` needs no module).

    Example:
        >>> fill = MissingFill([4, 3], "learned")
        >>> features = [torch.ones(2, 4), torch.ones(2, 3, requires_grad=True)]
        >>> present = torch.tensor([[True, True], [True, False]])
        >>> audio, video = fill(features, present)
        >>> video[1].tolist() == fill.tokens[1].tolist(), video[0].tolist()
        (True, [1.0, 1.0, 1.0])
    """

    def __init__(self, feature_dims: Sequence[int], kind: str) -> None:
        super().__init__()
        if kind not in ("zero", "learned"):
            raise ValueError(f"MissingFill kind must be 'zero' or 'learned', got {kind!r}")
        self.kind = kind
        tokens = [torch.zeros(int(dim)) for dim in feature_dims]
        self.tokens = nn.ParameterList(
            [nn.Parameter(token, requires_grad=kind == "learned") for token in tokens]
        )

    def forward(
        self, features: Sequence[torch.Tensor], present: torch.Tensor
    ) -> list[torch.Tensor]:
        """Each modality's features ``(B, D)`` or tokens ``(B, T, D)`` with the rows where
        ``present[:, m]`` is False replaced by the fill."""
        if present.dim() != 2 or present.shape[1] != len(self.tokens):
            raise ValueError(
                f"present must be (B, {len(self.tokens)}) bool, got shape {tuple(present.shape)}"
            )
        filled = []
        for column, (feature, token) in enumerate(zip(features, self.tokens)):
            keep = present[:, column].view(-1, *[1] * (feature.dim() - 1))
            filled.append(torch.where(keep, feature, token.to(feature.dtype)))
        return filled
