"""The three-modality regression example runs end to end: one row per method, MLB's
coefficients moved away from 1, and the plot written where ``--out`` says."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "three_modalities_regression.py"


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_example_prints_a_row_per_method_and_plots_mlb(capsys, tmp_path, one_thread):
    module = runpy.run_path(str(EXAMPLE))
    results = module["main"](epochs=1, out=str(tmp_path / "k.png"))
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["Joint", "Multi-Loss", "MLB"]
    assert (tmp_path / "k.png").stat().st_size > 0
    assert results["Joint"]["coefficients"] == [1.0, 1.0, 1.0]
    assert all(k != 1.0 for k in results["MLB"]["coefficients"])
    for result in results.values():
        assert 0 < result["mae"] < 3 and -1 <= result["corr"] <= 1


def test_generated_data_are_deterministic_and_in_range():
    make_data = runpy.run_path(str(EXAMPLE))["make_data"]
    first, second = make_data(40, seed=3), make_data(40, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    text, audio, vision, label = first
    assert text.shape[:2] == audio.shape[:2] == vision.shape[:2] == (40, 8)
    assert label.abs().max() <= 3


@pytest.mark.slow
def test_example_runs_as_a_script(tmp_path):
    out = tmp_path / "plot" / "mlb.png"
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--out", str(out)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "MLB" in done.stdout and out.exists()
