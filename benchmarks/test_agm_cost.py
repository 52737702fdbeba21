"""Training-step time of AGM (both masking modes) and every other method relative to Joint.

GBlend's timed steps are plain training steps (its held-out pass and per-epoch update are
outside them); MMPareto's include the gradient combination in ``backward()``.

Mid-size two-CNN model (``benchmarks.models.TwoCNN``, batch 16, 64x64 inputs), interleaved
rounds, median ratio with min-max. ``make bench`` times it; ``make test`` runs it as a smoke run
(GB_BENCH_ROUNDS=1). ``GB_BENCH_DEVICE=cuda`` and ``GB_BENCH_BATCH=N`` time it on a GPU and
another batch size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import gradbalance as gb
from benchmarks.interleave import interleaved_times, ratios, write_results
from benchmarks.models import TwoCNN, two_cnn_batch

ROUNDS = int(os.environ.get("GB_BENCH_ROUNDS", "15"))
DEVICE = os.environ.get("GB_BENCH_DEVICE", "cpu")
BATCH = int(os.environ.get("GB_BENCH_BATCH", "16"))
RESULTS = Path(__file__).parent / "results"


def _balancer(variant: str, model: TwoCNN, inputs: tuple[torch.Tensor, ...]) -> gb.Balancer:
    encoders = [model.audio, model.video]
    if variant == "Joint":
        return gb.Joint(model, encoders, num_classes=6)
    if variant == "MultiLoss":
        return gb.MultiLoss(model, encoders, num_classes=6)
    if variant == "MLB":
        return gb.MLB(model, encoders, num_classes=6)
    if variant == "AGM feature":
        return gb.AGM(
            model,
            encoders,
            num_classes=6,
            fusion=lambda za, zv: model.fusion(torch.cat([za, zv], 1)),
        )
    if variant == "AGM input":
        names = ("audio", "video")
        return gb.AGM(
            model,
            encoders,
            num_classes=6,
            masking="input",
            forward_masked=lambda masked: model(
                *(x.mul(0) if n in masked else x for n, x in zip(names, inputs))
            ),
        )
    if variant == "OGM":
        return gb.OGM(model, encoders, num_classes=6, fusion_head=model.fusion)
    if variant == "OGM-GE":
        return gb.OGMGE(model, encoders, num_classes=6, fusion_head=model.fusion)
    if variant == "PMR":
        return gb.PMR(model, encoders, num_classes=6)
    if variant == "MSLR":
        return gb.MSLR(model, encoders, num_classes=6, fusion_head=model.fusion)
    if variant == "GBlend":
        return gb.GBlend(model, encoders, num_classes=6)
    if variant == "MMPareto":
        return gb.MMPareto(model, encoders, num_classes=6)
    raise ValueError(variant)


VARIANTS = (
    "Joint",
    "AGM feature",
    "AGM input",
    "OGM",
    "OGM-GE",
    "PMR",
    "MSLR",
    "MultiLoss",
    "MLB",
    "GBlend",
    "MMPareto",
)


def make_step(variant: str) -> Callable[[], None]:
    """One full training step (forward, loss, backward, after_backward, Adam step)."""
    torch.manual_seed(0)
    model = TwoCNN().to(DEVICE)
    audio, video, target = (t.to(DEVICE) for t in two_cnn_batch(batch=BATCH))
    inputs = (audio, video)
    bal = _balancer(variant, model, inputs)
    bal.loss(model(*inputs), target)  # materialise lazy heads before building the optimizer
    if variant == "PMR":
        bal.epoch_end()  # prototypes exist: the timed steps add the prototype loss
    opt = torch.optim.Adam([*model.parameters(), *bal.parameters()], lr=1e-3)

    def step() -> None:
        loss = bal.loss(model(*inputs), target)
        opt.zero_grad()
        loss.backward()
        bal.after_backward()
        opt.step()

    return step


@pytest.mark.parametrize("variant", ["Joint", "AGM feature", "AGM input"])
def test_step(benchmark, variant):
    step = make_step(variant)
    if DEVICE.startswith("cuda"):
        benchmark(lambda: (step(), torch.cuda.synchronize()))
    else:
        benchmark(step)


def test_interleaved_cost_ratios():
    steps = {name: make_step(name) for name in VARIANTS}
    times = interleaved_times(
        steps, rounds=ROUNDS, calls_per_round=2, warmup=2 if ROUNDS > 1 else 0
    )
    table = {f"{name} / Joint": ratio for name, ratio in ratios(times, "Joint").items()}
    del table["Joint / Joint"]
    for name, ratio in table.items():
        print(f"two_cnn: {name} = {ratio}")
        assert ratio.median > 0
    if ROUNDS > 1:
        suffix = "" if DEVICE == "cpu" and BATCH == 16 else f"_{DEVICE}_b{BATCH}"
        write_results(
            RESULTS / f"baseline_cost_two_cnn{suffix}.json",
            times,
            table,
            ROUNDS,
            threads=torch.get_num_threads(),
            device=torch.cuda.get_device_name() if DEVICE.startswith("cuda") else "cpu",
            batch=BATCH,
        )
