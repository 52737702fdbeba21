"""Training-step time of MLB vs Multi-Loss vs Joint on a mid-size two-CNN model.

``make bench`` runs this with timing on (interleaved rounds, median ratio with min-max);
``make test`` runs it as a smoke run (GB_BENCH_ROUNDS=1).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import gradbalance as gb
from benchmarks.interleave import interleaved_times, ratios
from benchmarks.models import TwoCNN, two_cnn_batch

ROUNDS = int(os.environ.get("GB_BENCH_ROUNDS", "21"))
RESULTS = Path(__file__).parent / "results"
METHODS = {"Joint": gb.Joint, "MultiLoss": gb.MultiLoss, "MLB": gb.MLB}


def make_step(method: str):
    torch.manual_seed(0)
    model = TwoCNN()
    bal = METHODS[method](model, encoders=[model.audio, model.video], num_classes=6)
    opt = torch.optim.Adam([*model.parameters(), *bal.parameters()], lr=1e-3)
    audio, video, y = two_cnn_batch()

    def step() -> None:
        loss = bal.loss(model(audio, video), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


@pytest.mark.parametrize("method", list(METHODS))
def test_step(benchmark, method):
    benchmark(make_step(method))


def test_interleaved_ratios():
    steps = {name: make_step(name) for name in METHODS}
    times = interleaved_times(
        steps, rounds=ROUNDS, calls_per_round=3, warmup=2 if ROUNDS > 1 else 0
    )
    table = {
        "MLB / MultiLoss": ratios(times, "MultiLoss")["MLB"],
        "MLB / Joint": ratios(times, "Joint")["MLB"],
        "MultiLoss / Joint": ratios(times, "Joint")["MultiLoss"],
    }
    for name, ratio in table.items():
        print(f"{name}: {ratio}")
        assert ratio.median > 0
    if ROUNDS > 1:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "step_overhead_two_cnn.json").write_text(
            json.dumps(
                {
                    "rounds": ROUNDS,
                    "torch": torch.__version__,
                    "ratios": {k: vars(v) for k, v in table.items()},
                },
                indent=2,
            )
        )
