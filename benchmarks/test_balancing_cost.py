"""Cost of the balancing work alone: gradbalance's MLB vs the official approach.

Both run on the same model, batch and populated gradients, interleaved (see
``benchmarks/balancing_cost.py``); ``make test`` runs this as a smoke run (GB_BENCH_ROUNDS=1).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.balancing_cost import compare
from benchmarks.interleave import ratios
from benchmarks.steps import MODELS

ROUNDS = int(os.environ.get("GB_BENCH_ROUNDS", "31"))
RESULTS = Path(__file__).parent / "results"


@pytest.mark.parametrize("model_name", ["two_cnn", "reference"])
def test_balancing_cost(model_name):
    model, inputs, y = MODELS[model_name]()
    times = compare(
        model, [model.audio, model.video], [["audio."], ["video."]], inputs, y, 6, ROUNDS
    )
    speedup = ratios(times, "gradbalance")["official"]
    seconds = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"{model_name}: official / gradbalance balancing cost = {speedup}; median s {seconds}")
    assert speedup.median > 0
    if ROUNDS > 1:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"balancing_cost_{model_name}.json").write_text(
            json.dumps(
                {
                    "rounds": ROUNDS,
                    "median_seconds": seconds,
                    "official_over_gradbalance": vars(speedup),
                },
                indent=2,
            )
        )


class ManyTowers(nn.Module):
    def __init__(self, num_modalities: int, width: int = 64, depth: int = 6, classes: int = 6):
        super().__init__()
        self.towers = nn.ModuleList(
            nn.Sequential(
                *[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)]
            )
            for _ in range(num_modalities)
        )
        self.fusion = nn.Linear(num_modalities * width, classes)

    def forward(self, *inputs):
        return self.fusion(torch.cat([t(x) for t, x in zip(self.towers, inputs)], dim=1))


@pytest.mark.parametrize("num_modalities", [2, 3, 4, 8])
def test_balancing_cost_grows_linearly_in_m(num_modalities):
    torch.manual_seed(0)
    model = ManyTowers(num_modalities)
    inputs = [torch.randn(32, 64) for _ in range(num_modalities)]
    y = torch.randint(0, 6, (32,))
    prefixes = [[f"towers.{m}."] for m in range(num_modalities)]
    times = compare(model, list(model.towers), prefixes, inputs, y, 6, ROUNDS)
    per_modality = {k: sorted(v)[len(v) // 2] / num_modalities * 1e6 for k, v in times.items()}
    print(f"M={num_modalities}: microseconds per modality {per_modality}")
    if ROUNDS > 1:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"balancing_cost_m{num_modalities}.json").write_text(
            json.dumps({"rounds": ROUNDS, "us_per_modality": per_modality}, indent=2)
        )
