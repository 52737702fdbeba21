"""The auxiliary heads' logits for all modalities at once.

Heads of equal shape on one device and dtype (the usual case: ``nn.Linear(D, K)`` per
encoder) run as one batched matmul over the stacked features, so the balancing work does
not grow with the number of modalities; any other combination runs head by head.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def stackable(heads: Mapping[str, nn.Module], features: Mapping[str, torch.Tensor]) -> bool:
    """Whether the heads are plain linear layers of one shape and the features one shape,
    all on one device and dtype."""
    modules = list(heads.values())
    tensors = list(features.values())
    first, feature = modules[0], tensors[0]
    if not all(type(h) is nn.Linear and h.bias is not None for h in modules):
        return False
    shape, device, dtype = first.weight.shape, feature.device, feature.dtype
    return all(
        h.weight.shape == shape and h.weight.device == device and h.weight.dtype == dtype
        for h in modules
    ) and all(t.shape == feature.shape and t.device == device and t.dtype == dtype for t in tensors)


def stacked_head_logits(
    heads: Mapping[str, nn.Module], features: Mapping[str, torch.Tensor], detach: bool
) -> torch.Tensor:
    """``(M, B, K)``: every head on its feature, as one batched ``baddbmm``.

    Call only when :func:`stackable` holds. ``detach`` cuts the features from the graph
    (stop-gradient probes).

    Example:
        >>> heads = {"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)}
        >>> feats = {"a": torch.randn(2, 4), "b": torch.randn(2, 4)}
        >>> out = stacked_head_logits(heads, feats, detach=False)
        >>> torch.allclose(out[1], heads["b"](feats["b"]), atol=1e-6)
        True
    """
    stacked = torch.stack(list(features.values()))
    if detach:
        stacked = stacked.detach()
    weights = torch.stack([h.weight for h in heads.values()])
    biases = torch.stack([h.bias for h in heads.values()])
    return torch.baddbmm(biases.unsqueeze(1), stacked, weights.transpose(1, 2))


def separate_head_logits(
    heads: Mapping[str, nn.Module], features: Mapping[str, torch.Tensor], detach: bool
) -> dict[str, torch.Tensor]:
    """``{name: (B, K)}``: each head on its own feature."""
    return {
        name: heads[name](feature.detach() if detach else feature)
        for name, feature in features.items()
    }
