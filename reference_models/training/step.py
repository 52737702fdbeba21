"""One training step and one evaluation pass of a run, with no host synchronisation per step."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import gradbalance as gb
from gradbalance.metrics import BINNINGS, accuracy, expected_calibration_error
from reference_models.recipes import MODALITIES
from reference_models.schedule import WarmupCosineRestarts
from reference_models.training.batches import MASK_NAMES, split_extras, to_device
from reference_models.training.config import TrainConfig
from reference_models.training.missing_metrics import (
    PRESENCE_COUNTS,
    PRESENCE_KEYS,
    masked_cross_entropy,
    presence_metrics,
)

__all__ = ["RunState", "evaluate", "forward_passes", "train_step"]


@dataclass
class RunState:
    """What a training step touches: model, balancer, probes, optimizer, schedule, device."""

    config: TrainConfig
    model: nn.Module
    balancer: gb.Balancer | None
    probes: nn.ModuleDict
    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosineRestarts
    device: torch.device
    names: list[str]
    # Device-side accumulators, read at logging steps and at the end of each epoch.
    loss_sum: torch.Tensor
    correct: torch.Tensor
    coefficient_sum: torch.Tensor
    score_sum: torch.Tensor
    window_loss: torch.Tensor
    window_samples: int = 0

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp)

    @property
    def carries_present(self) -> bool:
        """Whether batches carry a presence mask after the labels (missing modalities)."""
        return bool(self.config.missing)

    def told(self, present: torch.Tensor | None) -> torch.Tensor | None:
        """The presence mask the model and the balancer get: ``present``, or ``None`` when
        the run does not tell them (``missing_mask=false``, the zero-fill baseline)."""
        return present if self.config.missing_mask else None

    def column(self, present: torch.Tensor, name: str) -> torch.Tensor:
        """The ``(B,)`` presence of modality ``name`` (columns in :data:`MODALITIES` order)."""
        return present[:, MODALITIES.index(name)]


def _features(state: RunState) -> dict[str, torch.Tensor]:
    if state.balancer is None:
        return state.model.last_features  # type: ignore[union-attr,return-value]
    return state.balancer.features()


def _forward(
    state: RunState,
    audio: torch.Tensor,
    video: torch.Tensor,
    masks: tuple[Any, ...],
    present: torch.Tensor | None,
) -> torch.Tensor:
    told = state.told(present)
    extra = {} if told is None else {"present": told}
    return state.model(audio, video, **dict(zip(MASK_NAMES, masks)), **extra)


def _balancer_loss(
    state: RunState, logits: torch.Tensor, y: torch.Tensor, present: torch.Tensor | None
) -> torch.Tensor:
    bal = state.balancer
    assert bal is not None
    told = state.told(present)
    if told is None:
        return bal.loss(logits, y)
    # The balancer's encoders follow MODALITIES, as the mask's columns.
    return bal.loss(logits, y, present=told)


def train_step(
    state: RunState, audio: torch.Tensor, video: torch.Tensor, y: torch.Tensor, *extras: Any
) -> None:
    """One optimizer step; no host synchronisation (everything stays on the device).

    ``extras``: the batch's presence mask (``(B, M)`` bool, when the run has missing
    modalities), then its padding masks (audio, then video; True = padded), if any. The probes
    learn from the samples where their modality is present.
    """
    present, masks = split_extras(extras, state.carries_present)
    with state.autocast():
        logits = _forward(state, audio, video, masks, present)
        if state.balancer is None:
            loss = F.cross_entropy(logits, y)
        else:
            loss = _balancer_loss(state, logits, y, present)
        total = loss
        if state.probes:
            features = _features(state)
            for name, probe in state.probes.items():
                probe_logits = probe(features[name].detach().float()).float()
                if present is None:
                    total = total + F.cross_entropy(probe_logits, y)
                else:
                    total = total + masked_cross_entropy(
                        probe_logits, y, state.column(present, name)
                    )
    state.optimizer.zero_grad(set_to_none=True)
    total.backward()
    after_backward = getattr(state.balancer, "after_backward", None)
    if after_backward is not None:
        after_backward()
    state.optimizer.step()
    state.scheduler.step()
    with torch.no_grad():
        batch_loss = loss.detach().float() * y.shape[0]
        state.loss_sum += batch_loss
        state.window_loss += batch_loss
        state.correct += (logits.detach().argmax(dim=1) == y).sum()
        if state.balancer is not None:
            coefficients = torch.stack(
                [state.balancer.coefficient_buffer(n).detach().float() for n in state.names]
            )
            state.coefficient_sum += coefficients.to(state.coefficient_sum.device)
            state.score_sum += (
                state.balancer.last_scores.detach().float().to(state.score_sum.device)
            )


def _unimodal_logits(state: RunState) -> dict[str, torch.Tensor]:
    """Logits of a classifier of each modality alone: the heads of MLB and Multi-Loss, or the
    detached probes of Joint(probes=True), OGM/MSLR without a fused head, ...; else {}."""
    bal = state.balancer
    if bal is None or len(bal.heads) == 0:
        return {}
    return bal.unimodal_logits()


def _fused_slices(state: RunState) -> dict[str, torch.Tensor]:
    """OGM/MSLR with a fused head: the head's per-modality slices they score; else {}.

    Not a per-modality accuracy (a slice of a jointly trained head is not a classifier of the
    modality alone): reported under ``slice_*`` keys, apart from ``head_*``.
    """
    bal = state.balancer
    if bal is None or getattr(bal, "fusion_head", None) is None:
        return {}
    return bal.modality_slices()


@torch.no_grad()
def evaluate(state: RunState, loader: Any, *, collect: bool = False) -> dict[str, Any]:
    """Metrics of the fused prediction and of each modality on one split.

    Each prediction gets ``accuracy``, ``loss`` (cross-entropy), ``ece`` (the configured
    ``ece_binning``) and the ECE of both binnings, ``ece_classical`` (``(lo, hi]`` bins, the
    appendix's eq. 10) and ``ece_torchmetrics`` (``[lo, hi)`` plus a bin for confidence 1,
    what the official numbers used).

    Per modality: ``probe_*`` (the harness's own detached probes), ``head_*`` (the balancer's
    classifier of that modality alone, ``bal.unimodal_logits()``: MLB/Multi-Loss heads or
    detached probes) and, for OGM/MSLR with a fused head, ``slice_*`` (the fused head's
    per-modality slices they score, ``bal.modality_slices()``; not a per-modality accuracy).

    With ``collect`` (the per-epoch validation) the balancer's ``loss()`` sees the batches
    under ``torch.no_grad()`` (MSLR takes its validation accuracies from them).

    With missing modalities the fused entry also gets ``accuracy_complete`` and
    ``accuracy_incomplete`` (and their sample counts), and each modality's entry the fused
    accuracy on the samples where it is present and absent, and its probe's and head's
    accuracy on the samples where it is present (:mod:`~reference_models.training.missing_metrics`;
    ``None`` where a subset is empty).
    """
    model, config = state.model, state.config
    was_training = model.training
    model.eval()
    state.probes.eval()
    fused: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    probes: dict[str, list[torch.Tensor]] = {n: [] for n in state.probes}
    heads: dict[str, list[torch.Tensor]] = {}
    slices: dict[str, list[torch.Tensor]] = {}
    presence: list[torch.Tensor] = []
    for batch in loader:
        audio, video, y, *extras = to_device(
            batch, state.device, carries_present=state.carries_present
        )
        present, masks = split_extras(extras, state.carries_present)
        if present is not None:
            presence.append(present)
        with state.autocast():
            logits = _forward(state, audio, video, masks, present)
            if collect and state.balancer is not None:
                _balancer_loss(state, logits, y, present)
            features = _features(state)
            for name, probe in state.probes.items():
                probes[name].append(probe(features[name].float()).float())
            for name, head_logits in _unimodal_logits(state).items():
                heads.setdefault(name, []).append(head_logits.float())
            for name, slice_logits in _fused_slices(state).items():
                slices.setdefault(name, []).append(slice_logits.float())
        fused.append(logits.float())
        targets.append(y)
    model.train(was_training)
    state.probes.train(was_training)
    target = torch.cat(targets)

    def metrics(chunks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = torch.cat(chunks)
        ece = {
            binning: expected_calibration_error(
                logits,
                target,
                config.ece_bins,
                binning=binning,  # type: ignore[arg-type]
            )
            for binning in BINNINGS
        }
        return {
            "accuracy": accuracy(logits, target),
            "ece": ece[config.ece_binning],
            **{f"ece_{binning}": value for binning, value in ece.items()},
            "loss": F.cross_entropy(logits, target),
        }

    result: dict[str, Any] = {"fused": metrics(fused)}
    for name in state.names:
        entry: dict[str, torch.Tensor] = {}
        if name in probes:
            entry.update({f"probe_{k}": v for k, v in metrics(probes[name]).items()})
        if name in heads:
            entry.update({f"head_{k}": v for k, v in metrics(heads[name]).items()})
        if name in slices:
            entry.update({f"slice_{k}": v for k, v in metrics(slices[name]).items()})
        if getattr(model, "modality", None) == name:  # a unimodal classifier's own head
            entry.update({f"head_{k}": v for k, v in result["fused"].items()})
        result[name] = entry
    if presence:
        columns = {name: state.column(torch.cat(presence), name) for name in state.names}
        unimodal = {
            kind: {n: torch.cat(c) for n, c in chunks.items()}
            for kind, chunks in (("probe", probes), ("head", heads))
        }
        extra = presence_metrics(torch.cat(fused), target, columns, unimodal)
        for outer, entry in extra.items():
            result[outer].update(entry)
    # One host synchronisation for the whole split.
    flat = [(outer, inner) for outer, entry in result.items() for inner in entry]
    values = torch.stack([result[o][i].double().cpu() for o, i in flat]).tolist()
    out: dict[str, Any] = {outer: {} for outer in result}
    for (outer, inner), value in zip(flat, values):
        if inner in PRESENCE_COUNTS:
            value = int(value)
        elif inner in PRESENCE_KEYS and math.isnan(value):
            value = None
        out[outer][inner] = value
    return out


def forward_passes(
    state: RunState, loader: Any, fraction: float
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Eval-mode forwards without gradients over the first ``fraction`` of ``loader``'s batches
    (at least one); yields each batch's labels and the presence mask the balancer is told
    (``None`` without missing modalities or with ``missing_mask=false``) after its forward."""
    batches = max(1, int(len(loader) * fraction))
    state.model.eval()
    with torch.no_grad():
        for index, batch in enumerate(loader):
            if index >= batches:
                break
            audio, video, y, *extras = to_device(
                batch, state.device, carries_present=state.carries_present
            )
            present, masks = split_extras(extras, state.carries_present)
            with state.autocast():
                _forward(state, audio, video, masks, present)
            yield y, state.told(present)
    state.model.train()
