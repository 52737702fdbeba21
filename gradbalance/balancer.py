"""The :class:`Balancer` base class: the thin public front every balancing method shares.

A balancer attaches to a user's model without changing it: one forward hook per encoder
captures the encoder's output and routes it through the gradient-scaling Function of
``gradbalance._scale`` with the coefficients bound to that forward. ``loss()`` computes the
method's statistics, writes the coefficients into that forward's binding and returns the
training loss; the user's ordinary ``backward()`` applies them. Nothing here synchronises
with the host. The parts behind this front: validation (``_checks``), hooks and their removal
(``_attach``), per-forward captures (``_capture``), the per-step contract with the methods
(``_step``), the non-finite guard (``_finite``) and the statistics across ranks
(``_distributed``).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from gradbalance import _checks
from gradbalance._attach import Attachment, active_ddp, refuse_owned
from gradbalance._capture import CaptureStore, FeatureFn, extract_feature, pool_feature
from gradbalance._distributed import (
    average_gradient,
    broadcast_parameters,
    local_mean,
    reduce_mean,
    world_size,
)
from gradbalance._finite import GradientGuard, finite_flags, nonfinite_message
from gradbalance._head_logits import separate_head_logits, stackable, stacked_head_logits
from gradbalance._scale import Binding, scale_grad_tree
from gradbalance._step import Step
from gradbalance.errors import (
    WRAP_ORDER,
    CaptureError,
    DeviceError,
    InputError,
    InputTypeError,
    NonFiniteError,
    OrderError,
)
from gradbalance.history import History

__all__ = ["Balancer", "pool_feature"]

Pool = Literal["spatial", "tokens", "cls"]
HeadMode = Literal["train", "probe", "none"]
Sync = Literal["global", "local"]
NonFinite = Literal["raise", "skip"]
ORDER = WRAP_ORDER

_GRAPH_TASK_ID = getattr(torch._C, "_current_graph_task_id", None)


def _in_backward() -> bool:
    """Whether autograd runs a backward (activation checkpointing recomputes forwards there)."""
    return _GRAPH_TASK_ID is not None and _GRAPH_TASK_ID() != -1


class _AttachAfterInit(type):
    """Attach a balancer's hooks only once the most-derived ``__init__`` has validated
    everything: a refused constructor leaves the model exactly as it was."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        balancer = super().__call__(*args, **kwargs)
        balancer._attach()
        return balancer


class Balancer(nn.Module, metaclass=_AttachAfterInit):
    """Base class of every balancing method: taps, heads, coefficients, history.

    Subclasses implement ``_loss(step)`` (see ``gradbalance._step``); everything a user
    touches (construction checks, ``loss()``, ``coefficients``, ``scores``, ``history``,
    ``state_dict``, ``remove()``) is shared. The balancer is an ``nn.Module`` that holds its
    heads and running state, never the model's parameters: optimise
    ``[*model.parameters(), *bal.parameters()]``.

    Lifecycle: nothing is attached until every argument is validated; one balancer per
    encoder (``remove()`` the old one first); each forward of the model is bound to its own
    coefficients, so two ``loss()`` results summed before one ``backward()`` are each scaled
    by their own; a training forward not followed by ``loss()`` is superseded by the next
    forward (one warning); the model pickled, deep-copied or wrapped in ``AveragedModel``
    is the plain model (no hook travels); the heads follow the encoders' dtype.

    The heads see each encoder's output as the encoder returned it: the model continues with
    a copy, so an in-place operation after the encoder (``F.relu(z, inplace=True)``) changes
    only the model's path. Order of creation: the balancer on the plain model, the optimizer
    (with ``bal.parameters()``), ``DistributedDataParallel``, then ``torch.compile``.

    Args:
        model: the multimodal model; the balancer never changes its parameters or its
            computation, and :meth:`remove` takes its hooks off.
        encoders: one submodule per modality, as a list (named by qualified name) or a dict
            ``name -> module``.
        num_classes: number of classes K of the fused logits and the unimodal heads.
        feature_dims: each encoder's feature width (once, list or dict). Omitted, the heads
            are ``nn.LazyLinear`` (registered already, so an optimizer built before the
            first forward still updates them).
        pool: how an encoder output becomes a ``(B, D)`` feature (see :func:`pool_feature`).
        features: a callable ``output -> (B, D)`` per encoder (or once), for encoders that
            return tuples, dicts or sequences.
        flush_every: steps of history kept on the device between copies to the CPU.
        head_mode: overrides the class's :attr:`head_mode` (for subclasses).
        sync: under ``torch.distributed``, ``"global"`` (default) all-reduces the statistics
            so every rank uses the coefficients of the concatenated batch; ``"local"`` lets
            each rank use its own (replicas stay identical either way).
        process_group: the process group for ``sync`` and the heads (default: the world).
        nonfinite: a training step with NaN/inf features, logits or statistics gets
            ``"raise"`` (default; at once on the CPU, at the next history flush or
            :meth:`check_finite` on an accelerator) or ``"skip"`` (the balancer is left
            unchanged and the step counted in :attr:`nonfinite_steps`).
        check_gradients: also check the gradients flowing into the encoders' outputs
            (device-side flags, a few kernels per encoder in ``backward()``). With
            ``nonfinite="raise"`` a non-finite gradient raises (on the CPU during
            ``backward()``); with ``"skip"`` the next optimizer step over the model's
            parameters is skipped (their gradients are set to None; one host
            synchronisation per optimizer step) and counted in :attr:`nonfinite_steps`.

    Example:
        >>> import torch, gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.MultiLoss(model, encoders=[model.audio, model.video], num_classes=3)
        >>> loss = bal.loss(model(torch.randn(4, 8), torch.randn(4, 6)), torch.tensor([0, 1, 2, 0]))
        >>> loss.backward()
        >>> sorted(bal.coefficients)
        ['audio', 'video']
    """

    head_mode: HeadMode = "train"
    """"train": heads trained on the features, their loss reaches the encoders; "probe":
    heads on detached features (stop-gradient linear probes); "none": no heads."""

    scales_gradients: bool = True
    """Whether the coefficients scale the gradients into the encoders' outputs."""

    uses_parameter_hooks: bool = False
    """Whether some gradients are scaled by per-parameter hooks (read at backward time)."""

    def __init__(
        self,
        model: nn.Module,
        encoders: Sequence[nn.Module] | Mapping[str, nn.Module],
        num_classes: int,
        *,
        feature_dims: Sequence[int] | Mapping[str, int] | int | None = None,
        pool: Pool | Mapping[str, Pool] | None = None,
        features: FeatureFn | Mapping[str, FeatureFn] | None = None,
        flush_every: int = 256,
        head_mode: HeadMode | None = None,
        sync: Sync = "global",
        process_group: Any = None,
        nonfinite: NonFinite = "raise",
        check_gradients: bool = False,
    ) -> None:
        super().__init__()
        if head_mode is not None:
            self.head_mode = _checks.check_choice(
                "head_mode", head_mode, ("train", "probe", "none")
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise _checks.ConfigurationError(
                f"num_classes must be an int >= 2, got {num_classes!r}"
            )
        self.sync: Sync = _checks.check_choice("sync", sync, _checks.SYNCS)
        self.nonfinite: NonFinite = _checks.check_choice("nonfinite", nonfinite, _checks.NONFINITE)
        _checks.check_int("flush_every", flush_every, 1)
        encoder_map = _checks.resolve_encoders(model, encoders)
        refuse_owned(encoder_map)
        self.names: list[str] = list(encoder_map)
        self._encoders = encoder_map
        self._pool = _checks.check_pools(pool, self.names)
        self._features = _checks.check_feature_functions(features, self.names)
        dims = _checks.check_feature_dims(feature_dims, self.names)
        self.num_classes = num_classes
        self.process_group = process_group
        device = _module_device(next(iter(encoder_map.values())))
        self.heads = nn.ModuleDict(
            {
                name: self._make_head(dims[name], _module_device(encoder_map[name]))
                for name in self.names
            }
            if self.head_mode != "none"
            else {}
        )
        m = len(self.names)
        self.register_buffer("last_coefficients", torch.ones(m, device=device))
        self.register_buffer("last_scores", torch.zeros(m, device=device))
        self.register_buffer("nonfinite_steps", torch.zeros((), dtype=torch.int64, device=device))
        self._history = History(self.names, flush_every, device=device)
        self.__dict__["_root_model"] = model  # not a submodule: state_dict never holds it
        self._model_parameter_ids = frozenset(id(p) for p in model.parameters())
        self._attachment = Attachment(model, encoder_map, self)
        self._captures = CaptureStore(self.names)
        self._index = {name: index for index, name in enumerate(self.names)}
        self._binding = Binding(torch.ones(m, device=device))
        self._gradient_guard = GradientGuard(self.names, device) if check_gradients else None
        self._scaled_parameters: dict[str, list[nn.Parameter]] = {}
        self._backward_bindings: tuple[int, list[Binding]] = (-1, [])
        self._last_binding: Binding | None = None
        self._paused = 0
        self._last_finite: torch.Tensor | None = None
        self._nonfinite_first: torch.Tensor | None = None
        self._defer_nonfinite_errors = False
        self._training_calls = 0
        self._warned_eval_mode = False
        self._stepped_model = self._stepped_heads = False
        self._distributed_ready = False
        self._seen_ddp: weakref.ref | None = None
        self._heads_in_ddp = False
        self.steps = 0
        self.epoch = 0

    def _make_head(self, dim: int | None, device: torch.device) -> nn.Module:
        if dim is None:
            return nn.LazyLinear(self.num_classes, device=device)
        return nn.Linear(dim, self.num_classes, device=device)

    # --- attachment -----------------------------------------------------------------------

    def _attach(self) -> None:
        """Called once the most-derived constructor has validated everything."""
        self._attachment.attach(self._on_output, self._on_model_forward)
        for name, params in self._scaled_parameters.items():
            hook = partial(_scale_parameter_gradient, weakref.ref(self), self._index[name])
            self._attachment.add_gradient_hooks(params, hook)

    def _request_parameter_scaling(self, parameters: Mapping[str, Iterable[nn.Parameter]]) -> None:
        """Validate (in a constructor) parameters whose gradients k_name also scales."""
        seen: set[int] = set()
        for name, params in parameters.items():
            if name not in self._encoders:
                raise _checks.ConfigurationError(f"unknown modality {name!r}; known: {self.names}")
            inside = {id(p) for p in self._encoders[name].parameters()}
            for param in params:
                if not isinstance(param, torch.Tensor):
                    raise InputTypeError(
                        f"parameters for {name!r} must be tensors, got {type(param).__name__}"
                    )
                if id(param) in seen:
                    raise _checks.ConfigurationError(
                        "a parameter is listed for more than one modality"
                    )
                seen.add(id(param))
                self._scaled_parameters.setdefault(name, []).append(param)
                if id(param) in inside and self.scales_gradients:
                    raise _checks.ConfigurationError(
                        f"a parameter listed for {name!r} is inside that encoder; its gradient "
                        "is scaled already"
                    )
        self.uses_parameter_hooks = bool(self._scaled_parameters)

    def remove(self) -> None:
        """Remove every hook: the model's forward and backward are exactly as before."""
        self._attachment.detach()
        self._captures.clear()
        self._distributed_ready = False

    def _on_model_forward(self) -> None:
        if torch.compiler.is_compiling() or self._paused:
            return
        if not _in_backward():
            self._captures.model_forward()

    def _on_output(self, name: str, module: nn.Module, output: Any) -> Any:
        """The tap of encoder ``name``: capture its output, return the scaled copy."""
        if self._paused:
            return None
        grad = torch.is_grad_enabled()
        binding = self._binding if grad else None
        index = self._index[name]
        k = binding.views[index] if binding is not None and self.scales_gradients else None
        if torch.compiler.is_compiling():
            self._captures.record_compiled(name, output, grad, module.training, binding)
            return scale_grad_tree(output, k)
        if not _in_backward():  # checkpointing recomputes: scale again, capture nothing
            self._check_ddp()
            self._captures.record(name, output, grad, module.training, binding)
        guard = self._gradient_guard
        watch = guard.watch(index) if guard is not None and grad else None
        return scale_grad_tree(output, k, watch)

    def _check_ddp(self) -> None:
        ddp = active_ddp(self._root_model)
        if ddp is None or (self._seen_ddp is not None and self._seen_ddp() is ddp):
            return
        self._seen_ddp = weakref.ref(ddp)
        self._heads_in_ddp = any(module is self for module in ddp.module.modules())

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Within this block the encoders' forwards are neither captured nor scaled (extra
        passes a method or the user runs through the model: masked passes, a second view)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    # --- features ---------------------------------------------------------------------------

    def features(self) -> dict[str, torch.Tensor]:
        """The ``(B, D)`` feature of each encoder from the latest forward of the model.

        Raises:
            CaptureError: that forward did not run every encoder (never stale values).
        """
        captures = self._captures.latest_captures()
        return {name: self._feature(name, c.output) for name, c in captures.items()}

    def _feature(self, name: str, output: Any) -> torch.Tensor:
        return extract_feature(name, output, self._pool[name], self._features[name])

    def unimodal_logits(self) -> dict[str, torch.Tensor]:
        """Each head's logits on the latest forward's features, detached (for evaluation)."""
        if not self.heads:
            raise CaptureError(
                f"{type(self).__name__} has no unimodal heads; build it with heads (e.g. "
                "gb.Joint(..., probes=True)) to read per-modality logits"
            )
        features = self.features()
        with torch.no_grad():
            self._prepare_heads(features)
            return separate_head_logits(self.heads, features, detach=True)

    def _prepare_heads(self, features: Mapping[str, torch.Tensor]) -> None:
        """Materialise lazy heads (outside inference mode) and follow the features' dtype."""
        for name, head in self.heads.items():
            feature = features[name]
            weight = next(iter(head.parameters()), None)
            if weight is None:
                continue
            if weight.device != feature.device:
                raise DeviceError(
                    f"encoder {name!r} produced its output on {feature.device} but the "
                    f"balancer's head for it is on {weight.device}: move the model to its "
                    "device(s) before creating the balancer, or move the balancer too "
                    "(bal.to(device))"
                )
            if isinstance(weight, nn.parameter.UninitializedParameter):
                with torch.inference_mode(False), torch.no_grad():
                    head(torch.zeros(1, feature.shape[1], device=feature.device))
                weight = next(iter(head.parameters()))
            autocast = torch.is_autocast_enabled(feature.device.type)
            if feature.is_floating_point() and weight.dtype != feature.dtype and not autocast:
                head.to(feature.dtype)

    # --- loss -----------------------------------------------------------------------------

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss of this step; also computes and stores the coefficients.

        Call it once after each forward of the model and before ``backward()``. Under
        ``torch.no_grad()`` (validation), or with every encoder in eval mode, it returns the
        loss and leaves the coefficients, scores and history untouched.

        Args:
            logits: the model's fused logits, ``(B, num_classes)``, B >= 1.
            target: integer class labels, ``(B,)``, in ``[0, num_classes)``, on the logits'
                device.

        Raises:
            CaptureError: an encoder produced no output in the forward before this call.
            NonFiniteError: non-finite inputs with ``nonfinite="raise"``.
            InputError, InputTypeError: logits or labels of the wrong shape, dtype or device,
                or an empty batch.
            OrderError: an optimizer updates the model but not the balancer's heads.
        """
        grad_enabled = torch.is_grad_enabled()
        captures = self._captures.take(grad_enabled)
        target = self._check_inputs(logits, target)
        training = grad_enabled and logits.requires_grad
        if training and not any(c.train_mode for c in captures.values()):
            self._warn_eval_mode()
            training = False
        features = {name: self._feature(name, c.output) for name, c in captures.items()}
        binding = next(iter(captures.values())).binding
        step = Step(
            self,
            logits,
            target,
            features,
            {n: c.output for n, c in captures.items()},
            training,
            binding,
        )
        if self.heads:
            self._prepare_heads(features)
        stacked = _stack_if_uniform(features)
        if training:
            self._begin_training_step(step, stacked)
        if self.heads:
            detach = self.head_mode == "probe"
            if stacked is not None and stackable(self.heads, features):
                step.stacked_unimodal = stacked_head_logits(self.heads, features, detach)
                step.unimodal = dict(zip(self.names, step.stacked_unimodal.unbind()))
            else:
                step.unimodal = separate_head_logits(self.heads, features, detach)
        total = self._loss(step)
        if training:
            self._end_training_step(step, total)
        return total

    def _loss(self, step: Step) -> torch.Tensor:
        raise NotImplementedError

    def _begin_training_step(self, step: Step, stacked: torch.Tensor | None) -> None:
        self._training_calls += 1
        self._check_optimizer()
        if world_size(self.process_group) > 1:
            self._prepare_distributed()
        step.finite = self._check_finite(step, stacked)
        if self._training_calls % self._history.flush_every == 0:
            self._raise_deferred()
        if self._gradient_guard is not None:
            self._gradient_guard.step = self.steps
            self._gradient_guard.raise_at_once = self.raises_at_once(step.logits)

    def _end_training_step(self, step: Step, total: torch.Tensor) -> None:
        """Bind the next forward to fresh coefficients (this forward keeps its own)."""
        values = step.stored if step.stored is not None else self.last_coefficients.clone()
        if step.binding is not None:
            self._last_binding = step.binding
            if self.uses_parameter_hooks and total.requires_grad:
                total.register_hook(partial(_note_backward, weakref.ref(self), step.binding))
        self._binding = Binding(values)

    def _warn_eval_mode(self) -> None:
        if self._warned_eval_mode:
            return
        self._warned_eval_mode = True
        warnings.warn(
            "loss() was called with gradients enabled while every encoder is in eval mode: "
            "gradbalance treats this call as evaluation and leaves the coefficients, scores and "
            "history unchanged (a backward of it still applies the last coefficients). Call "
            "model.train() before training steps and run evaluation under torch.no_grad(). To "
            "train with frozen BatchNorm statistics, keep the encoders in train mode and call "
            ".eval() on the BatchNorm layers only.",
            stacklevel=3,
        )

    def _check_inputs(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise InputTypeError("loss(logits, target) takes two tensors")
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise InputError(
                f"logits must have shape (B, num_classes={self.num_classes}), "
                f"got {tuple(logits.shape)}"
            )
        if logits.shape[0] == 0:
            raise InputError(
                "loss() got an empty batch (B = 0): no statistic is defined on it; skip empty "
                "batches in your loop (e.g. DataLoader(..., drop_last=True) with a small dataset)"
            )
        if not logits.is_floating_point():
            raise InputTypeError(f"logits must be floating point, got {logits.dtype}")
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise InputTypeError(
                f"target must hold integer class indices (torch.long), got {target.dtype}"
            )
        if target.shape != logits.shape[:1]:
            raise InputError(
                f"target must have shape ({logits.shape[0]},) to match the logits, "
                f"got {tuple(target.shape)}"
            )
        if target.device != logits.device:
            raise InputError(
                f"target is on {target.device} but the logits are on {logits.device}: move the "
                "labels to the logits' device (target.to(logits.device))"
            )
        in_range = ((target >= 0) & (target < self.num_classes)).all()
        torch._assert_async(in_range, f"target labels must lie in [0, {self.num_classes})")
        return target.long()

    # --- optimizer watch ---------------------------------------------------------------------

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Called before every optimizer step (a global pre-step hook watches them)."""
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if ids.isdisjoint(self._model_parameter_ids):
            if not ids.isdisjoint(id(p) for p in self.parameters()):
                self._stepped_heads = True
            return
        self._stepped_model = True
        if not ids.isdisjoint(id(p) for p in self.parameters()):
            self._stepped_heads = True
        guard = self._gradient_guard
        if guard is None:
            return
        finite = guard.all_finite()
        guard.reset()
        if self.nonfinite == "skip":
            self.note_finite(finite & self.last_step_finite)
            if not bool(finite):  # the documented host synchronisation of check_gradients
                self.nonfinite_steps.add_(1)
                for group in optimizer.param_groups:
                    for param in group["params"]:
                        param.grad = None
        else:
            self._record_first_nonfinite(finite.reshape(1), len(self.names) + 1)

    def _check_optimizer(self) -> None:
        stepped_model, stepped_heads = self._stepped_model, self._stepped_heads
        self._stepped_model = self._stepped_heads = False
        if stepped_model and not stepped_heads and any(p.requires_grad for p in self.parameters()):
            raise OrderError(
                "an optimizer stepped the model but no optimizer updates the balancer's "
                "heads (bal.parameters()), so they would stay at their initial values. Build "
                "the optimizer after the balancer with both: torch.optim.Adam([*model."
                "parameters(), *bal.parameters()]) (or opt.add_param_group({'params': "
                f"list(bal.parameters())}})). Order: {WRAP_ORDER}"
            )

    # --- non-finite guard ------------------------------------------------------------------

    def raises_at_once(self, tensor: torch.Tensor) -> bool:
        """Whether a non-finite step raises at once (``"raise"`` with tensors on the CPU)."""
        return (
            self.nonfinite == "raise"
            and not self._defer_nonfinite_errors
            and tensor.device.type == "cpu"
            and self.last_scores.device.type == "cpu"
        )

    def _nonfinite_labels(self) -> list[str]:
        labels = [f"the feature of encoder {n!r}" for n in self.names] + ["the fused logits"]
        return labels + ["the gradients into the encoders"]

    def _check_finite(self, step: Step, stacked: torch.Tensor | None) -> torch.Tensor | None:
        """This step's finite flag (None: checked and raised at once on the CPU)."""
        device = self.last_scores.device
        with torch.no_grad():
            features = stacked if stacked is not None else list(step.features.values())
            flags = finite_flags(features, step.logits, device)
            if self.raises_at_once(step.logits):
                try:  # on the CPU the assertion is synchronous (and no device synchronisation)
                    torch._assert_async(flags.all(), "non-finite")
                except RuntimeError:
                    label = self._nonfinite_labels()[flags.tolist().index(False)]
                    raise NonFiniteError(nonfinite_message(label, self.steps)) from None
                return None
            if self.nonfinite == "raise":
                self._record_first_nonfinite(flags, 0)
            return flags.all()

    def _record_first_nonfinite(self, flags: torch.Tensor, offset: int) -> None:
        """Remember on the device the first step at which each checked tensor was non-finite."""
        slots = len(self.names) + 2
        first = self._nonfinite_first
        if first is None or first.device != flags.device:
            first = torch.full((slots,), -1, dtype=torch.int64, device=flags.device)
        part = first[offset : offset + flags.numel()]
        updated = torch.where(~flags & (part < 0), self.steps, part)
        self._nonfinite_first = torch.cat(
            [first[:offset], updated, first[offset + flags.numel() :]]
        )

    def _raise_deferred(self) -> None:
        first = self._nonfinite_first
        if first is None:
            return
        for label, step in zip(self._nonfinite_labels(), first.tolist()):
            if step >= 0:
                self._nonfinite_first = None
                raise NonFiniteError(nonfinite_message(label, step))

    def check_finite(self) -> None:
        """Raise now the error of a non-finite step recorded on an accelerator (one host
        synchronisation); on the CPU errors are raised at once."""
        self._raise_deferred()

    def note_finite(self, finite: torch.Tensor) -> None:
        """Record whether the last training step was finite (device-side)."""
        self._last_finite = finite

    @property
    def last_step_finite(self) -> torch.Tensor:
        """0-dim bool tensor on the device: whether the last training step was finite.

        For loops without a ``GradScaler`` and with ``nonfinite="skip"``:
        ``if bal.last_step_finite: opt.step()`` (a host synchronisation, at your choice).
        With ``check_gradients=True`` it also covers the gradients of the last backward.
        """
        finite = self._last_finite
        if finite is None:
            finite = torch.ones((), dtype=torch.bool, device=self.last_scores.device)
        guard = self._gradient_guard
        return finite & guard.all_finite() if guard is not None else finite

    # --- distributed ------------------------------------------------------------------------

    def world_size(self) -> int:
        """Processes sharing the training in this balancer's group (1 without distributed)."""
        return world_size(self.process_group)

    def _reduce_mean(self, sums: torch.Tensor, count: torch.Tensor | float) -> torch.Tensor:
        """Mean over all ranks with ``sync="global"`` (outside ``loss()``: every rank must
        call it, e.g. in ``epoch_end()``), else local. No host synchronisation."""
        if self.sync == "global" and self.world_size() > 1:
            return reduce_mean(sums, count, self.process_group)[0]
        return local_mean(sums, count)

    def _prepare_distributed(self) -> None:
        """First training step under torch.distributed: same heads everywhere, synced grads."""
        if self._distributed_ready:
            return
        broadcast_parameters(self, self.process_group)
        trainable = [p for p in self.parameters() if p.requires_grad]
        self._attachment.add_gradient_hooks(
            trainable, partial(_average_over_ranks, weakref.ref(self))
        )
        self._distributed_ready = True

    # --- results and state ------------------------------------------------------------------

    def coefficient_buffer(self, name: str) -> torch.Tensor:
        """The coefficient of encoder ``name`` used by the last training ``loss()`` (a view)."""
        return self.last_coefficients[self._index[name]]

    def record_history(
        self, coefficients: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor | None
    ) -> None:
        """Append one step to :attr:`history` (device-side)."""
        self._history.record(coefficients, scores, valid)

    def after_backward(self) -> None:
        """Per-parameter work on the final gradients; a no-op for MLB, Multi-Loss and Joint.

        Call it after ``loss.backward()`` (after ``scaler.unscale_(opt)`` under AMP) and
        before ``opt.step()`` in every loop, so switching to a method that needs it (OGM-GE's
        noise, AGM's clipping) needs no change of the loop.
        """

    def epoch_end(self) -> None:
        """Mark the end of a training epoch (advances :attr:`epoch`); call once per epoch."""
        self.epoch += 1

    @property
    def coefficients(self) -> dict[str, torch.Tensor]:
        """``{name: 0-dim tensor}``: the coefficients used by the last training ``loss()``."""
        values = self.last_coefficients.detach().clone()
        return {name: values[index] for index, name in enumerate(self.names)}

    @property
    def scores(self) -> dict[str, torch.Tensor]:
        """``{name: 0-dim tensor}``: the per-modality scores of the last training ``loss()``."""
        values = self.last_scores.detach().clone()
        return {name: values[index] for index, name in enumerate(self.names)}

    @property
    def history(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-step ``{name: {"coefficients": (steps,), "scores": (steps,)}}`` on the CPU
        (finite training steps only)."""
        self._raise_deferred()
        return self._history.as_dict()

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        old = [f"{prefix}coefficient_{name}" for name in self.names]
        if all(key in state_dict for key in old) and f"{prefix}last_coefficients" not in state_dict:
            state_dict = dict(state_dict)  # a checkpoint of an earlier version: one buffer each
            state_dict[f"{prefix}last_coefficients"] = torch.stack([state_dict.pop(k) for k in old])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self) -> dict[str, Any]:
        return {"steps": self.steps, "epoch": self.epoch}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.epoch = int(state.get("epoch", 0))

    def extra_repr(self) -> str:
        return f"encoders={self.names}, num_classes={self.num_classes}"


def _module_device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _stack_if_uniform(features: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    tensors = list(features.values())
    first = tensors[0]
    if all(
        t.shape == first.shape and t.device == first.device and t.dtype == first.dtype
        for t in tensors
    ):
        return torch.stack(tensors)
    return None


def _average_over_ranks(balancer: weakref.ref, grad: torch.Tensor) -> torch.Tensor | None:
    """Gradient hook of a head parameter under torch.distributed: the mean over the ranks."""
    bal = balancer()
    if bal is None or bal._heads_in_ddp or bal.world_size() == 1:
        return None
    return average_gradient(grad, bal.process_group)


def _note_backward(balancer: weakref.ref, binding: Binding, grad: torch.Tensor) -> None:
    """Hook on a returned loss: which bindings the running backward covers."""
    bal = balancer()
    if bal is None or _GRAPH_TASK_ID is None:
        return
    task = _GRAPH_TASK_ID()
    current, bindings = bal._backward_bindings
    if current != task:
        bal._backward_bindings = (task, [binding])
    elif all(b is not binding for b in bindings):
        bindings.append(binding)


def _scale_parameter_gradient(
    balancer: weakref.ref, index: int, grad: torch.Tensor
) -> torch.Tensor:
    """Gradient hook of a parameter scaled per parameter: ``grad * k_index`` of the loss()
    whose backward is running (read at backward time)."""
    bal = balancer()
    if bal is None:
        return grad
    task, bindings = bal._backward_bindings
    current = _GRAPH_TASK_ID() if _GRAPH_TASK_ID is not None else -1
    if task == current and len(bindings) > 1:
        raise CaptureError(
            "two loss() results are summed into one backward while gradients are scaled per "
            "parameter (extra_parameters=, OGM parameters='conv'), whose coefficient cannot be "
            "told apart per loss: call one backward per loss() (gradient accumulation works)"
        )
    binding = bindings[0] if task == current and bindings else bal._last_binding
    if binding is None:
        return grad
    return grad * binding.views[index].to(device=grad.device, dtype=grad.dtype)
