"""Everything a balancer attaches to the user's model, and how it comes off again.

:class:`Attachment` owns every handle: one forward hook per encoder (the tap), a forward
pre-hook on the model (counts forwards), gradient hooks on chosen parameters, the entry in
the registry of balanced encoders (one balancer per encoder) and in the watch of optimizer
steps. It attaches once, after the balancer validated all its arguments
(:class:`AttachAfterInit`), and :meth:`Attachment.detach` takes everything off.

Nothing of the balancer travels with the model: pickling (``torch.save(model)``),
``copy.deepcopy`` and ``torch.optim.swa_utils.AveragedModel`` see the module state without
the balancer's hooks (an instance-level ``__getstate__`` filters them out), so the copy is
the user's plain model. Whether a ``DistributedDataParallel`` wrapper was created after the
balancer is observed through a global module-registration hook, not by marking the model.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook
from torch.nn.parallel import DistributedDataParallel
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from gradbalance._keywords import check_keywords
from gradbalance.errors import WRAP_ORDER, CaptureError, ConfigurationError, OrderError

DATA_PARALLEL_REFUSED = (
    "nn.DataParallel is not supported: it runs replicas of the model in threads, so one "
    "balancer would see several partial batches per step. Use DistributedDataParallel "
    f"(torchrun) instead, in this order: {WRAP_ORDER}"
)

_FUNCTORCH_LEVEL = getattr(torch._C._functorch, "maybe_current_level", None)


def refuse_functional_transform(name: str) -> None:
    """Refuse a tap inside a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``...).

    Raises:
        CaptureError: encoder ``name`` runs inside such a transform.
    """
    if torch.compiler.is_compiling() or _FUNCTORCH_LEVEL is None or _FUNCTORCH_LEVEL() is None:
        return
    raise CaptureError(
        f"encoder {name!r} ran inside a torch.func transform (grad, vmap, jacrev, ...): "
        "gradbalance scales gradients in autograd's ordinary backward and keeps per-step "
        "state, which these transforms do not support. Train with loss = bal.loss(logits, y); "
        "loss.backward() (torch.func.functional_call without a transform works), and run "
        "transformed passes over the model (per-sample gradients) inside `with bal.paused():`"
    )


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)

_OWNERS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()
"""encoder -> weak reference to the attached balancer that taps it (one per encoder)."""

_HIDDEN: weakref.WeakKeyDictionary[nn.Module, set[int]] = weakref.WeakKeyDictionary()
"""module -> ids of the balancers' hooks on it, hidden from pickling and deepcopy."""

_BALANCED_MODELS: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
"""model -> number of attached balancers (for the DDP-order watch)."""

_LATE_WRAPPERS: weakref.WeakSet[nn.Module] = weakref.WeakSet()
"""DDP wrappers created around a balanced model (after its balancer)."""

_REGISTRATION_HOOK: list[RemovableHandle] = []


DETACHED = (
    "this balancer is not attached to its model: it was removed (bal.remove()), or it was "
    "copied or unpickled as part of the model it balances, which cannot be re-attached. Keep "
    "the balancer beside the model (e.g. both as submodules of a LightningModule, or "
    "torch.save({'model': model, 'bal': bal})), or build a new balancer and load "
    "bal.state_dict() into it"
)


def is_built(module: nn.Module) -> bool:
    """Whether ``module`` is initialised (not an object whose state pickle or deepcopy is
    still restoring)."""
    return "_parameters" in module.__dict__


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU without any)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def owner_of(module: nn.Module) -> Any:
    """The attached balancer that taps ``module``, or None."""
    reference = _OWNERS.get(module)
    return reference() if reference is not None else None


def refuse_owned(encoders: Mapping[str, nn.Module]) -> None:
    """Refuse encoders that another (attached) balancer taps already."""
    for name, module in encoders.items():
        reference = _OWNERS.get(module)
        owner = reference() if reference is not None else None
        if owner is not None:
            raise ConfigurationError(
                f"encoder {name!r} already has a balancer ({type(owner).__name__}) attached: "
                "one balancer per encoder (two would scale its gradients twice). Call "
                "old_balancer.remove() first, e.g. before creating a new balancer each epoch"
            )


class _StateWithoutHooks:
    """An instance-level ``__getstate__``: the module's state without the balancers' hooks."""

    def __init__(self, module: nn.Module) -> None:
        self._module = weakref.ref(module)

    def __call__(self) -> dict[str, Any]:
        module = self._module()
        if module is None:  # pragma: no cover - the guard dies with its module
            return {}
        state = dict(type(module).__getstate__(module))
        state.pop("__getstate__", None)
        hidden = _HIDDEN.get(module, set())
        for key in _HOOK_DICTS:
            hooks = state.get(key)
            if hooks:
                state[key] = OrderedDict((k, v) for k, v in hooks.items() if k not in hidden)
        return state


def _hide(module: nn.Module, handle: RemovableHandle) -> None:
    _HIDDEN.setdefault(module, set()).add(handle.id)
    if "__getstate__" not in module.__dict__:
        module.__dict__["__getstate__"] = _StateWithoutHooks(module)


def _unhide(module: nn.Module, handle: RemovableHandle) -> None:
    hidden = _HIDDEN.get(module)
    if hidden is None:
        return
    hidden.discard(handle.id)
    if not hidden:
        del _HIDDEN[module]
        module.__dict__.pop("__getstate__", None)


def _note_wrapper(parent: nn.Module, name: str, child: nn.Module) -> None:
    """Global module-registration hook: a DDP wrapper made around a balanced model."""
    if isinstance(parent, DistributedDataParallel) and child in _BALANCED_MODELS:
        _LATE_WRAPPERS.add(parent)


def active_ddp(model: nn.Module) -> DistributedDataParallel | None:
    """The DDP wrapper running the current forward (None outside DDP).

    Raises:
        OrderError: the DDP wrapper around ``model`` was created before the balancer.
    """
    ddp = DistributedDataParallel._active_ddp_module
    if ddp is not None and ddp.module is model and ddp not in _LATE_WRAPPERS:
        raise OrderError(
            "the model was wrapped in DistributedDataParallel before the balancer was "
            "created: DDP must see the model as the balancer leaves it. Create the "
            f"balancer on the plain model first, in this order: {WRAP_ORDER}"
        )
    return ddp


_WATCHED: weakref.WeakSet[Any] = weakref.WeakSet()
_STEP_HOOK: list[RemovableHandle] = []


def _note_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Global optimizer pre-step hook: tell each watched balancer about this step."""
    for balancer in list(_WATCHED):
        balancer._optimizer_step(optimizer)


class AttachAfterInit(type):
    """The metaclass of the balancers: attach a balancer's hooks (its ``_attach()``) only
    once its keywords are checked and the most-derived ``__init__`` has validated everything,
    so a refused constructor leaves the model exactly as it was."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        check_keywords(cls, kwargs)
        balancer = super().__call__(*args, **kwargs)
        balancer._attach()
        return balancer


class Attachment:
    """The hooks of one balancer on one model.

    Args:
        model: the user's model.
        encoders: name -> encoder module (validated).
        owner: the balancer (registered as each encoder's owner; watched for optimizer steps
            through its ``_optimizer_step(optimizer)`` method).
    """

    def __init__(self, model: nn.Module, encoders: Mapping[str, nn.Module], owner: Any) -> None:
        self.model = model
        self.encoders = dict(encoders)
        self.owner = owner
        self._handles: list[tuple[nn.Module | None, RemovableHandle]] = []
        self.attached = False

    def attach(
        self,
        on_output: Callable[[str, nn.Module, Any], Any],
        on_model_forward: Callable[[], None],
    ) -> None:
        """Register the taps and the model's pre-hook (once)."""
        refuse_owned(self.encoders)
        for name, module in self.encoders.items():
            hook = _Tap(name, on_output)
            self._keep(module, module.register_forward_hook(hook))
            _OWNERS[module] = weakref.ref(self.owner)
        self._keep(self.model, self.model.register_forward_pre_hook(_PreHook(on_model_forward)))
        _BALANCED_MODELS[self.model] = _BALANCED_MODELS.get(self.model, 0) + 1
        if not _REGISTRATION_HOOK:
            _REGISTRATION_HOOK.append(register_module_module_registration_hook(_note_wrapper))
        _WATCHED.add(self.owner)
        if not _STEP_HOOK:
            _STEP_HOOK.append(register_optimizer_step_pre_hook(_note_optimizer_step))
        self.attached = True

    def _keep(self, module: nn.Module | None, handle: RemovableHandle) -> None:
        self._handles.append((module, handle))
        if module is not None:
            _hide(module, handle)

    def add_gradient_hooks(
        self, parameters: Iterable[torch.Tensor], hook: Callable[[torch.Tensor], Any]
    ) -> None:
        """Register ``hook`` on each parameter's gradient (removed by :meth:`detach`)."""
        for param in parameters:
            self._keep(None, param.register_hook(hook))

    def detach(self) -> None:
        """Remove every hook and registration: the model is exactly as before."""
        for module, handle in self._handles:
            handle.remove()
            if module is not None:
                _unhide(module, handle)
        self._handles = []
        if not self.attached:
            return
        self.attached = False
        for module in self.encoders.values():
            reference = _OWNERS.get(module)
            if reference is not None and reference() is self.owner:
                del _OWNERS[module]
        count = _BALANCED_MODELS.get(self.model, 0) - 1
        if count > 0:
            _BALANCED_MODELS[self.model] = count
        else:
            _BALANCED_MODELS.pop(self.model, None)
        _WATCHED.discard(self.owner)


class _Tap:
    """The forward hook of one encoder (a class, not a closure: clearer in repr)."""

    def __init__(self, name: str, on_output: Callable[[str, nn.Module, Any], Any]) -> None:
        self.name = name
        self.on_output = on_output

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if not torch.compiler.is_compiling() and getattr(module, "_is_replica", False):
            raise OrderError(DATA_PARALLEL_REFUSED)
        return self.on_output(self.name, module, output)


class _PreHook:
    def __init__(self, on_model_forward: Callable[[], None]) -> None:
        self.on_model_forward = on_model_forward

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.on_model_forward()
