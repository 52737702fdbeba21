"""Missing modalities through the harness: the model's fill, the configuration and command line,
the mask reaching the model and ``bal.loss``, the probes, results.json, the demo."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_models import missing_demo
from reference_models.demo import main as demo_main
from reference_models.models import build_model
from reference_models.train import TrainConfig, build_run, config_from_args, train, train_step
from reference_models.training.missing_metrics import masked_cross_entropy, presence_metrics
from reference_models.training.overrides import nest_dotted

TINY_DATA = {
    "train_size": 24,
    "val_size": 12,
    "test_size": 12,
    "sample_rate": 4000,
    "duration": 0.25,
    "n_fft": 64,
    "hop_length": 64,
    "num_frames": 2,
    "image_size": 16,
}
TINY = {
    "dataset": "synthetic",
    "width": 2,
    "batch_size": 8,
    "eval_batch_size": 12,
    "max_epochs": 2,
    "patience": 0,
    "log_every": 2,
    "progress": False,
    "plots": False,
    "data_options": TINY_DATA,
    "seed": 0,
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are bound by per-operator overhead (see test_train.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(tmp_path, **changes) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, "out": str(tmp_path / "run"), **changes})


def inputs(batch: int = 4):
    generator = torch.Generator().manual_seed(0)
    audio = torch.randn(batch, 33, 16, generator=generator)
    video = torch.randn(batch, 3, 2, 16, 16, generator=generator)
    return audio, video


PRESENT = torch.tensor([[True, True], [True, False], [True, True], [True, False]])


@pytest.mark.parametrize("fill", ["zero", "learned"])
def test_a_fill_replaces_the_absent_features_and_stops_their_gradient(fill):
    torch.manual_seed(0)
    model = build_model(
        "cremad", "resnet18", "linear", num_classes=6, width=2, missing_fill=fill
    ).eval()
    with torch.no_grad():
        model.fill.tokens[1].add_(0.5)  # a fill other than the zero default
    audio, video = inputs()
    logits = model(audio, video, present=PRESENT)
    absent = ~PRESENT[:, 1]
    filled = model.fill.tokens[1].detach().expand(4, -1)
    expected = model.fusion(model.audio(audio), filled)
    assert torch.allclose(logits[absent], expected[absent])
    complete = model(audio, video)
    assert torch.equal(logits[~absent], complete[~absent])
    # The absent rows send nothing into the video encoder.
    grads = torch.autograd.grad(
        logits[~PRESENT[:, 1]].sum(), list(model.video.parameters()), allow_unused=True
    )
    assert all(g is None or not g.any() for g in grads)
    assert model.fill.tokens[1].requires_grad == (fill == "learned")


@pytest.mark.parametrize("fusion", ["linear", "film", "tf"])
def test_with_a_fill_the_absent_input_changes_nothing(fusion):
    torch.manual_seed(0)
    options = {"num_heads": 2} if fusion == "tf" else {}
    model = build_model(
        "cremad", "resnet18", fusion, num_classes=6, width=2, missing_fill="learned",
        fusion_options=options,
    ).eval()
    audio, video = inputs()
    other = video.clone()
    other[~PRESENT[:, 1]] = torch.randn_like(other[~PRESENT[:, 1]])
    first, second = model(audio, video, present=PRESENT), model(audio, other, present=PRESENT)
    assert torch.allclose(first, second, atol=1e-6)
    assert not torch.allclose(model(audio, video), model(audio, other))


def test_the_input_fill_ignores_the_mask():
    torch.manual_seed(0)
    model = build_model("cremad", "resnet18", "linear", num_classes=6, width=2).eval()
    audio, video = inputs()
    assert torch.equal(model(audio, video, present=PRESENT), model(audio, video))
    assert not any("fill" in name for name, _ in model.named_parameters())


def test_forward_masked_keeps_the_mask():
    torch.manual_seed(0)
    model = build_model(
        "cremad", "resnet18", "linear", num_classes=6, width=2, missing_fill="learned"
    ).eval()
    audio, video = inputs()
    model(audio, video, present=PRESENT)
    expected = model(torch.zeros_like(audio), video, present=PRESENT)
    model(audio, video, present=PRESENT)
    assert torch.equal(model.forward_masked({"audio"}), expected)


def test_set_missing_from_the_command_line():
    config = config_from_args(
        [
            "--set",
            "missing.video=0.5",
            "--set",
            "missing_fill=learned",
            "--set",
            "method_options.alpha=2",
            "--opt",
            "beta_max=3",
            "--method",
            "mlb",
        ]
    )
    assert config.missing == {"video": 0.5} and config.missing_fill == "learned"
    assert config.method_options == {"alpha": 2, "beta_max": 3}
    assert config.data.missing == {"video": 0.5} and config.model.missing_fill == "learned"
    with pytest.raises(ValueError, match="dotted key"):
        nest_dotted({"lr.x": 1})


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"missing": {"depth": 0.2}}, "unknown modalities"),
        ({"missing": {"video": 1.5}}, r"in \[0, 1\)"),
        ({"missing_mode": "val"}, "missing_mode"),
        ({"missing_fill": "mean"}, "missing_fill"),
        ({"missing_fill": "learned", "missing_mask": False}, "needs the mask"),
    ],
)
def test_bad_missing_settings_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict({"dataset": "synthetic", **changes})


def test_masked_cross_entropy_is_the_mean_over_present_rows():
    logits = torch.randn(6, 4, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    keep = torch.tensor([True, False, True, True, False, False])
    loss = masked_cross_entropy(logits, target, keep)
    assert torch.allclose(loss, F.cross_entropy(logits[keep], target[keep]))
    (grad,) = torch.autograd.grad(loss, logits)
    assert not grad[~keep].any() and grad[keep].any()
    none = masked_cross_entropy(logits, target, torch.zeros(6, dtype=torch.bool))
    assert none.item() == 0.0


@settings(max_examples=40, deadline=None)
@given(data=st.data(), size=st.integers(1, 40))
def test_presence_metrics_match_the_subsets(data, size):
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    fused = torch.randn(size, 3, generator=generator)
    probe = torch.randn(size, 3, generator=generator)
    target = torch.randint(0, 3, (size,), generator=generator)
    bits = data.draw(st.lists(st.booleans(), min_size=size, max_size=size))
    video = torch.tensor(bits)
    present = {"audio": torch.ones(size, dtype=torch.bool), "video": video}
    out = presence_metrics(fused, target, present, {"probe": {"video": probe}})

    def accuracy(logits, rows):
        rows = rows.tolist()
        chosen = [i for i in range(size) if rows[i]]
        if not chosen:
            return None
        return sum(int(logits[i].argmax() == target[i]) for i in chosen) / len(chosen)

    def value(tensor):
        return None if torch.isnan(tensor) else tensor.item()

    assert value(out["fused"]["accuracy_complete"]) == pytest.approx(accuracy(fused, video))
    assert value(out["fused"]["accuracy_incomplete"]) == pytest.approx(accuracy(fused, ~video))
    assert value(out["video"]["fused_accuracy_absent"]) == pytest.approx(accuracy(fused, ~video))
    assert value(out["video"]["probe_accuracy_present"]) == pytest.approx(accuracy(probe, video))
    assert out["video"]["present"].item() == sum(bits)
    assert out["fused"]["incomplete"].item() == size - sum(bits)


def test_results_report_accuracy_by_presence(tmp_path):
    results = train(tiny(tmp_path, method="joint", missing={"video": 0.5}), verbose=False)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["test"] == results["test"]
    test = saved["test"]
    assert test["fused"]["complete"] == 6 and test["fused"]["incomplete"] == 6
    assert test["video"]["present"] == 6 and test["audio"]["present"] == 12
    assert test["audio"]["fused_accuracy_absent"] is None
    for key in ("accuracy_complete", "accuracy_incomplete"):
        assert 0 <= test["fused"][key] <= 1
    for key in ("fused_accuracy_present", "fused_accuracy_absent", "probe_accuracy_present"):
        assert 0 <= test["video"][key] <= 1
    # The fused accuracy is the weighted mean of the complete and incomplete ones.
    fused = test["fused"]
    assert fused["accuracy"] == pytest.approx(
        (fused["accuracy_complete"] * 6 + fused["accuracy_incomplete"] * 6) / 12
    )


def test_a_run_without_missing_reports_as_before(tmp_path):
    results = train(tiny(tmp_path, method="joint"), verbose=False)
    assert "accuracy_complete" not in results["test"]["fused"]
    assert "present" not in results["test"]["video"]


def record_loss_calls(balancer):
    calls = []
    real = balancer.loss

    def loss(logits, target, **options):
        calls.append(options)
        return real(logits, target, **options)

    balancer.loss = loss
    return calls


@pytest.mark.parametrize("mask", [True, False])
def test_the_mask_reaches_the_model_and_the_balancer_when_told(tmp_path, mask):
    session = build_run(tiny(tmp_path, method="mlb", missing={"video": 0.5}, missing_mask=mask))
    try:
        state = session.state
        calls = record_loss_calls(state.balancer)
        seen = []
        state.model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs.get("present")), with_kwargs=True
        )
        batch = next(iter(session.train_loader))
        train_step(state, *batch)
        present = batch[3]
        if mask:
            assert torch.equal(seen[0], present)
            assert state.balancer.names == ["audio", "video"]  # the mask's columns
            assert torch.equal(calls[0]["present"], present)
        else:
            assert seen == [None] and calls == [{}]
    finally:
        session.close()


def test_probes_learn_from_present_samples_only(tmp_path):
    session = build_run(tiny(tmp_path, method="joint", missing={"video": 0.5}, missing_mask=False))
    try:
        state = session.state
        audio, video, y, present = next(iter(session.train_loader))
        state.optimizer.step = lambda: None  # keep the weights to compare with
        state.scheduler.step = lambda: None
        train_step(state, audio, video, y, present)
        probe = state.probes["video"]
        features = state.balancer.features()["video"].detach()
        expected = masked_cross_entropy(probe(features), y, present[:, 1])
        (reference,) = torch.autograd.grad(expected, [probe.weight])
        assert torch.allclose(probe.weight.grad, reference, atol=1e-6)
    finally:
        session.close()


def test_demo_missing_dispatches_with_its_rates(monkeypatch):
    calls = []
    monkeypatch.setattr(missing_demo, "run_missing_demo", lambda *a, **k: calls.append((a, k)))
    assert demo_main(["--missing", "video=0.5", "--fill", "learned", "--epochs", "3"]) == 0
    ((args, options),) = calls
    assert args == ({"video": 0.5}, "outputs/demo_missing")
    assert options["fill"] == "learned" and options["overrides"] == {"max_epochs": 3}
    with pytest.raises(ValueError, match="NAME=RATE"):
        missing_demo.parse_rates("video")


@pytest.mark.parametrize(
    "module",
    [
        "reference_models.data.missing",
        "reference_models.missing_fill",
        "reference_models.missing_demo",
        "reference_models.training.missing_metrics",
        "reference_models.training.config",
    ],
)
def test_missing_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.slow
def test_the_missing_demo_prints_its_table(tmp_path, capsys):
    quick = {key: TINY[key] for key in ("width", "batch_size", "eval_batch_size", "log_every")}
    quick.update(max_epochs=2, plots=False, data_options=TINY_DATA)
    summary = missing_demo.run_missing_demo(
        {"video": 0.5}, tmp_path, methods=["joint", "mlb"], overrides=quick, jobs=1
    )
    rows = summary["rows"]
    assert [(row["label"], row["mask"]) for row in rows] == [
        ("Joint", False),
        ("Joint", True),
        ("MLB", False),
        ("MLB", True),
    ]
    # The fused loss is the model's business: Joint trains the same with and without the mask.
    for key in ("fused_complete", "fused_incomplete", "audio", "video"):
        assert rows[0][key] == rows[1][key], key
    assert rows[0]["k_video"] == 1.0 and rows[3]["k_video"] is not None
    lines = [line for line in summary["table"].splitlines() if line.startswith("| ")]
    assert lines[0] == "| " + " | ".join(missing_demo._COLUMNS) + " |"
    assert summary["table"] in capsys.readouterr().out
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["rates"] == {"video": 0.5} and len(saved["rows"]) == 4
    assert (tmp_path / "mlb_mask" / "seed0" / "results.json").is_file()


def test_the_summary_shows_complete_and_incomplete_accuracy(tmp_path, capsys):
    train(tiny(tmp_path, method="video_only", missing={"video": 0.5}, max_epochs=1))
    out = capsys.readouterr().out
    assert "on 6 complete samples" in out and "on 6 with a modality missing" in out


class CollectingPrototypes:
    """A stand-in for PMR with explicit prototypes: records what the recipe passes it."""

    prototype_source = "explicit"

    def __init__(self):
        self.collected = []
        self.updated = 0

    def collect(self, labels, **options):
        self.collected.append((labels, options))

    def update_prototypes(self):
        self.updated += 1


def test_explicit_prototypes_get_the_mask_of_their_pass(tmp_path):
    from reference_models.recipes import METHODS

    session = build_run(tiny(tmp_path, method="joint", missing={"video": 0.5}))
    try:
        fake = CollectingPrototypes()
        shuffle = session.generator.get_state()
        METHODS["pmr"].epoch_start(fake, {"prototype_fraction": 1.0}, session._forward_passes)
        session.generator.set_state(shuffle)  # the same batches again
        batches = list(session.train_loader)
        assert len(fake.collected) == len(batches) and fake.updated == 1
        for (labels, options), batch in zip(fake.collected, batches):
            assert torch.equal(labels, batch[2])
            assert torch.equal(options["present"], batch[3])
    finally:
        session.close()
    complete = build_run(tiny(tmp_path, method="joint"))
    try:
        fake = CollectingPrototypes()
        METHODS["pmr"].epoch_start(fake, {}, complete._forward_passes)
        assert [options for _, options in fake.collected] == [{}]
    finally:
        complete.close()
