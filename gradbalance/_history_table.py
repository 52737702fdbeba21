"""What ``bal.history`` returns: the per-step series as a dict, plus rows, a per-epoch summary
and exports (CSV, a list of dicts, a pandas frame when pandas is installed)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Literal

import torch

Per = Literal["step", "epoch"]

STEP_COLUMNS = ("step", "epoch", "modality", "coefficient", "score")
"""The columns of :meth:`HistoryTable.rows` (and of the per-step CSV and frame)."""

EPOCH_COLUMNS = ("epoch", "modality", "steps", "coefficient", "score")
"""The columns of :meth:`HistoryTable.epoch_summary` (and of the per-epoch CSV and frame)."""


class HistoryTable(dict[str, dict[str, torch.Tensor]]):
    """A balancer's recorded history: ``{name: {"coefficients": (S,), "scores": (S,)}}``.

    A plain ``dict`` keyed by modality (encoder order), each value holding two float32 CPU
    tensors with one entry per recorded training step, oldest first: the coefficient k of
    that modality (for PMR the prototype-loss weight) and its score (the method's per-modality
    score of that step, e.g. MLB's mean true-class probability of the unimodal head). Only
    finite training steps are recorded; evaluation ``loss()`` calls never are.

    Besides the dict, :attr:`steps` and :attr:`epochs` give each entry's step index
    (``bal.steps`` when it was recorded) and epoch (``bal.epoch``, advanced by
    ``bal.epoch_end()``); :meth:`rows`, :meth:`epoch_summary`, :meth:`to_csv` and
    :meth:`to_pandas` export it.

    Args:
        series: ``{name: {"coefficients": (S,), "scores": (S,)}}``.
        steps: ``(S,)`` integer step indices.
        epochs: ``(S,)`` integer epochs.
        score_label: what the scores are, the label :func:`~gradbalance.plot_history` gives
            their axis: ``"score (batch error, lower is better)"`` for a balancer with
            ``task="regression"``, ``"score"`` otherwise.

    Example:
        >>> import torch, gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.MLB(model, encoders=[model.audio, model.video], num_classes=3)
        >>> a, v, y = torch.randn(4, 8), torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
        >>> for epoch in range(2):
        ...     for _ in range(3):
        ...         bal.loss(model(a, v), y).backward()
        ...     bal.epoch_end()
        >>> table = bal.history
        >>> table["audio"]["coefficients"].shape, table.epochs.tolist()
        (torch.Size([6]), [0, 0, 0, 1, 1, 1])
        >>> [(r["epoch"], r["modality"], r["steps"]) for r in table.epoch_summary()]
        [(0, 'audio', 3), (0, 'video', 3), (1, 'audio', 3), (1, 'video', 3)]
        >>> sorted(table.rows()[0])
        ['coefficient', 'epoch', 'modality', 'score', 'step']
    """

    def __init__(
        self,
        series: dict[str, dict[str, torch.Tensor]],
        steps: torch.Tensor,
        epochs: torch.Tensor,
        score_label: str = "score",
    ) -> None:
        super().__init__(series)
        self.steps = steps
        self.epochs = epochs
        self.score_label = score_label

    def rows(self) -> list[dict[str, Any]]:
        """One dict per (step, modality), steps in order, modalities in encoder order:
        ``{"step", "epoch", "modality", "coefficient", "score"}`` (Python ints and floats)."""
        steps, epochs = self.steps.tolist(), self.epochs.tolist()
        values = {
            name: (series["coefficients"].tolist(), series["scores"].tolist())
            for name, series in self.items()
        }
        return [
            {
                "step": step,
                "epoch": epoch,
                "modality": name,
                "coefficient": values[name][0][index],
                "score": values[name][1][index],
            }
            for index, (step, epoch) in enumerate(zip(steps, epochs))
            for name in self
        ]

    def epoch_summary(self) -> list[dict[str, Any]]:
        """One dict per (epoch, modality), epochs ascending, modalities in encoder order:
        ``{"epoch", "modality", "steps", "coefficient", "score"}`` where ``coefficient`` and
        ``score`` are the means over that epoch's recorded steps (computed in float64)."""
        summary: list[dict[str, Any]] = []
        for epoch in torch.unique(self.epochs).tolist():
            chosen = self.epochs == epoch
            count = int(chosen.sum())
            for name, series in self.items():
                means = [
                    series[q][chosen].double().mean().item() for q in ("coefficients", "scores")
                ]
                summary.append(
                    {
                        "epoch": epoch,
                        "modality": name,
                        "steps": count,
                        "coefficient": means[0],
                        "score": means[1],
                    }
                )
        return summary

    def _records(self, per: Per) -> tuple[tuple[str, ...], list[dict[str, Any]]]:
        if per == "step":
            return STEP_COLUMNS, self.rows()
        if per == "epoch":
            return EPOCH_COLUMNS, self.epoch_summary()
        raise ValueError(f"per must be 'step' or 'epoch', got {per!r}")

    def to_csv(self, path: str | Path, per: Per = "step") -> Path:
        """Write :meth:`rows` (``per="step"``) or :meth:`epoch_summary` (``per="epoch"``) as
        CSV with a header row; returns the path (its folder is created)."""
        columns, records = self._records(per)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows(records)
        return path

    def to_pandas(self, per: Per = "step") -> Any:
        """:meth:`rows` or :meth:`epoch_summary` as a ``pandas.DataFrame`` (needs pandas,
        which gradbalance never imports otherwise)."""
        columns, records = self._records(per)
        try:
            import pandas
        except ImportError as error:
            raise ImportError("HistoryTable.to_pandas needs pandas: pip install pandas") from error
        return pandas.DataFrame.from_records(records, columns=list(columns))
