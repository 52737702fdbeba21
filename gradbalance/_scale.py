"""The gradient-scaling mechanism: an identity autograd Function and per-forward coefficients.

``scale_grad(x, k)`` is the identity in the forward pass (it returns a copy) and multiplies
the incoming gradient by ``k`` in the backward pass. ``k`` is a 0-dim tensor that may be
written in place *after* the forward: it is read from ``ctx`` when the backward runs, never
saved with ``save_for_backward``, whose version counter would reject the later write. By
linearity, scaling the gradient that flows into an encoder's output by ``k`` equals
multiplying the gradient of every parameter reached only through that encoder by ``k``; it
costs one element-wise multiply per encoder, runs before DDP's all-reduce and compiles
without graph breaks.

Each forward of the model is bound to its own :class:`Binding`: the M coefficients that its
``loss()`` computes are written into that binding, and the backward of that forward's graph
reads them there. Two forward/``loss()`` pairs summed before one ``backward()`` are thus each
scaled by their own coefficients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gradbalance._tree import map_tensors
from gradbalance.errors import CaptureError

GradientWatch = Callable[[torch.Tensor], None]


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, k: torch.Tensor | None, watch: GradientWatch | None
    ) -> torch.Tensor:
        ctx.k = k
        ctx.watch = watch
        # A copy, not a view: the model may change the encoder output in place afterwards
        # (e.g. ReLU(inplace=True)), which autograd forbids on views made by a custom
        # Function, and the balancer's heads must see the output as the encoder returned it.
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if ctx.watch is not None:
            ctx.watch(grad)
        if ctx.k is None:
            return grad, None, None
        # ``k`` lives on the balancer's device; the gradient may arrive on another one (an
        # encoder spread over devices) or in another dtype. No host synchronisation.
        return grad * ctx.k.to(device=grad.device, dtype=grad.dtype), None, None


def scale_grad(
    x: torch.Tensor, k: torch.Tensor | None, watch: GradientWatch | None = None
) -> torch.Tensor:
    """Identity (a copy) in the forward pass; the backward multiplies the gradient by ``k``.

    Args:
        x: the tensor whose gradient is scaled.
        k: 0-dim (or broadcastable) coefficient read when the backward runs; ``None`` leaves
            the gradient unchanged.
        watch: called with the incoming gradient during the backward (non-finite guard).

    A tensor that does not require a gradient is copied if floating point (so later
    in-place changes never reach what the balancer captured) and returned unchanged
    otherwise.

    Example:
        >>> x = torch.ones(3, requires_grad=True)
        >>> k = torch.tensor(1.0)
        >>> y = scale_grad(x, k)
        >>> _ = k.fill_(2.0)          # written after the forward, read by the backward
        >>> y.sum().backward()
        >>> x.grad
        tensor([2., 2., 2.])
    """
    if not x.requires_grad:
        return x.clone() if x.is_floating_point() else x
    return _ScaleGrad.apply(x, k, watch)


def scale_grad_tree(
    output: Any, k: torch.Tensor | None, name: str, watch: GradientWatch | None = None
) -> Any:
    """Apply :func:`scale_grad` to every tensor of encoder ``name``'s (nested) output
    (containers and dataclasses are walked, see :func:`gradbalance._tree.map_tensors`)."""
    return map_tensors(lambda t: scale_grad(t, k, watch), output, name)


class Binding:
    """The M coefficients of one forward of the model, written by that forward's ``loss()``.

    ``values`` is a float32 ``(M,)`` tensor; ``views[m]`` is its 0-dim view that encoder m's
    tap hands to :func:`scale_grad`. A new binding starts from the coefficients of the last
    training step (so a backward of a forward whose ``loss()`` wrote nothing applies those).

    Example:
        >>> b = Binding(torch.ones(2))
        >>> b.write(torch.tensor([0.5, 2.0]))
        >>> b.views[1]
        tensor(2.)
    """

    __slots__ = ("values", "views")

    def __init__(self, values: torch.Tensor) -> None:
        self.values = values
        self.views: tuple[torch.Tensor, ...] = values.unbind()

    def write(self, coefficients: torch.Tensor) -> None:
        """Write this forward's coefficients (in place: the graph holds the views)."""
        self.values.copy_(coefficients)


_GRAPH_TASK_ID = getattr(torch._C, "_current_graph_task_id", None)


def in_backward() -> bool:
    """Whether autograd runs a backward (activation checkpointing recomputes forwards there)."""
    return _GRAPH_TASK_ID is not None and _GRAPH_TASK_ID() != -1


class BackwardBindings:
    """Which forwards' bindings the running backward covers, for per-parameter scaling.

    A gradient hook on a parameter sees the sum over every use of the parameter, so it
    cannot tell two forwards apart: it applies the binding of the one ``loss()`` whose
    backward runs, or refuses (``CaptureError``) when two summed losses share one backward.
    Each returned loss gets :meth:`loss_hook`, which fires when the backward reaches it.
    """

    def __init__(self) -> None:
        self.task = -1
        self.bindings: list[Binding] = []
        self.latest: Binding | None = None

    def loss_hook(self, binding: Binding) -> Callable[[torch.Tensor], None]:
        """The hook to register on the loss computed with ``binding``."""
        self.latest = binding

        def reached(grad: torch.Tensor) -> None:
            task = _GRAPH_TASK_ID() if _GRAPH_TASK_ID is not None else -1
            if task != self.task:
                self.task, self.bindings = task, [binding]
            elif all(b is not binding for b in self.bindings):
                self.bindings.append(binding)

        return reached

    def coefficient(self, index: int) -> torch.Tensor | None:
        """k_index of the running backward's loss (the latest when no loss was reached)."""
        current = _GRAPH_TASK_ID() if _GRAPH_TASK_ID is not None else -1
        covered = self.bindings if self.task == current else []
        if len(covered) > 1:
            raise CaptureError(
                "two loss() results are summed into one backward while gradients are scaled "
                "per parameter (extra_parameters=, OGM parameters='conv'), whose coefficient "
                "cannot be told apart per loss: call one backward per loss() (gradient "
                "accumulation works)"
            )
        binding = covered[0] if covered else self.latest
        return None if binding is None else binding.views[index]

    def scale(self, index: int, grad: torch.Tensor) -> torch.Tensor:
        """The gradient hook of a parameter of modality ``index``: ``grad * k_index``."""
        k = self.coefficient(index)
        if k is None:
            return grad
        return grad * k.to(device=grad.device, dtype=grad.dtype)
