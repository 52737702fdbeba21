"""A method written outside the library, only through its public extension surface, and
registered with ``gb.register_method``: the contract, DDP and compile suites pick it up from
``gb.METHODS`` (``balancer_factories``) without a line of their own.

``ScoreRatio`` keeps an exponential moving average of each head's score (declared with
``add_state``) and scales encoder m's gradients by ``k_m = (mean_j s_j / s_m) ** alpha``
computed on that average: the modality whose head is ahead is slowed down.
"""

from __future__ import annotations

from typing import Any

import torch

import gradbalance as gb


class ScoreRatio(gb.Method):
    """Heads on every encoder; k_m from the heads' averaged scores (see the module docstring).

    Example:
        >>> import gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = ScoreRatio(model, [model.audio, model.video], num_classes=3)
    """

    supported_tasks = ("classification", "regression")

    def __init__(
        self,
        model: Any,
        encoders: Any,
        num_classes: int | None = None,
        *,
        alpha: float = 1.0,
        momentum: float = 0.5,
        **options: Any,
    ) -> None:
        self.alpha = gb.methods.check_number("alpha", alpha, minimum=0.0)
        self.momentum = gb.methods.check_number(
            "momentum", momentum, minimum=0.0, maximum=1.0
        )
        super().__init__(model, encoders, num_classes, **options)
        self.add_state("average_scores", torch.ones(len(self.names)))

    def _loss(self, step: gb.Step) -> torch.Tensor:
        losses, scores = step.head_terms(scaled=True)
        total = step.fused_loss() + losses.sum()
        if step.training:
            average = self.momentum * self.average_scores + (1 - self.momentum) * scores
            self.update_state(step, "average_scores", average)
            if self.task == "regression":  # errors: lower is better
                ratios = self.average_scores / self.average_scores.mean()
            else:
                ratios = self.average_scores.mean() / self.average_scores
            ones = torch.ones_like(ratios)
            k = ratios.clamp_min(1e-6) ** self.alpha if self.active() else ones
            step.store(k, scores)
        return total


gb.register_method("score_ratio", ScoreRatio, aliases=["score-ratio-test"])
