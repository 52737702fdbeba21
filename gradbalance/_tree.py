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
        return _map_dataclass(function, leaf, name)
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


def _map_dataclass(function: TensorFn, leaf: Any, name: str) -> Any:
    """A new instance with every field mapped. Built by ``dataclasses.replace`` (which
    ``torch.compile`` traces without a graph break), or copied when ``replace`` refuses the
    class (an ``InitVar`` it cannot fill); every field is then set as mapped (also the
    ``init=False`` ones, and on frozen dataclasses)."""
    items = dataclasses.fields(leaf)
    values = {item.name: map_tensors(function, getattr(leaf, item.name), name) for item in items}
    try:
        mapped = dataclasses.replace(leaf, **{f.name: values[f.name] for f in items if f.init})
    except ValueError:
        mapped = copy.copy(leaf)
    for key, value in values.items():
        object.__setattr__(mapped, key, value)
    return mapped


def _holds_tensors(leaf: Any) -> bool:
    """Whether an object of an unknown type keeps tensors among its attributes."""
    attributes = getattr(leaf, "__dict__", None)
    if not isinstance(attributes, dict):
        return False
    return any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(list(attributes.values())))
