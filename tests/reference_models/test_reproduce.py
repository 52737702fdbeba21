"""The reproduction driver on a toy table, the paper's numbers, and the GPU smoke script on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import reproduce
from benchmarks.paper_numbers import TABLE3, TABLE4, paper_accuracy
from reference_models.presets import TABLE3_METHODS, TABLE4_METHODS


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are bound by per-operator overhead; under ``pytest -n 2`` two threads per
    worker oversubscribe the cores and spin (measured 5-30x slower). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = [
    "--set",
    "width=2",
    "--set",
    "max_epochs=2",
    "--set",
    "batch_size=8",
    "--set",
    "eval_batch_size=12",
    "--set",
    "plots=false",
    "--set",
    "log_every=2",
    "--data-opt",
    "train_size=16",
    "--data-opt",
    "val_size=8",
    "--data-opt",
    "test_size=8",
    "--data-opt",
    "sample_rate=4000",
    "--data-opt",
    "duration=0.25",
    "--data-opt",
    "n_fft=64",
    "--data-opt",
    "hop_length=64",
    "--data-opt",
    "num_frames=2",
    "--data-opt",
    "image_size=16",
]


def test_toy_table_runs_resumes_and_writes_markdown(tmp_path, capsys):
    out = tmp_path / "repro"
    args = [
        "--table",
        "3",
        "--dataset",
        "synthetic",
        "--methods",
        "joint,mlb",
        "--folds",
        "0",
        "--out",
        str(out),
        *TINY,
    ]
    assert reproduce.main(args) == 0
    table = (out / "table3_synthetic_resnet18.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| synthetic")]
    assert [row.split("|")[2].strip() for row in rows] == ["Joint Training", "MLB"]
    assert all(row.split("|")[6].strip() == "–" for row in rows)  # no paper number
    run_dir = out / "table3_synthetic_resnet18_linear_mlb" / "fold0"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["finished"] and results["config"]["method_options"]["alpha"] == 5.0
    assert (run_dir / "config.toml").is_file()
    # A second invocation reuses the finished runs (nothing is trained again).
    stamp = (run_dir / "results.json").stat().st_mtime_ns
    capsys.readouterr()
    assert reproduce.main(args) == 0
    assert (run_dir / "results.json").stat().st_mtime_ns == stamp
    assert "[reproduce]" not in capsys.readouterr().out


def test_plan_covers_a_table_column_with_presets(tmp_path):
    runs = reproduce.plan_runs(3, "cremad", "resnet18", root="data/cremad", out=tmp_path)
    assert len(runs) == len(TABLE3_METHODS) * 3
    assert {r.config.root for r in runs} == {"data/cremad"}
    assert {r.config.run_seed for r in runs} == {109, 19, 337}
    mlb = next(r for r in runs if r.method == "mlb" and r.fold == 1)
    assert mlb.config.method_options["alpha"] == 5.0 and mlb.config.resume
    table4 = reproduce.plan_runs(
        4, "cremad", "conformer", root="x", out=tmp_path, fusions=["film"], folds=[0]
    )
    assert [r.method for r in table4] == list(TABLE4_METHODS)
    assert {r.config.fusion for r in table4} == {"film"}
    assert next(r for r in table4 if r.method == "mlb").config.method_options["alpha"] == 4.0
    journal = reproduce.plan_runs(
        3, "ave", "resnet18", root="x", out=tmp_path, group="journal", methods=["mlb"], folds=[0]
    )
    assert journal[0].config.method_options["beta_max"] == 1.0


def test_summary_and_markdown_compare_with_the_paper():
    runs = reproduce.plan_runs(
        3,
        "cremad",
        "resnet18",
        root="r",
        out=reproduce.Path("/tmp/x"),
        methods=["mlb"],
        folds=[0, 1],
    )
    results = [{"test": {"fused": {"accuracy": a, "ece": 0.05}}} for a in (0.70, 0.74)]
    rows = reproduce.summarise(runs, results, table=3)
    assert len(rows) == 1
    row = rows[0]
    assert row["mean"] == pytest.approx(72.0) and row["std"] == pytest.approx(2.828427, rel=1e-5)
    assert row["paper"] == (71.4, 1.9) and row["difference"] == pytest.approx(0.6)
    text = reproduce.markdown_table(rows, "t")
    assert "| 72.0 ± 2.8 | 2 | 5.0 | 71.4 ± 1.9 | +0.6 |" in text


def test_paper_numbers_are_complete():
    assert len(TABLE3) == 4 and all(len(column) == 10 for column in TABLE3.values())
    assert len(TABLE4) == 8 and all(len(column) == 4 for column in TABLE4.values())
    assert paper_accuracy(3, "ucf101", "resnet18", "linear", "video_only") == (30.3, 1.5)
    assert paper_accuracy(4, "cremad", "resnet18", "gated", "agm") == (55.7, 4.7)
    # Table 4's first block repeats Table 3's Late-Linear column.
    for backbone in ("resnet18", "conformer"):
        for method in TABLE4_METHODS:
            assert TABLE4[("mlp", backbone)][method] == TABLE3[("cremad", backbone)][method]


def test_driver_needs_a_root_for_real_data(capsys):
    assert reproduce.main(["--table", "3", "--dataset", "cremad"]) == 2
    assert "--root" in capsys.readouterr().err


def test_gpu_smoke_script_runs_on_cpu(capsys):
    from benchmarks import gpu_smoke

    assert gpu_smoke.main(["--device", "cpu", "--quick", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "mlb_fp32 step" in out or "mlb_bf16 step" in out
    assert "MLB overhead" in out


@pytest.mark.parametrize("backbone", ["resnet18", "conformer"])
def test_journal_presets_cover_every_cell_of_tables_3_and_4(tmp_path, backbone):
    kwargs = dict(root="x", out=tmp_path, group="journal", folds=[0])
    table3 = reproduce.plan_runs(3, "cremad", backbone, **kwargs)
    assert [r.method for r in table3] == list(TABLE3_METHODS)
    pmr = next(r for r in table3 if r.method == "pmr").config
    assert "Table 2's values" in pmr.description and pmr.patience == 100
    table4 = reproduce.plan_runs(4, "cremad", backbone, **kwargs)
    assert len(table4) == 16 and {r.config.fusion for r in table4} == {"mlp", "film", "gated", "tf"}
    film_agm = next(r for r in table4 if r.method == "agm" and r.config.fusion == "film").config
    assert film_agm.method_options["alpha"] == 3.0 and "Late-Linear value" in film_agm.description
    for dataset in ("ave", "ucf101"):
        assert len(reproduce.plan_runs(3, dataset, "resnet18", **kwargs)) == len(TABLE3_METHODS)
