"""Joint training: the plain fused cross-entropy, optionally with detached linear probes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gradbalance._step import Step
from gradbalance.methods._base import Method


class Joint(Method):
    """Joint training baseline: ``loss = CE(fused logits)``, nothing modulated.

    With ``probes=True`` each encoder also gets a stop-gradient linear probe: a linear head
    trained on the *detached* feature, so it reports how well that modality's encoder
    separates the classes without sending any gradient into the encoder. The probes'
    cross-entropy is added to the returned loss (it only reaches the probes' own
    parameters); their accuracy comes from :meth:`unimodal_logits` after a forward.

    Args:
        model: the multimodal model (unchanged by the balancer).
        encoders: one submodule per modality (list or dict ``name -> module``).
        num_classes: number of classes (left out with ``task="regression"``).
        probes: attach detached linear probes.
        **common: the options of :class:`~gradbalance.balancer.Balancer`; with
            ``task="regression"`` (and ``loss``, ``output_dim``, ``error``) the loss is a
            regression loss (L1 by default) and the probes are linear regressors whose scores
            are their batch errors.

    Example:
        >>> import torch, gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.Joint(model, encoders=[model.audio, model.video], num_classes=3, probes=True)
        >>> y = torch.tensor([0, 1, 2, 0])
        >>> bal.loss(model(torch.randn(4, 8), torch.randn(4, 6)), y).backward()
        >>> bal.unimodal_logits()["video"].shape
        torch.Size([4, 3])
    """

    scales_gradients = False
    supported_tasks: tuple[str, ...] = ("classification", "regression")

    def __init__(
        self,
        model: nn.Module,
        encoders: Sequence[nn.Module] | Mapping[str, nn.Module],
        num_classes: int | None = None,
        *,
        probes: bool = False,
        **common: Any,
    ) -> None:
        head_mode = "probe" if probes else "none"
        super().__init__(model, encoders, num_classes, head_mode=head_mode, **common)

    def _loss(self, step: Step) -> torch.Tensor:
        total = step.fused_loss()
        if not step.unimodal:
            return total
        # detached probes: only they train
        losses, scores = step.head_terms(scaled=False)
        if step.training:
            step.store(torch.ones_like(scores), scores)
        return total + losses.sum().to(total.device)
