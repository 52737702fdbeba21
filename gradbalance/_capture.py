"""Per-forward captures of the encoders' outputs, and how an output becomes a feature.

A capture belongs to one forward of the model and is used only by the ``loss()`` that
follows that forward. A newer forward (in the same grad mode) supersedes the captures of an
older one that no ``loss()`` consumed (an abandoned step, a dry-run forward): they are
dropped, with one warning per balancer when they came from a training forward. Forwards
under ``torch.no_grad()`` and with gradients are kept apart, so a validation pass between a
training forward and its ``loss()`` does not disturb the step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gradbalance._scale import Binding
from gradbalance.errors import WRAP_ORDER, CaptureError, ConfigurationError, InputTypeError

FeatureFn = Callable[[Any], torch.Tensor]

FIXES = (
    "Call bal.loss(logits, target) once after every training forward. Forwards that are not "
    "training steps must not be balanced: run evaluation under torch.no_grad(), and extra "
    "passes through the encoders (masked passes) inside `with bal.paused():`."
)


@dataclass
class Capture:
    """One encoder's output in one forward of the model."""

    output: Any
    forward: int
    train_mode: bool
    binding: Binding | None


@dataclass
class _Slot:
    forward: int = -1
    captures: dict[str, Capture] = field(default_factory=dict)


class CaptureStore:
    """The captures of the latest forward in each grad mode, and of the latest forward overall.

    Args:
        names: the encoders' names, in order.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.forward = 0
        self.model_forwards = 0
        self.slots: dict[bool, _Slot] = {True: _Slot(), False: _Slot()}
        self.latest = _Slot()
        self.compiled: dict[tuple[bool, str], tuple[Any, bool, Binding | None]] = {}
        self.grad_forward = -1  # the latest forward of the model with gradients enabled
        self._warned = False

    def model_forward(self, grad_enabled: bool) -> None:
        """A forward of the whole model begins (eager, not paused)."""
        self.forward += 1
        self.model_forwards += 1
        self.grad_forward = self.forward if grad_enabled else -1
        # Captures of an encoder compiled on its own in an earlier forward of this grad mode are
        # superseded (deleted in place: compiled code holds this dict).
        for key in [key for key in self.compiled if key[0] == grad_enabled]:
            del self.compiled[key]

    def record(
        self, name: str, output: Any, grad_enabled: bool, train_mode: bool, binding: Binding | None
    ) -> None:
        """Keep ``output`` as encoder ``name``'s capture of the current forward.

        Raises:
            CaptureError: the encoder already produced an output in this forward.
        """
        slot = self.slots[grad_enabled]
        previous = slot.captures.get(name) if slot.forward == self.forward else None
        if previous is not None:
            training = grad_enabled and previous.train_mode
            if training and (self.model_forwards or len(slot.captures) < len(self.names)):
                slot.captures.clear()  # this step is broken; the next forward starts afresh
                raise CaptureError(
                    f"encoder {name!r} was called twice in one forward of the model: the "
                    "balancer measures and scales one output per modality and step. Give each "
                    "use its own encoder module, or run the extra call inside "
                    "`with bal.paused():`."
                )
            # Evaluation passes, or encoders called directly with a complete set captured: a
            # new forward begins.
            self.forward += 1
        if slot.forward != self.forward:
            self._supersede(slot, grad_enabled)
            slot.forward = self.forward
        capture = Capture(output, self.forward, train_mode, binding)
        slot.captures[name] = capture
        if self.latest.forward != self.forward:
            self.latest = _Slot(self.forward)
        self.latest.captures[name] = capture

    def _supersede(self, slot: _Slot, grad_enabled: bool) -> None:
        abandoned = grad_enabled and any(c.train_mode for c in slot.captures.values())
        slot.captures = {}
        if abandoned and not self._warned:
            self._warned = True
            warnings.warn(
                "a training forward of the model was not followed by bal.loss(): its captured "
                "encoder outputs are discarded and the new forward is used (an abandoned step "
                "or a dry-run forward; warned once). " + FIXES,
                stacklevel=5,
            )

    def record_compiled(
        self, name: str, output: Any, grad_enabled: bool, train_mode: bool, binding: Binding | None
    ) -> None:
        """Inside a compiled forward: one store, no Python-side checks (they would add guards
        and recompiles). :meth:`take` ingests it."""
        self.compiled[grad_enabled, name] = (output, train_mode, binding)

    def _ingest_compiled(self) -> None:
        """The captures made in compiled code, per grad mode. Those of an encoder compiled on
        its own (``model.audio.compile()``) join the eager forward that holds the other
        encoders' captures; those of a compiled model form a new forward."""
        if not self.compiled:
            return
        new_forward = False
        for grad_enabled, slot in self.slots.items():
            entries = {n: e for (g, n), e in self.compiled.items() if g == grad_enabled}
            if not entries:
                continue
            if not slot.captures or slot.captures.keys() & entries.keys():
                if not new_forward:
                    self.forward, new_forward = self.forward + 1, True
                slot.captures, slot.forward = {}, self.forward
            if slot.forward > self.latest.forward:
                self.latest = _Slot(slot.forward)
            for name, (output, train_mode, binding) in entries.items():
                capture = Capture(output, slot.forward, train_mode, binding)
                slot.captures[name] = capture
                if self.latest.forward == slot.forward:
                    self.latest.captures[name] = capture
        self.compiled.clear()

    def take(self, grad_enabled: bool) -> dict[str, Capture]:
        """This step's captures (the latest forward in this grad mode), consumed, in the
        encoders' order.

        Raises:
            CaptureError: an encoder produced no output in that forward, or the forward ran
                in the other grad mode.
        """
        self._ingest_compiled()
        slot = self.slots[grad_enabled]
        captures, slot.captures = slot.captures, {}
        missing = [name for name in self.names if name not in captures]
        if not missing:
            return self._in_order(captures)
        other = self.slots[not grad_enabled]
        without_grad = [n for n in missing if n in other.captures]
        if grad_enabled and without_grad and other.forward == self.grad_forward:
            raise CaptureError(
                f"encoder(s) {without_grad} ran under torch.no_grad() inside a forward of the "
                "model with gradients enabled, so their gradients cannot be balanced: "
                "torch.utils.checkpoint(..., use_reentrant=True) runs its function so. Use "
                "use_reentrant=False (to freeze an encoder, use requires_grad_(False) rather "
                "than torch.no_grad())"
            )
        if not captures and all(name in other.captures for name in self.names):
            mode = "enabled" if grad_enabled else "disabled (torch.no_grad)"
            forward = "torch.no_grad()" if grad_enabled else "gradients enabled"
            raise CaptureError(
                f"the model's forward ran under {forward} but loss() is called with "
                f"gradients {mode}: call loss() in the same mode as the model's forward. "
                "(An encoder inside torch.utils.checkpoint(..., use_reentrant=True) runs "
                "under no_grad: use use_reentrant=False.)"
            )
        raise CaptureError(self._missing_message(missing, "since the last loss()"))

    def latest_captures(self) -> dict[str, Capture]:
        """The captures of the latest forward (any grad mode), not consumed.

        Raises:
            CaptureError: that forward did not run every encoder.
        """
        self._ingest_compiled()
        missing = [name for name in self.names if name not in self.latest.captures]
        if missing:
            raise CaptureError(self._missing_message(missing, "in the latest forward"))
        return self._in_order(self.latest.captures)

    def _in_order(self, captures: dict[str, Capture]) -> dict[str, Capture]:
        """In the encoders' order, whatever order the model called them in (the heads and
        every per-modality tensor follow that order)."""
        return {name: captures[name] for name in self.names}

    def _missing_message(self, missing: list[str], when: str) -> str:
        return (
            f"encoder(s) {missing} produced no output {when}: every encoder must run in each "
            "forward of the model that the balancer uses, and loss() must follow that forward "
            "(a model compiled before the balancer was created ignores its hooks: create the "
            f"balancer first: {WRAP_ORDER})"
        )

    def clear(self) -> None:
        """Forget every capture (the balancer was removed)."""
        self.slots = {True: _Slot(), False: _Slot()}
        self.latest = _Slot()
        self.compiled.clear()


def pool_feature(
    output: torch.Tensor, pool: str | None, name: str, *, source: str = "returned"
) -> torch.Tensor:
    """Turn an encoder output into a ``(B, D)`` feature.

    ``pool=None`` (automatic): 2-D outputs are used as they are, 4-D/5-D convolution maps
    ``(B, C, ...)`` are averaged over their spatial/temporal dims. Other shapes need an
    explicit choice: ``"spatial"`` (mean over dims 2+, for ``(B, C, L)`` maps), ``"tokens"``
    (mean over dim 1, for ``(B, T, D)`` sequences) or ``"cls"`` (``x[:, 0]``). ``source``
    says in the errors where ``output`` came from (``"returned"``: the encoder's output).

    Example:
        >>> pool_feature(torch.ones(2, 5, 3, 3), None, "video").shape
        torch.Size([2, 5])
    """
    if pool is None:
        if output.dim() == 2:
            return output
        if output.dim() in (4, 5):
            return output.mean(dim=tuple(range(2, output.dim())))
        raise ConfigurationError(
            f"encoder {name!r} {source} shape {tuple(output.shape)}; only (B, D) features and "
            "(B, C, H, W) / (B, C, T, H, W) maps are pooled automatically. Pass "
            f"pool={{'{name}': 'tokens'}} for a (B, T, D) sequence (or 'cls', 'spatial'), "
            f"or features={{'{name}': callable}} returning a (B, D) tensor"
        )
    if output.dim() < 3:
        raise ConfigurationError(
            f"pool={pool!r} for encoder {name!r} needs a >= 3-D output, but it {source} "
            f"shape {tuple(output.shape)}"
        )
    if pool == "spatial":
        return output.mean(dim=tuple(range(2, output.dim())))
    if pool == "tokens":
        return output.mean(dim=1).flatten(1)
    return output[:, 0].flatten(1)


def extract_feature(
    name: str, output: Any, pool: str | None, function: FeatureFn | None
) -> torch.Tensor:
    """Encoder ``name``'s ``(B, D)`` feature from its raw output (``features=`` or pooling).

    Without ``features=``, a tensor output is pooled (:func:`pool_feature`), and so is the
    ``last_hidden_state`` of an output that has one (a Hugging Face ``ModelOutput``).
    """
    hidden = getattr(output, "last_hidden_state", None)
    if function is not None:
        feature = function(output)
    elif isinstance(output, torch.Tensor):
        feature = pool_feature(output, pool, name)
    elif isinstance(hidden, torch.Tensor):
        source = f"returned a {type(output).__name__} whose last_hidden_state has"
        feature = pool_feature(hidden, pool, name, source=source)
    else:
        raise InputTypeError(
            f"encoder {name!r} returned a {type(output).__name__}; pass "
            f"features={{'{name}': callable}} that returns its (B, D) feature tensor (pool= "
            "applies to a tensor output and to the last_hidden_state of a Hugging Face "
            "ModelOutput)"
        )
    if not isinstance(feature, torch.Tensor) or feature.dim() != 2:
        shape = tuple(feature.shape) if isinstance(feature, torch.Tensor) else type(feature)
        raise ConfigurationError(f"the feature of encoder {name!r} must be (B, D), got {shape}")
    return feature
