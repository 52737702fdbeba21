"""Fusion heads of the paper: Late-Linear, MLP, FiLM, Gated, Transformer, decision-level,
MMCosine.

Every head is called as ``fusion(*features)`` with one tensor per modality, in the order of
``feature_dims``, and returns logits ``(B, K)``. All heads except :class:`TransformerFusion` take
pooled features ``(B, D_m)``; the Transformer fusion takes token sequences ``(B, T_m, D_m)``.
Heads with a per-modality decomposition (:class:`LateLinear`, :class:`DecisionFusion` and the
library's ``gradbalance.MMCosineHead``) expose ``modality_logits(*features)``, whose sum is the
forward output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

import gradbalance as gb
from reference_models.encoders import MaskedConformer

__all__ = [
    "FUSIONS",
    "DecisionFusion",
    "FiLMFusion",
    "GatedFusion",
    "LateLinear",
    "MLPFusion",
    "TransformerFusion",
    "build_fusion",
]


def _checked_dims(feature_dims: Sequence[int], head: str, exactly: int | None = None) -> list[int]:
    dims = [int(dim) for dim in feature_dims]
    if exactly is not None and len(dims) != exactly:
        raise ValueError(
            f"{head} is defined for exactly {exactly} modalities (the first conditions the "
            f"second), got feature_dims={dims}; use LateLinear, MLPFusion or TransformerFusion "
            "for other counts"
        )
    if not dims or any(dim < 1 for dim in dims):
        raise ValueError(f"{head} needs one positive feature dimension per modality, got {dims}")
    return dims


def _check_features(features: Sequence[torch.Tensor], dims: Sequence[int], head: str) -> None:
    if len(features) != len(dims):
        raise ValueError(
            f"{head} was built for {len(dims)} modalities, got {len(features)} feature tensors"
        )
    for index, (feature, dim) in enumerate(zip(features, dims)):
        if feature.shape[-1] != dim:
            raise ValueError(
                f"{head}: modality {index} should have feature dimension {dim}, got shape "
                f"{tuple(feature.shape)}"
            )


class LateLinear(nn.Module):
    """Late-Linear fusion: ``logits = sum_m W_m z_m + b``, one bias-free block per modality.

    Identical to one ``nn.Linear`` on the concatenated features, but kept as per-modality blocks
    ``self.linears[m]`` plus one shared ``self.bias``, so the per-modality slices
    ``W_m z_m + b / M`` (used by OGM, MSLR) and the weight blocks (scaled with each modality by
    MLB, as the official code does) are directly available. Initialised as the official code:
    each block like a default ``nn.Linear(D_m, K)``, the bias like the first block's bias.

    Args:
        feature_dims: feature width of each modality.
        num_classes: number of classes K.

    Example:
        >>> head = LateLinear([8, 6], num_classes=3)
        >>> a, v = torch.randn(4, 8), torch.randn(4, 6)
        >>> head(a, v).shape
        torch.Size([4, 3])
        >>> torch.allclose(head(a, v), sum(head.modality_logits(a, v)))
        True
    """

    def __init__(self, feature_dims: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.feature_dims = _checked_dims(feature_dims, type(self).__name__)
        self.linears = nn.ModuleList(
            [nn.Linear(dim, num_classes, bias=False) for dim in self.feature_dims]
        )
        bound = 1.0 / math.sqrt(self.feature_dims[0])
        self.bias = nn.Parameter(torch.empty(num_classes).uniform_(-bound, bound))

    def modality_logits(self, *features: torch.Tensor) -> list[torch.Tensor]:
        """The per-modality slices ``W_m z_m + b / M``, each ``(B, K)``; they sum to forward."""
        _check_features(features, self.feature_dims, type(self).__name__)
        share = self.bias / len(self.linears)
        return [linear(feature) + share for linear, feature in zip(self.linears, features)]

    def modality_parameters(self) -> list[list[nn.Parameter]]:
        """Each modality's weight block ``[[W_m]]``; the shared bias belongs to no modality."""
        return [[linear.weight] for linear in self.linears]

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        _check_features(features, self.feature_dims, type(self).__name__)
        return sum(linear(feature) for linear, feature in zip(self.linears, features)) + self.bias


class MLPFusion(nn.Module):
    """MLP ("mid-concat") fusion: a Late-Linear layer to ``hidden_dim``, then a small MLP.

    ``h = sum_m W_m z_m + b`` (64 wide), then ReLU → Dropout → Linear(64, 64) → ReLU →
    Dropout → Linear(64, K).

    Args:
        feature_dims: feature width of each modality.
        num_classes: number of classes K.
        hidden_dim: hidden width.
        dropout: dropout after each hidden layer.

    Example:
        >>> head = MLPFusion([8, 6, 5], num_classes=3)
        >>> head(torch.randn(4, 8), torch.randn(4, 6), torch.randn(4, 5)).shape
        torch.Size([4, 3])
    """

    def __init__(
        self,
        feature_dims: Sequence[int],
        num_classes: int,
        hidden_dim: int = 64,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.project = LateLinear(feature_dims, hidden_dim)
        self.feature_dims = self.project.feature_dims
        self.classifier = nn.Sequential(
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes),
        )

    def modality_parameters(self) -> list[list[nn.Parameter]]:
        """Each modality's weight block ``[[W_m]]`` of the first layer (scaled with it by MLB)."""
        return self.project.modality_parameters()

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.project(*features))


class FiLMFusion(nn.Module):
    """FiLM fusion for two modalities: the first modality conditions the second.

    ``[gamma, beta] = split(Linear(D_0, 2 D_1)(z_0))`` and
    ``logits = Linear(D_1, K)(gamma * z_1 + beta)`` (audio conditions video).

    Args:
        feature_dims: ``[D_0, D_1]``, the conditioning and the conditioned modality.
        num_classes: number of classes K.

    Raises:
        ValueError: not exactly two modalities.

    Example:
        >>> head = FiLMFusion([8, 6], num_classes=3)
        >>> head(torch.randn(4, 8), torch.randn(4, 6)).shape
        torch.Size([4, 3])
    """

    def __init__(self, feature_dims: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.feature_dims = _checked_dims(feature_dims, type(self).__name__, exactly=2)
        conditioning, conditioned = self.feature_dims
        self.film = nn.Linear(conditioning, 2 * conditioned)
        self.classifier = nn.Linear(conditioned, num_classes)

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        _check_features(features, self.feature_dims, type(self).__name__)
        conditioning, conditioned = features
        gamma, beta = self.film(conditioning).chunk(2, dim=-1)
        return self.classifier(gamma * conditioned + beta)


class GatedFusion(nn.Module):
    """Gated fusion for two modalities: the first modality gates the second.

    ``gate = sigmoid(Linear(D_0, H)(z_0))`` and
    ``logits = Linear(H, K)(gate * Linear(D_1, H)(z_1))``.

    Args:
        feature_dims: ``[D_0, D_1]``, the gating and the gated modality.
        num_classes: number of classes K.
        hidden_dim: width H of the gated representation; ``None`` gives ``D_1`` (512 for the
            reference encoders).

    Raises:
        ValueError: not exactly two modalities.

    Example:
        >>> head = GatedFusion([8, 6], num_classes=3)
        >>> head(torch.randn(4, 8), torch.randn(4, 6)).shape
        torch.Size([4, 3])
    """

    def __init__(
        self, feature_dims: Sequence[int], num_classes: int, hidden_dim: int | None = None
    ) -> None:
        super().__init__()
        self.feature_dims = _checked_dims(feature_dims, type(self).__name__, exactly=2)
        gating, gated = self.feature_dims
        hidden_dim = gated if hidden_dim is None else hidden_dim
        self.gate = nn.Linear(gating, hidden_dim)
        self.value = nn.Linear(gated, hidden_dim)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def modality_parameters(self) -> list[list[nn.Parameter]]:
        """Each modality's first-layer weight: ``[[gate.weight], [value.weight]]`` (scaled
        with its modality by MLB, as the official code's name match does)."""
        return [[self.gate.weight], [self.value.weight]]

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        _check_features(features, self.feature_dims, type(self).__name__)
        gating, gated = features
        return self.classifier(torch.sigmoid(self.gate(gating)) * self.value(gated))


class DecisionFusion(nn.Module):
    """Decision-level fusion: each modality's own linear head, batch-standardised, summed.

    ``u_m = Linear(D_m, K)(z_m)`` and ``logits = sum_m std(u_m)`` with
    ``std(t) = (t - mean(t)) / std(t)`` over all ``B·K`` entries of the batch (one scalar mean
    and standard deviation, from the batch also in eval mode): the authors' CREMA-D ResNet
    "Joint" configuration (``norm_decision: standardization``). With ``standardize=False`` the
    heads' logits are summed as they are.

    Args:
        feature_dims: feature width of each modality.
        num_classes: number of classes K.
        standardize: standardise each head's logits over the batch.
        eps: added to the standard deviation.

    Example:
        >>> head = DecisionFusion([8, 6], num_classes=3)
        >>> a, v = torch.randn(4, 8), torch.randn(4, 6)
        >>> torch.allclose(head(a, v), sum(head.modality_logits(a, v)))
        True
        >>> round(float(head.modality_logits(a, v)[0].std().detach()), 4)
        1.0
    """

    def __init__(
        self,
        feature_dims: Sequence[int],
        num_classes: int,
        standardize: bool = True,
        eps: float = 0.0,
    ) -> None:
        super().__init__()
        self.feature_dims = _checked_dims(feature_dims, type(self).__name__)
        self.heads = nn.ModuleList([nn.Linear(dim, num_classes) for dim in self.feature_dims])
        self.standardize = bool(standardize)
        self.eps = float(eps)

    def modality_logits(self, *features: torch.Tensor) -> list[torch.Tensor]:
        """Each modality's (standardised) head logits ``(B, K)``; they sum to forward."""
        _check_features(features, self.feature_dims, type(self).__name__)
        logits = [head(feature) for head, feature in zip(self.heads, features)]
        if not self.standardize:
            return logits
        return [(u - u.mean()) / (u.std() + self.eps) for u in logits]

    def modality_parameters(self) -> list[list[nn.Parameter]]:
        """Each modality's head ``[[W_m, b_m]]`` (part of its encoder in the official code)."""
        return [[head.weight, head.bias] for head in self.heads]

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        return sum(self.modality_logits(*features))


class TransformerFusion(nn.Module):
    """Transformer (TF) fusion: a 2-layer Conformer over ``[CLS; tokens_0; tokens_1; ...]``.

    Each modality's tokens ``(B, T_m, D_m)`` are projected to ``model_dim`` (identity when
    ``D_m == model_dim``, as for the 512-d reference encoders), get a learned modality embedding,
    and are concatenated after a learned CLS token (randn-initialised); a batch-first
    :class:`~reference_models.encoders.MaskedConformer` runs over the sequence and the CLS output
    goes through ``Linear(model_dim, K)``. Works for any number of
    modalities. Optional per-modality padding masks ``(B, T_m)`` (True = padded) are honoured:
    each sample's valid tokens are packed ahead of all padding, so in eval mode the logits are
    those of the same sample without padding.

    Args:
        feature_dims: token width of each modality.
        num_classes: number of classes K.
        model_dim: Conformer width; ``None`` gives ``max(feature_dims)``.
        num_layers: Conformer blocks.
        num_heads: attention heads (must divide ``model_dim``).
        kernel_size: depthwise convolution kernel.
        dropout: dropout inside the blocks.

    Example:
        >>> head = TransformerFusion([16, 16], num_classes=3, num_heads=2)
        >>> audio_tokens, video_tokens = torch.randn(2, 5, 16), torch.randn(2, 12, 16)
        >>> head(audio_tokens, video_tokens).shape
        torch.Size([2, 3])
    """

    takes_tokens = True

    def __init__(
        self,
        feature_dims: Sequence[int],
        num_classes: int,
        model_dim: int | None = None,
        num_layers: int = 2,
        num_heads: int = 8,
        kernel_size: int = 31,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.feature_dims = _checked_dims(feature_dims, type(self).__name__)
        model_dim = max(self.feature_dims) if model_dim is None else model_dim
        self.projections = nn.ModuleList(
            [
                nn.Identity() if dim == model_dim else nn.Linear(dim, model_dim)
                for dim in self.feature_dims
            ]
        )
        self.modality_embeddings = nn.Parameter(torch.zeros(len(self.feature_dims), model_dim))
        nn.init.normal_(self.modality_embeddings, std=0.02)
        self.cls_token = nn.Parameter(torch.randn(model_dim))
        self.conformer = MaskedConformer(
            model_dim, num_layers, num_heads=num_heads, kernel_size=kernel_size, dropout=dropout
        )
        self.classifier = nn.Linear(model_dim, num_classes)

    def forward(
        self,
        *tokens: torch.Tensor,
        padding_masks: Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Fuse ``(B, T_m, D_m)`` token sequences; ``padding_masks[m]`` is ``(B, T_m)`` or None."""
        name = type(self).__name__
        _check_features(tokens, self.feature_dims, name)
        if any(sequence.dim() != 3 for sequence in tokens):
            raise ValueError(
                f"{name} takes token sequences (batch, tokens, dim), got shapes "
                f"{[tuple(sequence.shape) for sequence in tokens]}; build the encoders with "
                "return_tokens=True"
            )
        if padding_masks is None:
            padding_masks = [None] * len(tokens)
        if len(padding_masks) != len(tokens):
            raise ValueError(
                f"{name}: got {len(padding_masks)} padding masks for {len(tokens)} "
                "modalities; pass one per modality (None for no padding)"
            )
        batch = tokens[0].shape[0]
        parts = [self.cls_token.expand(batch, 1, -1)]
        for sequence, projection, embedding in zip(
            tokens, self.projections, self.modality_embeddings
        ):
            parts.append(projection(sequence) + embedding)
        padding_mask = None
        if any(mask is not None for mask in padding_masks):
            masks = [torch.zeros(batch, 1, dtype=torch.bool, device=tokens[0].device)]
            masks += [
                torch.zeros(sequence.shape[:2], dtype=torch.bool, device=sequence.device)
                if mask is None
                else mask
                for sequence, mask in zip(tokens, padding_masks)
            ]
            padding_mask = torch.cat(masks, dim=1)
        sequence = torch.cat(parts, dim=1)
        if padding_mask is not None:
            # Valid tokens first, padding last (a stable sort keeps their order, CLS stays at 0),
            # so the convolutions see the same neighbours as in an unpadded sequence.
            padding_mask, order = torch.sort(padding_mask.to(torch.uint8), dim=1, stable=True)
            padding_mask = padding_mask.bool()
            sequence = sequence.gather(1, order.unsqueeze(-1).expand_as(sequence))
        fused = self.conformer(sequence, padding_mask)
        return self.classifier(fused[:, 0])


FUSIONS: dict[str, type[nn.Module]] = {
    "linear": LateLinear,
    "mlp": MLPFusion,
    "film": FiLMFusion,
    "gated": GatedFusion,
    "tf": TransformerFusion,
    "decision": DecisionFusion,
}
"""The fusion heads by name; ``"mmcosine"`` (``gradbalance.MMCosineHead``) is added by
:func:`build_fusion`."""


def build_fusion(
    name: str, feature_dims: Sequence[int], num_classes: int, **options: object
) -> nn.Module:
    """Build a fusion head by name: ``linear``, ``mlp``, ``film``, ``gated``, ``tf``,
    ``decision`` or ``mmcosine``.

    Args:
        name: the head's name (``cls_type`` of the official configs; ``mmcosine`` is the
            library's :class:`gradbalance.MMCosineHead`).
        feature_dims: feature width of each modality.
        num_classes: number of classes K.
        **options: keyword options of the head's class (e.g. ``scale`` for ``mmcosine``).

    Example:
        >>> build_fusion("gated", [8, 6], num_classes=3)(torch.randn(4, 8), torch.randn(4, 6)).shape
        torch.Size([4, 3])
    """
    if name == "mmcosine":
        return gb.MMCosineHead(feature_dims, num_classes, **options)
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion {name!r}; choose one of {[*FUSIONS, 'mmcosine']}")
    return FUSIONS[name](feature_dims, num_classes, **options)
