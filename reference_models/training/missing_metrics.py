"""Losses and metrics of a run with missing modalities, on the device (no host sync).

The harness's probes learn from the samples where their modality is present
(:func:`masked_cross_entropy`); each evaluated split reports the fused accuracy on the complete
and the incomplete samples and on the samples with each modality present and absent, and each
modality's probe and head accuracy where it is present (:func:`presence_metrics`). An empty
subset gives NaN here (``None`` in ``results.json``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

__all__ = [
    "PRESENCE_COUNTS",
    "PRESENCE_KEYS",
    "masked_accuracy",
    "masked_cross_entropy",
    "presence_metrics",
]

PRESENCE_KEYS: frozenset[str] = frozenset(
    {
        "accuracy_complete",
        "accuracy_incomplete",
        "fused_accuracy_present",
        "fused_accuracy_absent",
        "probe_accuracy_present",
        "head_accuracy_present",
    }
)
"""The keys of :func:`presence_metrics` that are NaN on an empty subset."""

PRESENCE_COUNTS: frozenset[str] = frozenset({"complete", "incomplete", "present"})
"""The keys of :func:`presence_metrics` that are sample counts."""


def masked_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy over the samples where ``keep`` is True (0 when there are none);
    the other rows get exactly zero gradient.

    Example:
        >>> logits, target = torch.tensor([[2.0, 0.0], [0.0, 9.0]]), torch.tensor([0, 0])
        >>> keep = torch.tensor([True, False])
        >>> loss = masked_cross_entropy(logits, target, keep)
        >>> bool(loss == F.cross_entropy(logits[:1], target[:1]))
        True
    """
    weight = keep.to(logits.dtype)
    per_sample = F.cross_entropy(logits, target, reduction="none")
    return (per_sample * weight).sum() / weight.sum().clamp_min(1.0)


def masked_accuracy(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Accuracy over the samples where ``keep`` is True (NaN when there are none).

    Example:
        >>> logits = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        >>> masked_accuracy(logits, torch.tensor([0, 1, 1]), torch.tensor([True, True, False]))
        tensor(0.5000, dtype=torch.float64)
    """
    correct = (logits.argmax(dim=1) == target) & keep
    return correct.sum().double() / keep.sum().double()


def presence_metrics(
    fused: torch.Tensor,
    target: torch.Tensor,
    present: Mapping[str, torch.Tensor],
    unimodal: Mapping[str, Mapping[str, torch.Tensor]],
) -> dict[str, dict[str, torch.Tensor]]:
    """A split's accuracies by presence.

    Args:
        fused: the fused logits ``(N, K)``.
        target: the labels ``(N,)``.
        present: ``{modality: (N,) bool}``.
        unimodal: ``{"probe": {modality: (N, K)}, "head": {...}}``, the logits of each
            modality's probe and head, where there are.

    Returns:
        ``{"fused": {accuracy_complete, accuracy_incomplete, complete, incomplete}, modality:
        {present, fused_accuracy_present, fused_accuracy_absent, probe_accuracy_present,
        head_accuracy_present}}`` (counts as tensors; NaN accuracy on an empty subset).

    Example:
        >>> fused = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> video = {"video": torch.tensor([True, False])}
        >>> out = presence_metrics(fused, torch.tensor([0, 0]), video, {})
        >>> out["fused"]["accuracy_complete"].item(), out["video"]["fused_accuracy_absent"].item()
        (1.0, 0.0)
    """
    complete = torch.stack(list(present.values())).all(dim=0)
    result: dict[str, dict[str, torch.Tensor]] = {
        "fused": {
            "accuracy_complete": masked_accuracy(fused, target, complete),
            "accuracy_incomplete": masked_accuracy(fused, target, ~complete),
            "complete": complete.sum(),
            "incomplete": (~complete).sum(),
        }
    }
    for name, keep in present.items():
        entry = {
            "present": keep.sum(),
            "fused_accuracy_present": masked_accuracy(fused, target, keep),
            "fused_accuracy_absent": masked_accuracy(fused, target, ~keep),
        }
        for kind, logits in unimodal.items():
            if name in logits:
                entry[f"{kind}_accuracy_present"] = masked_accuracy(logits[name], target, keep)
        result[name] = entry
    return result
