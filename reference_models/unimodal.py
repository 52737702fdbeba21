"""Single-modality classifiers: the "Audio only" and "Video only" baselines of Table 3."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["UnimodalClassifier"]


class UnimodalClassifier(nn.Module):
    """One modality's encoder and a linear classifier: the "Audio only"/"Video only" baselines.

    Called like the audio-visual models, ``model(audio, video)``; only its own modality is
    used. The last pooled feature is kept in :attr:`last_features` for the probe. A sample
    missing its modality (``present``) is classified from its zero input: the classifier has
    nothing else.

    Args:
        encoder: the modality's encoder (pooled ``(B, D)`` output).
        feature_dim: its feature width.
        num_classes: number of classes.
        modality: ``"audio"`` or ``"video"``.

    Example:
        >>> from reference_models.encoders import ResNet18AudioEncoder
        >>> model = UnimodalClassifier(ResNet18AudioEncoder(width=4), 32, 6, "audio")
        >>> model(torch.randn(2, 65, 63), None).shape
        torch.Size([2, 6])
    """

    def __init__(
        self, encoder: nn.Module, feature_dim: int, num_classes: int, modality: str
    ) -> None:
        super().__init__()
        if modality not in ("audio", "video"):
            raise ValueError(f"modality must be 'audio' or 'video', got {modality!r}")
        self.modality = modality
        self.encoder = encoder
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.last_features: dict[str, torch.Tensor] = {}
        self.names = [modality]
        self.feature_dims = {modality: int(feature_dim)}

    def forward(
        self,
        audio: torch.Tensor | None,
        video: torch.Tensor | None,
        *,
        audio_padding_mask: torch.Tensor | None = None,
        video_padding_mask: torch.Tensor | None = None,
        present: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, K)`` from this classifier's modality (the other input and ``present``
        are ignored)."""
        if self.modality == "audio":
            inputs, padding_mask = audio, audio_padding_mask
        else:
            inputs, padding_mask = video, video_padding_mask
        features = self.encoder(inputs, padding_mask=padding_mask)
        self.last_features = {self.modality: features}
        return self.classifier(features)
