"""Every tensor of an encoder's output, wherever it sits in the output.

An encoder may return a tensor or a container of them: tuples, lists, dicts, namedtuples and
any type registered with ``torch.utils._pytree`` (Hugging Face ``ModelOutput`` is), and
dataclasses, registered or not (their fields are walked). The balancer must reach every
tensor of the output: one it cannot reach would carry an unscaled gradient into the
encoder, so the encoder would be balanced only in part. An object of another type that holds
tensors is refused, naming its type and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from gradbalance.errors import InputTypeError

TensorFn = Callable[[torch.Tensor], torch.Tensor]


def map_tensors(function: TensorFn, output: Any, name: str) -> Any:
    """``output`` with every tensor ``t`` replaced by ``function(t)`` (containers are copied).

    Args:
        function: applied to each tensor, in a fixed order (depth first, fields in order).
        output: what encoder ``name`` returned.
        name: the encoder's name, for the error.

    Raises:
        InputTypeError: the output holds an object whose tensors cannot be reached.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Out:
        ...     pooled: torch.Tensor
        ...     tokens: list
        >>> out = map_tensors(lambda t: 2 * t, Out(torch.ones(1), [torch.ones(2)]), "text")
        >>> out.pooled, out.tokens
        (tensor([2.]), [tensor([2., 2.])])
    """
    if isinstance(output, torch.Tensor):
        return function(output)
    return pytree.tree_map(lambda leaf: _map_leaf(function, leaf, name), output)


def _map_leaf(function: TensorFn, leaf: Any, name: str) -> Any:
    if isinstance(leaf, torch.Tensor):
        return function(leaf)
    if dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
        mapped = copy.copy(leaf)
        for item in dataclasses.fields(leaf):
            value = map_tensors(function, getattr(leaf, item.name), name)
            object.__setattr__(mapped, item.name, value)  # frozen dataclasses too
        return mapped
    if _holds_tensors(leaf):
        kind = type(leaf).__qualname__
        raise InputTypeError(
            f"encoder {name!r} returned a {kind} that holds tensors gradbalance cannot reach "
            "(only tensors, tuples, lists, dicts, namedtuples, dataclasses and types "
            "registered with torch.utils._pytree are walked), so its gradient would be scaled "
            f"only in part. Return a tensor, a tuple, a dict or a dataclass, or register {kind} "
            "with torch.utils._pytree.register_pytree_node"
        )
    return leaf


def _holds_tensors(leaf: Any) -> bool:
    """Whether an object of an unknown type keeps tensors among its attributes."""
    attributes = getattr(leaf, "__dict__", None)
    if not isinstance(attributes, dict):
        return False
    return any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(list(attributes.values())))
