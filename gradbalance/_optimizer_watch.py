"""Which optimizer steps update the model and the balancer's heads.

A global optimizer pre-step hook (registered by ``gradbalance._attach``) hands every step to
the watched balancers; :class:`OptimizerWatch` remembers whether a step updated the model
without the heads, which the next ``loss()`` refuses (the heads would never train).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from gradbalance.errors import WRAP_ORDER, OrderError


def parameter_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    """The ids of every parameter an optimizer updates."""
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


class OptimizerWatch:
    """Notes optimizer steps over a model and over a balancer's heads.

    Args:
        model: the user's model (its parameters are read again when an optimizer seems to
            miss them: FSDP2's ``fully_shard`` replaces them after the balancer).
        head_parameters: returns the balancer's parameters (they may be created lazily).
    """

    def __init__(
        self, model: nn.Module, head_parameters: Callable[[], Iterable[nn.Parameter]]
    ) -> None:
        self.model = model
        self.model_ids: frozenset[int] = frozenset()  # read at the first step (lazily: the
        # model may still be restoring when a copy of the balancer builds its watch)
        self.head_parameters = head_parameters
        self.stepped_model = False
        self.stepped_heads = False

    def note(self, optimizer: torch.optim.Optimizer) -> bool:
        """Record one optimizer step; whether it updates the model."""
        ids = parameter_ids(optimizer)
        if not ids.isdisjoint(id(p) for p in self.head_parameters()):
            self.stepped_heads = True
        if ids.isdisjoint(self.model_ids):
            self.model_ids = frozenset(id(p) for p in self.model.parameters())
            if ids.isdisjoint(self.model_ids):
                return False
        self.stepped_model = True
        return True

    def check(self) -> None:
        """Refuse a model trained by an optimizer that misses the heads (then forget)."""
        stepped_model, stepped_heads = self.stepped_model, self.stepped_heads
        self.stepped_model = self.stepped_heads = False
        trainable = any(p.requires_grad for p in self.head_parameters())
        if stepped_model and not stepped_heads and trainable:
            raise OrderError(
                "an optimizer stepped the model but no optimizer updates the balancer's "
                "heads (bal.parameters()), so they would stay at their initial values. Build "
                "the optimizer after the balancer with both: torch.optim.Adam([*model."
                "parameters(), *bal.parameters()]) (or opt.add_param_group({'params': "
                f"list(bal.parameters())}})). Order: {WRAP_ORDER}"
            )
