"""What every method shares beyond the :class:`~gradbalance.Balancer` front: the switch
``enabled``, the modulation window, eval-mode passes, fused-head slices and parameter choice.

A method implements ``_loss(step)`` (the per-step contract of :class:`~gradbalance.Step`): it
reads the step's logits, features and head logits, calls ``step.store(coefficients, scores)``
once in a training step and returns the loss. :meth:`Method.active` says whether this
training step is modulated (enabled and inside the window). What else a method may read,
call and override is the extension surface of :class:`~gradbalance.Balancer` (the "Writing a
method" page).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from gradbalance._checks import check_fusion_head, check_window
from gradbalance._sharded import refuse_sharded
from gradbalance._step import Step
from gradbalance.balancer import Balancer
from gradbalance.errors import ConfigurationError, UnavailableError

WindowUnit = Literal["epoch", "step"]
ParameterChoice = Literal["encoder", "conv"] | Callable[[str, nn.Parameter], bool]


@contextmanager
def eval_mode(model: nn.Module, active: bool = True) -> Iterator[None]:
    """Put every submodule in eval mode for the block and restore each one's own flag after."""
    if not active:
        yield
        return
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def modality_slices(head: nn.Module, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per-modality logits of a late-linear fused head: ``W_m z_m + b / M``.

    ``head.modality_logits(*features)`` when the head has it; for an ``nn.Linear`` over the
    concatenated features, the weight is split by the features' widths.
    """
    modality_logits = getattr(head, "modality_logits", None)
    if callable(modality_logits):
        return list(modality_logits(*features))
    if not isinstance(head, nn.Linear):
        raise ConfigurationError(
            "fusion_head must be an nn.Linear or have modality_logits(*features)"
        )
    refuse_sharded(head, "fusion_head")
    widths = [feature.shape[-1] for feature in features]
    if sum(widths) != head.weight.shape[1]:
        raise ConfigurationError(
            f"fusion_head is an nn.Linear with {head.weight.shape[1]} inputs but the encoders' "
            f"features have widths {widths} (sum {sum(widths)}); pass the linear layer that "
            "takes the concatenated features, in encoder order"
        )
    blocks = head.weight.split(widths, dim=1)
    share = None if head.bias is None else head.bias / len(features)
    return [F.linear(feature, block, share) for feature, block in zip(features, blocks)]


def parameter_filter(choice: ParameterChoice) -> Callable[[str, nn.Parameter], bool]:
    """The parameter selection of ``parameters=``: every one, 4-D kernels, or a callable."""
    if choice == "encoder":
        return lambda name, param: True
    if choice == "conv":
        return lambda name, param: param.dim() == 4
    if callable(choice):
        return choice
    raise ConfigurationError(
        "parameters must be 'encoder', 'conv' (4-D kernels only, as the official OGM "
        f"code) or a callable (name, parameter) -> bool, got {choice!r}"
    )


class Method(Balancer):
    """A balancing method: the front plus ``enabled`` and a modulation window.

    Not a method itself. ``enabled=False`` (or a step outside the window) trains without
    modulation: every coefficient is 1 (for PMR the prototype weights are 0).

    Args:
        model, encoders, num_classes: as :class:`~gradbalance.Balancer`.
        enabled: modulate at all (switch later with ``bal.enabled = False``).
        window: ``(start, end)`` inclusive range of epochs (or steps) in which the method
            modulates; ``end=None`` never ends.
        window_unit: ``"epoch"`` (counted by :meth:`epoch_end`) or ``"step"``.
        **common: the options of :class:`~gradbalance.Balancer` (``task=`` included).

    Example:
        >>> import torch, gradbalance as gb
        >>> class Fixed(gb.Method):
        ...     def _loss(self, step):
        ...         k = torch.tensor([2.0, 1.0]) if self.active() else torch.ones(2)
        ...         if step.training:
        ...             step.store(k, torch.zeros(2))
        ...         return step.fused_loss()
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = Fixed(model, [model.audio, model.video], num_classes=3, window=(1, None))
        >>> y = torch.tensor([0, 1, 2, 0])
        >>> bal.loss(model(torch.randn(4, 8), torch.randn(4, 6)), y).backward()
        >>> bal.coefficients["audio"]  # epoch 0 is outside the window
        tensor(1.)
    """

    def __init__(
        self,
        model: nn.Module,
        encoders: Sequence[nn.Module] | Mapping[str, nn.Module],
        num_classes: int | None = None,
        *,
        enabled: bool = True,
        window: Sequence[int | None] = (0, None),
        window_unit: WindowUnit = "epoch",
        **common: Any,
    ) -> None:
        self.window = check_window(window, window_unit)
        self.window_unit = window_unit
        super().__init__(model, encoders, num_classes, **common)
        self.enabled = bool(enabled)

    def active(self) -> bool:
        """Whether this training step is modulated (enabled and inside the window)."""
        if not self.enabled:
            return False
        start, end = self.window
        position = self.epoch if self.window_unit == "epoch" else self.steps
        return position >= start and (end is None or position <= end)

    def epoch_end_reason(self) -> str | None:
        """Why this balancer needs :meth:`epoch_end` once per epoch; ``None``: it does not.

        When it does, a loop that resumes training after evaluation forwards (the model in
        eval mode or under ``torch.no_grad()``) with no ``epoch_end()`` since the training
        before them gets one :class:`~gradbalance.errors.MissingCallWarning`.
        """
        if self.window_unit == "epoch" and tuple(self.window) != (0, None):
            return f"its modulation window {tuple(self.window)} is counted in epochs"
        return None

    def _encoder_parameters(self, choice: ParameterChoice) -> dict[str, list[nn.Parameter]]:
        """Each encoder's trainable parameters selected by ``choice`` (each parameter once)."""
        keep = parameter_filter(choice)
        seen: set[int] = set()
        selected: dict[str, list[nn.Parameter]] = {}
        for name, module in self.encoders.items():
            selected[name] = []
            for param_name, param in module.named_parameters():
                if param.requires_grad and id(param) not in seen and keep(param_name, param):
                    seen.add(id(param))
                    selected[name].append(param)
        return selected

    def _probe_loss(self, step: Step) -> torch.Tensor:
        """The detached probes' summed cross-entropy (it trains only the probes); 0 without."""
        if not step.unimodal:
            return step.logits.new_zeros(())
        return step.head_terms(scaled=False)[0].sum().to(step.logits.device)

    def _window_repr(self) -> str:
        return f"window={self.window} ({self.window_unit}), enabled={self.enabled}"


class SlicedScoresMethod(Method):
    """A method whose per-modality logits are the fused head's slices, or detached probes.

    With ``fusion_head`` (a late-linear head, see :func:`modality_slices`) each modality's
    logits are its slice of the fused logits, as the official OGM and the MLB code's MSLR
    read them (:meth:`modality_slices`); without it, detached linear probes stand in. With
    ``fusion_head`` and ``probes=True`` the probes are added as well, only so that
    :meth:`~gradbalance.Balancer.unimodal_logits` has a classifier of each modality alone (the
    scores still come from the slices). Not a method itself.
    """

    def __init__(
        self,
        model: nn.Module,
        encoders: Sequence[nn.Module] | Mapping[str, nn.Module],
        num_classes: int | None = None,
        *,
        fusion_head: nn.Module | None = None,
        probes: bool = False,
        **options: Any,
    ) -> None:
        check_fusion_head(fusion_head)
        with_probes = fusion_head is None or bool(probes)
        super().__init__(
            model,
            encoders,
            num_classes,
            head_mode="probe" if with_probes else "none",
            **options,
        )
        self.__dict__["_fusion_head"] = fusion_head  # not a submodule: it belongs to the model

    @property
    def fusion_head(self) -> nn.Module | None:
        """The fused head whose slices give the per-modality logits (``None``: probes)."""
        return self.__dict__["_fusion_head"]

    def _slices(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each modality's (detached) slice of the fused head's logits."""
        head = self.fusion_head
        if head is None:
            raise ConfigurationError("this balancer reads probes, not fused-head slices")
        with torch.no_grad():
            logits = modality_slices(head, [features[n] for n in self.names])
        return dict(zip(self.names, logits))

    def _modality_logits(self, step: Step) -> list[torch.Tensor] | torch.Tensor:
        """The slices when there is a fused head, else the probes' logits."""
        if self.fusion_head is not None:
            return list(self._slices(step.features).values())
        return step.unimodal_stack()

    def modality_slices(self) -> dict[str, torch.Tensor]:
        """``{name: (B, K)}``: the fused head's per-modality slices on the latest forward,
        detached: what this method scores with ``fusion_head`` (``W_m z_m + b / M`` for an
        ``nn.Linear``; ``head.modality_logits(*features)`` otherwise).

        Not a per-modality accuracy: the slice of a jointly trained head is not a classifier of
        that modality alone (its accuracy is usually well below what the modality reaches on
        its own). For that, build the balancer with ``probes=True`` and read
        :meth:`~gradbalance.Balancer.unimodal_logits`.

        Raises:
            UnavailableError: the balancer has no ``fusion_head`` (it scores its probes:
                read :meth:`~gradbalance.Balancer.unimodal_logits`).
        """
        if self.fusion_head is None:
            raise UnavailableError(
                f"{type(self).__name__} was built without fusion_head, so there are no fused-head "
                "slices: it scores detached linear probes, read bal.unimodal_logits()"
            )
        return self._slices(self.features())
