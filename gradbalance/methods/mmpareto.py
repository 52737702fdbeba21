"""MMPareto: Pareto combination of the multimodal and unimodal gradients (Wei & Hu, ICML 2024)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from gradbalance._checks import check_number
from gradbalance._distributed import reduce_mean
from gradbalance._step import Step
from gradbalance.errors import InputError
from gradbalance.methods._pareto import ParetoSite, pareto_fork
from gradbalance.methods.multiloss import MultiLoss


class MMPareto(MultiLoss):
    """MMPareto: Multi-Loss whose two gradients into each encoder are Pareto-combined.

    The loss is Multi-Loss's, ``CE(fused) + sum_m CE(head_m(z_m))``. In ``backward()`` each
    encoder m receives two gradients: ``g_mm`` from the fused loss and ``g_uni`` from its own
    head's loss. As Wei & Hu ("MMPareto: Boosting Multimodal Learning with Innocent Unimodal
    Assistance", ICML 2024, Algorithm 1, and the authors' code): when they conflict (negative
    cosine) the encoder gets ``2 (a g_mm + (1 - a) g_uni)`` with ``a`` the two-task min-norm
    (MGDA) weight of their convex hull; otherwise the plain sum ``g_mm + g_uni``; the result is
    scaled up to the norm of ``g_mm + g_uni`` when shorter, then multiplied by ``gamma``
    (:func:`~gradbalance.coefficients.mmpareto_weights`). Heads and the fusion get their plain
    gradients.

    Deviation (for one backward pass instead of one per loss): the cosine, the MGDA weight and
    the magnitude rule are computed on the two gradients at the encoder's *output* (the whole
    batch flattened), not on the encoder's parameter gradients. The combined output gradient
    then flows through the encoder, so every parameter receives the same linear combination
    ``2a J^T g_mm + 2(1 - a) J^T g_uni`` of its two gradients as in the paper; only ``a``, the
    conflict decision and the norm factor are measured in output space (inner product of the
    outputs' gradients instead of the parameters'), once per encoder rather than the magnitude
    rule per parameter tensor. The heads read their own branch of the encoder output, which is
    what keeps the two streams apart.

    Under ``torch.distributed`` with ``sync="global"`` the three sums behind the decision
    (``<g_mm, g_uni>``, ``|g_mm|^2``, ``|g_uni|^2``) are all-reduced in the backward pass (one
    small collective per encoder): the global batch's output gradient is the concatenation of
    the ranks' ones, so every rank uses the decision and factor of the global batch and DDP's
    average of the combined gradients is the global combination. ``sync="local"``: each rank
    decides on its own batch.

    :attr:`cosines` holds each encoder's last cosine, :attr:`conflicts` counts the backward
    passes in which it was negative. The coefficients are 1 (nothing is scaled per modality).

    Args:
        model: the multimodal model (unchanged by the balancer).
        encoders: one submodule per modality (list or dict ``name -> module``).
        num_classes: number of classes.
        gamma: factor on the encoders' combined gradients (> 0; 1.5 in the authors' code,
            the default; with Adam it barely matters).
        enabled: combine at all (False, or outside ``window``: plain Multi-Loss).
        **options: as :class:`MultiLoss` (``fused_weight``, ``unimodal_weight`` and the
            common options).

    Example:
        >>> import torch, gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.MMPareto(model, encoders=[model.audio, model.video], num_classes=3)
        >>> y = torch.tensor([0, 1, 2, 0])
        >>> bal.loss(model(torch.randn(4, 8), torch.randn(4, 6)), y).backward()
        >>> sorted(bal.cosines), bal.conflicts.shape
        (['audio', 'video'], torch.Size([2]))
    """

    supported_tasks: tuple[str, ...] = ("classification",)
    _transient = (*MultiLoss._transient, "_open_sites")
    cosine_values: torch.Tensor
    conflicts: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        encoders: Sequence[nn.Module] | Mapping[str, nn.Module],
        num_classes: int | None = None,
        *,
        gamma: float = 1.5,
        enabled: bool = True,
        **options: Any,
    ) -> None:
        self.gamma = check_number("gamma", gamma, minimum=0.0, strict=True)
        super().__init__(model, encoders, num_classes, enabled=enabled, **options)
        m = len(self.names)
        self.add_state("cosine_values", torch.zeros(m))
        self.add_state("conflicts", torch.zeros(m, dtype=torch.int64))
        self._open_sites: list[ParetoSite] = []  # the forks of the forward before loss()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._open_sites = []
    @property
    def cosines(self) -> dict[str, torch.Tensor]:
        """``{name: 0-dim tensor}``: each encoder's gradient cosine in the last backward."""
        values = self.cosine_values.detach().clone()
        return {name: values[index] for index, name in enumerate(self.names)}

    def _reduce(self, stats: torch.Tensor) -> torch.Tensor:
        """The statistics over all ranks (their mean: every ratio built on them is unchanged)."""
        return reduce_mean(stats, 1.0, self.process_group)[0]

    def _fork_output(self, name: str, output: Any, watch: Any) -> tuple[Any, Any] | None:
        """The model continues with one branch, the heads read the other (whatever the
        encoder's train/eval mode: every backward with gradients gets the combination)."""
        if not self.active():
            return None
        global_sync = self.sync == "global" and self.world_size() > 1
        site = ParetoSite(
            index=self.names.index(name),
            gamma=self.gamma,
            cosines=self.cosine_values,
            conflicts=self.conflicts,
            reduce=partial(MMPareto._reduce, self) if global_sync else None,
            watch=watch,
        )
        self._open_sites.append(site)
        return pareto_fork(output, site, name)

    def _loss(self, step: Step) -> torch.Tensor:
        self._mask_sites(step)
        return super()._loss(step)

    def _mask_sites(self, step: Step) -> None:
        """Give the forks of this step's forward the mask of their modality's samples."""
        sites = list(self._open_sites)
        self._open_sites.clear()  # the same list: a compiled forward appends to it
        present = step.present
        if present is None:
            return
        for site in sites:
            if any(len(shape) == 0 or shape[0] != step.batch_size for shape in site.shapes):
                raise InputError(
                    f"MMPareto with present= combines the gradients of encoder "
                    f"{self.names[site.index]!r} per sample, so its output tensors must have the "
                    f"batch first ({step.batch_size} rows), got shapes "
                    f"{[tuple(shape) for shape in site.shapes]}"
                )
            site.present = present[:, site.index]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}, {self._window_repr()}"
