"""The paper's method variants through the harness: AGM input masking and clipping, the
decision-level Joint head, PMR's BatchNorm and momentum schedule, MLB's fused weight blocks,
both ECE binnings, and Figure 7 from run folders."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import figure7
from reference_models.train import TrainConfig, build_run, train, train_step

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


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(tmp_path, name="run", **changes) -> TrainConfig:
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
        out=str(tmp_path / name),
        data_options=dict(TINY_DATA),
        seed=0,
    )
    values.update(changes)
    return TrainConfig.from_dict(values)


@pytest.fixture
def session_of(tmp_path):
    sessions = []

    def make(**changes):
        sessions.append(build_run(tiny(tmp_path, **changes)))
        return sessions[-1]

    yield make
    for session in sessions:
        session.close()


def test_forward_masked_reruns_the_batch_with_zeroed_inputs(session_of):
    model = session_of(method="joint").state.model.eval()
    audio, video = torch.randn(3, 33, 16), torch.randn(3, 3, 2, 16, 16)
    with torch.no_grad():
        model(audio, video)
        masked = model.forward_masked({"video"})
        reference = model(audio, torch.zeros_like(video))
        both = model.forward_masked(frozenset({"audio", "video"}))
        zeros = model(torch.zeros_like(audio), torch.zeros_like(video))
    torch.testing.assert_close(masked, reference)
    torch.testing.assert_close(both, zeros)
    with pytest.raises(ValueError, match="unknown modalities"):
        model.forward_masked({"text"})


def test_agm_input_masking_from_the_options_trains(tmp_path):
    config = tiny(tmp_path, method="agm", method_options={"masking": "input", "clip": True})
    results = train(config, verbose=False)
    assert results["finished"] and sorted(results["final_coefficients"]) == ["audio", "video"]
    session = build_run(config)
    assert session.state.balancer.masking == "input"
    session.close()


@pytest.mark.parametrize(("watch", "clipped"), [("fused_weights", False), ("fusion", True)])
def test_agm_clipping_watches_the_fused_head_weights(session_of, watch, clipped):
    session = session_of(method="agm", method_options={"clip": True, "clip_watch": watch})
    model = session.state.model
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, 0.01)
    model.fusion.bias.grad.fill_(5.0)  # outside [-1, 1], but not a weight
    before = [p.grad.clone() for p in model.parameters()]
    session.state.balancer.after_backward()
    after = [p.grad for p in model.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in after]))
    if clipped:
        assert norm == pytest.approx(1.0, rel=1e-4)
    else:
        assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_agm_refuses_an_unknown_clip_watch(session_of):
    with pytest.raises(ValueError, match="clip_watch must be"):
        session_of(method="agm", method_options={"clip": True, "clip_watch": "all"})


def test_decision_level_joint_trains_with_standardised_heads(tmp_path):
    results = train(tiny(tmp_path, method="joint", fusion="decision"), verbose=False)
    assert results["finished"] and 0.0 <= results["test"]["fused"]["accuracy"] <= 1.0


@pytest.mark.parametrize("fusion", ["mlp", "gated", "decision"])
def test_mlb_scales_each_modalitys_first_layer_block(session_of, fusion):
    options = {"alpha": 3.0, "beta_max": 3.0}
    scaled = session_of(method="mlb", fusion=fusion, method_options=options)
    plain = session_of(
        method="mlb", fusion=fusion, method_options={**options, "scale_fused_weights": False}
    )
    batch = next(iter(scaled.train_loader))
    for session in (scaled, plain):
        torch.manual_seed(1)  # the same dropout masks and lazy heads in both runs
        train_step(session.state, *batch)
    coefficients = scaled.state.balancer.coefficients
    assert abs(coefficients["audio"].item() - coefficients["video"].item()) > 1e-3
    blocks = zip(
        scaled.state.model.fusion.modality_parameters(),
        plain.state.model.fusion.modality_parameters(),
    )
    for name, (ours, reference) in zip(("audio", "video"), blocks):
        for mine, theirs in zip(ours, reference):
            torch.testing.assert_close(mine.grad, coefficients[name] * theirs.grad)


PMR_PAPER = {"prototypes": "explicit", "prototype_fraction": 0.5, "momentum": 0.0}


def test_pmr_batch_norm_survives_a_one_sample_last_batch(tmp_path):
    data = {**TINY_DATA, "train_size": 25}  # 3 batches of 8 and one of 1
    config = tiny(
        tmp_path, method="pmr", data_options=data, method_options={**PMR_PAPER, "batch_norm": True}
    )
    results = train(config, verbose=False)
    assert results["finished"] and results["steps"] == 2 * 3  # the 1-sample batch is dropped
    session = build_run(config.replace(out=str(tmp_path / "other")))
    assert len(session.train_loader) == 3
    assert [len(b[2]) for b in session.train_loader] == [8, 8, 8]
    session.close()
    even = build_run(tiny(tmp_path, name="even", data_options={**TINY_DATA, "train_size": 26}))
    assert [len(b[2]) for b in even.train_loader] == [8, 8, 8, 2]  # only a single sample drops
    even.close()


def prototypes_after_two_epoch_starts(session):
    """Prototypes before epoch 0, one epoch of training, prototypes before epoch 1."""
    session.epoch_start()
    for batch in session.train_loader:
        train_step(session.state, *batch)
    session.state.balancer.epoch_end()
    session.epoch_start()
    return {n: p.clone() for n, p in session.state.balancer.prototypes().items()}


def test_pmr_official_momentum_schedule_first_blends_after_the_second_epoch(session_of):
    official = session_of(
        method="pmr",
        method_options={**PMR_PAPER, "momentum": 0.5, "momentum_schedule": "official"},
    )
    unblended = session_of(method="pmr", method_options=PMR_PAPER)
    blended = session_of(method="pmr", method_options={**PMR_PAPER, "momentum": 0.5})
    result = prototypes_after_two_epoch_starts(official)
    assert official.state.balancer.momentum == 0.5
    assert official.state.balancer.first_blend_epoch == 2
    expected = prototypes_after_two_epoch_starts(unblended)
    other = prototypes_after_two_epoch_starts(blended)
    for name in ("audio", "video"):
        torch.testing.assert_close(result[name], expected[name])
        assert not torch.allclose(other[name], expected[name])
    with pytest.raises(ValueError, match="momentum_schedule must be"):
        session_of(method="pmr", method_options={**PMR_PAPER, "momentum_schedule": "cosine"})


def test_results_report_both_ece_binnings(tmp_path):
    results = train(tiny(tmp_path, method="mlb", max_epochs=1), verbose=False)
    for entry in (results["test"]["fused"], results["val"]["fused"]):
        assert {"ece", "ece_classical", "ece_torchmetrics"} <= set(entry)
        assert entry["ece"] == entry["ece_classical"]  # the configured (default) binning
    assert "probe_ece_torchmetrics" in results["test"]["audio"]


def test_figure7_combines_runs_per_method(tmp_path, capsys):
    runs = [
        tiny(tmp_path, name=f"{method}{seed}", method=method, seed=seed, max_epochs=1)
        for method in ("mlb", "ogm")
        for seed in (0, 1)
    ]
    runs.append(tiny(tmp_path, name="video", method="video_only", max_epochs=1))
    for config in runs:
        train(config, verbose=False)
    curves, modalities, skipped = figure7.collect_curves([c.output_dir for c in runs])
    assert modalities == ["audio", "video"] and skipped == [str(runs[-1].output_dir)]
    assert sorted(curves) == ["MLB (mean of 2 runs)", "OGM (mean of 2 runs)"]
    method, columns = curves["MLB (mean of 2 runs)"]
    first, second = (
        [
            float(line.split(",")[1])
            for line in (c.output_dir / "history.csv").read_text().split()[1:]
        ]
        for c in runs[:2]
    )
    assert method == "mlb"
    assert columns["k_audio"] == pytest.approx([(a + b) / 2 for a, b in zip(first, second)])
    out = tmp_path / "figure7.png"
    args = [*(str(c.output_dir) for c in runs), "--kernel", "2", "--out", str(out)]
    assert figure7.main(args) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and "left out" in capsys.readouterr().out
    assert figure7.main([str(tmp_path / "nowhere")]) == 2
    json.loads((runs[0].output_dir / "results.json").read_text())  # untouched


@pytest.mark.filterwarnings("ignore:wav2vec2 front end with RANDOM weights")
def test_token_features_of_padded_conformer_batches_leave_the_padding_out():
    from reference_models.encoders import masked_mean
    from reference_models.models import build_model
    from reference_models.training.components import build_balancer
    from reference_models.training.config import MethodSlice

    torch.manual_seed(0)
    tiny = {"model_dim": 16, "num_layers": 1, "num_heads": 2}
    front_end = {"embed_dim": 16, "num_heads": 2, "ffn_dim": 32, "conv_layers": [(8, 10, 5)]}
    front_end.update(pos_conv_kernel=4, pos_conv_groups=2)
    model = build_model(
        "cremad",
        "conformer",
        "tf",
        wav2vec2_checkpoint="random",
        audio_options={**tiny, "front_end_layers": 1, "front_end_options": front_end},
        video_options=tiny,
        fusion_options={"num_heads": 2},
    )
    balancer = build_balancer(MethodSlice("mlb", {}, 0, 50), model, 6)
    waveform, faces = torch.randn(2, 800), torch.randn(2, 7, 1408)
    wave_mask = torch.zeros(2, 800, dtype=torch.bool)
    wave_mask[1, 400:] = True
    face_mask = torch.zeros(2, 7, dtype=torch.bool)
    face_mask[0, 3:] = True
    model.eval()
    with torch.no_grad():
        logits = model(waveform, faces, audio_padding_mask=wave_mask, video_padding_mask=face_mask)
        balancer.loss(logits, torch.tensor([0, 1]))
        video_tokens = model.video(faces, padding_mask=face_mask)
    features = balancer.features()["video"]
    torch.testing.assert_close(features, masked_mean(video_tokens, face_mask))
    assert not torch.allclose(features[0], video_tokens[0].mean(dim=0))  # padding matters
    balancer.remove()
