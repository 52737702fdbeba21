"""Per-step coefficient and score history, kept on the device and flushed every N steps.

Recording a step is one in-place copy into a preallocated device tensor: no host
synchronisation. Every ``flush_every`` steps (and whenever the history is read) the block is
copied to the CPU in one transfer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from gradbalance._history_table import HistoryTable
from gradbalance._plotting import pyplot, save_figure

__all__ = ["QUANTITIES", "History", "HistoryTable", "plot_history"]

QUANTITIES = ("coefficients", "scores")


class History:
    """Device-side ring buffer of per-step coefficients and scores for M modalities.

    A step can be recorded as invalid (``valid`` False on the device, e.g. a non-finite step
    skipped by the balancer): it is dropped when the block is copied to the CPU, so the
    history only ever holds finite steps, and deciding it needs no host synchronisation.

    Args:
        names: modality names, in encoder order.
        flush_every: steps kept on the device before one bulk copy to the CPU.
        device: where the per-step block lives (the device of the coefficients).

    Example:
        >>> h = History(["audio", "video"], flush_every=2)
        >>> h.record(torch.tensor([0.5, 1.5]), torch.tensor([0.9, 0.3]))
        >>> h.record(torch.tensor([9.0, 9.0]), torch.tensor([0.0, 0.0]), valid=torch.tensor(False))
        >>> h.as_dict()["audio"]["coefficients"]
        tensor([0.5000])
    """

    def __init__(
        self, names: Sequence[str], flush_every: int = 256, device: torch.device | None = None
    ) -> None:
        if not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be an int >= 1, got {flush_every!r}")
        self.names = list(names)
        self.flush_every = flush_every
        # Row 0: coefficients, row 1: scores, row 2: the step's validity flag (broadcast).
        self._block = torch.zeros(
            flush_every, len(QUANTITIES) + 1, len(self.names), device=device, dtype=torch.float32
        )
        self._block[:, 2] = 1.0
        self._flags_written = False
        self._filled = 0
        self._flushed: list[torch.Tensor] = []
        # (step, epoch) of each row of the device block, and of each flushed (valid) row.
        self._meta: list[tuple[int, int]] = []
        self._flushed_meta: list[torch.Tensor] = []
        self._recorded = 0

    def record(
        self,
        coefficients: torch.Tensor,
        scores: torch.Tensor,
        valid: torch.Tensor | None = None,
        *,
        epoch: int = 0,
        step: int | None = None,
    ) -> None:
        """Store one step's coefficients and scores (1-D tensors of length M).

        Args:
            coefficients: the step's coefficients.
            scores: the step's scores.
            valid: optional 0-dim bool tensor; a step recorded with ``False`` is dropped.
            epoch: the training epoch of the step (the balancer's ``epoch``).
            step: the step's index (the balancer's ``steps``); default: the number of steps
                recorded before it.
        """
        self._meta.append((self._recorded if step is None else int(step), int(epoch)))
        self._recorded += 1
        if self._block.device != coefficients.device:
            self.flush()
            self._block = self._block.to(coefficients.device)
        row = self._block[self._filled]
        row[0].copy_(coefficients)
        row[1].copy_(scores)
        if valid is not None:
            row[2].copy_(valid)
            self._flags_written = True
        self._filled += 1
        if self._filled == self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Copy the steps recorded on the device to the CPU (one transfer)."""
        if self._filled:
            block = self._block[: self._filled].to("cpu", copy=True)
            keep = block[:, 2, 0] > 0.5
            self._flushed.append(block[keep, : len(QUANTITIES)])
            meta = torch.tensor(self._meta, dtype=torch.int64).reshape(-1, 2)
            self._flushed_meta.append(meta[keep])
            self._meta = []
            self._filled = 0
            if self._flags_written:  # rows recorded without a flag count as valid
                self._block[:, 2].fill_(1.0)
                self._flags_written = False

    def __len__(self) -> int:
        self.flush()
        return sum(len(block) for block in self._flushed)

    def clear(self) -> None:
        """Forget every recorded step."""
        self._flushed, self._filled = [], 0
        self._flushed_meta, self._meta = [], []
        if self._flags_written:
            self._block[:, 2].fill_(1.0)
            self._flags_written = False

    def state(self, limit: int) -> dict[str, torch.Tensor]:
        """The last ``limit`` recorded steps, for a checkpoint: ``{"table": (S, 2, M),
        "steps": (S, 2)}`` on the CPU (one transfer of the steps still on the device)."""
        return {"table": self.tensor()[-limit:].clone(), "steps": self.steps_and_epochs()[-limit:]}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the recorded steps by those of :meth:`state`."""
        self.clear()
        self._flushed = [state["table"].to("cpu", torch.float32)]
        self._flushed_meta = [state["steps"].to("cpu", torch.int64)]

    def tensor(self) -> torch.Tensor:
        """All recorded (valid) steps as one CPU tensor of shape ``(steps, 2, M)``."""
        self.flush()
        if not self._flushed:
            return torch.zeros(0, len(QUANTITIES), len(self.names))
        if len(self._flushed) > 1:
            self._flushed = [torch.cat(self._flushed)]
        return self._flushed[0]

    def steps_and_epochs(self) -> torch.Tensor:
        """``(steps, 2)`` int64 on the CPU: the step index and the epoch of each valid step."""
        self.flush()
        if not self._flushed_meta:
            return torch.zeros(0, 2, dtype=torch.int64)
        if len(self._flushed_meta) > 1:
            self._flushed_meta = [torch.cat(self._flushed_meta)]
        return self._flushed_meta[0]

    def as_dict(self, score_label: str = "score") -> HistoryTable:
        """``{name: {"coefficients": (steps,), "scores": (steps,)}}`` on the CPU, as a
        :class:`HistoryTable` (a ``dict`` that also knows each step's index and epoch).

        Args:
            score_label: what the scores are, for plots (:attr:`HistoryTable.score_label`).
        """
        table = self.tensor()
        meta = self.steps_and_epochs()
        series = {
            name: {q: table[:, qi, mi] for qi, q in enumerate(QUANTITIES)}
            for mi, name in enumerate(self.names)
        }
        return HistoryTable(series, steps=meta[:, 0], epochs=meta[:, 1], score_label=score_label)


def plot_history(
    history: dict[str, dict[str, torch.Tensor]] | History,
    path: str | Path,
    title: str = "MLB coefficients",
    score_label: str | None = None,
) -> Path:
    """Draw each modality's coefficient (and score) over training steps to a PNG.

    The layout follows Figure 7 of the paper's appendix: one curve per modality, coefficient
    on the top axis, the method's score below (for MLB the mean true-class probability of
    the unimodal head; with ``task="regression"`` each head's batch error, lower is better).
    Needs matplotlib (``pip install gradbalance[plot]``).

    Args:
        history: ``bal.history`` (or a :class:`History`).
        path: where to write the PNG.
        title: figure title.
        score_label: the label of the score axis; default: the history's
            :attr:`HistoryTable.score_label` (``"score (batch error, lower is better)"`` for
            a regression balancer, ``"score"`` otherwise).

    Returns:
        The path written.

    Example:
        >>> import tempfile, os
        >>> h = History(["audio", "video"])
        >>> for s in range(5):
        ...     h.record(torch.tensor([0.5, 1.5]), torch.tensor([0.9, 0.3]))
        >>> out = plot_history(h, os.path.join(tempfile.mkdtemp(), "k.png"))
        >>> out.exists()
        True
    """
    plt = pyplot("plot_history")
    table = history.as_dict() if isinstance(history, History) else history
    fig, (ax_k, ax_s) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for name, series in table.items():
        steps = range(len(series["coefficients"]))
        ax_k.plot(steps, series["coefficients"].numpy(), label=name)
        ax_s.plot(steps, series["scores"].numpy(), label=name)
    ax_k.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax_k.set_ylabel("coefficient k")
    if score_label is None:
        score_label = getattr(table, "score_label", "score")
    ax_s.set_ylabel(score_label)
    ax_s.set_xlabel("training step")
    ax_k.set_title(title)
    ax_k.legend()
    return save_figure(plt, fig, path)
