"""Peak memory of a training step with and without balancing (one fresh process each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROUNDS = int(os.environ.get("GB_BENCH_ROUNDS", "15"))
RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def probe(model: str, method: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_probe", "--model", model, "--method", method],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("model", ["two_cnn", "reference"])
def test_peak_memory(model):
    records = {method: probe(model, method) for method in ["none", "MultiLoss", "MLB"]}
    peak = {method: r["peak_rss"] / 2**20 for method, r in records.items()}
    print(f"{model}: peak RSS MiB {peak}; MLB / none = {peak['MLB'] / peak['none']:.3f}")
    assert all(value > 0 for value in peak.values())
    if ROUNDS > 1:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"memory_{model}.json").write_text(json.dumps(records, indent=2))
