"""Training-step time of MLB vs Multi-Loss vs Joint, interleaved, as median ratios.

Two models: the CREMA-D ResNet-18 reference model at the paper's shapes (batch 4 on the CPU)
and a mid-size two-CNN model. ``make bench`` runs this with timing on; ``make test`` runs it
as a smoke run (GB_BENCH_ROUNDS=1).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.interleave import interleaved_times, ratios, write_results
from benchmarks.steps import METHODS, method_steps

ROUNDS = int(os.environ.get("GB_BENCH_ROUNDS", "15"))
RESULTS = Path(__file__).parent / "results"
CALLS = {"reference": 1, "two_cnn": 3}


@pytest.mark.parametrize("method", list(METHODS))
def test_step_two_cnn(benchmark, method):
    benchmark(method_steps("two_cnn", methods=(method,))[method])


@pytest.mark.parametrize("masked", [False, True], ids=["complete", "present"])
@pytest.mark.parametrize("model_name", ["two_cnn", "reference"])
def test_interleaved_step_ratios(model_name, masked):
    """The ratios without and with a presence mask (``loss(..., present=)``, video absent in
    ~30% of the samples); results in ``step_overhead_<model>[_present].json``."""
    times = interleaved_times(
        method_steps(model_name, masked=masked),
        rounds=ROUNDS,
        calls_per_round=CALLS[model_name],
        warmup=2 if ROUNDS > 1 else 0,
    )
    table = {
        "MLB / MultiLoss": ratios(times, "MultiLoss")["MLB"],
        "MLB / Joint": ratios(times, "Joint")["MLB"],
        "MultiLoss / Joint": ratios(times, "Joint")["MultiLoss"],
    }
    for name, ratio in table.items():
        print(f"{model_name}{' (present=)' if masked else ''}: {name} = {ratio}")
        assert ratio.median > 0
    if ROUNDS > 1:
        suffix = "_present" if masked else ""
        write_results(RESULTS / f"step_overhead_{model_name}{suffix}.json", times, table, ROUNDS)
