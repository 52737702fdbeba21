"""Refusing a module whose parameters FSDP2 holds sharded when the balancer reads them.

FSDP2's ``fully_shard`` keeps a module's parameters as sharded ``DTensor`` parameters outside
its forward, unless the module was wrapped with ``reshard_after_forward=False`` (the default of
the root module). A balancer that calls the model's fused head in ``loss()`` (OGM's
``fusion_head=``, AGM's ``fusion=``) needs it unsharded there.
"""

from __future__ import annotations

from torch import nn

from gradbalance.errors import OrderError


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (recognised without importing torch.distributed)."""
    return hasattr(tensor, "placements") and hasattr(tensor, "to_local")


def refuse_sharded(module: nn.Module, role: str) -> None:
    """Raise ``OrderError`` when a parameter of ``module`` is sharded right now."""
    if any(is_sharded(param) for param in module.parameters()):
        raise OrderError(
            f"{role} holds parameters sharded by FSDP2 when loss() reads them: the module "
            "that contains it was resharded after its forward. Keep it unsharded after the "
            "forward: fully_shard(model, reshard_after_forward=False) (the default of the "
            "root module), or wrap the fused head's module with that option"
        )
