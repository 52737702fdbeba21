"""Three-modality sentiment-style regression with MLB (``task="regression"``), on generated data.

Each sample has a text-, an audio- and a vision-like stream, ``(B, T, D)`` sequences, and a
real label in [-3, 3] (like CMU-MOSEI's sentiment). The label is the clipped sum of three
latent factors, one per stream:

* text: its factor written linearly into every time step at a high signal-to-noise ratio
  (a fast learner: a mean-pooled linear read-out finds it in a few steps);
* audio: its factor only in the *amplitude* of an oscillation over time (a non-linear,
  temporal cue, learned by a small GRU);
* vision: its factor at a low signal-to-noise ratio spread over many dimensions (learned
  slowly by a mean-pool + MLP encoder).

Joint training, Multi-Loss and MLB (Kontras et al., BMVC 2024, regression variant: every
loss L1, each head's score its batch squared error, ``r_m = err_m / mean_{j != m} err_j``)
train the same network; each run prints the test MAE, Pearson correlation, binary accuracy
without zeros and Acc-7 of the fused prediction, each modality's head MAE (a detached probe
for Joint) and MLB's final coefficients, and MLB's coefficient and error curves are drawn
to ``--out``.

Run: ``python examples/three_modalities_regression.py --out mlb_regression.png`` (about 15 s
on one CPU core).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

import gradbalance as gb
from gradbalance.metrics import (
    mean_absolute_error,
    pearson_correlation,
    sentiment_accuracy,
    sentiment_binary_accuracy,
)

STEPS, TEXT_DIM, AUDIO_DIM, VISION_DIM, HIDDEN = 8, 6, 4, 24, 32


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(text (n, T, 6), audio (n, T, 4), vision (n, T, 24), label (n,))``."""
    g = torch.Generator().manual_seed(seed)
    layout = torch.Generator().manual_seed(77)
    text_direction = torch.randn(TEXT_DIM, generator=layout)
    vision_direction = torch.randn(VISION_DIM, generator=layout) / VISION_DIM**0.5
    factors = torch.randn(n, 3, generator=g)
    label = (1.3 * factors[:, 0] + factors[:, 1] + factors[:, 2]).clamp(-3.0, 3.0)
    time_axis = torch.arange(STEPS, dtype=torch.float32)
    text = factors[:, 0, None, None] * text_direction + 0.6 * torch.randn(
        n, STEPS, TEXT_DIM, generator=g
    )
    amplitude = 1.0 + 0.8 * torch.tanh(factors[:, 1])  # audio: the factor sets the amplitude
    wave = torch.sin(time_axis * 1.3)[None, :, None] * amplitude[:, None, None]
    audio = wave + 0.3 * torch.randn(n, STEPS, AUDIO_DIM, generator=g)
    vision = 1.2 * factors[:, 2, None, None] * vision_direction + torch.randn(
        n, STEPS, VISION_DIM, generator=g
    )
    return text, audio, vision, label


class MeanPoolEncoder(nn.Module):
    """Mean over time, then a two-layer MLP: ``(B, T, D) -> (B, HIDDEN)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.mean(dim=1))


class GRUEncoder(nn.Module):
    """A one-layer GRU; its last hidden state: ``(B, T, D) -> (B, HIDDEN)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gru = nn.GRU(dim, HIDDEN, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gru(x)[1][-1]


class SentimentNet(nn.Module):
    """Three encoders and a late linear fusion to one real output per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.text = MeanPoolEncoder(TEXT_DIM)
        self.audio = GRUEncoder(AUDIO_DIM)
        self.vision = MeanPoolEncoder(VISION_DIM)
        self.fusion = nn.Linear(3 * HIDDEN, 1)

    def forward(
        self, text: torch.Tensor, audio: torch.Tensor, vision: torch.Tensor
    ) -> torch.Tensor:
        features = [self.text(text), self.audio(audio), self.vision(vision)]
        return self.fusion(torch.cat(features, dim=1)).squeeze(1)


def build(method: str, model: SentimentNet) -> gb.Balancer:
    encoders = {"text": model.text, "audio": model.audio, "vision": model.vision}
    common = {"task": "regression", "feature_dims": HIDDEN}
    if method == "Joint":
        return gb.Joint(model, encoders, probes=True, **common)
    if method == "Multi-Loss":
        return gb.MultiLoss(model, encoders, **common)
    return gb.MLB(model, encoders, alpha=1.0, beta_max=3.0, **common)


def run(method: str, epochs: int, seed: int, data: dict) -> tuple[dict, gb.Balancer]:
    torch.manual_seed(seed)
    model = SentimentNet()
    bal = build(method, model)
    opt = torch.optim.Adam([*model.parameters(), *bal.parameters()], lr=2e-3)
    text, audio, vision, label = data["train"]
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(label.shape[0], generator=g)
        for index in order.split(64):
            loss = bal.loss(model(text[index], audio[index], vision[index]), label[index])
            opt.zero_grad()
            loss.backward()
            opt.step()
        bal.epoch_end()
    model.eval()
    text, audio, vision, label = data["test"]
    with torch.no_grad():
        prediction = model(text, audio, vision)
        heads = {name: p.squeeze(1) for name, p in bal.unimodal_logits().items()}
    result = {
        "mae": mean_absolute_error(prediction, label).item(),
        "corr": pearson_correlation(prediction, label).item(),
        "acc2": sentiment_binary_accuracy(prediction, label).item(),
        "acc7": sentiment_accuracy(prediction, label, 7).item(),
        **{f"mae_{name}": mean_absolute_error(p, label).item() for name, p in heads.items()},
    }
    return result, bal


def plot(bal: gb.Balancer, path: Path) -> Path:
    """MLB's three coefficients (top) and its heads' batch errors (bottom) over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_k, ax_e) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for name, series in bal.history.items():
        ax_k.plot(series["coefficients"].numpy(), label=name)
        ax_e.plot(series["scores"].numpy(), label=name)
    ax_k.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax_k.set_ylabel("coefficient k")
    ax_e.set_ylabel("head batch MSE")
    ax_e.set_yscale("log")
    ax_e.set_xlabel("training step")
    ax_k.set_title("MLB (regression): coefficients and heads' errors")
    ax_k.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(epochs: int = 10, seed: int = 0, out: str | None = None) -> dict[str, dict]:
    data = {"train": make_data(1280, seed=1), "test": make_data(1000, seed=2)}
    results = {}
    print(
        f"{'method':<11}{'MAE':>7}{'corr':>7}{'acc2':>7}{'acc7':>7}"
        f"{'MAE text':>10}{'audio':>7}{'vision':>7}   coefficients (text, audio, vision)"
    )
    for method in ("Joint", "Multi-Loss", "MLB"):
        start = time.perf_counter()
        result, bal = run(method, epochs, seed, data)
        k = ", ".join(f"{v.item():.3f}" for v in bal.coefficients.values())
        print(
            f"{method:<11}{result['mae']:>7.3f}{result['corr']:>7.3f}{result['acc2']:>7.3f}"
            f"{result['acc7']:>7.3f}{result['mae_text']:>10.3f}{result['mae_audio']:>7.3f}"
            f"{result['mae_vision']:>7.3f}   {k}   ({time.perf_counter() - start:.1f} s)"
        )
        results[method] = {**result, "coefficients": [v.item() for v in bal.coefficients.values()]}
        if method == "MLB" and out is not None:
            print(f"MLB's coefficients plotted to {plot(bal, Path(out))}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="mlb_regression.png", help="PNG of MLB's coefficients")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tensors this small run fastest on one thread
    main(args.epochs, args.seed, args.out)
