"""Training-step time of the newer methods (OPM, CGGM, InfoReg, AMSS, AMSS+) relative to
Multi-Loss and Joint.

The steps of ``benchmarks/test_agm_cost.py`` (mid-size two-CNN model, batch 16, 64x64 inputs,
Adam): forward, ``loss()``, ``backward()``, ``after_backward()`` (InfoReg's pull, AMSS's
masks) and the optimizer step, in interleaved rounds, median ratio with min-max. Each method
runs with the options that make it do all of its work every step: OPM drops on every forward
(``p_exe=1``) from the fused head's slices, CGGM with its direction term (``lam=0.2``),
InfoReg inside its prime learning window (the first epoch), AMSS and AMSS+ masking every
encoder parameter from the fused head's slices. ``GB_BENCH_ROUNDS=1`` is a smoke run (nothing
written); the target is each method within 1.10x of Multi-Loss.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import gradbalance as gb
from benchmarks.interleave import interleaved_times, ratio_table, write_results
from benchmarks.models import TwoCNN, two_cnn_batch

ROUNDS = int(os.environ.get("GB_BENCH_ROUNDS", "15"))
RESULTS = Path(__file__).parent / "results"
BATCH = 16


def _options(method: str, model: TwoCNN) -> dict[str, Any]:
    if method == "opm":
        return {"fusion_head": model.fusion, "p_exe": 1.0}
    if method in ("amss", "amss_plus"):
        return {"fusion_head": model.fusion}
    if method == "cggm":
        return {"lam": 0.2, "fusion_weights": model.fusion}
    return {}


VARIANTS = ("joint", "multiloss", "opm", "cggm", "inforeg", "amss", "amss_plus")


def make_step(method: str) -> Callable[[], None]:
    """One full training step of ``method`` (a name of ``gb.METHODS``) on the two-CNN model."""
    torch.manual_seed(0)
    model = TwoCNN()
    audio, video, target = two_cnn_batch(batch=BATCH)
    bal = gb.make(
        method, model, [model.audio, model.video], num_classes=6, **_options(method, model)
    )
    bal.loss(model(audio, video), target)  # materialise lazy heads before building the optimizer
    opt = torch.optim.Adam([*model.parameters(), *bal.parameters()], lr=1e-3)

    def step() -> None:
        loss = bal.loss(model(audio, video), target)
        opt.zero_grad()
        loss.backward()
        bal.after_backward()
        opt.step()

    return step


def test_interleaved_cost_ratios():
    steps = {name: make_step(name) for name in VARIANTS}
    times = interleaved_times(
        steps, rounds=ROUNDS, calls_per_round=2, warmup=2 if ROUNDS > 1 else 0
    )
    table = ratio_table(times, ("joint", "multiloss"))
    for name, ratio in table.items():
        print(f"two_cnn: {name} = {ratio}")
        assert ratio.median > 0
    if ROUNDS > 1:
        write_results(
            RESULTS / "newer_cost_two_cnn.json",
            times,
            table,
            ROUNDS,
            threads=torch.get_num_threads(),
            device="cpu",
            batch=BATCH,
        )
