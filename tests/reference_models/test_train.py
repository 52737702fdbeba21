"""The training harness end to end on tiny generated data: methods, fusions, protocol, resume."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import gradbalance as gb
import reference_models.training.loop as train_module
from reference_models.presets import all_presets
from reference_models.train import (
    METHOD_NAMES,
    TrainConfig,
    build_run,
    config_from_args,
    load_config,
    main,
    parse_value,
    train,
    train_step,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are bound by per-operator overhead; under ``pytest -n 2`` two threads per
    worker oversubscribe the cores and spin (measured 5-30x slower). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Tiny generated data: 0.25 s at 4 kHz (33x16 spectrograms), 2 frames of 16x16, width-2 ResNets.
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


def tiny(tmp_path, **changes) -> TrainConfig:
    values = dict(
        dataset="synthetic",
        width=2,
        batch_size=8,
        eval_batch_size=12,
        max_epochs=2,
        patience=0,
        log_every=2,
        progress=False,
        plots=False,
        out=str(tmp_path / "run"),
        data_options=dict(TINY_DATA),
        seed=0,
    )
    values.update(changes)
    return TrainConfig.from_dict(values)


@pytest.fixture
def session_of(tmp_path):
    """``session_of(**changes)``: a built run on tiny data; its hooks are removed afterwards."""
    sessions = []

    def make(**changes):
        sessions.append(build_run(tiny(tmp_path, **changes)))
        return sessions[-1]

    yield make
    for session in sessions:
        session.close()


def epoch_records(path):
    return [
        json.loads(line)
        for line in (path / "log.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "epoch"
    ]


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_trains_two_epochs(tmp_path, method):
    results = train(tiny(tmp_path, method=method), verbose=False)
    assert results["epochs_run"] == 2 and results["finished"]
    assert 0.0 <= results["test"]["fused"]["accuracy"] <= 1.0
    assert 0.0 <= results["test"]["fused"]["ece"] <= 1.0
    for name in results["modalities"]:
        assert 0.0 <= results["test"][name]["probe_accuracy"] <= 1.0
    records = epoch_records(tmp_path / "run")
    assert [r["epoch"] for r in records] == [0, 1]
    out = tmp_path / "run"
    assert (out / "results.json").is_file() and (out / "summary.txt").is_file()
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    if method.endswith("_only"):
        assert results["modalities"] == [method.split("_")[0]]
        assert results["final_coefficients"] == {}
    else:
        assert sorted(results["final_coefficients"]) == ["audio", "video"]
        assert all(torch.isfinite(torch.tensor(list(results["final_coefficients"].values()))))
        assert (out / "history.csv").read_text().startswith("step,k_audio,k_video")


def test_cggm_direction_term_turns_the_late_linear_blocks(session_of, tmp_path):
    session = session_of(method="cggm", method_options={"lam": 0.2})
    blocks = session.state.balancer.fusion_weights
    assert [id(b) for b in blocks] == [id(lin.weight) for lin in session.state.model.fusion.linears]
    config = tiny(tmp_path, method="cggm", method_options={"lam": 0.2}, out=str(tmp_path / "b"))
    results = train(config, verbose=False)
    assert results["finished"]
    assert all(0.0 <= k <= 1.3 for k in results["final_coefficients"].values())


class _Registered(gb.Joint):
    """Joint training registered under a name of its own."""


def test_a_registered_method_trains_through_the_harness(tmp_path):
    gb.register_method("registered_joint", _Registered, aliases=["reg-joint"])
    try:
        config = tiny(tmp_path, method="reg_joint", max_epochs=1)
        assert config.method == "registered_joint"
        results = train(config, verbose=False)
    finally:
        gb.unregister_method("registered_joint")
    assert results["finished"] and sorted(results["final_coefficients"]) == ["audio", "video"]
    with pytest.raises(ValueError, match="method"):
        tiny(tmp_path, method="registered_joint")


@pytest.mark.parametrize("fusion", ["mlp", "film", "gated", "tf"])
@pytest.mark.parametrize(
    "method", ["joint", "multiloss", "mlb", "ogm", "ogm_ge", "agm", "pmr", "mslr"]
)
def test_every_fusion_trains_two_epochs(tmp_path, fusion, method):
    results = train(tiny(tmp_path, method=method, fusion=fusion), verbose=False)
    assert results["epochs_run"] == 2
    assert 0.0 <= results["test"]["fused"]["accuracy"] <= 1.0
    assert sorted(results["final_coefficients"]) == ["audio", "video"]


def test_wiring_follows_the_fusion(session_of):
    # Late-Linear: MLB scales the fused weight blocks, OGM/MSLR read the fused slices.
    linear = session_of(method="ogm").state.balancer
    assert linear.fusion_head is not None and len(linear.heads) == 0
    # FiLM has no per-modality slices: OGM falls back to detached probes.
    film = session_of(method="ogm", fusion="film").state.balancer
    assert film.fusion_head is None and sorted(film.heads) == ["audio", "video"]
    # Transformer fusion: encoders return tokens; the balancer pools them.
    tokens = session_of(method="mlb", fusion="tf").state
    audio, video, y = next(iter(session_of(method="joint").train_loader))
    tokens.model.eval()
    with torch.no_grad():
        tokens.balancer.loss(tokens.model(audio, video), y)
        expected = tokens.model.audio(audio).mean(dim=1)
    assert tokens.model.takes_tokens
    torch.testing.assert_close(tokens.balancer.features()["audio"], expected)
    mmcosine = session_of(method="mmcosine", method_options={"scale": 7.0})
    assert type(mmcosine.state.model.fusion).__name__ == "MMCosineHead"
    assert mmcosine.state.model.fusion.scale == 7.0


def test_mlb_scales_the_fused_weight_blocks(session_of):
    # Same seed and batch with and without the fused-block scaling: the forward is identical,
    # so W_m's gradient differs exactly by this step's k_m (the official code's grouping).
    options = {"alpha": 3.0, "beta_max": 3.0}
    scaled = session_of(method="mlb", method_options=options)
    plain = session_of(method="mlb", method_options={**options, "scale_fused_weights": False})
    batch = next(iter(scaled.train_loader))
    train_step(scaled.state, *batch)
    train_step(plain.state, *batch)
    coefficients = scaled.state.balancer.coefficients
    assert abs(coefficients["audio"].item() - coefficients["video"].item()) > 1e-3
    blocks = zip(
        scaled.state.model.fusion.modality_parameters(),
        plain.state.model.fusion.modality_parameters(),
    )
    for name, (ours, reference) in zip(("audio", "video"), blocks):
        torch.testing.assert_close(ours[0].grad, coefficients[name] * reference[0].grad)
    # The shared bias belongs to no modality: not scaled.
    torch.testing.assert_close(
        scaled.state.model.fusion.bias.grad, plain.state.model.fusion.bias.grad
    )


class FailOnHostSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("host synchronisation inside the training step")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["mlb", "joint", "ogm", "agm", "pmr", "inforeg", "video_only"])
def test_training_step_makes_no_host_sync(session_of, method):
    steps_without_host_sync(session_of(method=method))


@pytest.mark.parametrize("method", ["mlb", "multiloss", "joint", "video_only"])
@pytest.mark.parametrize("mask", [True, False])
def test_a_step_with_missing_modalities_makes_no_host_sync(session_of, method, mask):
    steps_without_host_sync(session_of(method=method, missing={"video": 0.5}, missing_mask=mask))


def steps_without_host_sync(session):
    state = session.state
    batches = list(session.train_loader)
    train_step(state, *batches[0])  # warm-up (first-step checks)
    # torch's Adam reads its step count, a CPU tensor, with .item(): not a device sync on a
    # GPU, but the op the guard looks for; the optimizer's own step runs unguarded.
    real_step = state.optimizer.step

    def unguarded_step(*args, **kwargs):
        with _disable_current_modes():
            return real_step(*args, **kwargs)

    state.optimizer.step = unguarded_step
    with FailOnHostSync():
        for batch in batches[1:]:
            train_step(state, *batch)


def test_the_guard_sees_a_sync():
    with pytest.raises(AssertionError, match="host synchronisation"), FailOnHostSync():
        torch.ones(()).item()


def test_accumulators_track_the_epoch(session_of):
    session = session_of(method="mlb")
    state = session.state
    for batch in session.train_loader:
        train_step(state, *batch)
    steps = len(session.train_loader)
    assert state.correct.item() <= 24
    mean_k = (state.coefficient_sum / steps).tolist()
    history = state.balancer.history
    expected = [history[n]["coefficients"].mean().item() for n in ("audio", "video")]
    assert mean_k == pytest.approx(expected, rel=1e-5)


def test_early_stopping_uses_patience_and_the_best_checkpoint(tmp_path, monkeypatch):
    accuracies = iter([0.5, 0.6, 0.6, 0.55, 0.9, 0.9])
    real_evaluate = train_module.evaluate

    def scripted(state, loader, *, collect=False):
        result = real_evaluate(state, loader, collect=collect)
        if collect:  # the per-epoch validation
            result["fused"]["accuracy"] = next(accuracies)
        return result

    monkeypatch.setattr(train_module, "evaluate", scripted)
    results = train(tiny(tmp_path, method="joint", max_epochs=6, patience=2), verbose=False)
    # Best at epoch 1 (0.6); epochs 2 and 3 do not improve (0.6 is not strictly better): stop.
    assert results["stopped_early"] and results["epochs_run"] == 4
    assert results["best_epoch"] == 1
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=False)["epoch"] == 1
    assert [r["best"] for r in epoch_records(tmp_path / "run")] == [True, True, False, False]


def test_no_early_stop_with_patience_zero(tmp_path):
    results = train(
        tiny(tmp_path, method="joint", max_epochs=3, patience=0, lr=1e-9), verbose=False
    )
    assert results["epochs_run"] == 3 and not results["stopped_early"]


def _final_state(tmp_path):
    saved = torch.load(tmp_path / "last.pt", weights_only=False)
    return saved["model"], saved["balancer"]


@pytest.mark.parametrize("method", ["mlb", "mslr", "ogm_ge", "pmr", "inforeg"])
def test_resume_after_interrupt_matches_an_uninterrupted_run(tmp_path, method):
    straight = train(tiny(tmp_path / "a", method=method, max_epochs=4), verbose=False)
    interrupted = tiny(tmp_path / "b", method=method, max_epochs=4, stop_after=2)
    partial = train(interrupted, verbose=False)
    assert partial["epochs_run"] == 2 and not partial["finished"]
    resumed = train(interrupted.replace(stop_after=None, resume=True), verbose=False)
    assert resumed["epochs_run"] == 4 and resumed["finished"]
    assert resumed["test"] == straight["test"]
    assert resumed["val"] == straight["val"]
    assert resumed["best_epoch"] == straight["best_epoch"]
    assert resumed["final_coefficients"] == straight["final_coefficients"]
    model_a, bal_a = _final_state(tmp_path / "a" / "run")
    model_b, bal_b = _final_state(tmp_path / "b" / "run")
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    for key, value in bal_a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, bal_b[key]), key
    # The log holds each epoch once, and the per-step history spans both invocations.
    assert [r["epoch"] for r in epoch_records(tmp_path / "b" / "run")] == [0, 1, 2, 3]
    history = (tmp_path / "b" / "run" / "history.csv").read_text().splitlines()
    assert history == (tmp_path / "a" / "run" / "history.csv").read_text().splitlines()


def test_a_checkpoint_without_newer_fields_resumes(tmp_path):
    config = tiny(tmp_path, method="mlb", max_epochs=2, stop_after=1)
    train(config, verbose=False)
    path = tmp_path / "run" / "last.pt"
    saved = torch.load(path, weights_only=False)
    del saved["config"]["ece_binning"]  # as written before the field existed
    torch.save(saved, path)
    resumed = train(config.replace(stop_after=None, resume=True), verbose=False)
    assert resumed["epochs_run"] == 2 and resumed["finished"]


def test_folds_are_0_based_and_cremad_has_five():
    assert TrainConfig(dataset="cremad", root="r", fold=4, seed=1).fold == 4
    with pytest.raises(ValueError, match="fold 3 has no official seed"):
        TrainConfig(dataset="cremad", root="r", fold=3)
    with pytest.raises(ValueError, match=r"fold must be 0-based in 0..2"):
        TrainConfig(dataset="ucf101", root="r", fold=3)


def test_resume_refuses_other_settings(tmp_path):
    config = tiny(tmp_path, method="mlb", max_epochs=2, stop_after=1)
    train(config, verbose=False)
    with pytest.raises(ValueError, match="other settings"):
        train(config.replace(stop_after=None, resume=True, lr=5e-3), verbose=False)


def test_outputs_log_results_and_plots(tmp_path):
    results = train(tiny(tmp_path, method="mlb", plots=True), verbose=False)
    out = tmp_path / "run"
    assert sorted(results["plots"]) == ["coefficients.png", "learning_curves.png"]
    for name in results["plots"]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    kinds = [line["kind"] for line in lines]
    assert kinds[0] == "config" and kinds.count("epoch") == 2 and "step" in kinds
    step = next(line for line in lines if line["kind"] == "step")
    assert set(step["coefficients"]) == {"audio", "video"} and step["step"] % 2 == 0
    epoch = next(line for line in lines if line["kind"] == "epoch")
    assert {"loss", "accuracy"} <= set(epoch["train"])
    assert {"accuracy", "ece", "loss"} <= set(epoch["val"]["fused"])
    assert {"probe_accuracy", "head_accuracy"} <= set(epoch["val"]["video"])
    assert set(epoch["coefficients"]) == {"audio", "video"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["test"] == results["test"]
    assert "fused" in (out / "summary.txt").read_text()


def test_logger_tensorboard_writes_the_step_records_beside_the_json_lines(tmp_path):
    """``--logger tensorboard``: the step records' loss and the balancer's values (the same
    numbers as ``log.jsonl``'s step records) and the epoch metrics, read back from the events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = config_from_args(["--logger", "tensorboard"])
    assert config.logger == "tensorboard"
    train(tiny(tmp_path, method="mlb", logger="tensorboard"), verbose=False)
    out = tmp_path / "run"
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [line for line in lines if line["kind"] == "step"]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()

    def scalars(tag):
        return {s.step: s.value for s in events.Scalars(tag)}

    assert sorted(scalars("train/loss")) == [line["step"] for line in steps]
    for name in ("audio", "video"):
        logged = scalars(f"gradbalance/k_{name}")
        assert logged == pytest.approx({r["step"]: r["coefficients"][name] for r in steps})
        scores = scalars(f"gradbalance/score_{name}")
        assert scores == pytest.approx({r["step"]: r["scores"][name] for r in steps})
    epochs = [line for line in lines if line["kind"] == "epoch"]
    val = scalars("epoch/val_accuracy")
    assert val == pytest.approx({r["epoch"]: r["val"]["fused"]["accuracy"] for r in epochs})


# CPU bf16 pitfall: oneDNN's bf16 weight-gradient kernel of a strided 1x1 convolution reads
# past its input when that input is 1 pixel wide, so NaN left in freed memory can reach the
# gradient (about 1 run in 5 with TINY_DATA, whose maps are 1 pixel wide at layer4). The bf16
# tests use maps at least 2 pixels wide there: 32 time frames (hop 32) and 32x32 frames.
BF16_DATA = {**TINY_DATA, "hop_length": 32, "image_size": 32}


def strided_1x1_input_sizes(model, audio, video):
    """The (height, width) of every input to a strided 1x1 convolution in one forward."""
    sizes = []
    hooks = [
        module.register_forward_pre_hook(lambda _, args: sizes.append(tuple(args[0].shape[-2:])))
        for module in model.modules()
        if isinstance(module, torch.nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.stride != (1, 1)
    ]
    with torch.no_grad():
        model(audio, video)
    for hook in hooks:
        hook.remove()
    return sizes


@pytest.mark.parametrize(
    ("data", "one_pixel_wide"), [(BF16_DATA, False), (TINY_DATA, True)], ids=["bf16", "tiny"]
)
def test_bf16_shapes_give_strided_1x1_convs_no_one_pixel_map(session_of, data, one_pixel_wide):
    from benchmarks.gpu_smoke import QUICK_SHAPE

    assert all(BF16_DATA[key] == value for key, value in QUICK_SHAPE.items())
    session = session_of(method="mlb", data_options=dict(data))
    audio, video, _ = next(iter(session.train_loader))
    sizes = strided_1x1_input_sizes(session.state.model, audio, video)
    assert len(sizes) == 6  # layer2-4 downsample of both encoders
    assert any(min(size) < 2 for size in sizes) == one_pixel_wide, sizes


def test_bf16_autocast_runs(tmp_path):
    results = train(
        tiny(tmp_path, method="mlb", amp=True, data_options=dict(BF16_DATA)), verbose=False
    )
    assert 0.0 <= results["test"]["fused"]["accuracy"] <= 1.0
    assert all(torch.isfinite(torch.tensor(list(results["final_coefficients"].values()))))


def test_epoch_schedule_sets_the_lr(tmp_path):
    config = tiny(tmp_path, method="joint", schedule="epoch", warmup_epochs=1, max_epochs=2)
    train(config, verbose=False)
    records = epoch_records(tmp_path / "run")
    # 3 steps per epoch; after epoch 0 (warm-up) and 3 steps into the cycle of 4 epochs.
    assert records[0]["lr"] == pytest.approx(1e-3)
    assert records[1]["lr"] == pytest.approx(
        1e-3 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 4)).item())
    )


def test_cli_parses_presets_and_overrides(tmp_path):
    config = config_from_args(
        [
            "--config",
            "table3/cremad_resnet18_linear_mlb",
            "--root",
            "data/x",
            "--fold",
            "2",
            "--opt",
            "alpha=1.5",
            "--opt",
            "beta_max=3",
            "--epochs",
            "7",
            "--amp",
            "--set",
            "schedule=epoch",
            "--data-opt",
            "split_file=splits.json",
        ]
    )
    assert config.method == "mlb" and config.root == "data/x" and config.run_seed == 337
    assert config.method_options == {"beta_max": 3, "alpha": 1.5}
    assert config.max_epochs == 7 and config.amp and config.schedule == "epoch"
    assert config.data_options == {"split_file": "splits.json"}
    assert config.lr == 1e-3 and config.warmup_steps == 780 and config.patience == 300


def test_cli_runs_and_reports_errors(tmp_path, capsys):
    args = [
        "--dataset",
        "synthetic",
        "--method",
        "joint",
        "--width",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--out",
        str(tmp_path / "cli"),
        "--no-progress",
    ]
    for key, value in TINY_DATA.items():
        args += ["--data-opt", f"{key}={value}"]
    assert main(args) == 0
    assert "fused" in capsys.readouterr().out
    assert main(["--method", "nope"]) == 2
    assert "method must be one of" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"method": "gradnorm"}, "method"),
        ({"fusion": "sum"}, "fusion"),
        ({"fold": 3}, "fold"),
        ({"dataset": "cremad"}, "root"),
        ({"schedule": "linear"}, "schedule"),
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": 1.0}, "unknown"),
    ],
)
def test_bad_configuration_is_refused(changes, match):
    values = {"dataset": "synthetic", **changes}
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(values)


def test_parse_value():
    assert parse_value("5") == 5 and parse_value("0.5") == 0.5
    assert parse_value("[0.7, 1.3]") == [0.7, 1.3]
    assert parse_value("false") is False and parse_value("explicit") == "explicit"


def test_every_preset_loads_and_matches_its_generator():
    from reference_models.presets import CONFIG_DIR, render_toml

    presets = all_presets()
    files = sorted(
        p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in CONFIG_DIR.rglob("*.toml")
    )
    assert files == sorted(presets)
    for name, values in presets.items():
        text = (CONFIG_DIR / f"{name}.toml").read_text()
        assert text.endswith(render_toml(values)), name
        config = load_config(name)
        assert config.method == values["method"] and config.fusion == values["fusion"]


def test_presets_carry_table_2_and_the_protocol():
    mlb = load_config("table3/cremad_resnet18_linear_mlb")
    assert (mlb.lr, mlb.weight_decay, mlb.batch_size) == (1e-3, 1e-4, 32)
    assert mlb.method_options == {"beta_max": 2.0, "alpha": 5.0}
    assert (mlb.max_epochs, mlb.patience, mlb.schedule) == (1500, 300, "step")
    conformer = load_config("table3/cremad_conformer_linear_agm")
    assert (conformer.lr, conformer.weight_decay, conformer.batch_size) == (5e-5, 1e-5, 8)
    assert conformer.method_options == {"clip": True, "masking": "input", "alpha": 3.0}
    assert load_config("table3/ave_resnet18_linear_mmcosine").method_options == {"scale": 8.0}
    assert load_config("table3/ucf101_resnet18_linear_mslr").method_options == {
        "initial": [1.0, 1.0],
        "memory_epochs": 5,
    }
    assert load_config("table4/cremad_resnet18_film_mlb").method_options["alpha"] == 0.5
    journal = load_config("journal/ave_resnet18_linear_agm")
    assert journal.lr == 1e-4 and journal.patience == 150
    assert load_config("journal/ucf101_resnet18_linear_mlb").method_options == {
        "beta_max": 0.5,
        "alpha": 2.0,
    }


@pytest.mark.parametrize(
    "module",
    [
        "reference_models.recipes",
        "reference_models.unimodal",
        "reference_models.coefficients_figure",
        "reference_models.training.config",
        "reference_models.training.batches",
        "reference_models.training.loop",
    ],
)
def test_harness_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
