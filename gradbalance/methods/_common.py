"""Pieces shared by the baseline methods: epoch counter and modulation window, fused-head
slices, per-parameter gradient hooks, eval-mode passes and the ``after_backward()`` hook."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from gradbalance.balancer import Balancer

WindowUnit = Literal["epoch", "step"]
ParameterChoice = Literal["encoder", "conv"] | Callable[[str, nn.Parameter], bool]


def check_window(window: Sequence[int | None], unit: str) -> tuple[int, int | None]:
    """Validate a modulation window ``(start, end)``; ``end=None`` means "never ends"."""
    if unit not in ("epoch", "step"):
        raise ValueError(f"window_unit must be 'epoch' or 'step', got {unit!r}")
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be a pair (start, end), got {window!r}")
    start, end = window
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"the window start must be an int >= 0, got {start!r}")
    if end is not None and (not isinstance(end, int) or end < start):
        raise ValueError(f"the window end must be None or an int >= start ({start}), got {end!r}")
    return start, end


def check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
    return float(alpha)


def require_two(encoders: Any, method: str) -> None:
    """Refuse (before any hook is registered) an encoder count other than two."""
    count = len(encoders) if hasattr(encoders, "__len__") else None
    if count is not None and count != 2:
        raise ValueError(
            f"{method} is defined for exactly two modalities (it compares the ratio of two "
            f"scores), got {count} encoders; use MLB, AGM or MSLR for more"
        )


def check_fusion_head(head: Any) -> None:
    if head is None:
        return
    if callable(getattr(head, "modality_logits", None)) or isinstance(head, nn.Linear):
        return
    raise TypeError(
        "fusion_head must be an nn.Linear over the concatenated features (in encoder order) or "
        "a module with modality_logits(*features) -> list of (B, K) tensors (e.g. "
        f"gb.MMCosineHead); got {type(head).__name__}. For other fusions leave fusion_head=None "
        "(detached probe heads are used)"
    )


def modality_slices(head: nn.Module, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per-modality logits of a late-linear fused head (METHODS.md §1.2 U2).

    ``head.modality_logits(*features)`` when the head has it; for an ``nn.Linear`` over the
    concatenated features, ``W_m z_m + b / M`` with W split by the features' widths.
    """
    if callable(getattr(head, "modality_logits", None)):
        return list(head.modality_logits(*features))
    widths = [feature.shape[-1] for feature in features]
    if sum(widths) != head.weight.shape[1]:
        raise ValueError(
            f"fusion_head is an nn.Linear with {head.weight.shape[1]} inputs but the encoders' "
            f"features have widths {widths} (sum {sum(widths)}); pass the linear layer that "
            "takes the concatenated features, in encoder order"
        )
    blocks = head.weight.split(widths, dim=1)
    share = head.bias / len(features) if head.bias is not None else None
    return [F.linear(feature, block, share) for feature, block in zip(features, blocks)]


def _times(coefficient: Callable[[], torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
    return grad * coefficient().to(grad.dtype)


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


class MethodBase(Balancer):
    """Common state of the baselines: the model and a modulation window.

    Not a method itself. Subclasses call :meth:`_in_window` in their training step and the user
    calls :meth:`epoch_end` once per epoch (or sets :attr:`epoch`). ``after_backward()`` (the
    per-parameter step after ``backward()``) comes from :class:`~gradbalance.Balancer`.
    """

    def __init__(
        self,
        model: nn.Module,
        encoders: Sequence[nn.Module] | Mapping[str, nn.Module],
        num_classes: int,
        *,
        enabled: bool = True,
        window: Sequence[int | None] = (0, None),
        window_unit: WindowUnit = "epoch",
        **common: Any,
    ) -> None:
        self.window = check_window(window, window_unit)
        self.window_unit = window_unit
        super().__init__(model, encoders, num_classes, **common)
        # Not a submodule: the balancer's state_dict and parameters() never hold the model.
        self.__dict__["_model"] = model
        self.enabled = bool(enabled)
        self._own_handles: list[Any] = []

    def _in_window(self) -> bool:
        """Whether this training step is inside the modulation window (and enabled)."""
        if not self.enabled:
            return False
        start, end = self.window
        position = self.epoch if self.window_unit == "epoch" else self.steps
        return position >= start and (end is None or position <= end)

    def _encoder_parameters(
        self, choice: ParameterChoice
    ) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Each encoder's trainable parameters selected by ``choice`` (each parameter once)."""
        if choice == "encoder":
            keep: Callable[[str, nn.Parameter], bool] = lambda name, param: True  # noqa: E731
        elif choice == "conv":
            keep = lambda name, param: param.dim() == 4  # noqa: E731
        elif callable(choice):
            keep = choice
        else:
            raise ValueError(
                "parameters must be 'encoder', 'conv' (4-D kernels only, as the official OGM "
                f"code) or a callable (name, parameter) -> bool, got {choice!r}"
            )
        seen: set[int] = set()
        selected: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for name, module in self._encoders.items():
            selected[name] = []
            for param_name, param in module.named_parameters():
                if param.requires_grad and id(param) not in seen and keep(param_name, param):
                    seen.add(id(param))
                    selected[name].append((param_name, param))
        return selected

    def _scale_parameter_gradients(
        self, parameters: Mapping[str, Sequence[tuple[str, nn.Parameter]]]
    ) -> None:
        """Multiply each listed parameter's gradient by its modality's coefficient.

        A gradient hook per parameter (``Tensor.register_hook``): it runs on each backward's
        own contribution before accumulation, so before DDP's all-reduce, on AMP-scaled
        gradients (scaling is linear) and once per micro-batch without compounding.
        """
        for name, params in parameters.items():
            for _, param in params:
                hook = partial(_times, partial(self.coefficient_buffer, name))
                self._own_handles.append(param.register_hook(hook))

    def remove(self) -> None:
        for handle in self._own_handles:
            handle.remove()
        self._own_handles = []
        super().remove()


class SlicedScoresMethod(MethodBase):
    """A baseline whose per-modality logits are the fused head's slices, or detached probes.

    With ``fusion_head`` (a late-linear head, see :func:`modality_slices`) each modality's
    logits are its slice of the fused logits (METHODS.md §1.2 U2), as the official OGM and the
    MLB code's MSLR read them; without it, detached linear probes stand in. Not a method itself.
    """

    def __init__(
        self,
        model: nn.Module,
        encoders: Sequence[nn.Module] | Mapping[str, nn.Module],
        num_classes: int,
        *,
        fusion_head: nn.Module | None = None,
        **options: Any,
    ) -> None:
        check_fusion_head(fusion_head)
        super().__init__(
            model,
            encoders,
            num_classes,
            head_mode="none" if fusion_head is not None else "probe",
            **options,
        )
        # Not a submodule: the fused head belongs to the model.
        self.__dict__["_fusion_head"] = fusion_head

    @property
    def fusion_head(self) -> nn.Module | None:
        """The fused head whose slices give the per-modality logits (``None``: probes)."""
        return self.__dict__["_fusion_head"]

    def _slices(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each modality's (detached) slice of the fused head's logits."""
        with torch.no_grad():
            logits = modality_slices(self.fusion_head, [features[n] for n in self.names])
        return dict(zip(self.names, logits))

    def _modality_logits(
        self, features: Mapping[str, torch.Tensor], unimodal: Mapping[str, torch.Tensor]
    ) -> Mapping[str, torch.Tensor]:
        """The slices when there is a fused head, else the probes' logits ``unimodal``."""
        return self._slices(features) if self.fusion_head is not None else unimodal

    def unimodal_logits(self) -> dict[str, torch.Tensor]:
        """Each modality's logits on the last forward: fused-head slices or probe outputs."""
        if self.fusion_head is not None:
            return self._slices(self.features())
        return super().unimodal_logits()
