"""Joint vs Multi-Loss vs MLB in a plain PyTorch loop, on generated two-modality data.

The data reproduce the imbalance MLB addresses: the "audio" modality is
low-dimensional, linearly separable and noisy (learned in a few epochs), the "video" modality
carries its class information at a low signal-to-noise ratio in more dimensions and partly
through a non-linear interaction (learned slowly). Each run prints the fused accuracy, each
modality's accuracy (its auxiliary head, or a detached probe for Joint) and the final
coefficients.

Run: ``python examples/plain_loop_demo.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import time

import torch
from toy_audio_visual import NUM_CLASSES, AudioVisualNet

import gradbalance as gb


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Audio: 4-D noisy class means. Video: 32-D weak class means plus an XOR code."""
    g = torch.Generator().manual_seed(seed)
    layout = torch.Generator().manual_seed(1234)
    audio_means = torch.randn(NUM_CLASSES, 4, generator=layout) * 1.2
    video_means = torch.randn(NUM_CLASSES, 32, generator=layout) * 0.22
    codes = torch.randint(0, 2, (NUM_CLASSES, 8), generator=layout) * 2 - 1
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    audio = audio_means[y] + torch.randn(n, 4, generator=g)
    left = torch.randn(n, 8, generator=g).abs() * torch.randint(0, 2, (n, 8), generator=g).mul(
        2
    ).sub(1)
    right = torch.randn(n, 8, generator=g).abs() * (left.sign() * codes[y])
    video = torch.cat([video_means[y] + torch.randn(n, 32, generator=g), left, right], dim=1)
    return audio, video, y


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(-1) == y).float().mean().item()


def train(method: str, epochs: int, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    audio, video, y = make_data(1500, seed=seed)
    test_audio, test_video, test_y = make_data(1000, seed=seed + 100)
    model = AudioVisualNet(hidden=64, video_dim=48)
    encoders = {"audio": model.audio, "video": model.video}
    if method == "Joint":
        bal = gb.Joint(model, encoders, NUM_CLASSES, probes=True)
    elif method == "Multi-Loss":
        bal = gb.MultiLoss(model, encoders, NUM_CLASSES)
    else:
        bal = gb.MLB(model, encoders, NUM_CLASSES, alpha=2.0, beta_max=3.0)
    opt = torch.optim.Adam([*model.parameters(), *bal.parameters()], lr=1e-3, eps=1e-7)
    for _ in range(epochs):
        for batch in torch.randperm(len(y)).split(64):
            loss = bal.loss(model(audio[batch], video[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        fused = model(test_audio, test_video)
        heads = bal.unimodal_logits()
    row = {"fused": accuracy(fused, test_y)}
    row.update({f"acc {name}": accuracy(logits, test_y) for name, logits in heads.items()})
    row.update({f"k {name}": value.item() for name, value in bal.coefficients.items()})
    return row


def main(epochs: int = 40, seeds: tuple[int, ...] = (0, 1, 2)) -> None:
    print(
        f"{'method':<11} {'fused':>6} {'audio':>6} {'video':>6} {'k audio':>8} "
        f"{'k video':>8} {'time':>6}   (test accuracy, mean of {len(seeds)} seeds)"
    )
    for method in ("Joint", "Multi-Loss", "MLB"):
        start = time.perf_counter()
        rows = [train(method, epochs, seed) for seed in seeds]
        mean = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}
        print(
            f"{method:<11} {mean['fused']:6.3f} {mean['acc audio']:6.3f} "
            f"{mean['acc video']:6.3f} {mean['k audio']:8.3f} {mean['k video']:8.3f} "
            f"{time.perf_counter() - start:5.1f}s"
        )


if __name__ == "__main__":
    main()
