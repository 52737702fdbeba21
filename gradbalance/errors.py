"""The errors gradbalance raises, each a subclass of the built-in a caller already catches.

``except ValueError`` (or ``TypeError``, ``RuntimeError``) keeps working; catching
:class:`GradbalanceError` catches every error raised by the library on purpose.

Example:
    >>> import torch, gradbalance as gb
    >>> model = gb.testing.TwoTowerNet()
    >>> try:
    ...     gb.MLB(model, [model.audio, model.video], num_classes=3, alpha=float("nan"))
    ... except gb.errors.ConfigurationError as error:
    ...     print(type(error).__mro__[1].__name__)
    GradbalanceError
"""

from __future__ import annotations

WRAP_ORDER = (
    "bal = gb.MLB(model, ...); opt = torch.optim.Adam([*model.parameters(), "
    "*bal.parameters()]); model = DDP(model); model = torch.compile(model)"
)
"""The order in which a balancer, an optimizer, DDP and torch.compile are created."""


class GradbalanceError(Exception):
    """Base class of every error gradbalance raises on purpose."""


class ConfigurationError(GradbalanceError, ValueError):
    """A constructor argument is refused; nothing was attached to the model."""


class InputError(GradbalanceError, ValueError):
    """``loss()`` received logits or labels of the wrong shape, device or size."""


class InputTypeError(GradbalanceError, TypeError):
    """``loss()`` or a constructor received an object of the wrong type, or an encoder
    returned one the balancer cannot use (tensors it cannot reach, no feature to pool)."""


class CaptureError(GradbalanceError, RuntimeError):
    """The forwards and ``loss()`` calls do not form training steps the balancer can use
    (an encoder skipped or called twice, a grad-mode mismatch, an encoder under reentrant
    checkpointing or inside a ``torch.func`` transform)."""


class OrderError(GradbalanceError, RuntimeError):
    """The balancer, optimizer, DDP and ``torch.compile`` were created in the wrong order, or
    the model was changed after its balancer in a way the balancer cannot follow."""


class NonFiniteError(GradbalanceError, RuntimeError):
    """NaN or inf in a training step's features, logits, statistics or gradients."""


class DeviceError(GradbalanceError, RuntimeError):
    """A tensor is on another device than the balancer's state for that encoder."""


class UnavailableError(GradbalanceError, RuntimeError):
    """The balancer was not built with what this call reads: e.g. ``unimodal_logits()`` on a
    method without a classifier of one modality alone (build it with ``probes=True``), or
    ``modality_slices()`` without a ``fusion_head``."""


class MissingCallWarning(UserWarning):
    """The training loop skips a call the method needs (``bal.epoch_end()`` once per epoch,
    ``bal.after_backward()`` before each optimizer step); issued once per balancer and kind."""


class CostWarning(UserWarning):
    """A configuration whose cost per training step is far above the usual (AGM's exact
    Shapley decomposition over many modalities); the message gives the cost and the option
    that avoids it."""


class LoggerWarning(UserWarning):
    """A logger given to :class:`~gradbalance.integrations.BalancerLog` raised while writing;
    training went on (issued once per ``BalancerLog``, which counts the failed writes)."""
