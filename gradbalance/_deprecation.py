"""Old public names kept working, with a ``DeprecationWarning`` naming what replaces them."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch


def deprecated_alias(name: str, function: Callable[..., Any], instead: str = "") -> Any:
    """``function`` under its old public ``name``: each call warns (``DeprecationWarning``)
    and then does exactly what ``function`` does.

    Example:
        >>> def _double(x):
        ...     return 2 * x
        >>> double = deprecated_alias("double", _double, "x * 2")
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     double(3), caught[0].category.__name__
        (6, 'DeprecationWarning')
    """
    advice = f"; use {instead}" if instead else ""
    message = f"{name}() is internal to gradbalance and deprecated{advice}"

    @functools.wraps(function)
    def alias(*args: Any, **kwargs: Any) -> Any:
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return function(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = name
    return alias


def _raises_at_once(balancer: Any, tensor: torch.Tensor) -> bool:
    return bool(balancer._guard.raises_at_once(tensor))


def _note_finite(balancer: Any, finite: torch.Tensor) -> None:
    balancer._guard.last_finite = finite


class DeprecatedHelpers:
    """The balancer's former public helpers, now internal (each call warns)."""

    optimizer_step = deprecated_alias(
        "optimizer_step",
        lambda balancer, optimizer: balancer._optimizer_step(optimizer),
        "nothing: a hook calls it",
    )
    raises_at_once = deprecated_alias("raises_at_once", _raises_at_once, "nothing: Step.store")
    note_finite = deprecated_alias("note_finite", _note_finite, "bal.last_step_finite to read")
    record_history = deprecated_alias(
        "record_history",
        lambda balancer, *args: balancer._record_history(*args),
        "nothing: loss() records the history",
    )
