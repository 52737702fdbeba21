"""Training step or evaluation: the one rule every method applies to a ``loss()`` call.

A ``loss()`` call is a training step when gradients are enabled (not under
``torch.no_grad()`` / ``torch.inference_mode()``), its logits require a gradient and the
balancer is in train mode. The balancer is an ``nn.Module``: ``bal.train()`` (the default)
and ``bal.eval()`` are the switch, and a parent module's ``.train()``/``.eval()`` sets it too
(Lightning's validation loop). The encoders' own train/eval modes never change the rule: an
encoder kept in eval mode for frozen BatchNorm statistics, or a model in eval mode to switch
dropout off while fine-tuning, is trained with the method's rule. Two patterns that are
usually mistakes get one warning each (:func:`mode_warning`, given by :class:`ModeWarnings`).
"""

from __future__ import annotations

import warnings

ENCODERS_IN_EVAL_MODE = (
    "every encoder is in eval mode while the balancer is in train mode: this loss() with "
    "gradients enabled is a training step (coefficients, scores and history are updated; the "
    "encoders' train/eval modes never change the method's rule). If it is evaluation, run it "
    "under torch.no_grad() or torch.inference_mode(), or call bal.eval() first. If you train "
    "the encoders in eval mode on purpose (frozen BatchNorm, dropout off), call bal.train() "
    "once to say so; that silences this warning"
)

TREATED_AS_EVALUATION = (
    "loss() was called with gradients enabled while the balancer is in eval mode (bal.eval(), "
    "or .eval() of a module that holds it): this call is treated as evaluation and it "
    "leaves the coefficients, scores and history unchanged (a backward of it still applies "
    "the last coefficients). Call bal.train() before training steps: the balancer's mode, "
    "bal.train() / bal.eval(), decides training vs evaluation, whatever the encoders' modes"
)


def is_training_step(gradients: bool, balancer_training: bool) -> bool:
    """Whether a ``loss()`` call is a training step.

    Args:
        gradients: gradients are enabled and the logits require one.
        balancer_training: the balancer's mode (``bal.training``).

    Example:
        >>> [is_training_step(g, t) for g, t in ((True, True), (False, True), (True, False))]
        [True, False, False]
    """
    return gradients and balancer_training


def mode_warning(
    gradients: bool, balancer_training: bool, mode_set: bool, encoders_training: bool
) -> str | None:
    """The warning a ``loss()`` call deserves (None: none).

    Args:
        gradients: gradients are enabled and the logits require one.
        balancer_training: the balancer's mode.
        mode_set: ``bal.train()`` or ``bal.eval()`` was called (the user chose the mode).
        encoders_training: at least one encoder ran its forward in train mode.

    Example:
        >>> mode_warning(True, True, False, False) == ENCODERS_IN_EVAL_MODE
        True
        >>> mode_warning(True, True, True, False) is None  # bal.train() called: on purpose
        True
    """
    if not gradients:
        return None
    if not balancer_training and encoders_training:
        return TREATED_AS_EVALUATION
    if balancer_training and not encoders_training and not mode_set:
        return ENCODERS_IN_EVAL_MODE
    return None


class ModeWarnings:
    """The mode warnings of one balancer: each message of :func:`mode_warning` once.

    ``chosen`` records that the user set the balancer's mode (``bal.train()`` or
    ``bal.eval()``), which silences the warning about encoders in eval mode.

    Example:
        >>> import warnings
        >>> modes = ModeWarnings()
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     for _ in range(3):  # three training steps with every encoder in eval mode
        ...         modes.warn(True, True, False)
        >>> len(caught), str(caught[0].message) == ENCODERS_IN_EVAL_MODE
        (1, True)
    """

    def __init__(self) -> None:
        self.chosen = False
        self.given: set[str] = set()

    def warn(self, gradients: bool, balancer_training: bool, encoders_training: bool) -> None:
        """Warn about a ``loss()`` call (arguments as :func:`mode_warning`'s), once a message;
        the warning points at the caller of ``loss()``."""
        message = mode_warning(gradients, balancer_training, self.chosen, encoders_training)
        if message is not None and message not in self.given:
            self.given.add(message)
            warnings.warn(message, stacklevel=3)
