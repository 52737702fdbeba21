"""What a balancing method may read, call and override beyond :class:`~gradbalance.Step`:
the extension surface of :class:`~gradbalance.Balancer` (the "Writing a method" page).

:class:`MethodServices` is the base of ``Balancer`` that holds it: the hooks a method
overrides (``_loss``, ``_fork_output``), the balancer's model, encoders and task, running
state declared with :meth:`MethodServices.add_state`, the latest forward's outputs and
features, parameters whose gradients the coefficients also scale, and means over the ranks.
A method module uses these and the balancer's public members, never its private attributes
(a test reads every module of ``gradbalance/methods`` for that).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from gradbalance._capture import CaptureStore
from gradbalance._checks import check_choice, check_scaled_parameters
from gradbalance._distributed import average_gradient, local_mean, reduce_mean, world_size
from gradbalance._parameter_watch import Reselect
from gradbalance._scaled_parameters import ScaledParameters
from gradbalance._state import BalancerState
from gradbalance._step import Step
from gradbalance.errors import ConfigurationError

StateReduce = Literal["sum", "mean"]


class MethodServices(BalancerState):
    """The hooks and services of a method (see the module docstring); the
    :class:`~gradbalance.Balancer` front provides the attributes they read.

    Example:
        >>> import torch, gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.Joint(model, [model.audio, model.video], num_classes=3)
        >>> bal.add_state("seen", torch.zeros(()))
        >>> _ = model(torch.randn(4, 8), torch.randn(4, 6))
        >>> sorted(bal.encoder_outputs()), bal.task, "seen" in bal.state_dict()
        (['audio', 'video'], 'classification', True)
        >>> _ = bal.take_features()  # consumed: the next forward is a new step
    """

    num_classes: int | None
    sync: str
    process_group: Any
    scales_gradients: bool
    uses_parameter_hooks: bool
    _encoders: dict[str, nn.Module]
    _captures: CaptureStore
    _scaled_parameters: ScaledParameters
    _state_reductions: dict[str, StateReduce | None]

    def _require_attached(self) -> None:
        raise NotImplementedError

    def _feature(self, name: str, output: Any) -> torch.Tensor:
        raise NotImplementedError

    def _loss(self, step: Step) -> torch.Tensor:
        """Hook (required): this step's loss, with graph. In a training step
        (``step.training``) call ``step.store(coefficients, scores)`` once."""
        raise NotImplementedError

    def _fork_output(self, name: str, output: Any, watch: Any) -> tuple[Any, Any] | None:
        """Hook (optional): give the heads their own branch of encoder ``name``'s output.

        Called in every forward with gradients enabled (compiled ones included, not in a
        recomputation during ``backward()``); ``watch`` is the non-finite guard's gradient
        watch of that encoder (``None`` under ``torch.compile``), for the method to pass to
        what it builds. Return ``(model_branch, captured_branch)``: the model continues with
        ``model_branch`` as it is (the method owns its gradient: nothing else scales or
        watches it) and the balancer captures ``captured_branch`` (the features and heads
        read it). ``None`` (the default): one output, captured and scaled by k as usual.
        """
        return None

    @property
    def model(self) -> nn.Module:
        """The model this balancer is attached to (not a submodule of the balancer)."""
        return self._root_model

    @property
    def encoders(self) -> dict[str, nn.Module]:
        """``{name: module}``: the encoders, in order."""
        return dict(self._encoders)

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"``."""
        return self._task.name

    @property
    def output_dim(self) -> int:
        """Width of the heads' outputs: ``num_classes``, or the regression target's width."""
        return self._task.output_width(self.num_classes)

    def encoder_outputs(self) -> dict[str, Any]:
        """``{name: output}``: each encoder's raw output in the latest forward of the model
        (with graph; for a method's extra passes on them, e.g. masked fusions).

        Raises:
            CaptureError: that forward did not run every encoder.
        """
        self._require_attached()
        return {name: c.output for name, c in self._captures.latest_captures().items()}

    def take_features(self) -> dict[str, torch.Tensor]:
        """:meth:`features`, consumed as ``loss()`` consumes them: for a method's own calls
        after a forward that is not followed by ``loss()`` (PMR's prototype pass)."""
        self._require_attached()
        captures = self._captures.take(torch.is_grad_enabled())
        return {name: self._feature(name, c.output) for name, c in captures.items()}

    def add_state(
        self,
        name: str,
        default: torch.Tensor,
        *,
        reduce: StateReduce | None = None,
        persistent: bool = True,
    ) -> None:
        """Declare a running state tensor of the method (an EMA, a running mean, a count).

        It becomes a buffer on the balancer's device: in ``state_dict()`` (unless
        ``persistent=False``), moved by ``.to()``, carried by copies and pickles, and
        updated through :meth:`update_state`, which keeps it when the step is not finite.
        A state updated from ``step.mean`` statistics is the same on every rank; one that
        accumulates this rank's own values declares ``reduce="sum"`` or ``"mean"`` and is
        read across the ranks with :meth:`synced_state`.
        """
        if reduce is not None:
            check_choice("reduce", reduce, ("sum", "mean"))
        self.register_buffer(name, default.detach().clone().to(self.last_scores.device), persistent)
        self._state_reductions[name] = reduce

    def update_state(
        self, step: Step, name: str, value: torch.Tensor, *, replace: bool = False
    ) -> None:
        """Set the state ``name`` (see :meth:`add_state`) to ``value`` unless this step or
        ``value`` is not finite (then it keeps its value). No host synchronisation; under DDP
        call it after this step's ``step.mean`` (every rank then agrees on the step).

        ``replace=True`` binds a new tensor to the state instead of writing into it: for a
        state that the model's forward reads (in :meth:`_fork_output`), which that forward's
        graph may have saved for its backward (autograd refuses a saved tensor changed in
        place, and under ``torch.compile`` the graph may save the state itself). The state
        stays a buffer (``state_dict()``, ``.to()``); hold no other reference to it.

        Raises:
            ConfigurationError: ``replace=True`` with a value of another shape than the
                state's.
        """
        state = getattr(self, name)
        with torch.no_grad():
            new = step.keep_if_finite(value.to(device=state.device, dtype=state.dtype), state)
            if not replace:
                state.copy_(new)
                return
        if new.shape != state.shape:
            raise ConfigurationError(
                f"update_state({name!r}, replace=True) needs a value of the state's shape "
                f"{tuple(state.shape)}, got {tuple(new.shape)}"
            )
        setattr(self, name, new)

    def synced_state(self, name: str) -> torch.Tensor:
        """The state ``name`` over all ranks: the sum or the mean of the ranks' values, as its
        ``add_state(reduce=...)`` says, with ``sync="global"`` under torch.distributed; the
        local value otherwise (float32, detached). Every rank must call it (e.g. in
        ``epoch_end()``); no host synchronisation.

        Raises:
            ConfigurationError: the state was declared without ``reduce=``.
        """
        reduce = self._state_reductions.get(name)
        if reduce is None:
            raise ConfigurationError(
                f"the state {name!r} has no reduction across ranks: declare it with "
                "add_state(..., reduce='sum') or reduce='mean'"
            )
        mean = self.reduce_mean(getattr(self, name), 1.0)
        synced = self.sync == "global" and self.world_size() > 1
        return mean * self.world_size() if reduce == "sum" and synced else mean

    def scale_parameter_gradients(
        self, parameters: Mapping[str, Iterable[nn.Parameter]], reselect: Reselect = None
    ) -> None:
        """In a method's constructor: parameters whose gradients k_name also scales
        (``{name: parameters}``, validated); ``reselect``: the rule that chose them, applied
        again after a change of the model."""
        inside_allowed = not self.scales_gradients
        selected = check_scaled_parameters(parameters, self._encoders, inside_allowed)
        self._scaled_parameters = ScaledParameters(self._root_model, selected, reselect)
        self.uses_parameter_hooks = bool(selected)

    def watch_parameters(
        self, parameters: Mapping[str, Iterable[nn.Parameter]], reselect: Reselect = None
    ) -> None:
        """In a method's constructor: the encoders' parameters whose gradients the method
        changes itself (``after_backward()``: AMSS's masks, InfoReg's proximal pull), as
        ``{name: parameters}``. A later change of the model that replaces them (a
        re-parametrization such as ``weight_norm``, an adapter, FSDP2's re-registration) is
        refused at the next training ``loss()`` with an ``OrderError`` naming the parameter,
        instead of the method working on parameters the model no longer uses. ``reselect``:
        the rule that chose them, applied again to tell a change of the chosen set from an
        unrelated one. A method calls this or :meth:`scale_parameter_gradients`, not both."""
        selected = check_scaled_parameters(parameters, self._encoders, inside_allowed=True)
        self._scaled_parameters = ScaledParameters(
            self._root_model, selected, reselect, hooks=False
        )

    def world_size(self) -> int:
        """Processes sharing the training in this balancer's group (1 without distributed)."""
        return world_size(self.process_group)

    def replica_mean(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` every replica must apply alike (factors a method applies to the final
        gradients in ``after_backward()``): with ``sync="local"`` under torch.distributed each
        rank computed its own from its local batch, so their mean over the ranks (one
        all-reduce; every rank calls it); otherwise ``values`` as they are."""
        if self.sync == "local" and self.world_size() > 1:
            return average_gradient(values, self.process_group)
        return values

    def reduce_mean(self, sums: torch.Tensor, count: torch.Tensor | float) -> torch.Tensor:
        """``sums / count`` over all ranks with ``sync="global"`` under torch.distributed
        (every rank must call it, e.g. in ``epoch_end()``), else local (float32, detached).
        No host synchronisation."""
        if self.sync == "global" and self.world_size() > 1:
            return reduce_mean(sums, count, self.process_group)[0]
        return local_mean(sums, count)
