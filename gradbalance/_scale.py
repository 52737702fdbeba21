"""The gradient-scaling mechanism: an identity autograd Function and the encoder tap.

``scale_grad(x, k)`` is the identity in the forward pass and multiplies the incoming gradient
by ``k`` in the backward pass. ``k`` is a 0-dim tensor that may be written in place *after*
the forward (it is read from ``ctx`` when the backward runs, never saved with
``save_for_backward``, whose version counter would reject the later write). By linearity,
scaling the gradient that flows into an encoder's output by ``k`` equals multiplying the
gradient of every parameter reached only through that encoder by ``k``; it costs one
element-wise multiply per encoder, runs before DDP's all-reduce and compiles without graph
breaks (see ANCHORS.md §2.4–§2.6).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.hooks import RemovableHandle


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        ctx.k = k
        # A clone, not a view: the model may modify the encoder output in place
        # (e.g. ReLU(inplace=True)), which autograd forbids on views made by a custom Function.
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # ``k`` lives on the encoder's (first parameter's) device; the gradient may arrive on
        # another one (an encoder spread over devices). A device-to-device copy, no host sync.
        return grad * ctx.k.to(device=grad.device, dtype=grad.dtype), None


def scale_grad(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Identity in the forward pass; the backward multiplies the gradient by ``k``.

    Tensors that do not require a gradient (inference, frozen inputs) are returned unchanged.
    """
    if not x.requires_grad:
        return x
    return _ScaleGrad.apply(x, k)


def scale_grad_tree(output: Any, k: torch.Tensor) -> Any:
    """Apply :func:`scale_grad` to every floating-point tensor leaf of a (nested) output."""
    return pytree.tree_map_only(torch.Tensor, lambda t: scale_grad(t, k), output)


DATA_PARALLEL_REFUSED = (
    "nn.DataParallel is not supported: it runs replicas of the model in threads, so one "
    "balancer would see several partial batches per step. Use DistributedDataParallel "
    "(torchrun) instead, in this order: bal = gb.MLB(model, ...); model = DDP(model); "
    "model = torch.compile(model)"
)


class EncoderTap:
    """A forward hook on one encoder: scales its output's gradient and hands the output on.

    An encoder run by ``nn.DataParallel`` (a replica made for a forward) is refused with a
    ``RuntimeError``: its threads would race on the captured outputs.

    Args:
        encoder: the module to tap.
        coefficient: returns the 0-dim float32 buffer by which the gradient into the encoder's
            output is multiplied (its value at backward time counts).
        on_output: called with the encoder's raw (unscaled) output after every forward.
        scale_output: whether to insert the gradient scaling into the model's data path.
    """

    def __init__(
        self,
        encoder: nn.Module,
        coefficient: Callable[[], torch.Tensor],
        on_output: Callable[[Any], None],
        scale_output: bool = True,
    ) -> None:
        self.coefficient = coefficient
        self.on_output = on_output
        self.scale_output = scale_output
        self.handle: RemovableHandle = encoder.register_forward_hook(self)

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if not torch.compiler.is_compiling() and getattr(module, "_is_replica", False):
            raise RuntimeError(DATA_PARALLEL_REFUSED)
        self.on_output(output)
        if self.scale_output:
            return scale_grad_tree(output, self.coefficient())
        return None

    def remove(self) -> None:
        self.handle.remove()
