"""Validation of ``loss(..., present=)``: the per-sample mask of present modalities."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from gradbalance.errors import InputError

PRESENT_FORM = (
    "present= must be a (B, M) bool tensor (columns in encoder order) or a dict name -> (B,) bool "
    "tensor naming every encoder, on the logits' device"
)
"""The expected form of ``loss(..., present=)``, quoted by every message about it."""


def check_present(
    present: Any, names: Sequence[str], batch_size: int, device: torch.device
) -> torch.Tensor | None:
    """``loss(..., present=)`` as a ``(B, M)`` bool tensor (``None``: every sample has every
    modality).

    A sample with every modality absent is refused: on the CPU with its index; on an
    accelerator by a device-side assertion (no host synchronisation), as out-of-range labels.

    Raises:
        InputError: not a tensor or dict; a shape, dtype or device other than the expected
            form; a dict naming an unknown encoder or leaving one out; a sample with every
            modality absent (on the CPU).
    """
    if present is None:
        return None
    expected = f"{PRESENT_FORM} (encoders: {list(names)}, B = {batch_size})"
    if isinstance(present, Mapping):
        unknown = [name for name in present if name not in names]
        left_out = [name for name in names if name not in present]
        if unknown or left_out:
            raise InputError(
                f"{expected}; the dict names unknown encoders {unknown} and leaves out "
                f"{left_out} (an always-present modality: torch.ones(B, dtype=torch.bool))"
            )
        columns = [present[name] for name in names]
        if not all(isinstance(c, torch.Tensor) and c.shape == (batch_size,) for c in columns):
            shapes = [
                tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
                for c in columns
            ]
            raise InputError(f"{expected}; got entries of shapes {shapes}")
        _check_present_tensor(columns, expected, device)
        present = torch.stack(columns, dim=1)
    elif isinstance(present, torch.Tensor):
        if present.shape != (batch_size, len(names)):
            raise InputError(f"{expected}; got shape {tuple(present.shape)}")
        _check_present_tensor([present], expected, device)
    else:
        raise InputError(f"{expected}; got {type(present).__name__}")
    _refuse_all_absent(present)
    return present


def _check_present_tensor(
    tensors: Sequence[torch.Tensor], expected: str, device: torch.device
) -> None:
    for tensor in tensors:
        if tensor.dtype != torch.bool:
            raise InputError(f"{expected}; got dtype {tensor.dtype} (a mask: present.bool())")
        if tensor.device != device:
            raise InputError(
                f"{expected}; got a mask on {tensor.device} for logits on {device} "
                "(present.to(logits.device))"
            )


ALL_ABSENT = (
    "present= marks every modality absent for a sample: it carries no information, drop it "
    "from the batch"
)
"""The start of the message of a sample with every modality absent."""


def _refuse_all_absent(present: torch.Tensor) -> None:
    """Refuse a sample with no modality present, by a device-side assertion (no host
    synchronisation); on the CPU the assertion fails at once and the message gives the indices."""
    empty = ~present.any(dim=1)
    if present.device.type != "cpu":
        torch._assert_async(
            ~empty.any(),
            f"{ALL_ABSENT}; find it with (~present.any(dim=1)).nonzero() (or run on the CPU)",
        )
        return
    try:
        torch._assert_async(~empty.any(), ALL_ABSENT)
    except RuntimeError:
        rows = empty.nonzero().flatten().tolist()
        more = " ..." if len(rows) > 10 else ""
        raise InputError(f"{ALL_ABSENT} (samples {rows[:10]}{more})") from None
