"""Parameters of the user's model held by name, looked up again at each use.

A wrapper applied after the balancer may register new parameter objects under the same
names: FSDP2's ``fully_shard`` replaces every parameter of the modules it shards by a
sharded ``DTensor`` parameter. A balancer that kept the original objects would read
gradients that are never written again; looked up by name it follows the replacement.
Gradient hooks cannot follow it (they sit on the old objects), so :meth:`refuse_replaced`
turns that case into an error.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from gradbalance.errors import OrderError

REPLACED_PARAMETERS = (
    "the model's parameters were replaced after the balancer was created (FSDP2's "
    "fully_shard registers sharded copies), so the gradient hooks of per-parameter scaling "
    "(extra_parameters=, OGM parameters='conv') would never run. Per-parameter scaling is "
    "not supported under fully_shard: scale the encoders' outputs instead (the default; OGM "
    "parameters='encoder'), or use DistributedDataParallel"
)


def _gone() -> None:
    return None


def _weak(param: torch.Tensor | None) -> Callable[[], torch.Tensor | None]:
    """A weak reference to ``param``; one that is always dead for ``None``."""
    return _gone if param is None else weakref.ref(param)


class NamedParameters:
    """Parameters of ``model`` remembered by their names in it (and weakly by object).

    Args:
        model: the user's model.
        parameters: the parameters to follow; one that is not a parameter of ``model`` is
            kept as the object itself.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> watched = NamedParameters(model, [model[0].weight])
        >>> model[0].weight = nn.Parameter(model[0].weight.detach().clone())  # as fully_shard
        >>> watched.current()[0] is model[0].weight
        True
    """

    def __init__(self, model: nn.Module, parameters: Iterable[torch.Tensor]) -> None:
        names = {id(param): name for name, param in model.named_parameters()}
        self.model = model
        self.entries: list[str | torch.Tensor] = []
        self.originals: list[Callable[[], torch.Tensor | None]] = []
        for param in parameters:
            self.entries.append(names.get(id(param), param))
            self.originals.append(_weak(param))

    def __getstate__(self) -> dict[str, Any]:
        """Pickle and deepcopy the originals themselves (a weak reference cannot be): inside
        a pickle of the model they are its parameters, so identity survives the round trip."""
        return {**self.__dict__, "originals": [original() for original in self.originals]}

    def __setstate__(self, state: dict[str, Any]) -> None:
        originals = state.pop("originals")
        self.__dict__.update(state)
        self.originals = [_weak(param) for param in originals]

    def __len__(self) -> int:
        return len(self.entries)

    def current(self) -> list[torch.Tensor]:
        """The parameters registered under the remembered names now."""
        return [
            self.model.get_parameter(entry) if isinstance(entry, str) else entry
            for entry in self.entries
        ]

    def refuse_replaced(self) -> None:
        """Raise ``OrderError`` when a remembered parameter was replaced in the model."""
        for param, original in zip(self.current(), self.originals):
            if param is not original():
                raise OrderError(REPLACED_PARAMETERS)
