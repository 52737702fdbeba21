"""Validation of everything a balancer is constructed with, before anything is attached.

Every validator raises :class:`~gradbalance.errors.ConfigurationError` (a ``ValueError``) or
:class:`~gradbalance.errors.InputTypeError` (a ``TypeError``) with a message that says what
was wrong and how to fix it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradbalance.errors import WRAP_ORDER, ConfigurationError, InputError, InputTypeError

POOLS: tuple[str, ...] = ("spatial", "tokens", "cls")
SYNCS: tuple[str, ...] = ("global", "local")
NONFINITE: tuple[str, ...] = ("raise", "skip")
WINDOW_UNITS: tuple[str, ...] = ("epoch", "step")

EMPTY_BATCH = (
    "loss() got an empty batch (B = 0): no statistic is defined on it; skip empty batches in "
    "your loop (e.g. DataLoader(..., drop_last=True) with a small dataset)"
)
"""The error message of an empty batch, shared by every task."""


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    strict: bool = False,
    maximum: float | None = None,
) -> float:
    """A finite real number within bounds, as a float.

    Args:
        name: the option's name, for the message.
        value: what the user passed.
        minimum: lower bound (inclusive unless ``strict``).
        strict: the lower bound is exclusive.
        maximum: inclusive upper bound.

    Raises:
        ConfigurationError: not a real number (bools refused), NaN, infinite or out of bounds.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigurationError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        bound = ">" if strict else ">="
        raise ConfigurationError(f"{name} must be {bound} {minimum:g}, got {value:g}")
    if maximum is not None and value > maximum:
        raise ConfigurationError(f"{name} must be <= {maximum:g}, got {value:g}")
    return value


def check_int(name: str, value: Any, minimum: int) -> int:
    """An int (bools refused) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> Any:
    """One of ``choices``."""
    if value not in choices:
        raise ConfigurationError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_alpha(alpha: Any) -> float:
    """The strength of a method's modulation: a finite number >= 0."""
    return check_number("alpha", alpha, minimum=0.0)


def check_window(window: Any, unit: Any) -> tuple[int, int | None]:
    """A modulation window ``(start, end)`` (inclusive; ``end=None`` never ends) and its unit."""
    check_choice("window_unit", unit, WINDOW_UNITS)
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ConfigurationError(f"window must be a pair (start, end), got {window!r}")
    start, end = window
    check_int("the window start", start, 0)
    if end is not None and (isinstance(end, bool) or not isinstance(end, int) or end < start):
        raise ConfigurationError(
            f"the window end must be None or an int >= start ({start}), got {end!r}"
        )
    return start, end


def per_encoder(value: Any, names: Sequence[str], option: str) -> dict[str, Any]:
    """Expand an option given once, as a list (encoder order) or as a dict, to every encoder."""
    if isinstance(value, Mapping):
        unknown = set(value) - set(names)
        if unknown:
            raise ConfigurationError(
                f"{option} names unknown encoders {sorted(unknown)}; known: {list(names)}"
            )
        return {name: value.get(name) for name in names}
    if isinstance(value, (list, tuple)):
        if len(value) != len(names):
            raise ConfigurationError(f"{option} has {len(value)} entries for {len(names)} encoders")
        return dict(zip(names, value))
    return dict.fromkeys(names, value)


def check_weights(option: str, value: Any, names: Sequence[str]) -> dict[str, float]:
    """Loss weights given once or per encoder: finite numbers >= 0."""
    weights = per_encoder(value, names, option)
    return {
        name: check_number(f"loss weight {option} for {name!r}", weight, minimum=0.0)
        for name, weight in weights.items()
    }


def check_pools(pool: Any, names: Sequence[str]) -> dict[str, str | None]:
    """``pool=`` once or per encoder: None (automatic) or one of :data:`POOLS`."""
    pools = per_encoder(pool, names, "pool")
    for name, choice in pools.items():
        if choice is not None and choice not in POOLS:
            raise ConfigurationError(
                f"pool for {name!r} must be one of {POOLS} or None, got {choice!r}"
            )
    return pools


def check_feature_functions(features: Any, names: Sequence[str]) -> dict[str, Any]:
    """``features=`` once or per encoder: None or a callable ``output -> (B, D)``."""
    functions = per_encoder(features, names, "features")
    for name, function in functions.items():
        if function is not None and not callable(function):
            raise InputTypeError(
                f"features for {name!r} must be a callable output -> (B, D) tensor, "
                f"got {type(function).__name__}"
            )
    return functions


def check_feature_dims(feature_dims: Any, names: Sequence[str]) -> dict[str, int | None]:
    """``feature_dims=`` once or per encoder: None (inferred at the first forward) or int >= 1."""
    dims = per_encoder(feature_dims, names, "feature_dims")
    for name, dim in dims.items():
        if dim is not None:
            check_int(f"feature_dims for {name!r}", dim, 1)
    return dims


def check_fusion_head(head: Any) -> None:
    """A late-linear fused head whose per-modality slices can be read, or None."""
    if head is None:
        return
    if callable(getattr(head, "modality_logits", None)) or isinstance(head, nn.Linear):
        return
    raise InputTypeError(
        "fusion_head must be an nn.Linear over the concatenated features (in encoder order) or "
        "a module with modality_logits(*features) -> list of (B, K) tensors (e.g. "
        f"gb.MMCosineHead); got {type(head).__name__}. For other fusions leave fusion_head=None "
        "(detached probe heads are used)"
    )


def refuse_wrapped(model: nn.Module) -> None:
    """Refuse a model already wrapped by DDP, DataParallel or torch.compile."""
    wrapped = isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))
    if wrapped or hasattr(model, "_orig_mod"):
        raise ConfigurationError(
            f"the model is already wrapped ({type(model).__name__}). Create the balancer on the "
            f"plain model first, then wrap, in this order: {WRAP_ORDER}. nn.DataParallel is not "
            "supported (use DDP)."
        )


def module_names(model: nn.Module) -> dict[int, str]:
    """``id(module) -> name`` of every submodule: its qualified name with dots as underscores
    (``backbone.audio`` -> ``backbone_audio``), the name a balancer gives an encoder."""
    return {id(module): name.replace(".", "_") for name, module in model.named_modules()}


def resolve_encoders(
    model: nn.Module, encoders: Sequence[nn.Module] | Mapping[str, nn.Module]
) -> dict[str, nn.Module]:
    """Check the encoders against the model and name them.

    A list is named by each module's qualified name in ``model.named_modules()`` (dots
    become underscores: ``backbone.audio`` -> ``backbone_audio``); a dict gives the names.

    Raises:
        InputTypeError: ``model`` or an encoder is not an ``nn.Module``.
        ConfigurationError: the model is already wrapped (DDP, DataParallel, torch.compile);
            fewer than two encoders; an encoder outside the model, repeated, nested in
            another, or the model itself; an invalid name.
    """
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    refuse_wrapped(model)
    if isinstance(encoders, nn.Module):
        raise InputTypeError("encoders must be a list or dict of modules, not a single module")
    if isinstance(encoders, Mapping):
        pairs = list(encoders.items())
    else:
        names = module_names(model)
        pairs = [(names.get(id(module), ""), module) for module in encoders]
    if len(pairs) < 2:
        raise ConfigurationError(
            f"balancing needs at least two encoders (one per modality), got {len(pairs)}"
        )
    in_model = {id(module) for module in model.modules()}
    resolved: dict[str, nn.Module] = {}
    for name, module in pairs:
        if not isinstance(module, nn.Module):
            raise InputTypeError(
                f"encoder {name!r} must be an nn.Module, got {type(module).__name__}"
            )
        if module is model:
            raise ConfigurationError(
                "an encoder cannot be the whole model; pass its per-modality parts"
            )
        if id(module) not in in_model:
            raise ConfigurationError(
                f"encoder {name or type(module).__name__!r} is not a submodule of the model; "
                "pass modules reached by model.named_modules()"
            )
        if not isinstance(name, str) or not name or "." in name:
            raise ConfigurationError(
                f"encoder names must be non-empty strings without '.', got {name!r}"
            )
        if any(module is other for other in resolved.values()):
            raise ConfigurationError(f"encoder {name!r} is listed twice")
        if name in resolved:
            raise ConfigurationError(f"two encoders are named {name!r}")
        resolved[name] = module
    refuse_nested(resolved)
    return resolved


def refuse_nested(encoders: Mapping[str, nn.Module]) -> None:
    """Refuse an encoder nested inside another."""
    for name, module in encoders.items():
        inner = {id(sub) for sub in module.modules() if sub is not module}
        for other_name, other in encoders.items():
            if id(other) in inner:
                raise ConfigurationError(
                    f"encoder {other_name!r} is nested inside encoder {name!r}; "
                    "encoders must be disjoint submodules"
                )


@dataclass(frozen=True)
class CommonOptions:
    """The validated options every balancer takes."""

    encoders: dict[str, nn.Module]
    pools: dict[str, str | None]
    features: dict[str, Any]
    dims: dict[str, int | None]


def check_common(
    model: Any,
    encoders: Any,
    num_classes: Any,
    feature_dims: Any,
    pool: Any,
    features: Any,
    flush_every: Any,
    sync: Any,
    nonfinite: Any,
) -> CommonOptions:
    """Validate the options of :class:`~gradbalance.Balancer` (see its docstring)."""
    if num_classes is not None:  # None: a regression task (checked by the task)
        check_int("num_classes", num_classes, 2)
    check_choice("sync", sync, SYNCS)
    check_choice("nonfinite", nonfinite, NONFINITE)
    check_int("flush_every", flush_every, 1)
    resolved = resolve_encoders(model, encoders)
    names = list(resolved)
    return CommonOptions(
        resolved,
        check_pools(pool, names),
        check_feature_functions(features, names),
        check_feature_dims(feature_dims, names),
    )


def check_loss_inputs(logits: Any, target: Any, num_classes: int) -> torch.Tensor:
    """Check ``loss(logits, target)``'s arguments; the labels as ``torch.long``.

    Labels out of range are checked on the device (``torch._assert_async``, no host sync).

    Raises:
        InputTypeError: not tensors; integer logits; non-integer labels.
        InputError: logits not ``(B, num_classes)``; an empty batch; labels of another
            shape or device.
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise InputTypeError("loss(logits, target) takes two tensors")
    if logits.dim() != 2 or logits.shape[1] != num_classes:
        raise InputError(
            f"logits must have shape (B, num_classes={num_classes}), got {tuple(logits.shape)}"
        )
    if logits.shape[0] == 0:
        raise InputError(EMPTY_BATCH)
    if not logits.is_floating_point():
        raise InputTypeError(f"logits must be floating point, got {logits.dtype}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise InputTypeError(
            f"target must hold integer class indices (torch.long), got {target.dtype}"
        )
    if target.shape != logits.shape[:1]:
        raise InputError(
            f"target must have shape ({logits.shape[0]},) to match the logits, "
            f"got {tuple(target.shape)}"
        )
    if target.device != logits.device:
        raise InputError(
            f"target is on {target.device} but the logits are on {logits.device}: move the "
            "labels to the logits' device (target.to(logits.device))"
        )
    in_range = ((target >= 0) & (target < num_classes)).all()
    torch._assert_async(in_range, f"target labels must lie in [0, {num_classes})")
    return target.long()


def check_scaled_parameters(
    parameters: Mapping[str, Any], encoders: Mapping[str, nn.Module], inside_allowed: bool
) -> dict[str, list[torch.Tensor]]:
    """``{modality: parameters}`` whose gradients that modality's coefficient also scales.

    Raises:
        ConfigurationError: an unknown modality; a parameter listed twice; a parameter inside
            its encoder (already scaled) unless ``inside_allowed``.
        InputTypeError: an entry that is not a tensor.
    """
    seen: set[int] = set()
    selected: dict[str, list[torch.Tensor]] = {}
    for name, params in parameters.items():
        if name not in encoders:
            raise ConfigurationError(f"unknown modality {name!r}; known: {list(encoders)}")
        inside = {id(p) for p in encoders[name].parameters()}
        for param in params:
            if not isinstance(param, torch.Tensor):
                raise InputTypeError(
                    f"parameters for {name!r} must be tensors, got {type(param).__name__}"
                )
            if id(param) in seen:
                raise ConfigurationError("a parameter is listed for more than one modality")
            if id(param) in inside and not inside_allowed:
                raise ConfigurationError(
                    f"a parameter listed for {name!r} is inside that encoder; its gradient is "
                    "scaled already"
                )
            seen.add(id(param))
            selected.setdefault(name, []).append(param)
    return selected


def upgrade_state_dict(
    state_dict: Mapping[str, Any], prefix: str, names: Sequence[str]
) -> Mapping[str, Any]:
    """A balancer state dict of the first release (one ``coefficient_<name>`` buffer per
    encoder) in the current layout (one ``last_coefficients`` buffer); others unchanged."""
    old = [f"{prefix}coefficient_{name}" for name in names]
    if f"{prefix}last_coefficients" in state_dict or not all(k in state_dict for k in old):
        return state_dict
    upgraded = {k: v for k, v in state_dict.items() if k not in old}
    upgraded[f"{prefix}last_coefficients"] = torch.stack([state_dict[k] for k in old])
    return upgraded
