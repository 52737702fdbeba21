"""The toy two-modality problem the examples share: generated tensors and a two-MLP model.

"audio" is low-dimensional, separable and noisy (learned fast); "video" carries its class in
32 weak dimensions (learned slowly), so joint training under-trains the video encoder.
"""

from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 6


def make_tensors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(audio (n, 4), video (n, 32), labels (n,))``; the class layout is fixed, ``seed``
    draws the samples."""
    g = torch.Generator().manual_seed(seed)
    layout = torch.Generator().manual_seed(1234)
    audio_means = torch.randn(NUM_CLASSES, 4, generator=layout) * 1.2
    video_means = torch.randn(NUM_CLASSES, 32, generator=layout) * 0.3
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    audio = audio_means[y] + torch.randn(n, 4, generator=g)
    video = video_means[y] + torch.randn(n, 32, generator=g)
    return audio, video, y


class AudioVisualNet(nn.Module):
    """Two MLP encoders (``audio``, ``video``) and a late-linear fusion head."""

    def __init__(self, hidden: int = 32, audio_dim: int = 4, video_dim: int = 32) -> None:
        super().__init__()
        self.audio = nn.Sequential(
            nn.Linear(audio_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden)
        )
        self.video = nn.Sequential(
            nn.Linear(video_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden)
        )
        self.fusion = nn.Linear(2 * hidden, NUM_CLASSES)

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        return self.fusion(torch.cat([self.audio(audio), self.video(video)], dim=-1))
