"""OPM's per-sample feature dropping: counter-based uniforms and a masked model branch.

The uniforms come from a stateless integer hash of ``(seed, counter, stream, sample index)``
(Wellons' "lowbias32" 32-bit mixer, with 32-bit products split in 16-bit halves so int64
never overflows). Unlike a ``torch.Generator`` they are the same in eager mode and under
``torch.compile`` (the hash is ordinary tensor arithmetic, traced without a graph break),
the same on every rank for the same counter, and need no state but the counter, a 0-dim
int64 tensor that a method keeps with ``add_state`` (so a checkpoint resumes the draws).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gradbalance._tree import map_tensors

MASK32 = 0xFFFFFFFF
Watch = Callable[[torch.Tensor], None]


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x * constant mod 2**32`` for ``0 <= x < 2**32`` held in int64 (no overflow)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32: a bijection of 32-bit integers with a strong avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_uniform(
    seed: int,
    counter: torch.Tensor,
    stream: int,
    n: int,
    device: torch.device | None = None,
    first: int = 0,
) -> torch.Tensor:
    """``n`` float32 uniforms in ``[0, 1)`` determined by ``(seed, counter, stream)``, those of
    the sample indices ``first, ..., first + n - 1``.

    Args:
        seed: a non-negative int (the method's ``seed``).
        counter: 0-dim int64 tensor (a draw counter, advanced by its owner).
        stream: a non-negative int separating the draws of one counter (a modality index).
        n: how many numbers (one per sample).
        device: where to return them (default: the counter's device).
        first: the index of the first sample (a rank's offset in the global batch).

    Example:
        >>> u = hash_uniform(0, torch.tensor(3), 1, 4)
        >>> u.shape, bool(((u >= 0) & (u < 1)).all())
        (torch.Size([4]), True)
        >>> torch.equal(u, hash_uniform(0, torch.tensor(3), 1, 4))
        True
        >>> torch.equal(u[2:], hash_uniform(0, torch.tensor(3), 1, 2, first=2))
        True
    """
    device = counter.device if device is None else device
    c = counter.to(device=device, dtype=torch.int64)
    key = _mix32(torch.full((), seed & MASK32, dtype=torch.int64, device=device))
    key = _mix32(key ^ (c & MASK32))
    key = _mix32(key ^ ((c >> 32) & MASK32))
    key = _mix32(key ^ (stream & MASK32))
    bits = _mix32(key ^ torch.arange(first, first + n, dtype=torch.int64, device=device))
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


class _KeepMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor, watch: Watch | None) -> torch.Tensor:
        ctx.watch = watch
        # An attribute, not save_for_backward: activation checkpointing (use_reentrant=False)
        # counts the saved tensors of the encoder's call, and its recomputation in backward()
        # runs no drop.
        ctx.keep = keep
        return x * keep

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if ctx.watch is not None:
            ctx.watch(grad)
        return grad * ctx.keep, None, None


def _per_sample(keep: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``keep`` ``(B,)`` shaped to broadcast over ``tensor``'s leading (batch) dimension."""
    view = keep.to(device=tensor.device, dtype=tensor.dtype)
    return view.reshape(-1, *([1] * (tensor.dim() - 1)))


def drop_samples(
    output: Any, keep: Callable[[int], torch.Tensor], watch: Watch | None, name: str
) -> Any:
    """Encoder ``name``'s output with each floating tensor multiplied by ``keep(B)`` along its
    first dimension (``B`` that tensor's batch size); the gradient into the encoder is
    multiplied by the same factors and handed to ``watch`` (the non-finite guard) first.
    Other tensors pass unchanged."""

    def masked(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point() or tensor.dim() == 0:
            return tensor
        factors = _per_sample(keep(tensor.shape[0]), tensor)
        if not tensor.requires_grad:
            return tensor * factors
        return _KeepMask.apply(tensor, factors, watch)

    return map_tensors(masked, output, name)
