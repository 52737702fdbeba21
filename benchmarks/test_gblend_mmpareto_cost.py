"""Training-step time of Gradient Blending and MMPareto relative to Joint and Multi-Loss.

The steps of ``benchmarks/test_agm_cost.py`` (mid-size two-CNN model, batch 16, 64x64 inputs,
Adam), interleaved rounds, median ratio with min-max. GBlend's timed steps are its training
steps (the held-out pass and the per-epoch update are outside them); MMPareto's include the
gradient combination in ``backward()``. ``GB_BENCH_ROUNDS=1`` is a smoke run (nothing written).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from benchmarks.interleave import interleaved_times, ratio_table, write_results
from benchmarks.test_agm_cost import make_step

ROUNDS = int(os.environ.get("GB_BENCH_ROUNDS", "15"))
RESULTS = Path(__file__).parent / "results"
VARIANTS = ("Joint", "MultiLoss", "GBlend", "MMPareto")


def test_interleaved_cost_ratios():
    steps = {name: make_step(name) for name in VARIANTS}
    times = interleaved_times(
        steps, rounds=ROUNDS, calls_per_round=2, warmup=2 if ROUNDS > 1 else 0
    )
    table = ratio_table(times, ("Joint", "MultiLoss"))
    for name, ratio in table.items():
        print(f"two_cnn: {name} = {ratio}")
        assert ratio.median > 0
    if ROUNDS > 1:
        write_results(
            RESULTS / "gblend_mmpareto_cost_two_cnn.json",
            times,
            table,
            ROUNDS,
            threads=torch.get_num_threads(),
            device="cpu",
            batch=16,
        )
