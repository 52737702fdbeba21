"""The :class:`Balancer` base class shared by every balancing method.

A balancer attaches to a user's model without changing it: one forward hook per encoder
captures the encoder's output and (for methods that scale gradients) routes it through the
gradient-scaling Function of :mod:`gradbalance._scale`. ``loss()`` then computes the
method's statistics, writes the coefficients into 0-dim buffers in place and returns the
training loss; the user's ordinary ``backward()`` applies the coefficients. Nothing here
synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from gradbalance._scale import EncoderTap, scale_grad
from gradbalance.coefficients import true_class_probability
from gradbalance.history import History

Pool = Literal["spatial", "tokens", "cls"]
HeadMode = Literal["train", "probe", "none"]
FeatureFn = Callable[[Any], torch.Tensor]
POOLS: tuple[str, ...] = ("spatial", "tokens", "cls")


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
    return grad * coefficient().to(grad.dtype)


class Balancer(nn.Module):
    """Base class of every balancing method: taps, heads, coefficient buffers, history.

    Subclasses implement :meth:`_loss`; everything a user touches (construction checks,
    ``loss()``, ``coefficients``, ``scores``, ``history``, ``state_dict``, ``remove()``) is
    shared. The balancer is an ``nn.Module`` that holds its heads and running state, never
    the wrapped model's parameters: optimise ``[*model.parameters(), *bal.parameters()]``.

    Args:
        model: the multimodal model; the balancer never changes it.
        encoders: one submodule per modality, as a list (named by qualified name) or a dict
            ``name -> module``.
        num_classes: number of classes K of the fused logits and the unimodal heads.
        feature_dims: each encoder's feature width (list or dict). Omitted, the heads are
            ``nn.LazyLinear`` and take their width at the first forward; they are registered
            already, so an optimizer built before the first forward still updates them.
        pool: how an encoder output becomes a ``(B, D)`` feature (see :func:`pool_feature`),
            once or per encoder.
        features: a callable ``output -> (B, D) tensor`` per encoder (or once for all), for
            encoders that return tuples, dicts or sequences.
        flush_every: steps of history kept on the device between copies to the CPU.
        head_mode: overrides the class's :attr:`head_mode` (for subclasses).

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
    ) -> None:
        super().__init__()
        if head_mode is not None:
            self.head_mode = head_mode
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self._encoders = resolve_encoders(model, encoders)
        self.names: list[str] = list(self._encoders)
        self.num_classes = num_classes
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
        self._outputs: dict[str, Any] = {}
        self._fresh: set[str] = set()
        self._param_handles: list[Any] = []
        self.steps = 0
        self._taps = [
            EncoderTap(
                module,
                partial(self.coefficient_buffer, name),
                partial(self._capture, name),
                scale_output=self.scales_gradients,
            )
            for name, module in self._encoders.items()
        ]

    def _make_head(self, dim: int | None, device: torch.device) -> nn.Module:
        if dim is None:
            return nn.LazyLinear(self.num_classes, device=device)
        return nn.Linear(dim, self.num_classes, device=device)

    def _capture(self, name: str, output: Any) -> None:
        self._outputs[name] = output
        self._fresh.add(name)

    @contextmanager
    def paused(self):
        """Within this block the encoders' forwards are neither captured nor scaled.

        For extra passes a method runs through the model itself (e.g. masked passes).
        """
        saved = [(tap.on_output, tap.scale_output) for tap in self._taps]
        for tap in self._taps:
            tap.on_output, tap.scale_output = (lambda output: None), False
        try:
            yield
        finally:
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
        self._taps, self._param_handles = [], []
        self._outputs, self._fresh = {}, set()

    def features(self) -> dict[str, torch.Tensor]:
        """The ``(B, D)`` feature of each encoder from the last forward of the model."""
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

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss of this step; also computes and stores the coefficients.

        Call it once after each forward of the model and before ``backward()``. Under
        ``torch.no_grad()`` (validation) it returns the loss and leaves the coefficients,
        scores and history untouched.

        Args:
            logits: the model's fused logits, ``(B, num_classes)``.
            target: integer class labels, ``(B,)``, in ``[0, num_classes)``.
        """
        target = self._check_inputs(logits, target)
        missing = [name for name in self.names if name not in self._fresh]
        if missing:
            raise RuntimeError(
                f"encoder(s) {missing} produced no output since the last loss(): call loss() "
                "once after each forward of the model, and make sure every encoder runs in it"
            )
        self._fresh.clear()
        features = self.features()
        if self.head_mode == "none":
            unimodal: dict[str, torch.Tensor] = {}
        else:
            unimodal = {name: self._head_logits(name, f) for name, f in features.items()}
        return self._loss(logits, target, features, unimodal)

    def _head_logits(self, name: str, feature: torch.Tensor) -> torch.Tensor:
        head = self.heads[name]
        if isinstance(head, nn.Linear) and not isinstance(head, nn.LazyLinear):
            if head.weight.device != feature.device:
                raise RuntimeError(
                    f"head {name!r} is on {head.weight.device} but its feature is on "
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
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(
                f"target must hold integer class indices (torch.long), got {target.dtype}"
            )
        if target.shape != logits.shape[:1]:
            raise ValueError(
                f"target must have shape ({logits.shape[0]},) to match the logits, "
                f"got {tuple(target.shape)}"
            )
        in_range = ((target >= 0) & (target < self.num_classes)).all()
        torch._assert_async(in_range, f"target labels must lie in [0, {self.num_classes})")
        return target.long()

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
        return torch.is_grad_enabled() and logits.requires_grad

    def _store(self, coefficients: torch.Tensor, scores: torch.Tensor) -> None:
        """Write this step's coefficients into the buffers and record them (no host sync)."""
        with torch.no_grad():
            for index, name in enumerate(self.names):
                self.coefficient_buffer(name).copy_(coefficients[index])
            self.last_scores.copy_(scores)
            self._history.record(coefficients, scores)
        self.steps += 1

    def _head_scores(
        self, unimodal: Mapping[str, torch.Tensor], target: torch.Tensor
    ) -> torch.Tensor:
        """Each head's batch-mean true-class probability (float32, detached), as one vector."""
        device = self.last_scores.device
        return torch.stack(
            [
                true_class_probability(u.detach(), target.to(u.device)).to(device)
                for u in unimodal.values()
            ]
        )

    def _scaled_head_loss(
        self, logits: torch.Tensor, target: torch.Tensor, name: str, scaled: bool
    ) -> torch.Tensor:
        if scaled:
            logits = scale_grad(logits, self.coefficient_buffer(name))
        return F.cross_entropy(logits, target.to(logits.device))

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
        """Per-step ``{name: {"coefficients": (steps,), "scores": (steps,)}}`` on the CPU."""
        return self._history.as_dict()

    def get_extra_state(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])

    def extra_repr(self) -> str:
        return f"encoders={self.names}, num_classes={self.num_classes}"
