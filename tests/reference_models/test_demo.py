"""The plain-loop demo runs end to end and prints one row per method."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "examples" / "plain_loop_demo.py"


@pytest.fixture(autouse=True)
def examples_importable(monkeypatch):
    """The examples import their shared toy problem from their own folder, as scripts do."""
    monkeypatch.syspath_prepend(str(DEMO.parent))


def test_demo_prints_a_row_per_method(capsys):
    module = runpy.run_path(str(DEMO))
    module["main"](epochs=1, seeds=(0,))
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["Joint", "Multi-Loss", "MLB"]


def test_generated_data_are_deterministic():
    make_data = runpy.run_path(str(DEMO))["make_data"]
    first, second = make_data(50, seed=3), make_data(50, seed=3)
    assert all((a == b).all() for a, b in zip(first, second))
