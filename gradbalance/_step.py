"""One training (or evaluation) ``loss()`` call: the explicit contract between the
:class:`~gradbalance.Balancer` front and a method.

``Balancer.loss()`` checks the inputs, extracts the features, evaluates the heads and hands a
:class:`Step` to the method's ``_loss(step)``, which returns the loss. A method:

* reads ``step.logits``, ``step.target``, ``step.features``, ``step.outputs`` (raw encoder
  outputs), ``step.unimodal`` (head logits by name) and ``step.training``;
* reduces per-sample statistics with :meth:`Step.mean` (over all ranks with ``sync="global"``;
  every rank must make the same calls in the same order);
* keeps running state with :meth:`Step.keep_if_finite`;
* records the step's coefficients and scores once with :meth:`Step.store` (training only);
* routes tensors whose gradient its coefficients scale through :meth:`Step.scale`.

Nothing here synchronises with the host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from gradbalance._distributed import local_mean, reduce_mean
from gradbalance._finite import is_finite, nonfinite_message
from gradbalance._scale import Binding, scale_grad
from gradbalance.coefficients import true_class_probability
from gradbalance.errors import NonFiniteError

if TYPE_CHECKING:
    from gradbalance.balancer import Balancer


class Step:
    """The data and the per-step services of one ``loss()`` call (see the module docstring)."""

    def __init__(
        self,
        balancer: Balancer,
        logits: torch.Tensor,
        target: torch.Tensor,
        features: dict[str, torch.Tensor],
        outputs: dict[str, Any],
        training: bool,
        binding: Binding | None,
    ) -> None:
        self.balancer = balancer
        self.logits = logits
        self.target = target
        self.features = features
        self.outputs = outputs
        self.training = training
        self.binding = binding
        self.stacked_unimodal: torch.Tensor | None = None
        self._unimodal: dict[str, torch.Tensor] | None = None
        self.finite: torch.Tensor | None = None
        self.finite_reduced = False

    @property
    def batch_size(self) -> int:
        return self.target.shape[0]

    @property
    def unimodal(self) -> dict[str, torch.Tensor]:
        """``{name: (B, K)}``: each head's logits (empty without heads)."""
        if self._unimodal is None:
            stacked = self.stacked_unimodal
            names = self.balancer.names
            self._unimodal = {} if stacked is None else dict(zip(names, stacked.unbind()))
        return self._unimodal

    def set_unimodal(
        self, stacked: torch.Tensor | None, separate: dict[str, torch.Tensor] | None
    ) -> None:
        """The heads' logits: stacked ``(M, B, K)`` or a dict (one of the two)."""
        self.stacked_unimodal = stacked
        self._unimodal = separate

    def mean(self, sums: torch.Tensor, count: torch.Tensor | float) -> torch.Tensor:
        """Mean of per-sample statistics over the global batch (float32, detached).

        With ``sync="global"`` in a training step under torch.distributed, ``sums`` and
        ``count`` are all-reduced in one collective (the step's non-finite flag rides along,
        so every rank skips the same steps); otherwise the local ``sums / count``.
        """
        bal = self.balancer
        if not (self.training and bal.sync == "global" and bal.world_size() > 1):
            return local_mean(sums, count)
        carry = self.finite is not None and not self.finite_reduced
        flag = (~self.finite).float().reshape(1) if carry and self.finite is not None else None
        mean, reduced = reduce_mean(sums, count, bal.process_group, flag)
        if reduced is not None:
            self.finite = reduced[0] == 0
            self.finite_reduced = True
        return mean

    def keep_if_finite(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """``new`` when this step and ``new`` are finite, else ``old`` (no host sync).

        For a method's running state (EMAs, memories, counts); call it after this step's
        :meth:`mean` (under DDP that call makes every rank agree on the step's finiteness).
        """
        with torch.no_grad():
            finite = is_finite(new)
            if self.finite is not None:
                finite = finite & self.finite.to(new.device)
        return torch.where(finite, new, old)

    def unimodal_stack(self) -> torch.Tensor | list[torch.Tensor]:
        """The heads' logits as one ``(M, B, K)`` tensor when stacked, else a list."""
        if self.stacked_unimodal is not None:
            return self.stacked_unimodal
        return list(self.unimodal.values())

    def score_sums(self, logits: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Batch sums of the true-class probability of ``(M, B, K)`` logits (or a list)."""
        device = self.balancer.last_scores.device
        if isinstance(logits, torch.Tensor):
            return true_class_probability(logits.detach(), self.target.to(logits.device), "sum").to(
                device
            )
        return torch.stack(
            [
                true_class_probability(u.detach(), self.target.to(u.device), "sum").to(device)
                for u in logits
            ]
        )

    def head_terms(self, scaled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's mean cross-entropy (with graph) and score, both ``(M,)``.

        The score is the head's batch-mean true-class probability (float32, detached, over
        all ranks with ``sync="global"``); both come from one log-softmax. ``scaled`` routes
        the head logits through this step's coefficients (the gradient into head m and, from
        it, into encoder m is multiplied by k_m).
        """
        true_class = _true_class_log_probability(self.head_outputs(scaled), self.target)
        sums = true_class.detach().exp().sum(-1).to(self.balancer.last_scores.device)
        return -true_class.mean(-1), self.mean(sums, self.batch_size)

    def head_outputs(self, scaled: bool) -> torch.Tensor:
        """``(M, B, K)``: every head's output on this step, batched or stacked (separately run
        heads in float32, on the fused logits' device). ``scaled`` routes them through this
        step's coefficients (the gradient into head m and encoder m is multiplied by k_m)."""
        if self.stacked_unimodal is not None:
            return self.scale(self.stacked_unimodal) if scaled else self.stacked_unimodal
        device = self.logits.device
        return torch.stack(
            [
                (self.scale(u, index) if scaled else u).float().to(device)
                for index, u in enumerate(self.unimodal.values())
            ]
        )

    def scale(self, tensor: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """``tensor`` whose gradient is multiplied by this step's coefficient ``k_index``
        (``index=None``: a stacked ``(M, ...)`` tensor, each slice by its own k)."""
        binding = self.binding
        if binding is None or not self.training:
            return tensor
        if index is None:
            k = binding.values.view(-1, *([1] * (tensor.dim() - 1)))
            return scale_grad(tensor, k.to(tensor.device))
        return scale_grad(tensor, binding.views[index])

    def store(self, coefficients: torch.Tensor, scores: torch.Tensor) -> None:
        """Record this training step's coefficients and scores (once per step).

        Writes them into this forward's binding (its backward applies them), the balancer's
        buffers and history. A non-finite step (see ``nonfinite``) leaves everything as it
        was: the previous coefficients, scores and history.
        """
        bal = self.balancer
        with torch.no_grad():
            device = bal.last_scores.device
            coefficients = coefficients.to(device=device, dtype=torch.float32)
            scores = scores.to(device=device, dtype=torch.float32)
            values_finite = (coefficients.sum() + scores.sum()) * 0 == 0
            finite: torch.Tensor | None = None
            if bal.raises_at_once(coefficients):
                try:  # on the CPU the assertion is synchronous (and no device synchronisation)
                    torch._assert_async(values_finite, "non-finite")
                except RuntimeError:
                    message = nonfinite_message("the coefficients or scores", bal.steps)
                    raise NonFiniteError(message) from None
            else:
                finite = values_finite
                if self.finite is not None:
                    finite = finite & self.finite.to(device)
                coefficients = torch.where(finite, coefficients, bal.last_coefficients)
                scores = torch.where(finite, scores, bal.last_scores)
                bal.nonfinite_steps.add_((~finite).to(bal.nonfinite_steps.dtype))
                bal.note_finite(finite)
            if self.binding is not None:
                self.binding.write(coefficients)
            bal.last_coefficients.copy_(coefficients)
            bal.last_scores.copy_(scores)
            bal.record_history(coefficients, scores, finite)
        bal.steps += 1


def _true_class_log_probability(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[..., i, target[i]]`` in float32, for ``(..., B, K)`` logits."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    index = target.to(logits.device).expand(log_probs.shape[:-1]).unsqueeze(-1)
    return log_probs.gather(-1, index).squeeze(-1)
