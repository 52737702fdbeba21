"""Where :class:`gradbalance.integrations.BalancerLog` writes: one small writer per kind of
logger, each a callable ``write(values, step, epoch)`` over plain Python floats.

The kinds are told apart by what they offer, so no logging library is imported here: a
TensorBoard ``SummaryWriter`` (``add_scalar``), a Lightning logger (``log_metrics``), a path
ending in ``.csv`` or ``.jsonl``, or any callable ``fn(values, step)``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradbalance.errors import InputTypeError

Write = Callable[[dict[str, float], int, int], None]

PREFIX = "gradbalance/"
"""The namespace of the values in TensorBoard, Lightning and the Hugging Face Trainer."""

ACCEPTED = (
    "a torch.utils.tensorboard.SummaryWriter, a Lightning logger (CSVLogger, "
    "TensorBoardLogger, ...), a path ending in .csv or .jsonl, or a callable fn(values, step)"
)
"""The loggers :func:`make_writer` accepts, in words (named by its error)."""


def prefixed(values: dict[str, float]) -> dict[str, float]:
    """``{"gradbalance/k_audio": ...}``: the values under :data:`PREFIX`."""
    return {PREFIX + key: value for key, value in values.items()}


class JsonLines:
    """One JSON object per logged step: ``{"step", "epoch", "k_audio", ...}``."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = path.open("a", encoding="utf-8")

    def __call__(self, values: dict[str, float], step: int, epoch: int) -> None:
        self.handle.write(json.dumps({"step": step, "epoch": epoch, **values}) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


class CsvRows:
    """One CSV row per logged step, header ``step,epoch,k_audio,...`` from the first row."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = path.open("w", newline="", encoding="utf-8")
        self.writer: Any = None

    def __call__(self, values: dict[str, float], step: int, epoch: int) -> None:
        row = {"step": step, "epoch": epoch, **values}
        if self.writer is None:
            self.writer = csv.DictWriter(self.handle, fieldnames=list(row))
            self.writer.writeheader()
        self.writer.writerow(row)
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def _tensorboard(writer: Any) -> Write:
    def write(values: dict[str, float], step: int, epoch: int) -> None:
        for key, value in prefixed(values).items():
            writer.add_scalar(key, value, step)

    return write


def _lightning(logger: Any) -> Write:
    def write(values: dict[str, float], step: int, epoch: int) -> None:
        logger.log_metrics(prefixed(values), step=step)

    return write


def _callable(fn: Callable[[dict[str, float], int], Any]) -> Write:
    def write(values: dict[str, float], step: int, epoch: int) -> None:
        fn(values, step)

    return write


def make_writer(logger: Any) -> Write:
    """The writer for ``logger``; :class:`~gradbalance.errors.InputTypeError` (a
    ``TypeError``) naming the accepted kinds for anything else."""
    if hasattr(logger, "add_scalar"):
        return _tensorboard(logger)
    if hasattr(logger, "log_metrics"):
        return _lightning(logger)
    if isinstance(logger, (str, Path)):
        path = Path(logger)
        if path.suffix == ".jsonl":
            return JsonLines(path)
        if path.suffix == ".csv":
            return CsvRows(path)
    elif callable(logger):
        return _callable(logger)
    raise InputTypeError(f"cannot log to {logger!r} (a {type(logger).__name__}): pass {ACCEPTED}")
