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
from torch.utils.data import DataLoader, TensorDataset
from toy_audio_visual import NUM_CLASSES, AudioVisualNet, make_tensors

import gradbalance as gb


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
    train = DataLoader(TensorDataset(*make_tensors(1024, seed=1)), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(*make_tensors(256, seed=2)), batch_size=128)
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
