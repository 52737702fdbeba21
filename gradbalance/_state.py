"""The state side of a balancer: its results, its state dict, and how it is copied.

:class:`BalancerState` is the base of :class:`~gradbalance.Balancer` that reads the last
step's coefficients and scores, the history, and carries them through ``state_dict()``
(the history included, its last :data:`HISTORY_IN_STATE` steps), ``copy.deepcopy`` and
pickling. A copy or pickle leaves out everything bound to the model object and to this
process (hooks, the captures of the latest forward, which hold its autograd graph, the
optimizer watch) and rebuilds it around the copy of the model that travelled with it, then
attaches: a module that holds the model and its balancer (a ``LightningModule``), or
``torch.save({"model": model, "bal": bal})``, restores a working pair.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gradbalance._attach import is_built
from gradbalance._checks import upgrade_state_dict
from gradbalance._finite import NonFiniteGuard
from gradbalance._scale import Binding
from gradbalance._task import Task
from gradbalance.history import History, HistoryTable

HISTORY_IN_STATE = 100_000
"""The most recent recorded steps of :attr:`BalancerState.history` that ``state_dict()``
keeps."""


class BalancerState(nn.Module):
    """Results, state dict and copies of a balancer (see the module docstring); the
    :class:`~gradbalance.Balancer` front provides the rest of the attributes and
    ``_new_links`` / ``_attach``."""

    names: list[str]
    steps: int
    epoch: int
    last_coefficients: torch.Tensor
    last_scores: torch.Tensor
    nonfinite_steps: torch.Tensor
    _task: Task
    _index: dict[str, int]
    _history: History
    _guard: NonFiniteGuard
    _binding: Binding
    _root_model: nn.Module

    _transient: tuple[str, ...] = ("_attachment", "_watch", "_captures", "_backward", "_ranks")
    """Attributes a copy or pickle of the balancer leaves out (hooks, this step's graph)."""

    def _new_links(self) -> None:
        raise NotImplementedError

    def _attach(self) -> None:
        raise NotImplementedError

    def _new_state(
        self, device: torch.device, flush_every: int, nonfinite: str, check_gradients: bool
    ) -> None:
        """The state of a balancer before its first step, for the encoders :attr:`names`:
        coefficients 1 and scores 0, no history, the non-finite guard (``nonfinite``,
        ``check_gradients``), and the next forward bound to coefficients 1."""
        m = len(self.names)
        self.register_buffer("last_coefficients", torch.ones(m, device=device))
        self.register_buffer("last_scores", torch.zeros(m, device=device))
        self.register_buffer("nonfinite_steps", torch.zeros((), dtype=torch.int64, device=device))
        self._history = History(self.names, flush_every, device=device)
        self._guard = NonFiniteGuard(self.names, device, nonfinite, check_gradients)
        self._index = {name: index for index, name in enumerate(self.names)}
        self._binding = Binding(torch.ones(m, device=device))
        self.steps = 0
        self.epoch = 0

    def coefficient_buffer(self, name: str) -> torch.Tensor:
        """The coefficient of encoder ``name`` used by the last training ``loss()`` (a view)."""
        return self.last_coefficients[self._index[name]]

    @torch.no_grad()
    def _commit(
        self, coefficients: torch.Tensor, scores: torch.Tensor, finite: torch.Tensor | None
    ) -> None:
        """Copy a training step's stored results into the buffers and the history."""
        if finite is not None:
            self.nonfinite_steps.add_((~finite).to(self.nonfinite_steps.dtype))
            self._guard.last_finite = finite
        self.last_coefficients.copy_(coefficients)
        self.last_scores.copy_(scores)
        self._record_history(coefficients, scores, finite)
        self.steps += 1

    def _record_history(
        self, coefficients: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor | None
    ) -> None:
        """Append one step to :attr:`history` (device-side)."""
        self._history.record(coefficients, scores, valid, epoch=self.epoch, step=self.steps)

    @property
    def coefficients(self) -> dict[str, torch.Tensor]:
        """``{name: 0-dim tensor}``: the coefficients used by the last training ``loss()``."""
        values = self.last_coefficients.detach().clone()
        return {name: values[index] for index, name in enumerate(self.names)}

    @property
    def scores(self) -> dict[str, torch.Tensor]:
        """``{name: 0-dim tensor}``: the per-modality scores of the last training ``loss()``."""
        values = self.last_scores.detach().clone()
        return {name: values[index] for index, name in enumerate(self.names)}

    @property
    def history(self) -> HistoryTable:
        """Per-step ``{name: {"coefficients": (S,), "scores": (S,)}}`` on the CPU (finite
        training steps only), a :class:`~gradbalance.HistoryTable` (epochs, exports).
        ``state_dict()`` holds its last ``HISTORY_IN_STATE`` (100 000) steps, so it
        continues after ``load_state_dict``."""
        self._guard.raise_recorded()
        return self._history.as_dict(self._task.score_label)

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        state_dict = upgrade_state_dict(state_dict, prefix, self.names)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self) -> dict[str, Any]:
        history = self._history.state(HISTORY_IN_STATE)
        return {"steps": self.steps, "epoch": self.epoch, "history": history}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.epoch = int(state.get("epoch", 0))
        if "history" in state:  # state dicts of earlier releases hold no history
            self._history.load_state(state["history"])

    def __getstate__(self) -> dict[str, Any]:
        """The balancer's state for ``copy.deepcopy`` and pickling, without its hooks, the
        captures of the latest forward (they hold the autograd graph) and the optimizer
        watch: :meth:`__setstate__` attaches the copy to the copy of the model."""
        state = dict(super().__getstate__())
        for key in self._transient:
            state.pop(key, None)
        state["_binding"] = self._binding.values
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild a copied or unpickled balancer, attached to the model that travelled
        with it (``copy.deepcopy`` of a module that holds both, ``torch.save`` of both)."""
        super().__setstate__(state)
        self._binding = Binding(state["_binding"])
        self._new_links()
        if is_built(self._root_model):  # not yet when the model holds its own balancer
            self._attach()
