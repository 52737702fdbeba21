"""Shared fixtures: small multimodal models with any number of encoders."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class MultiTowerNet(nn.Module):
    """M MLP encoders (``towers[m]``) and a linear head on the concatenated features."""

    def __init__(self, input_dims: tuple[int, ...], hidden: int = 12, num_classes: int = 4):
        super().__init__()
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
            for d in input_dims
        )
        self.fusion = nn.Linear(hidden * len(input_dims), num_classes)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.fusion(torch.cat([t(x) for t, x in zip(self.towers, inputs)], dim=-1))


def make_batch(input_dims, batch=10, num_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(batch, d, generator=g) for d in input_dims]
    target = torch.randint(0, num_classes, (batch,), generator=g)
    return inputs, target


@pytest.fixture
def two_tower():
    torch.manual_seed(0)
    return MultiTowerNet((5, 7))
