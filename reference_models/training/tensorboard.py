"""``--logger tensorboard``: a run's scalars in TensorBoard, beside ``log.jsonl``.

Under ``<out>/tensorboard``: every ``log_every`` steps the step record's loss and learning
rate (``train/loss``, ``train/lr``) and the balancer's values through
:class:`gradbalance.integrations.BalancerLog` (``gradbalance/k_audio``,
``gradbalance/score_audio``, ...); every epoch the training loss and accuracy and the fused
validation metrics (``epoch/train_loss``, ``epoch/val_accuracy``, ...). Needs tensorboard
(``pip install gradbalance[log]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradbalance as gb

__all__ = ["LOGGERS", "TensorBoardLog", "open_logger"]

LOGGERS = ("none", "tensorboard")
"""The values of ``--logger`` (``log.jsonl`` is always written)."""


class TensorBoardLog:
    """A run's TensorBoard scalars (see the module); with ``balancer`` None (a run without
    one) only the run's own scalars."""

    def __init__(self, folder: Path, balancer: gb.Balancer | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "--logger tensorboard needs tensorboard: pip install gradbalance[log]"
            ) from error
        self.writer = SummaryWriter(log_dir=str(folder))
        self.balancer = (
            gb.integrations.BalancerLog(balancer, self.writer) if balancer is not None else None
        )

    def step(self, record: dict[str, Any]) -> None:
        """Write a ``step`` record of ``log.jsonl`` and the balancer's values of that step."""
        step = record["step"]
        self.writer.add_scalar("train/loss", record["loss"], step)
        self.writer.add_scalar("train/lr", record["lr"], step)
        if self.balancer is not None:
            self.balancer.write(step)

    def epoch(self, record: dict[str, Any]) -> None:
        """Write an ``epoch`` record's training and fused validation metrics."""
        values = {f"train_{k}": v for k, v in record["train"].items()}
        values.update({f"val_{k}": v for k, v in record["val"]["fused"].items()})
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"epoch/{key}", value, record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_logger(kind: str, out: Path, balancer: gb.Balancer | None) -> TensorBoardLog | None:
    """The logger ``--logger`` asks for beside ``log.jsonl`` (None for ``"none"``)."""
    if kind == "tensorboard":
        return TensorBoardLog(out / "tensorboard", balancer)
    return None
