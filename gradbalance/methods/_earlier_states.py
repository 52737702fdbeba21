"""State dicts of releases before missing modalities, in the current layout.

Each method whose running state became per modality (or per component) when the presence mask
arrived reads an older state dict through one function here, called from its
``_load_from_state_dict``: the old shared value is given to every modality (every sample then
had every modality). A state dict in the current layout passes unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def per_modality_running_counts(
    state_dict: Mapping[str, Any], prefix: str, num_modalities: int
) -> Mapping[str, Any]:
    """AGM: ``modality_counts`` (steps where each modality was present) from the old
    ``running_count`` (every modulated step)."""
    key = f"{prefix}modality_counts"
    count = state_dict.get(f"{prefix}running_count")
    if key in state_dict or not isinstance(count, torch.Tensor):
        return state_dict
    return {**state_dict, key: count.expand(num_modalities).clone()}


def per_modality_validation_counts(
    state_dict: Mapping[str, Any], prefix: str, num_modalities: int
) -> Mapping[str, Any]:
    """MSLR: ``validation_counts`` per modality from the old extra state's
    ``validation_seen`` (validation samples of the epoch)."""
    key = f"{prefix}validation_counts"
    extra = state_dict.get(f"{prefix}_extra_state")
    if key in state_dict or not isinstance(extra, Mapping):
        return state_dict
    seen = float(extra.get("validation_seen", 0))
    return {**state_dict, key: torch.full((num_modalities,), seen)}


def per_modality_classes(
    state_dict: Mapping[str, Any], prefix: str, num_modalities: int
) -> Mapping[str, Any]:
    """PMR: a state dict of a release with one class count and validity per class (shared by
    the modalities) in the current layout, one row per modality; others unchanged."""
    upgraded = dict(state_dict)
    for key in ("class_counts", "prototype_valid"):
        value = state_dict.get(prefix + key)
        if isinstance(value, torch.Tensor) and value.dim() == 1:
            upgraded[prefix + key] = value.unsqueeze(0).expand(num_modalities, -1).clone()
    return upgraded


def per_component_counts(
    state_dict: Mapping[str, Any], prefix: str, components: int
) -> Mapping[str, Any]:
    """G-Blend: a state dict of a release without missing modalities (one sample count per
    split, shared by the components; no ``referenced``) in the current layout."""
    upgraded = dict(state_dict)
    counts = state_dict.get(f"{prefix}counts")
    if isinstance(counts, torch.Tensor) and counts.dim() == 1:
        upgraded[f"{prefix}counts"] = counts.unsqueeze(1).expand(-1, components).clone()
    extra = state_dict.get(f"{prefix}_extra_state")
    if f"{prefix}referenced" not in state_dict and isinstance(extra, Mapping):
        referenced = int(extra.get("checkpoints", 0)) > 0
        upgraded[f"{prefix}referenced"] = torch.full((components,), referenced)
    return upgraded
