"""Small models for examples and tests (not a model zoo)."""

from __future__ import annotations

import torch
from torch import nn


class TwoTowerNet(nn.Module):
    """Two MLP encoders (``audio``: 8 inputs, ``video``: 6 inputs) and a late linear fusion.

    Args:
        audio_dim: audio input width.
        video_dim: video input width.
        hidden: feature width of each encoder.
        num_classes: number of classes.

    Example:
        >>> net = TwoTowerNet()
        >>> net(torch.randn(2, 8), torch.randn(2, 6)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self, audio_dim: int = 8, video_dim: int = 6, hidden: int = 16, num_classes: int = 3
    ) -> None:
        super().__init__()
        self.audio = nn.Sequential(
            nn.Linear(audio_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden)
        )
        self.video = nn.Sequential(
            nn.Linear(video_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden)
        )
        self.fusion = nn.Linear(2 * hidden, num_classes)

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        return self.fusion(torch.cat([self.audio(audio), self.video(video)], dim=-1))
