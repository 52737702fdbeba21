"""The auxiliary heads' logits for all modalities at once.

Heads of equal shape on one device and dtype (the usual case: ``nn.Linear(D, K)`` per
encoder) run as one batched matmul over the stacked features, so the balancing work does
not grow with the number of modalities; any other combination runs head by head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gradbalance.errors import DeviceError


class _Stack(torch.autograd.Function):
    """``torch.stack`` whose backward is one ``unbind`` (not one ``select`` per tensor), so
    the balancing work does not grow with the number of modalities."""

    @staticmethod
    def forward(ctx: Any, *tensors: torch.Tensor) -> torch.Tensor:
        return torch.stack(tensors)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return grad.unbind(0)


def stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)`` with a constant-cost backward."""
    return _Stack.apply(*tensors)


def stack_if_uniform(features: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """``(M, B, D)``: the features stacked when they share shape, device and dtype."""
    tensors = list(features.values())
    first = tensors[0]
    uniform = all(
        t.shape == first.shape and t.device == first.device and t.dtype == first.dtype
        for t in tensors
    )
    return stack(tensors) if uniform else None


def _plain_linear(head: nn.Module) -> bool:
    """An ``nn.Linear`` with the stock forward: a materialised lazy head counts too (it stays
    an ``nn.LazyLinear`` until its first call when its parameters were loaded)."""
    if type(head) is nn.LazyLinear:
        return not head.has_uninitialized_params()
    return type(head) is nn.Linear


def stackable(
    heads: Mapping[str, nn.Module] | nn.ModuleDict, features: Mapping[str, torch.Tensor]
) -> bool:
    """Whether the heads are plain linear layers of one shape and the features one shape,
    all on one device and dtype."""
    modules = list(heads.values())
    tensors = list(features.values())
    first, feature = modules[0], tensors[0]
    if not all(_plain_linear(h) and h.bias is not None for h in modules):
        return False
    shape, device, dtype = first.weight.shape, feature.device, feature.dtype
    return all(
        h.weight.shape == shape and h.weight.device == device and h.weight.dtype == dtype
        for h in modules
    ) and all(t.shape == feature.shape and t.device == device and t.dtype == dtype for t in tensors)


def stacked_head_logits(
    heads: Mapping[str, nn.Module] | nn.ModuleDict, stacked: torch.Tensor, detach: bool
) -> torch.Tensor:
    """``(M, B, K)``: every head on its feature, as one batched ``baddbmm``.

    ``stacked`` holds the M features, ``(M, B, D)``, in the heads' order (see
    :func:`stack_if_uniform`). Call only when :func:`stackable` holds. ``detach`` cuts the
    features from the graph (stop-gradient probes).

    Example:
        >>> heads = {"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)}
        >>> feats = {"a": torch.randn(2, 4), "b": torch.randn(2, 4)}
        >>> out = stacked_head_logits(heads, stack_if_uniform(feats), detach=False)
        >>> torch.allclose(out[1], heads["b"](feats["b"]), atol=1e-6)
        True
    """
    if detach:
        stacked = stacked.detach()
    linears = [h for h in heads.values() if isinstance(h, nn.Linear)]
    weights = stack([h.weight for h in linears])
    biases = stack([h.bias for h in linears])
    return torch.baddbmm(biases.unsqueeze(1), stacked, weights.transpose(1, 2))


def separate_head_logits(
    heads: Mapping[str, nn.Module] | nn.ModuleDict,
    features: Mapping[str, torch.Tensor],
    detach: bool,
) -> dict[str, torch.Tensor]:
    """``{name: (B, K)}``: each head on its own feature."""
    return {
        name: heads[name](feature.detach() if detach else feature)
        for name, feature in features.items()
    }


def head_logits(
    heads: Mapping[str, nn.Module] | nn.ModuleDict,
    features: Mapping[str, torch.Tensor],
    stacked: torch.Tensor | None,
    detach: bool,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor] | None]:
    """Every head's logits: ``(stacked (M, B, K), None)`` or ``(None, {name: (B, K)})``.

    Batched when the features were stacked (``stacked``, see :func:`stack_if_uniform`) and
    :func:`stackable` holds.
    """
    if stacked is not None and stackable(heads, features):
        return stacked_head_logits(heads, stacked, detach), None
    return None, separate_head_logits(heads, features, detach)


def prepare_heads(
    heads: Mapping[str, nn.Module] | nn.ModuleDict, features: Mapping[str, torch.Tensor]
) -> None:
    """Make each head ready for its feature: on its device, materialised, of its dtype.

    A lazy head is materialised outside inference mode (so a first ``loss()`` under
    ``torch.inference_mode()`` does not turn its parameters into inference tensors); a head
    follows its feature's floating dtype (``model.double()`` after the balancer) unless
    autocast chooses the dtypes.

    Raises:
        DeviceError: a head is on another device than its feature.
    """
    for name, head in heads.items():
        feature = features[name]
        weight = next(iter(head.parameters()), None)
        if weight is None:
            continue
        if weight.device != feature.device:
            raise DeviceError(
                f"encoder {name!r} produced its output on {feature.device} but the "
                f"balancer's head for it is on {weight.device}: move the model to its "
                "device(s) before creating the balancer, or move the balancer too "
                "(bal.to(device))"
            )
        if isinstance(weight, nn.parameter.UninitializedParameter):
            with torch.inference_mode(False), torch.no_grad():
                head(torch.zeros(1, feature.shape[1], device=feature.device))
            weight = next(iter(head.parameters()))
        autocast = torch.is_autocast_enabled(feature.device.type)
        if feature.is_floating_point() and weight.dtype != feature.dtype and not autocast:
            head.to(feature.dtype)
