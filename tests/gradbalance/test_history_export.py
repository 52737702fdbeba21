"""bal.history as a table: each step's epoch and index, rows, the per-epoch summary and the
exports, against what the loop itself observed after every step (plain Python)."""

from __future__ import annotations

import csv
import math
import statistics
import sys

import pytest
import torch

import gradbalance as gb
from gradbalance.history import History

Y = torch.tensor([0, 1, 2, 0, 1, 2])
STEPS_PER_EPOCH = (3, 1, 4)


def observed_run(**options):
    """Train MLB for epochs of different lengths; record what bal shows after every step."""
    torch.manual_seed(0)
    model = gb.testing.TwoTowerNet()
    bal = gb.MLB(model, [model.audio, model.video], 3, flush_every=2, **options)
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.5)
    seen = []
    for epoch, count in enumerate(STEPS_PER_EPOCH):
        for step in range(count):
            generator = torch.Generator().manual_seed(10 * epoch + step)
            audio, video = (
                torch.randn(6, 8, generator=generator),
                torch.randn(6, 6, generator=generator),
            )
            opt.zero_grad()
            bal.loss(model(audio, video), Y).backward()
            opt.step()
            for name in bal.names:
                seen.append(
                    {
                        "step": bal.steps - 1,
                        "epoch": epoch,
                        "modality": name,
                        "coefficient": float(bal.coefficients[name]),
                        "score": float(bal.scores[name]),
                    }
                )
        bal.epoch_end()
    return bal, seen


def test_history_is_still_the_per_step_dict():
    bal, seen = observed_run()
    table = bal.history
    assert isinstance(table, dict) and isinstance(table, gb.HistoryTable)
    assert list(table) == ["audio", "video"]
    assert [float(v) for v in table["video"]["scores"]] == [
        r["score"] for r in seen if r["modality"] == "video"
    ]
    assert table.epochs.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert table.steps.tolist() == list(range(8))


def test_rows_are_what_the_loop_saw():
    bal, seen = observed_run()
    assert bal.history.rows() == seen


def test_epoch_summary_is_the_plain_mean_of_each_epochs_steps():
    bal, seen = observed_run()
    summary = bal.history.epoch_summary()
    expected = []
    for epoch in range(len(STEPS_PER_EPOCH)):
        for name in ("audio", "video"):
            rows = [r for r in seen if r["epoch"] == epoch and r["modality"] == name]
            expected.append(
                {
                    "epoch": epoch,
                    "modality": name,
                    "steps": len(rows),
                    "coefficient": statistics.fmean(r["coefficient"] for r in rows),
                    "score": statistics.fmean(r["score"] for r in rows),
                }
            )
    assert [(s["epoch"], s["modality"], s["steps"]) for s in summary] == [
        (e["epoch"], e["modality"], e["steps"]) for e in expected
    ]
    for got, want in zip(summary, expected):
        for key in ("coefficient", "score"):
            assert math.isclose(got[key], want[key], rel_tol=1e-6, abs_tol=1e-7)


@pytest.mark.parametrize("per", ["step", "epoch"])
def test_csv_round_trips(tmp_path, per):
    bal, _ = observed_run()
    table = bal.history
    records = table.rows() if per == "step" else table.epoch_summary()
    path = table.to_csv(tmp_path / "sub" / f"{per}.csv", per=per)
    with path.open(newline="") as handle:
        read = list(csv.DictReader(handle))
    assert len(read) == len(records)
    for row, record in zip(read, records):
        assert list(row) == list(record)
        for key, value in record.items():
            if isinstance(value, float):
                assert float(row[key]) == value  # full precision
            else:
                assert row[key] == str(value)


def test_pandas_frame_or_a_clear_import_error(monkeypatch):
    bal, seen = observed_run()
    table = bal.history
    monkeypatch.setitem(sys.modules, "pandas", None)  # as without pandas installed
    with pytest.raises(ImportError, match="pip install pandas"):
        table.to_pandas()
    monkeypatch.undo()
    pandas = pytest.importorskip("pandas")
    frame = table.to_pandas(per="step")
    assert isinstance(frame, pandas.DataFrame)
    assert frame.to_dict("records") == seen


def test_unknown_per_is_refused(tmp_path):
    bal, _ = observed_run()
    with pytest.raises(ValueError, match="per must be 'step' or 'epoch'"):
        bal.history.to_csv(tmp_path / "x.csv", per="batch")


def test_invalid_steps_drop_their_epoch_and_index_too():
    history = History(["a", "b"], flush_every=3)
    valid = [True, False, True, True, False, True, True]
    for index, ok in enumerate(valid):
        history.record(
            torch.tensor([float(index), -float(index)]),
            torch.tensor([0.5, 0.25]),
            torch.tensor(ok),
            epoch=index // 3,
            step=100 + index,
        )
    table = history.as_dict()
    kept = [i for i, ok in enumerate(valid) if ok]
    assert table["a"]["coefficients"].tolist() == [float(i) for i in kept]
    assert table.steps.tolist() == [100 + i for i in kept]
    assert table.epochs.tolist() == [i // 3 for i in kept]
    history.clear()
    assert len(history.as_dict().rows()) == 0 and history.as_dict().epoch_summary() == []


def test_the_table_plots_as_the_dict_did(tmp_path):
    pytest.importorskip("matplotlib")
    bal, _ = observed_run()
    assert gb.plot_history(bal.history, tmp_path / "k.png").read_bytes()[:4] == b"\x89PNG"


def score_axis_label(history, path, monkeypatch, **options):
    """The label plot_history gives the lower (score) axis."""
    axes = pytest.importorskip("matplotlib.axes")  # the submodule: not loaded by `matplotlib`
    labels = []
    original = axes.Axes.set_ylabel

    def record(axes, label, *args, **kwargs):
        labels.append(label)
        return original(axes, label, *args, **kwargs)

    monkeypatch.setattr(axes.Axes, "set_ylabel", record)
    gb.plot_history(history, path, **options)
    assert labels[0] == "coefficient k"
    return labels[1]


@pytest.mark.parametrize("method", ["mlb", "multiloss", "joint"])
def test_a_regression_history_plots_its_scores_as_errors(method, tmp_path, monkeypatch):
    """Regression scores are batch errors (lower is better), not true-class probabilities."""
    model = gb.testing.TwoTowerNet(num_classes=1)
    bal = gb.make(method, model, [model.audio, model.video], task="regression")
    audio, video = torch.randn(6, 8), torch.randn(6, 6)
    bal.loss(model(audio, video), audio[:, 0]).backward()
    assert bal.history.score_label == "score (batch error, lower is better)"
    label = score_axis_label(bal.history, tmp_path / "k.png", monkeypatch)
    assert label == "score (batch error, lower is better)"
    given = score_axis_label(bal.history, tmp_path / "k.png", monkeypatch, score_label="MAE")
    assert given == "MAE"


def test_a_classification_history_does_not_claim_probabilities(tmp_path, monkeypatch):
    bal, _ = observed_run()
    assert bal.history.score_label == "score"
    assert score_axis_label(bal.history, tmp_path / "k.png", monkeypatch) == "score"
    plain = {name: dict(series) for name, series in bal.history.items()}  # a plain dict
    assert score_axis_label(plain, tmp_path / "p.png", monkeypatch) == "score"
