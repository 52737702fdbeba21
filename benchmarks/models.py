"""Benchmark models: a mid-size two-CNN audio-visual network."""

from __future__ import annotations

import torch
from torch import nn


def conv_tower(in_channels: int, width: int = 32, depth: int = 4) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    for index in range(depth):
        out = width * 2 ** min(index, 2)
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        channels = out
    return nn.Sequential(*layers)


class TwoCNN(nn.Module):
    """Audio (1x64x64 spectrogram) and video (3x64x64 frame) CNN encoders, late-linear head."""

    def __init__(self, num_classes: int = 6, width: int = 32) -> None:
        super().__init__()
        self.audio = conv_tower(1, width)
        self.video = conv_tower(3, width)
        self.fusion = nn.Linear(2 * 4 * width, num_classes)

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        za = self.audio(audio).mean((2, 3))
        zv = self.video(video).mean((2, 3))
        return self.fusion(torch.cat([za, zv], dim=1))


def two_cnn_batch(batch: int = 16, num_classes: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 1, 64, 64, generator=g),
        torch.randn(batch, 3, 64, 64, generator=g),
        torch.randint(0, num_classes, (batch,), generator=g),
    )
