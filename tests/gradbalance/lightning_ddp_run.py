"""``examples/lightning_module.py`` under ``strategy="ddp"`` on 2 CPU processes; started by
tests/gradbalance/test_launchers.py.

``python tests/gradbalance/lightning_ddp_run.py OUT_DIR`` trains ``BalancedModule`` for
``STEPS`` steps with ``Trainer(accelerator="cpu", devices=2, strategy="ddp")``. Lightning's
ddp launcher starts the second process by running this script again (a new interpreter, not
a fork). Every process saves ``OUT_DIR/rank{r}.pt``: its batches, its coefficients at every
step and its final parameters (model and balancer).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [os.path.join(ROOT, "examples"), ROOT]

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from lightning_module import BalancedModule  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from toy_audio_visual import make_tensors  # noqa: E402

STEPS = 4
BATCH = 16
"""Per process and step."""


class RecordedModule(BalancedModule):
    """The example's module, recording what each step saw and computed."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.batches: list[list[torch.Tensor]] = []
        self.steps_k: list[torch.Tensor] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.batches.append([t.detach().clone() for t in batch])
        self.steps_k.append(torch.stack(list(self.balancer.coefficients.values())))
        return loss

    def on_train_end(self) -> None:
        result = {
            "batches": self.batches,
            "coefficients": torch.stack(self.steps_k),
            "parameters": torch.cat([p.detach().reshape(-1) for p in self.parameters()]),
            "heads_in_ddp": self.balancer._ranks.heads_in_ddp,
        }
        torch.save(result, os.path.join(self.out_dir, f"rank{self.global_rank}.pt"))


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    module = RecordedModule(out_dir)
    data = TensorDataset(*make_tensors(2 * STEPS * BATCH, seed=1))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=BATCH))


if __name__ == "__main__":
    main(sys.argv[1])
