"""A faithful re-implementation of the official code's balancing step, for comparison only.

Written from a description of the official code, not from its source:
after ``loss.backward()`` the trainer moves labels and unimodal logits to the CPU, computes each
modality's true-class probability with a per-sample Python loop that recomputes the softmax
for every sample, derives the MLB coefficients on tensors, converts them for logging, and then
walks ``model.named_parameters()`` multiplying ``p.grad`` in place for every parameter whose
name matches a modality. This is what gradbalance replaces; it is not part of the library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def official_scores(unimodal_logits: Sequence[torch.Tensor], target: torch.Tensor) -> list[float]:
    """Per-sample loop: ``softmax(out)[i][y[i]]`` for each i, summed, for each modality."""
    label = target.cpu()
    scores = []
    for logits in unimodal_logits:
        out = logits.detach().cpu()
        score = sum(torch.softmax(out, dim=1)[i][label[i]] for i in range(out.shape[0]))
        scores.append(float(score))
    return scores


def official_coefficients(scores: Sequence[float], alpha: float) -> list[float]:
    """MLB's symmetric coefficients on host floats, ratio of the other modalities' mean."""
    coefficients = []
    for m, own in enumerate(scores):
        others = [s for j, s in enumerate(scores) if j != m]
        ratio = (sum(others) / len(others)) / own
        coefficients.append(1 + math.tanh(alpha * (ratio - 1)))
    return coefficients


def official_scale_gradients(
    model: nn.Module, prefixes: Sequence[Sequence[str]], coefficients: Sequence[float]
) -> None:
    """Loop over every named parameter; multiply ``p.grad`` where the name matches."""
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        for modality_prefixes, k in zip(prefixes, coefficients):
            if any(prefix in name for prefix in modality_prefixes):
                param.grad *= k


def official_balancing_step(
    model: nn.Module,
    unimodal_logits: Sequence[torch.Tensor],
    target: torch.Tensor,
    prefixes: Sequence[Sequence[str]],
    alpha: float = 1.0,
) -> list[float]:
    """Everything the official trainer does to balance one step, after ``backward()``."""
    coefficients = official_coefficients(official_scores(unimodal_logits, target), alpha)
    official_scale_gradients(model, prefixes, coefficients)
    return coefficients
