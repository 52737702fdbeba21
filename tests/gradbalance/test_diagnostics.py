"""gradbalance.diagnostics against independent references: features computed by calling the
encoders directly, the ridge probe against numpy's least squares, the logistic probe against
a logistic regression trained by plain gradient descent in numpy, and the imbalance report's
joint run against a plainly written training loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import gradbalance as gb
from gradbalance.diagnostics import (
    ImbalanceReport,
    encoder_features,
    fit_linear_probe,
    imbalance_report,
    linear_probe,
)
from gradbalance.errors import ConfigurationError, InputError


def dataset(n: int = 48, seed: int = 0, video_signal: float = 1.0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    audio = torch.randn(n, 8, generator=generator) + 2 * F.one_hot(y, 8)
    video = torch.randn(n, 6, generator=generator) + video_signal * F.one_hot(y, 6)
    return TensorDataset(audio, video, y)


def loader(seed: int = 0, **options) -> DataLoader:
    return DataLoader(dataset(seed=seed, **options), batch_size=16)


def net(seed: int = 0) -> gb.testing.TwoTowerNet:
    torch.manual_seed(seed)
    return gb.testing.TwoTowerNet()


def test_encoder_features_are_the_encoders_outputs_and_modes_are_restored():
    model = net()
    model.video.eval()  # a mixed state must come back as it was
    features, labels = encoder_features(model, [model.audio, "video"], loader())
    data = dataset()
    with torch.no_grad():
        torch.testing.assert_close(features["audio"], model.audio(data.tensors[0]))
        torch.testing.assert_close(features["video"], model.video(data.tensors[1]))
    assert labels.tolist() == data.tensors[2].tolist()
    assert model.training and model.audio.training and not model.video.training


def test_an_attached_balancer_is_paused_meanwhile():
    model = net()
    bal = gb.PMR(model, [model.audio, model.video], 3)
    encoder_features(model, ["audio", "video"], loader())
    with pytest.raises(RuntimeError):  # nothing was captured by the balancer
        bal.features()
    assert not bal._duties.evaluated  # and nothing counted as an evaluation pass


def test_custom_forward_and_labels():
    model = net()
    batches = [{"a": x, "v": v, "target": y} for x, v, y in loader()]
    features, labels = encoder_features(
        model,
        {"audio": model.audio, "video": model.video},
        batches,
        forward=lambda m, b: m(b["a"], b["v"]),
        labels=lambda b: b["target"],
        max_batches=2,
    )
    assert features["audio"].shape == (32, 16) and labels.shape == (32,)


def test_ridge_probe_is_numpys_least_squares():
    features, labels = encoder_features(net(), ["audio"], loader())
    x = features["audio"].double().numpy()
    lam = 0.3
    layer = fit_linear_probe(features["audio"], labels, 3, solver="ridge", weight_decay=lam)
    # Reference: standardise, append a column of ones, and solve the ridge problem as the
    # ordinary least squares of the stacked system [X; sqrt(lam) I'] w = [Y; 0].
    mean, std = x.mean(0), x.std(0)
    std[std < 1e-6] = 1.0
    z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    penalty = np.sqrt(lam) * np.eye(z.shape[1])[:-1]
    stacked = np.vstack([z, penalty])
    targets = np.vstack([np.eye(3)[labels.numpy()], np.zeros((z.shape[1] - 1, 3))])
    w = np.linalg.lstsq(stacked, targets, rcond=None)[0]
    expected = z @ w
    got = layer(features["audio"]).detach().double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def numpy_logistic(z: np.ndarray, y: np.ndarray, k: int, lam: float, steps: int = 20000):
    """Multinomial logistic regression by plain full-batch gradient descent."""
    w, b = np.zeros((k, z.shape[1])), np.zeros(k)
    onehot = np.eye(k)[y]
    for _ in range(steps):
        logits = z @ w.T + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        error = (p - onehot) / len(z)
        w -= 0.5 * (error.T @ z + lam * w)
        b -= 0.5 * error.sum(0)
    return w, b


def test_logistic_probe_is_a_plainly_trained_logistic_regression():
    features, labels = encoder_features(net(), ["video"], loader())
    x = features["video"].double().numpy()
    lam = 0.05  # strongly convex: one optimum for both
    layer = fit_linear_probe(features["video"], labels, 3, weight_decay=lam, max_iter=300)
    mean, std = x.mean(0), x.std(0)
    std[std < 1e-6] = 1.0
    z = (x - mean) / std
    w, b = numpy_logistic(z, labels.numpy(), 3, lam)
    logits = z @ w.T + b
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    got = torch.softmax(layer(features["video"]).detach().double(), 1).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-4)


def test_linear_probe_is_the_accuracy_of_the_fitted_probe_on_the_eval_loader():
    model = net()
    accuracy = linear_probe(model, ["audio", "video"], loader(0), loader(1), 3, solver="ridge")
    train_x, train_y = encoder_features(model, ["audio", "video"], loader(0))
    eval_x, eval_y = encoder_features(model, ["audio", "video"], loader(1))
    for name in ("audio", "video"):
        # The reference accuracy: numpy's ridge solution applied to the eval features.
        x = train_x[name].double().numpy()
        mean, std = x.mean(0), x.std(0)
        std[std < 1e-6] = 1.0
        z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
        gram = z.T @ z + 1e-4 * np.diag([1.0] * (z.shape[1] - 1) + [0.0])
        w = np.linalg.solve(gram, z.T @ np.eye(3)[train_y.numpy()])
        ze = np.hstack([(eval_x[name].double().numpy() - mean) / std, np.ones((len(eval_y), 1))])
        expected = float(((ze @ w).argmax(1) == eval_y.numpy()).mean())
        assert accuracy[name] == pytest.approx(expected, abs=1e-12)
    assert accuracy["audio"] > accuracy["video"]  # audio carries the stronger signal


def test_bad_inputs_are_refused():
    with pytest.raises(InputError, match=r"features must be \(N, D\)"):
        fit_linear_probe(torch.randn(4), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(InputError, match="labels must lie in"):
        fit_linear_probe(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]), 2)
    with pytest.raises(ConfigurationError, match="solver must be"):
        fit_linear_probe(torch.randn(4, 2), torch.tensor([0, 1, 1, 0]), 2, solver="svm")
    model = gb.testing.TwoTowerNet()
    with pytest.raises(ConfigurationError, match="submodules of the model"):
        encoder_features(model, [torch.nn.Linear(2, 2)], loader())


def test_report_gap_and_starved_are_the_plain_differences():
    report = ImbalanceReport({"a": 0.9, "v": 0.5, "t": 0.6}, {"a": 0.92, "v": 0.7, "t": 0.62}, 0.9)
    assert report.gap == pytest.approx({"a": 0.02, "v": 0.2, "t": 0.02})
    assert report.starved == ["v"]
    assert "starved (gap > 0.05): v" in report.summary()


def test_report_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    report = ImbalanceReport({"a": 0.9, "v": 0.5}, {"a": 0.9, "v": 0.7}, 0.9)
    assert report.plot(tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_imbalance_report_joint_run_is_a_plain_training_loop():
    train, evaluation = loader(0), loader(1)
    report = imbalance_report(
        gb.testing.TwoTowerNet, ["audio", "video"], train, evaluation, 3,
        epochs=2, lr=1e-2, solver="ridge", seed=3,
    )  # fmt: skip
    # The reference: the same seed, Adam, the fused cross-entropy, written out.
    model = net(3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        for audio, video, y in train:
            loss = F.cross_entropy(model(audio, video), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    expected = linear_probe(model, ["audio", "video"], train, evaluation, 3, solver="ridge")
    assert report.joint == expected
    with torch.no_grad():
        data = dataset(seed=1)
        fused = (model(*data.tensors[:2]).argmax(1) == data.tensors[2]).double().mean()
    assert report.fused_accuracy == pytest.approx(float(fused))
    # Alone: each encoder with its own head and loss; measured the same way.
    assert sorted(report.alone) == ["audio", "video"]
    assert all(0.0 <= v <= 1.0 for v in report.alone.values())


@pytest.mark.slow
def test_imbalance_report_finds_the_starved_modality():
    # Audio carries the stronger signal and is learnt first; under joint training the video
    # encoder is left behind (its probe reads below the same encoder trained alone).
    train, evaluation = loader(0, video_signal=0.6), loader(1, video_signal=0.6)
    report = imbalance_report(
        gb.testing.TwoTowerNet, ["audio", "video"], train, evaluation, 3,
        epochs=20, lr=1e-2, solver="ridge", weight_decay=1.0,
    )  # fmt: skip
    assert report.starved == ["video"]
    assert report.gap["video"] > 0.05 >= report.gap["audio"]


def test_nested_encoders_are_named_as_a_balancer_names_them():
    """The diagnostics' keys match ``bal.coefficients``' keys, also for nested encoders given
    as modules or as qualified names."""

    class Nested(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = torch.nn.ModuleDict(
                {"audio": torch.nn.Linear(8, 4), "video": torch.nn.Linear(6, 4)}
            )
            self.fusion = torch.nn.Linear(8, 3)

        def forward(self, a, v):
            z = [self.backbone["audio"](a), self.backbone["video"](v)]
            return self.fusion(torch.cat(z, 1))

    model = Nested()
    batches = [(torch.randn(6, 8), torch.randn(6, 6), torch.randint(0, 3, (6,)))]
    features, _ = encoder_features(model, ["backbone.audio", model.backbone["video"]], batches)
    bal = gb.MLB(model, [model.backbone["audio"], model.backbone["video"]], num_classes=3)
    assert list(features) == bal.names == ["backbone_audio", "backbone_video"]
