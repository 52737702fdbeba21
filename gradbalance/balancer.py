"""The :class:`Balancer` base class shared by every balancing method.

A balancer attaches to a user's model without changing it: one forward hook per encoder
captures the encoder's output and (for methods that scale gradients) routes it through the
gradient-scaling Function of :mod:`gradbalance._scale`. ``loss()`` then computes the
method's statistics, writes the coefficients into 0-dim buffers in place and returns the
training loss; the user's ordinary ``backward()`` applies the coefficients. Nothing here
synchronises with the host.

Reliability (issue #7): the same mechanism is what keeps DDP replicas identical (the scaling
happens inside ``backward()``, before DDP's all-reduce), never compounds under gradient
accumulation and compiles. The balancer also checks what it is given: the order of wrapping
(balancer, optimizer, DDP, ``torch.compile``), each forward's encoder outputs (a second forward
or an encoder called twice before ``loss()``), labels and logits, non-finite values (device-side
checks, see ``nonfinite``) and an optimizer that misses the heads.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.optimizer import register_optimizer_step_pre_hook

from gradbalance._scale import EncoderTap, scale_grad
from gradbalance.coefficients import true_class_probability
from gradbalance.history import History

Pool = Literal["spatial", "tokens", "cls"]
HeadMode = Literal["train", "probe", "none"]
FeatureFn = Callable[[Any], torch.Tensor]
POOLS: tuple[str, ...] = ("spatial", "tokens", "cls")
Sync = Literal["global", "local"]
SYNCS: tuple[str, ...] = ("global", "local")
NonFinite = Literal["raise", "skip"]
NONFINITE: tuple[str, ...] = ("raise", "skip")


def resolve_encoders(
    model: nn.Module, encoders: Sequence[nn.Module] | Mapping[str, nn.Module]
) -> dict[str, nn.Module]:
    """Check the encoders against the model and name them.

    A list is named by each module's qualified name in ``model.named_modules()`` (dots
    become underscores: ``backbone.audio`` -> ``backbone_audio``); a dict gives the names.

    Raises:
        TypeError: ``model`` or an encoder is not an ``nn.Module``.
        ValueError: the model is already wrapped (DDP, DataParallel, torch.compile); fewer than
            two encoders; an encoder outside the model, repeated, nested in another, or the
            model itself; an invalid name.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _refuse_wrapped(model)
    if isinstance(encoders, nn.Module):
        raise TypeError("encoders must be a list or dict of modules, not a single module")
    if isinstance(encoders, Mapping):
        pairs = list(encoders.items())
    else:
        qualified = {id(module): name for name, module in model.named_modules()}
        pairs = [(qualified.get(id(module), "").replace(".", "_"), module) for module in encoders]
    if len(pairs) < 2:
        raise ValueError(
            f"balancing needs at least two encoders (one per modality), got {len(pairs)}"
        )
    in_model = {id(module) for module in model.modules()}
    resolved: dict[str, nn.Module] = {}
    for name, module in pairs:
        if not isinstance(module, nn.Module):
            raise TypeError(f"encoder {name!r} must be an nn.Module, got {type(module).__name__}")
        if module is model:
            raise ValueError("an encoder cannot be the whole model; pass its per-modality parts")
        if id(module) not in in_model:
            raise ValueError(
                f"encoder {name or type(module).__name__!r} is not a submodule of the model; "
                "pass modules reached by model.named_modules()"
            )
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"encoder names must be non-empty strings without '.', got {name!r}")
        if any(module is other for other in resolved.values()):
            raise ValueError(f"encoder {name!r} is listed twice")
        if name in resolved:
            raise ValueError(f"two encoders are named {name!r}")
        resolved[name] = module
    _refuse_nested(resolved)
    return resolved


def _refuse_wrapped(model: nn.Module) -> None:
    wrapped = isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))
    if wrapped or hasattr(model, "_orig_mod"):
        raise ValueError(
            f"the model is already wrapped ({type(model).__name__}). Create the balancer on the "
            "plain model first, then wrap: bal = gb.MLB(model, ...); model = DDP(model); "
            "model = torch.compile(model). nn.DataParallel is not supported (use DDP)."
        )


def _refuse_nested(encoders: Mapping[str, nn.Module]) -> None:
    for name, module in encoders.items():
        inner = {id(sub) for sub in module.modules() if sub is not module}
        for other_name, other in encoders.items():
            if id(other) in inner:
                raise ValueError(
                    f"encoder {other_name!r} is nested inside encoder {name!r}; "
                    "encoders must be disjoint submodules"
                )


def pool_feature(output: torch.Tensor, pool: str | None, name: str) -> torch.Tensor:
    """Turn an encoder output into a ``(B, D)`` feature.

    ``pool=None`` (automatic): 2-D outputs are used as they are, 4-D/5-D convolution maps
    ``(B, C, ...)`` are averaged over their spatial/temporal dims. Other shapes need an
    explicit choice: ``"spatial"`` (mean over dims 2+, for ``(B, C, L)`` maps), ``"tokens"``
    (mean over dim 1, for ``(B, T, D)`` sequences) or ``"cls"`` (``x[:, 0]``).
    """
    if pool is None:
        if output.dim() == 2:
            return output
        if output.dim() in (4, 5):
            return output.mean(dim=tuple(range(2, output.dim())))
        raise ValueError(
            f"encoder {name!r} returned shape {tuple(output.shape)}; only (B, D) features and "
            "(B, C, H, W) / (B, C, T, H, W) maps are pooled automatically. Pass "
            f"pool={{'{name}': 'tokens'}} for a (B, T, D) sequence (or 'cls', 'spatial'), "
            f"or features={{'{name}': callable}} returning a (B, D) tensor"
        )
    if output.dim() < 3:
        raise ValueError(
            f"pool={pool!r} for encoder {name!r} needs a >= 3-D output, "
            f"got shape {tuple(output.shape)}"
        )
    if pool == "spatial":
        return output.mean(dim=tuple(range(2, output.dim())))
    if pool == "tokens":
        return output.mean(dim=1).flatten(1)
    return output[:, 0].flatten(1)


def _per_encoder(value: Any, names: Sequence[str], option: str) -> dict[str, Any]:
    """Expand an option given once or per encoder (dict) into a dict over all encoders."""
    if isinstance(value, Mapping):
        unknown = set(value) - set(names)
        if unknown:
            raise ValueError(f"{option} names unknown encoders {sorted(unknown)}; known: {names}")
        return {name: value.get(name) for name in names}
    if isinstance(value, (list, tuple)):
        if len(value) != len(names):
            raise ValueError(f"{option} has {len(value)} entries for {len(names)} encoders")
        return dict(zip(names, value))
    return dict.fromkeys(names, value)


def _module_device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _multiply(coefficient: Callable[[], torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
    return grad * coefficient().to(device=grad.device, dtype=grad.dtype)


_GRAPH_TASK_ID = getattr(torch._C, "_current_graph_task_id", None)


def _in_backward() -> bool:
    """Whether autograd is running a backward pass (activation checkpointing recomputes the
    forward there)."""
    return _GRAPH_TASK_ID is not None and _GRAPH_TASK_ID() != -1


ORDER = (
    "bal = gb.MLB(model, ...); opt = torch.optim.Adam([*model.parameters(), "
    "*bal.parameters()]); model = DDP(model); model = torch.compile(model)"
)
"""The order in which a balancer, an optimizer, DDP and torch.compile are created."""


class _Capture(NamedTuple):
    output: Any
    forward: int  # index of the model forward (root pre-hook) during which it was captured
    train_mode: bool  # the encoder's ``training`` flag


_OPTIMIZER_PARAMETERS: weakref.WeakKeyDictionary[Any, tuple[int, frozenset[int]]] = (
    weakref.WeakKeyDictionary()
)


def _optimizer_parameter_ids(optimizer: torch.optim.Optimizer) -> frozenset[int]:
    count = sum(len(group["params"]) for group in optimizer.param_groups)
    cached = _OPTIMIZER_PARAMETERS.get(optimizer)
    if cached is None or cached[0] != count:
        ids = frozenset(id(p) for group in optimizer.param_groups for p in group["params"])
        cached = (count, ids)
        _OPTIMIZER_PARAMETERS[optimizer] = cached
    return cached[1]


_WATCHED: weakref.WeakSet = weakref.WeakSet()
"""The live balancers whose optimizers are watched. A WeakSet: a balancer collected while an
optimizer steps (even inside the hook's loop) leaves it safely, never mutating the global hook
registry during iteration."""

_WATCH_HANDLE: list[Any] = []


def _watch_optimizers(balancer: Balancer) -> None:
    """Watch every optimizer step for ``balancer``; one global pre-step hook serves all."""
    _WATCHED.add(balancer)
    if not _WATCH_HANDLE:
        _WATCH_HANDLE.append(register_optimizer_step_pre_hook(_note_optimizer_step))


def _note_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    """Global optimizer pre-step hook: notes whether the step updates the model and the heads."""
    ids = _optimizer_parameter_ids(optimizer)
    for bal in list(_WATCHED):
        if not ids.isdisjoint(bal._model_parameter_ids):
            bal.__dict__["_optimizer_stepped_model"] = True
        if not ids.isdisjoint(id(p) for p in bal.parameters()):
            bal.__dict__["_optimizer_stepped_heads"] = True


def _average_over_ranks(balancer: weakref.ref, grad: torch.Tensor) -> torch.Tensor | None:
    """Gradient hook of a head parameter under torch.distributed: the mean over the ranks."""
    bal = balancer()
    if bal is None or bal._heads_in_ddp or not bal._distributed():
        return None
    grad = grad.contiguous().clone()
    dist.all_reduce(grad, group=bal.process_group)
    return grad.div_(dist.get_world_size(bal.process_group))


class Balancer(nn.Module):
    """Base class of every balancing method: taps, heads, coefficient buffers, history.

    Subclasses implement :meth:`_loss`; everything a user touches (construction checks,
    ``loss()``, ``coefficients``, ``scores``, ``history``, ``state_dict``, ``remove()``) is
    shared. The balancer is an ``nn.Module`` that holds its heads and running state, never
    the wrapped model's parameters: optimise ``[*model.parameters(), *bal.parameters()]``.

    Order of creation: the balancer on the plain model first, then the optimizer (with
    ``bal.parameters()``), then ``DistributedDataParallel``, then ``torch.compile``. A model
    already wrapped (DDP, ``nn.DataParallel``, ``torch.compile``) is refused, and so is a DDP
    wrapper created before the balancer (detected at the first forward).

    Under ``torch.distributed`` (one process per device, DDP) the balancer keeps every rank in
    step: its heads start from rank 0's values and their gradients are averaged over the ranks
    (like DDP's own), and with ``sync="global"`` the per-modality statistics are all-reduced
    before the coefficients are computed, so every rank uses the coefficients a single
    process would compute on the concatenated batch. The scaling happens inside
    ``backward()``, before DDP's all-reduce, so replicas stay bitwise identical with either
    ``sync``.

    Each training forward must run every encoder once, followed by one ``loss()``: a second
    forward before ``loss()`` or an encoder called twice in one forward is a ``RuntimeError``
    at that call. Forwards under ``torch.no_grad()`` (evaluation), forwards in eval mode that
    are not followed by ``loss()``, and passes inside :meth:`paused` are not training
    forwards and never trip the check. Activation checkpointing with ``use_reentrant=False``
    re-runs an encoder inside ``backward()``: that re-run is scaled again (so the recomputed
    graph matches) but not captured; checkpointing a whole encoder with
    ``use_reentrant=True`` runs it under no_grad and is reported by ``loss()`` (checkpointing
    blocks *inside* an encoder is fine either way). Inside a ``torch.compile``-d forward the
    hooks only record the outputs (Python-side checks would add guards and recompiles): the
    repeated-forward and DDP-order checks run in eager mode only.

    Args:
        model: the multimodal model; the balancer never changes its parameters or its
            computation, and :meth:`remove` takes its hooks (and its marker for DDP) off.
        encoders: one submodule per modality, as a list (named by qualified name) or a dict
            ``name -> module``.
        num_classes: number of classes K of the fused logits and the unimodal heads.
        feature_dims: each encoder's feature width (list or dict). Omitted, the heads are
            ``nn.LazyLinear`` and take their width at the first forward; they are registered
            already, so an optimizer built before the first forward still updates them.
            Pass it when the balancer is inside a module wrapped by DDP (Lightning) or with
            optimizers that need shapes at construction.
        pool: how an encoder output becomes a ``(B, D)`` feature (see :func:`pool_feature`),
            once or per encoder.
        features: a callable ``output -> (B, D) tensor`` per encoder (or once for all), for
            encoders that return tuples, dicts or sequences.
        flush_every: steps of history kept on the device between copies to the CPU.
        head_mode: overrides the class's :attr:`head_mode` (for subclasses).
        sync: under ``torch.distributed`` with more than one process, ``"global"`` (default)
            all-reduces the per-modality statistics so every rank computes the same
            coefficients (those of the concatenated batch); ``"local"`` lets each rank use
            its own batch's coefficients (replicas still stay identical). No effect in a
            single process.
        process_group: the process group for ``sync`` and the heads (default: the world).
        nonfinite: what a training step with NaN/inf fused logits, features or statistics
            gets. ``"raise"`` (default): a ``RuntimeError`` naming the modality and the step
            (at once when the tensors are on the CPU; on an accelerator, where raising at
            once would need a host synchronisation, the step is skipped as below and the
            error is raised at the next history flush, every ``flush_every`` steps, or at
            :meth:`check_finite`). ``"skip"``: the step leaves the balancer exactly as it was
            (coefficients, scores, history, running statistics), counted in
            :attr:`nonfinite_steps`; its own backward uses the previous coefficients (its
            gradients are non-finite anyway: ``GradScaler`` drops such a step, see
            :attr:`last_step_finite` otherwise).

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
    """Whether the encoder outputs are routed through the gradient-scaling Function."""

    def __init__(
        self,
        model: nn.Module,
        encoders: Sequence[nn.Module] | Mapping[str, nn.Module],
        num_classes: int,
        *,
        feature_dims: Sequence[int] | Mapping[str, int] | None = None,
        pool: Pool | Mapping[str, Pool] | None = None,
        features: FeatureFn | Mapping[str, FeatureFn] | None = None,
        flush_every: int = 256,
        head_mode: HeadMode | None = None,
        sync: Sync = "global",
        process_group: Any = None,
        nonfinite: NonFinite = "raise",
    ) -> None:
        super().__init__()
        if head_mode is not None:
            self.head_mode = head_mode
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if sync not in SYNCS:
            raise ValueError(f"sync must be one of {SYNCS}, got {sync!r}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        self._encoders = resolve_encoders(model, encoders)
        self.names: list[str] = list(self._encoders)
        self.num_classes = num_classes
        self.sync: Sync = sync
        self.process_group = process_group
        self.nonfinite: NonFinite = nonfinite
        self._pool = _per_encoder(pool, self.names, "pool")
        for name, choice in self._pool.items():
            if choice is not None and choice not in POOLS:
                raise ValueError(
                    f"pool for {name!r} must be one of {POOLS} or None, got {choice!r}"
                )
        self._features = _per_encoder(features, self.names, "features")
        dims = _per_encoder(feature_dims, self.names, "feature_dims")
        devices = {name: _module_device(module) for name, module in self._encoders.items()}
        for name in self.names:
            self.register_buffer(
                f"coefficient_{name}", torch.ones((), dtype=torch.float32, device=devices[name])
            )
        self.heads = nn.ModuleDict(
            {name: self._make_head(dims[name], devices[name]) for name in self.names}
            if self.head_mode != "none"
            else {}
        )
        self._history = History(self.names, flush_every, device=devices[self.names[0]])
        self.register_buffer(
            "last_scores", torch.zeros(len(self.names), device=devices[self.names[0]])
        )
        self.register_buffer(
            "nonfinite_steps", torch.zeros((), dtype=torch.int64, device=devices[self.names[0]])
        )
        # Not a submodule: the balancer's parameters() and state_dict() never hold the model.
        self.__dict__["_root_model"] = model
        self._model_parameter_ids = frozenset(id(p) for p in model.parameters())
        self._outputs: dict[str, Any] = {}
        self._pending: dict[bool, dict[str, _Capture]] = {True: {}, False: {}}
        self._compiled_outputs: dict[str, tuple[Any, bool, bool]] = {}
        self._forward_count = 0
        self._paused_depth = 0
        self._in_loss: Literal["train", "eval"] | None = None
        self._step_finite: torch.Tensor | None = None
        self._finite_flag_reduced = False
        self._last_finite: torch.Tensor | None = None
        self._nonfinite_first: torch.Tensor | None = None
        self._defer_nonfinite_errors = False
        self._training_calls = 0
        self._warned_eval_mode = False
        self._optimizer_stepped_model = False
        self._optimizer_stepped_heads = False
        self._distributed_ready = False
        self._heads_in_ddp = False
        self._seen_ddp: weakref.ref | None = None
        self._param_handles: list[Any] = []
        self.steps = 0
        self.epoch = 0
        self._taps = [
            EncoderTap(
                module,
                partial(self.coefficient_buffer, name),
                partial(self._capture, name),
                scale_output=self.scales_gradients,
            )
            for name, module in self._encoders.items()
        ]
        self._root_handle = model.register_forward_pre_hook(self._on_model_forward)
        _watch_optimizers(self)
        # A name that matches no parameter: DDP copies it into its ``parameters_to_ignore``
        # when it wraps the model, which tells the first forward under DDP that the wrapper
        # was created after the balancer (see _check_ddp). Removed by remove().
        self._ddp_marker = f"<gradbalance {id(self):x}>"
        ignored = getattr(model, "_ddp_params_and_buffers_to_ignore", None)
        self._had_ignore_list = ignored is not None
        model._ddp_params_and_buffers_to_ignore = [*(ignored or ()), self._ddp_marker]

    def _make_head(self, dim: int | None, device: torch.device) -> nn.Module:
        if dim is None:
            return nn.LazyLinear(self.num_classes, device=device)
        return nn.Linear(dim, self.num_classes, device=device)

    # --- forward side: what the hooks record ---------------------------------------------

    def _on_model_forward(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook on the model: counts training forwards (for clearer errors)."""
        if torch.compiler.is_compiling() or self._paused_depth or not torch.is_grad_enabled():
            return
        if _in_backward():
            return
        self.__dict__["_forward_count"] += 1

    def _capture(self, name: str, output: Any) -> None:
        if torch.compiler.is_compiling():
            # Inside a compiled graph: one store, no Python-side checks (they would add
            # guards and recompiles); loss() picks it up.
            self._compiled_outputs[name] = (
                output,
                torch.is_grad_enabled(),
                self._encoders[name].training,
            )
            return
        if _in_backward():
            # Activation checkpointing (use_reentrant=False) re-runs the encoder during
            # backward to rebuild its activations: the output is scaled again (the recomputed
            # graph must match the original) but is not a new step's output.
            return
        self._check_ddp()
        grad_enabled = torch.is_grad_enabled()
        slot = self._pending[grad_enabled]
        previous = slot.get(name)
        if grad_enabled and previous is not None and previous.train_mode:
            message = self._duplicate_message(name, previous)
            slot.clear()  # this step is broken; the next forward starts afresh
            raise RuntimeError(message)
        slot[name] = _Capture(output, self._forward_count, self._encoders[name].training)
        self._outputs[name] = output

    def _duplicate_message(self, name: str, previous: _Capture) -> str:
        fixes = (
            "Call bal.loss(logits, target) once after every training forward. Forwards that "
            "are not training steps must not be balanced: run evaluation under "
            "torch.no_grad(), and extra passes (a second augmented view, masked passes) "
            "inside `with bal.paused():`."
        )
        if self._forward_count != previous.forward:
            return (
                f"a second forward of the model ran before loss(): encoder {name!r} already "
                f"produced this step's output. {fixes}"
            )
        if self._forward_count > 0:
            return (
                f"encoder {name!r} was called twice in one forward of the model: the balancer "
                "measures and scales one output per modality and step. Give each use its own "
                "encoder module, or run the extra call inside `with bal.paused():`."
            )
        return (
            f"encoder {name!r} produced a second output before loss(): either the model ran a "
            f"second forward before loss() or it calls {name!r} twice in one forward. {fixes}"
        )

    def _check_ddp(self) -> None:
        """First forward under a DDP wrapper: refuse a wrong order; see who syncs the heads."""
        ddp = DistributedDataParallel._active_ddp_module
        if ddp is None or (self._seen_ddp is not None and self._seen_ddp() is ddp):
            return
        ignored = getattr(ddp, "parameters_to_ignore", None)
        marked = getattr(self._root_model, "_ddp_params_and_buffers_to_ignore", ())
        # Decidable only while the model still carries the marker (nobody replaced the list).
        if ddp.module is self._root_model and ignored is not None and self._ddp_marker in marked:
            if self._ddp_marker not in ignored:
                raise RuntimeError(
                    "the model was wrapped in DistributedDataParallel before the balancer was "
                    "created: DDP must see the model as the balancer leaves it. Create the "
                    f"balancer on the plain model first, in this order: {ORDER}"
                )
        self._seen_ddp = weakref.ref(ddp)
        self._heads_in_ddp = any(module is self for module in ddp.module.modules())

    def _ingest_compiled(self) -> None:
        """Move the outputs stored by compiled forwards into the pending captures."""
        if not self._compiled_outputs:
            return
        for name, (output, grad_enabled, train_mode) in self._compiled_outputs.items():
            self._pending[grad_enabled][name] = _Capture(output, self._forward_count, train_mode)
            self._outputs[name] = output
        self._compiled_outputs.clear()

    def _take_captures(self) -> dict[str, _Capture]:
        """This step's encoder outputs (same grad mode as the loss() call), consumed."""
        self._ingest_compiled()
        grad_enabled = torch.is_grad_enabled()
        slot = self._pending[grad_enabled]
        missing = [name for name in self.names if name not in slot]
        captures = {name: slot[name] for name in self.names if name in slot}
        slot.clear()
        if not missing:
            return captures
        other = self._pending[not grad_enabled]
        if all(name in other for name in missing):
            mode = "enabled" if grad_enabled else "disabled (torch.no_grad)"
            forward = "torch.no_grad()" if grad_enabled else "gradients enabled"
            raise RuntimeError(
                f"encoder(s) {missing} ran under {forward} but loss() is called with "
                f"gradients {mode}: call loss() in the same mode as the model's forward. "
                "(An encoder inside torch.utils.checkpoint(..., use_reentrant=True) runs "
                "under no_grad: use use_reentrant=False.)"
            )
        raise RuntimeError(
            f"encoder(s) {missing} produced no output since the last loss(): call loss() once "
            "after each forward of the model, and make sure every encoder runs in it (a "
            "model compiled before the balancer was created ignores its hooks: create the "
            f"balancer first: {ORDER})"
        )

    @contextmanager
    def paused(self):
        """Within this block the encoders' forwards are neither captured nor scaled.

        For extra passes a method (or the user) runs through the model itself (masked passes,
        a second view): they are not training forwards of the balancer.
        """
        saved = [(tap.on_output, tap.scale_output) for tap in self._taps]
        for tap in self._taps:
            tap.on_output, tap.scale_output = (lambda output: None), False
        self._paused_depth += 1
        try:
            yield
        finally:
            self._paused_depth -= 1
            for tap, (on_output, scale_output) in zip(self._taps, saved):
                tap.on_output, tap.scale_output = on_output, scale_output

    def coefficient_buffer(self, name: str) -> torch.Tensor:
        """The 0-dim buffer that scales encoder ``name``'s gradient (written by ``loss()``)."""
        return getattr(self, f"coefficient_{name}")

    def scale_parameters(self, parameters: Mapping[str, Iterable[nn.Parameter]]) -> None:
        """Also scale these parameters' gradients by their modality's coefficient.

        For parameters outside the encoders that belong to one modality, e.g. the fused
        head's per-modality weight block, which the official MLB code scales too. Each
        parameter gets one gradient hook (removed by :meth:`remove`).

        Raises:
            ValueError: an unknown modality name, a parameter inside an encoder (it is scaled
                already) or listed for two modalities.
        """
        seen: set[int] = set()
        for name, params in parameters.items():
            if name not in self._encoders:
                raise ValueError(f"unknown modality {name!r}; known: {self.names}")
            encoder_params = {id(p) for p in self._encoders[name].parameters()}
            for param in params:
                if id(param) in encoder_params:
                    raise ValueError(
                        f"a parameter listed for {name!r} is inside that encoder; "
                        "its gradient is scaled already"
                    )
                if id(param) in seen:
                    raise ValueError("a parameter is listed for more than one modality")
                seen.add(id(param))
                hook = partial(_multiply, partial(self.coefficient_buffer, name))
                self._param_handles.append(param.register_hook(hook))

    def remove(self) -> None:
        """Remove every hook: the model's forward and backward are exactly as before."""
        for tap in self._taps:
            tap.remove()
        for handle in self._param_handles:
            handle.remove()
        if self._root_handle is not None:
            self._root_handle.remove()
            self._root_handle = None
            _WATCHED.discard(self)
            model = self._root_model
            ignored = [
                n
                for n in getattr(model, "_ddp_params_and_buffers_to_ignore", ())
                if n != self._ddp_marker
            ]
            if ignored or self._had_ignore_list:
                model._ddp_params_and_buffers_to_ignore = ignored
            elif hasattr(model, "_ddp_params_and_buffers_to_ignore"):
                del model._ddp_params_and_buffers_to_ignore
        self._taps, self._param_handles = [], []
        self._outputs, self._pending = {}, {True: {}, False: {}}
        self._compiled_outputs = {}
        self._distributed_ready = False

    def features(self) -> dict[str, torch.Tensor]:
        """The ``(B, D)`` feature of each encoder from the last forward of the model."""
        self._ingest_compiled()
        missing = [name for name in self.names if name not in self._outputs]
        if missing:
            raise RuntimeError(
                f"no output captured for encoder(s) {missing}: run a forward of the model "
                "first (or the balancer was removed)"
            )
        return {name: self._feature(name, self._outputs[name]) for name in self.names}

    def _feature(self, name: str, output: Any) -> torch.Tensor:
        extract = self._features[name]
        if extract is not None:
            feature = extract(output)
        elif isinstance(output, torch.Tensor):
            feature = pool_feature(output, self._pool[name], name)
        else:
            raise TypeError(
                f"encoder {name!r} returned a {type(output).__name__}; pass "
                f"features={{'{name}': callable}} that returns its (B, D) feature tensor"
            )
        if not isinstance(feature, torch.Tensor) or feature.dim() != 2:
            shape = tuple(feature.shape) if isinstance(feature, torch.Tensor) else type(feature)
            raise ValueError(f"the feature of encoder {name!r} must be (B, D), got {shape}")
        return feature

    def unimodal_logits(self) -> dict[str, torch.Tensor]:
        """Each head's logits on the last captured features, detached (for evaluation)."""
        with torch.no_grad():
            return {name: self.heads[name](f) for name, f in self.features().items()}

    # --- loss -----------------------------------------------------------------------------

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss of this step; also computes and stores the coefficients.

        Call it once after each forward of the model and before ``backward()``. Under
        ``torch.no_grad()`` (validation), or with every encoder in eval mode, it returns the
        loss and leaves the coefficients, scores and history untouched.

        Args:
            logits: the model's fused logits, ``(B, num_classes)``.
            target: integer class labels, ``(B,)``, in ``[0, num_classes)``, on the logits'
                device.

        Raises:
            RuntimeError: an encoder produced no output since the last ``loss()``; non-finite
                inputs with ``nonfinite="raise"``; labels out of range (checked on the
                device); an optimizer that updates the model but not the balancer's heads.
            ValueError, TypeError: logits or labels of the wrong shape, dtype or device.
        """
        captures = self._take_captures()
        target = self._check_inputs(logits, target)
        training = torch.is_grad_enabled() and logits.requires_grad
        if training and not any(capture.train_mode for capture in captures.values()):
            self._warn_eval_mode()
            training = False
        features = {name: self._feature(name, c.output) for name, c in captures.items()}
        self._check_devices(features)
        # Per-step state lives in __dict__ directly: nn.Module.__setattr__ is slow per call.
        state = self.__dict__
        state["_step_finite"], state["_finite_flag_reduced"] = None, False
        if training:
            state["_training_calls"] += 1
            self._check_optimizer()
            if self._distributed():
                self._prepare_distributed(features)
            state["_step_finite"] = self._check_finite(logits, features)
            if self._training_calls % self._history.flush_every == 0:
                self._raise_deferred()
        state["_in_loss"] = "train" if training else "eval"
        try:
            if self.head_mode == "none":
                unimodal: dict[str, torch.Tensor] = {}
            else:
                unimodal = {name: self._head_logits(name, f) for name, f in features.items()}
            return self._loss(logits, target, features, unimodal)
        finally:
            state["_in_loss"] = None

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

    def _check_optimizer(self) -> None:
        stepped_model, stepped_heads = self._optimizer_stepped_model, self._optimizer_stepped_heads
        if not stepped_model and not stepped_heads:
            return
        self.__dict__["_optimizer_stepped_model"] = False
        self.__dict__["_optimizer_stepped_heads"] = False
        if stepped_model and not stepped_heads and any(p.requires_grad for p in self.parameters()):
            raise RuntimeError(
                "an optimizer stepped the model but no optimizer updates the balancer's "
                "heads (bal.parameters()), so they would stay at their initial values. Build "
                "the optimizer after the balancer with both: torch.optim.Adam([*model."
                "parameters(), *bal.parameters()]) (or opt.add_param_group({'params': "
                f"list(bal.parameters())}})). Order: {ORDER}"
            )

    def _check_devices(self, features: Mapping[str, torch.Tensor]) -> None:
        """Each encoder's output on the device of its head (or, without heads, of its
        coefficient buffer: same device type, as an encoder may span several devices)."""
        for name, feature in features.items():
            head = self.heads[name] if name in self.heads else None
            state = next(iter(head.parameters()), None) if head is not None else None
            if state is not None:
                wrong = state.device != feature.device
                what = "head"
            else:
                state = self.coefficient_buffer(name)
                wrong = state.device.type != feature.device.type
                what = "coefficient buffer"
            if wrong:
                raise RuntimeError(
                    f"encoder {name!r} produced its output on {feature.device} but the "
                    f"balancer's {what} for it is on {state.device}: move the model to its "
                    "device(s) before creating the balancer (each encoder's head and buffers "
                    "are made on that encoder's device), or move the balancer too "
                    "(bal.to(device))"
                )

    def _head_logits(self, name: str, feature: torch.Tensor) -> torch.Tensor:
        head = self.heads[name]
        weight = next(iter(head.parameters()), None)
        if weight is not None and weight.device != feature.device:
            raise RuntimeError(
                f"head {name!r} is on {weight.device} but its feature is on "
                f"{feature.device}: move the model before creating the balancer, "
                "or call bal.to(device)"
            )
        if self.head_mode == "probe":
            return head(feature.detach())
        return head(feature)

    def _check_inputs(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise TypeError("loss(logits, target) takes two tensors")
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits must have shape (B, num_classes={self.num_classes}), "
                f"got {tuple(logits.shape)}"
            )
        if not logits.is_floating_point():
            raise TypeError(f"logits must be floating point, got {logits.dtype}")
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(
                f"target must hold integer class indices (torch.long), got {target.dtype}"
            )
        if target.shape != logits.shape[:1]:
            raise ValueError(
                f"target must have shape ({logits.shape[0]},) to match the logits, "
                f"got {tuple(target.shape)}"
            )
        if target.device != logits.device:
            raise ValueError(
                f"target is on {target.device} but the logits are on {logits.device}: move the "
                "labels to the logits' device (target.to(logits.device))"
            )
        in_range = ((target >= 0) & (target < self.num_classes)).all()
        torch._assert_async(in_range, f"target labels must lie in [0, {self.num_classes})")
        return target.long()

    # --- non-finite inputs ------------------------------------------------------------------

    def _nonfinite_message(self, what: str, step: int) -> str:
        return (
            f"gradbalance: non-finite values (NaN or inf) in {what} at training step {step}. "
            "Check that modality's inputs, the learning rate and the loss scale. To skip such "
            "steps instead (e.g. float16 autocast with a GradScaler, which drops overflow "
            "steps), create the balancer with nonfinite='skip'."
        )

    def _nonfinite_labels(self) -> list[str]:
        return [f"the feature of encoder {n!r}" for n in self.names] + ["the fused logits"]

    def _raises_at_once(self, tensors: Iterable[torch.Tensor]) -> bool:
        if self.nonfinite != "raise" or self._defer_nonfinite_errors:
            return False
        return all(t.device.type == "cpu" for t in tensors)

    def _check_finite(
        self, logits: torch.Tensor, features: Mapping[str, torch.Tensor]
    ) -> torch.Tensor | None:
        """Check this step's inputs; returns the step's finite flag (None: asserted finite).

        One float32 sum per tensor: the sum is finite exactly when every element is (short of
        a float32 overflow of the sum); ``x * 0 == 0`` is the cheapest finiteness test.
        """
        tensors = [*features.values(), logits]
        device = self.last_scores.device
        with torch.no_grad():
            sums = torch.stack([t.sum(dtype=torch.float32).to(device) for t in tensors])
            flags = sums * 0 == 0
            if self._raises_at_once([*tensors, self.last_scores]):
                try:
                    torch._assert_async(flags.all(), "non-finite")
                except RuntimeError:  # on the CPU the assertion is synchronous
                    label = self._nonfinite_labels()[flags.tolist().index(False)]
                    raise RuntimeError(self._nonfinite_message(label, self.steps)) from None
                return None
            if self.nonfinite == "raise":
                first = self._nonfinite_first
                if first is None or first.device != device:
                    first = torch.full((len(tensors),), -1, dtype=torch.int64, device=device)
                self.__dict__["_nonfinite_first"] = torch.where(
                    ~flags & (first < 0), self.steps, first
                )
            return flags.all()

    def _raise_deferred(self) -> None:
        first = self._nonfinite_first
        if first is None:
            return
        steps = first.tolist()
        for label, step in zip(self._nonfinite_labels(), steps):
            if step >= 0:
                self._nonfinite_first = None
                raise RuntimeError(self._nonfinite_message(label, step))

    def check_finite(self) -> None:
        """Raise now the error of a non-finite step recorded on an accelerator.

        With ``nonfinite="raise"`` on an accelerator the balancer records on the device the
        first step at which each input was non-finite (raising at once would need a host
        synchronisation every step) and raises at the next history flush; this method checks
        now (one synchronisation). A no-op on the CPU, where the error is raised at once.
        """
        self._raise_deferred()

    @property
    def last_step_finite(self) -> torch.Tensor:
        """0-dim bool tensor on the device: whether the last training step was finite.

        For loops without a ``GradScaler`` and with ``nonfinite="skip"``:
        ``if bal.last_step_finite: opt.step()`` (a host synchronisation, at your choice).
        """
        if self._last_finite is None:
            return torch.ones((), dtype=torch.bool, device=self.last_scores.device)
        return self._last_finite

    # --- statistics, coefficients and distributed reduction -----------------------------------

    def _loss(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        features: dict[str, torch.Tensor],
        unimodal: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        raise NotImplementedError

    def _updating(self, logits: torch.Tensor) -> bool:
        """Whether this ``loss()`` is a training step (it then updates coefficients)."""
        if self._in_loss == "eval":
            return False
        return torch.is_grad_enabled() and logits.requires_grad

    def _distributed(self) -> bool:
        """Whether more than one process shares the training (torch.distributed is set up)."""
        return (
            dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    def _reduces(self) -> bool:
        return self.sync == "global" and self._in_loss != "eval" and self._distributed()

    def _reduce_mean(self, sums: torch.Tensor, count: torch.Tensor | int | float) -> torch.Tensor:
        """Mean of per-sample statistics over the global batch: ``sum_ranks(sums) / sum(count)``.

        The one way a method turns per-sample statistics into a batch statistic. ``sums``
        holds this process's sums over its samples (any shape, e.g. ``(M,)`` per modality or
        ``(C, D)`` per class); ``count`` its number of samples (a number, or a tensor
        broadcastable to ``sums``, e.g. ``(C, 1)`` per-class counts). With ``sync="global"``
        under torch.distributed both are all-reduced (one collective) so the result equals a
        single process on the concatenated batch, also with unequal per-rank batch sizes;
        otherwise it is the local ``sums / count``. It communicates in training steps and
        outside ``loss()`` (e.g. at the end of an epoch), never inside an evaluation
        ``loss()`` (ranks may see different numbers of evaluation batches), so every rank
        must make the same calls in the same order. No host synchronisation. Float32 result.
        """
        sums = sums.detach().float()
        if not self._reduces():
            if isinstance(count, torch.Tensor):
                count = count.detach().to(device=sums.device, dtype=torch.float32)
            return sums / count
        if isinstance(count, torch.Tensor):
            count_shape = count.shape
            counts = count.detach().to(device=sums.device, dtype=torch.float32).reshape(-1)
        else:
            count_shape = torch.Size()
            counts = torch.full((1,), float(count), device=sums.device)
        parts = [sums.reshape(-1), counts]
        carry_flag = self._step_finite is not None and not self._finite_flag_reduced
        if carry_flag:
            # Piggyback this rank's non-finite flag: every rank then skips the same steps.
            parts.append((~self._step_finite).float().reshape(1).to(sums.device))
        packed = torch.cat(parts)
        dist.all_reduce(packed, group=self.process_group)
        total = packed[: sums.numel()].view(sums.shape)
        counts = packed[sums.numel() : sums.numel() + counts.numel()].view(count_shape)
        if carry_flag:
            self.__dict__["_step_finite"] = packed[-1] == 0
            self.__dict__["_finite_flag_reduced"] = True
        return total / counts

    def _prepare_distributed(self, features: Mapping[str, torch.Tensor]) -> None:
        """First training step under torch.distributed: same heads everywhere, synced grads."""
        if self._distributed_ready:
            return
        with torch.no_grad():
            for name, head in self.heads.items():
                lazy = nn.parameter.UninitializedParameter
                if any(isinstance(p, lazy) for p in head.parameters()):
                    head(features[name].detach())  # materialise a lazy head
            group = self.process_group
            source = 0 if group is None else dist.get_global_rank(group, 0)
            for param in self.parameters():
                dist.broadcast(param.detach(), src=source, group=group)
        for param in self.parameters():
            if param.requires_grad:
                hook = partial(_average_over_ranks, weakref.ref(self))
                self._param_handles.append(param.register_hook(hook))
        self._distributed_ready = True

    def _keep_if_finite(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """``new`` when this step and ``new`` are finite, else ``old`` (no host sync).

        For the running state of a method (EMAs, memories, counts): ``self.ema.copy_(
        self._keep_if_finite(updated, self.ema))``. Call it after this step's
        :meth:`_reduce_mean` (under DDP that call makes every rank agree on whether the step
        is finite).
        """
        with torch.no_grad():
            finite = new.detach().float().sum() * 0 == 0
            if self._step_finite is not None:
                finite = finite & self._step_finite.to(new.device)
        return torch.where(finite, new, old)

    def _store(self, coefficients: torch.Tensor, scores: torch.Tensor) -> None:
        """Write this step's coefficients into the buffers and record them (no host sync).

        A non-finite step (see ``nonfinite``) leaves the buffers, scores and history as they
        were.
        """
        with torch.no_grad():
            device = self.last_scores.device
            coefficients = coefficients.to(device=device, dtype=torch.float32)
            scores = scores.to(device=device, dtype=torch.float32)
            values_finite = (coefficients.sum() + scores.sum()) * 0 == 0
            finite: torch.Tensor | None = None
            if self._raises_at_once([coefficients]):
                torch._assert_async(
                    values_finite,
                    self._nonfinite_message("the coefficients or scores", self.steps),
                )
            else:
                finite = values_finite
                if self._step_finite is not None:
                    finite = finite & self._step_finite.to(device)
                previous = torch.stack(
                    [self.coefficient_buffer(name).to(device) for name in self.names]
                )
                coefficients = torch.where(finite, coefficients, previous)
                scores = torch.where(finite, scores, self.last_scores)
                self.nonfinite_steps.add_((~finite).to(self.nonfinite_steps.dtype))
                self.__dict__["_last_finite"] = finite
            for index, name in enumerate(self.names):
                self.coefficient_buffer(name).copy_(coefficients[index])
            self.last_scores.copy_(scores)
            self._history.record(coefficients, scores, finite)
        self.steps += 1

    def _head_scores(
        self, unimodal: Mapping[str, torch.Tensor], target: torch.Tensor
    ) -> torch.Tensor:
        """Each head's batch-mean true-class probability (float32, detached), as one vector.

        Reduced over the ranks with :meth:`_reduce_mean` (``sync="global"``).
        """
        sums = self._score_sums([u.detach() for u in unimodal.values()], target)
        return self._reduce_mean(sums, target.shape[0])

    def _score_sums(self, logits: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """Each logits' batch sum of the true-class probability, as one float32 vector.

        One stacked computation when all logits share the scores' device and a shape (the
        usual case); one per modality otherwise.
        """
        device = self.last_scores.device
        if all(u.device == device and u.shape == logits[0].shape for u in logits):
            return true_class_probability(torch.stack(logits), target.to(device), "sum")
        return torch.stack(
            [true_class_probability(u, target.to(u.device), "sum").to(device) for u in logits]
        )

    def _add_probe_losses(
        self, total: torch.Tensor, unimodal: Mapping[str, torch.Tensor], target: torch.Tensor
    ) -> torch.Tensor:
        """``total`` plus each detached probe's cross-entropy (it trains only that probe)."""
        for name, probe_logits in unimodal.items():
            probe_loss = self._scaled_head_loss(probe_logits, target, name, False)
            total = total + probe_loss.to(total.device)
        return total

    def _scaled_head_loss(
        self, logits: torch.Tensor, target: torch.Tensor, name: str, scaled: bool
    ) -> torch.Tensor:
        if scaled:
            logits = scale_grad(logits, self.coefficient_buffer(name))
        return F.cross_entropy(logits, target.to(logits.device))

    def after_backward(self) -> None:
        """Per-parameter work on the final gradients; a no-op for MLB, Multi-Loss and Joint.

        Call it after ``loss.backward()`` (after ``scaler.unscale_(opt)`` under AMP) and
        before ``opt.step()`` in every loop, so that switching to a method that needs it
        (OGM-GE's noise, AGM's clipping) needs no change of the loop.
        """

    @property
    def coefficients(self) -> dict[str, torch.Tensor]:
        """``{name: 0-dim tensor}``: the coefficients used by the last training ``loss()``."""
        return {name: self.coefficient_buffer(name).detach().clone() for name in self.names}

    @property
    def scores(self) -> dict[str, torch.Tensor]:
        """``{name: 0-dim tensor}``: the per-modality scores of the last training ``loss()``."""
        scores = self.last_scores.detach().clone()
        return {name: scores[index] for index, name in enumerate(self.names)}

    @property
    def history(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-step ``{name: {"coefficients": (steps,), "scores": (steps,)}}`` on the CPU.

        Holds the finite training steps only (see ``nonfinite``).
        """
        self._raise_deferred()
        return self._history.as_dict()

    def epoch_end(self) -> None:
        """Mark the end of a training epoch (advances :attr:`epoch`).

        Call it once per epoch in every loop: methods with per-epoch work (MSLR's coefficients,
        PMR's prototypes, epoch-based modulation windows) do it here, so switching method needs
        no change of the loop.
        """
        self.epoch += 1

    def get_extra_state(self) -> dict[str, Any]:
        return {"steps": self.steps, "epoch": self.epoch}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.epoch = int(state.get("epoch", 0))

    def extra_repr(self) -> str:
        return f"encoders={self.names}, num_classes={self.num_classes}"
