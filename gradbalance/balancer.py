"""The :class:`Balancer` base class: the thin public front every balancing method shares.

A balancer attaches to a user's model without changing it: one forward hook per encoder
captures the encoder's output and routes it through the gradient-scaling Function of
``gradbalance._scale`` with the coefficients bound to that forward. ``loss()`` computes the
method's statistics, writes the coefficients into that forward's binding and returns the
training loss; the user's ordinary ``backward()`` applies them. Nothing here synchronises
with the host. The parts behind this front: validation (``_checks``), hooks and their removal
(``_attach``), per-forward captures (``_capture``), the per-step contract with the methods
(``_step``), training step or evaluation (``_mode``), per-parameter scaling
(``_scaled_parameters``), the non-finite guard (``_finite``) and the statistics across
ranks (``_distributed``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from gradbalance._attach import (
    DETACHED,
    AttachAfterInit,
    Attachment,
    module_device,
    refuse_functional_transform,
    refuse_owned,
)
from gradbalance._capture import CaptureStore, FeatureFn, extract_feature, pool_feature
from gradbalance._checks import (
    check_choice,
    check_common,
)
from gradbalance._deprecation import DeprecatedHelpers
from gradbalance._distributed import RankSync
from gradbalance._duties import LoopDuties
from gradbalance._head_logits import (
    head_logits,
    prepare_heads,
    separate_head_logits,
    stack_if_uniform,
)
from gradbalance._mode import ModeWarnings, is_training_step
from gradbalance._optimizer_watch import OptimizerWatch
from gradbalance._presence_checks import check_present
from gradbalance._scale import BackwardBindings, Binding, in_backward, scale_grad_tree
from gradbalance._scaled_parameters import ScaledParameters
from gradbalance._services import MethodServices
from gradbalance._step import Step, StepContext
from gradbalance._task import Task, make_task
from gradbalance._unimodal import no_unimodal_classifier
from gradbalance.errors import CaptureError

__all__ = ["Balancer", "Step", "pool_feature"]

Pool = Literal["spatial", "tokens", "cls"]
HeadMode = Literal["train", "probe", "none"]
Sync = Literal["global", "local"]
NonFinite = Literal["raise", "skip"]


class Balancer(MethodServices, DeprecatedHelpers, metaclass=AttachAfterInit):
    """Base class of every balancing method: taps, heads, coefficients, history.

    Subclasses implement ``_loss(step)`` (see ``gradbalance._step``); all a user touches is
    shared. The balancer is an ``nn.Module`` that holds its heads and running state, never
    the model's parameters: optimise ``[*model.parameters(), *bal.parameters()]``.

    Lifecycle: nothing is attached until every argument is validated; one balancer per
    encoder (``remove()`` the old one first); each forward of the model is bound to its own
    coefficients, so two ``loss()`` results summed before one ``backward()`` are each scaled
    by their own; a training forward not followed by ``loss()`` is superseded by the next
    forward (one warning); the model pickled, deep-copied or wrapped in ``AveragedModel``
    is the plain model (no hook travels), while a copy or pickle that holds the balancer
    too (a module holding both, ``torch.save({"model": model, "bal": bal})``) gives a
    balancer attached to the copied model, with its whole state; the heads follow the
    encoders' dtype. Training step or evaluation is decided by gradients and by the
    balancer's own mode (``bal.train()``/``bal.eval()``), never by the encoders' modes.

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
        task: ``"classification"`` (default) or, for the methods in
            :attr:`supported_tasks`, ``"regression"`` (then ``num_classes`` is left out).
        loss: regression only: every training loss, ``"l1"`` (default), ``"mse"`` or
            ``"huber"``.
        output_dim: regression only: values predicted per sample (default 1).
        error: regression only: each head's score, its batch ``"mse"`` (default) or
            ``"mae"`` (lower is better).

    Writing a method: subclass :class:`~gradbalance.Method`, implement ``_loss(step)`` with
    the services of :class:`~gradbalance.Step`, declare running state with
    :meth:`add_state` and register it with :func:`~gradbalance.register_method` (see the
    "Writing a method" page).

    Example:
        >>> import torch, gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.MultiLoss(model, encoders=[model.audio, model.video], num_classes=3)
        >>> loss = bal.loss(model(torch.randn(4, 8), torch.randn(4, 6)), torch.tensor([0, 1, 2, 0]))
        >>> loss.backward()
        >>> sorted(bal.coefficients)
        ['audio', 'video']
    """

    last_coefficients: torch.Tensor
    last_scores: torch.Tensor
    nonfinite_steps: torch.Tensor
    _root_model: nn.Module

    head_mode: HeadMode = "train"
    """"train": heads trained on the features, their loss reaches the encoders; "probe":
    heads on detached features (stop-gradient linear probes); "none": no heads."""

    scales_gradients: bool = True
    """Whether the coefficients scale the gradients into the encoders' outputs."""

    uses_parameter_hooks: bool = False
    """Whether some gradients are scaled by per-parameter hooks (read at backward time)."""

    supported_tasks: tuple[str, ...] = ("classification",)
    """The values of ``task=`` the method accepts."""

    _task: Task

    def __init__(
        self,
        model: nn.Module,
        encoders: Sequence[nn.Module] | Mapping[str, nn.Module],
        num_classes: int | None,
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
        task: str = "classification",
        loss: str | None = None,
        output_dim: int | None = None,
        error: str | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self._task = make_task(name, task, loss, output_dim, error, self.supported_tasks)
        if head_mode is not None:
            self.head_mode = check_choice("head_mode", head_mode, ("train", "probe", "none"))
        options = check_common(
            model, encoders, num_classes, feature_dims, pool, features, flush_every, sync, nonfinite
        )
        encoder_map = options.encoders
        refuse_owned(encoder_map)
        self.names: list[str] = list(encoder_map)
        self._encoders = encoder_map
        self._pool, self._features, dims = options.pools, options.features, options.dims
        self.sync: Sync = sync
        self.nonfinite: NonFinite = nonfinite
        self.num_classes = self._task.check_classes(num_classes)
        self.process_group = process_group
        device = module_device(next(iter(encoder_map.values())))
        self.heads = (
            self._task.make_heads(dims, encoder_map, self.num_classes)
            if self.head_mode != "none"
            else nn.ModuleDict()
        )
        self._new_state(device, flush_every, nonfinite, bool(check_gradients))
        self.__dict__["_root_model"] = model  # not a submodule: state_dict never holds it
        self._scaled_parameters = ScaledParameters(model, {}, None)
        self._state_reductions = {}
        self._paused = 0
        self._training_calls = 0
        self._modes = ModeWarnings()
        self._duties = LoopDuties()
        self._new_links()

    def _new_links(self) -> None:
        """The parts bound to this process and to the model object: hooks (not yet attached),
        captures, the optimizer watch, the ranks' state."""
        model = self._root_model
        self._attachment = Attachment(model, self._encoders, self)
        self._watch = OptimizerWatch(model, self.parameters)
        self._captures = CaptureStore(self.names)
        self._backward = BackwardBindings()
        self._ranks = RankSync(model, self.process_group)

    def _require_attached(self) -> None:
        if not self._attachment.attached:
            raise CaptureError(DETACHED)

    def train(self, mode: bool = True) -> Balancer:
        """Train mode (default) or, with ``mode=False``, eval mode (:meth:`eval`): the switch
        that decides whether a ``loss()`` with gradients enabled is a training step. A parent
        module's ``.train()``/``.eval()`` sets it too (Lightning's validation loop)."""
        self._modes.chosen = True
        return super().train(mode)

    # --- attachment -----------------------------------------------------------------------

    def _attach(self) -> None:
        """Called once the most-derived constructor has validated everything."""
        self._attachment.attach(self._on_output, self._on_model_forward)
        self._scaled_parameters.attach(self._attachment, self._backward.scale, self._index)

    def remove(self) -> None:
        """Remove every hook: the model's forward and backward are exactly as before."""
        self._attachment.detach()
        self._scaled_parameters.stop()
        self._captures.clear()
        self._ranks = RankSync(self._root_model, self.process_group)

    def _on_model_forward(self) -> None:
        if torch.compiler.is_compiling() or self._paused:
            return
        if not in_backward():
            self._captures.model_forward(torch.is_grad_enabled())
            self._duties.model_forward(torch.is_grad_enabled() and self._root_model.training, self)

    def _on_output(self, name: str, module: nn.Module, output: Any) -> Any:
        """The tap of encoder ``name``: capture its output, return the scaled copy (or the
        model's branch of :meth:`_fork_output`)."""
        if self._paused:
            return None
        grad = torch.is_grad_enabled()
        binding = self._binding if grad else None
        index = self._index[name]
        k = binding.views[index] if binding is not None and self.scales_gradients else None
        refuse_functional_transform(name)
        compiling = torch.compiler.is_compiling()
        recomputing = not compiling and in_backward()  # checkpointing: scale, capture nothing
        watch = self._guard.watch(index) if grad and not compiling else None
        fork = self._fork_output(name, output, watch) if grad and not recomputing else None
        model_output, captured = (output, output) if fork is None else fork
        if compiling:
            self._captures.record_compiled(name, captured, grad, module.training, binding)
        elif not recomputing:
            self._ranks.check_wrapper(self)
            self._captures.record(name, captured, grad, module.training, binding)
        if fork is not None:
            return model_output
        return scale_grad_tree(output, k, name, watch)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Within this block the encoders' forwards are neither captured nor scaled (extra
        passes a method or the user runs through the model: masked passes, a second view)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def features(self) -> dict[str, torch.Tensor]:
        """The ``(B, D)`` feature of each encoder from the latest forward of the model.

        Raises:
            CaptureError: that forward did not run every encoder (never stale values).
        """
        self._require_attached()
        captures = self._captures.latest_captures()
        return {name: self._feature(name, c.output) for name, c in captures.items()}

    def _feature(self, name: str, output: Any) -> torch.Tensor:
        return extract_feature(name, output, self._pool[name], self._features[name])

    def unimodal_logits(self) -> dict[str, torch.Tensor]:
        """Detached ``{name: (B, K)}`` logits, on the latest forward, of a classifier that sees
        modality ``name`` alone: the method's heads (MLB, Multi-Loss) or detached linear probes
        (``probes=True``). ``UnavailableError`` (naming the fix) when the method has none."""
        features = self.features()
        if not self.heads:
            raise no_unimodal_classifier(self)
        with torch.no_grad():
            prepare_heads(self.heads, features)
            return separate_head_logits(self.heads, features, detach=True)

    def loss(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        present: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The training loss of this step; also computes and stores the coefficients.

        Call it once after each forward of the model and before ``backward()``. It is a
        training step when gradients are enabled and the balancer is in train mode (the
        default; the encoders' own train/eval modes never matter). Under ``torch.no_grad()``
        or ``torch.inference_mode()`` (validation), or after ``bal.eval()``, it returns the
        loss and leaves the coefficients, scores and history untouched.

        Args:
            logits: the model's fused logits, ``(B, num_classes)``, B >= 1.
            target: integer class labels, ``(B,)``, in ``[0, num_classes)``, on the logits'
                device (``task="regression"``: real targets ``(B, output_dim)``).
            present: missing modalities: a ``(B, M)`` bool tensor (columns in encoder order)
                or a dict ``name -> (B,)`` bool tensor, on the logits' device; False where that
                sample's input of that modality carries no information. Each head's loss and
                every statistic of the method then use the samples where the modality is
                present, and a modality absent from the whole (global) batch keeps its
                coefficient and score. ``None`` (default): every sample has every modality.
                The fused loss is the model's: zero-fill or learn a token for the missing
                input there. A sample with no modality present is refused.

        Raises:
            CaptureError: an encoder produced no output in the forward before this call.
            NonFiniteError: non-finite inputs with ``nonfinite="raise"``.
            InputError, InputTypeError: logits or labels of the wrong shape, dtype or device,
                or an empty batch; a ``present`` mask not of the form above.
            OrderError: an optimizer updates the model but not the balancer's heads.
        """
        self._require_attached()
        grad_enabled = torch.is_grad_enabled()
        captures = self._captures.take(grad_enabled)
        target = self._task.check_inputs(logits, target, self.num_classes)
        present = check_present(present, self.names, target.shape[0], logits.device)
        gradients = grad_enabled and logits.requires_grad
        training = is_training_step(gradients, self.training)
        encoders_training = any(c.train_mode for c in captures.values())
        self._modes.warn(gradients, self.training, encoders_training)
        outputs = {name: c.output for name, c in captures.items()}
        features = {name: self._feature(name, output) for name, output in outputs.items()}
        binding = next(iter(captures.values())).binding
        context = self._step_context()
        step = Step(context, logits, target, features, outputs, training, binding, present)
        prepare_heads(self.heads, features)
        stacked = stack_if_uniform(features)
        if training:
            self._begin_training_step(step, stacked)
        if self.heads:
            detach = self.head_mode == "probe"
            step.set_unimodal(*head_logits(self.heads, features, stacked, detach))
        total = self._loss(step)
        if training:
            self._end_training_step(step, total)
        return total

    def _step_context(self) -> StepContext:
        world_size = self.world_size()
        synced = self.sync == "global" and world_size > 1
        return StepContext(
            names=self.names,
            task=self._task,
            device=self.last_scores.device,
            synced=synced,
            process_group=self.process_group,
            guard=self._guard,
            index=self.steps,
            previous=(self.last_coefficients, self.last_scores),
            world_size=world_size,
        )

    def _begin_training_step(self, step: Step, stacked: torch.Tensor | None) -> None:
        self._training_calls += 1
        self._watch.check()
        self._scaled_parameters.check()
        self._ranks.prepare(self, self._attachment)
        self._guard.step = self.steps
        step.finite = self._guard.check_inputs(
            stacked if stacked is not None else list(step.features.values()), step.logits
        )
        if self._training_calls % self._history.flush_every == 0:
            self._guard.raise_recorded()

    def _end_training_step(self, step: Step, total: torch.Tensor) -> None:
        """Record what the method stored; bind the next forward to fresh coefficients (this
        forward keeps its own)."""
        if step.stored is not None:
            self._commit(*step.stored)
        values = self.last_coefficients.clone()  # never a tensor a graph may have saved
        if step.binding is not None and self.uses_parameter_hooks and total.requires_grad:
            total.register_hook(self._backward.loss_hook(step.binding))
        self._binding = Binding(values)

    # --- optimizer steps and the non-finite guard ------------------------------------------

    def _optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Called before every optimizer step (a global pre-step hook watches them)."""
        if self._watch.note(optimizer):
            self._guard.close_step(optimizer, self.nonfinite_steps)

    def check_finite(self) -> None:
        """Raise now the error of a non-finite step recorded on an accelerator (one host
        synchronisation); on the CPU errors are raised at once."""
        self._guard.raise_recorded()

    @property
    def last_step_finite(self) -> torch.Tensor:
        """0-dim bool tensor on the device: whether the last training step was finite.

        For loops without a ``GradScaler`` and with ``nonfinite="skip"``:
        ``if bal.last_step_finite: opt.step()`` (a host synchronisation, at your choice).
        With ``check_gradients=True`` it also covers the gradients since the last step.
        """
        return self._guard.step_finite()

    # --- results and state ------------------------------------------------------------------

    def after_backward(self) -> None:
        """Per-parameter work on the final gradients; a no-op for MLB, Multi-Loss and Joint.

        Call it after ``loss.backward()`` (after ``scaler.unscale_(opt)`` under AMP) and
        before ``opt.step()`` in every loop, so switching to a method that needs it (OGM-GE's
        noise, AGM's clipping) needs no change of the loop.
        """

    def epoch_end(self) -> None:
        """Mark the end of a training epoch (advances :attr:`epoch`); call once per epoch."""
        self.epoch += 1
        self._duties.epoch_end()

    def extra_repr(self) -> str:
        return f"encoders={self.names}, num_classes={self.num_classes}{self._task.describe()}"
