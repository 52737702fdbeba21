"""Per-parameter scaling follows the model's structure, or refuses to train on silently.

A balancer that scales gradients per parameter (``extra_parameters=``, OGM
``parameters="conv"`` or a callable) holds a gradient hook on each chosen parameter. When the
model is changed afterwards, by a re-parametrization (``torch.nn.utils.parametrize``,
``weight_norm``) or a layer replaced by a wrapper (LoRA-style adapters), the chosen
parameter leaves the model or moves, and new parameters take over its work without a hook:
their gradients would not be scaled. :class:`ParameterWatch` notices that at the next
training ``loss()`` and raises an :class:`~gradbalance.errors.OrderError` naming the
parameter and the fix.

Cheap: global module- and parameter-registration hooks (every ``setattr`` of a module or a
parameter, ``register_parametrization`` included) mark the watches of the model whose module
changed; a training step only reads that flag. The model's parameters are walked only after
such a change. No host synchronisation.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)
from torch.utils.hooks import RemovableHandle

from gradbalance._named_parameters import REPLACED_PARAMETERS
from gradbalance.errors import OrderError

Selection = Mapping[str, Sequence[torch.Tensor]]
Reselect = Callable[[], Selection] | None

_WATCHES: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[ParameterWatch]] = (
    weakref.WeakKeyDictionary()
)
"""module of a watched model -> the watches to mark when something is registered on it."""

_HOOKS: list[RemovableHandle] = []

CHANGED_AFTER_BUILD = (
    "the model was re-parametrized (torch.nn.utils.parametrize, weight_norm) or a layer was "
    "replaced (e.g. by an adapter) after the balancer was built, so the new parameters' "
    "gradients would not be scaled. Change the model first, then build the balancer: "
    "bal.remove(), then a new balancer (new.load_state_dict(bal.state_dict()) keeps its state)"
)


def _note_registration(module: nn.Module, name: str, value: Any) -> None:
    """Global registration hook: a module or parameter was set on ``module``."""
    for watch in list(_WATCHES.get(module, ())):
        watch.changed = True


def _unwrapped(name: str) -> str:
    """A parameter's name without the ``_orig_mod.`` segments of ``torch.compile``'s module
    wrapper (an encoder compiled by assignment after the balancer keeps its parameters)."""
    return name.replace("_orig_mod.", "")


def parameter_names(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` in ``model`` (a shared parameter keeps its first name)."""
    names: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), name)
    return names


class ParameterWatch:
    """The parameters a balancer scales one by one, and where they sit in its model.

    Args:
        model: the user's model.
        selected: ``{modality: parameters}`` with a gradient hook.
        reselect: for a rule-based choice (OGM ``parameters="conv"``), the rule applied
            again to the encoders as they are now; ``None`` for an explicit list.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> watch = ParameterWatch(model, {"a": [model[0].weight]}, None)
        >>> watch.start()
        >>> nn.utils.parametrizations.weight_norm(model[0])  # doctest: +ELLIPSIS
        ParametrizedLinear(...)
        >>> try:
        ...     watch.check()
        ... except OrderError as error:
        ...     print(str(error)[:60])
        the balancer scales the gradient of parameter '0.weight' per
        >>> watch.stop()
    """

    def __init__(
        self,
        model: nn.Module,
        selected: Selection,
        reselect: Reselect,
    ) -> None:
        self.model = model
        self.selected = {id(p): p for params in selected.values() for p in params}
        self.reselect = reselect
        names = parameter_names(model) if self.selected else {}
        self.names = {key: names[key] for key in self.selected if key in names}
        self.changed = False

    def start(self) -> None:
        """Mark this watch on every change of the model's modules from now on (a watch of no
        parameter does nothing)."""
        if not self.selected:
            return
        if not _HOOKS:
            _HOOKS.append(register_module_module_registration_hook(_note_registration))
            _HOOKS.append(register_module_parameter_registration_hook(_note_registration))
        for module in self.model.modules():
            _WATCHES.setdefault(module, weakref.WeakSet()).add(self)

    def stop(self) -> None:
        """Watch no more (the balancer was removed)."""
        for watches in list(_WATCHES.values()):
            watches.discard(self)

    def check(self) -> None:
        """Raise if a scaled parameter left or moved, or a new one matches the rule.

        Raises:
            OrderError: naming the parameter; the model was changed after the balancer.
        """
        if not self.changed:
            return
        names = parameter_names(self.model)
        current = set(names.values())
        for key, old in self.names.items():
            new = names.get(key)
            if new is not None and _unwrapped(new) == _unwrapped(old):
                continue  # the same parameter under torch.compile's wrapper (``_orig_mod``)
            if new != old:
                if new is None and old in current:
                    raise OrderError(REPLACED_PARAMETERS)  # a new object under the same name
                where = f"is now {new!r}" if new else "is no longer a parameter of the model"
                raise OrderError(
                    f"the balancer scales the gradient of parameter {old!r} per parameter "
                    f"(extra_parameters=, OGM parameters='conv'), but it {where}: "
                    f"{CHANGED_AFTER_BUILD}"
                )
        if self.reselect is not None:
            for modality, params in self.reselect().items():
                for param in params:
                    if id(param) not in self.selected:
                        name = names.get(id(param), "?")
                        raise OrderError(
                            f"parameter {name!r} of encoder {modality!r} matches the balancer's "
                            "parameters= choice but was added after it was built, so it has no "
                            f"gradient hook: {CHANGED_AFTER_BUILD}"
                        )
        self.changed = False
        self.start()  # modules added by the change (a new unrelated layer) are watched too
