"""The CREMA-D Conformer column as a user types it: ``prepare cremad --faces`` on a raw layout,
then ``benchmarks.reproduce --backbone conformer`` with random wav2vec2 weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_media import tone, write_face_video, write_wav

from reference_models.data.cremad import fold_clip_names

REPO = Path(__file__).resolve().parents[2]


def raw_cremad(root: Path) -> list[str]:
    """16 kHz ``AudioWAV/*.wav`` and 30 fps ``VideoFlash/*.flv`` of 2 training, 1 validation
    and 1 test clip of the paper's fold 0."""
    split = fold_clip_names([], 0)
    names = split["train"][:2] + split["val"][:1] + split["test"][:1]
    for index, name in enumerate(names):
        write_face_video(root / "VideoFlash" / f"{name}.flv", 5, 2)
        write_wav(root / "AudioWAV" / f"{name}.wav", tone(0.5, 16000, 300 + 100 * index), 16000)
    return names


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, "-m", *command.split()],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 150 s alone, 400 s on a loaded 2-core machine
def test_prepare_faces_then_reproduce_the_conformer_column(tmp_path):
    raw, out = tmp_path / "RAW", tmp_path / "OUT"
    names = raw_cremad(raw)
    prepared = run(
        f"reference_models.data.prepare cremad --raw {raw} --out {out} --faces "
        "--face-weights random",
        tmp_path,
    )
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    assert sorted(p.stem for p in (out / "faces").glob("*.npz")) == sorted(names)
    reproduced = run(
        f"benchmarks.reproduce --table 3 --dataset cremad --backbone conformer --root {out} "
        "--folds 0 --methods joint,mlb --set max_epochs=1 --set wav2vec2_checkpoint=random",
        tmp_path,
    )
    assert reproduced.returncode == 0, reproduced.stdout + reproduced.stderr
    runs = tmp_path / "runs" / "reproduce"
    for method in ("joint", "mlb"):
        results = json.loads(
            (
                runs / f"table3_cremad_conformer_linear_{method}" / "fold0" / "results.json"
            ).read_text()
        )
        assert results["finished"] and results["epochs_run"] == 1 and results["steps"] == 1
        assert results["config"]["backbone"] == "conformer"
        assert {split: n["clips"] for split, n in results["data"].items()} == {
            "train": 2,
            "val": 1,
            "test": 1,
        }
    table = (runs / "table3_cremad_conformer.md").read_text()
    assert "| cremad conformer linear | MLB |" in table and "85.2 ± 0.9" in table
