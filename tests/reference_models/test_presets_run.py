"""Every cell of Tables 3 and 4 has a preset, and the ResNet cells run one epoch through
``python -m benchmarks.reproduce`` on small prepared layouts, which prints the full tables."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures_datasets import PREPARED, TINY_CONFORMER, TINY_DATA_OPTIONS, prepared_cremad_faces

from benchmarks import reproduce
from reference_models.presets import (
    TABLE3_COLUMNS,
    TABLE3_METHODS,
    TABLE4_FUSIONS,
    TABLE4_METHODS,
    preset_name,
)
from reference_models.train import load_config

TABLE3_CELLS = [(*column, "linear", m) for column in TABLE3_COLUMNS for m in TABLE3_METHODS]
TABLE4_CELLS = [
    ("cremad", backbone, fusion, method)
    for backbone in ("resnet18", "conformer")
    for fusion in TABLE4_FUSIONS
    for method in TABLE4_METHODS
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_cell_of_tables_3_and_4_has_a_preset():
    cells = [("table3", *cell) for cell in TABLE3_CELLS] + [("table4", *c) for c in TABLE4_CELLS]
    assert len(cells) == 72 and len(set(cells)) == 72
    for group, dataset, backbone, fusion, method in cells:
        config = load_config(preset_name(group, dataset, backbone, fusion, method))
        assert (config.dataset, config.backbone, config.fusion, config.method) == (
            dataset,
            backbone,
            fusion,
            method,
        )
        assert (config.max_epochs, config.schedule) == (1500, "step")
        expected = (5e-5, 1e-5, 8) if backbone == "conformer" else (1e-3, 1e-4, 32)
        assert (config.lr, config.weight_decay, config.batch_size) == expected


TINY_RUN = {
    "width": 2,
    "max_epochs": 1,
    "batch_size": 8,
    "eval_batch_size": 16,
    "plots": "false",
    "threads": 1,
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("table", "dataset", "cells"),
    [(3, "cremad", 10), (3, "ave", 10), (3, "ucf101", 10), (4, "cremad", 16)],
)
def test_resnet_cells_run_one_epoch_and_reproduce_prints_the_table(
    tmp_path, capsys, table, dataset, cells
):
    root = PREPARED[dataset](tmp_path / dataset)
    out = tmp_path / "runs"
    args = ["--table", str(table), "--dataset", dataset, "--root", str(root), "--folds", "0"]
    args += ["--out", str(out)]
    for key, value in TINY_RUN.items():
        args += ["--set", f"{key}={value}"]
    for key, value in TINY_DATA_OPTIONS[dataset].items():
        args += ["--data-opt", f"{key}={value}"]
    assert reproduce.main(args) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith(f"| {dataset} resnet18")]
    assert len(rows) == cells
    assert all(row.split("|")[6].strip() != "–" for row in rows)  # the paper's number is there
    results = [json.loads(path.read_text()) for path in out.rglob("results.json")]
    assert len(results) == cells
    assert all(r["finished"] and r["epochs_run"] == 1 and r["steps"] >= 1 for r in results)
    if dataset == "cremad":  # the paper's folds: the fixture holds 8/4/4 of their clips
        left_out = {"train": 4043 - 8, "val": 878 - 4, "test": 899 - 4}
        assert all(r["data"][s]["left_out"] == n for r in results for s, n in left_out.items())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:wav2vec2 front end with RANDOM weights")
@pytest.mark.parametrize(("table", "cells"), [(3, 10), (4, 16)])
def test_conformer_cells_run_one_epoch_with_a_tiny_random_model(tmp_path, capsys, table, cells):
    root = prepared_cremad_faces(tmp_path / "cremad")
    out = tmp_path / "runs"
    args = ["--table", str(table), "--dataset", "cremad", "--backbone", "conformer"]
    args += ["--root", str(root), "--folds", "0", "--out", str(out)]
    for key, value in {**TINY_RUN, **TINY_CONFORMER}.items():
        args += ["--set", f"{key}={value}"]
    assert reproduce.main(args) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "| cremad conformer" in line]
    assert len(rows) == cells and all(row.split("|")[6].strip() != "–" for row in rows)
    results = [json.loads(path.read_text()) for path in out.rglob("results.json")]
    assert len(results) == cells
    assert all(r["finished"] and r["steps"] == 1 for r in results)
    assert all(r["data"]["train"]["clips"] == 8 for r in results)
