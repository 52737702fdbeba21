"""MLB inside a PyTorch Lightning ``LightningModule`` with automatic optimisation.

    pip install pytorch-lightning
    python examples/lightning_module.py

Nothing takes over the loop: the balancer is a submodule of the ``LightningModule`` (so
``self.parameters()`` holds its heads, Lightning's checkpoints hold its state and, under
``strategy="ddp"``, DDP keeps its heads in sync), ``training_step`` returns ``bal.loss``,
and Lightning's own ``backward()`` applies the coefficients. ``validation_step`` runs under
no_grad, so it leaves the coefficients alone. ``on_before_optimizer_step`` runs after
gradient accumulation, AMP unscaling and DDP's all-reduce: the place for
``bal.after_backward()`` (a no-op for MLB; OGM-GE's noise, AGM's clipping).

With ``strategy="ddp"`` pass ``feature_dims`` (as here): DDP refuses lazy parameters.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradbalance as gb

NUM_CLASSES = 6


def make_data(n: int, seed: int) -> TensorDataset:
    """A strong, low-dimensional "audio" modality and a weak, noisy "video" one."""
    g = torch.Generator().manual_seed(seed)
    layout = torch.Generator().manual_seed(1234)
    audio_means = torch.randn(NUM_CLASSES, 4, generator=layout) * 1.2
    video_means = torch.randn(NUM_CLASSES, 32, generator=layout) * 0.3
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    audio = audio_means[y] + torch.randn(n, 4, generator=g)
    video = video_means[y] + torch.randn(n, 32, generator=g)
    return TensorDataset(audio, video, y)


class AudioVisualNet(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.video = nn.Sequential(nn.Linear(32, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.fusion = nn.Linear(2 * hidden, NUM_CLASSES)

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        return self.fusion(torch.cat([self.audio(audio), self.video(video)], dim=-1))


class BalancedModule(pl.LightningModule):
    """Any ``gb`` balancer works the same way: switch the class, keep the module."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        self.model = AudioVisualNet()
        self.balancer = gb.MLB(
            self.model,
            encoders={"audio": self.model.audio, "video": self.model.video},
            num_classes=NUM_CLASSES,
            alpha=2.0,
            beta_max=3.0,
            feature_dims=[32, 32],
        )

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        audio, video, y = batch
        loss = self.balancer.loss(self.model(audio, video), y)
        k = {f"k_{name}": value for name, value in self.balancer.coefficients.items()}
        self.log_dict(k, on_step=False, on_epoch=True)  # device tensors, reduced per epoch
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.balancer.after_backward()

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        audio, video, y = batch
        logits = self.model(audio, video)
        self.log("val_loss", self.balancer.loss(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)  # model and balancer heads


def main(max_epochs: int = 3, limit_train_batches: int | None = None, **trainer_options):
    pl.seed_everything(0, verbose=False)
    module = BalancedModule()
    train = DataLoader(make_data(1024, seed=1), batch_size=64, shuffle=True)
    val = DataLoader(make_data(256, seed=2), batch_size=128)
    options = {
        "accelerator": "cpu",
        "max_epochs": max_epochs,
        "limit_train_batches": limit_train_batches,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **trainer_options,
    }
    trainer = pl.Trainer(**options)
    trainer.fit(module, train, val)
    print({key: round(float(value), 3) for key, value in trainer.callback_metrics.items()})
    return trainer, module


if __name__ == "__main__":
    main()
