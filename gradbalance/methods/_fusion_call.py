"""How AGM calls its ``fusion=`` head on the (masked) features.

Two forms are accepted: ``fusion(z_1, ..., z_M)`` (a head taking one feature tensor per
modality) and a head taking one tensor (``nn.Linear``, ``nn.Sequential``, any module or function
with one positional parameter), which is called on ``torch.cat([z_1, ..., z_M], dim=-1)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from gradbalance._sharded import refuse_sharded
from gradbalance.errors import ConfigurationError, InputError

FusionCall = Literal["per-modality", "concatenated"]

MISSING_FUSION = (
    "masking='feature' needs fusion=, the model's fused head, called on the features in "
    "encoder order: either fusion(z_1, ..., z_M) (a head taking one feature tensor per "
    "modality), or a head taking one tensor (e.g. nn.Linear(sum of the feature widths, "
    "num_classes)), which the balancer calls on torch.cat([z_1, ..., z_M], dim=-1); or use "
    "masking='input' with forward_masked=callable(masked: frozenset of encoder names) -> fused "
    "logits"
)
"""The error message of AGM built with ``masking="feature"`` and no callable ``fusion``."""

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def fusion_call(fusion: Callable[..., torch.Tensor], modalities: int) -> FusionCall:
    """``"concatenated"`` when ``fusion`` takes exactly one positional argument (fewer than
    ``modalities``), else ``"per-modality"``; undecidable signatures count as per-modality."""
    if isinstance(fusion, nn.Linear):
        return "concatenated"
    target = fusion.forward if isinstance(fusion, nn.Module) else fusion
    try:
        parameters = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return "per-modality"
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return "per-modality"
    positional = [p for p in parameters if p.kind in _POSITIONAL]
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    if len(positional) < modalities and len(required) == 1:
        return "concatenated"
    return "per-modality"


def linear_width_message(in_features: int, widths: Sequence[int]) -> str:
    """The message for an ``nn.Linear`` fusion whose input width is not the features' sum."""
    return (
        f"AGM: fusion is an nn.Linear with in_features={in_features}, but the concatenated "
        f"features have width {sum(widths)} (widths {list(widths)} in encoder order); pass the "
        "linear layer over the concatenated features, or fusion=callable(*features)"
    )


def linear_in_features(fusion: Callable[..., torch.Tensor]) -> int | None:
    """``in_features`` of an initialised ``nn.Linear`` fusion; None for anything else."""
    if isinstance(fusion, nn.Linear) and not isinstance(fusion.weight, UninitializedParameter):
        return int(fusion.weight.shape[1])
    return None


def check_static_widths(fusion: Callable[..., torch.Tensor], widths: Sequence[int | None]) -> None:
    """At construction, with every feature width known: the linear fusion's width must match."""
    expected = linear_in_features(fusion)
    known = [w for w in widths if w is not None]
    if expected is not None and len(known) == len(widths) and sum(known) != expected:
        raise ConfigurationError(linear_width_message(expected, known))


def call_fusion(
    fusion: Callable[..., torch.Tensor], mode: FusionCall, inputs: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Run ``fusion`` on the features in encoder order, concatenated or one per argument."""
    if isinstance(fusion, nn.Module):
        refuse_sharded(fusion, "fusion")
    if mode == "per-modality":
        return fusion(*inputs)
    expected = linear_in_features(fusion)
    widths = [int(x.shape[-1]) for x in inputs]
    if expected is not None and sum(widths) != expected:
        raise InputError(linear_width_message(expected, widths))
    return fusion(torch.cat(list(inputs), dim=-1))
