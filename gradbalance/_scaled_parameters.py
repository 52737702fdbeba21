"""Parameters whose gradients a balancer's coefficients also scale, one gradient hook each.

A method chooses them in its constructor (``extra_parameters=``, OGM ``parameters="conv"``
or a callable). :class:`ScaledParameters` holds that choice, puts the hooks on when the
balancer attaches, and at each training step refuses a model whose chosen parameters changed
since: a re-parametrization or a replaced layer
(:class:`~gradbalance._parameter_watch.ParameterWatch`), or new parameter objects under the
same names, as FSDP2's ``fully_shard`` registers
(:class:`~gradbalance._named_parameters.NamedParameters`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from itertools import chain

import torch
from torch import nn

from gradbalance._attach import Attachment
from gradbalance._named_parameters import NamedParameters
from gradbalance._parameter_watch import ParameterWatch, Reselect


class ScaledParameters:
    """The per-parameter scaling of one balancer (none: ``selected`` is empty).

    Args:
        model: the user's model.
        selected: ``{modality: parameters}`` whose gradients k_modality scales.
        reselect: the rule that chose them (see :class:`ParameterWatch`), or ``None``.
        hooks: put a gradient hook on each (``False``: only watch them, for a method that
            works on their gradients itself, in ``after_backward()``).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> scaled = ScaledParameters(model, {"a": [model[0].weight]}, None)
        >>> attachment = Attachment(model, {"a": model[0]}, None)
        >>> scaled.attach(attachment, lambda index, grad: grad * 0, {"a": 0})
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> bool((model[0].weight.grad == 0).all()), bool((model[0].bias.grad == 1).all())
        (True, True)
        >>> scaled.check()  # the model still holds the chosen parameters
        >>> attachment.detach()
        >>> scaled.stop()
    """

    def __init__(
        self,
        model: nn.Module,
        selected: Mapping[str, Sequence[torch.Tensor]],
        reselect: Reselect,
        hooks: bool = True,
    ) -> None:
        self.model = model
        self.selected = dict(selected)
        self.hooks = hooks
        self.watch = ParameterWatch(model, selected, reselect)
        self.hooked: NamedParameters | None = None

    def attach(
        self,
        attachment: Attachment,
        scale: Callable[[int, torch.Tensor], torch.Tensor],
        index: Mapping[str, int],
    ) -> None:
        """Hook ``scale(index[modality], grad)`` on each chosen parameter (removed with the
        attachment's hooks; not with ``hooks=False``) and watch the model from now on."""
        for name, params in self.selected.items():
            if self.hooks:
                attachment.add_gradient_hooks(params, partial(scale, index[name]))
        self.watch.start()  # a re-parametrized model is caught at the next check()
        self.hooked = NamedParameters(self.model, chain(*self.selected.values()))

    def check(self) -> None:
        """Raise when the model no longer holds the chosen parameters as they were hooked.

        Raises:
            OrderError: naming the parameter and the fix.
        """
        self.watch.check()
        if self.hooked is not None:
            self.hooked.refuse_replaced()

    def stop(self) -> None:
        """Watch the model no more (the balancer was removed)."""
        self.watch.stop()
