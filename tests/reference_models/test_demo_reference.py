"""``make demo`` (``python -m reference_models.demo``) on a tiny version of its generated set."""

from __future__ import annotations

import json

import pytest
import torch

from reference_models import demo
from reference_models.data.synthetic import SyntheticAudioVisual


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are bound by per-operator overhead; under ``pytest -n 2`` two threads per
    worker oversubscribe the cores and spin (measured 5-30x slower). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


QUICK = {
    "width": 2,
    "max_epochs": 2,
    "batch_size": 8,
    "eval_batch_size": 12,
    "log_every": 2,
    "data_options": {
        "train_size": 16,
        "val_size": 8,
        "test_size": 8,
        "sample_rate": 4000,
        "duration": 0.25,
        "n_fft": 64,
        "hop_length": 64,
        "num_frames": 2,
        "image_size": 16,
    },
}


@pytest.mark.slow
def test_demo_prints_one_table_and_writes_the_plots(tmp_path, capsys):
    summary = demo.run_demo(
        tmp_path, methods=["video_only", "joint", "mlb", "ogm"], overrides=QUICK, jobs=1
    )
    out = capsys.readouterr().out
    table_lines = [line for line in summary["table"].splitlines() if line.startswith("| ")]
    assert table_lines[0].split("|")[1:-1] == [f" {c} " for c in demo._COLUMNS]
    assert [line.split("|")[1].strip() for line in table_lines[1:]] == [
        "Video only",
        "Joint",
        "MLB",
        "OGM",
    ]
    assert summary["table"] in out
    video_only = summary["rows"][0]
    assert video_only["audio"] is None and video_only["k_audio"] is None
    assert summary["rows"][2]["k_audio"] is not None
    assert (tmp_path / "coefficients.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "mlb" / "seed0" / "coefficients.png").is_file()
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["seeds"] == [0] and len(saved["rows"]) == 4


def test_demo_refuses_unknown_methods(tmp_path):
    with pytest.raises(ValueError, match="unknown demo method"):
        demo.run_demo(tmp_path, methods=["gradnorm"], overrides=QUICK, verbose=False, jobs=1)


def test_demo_defaults_cover_the_required_methods():
    methods = [m for _, m, _ in demo.DEMO_METHODS]
    for required in ("joint", "multiloss", "mlb", "ogm", "agm"):
        assert required in methods
    assert demo.DEMO_CONFIG["dataset"] == "synthetic" and demo.DEMO_CONFIG["width"] <= 8


def test_demo_generator_is_deterministic_for_a_seed():
    options = QUICK["data_options"]
    knobs = {k: v for k, v in options.items() if not k.endswith("_size")}
    first = SyntheticAudioVisual("train", 16, seed=5, **knobs)
    second = SyntheticAudioVisual("train", 16, seed=5, **knobs)
    for a, b in zip(first.tensors(), second.tensors()):
        assert a.equal(b)
