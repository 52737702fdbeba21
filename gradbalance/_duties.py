"""The calls a training loop owes some methods, and one warning when a loop skips them.

``epoch_end()``: PMR builds its prototypes there, MSLR updates its coefficients there, and a
modulation window counted in epochs advances there; a loop that never calls it trains such a
method silently as something else (PMR as Joint, MSLR with its initial factors). A loop
cannot be asked how long an epoch is, so the rule is the pattern every epoch-based loop has:
training forwards, then evaluation forwards (the model in eval mode or under
``torch.no_grad()``), then training again. When training resumes after an evaluation pass with
no ``epoch_end()`` since the training before it, a method that needs ``epoch_end()`` warns once
(:class:`~gradbalance.errors.MissingCallWarning`). Pure Python bookkeeping on each forward of
the model: no tensor is read, no host synchronisation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from gradbalance.errors import MissingCallWarning

SILENCE = (
    "If you evaluate mid-epoch on purpose, silence this with "
    "warnings.filterwarnings('ignore', category=gb.errors.MissingCallWarning)"
)


def epoch_end_message(method: str, reason: str) -> str:
    """The warning of a loop that resumed training after evaluation without ``epoch_end()``."""
    return (
        f"{method} needs bal.epoch_end() once per training epoch ({reason}), but training "
        "resumed after an evaluation pass without it: call bal.epoch_end() after each epoch "
        f"(after validation). {SILENCE}"
    )


class LoopDuties:
    """Tracks training forwards, evaluation forwards and ``epoch_end()`` calls of one balancer.

    Example:
        >>> import warnings
        >>> class Owner:
        ...     def epoch_end_reason(self):
        ...         return "it builds the prototypes there"
        >>> owner, duties = Owner(), LoopDuties()
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     for training in (True, False, True, False, True):  # train, validate, train...
        ...         duties.model_forward(training, owner)
        >>> len(caught), caught[0].category.__name__, "Owner needs" in str(caught[0].message)
        (1, 'MissingCallWarning', True)
    """

    def __init__(self) -> None:
        self.trained = False
        self.evaluated = False
        self.warned = False

    def model_forward(self, training: bool, owner: object) -> None:
        """Note one forward of the model (``training``: train mode with gradients enabled)
        of ``owner``, the balancer (its ``epoch_end_reason()``, when it has one, says why it
        needs ``epoch_end()``; read only when the pattern occurs)."""
        if not training:
            self.evaluated = self.evaluated or self.trained
            return
        if self.evaluated and not self.warned:
            explain: Callable[[], str | None] | None = getattr(owner, "epoch_end_reason", None)
            reason = explain() if explain is not None else None
            if reason is not None:
                self.warned = True
                message = epoch_end_message(type(owner).__name__, reason)
                warnings.warn(message, MissingCallWarning, stacklevel=3)
        self.trained, self.evaluated = True, False

    def epoch_end(self) -> None:
        """``epoch_end()`` was called: a new epoch starts."""
        self.trained = self.evaluated = False
