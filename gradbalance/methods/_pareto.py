"""MMPareto's gradient combination at an encoder's output: a two-branch autograd Function.

:func:`pareto_fork` returns two copies of an encoder's output: one for the model (its fused
loss) and one for the balancer's unimodal head. In the backward pass the Function receives
both gradient streams at once, ``g_mm`` (multimodal) and ``g_uni`` (unimodal), and returns
their MMPareto combination (Wei & Hu, ICML 2024):

* per encoder, over the whole batch-flattened output: ``dot = <g_mm, g_uni>``, ``|g_mm|^2``,
  ``|g_uni|^2`` (three scalars; under torch.distributed all-reduced, so the decision and the
  magnitudes are those of the global batch);
* conflict (``dot < 0``): ``c = 2 (a g_mm + (1 - a) g_uni)`` with ``a`` the two-task min-norm
  (MGDA) weight; no conflict: ``c = g_mm + g_uni`` (:func:`mmpareto_weights`);
* magnitude: ``c`` is scaled up to ``|g_mm + g_uni|`` when it is shorter, then by ``gamma``
  (the authors' code: ``max(|g_mm + g_uni| / |c|, 1) * gamma * c``, gamma = 1.5).

Missing modalities (``loss(..., present=)``): the three sums run over the samples where the
modality is present (batch rows of the output), the combination is applied to those rows, and
the rows of absent samples, which have no unimodal gradient, keep ``g_mm`` (as Multi-Loss
gives them).

Norms of ``c`` and of the sum come from the three scalars in closed form; nothing synchronises
with the host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gradbalance._tree import map_tensors
from gradbalance.methods._loss_weights import mmpareto_weights

Reduce = Callable[[torch.Tensor], torch.Tensor]
Watch = Callable[[torch.Tensor], None]


@dataclass
class ParetoSite:
    """What encoder ``index``'s fork needs in its backward pass.

    ``cosines``/``conflicts`` are the method's ``(M,)`` buffers (written in place);
    ``reduce`` maps the local ``(3,)`` sums to global ones (None: local batch only);
    ``present`` is the ``(B,)`` mask of the samples with this modality, set by the method's
    ``loss()`` before the backward pass (None: all); ``shapes`` are those of the forked tensors.
    """

    index: int
    gamma: float
    cosines: torch.Tensor
    conflicts: torch.Tensor
    reduce: Reduce | None = None
    watch: Watch | None = None
    present: torch.Tensor | None = None
    shapes: list[torch.Size] = field(default_factory=list)


def pareto_combination(
    g_multimodal: torch.Tensor,
    g_unimodal: torch.Tensor,
    gamma: float,
    reduce: Reduce | None = None,
    present: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined gradient and the ``(3,)`` statistics ``(dot, |g_mm|^2, |g_uni|^2)``.

    With ``present`` (``(B,)`` bool over the first dimension) the statistics and the
    combination use the present rows only; the absent rows keep ``g_multimodal``.

    Example:
        >>> g_mm, g_uni = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
        >>> combined, stats = pareto_combination(g_mm, g_uni, gamma=1.0)
        >>> combined, stats
        (tensor([0.4472, 0.8944]), tensor([-1.,  1.,  2.]))
        >>> rows = torch.tensor([True, False])
        >>> pareto_combination(torch.stack([g_mm, g_mm]), torch.stack([g_uni, g_uni]), 1.0,
        ...                    present=rows)[0]
        tensor([[0.4472, 0.8944],
                [1.0000, 0.0000]])
    """
    dtype = torch.promote_types(g_multimodal.dtype, torch.float32)  # float32 or float64
    g1, g2 = g_multimodal.to(dtype), g_unimodal.to(dtype)
    rows = None
    if present is not None:
        rows = present.to(g1.device).view(-1, *([1] * (g1.dim() - 1)))
        g1, g2 = torch.where(rows, g1, 0), torch.where(rows, g2, 0)
    stats = torch.stack([(g1 * g2).sum(), g1.square().sum(), g2.square().sum()])
    if reduce is not None:
        stats = reduce(stats)
    dot, n1, n2 = stats.unbind()
    a = mmpareto_weights(dot, n1, n2)
    a1, a2 = 2 * a[0], 2 * a[1]
    combined = a1 * g1 + a2 * g2
    norm_combined = (a1 * a1 * n1 + a2 * a2 * n2 + 2 * a1 * a2 * dot).clamp_min(0)
    norm_sum = (n1 + n2 + 2 * dot).clamp_min(0)
    ratio = torch.sqrt(norm_sum / norm_combined.clamp_min(torch.finfo(dtype).tiny))
    factor = torch.where(norm_combined > 0, ratio.clamp_min(1.0), torch.ones_like(ratio)) * gamma
    if rows is None:
        return combined * factor, stats
    return torch.where(rows, combined * factor, g_multimodal.to(dtype)), stats


class _ParetoFork(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, site: ParetoSite) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.site = site
        # The model's copy may be changed in place afterwards (ReLU(inplace=True)); the head's
        # branch is a view, read only by the balancer's heads.
        return x.clone(), x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g_model: torch.Tensor, g_head: torch.Tensor) -> tuple[Any, None]:
        site: ParetoSite = ctx.site
        combined, stats = pareto_combination(
            g_model, g_head, site.gamma, site.reduce, site.present
        )
        with torch.no_grad():
            dot, n1, n2 = stats.unbind()
            cosine = dot / torch.sqrt(n1 * n2).clamp_min(torch.finfo(dot.dtype).tiny)
            # A non-finite backward (a skipped step) leaves the statistics as they were; so does
            # a modality without a present sample in the (global) batch (nothing measured).
            finite = torch.isfinite(stats).all()
            if site.present is not None:
                finite = finite & (n1 + n2 > 0)
            finite = finite.to(site.cosines.device)
            old = site.cosines[site.index]
            old.copy_(torch.where(finite, cosine.to(old), old))
            site.conflicts[site.index].add_(((dot < 0) & finite).to(site.conflicts))
        if site.watch is not None:
            site.watch(combined)
        return combined.to(g_model.dtype), None


def pareto_fork(output: Any, site: ParetoSite, name: str) -> tuple[Any, Any]:
    """``(model_branch, head_branch)`` of encoder ``name``'s (nested) output; each tensor that
    requires a gradient is forked (each such tensor is combined on its own). Containers and
    dataclasses are walked (:func:`gradbalance._tree.map_tensors`)."""
    head_tensors: list[torch.Tensor] = []

    def fork(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.requires_grad:
            head_tensors.append(tensor)
            return tensor
        model_tensor, head_tensor = _ParetoFork.apply(tensor, site)
        site.shapes.append(tensor.shape)
        head_tensors.append(head_tensor)
        return model_tensor

    model_branch = map_tensors(fork, output, name)
    forked = iter(head_tensors)  # the same walk visits the tensors in the same order
    return model_branch, map_tensors(lambda _: next(forked), output, name)
