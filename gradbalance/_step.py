"""One training (or evaluation) ``loss()`` call: the explicit contract between the
:class:`~gradbalance.Balancer` front and a method.

``Balancer.loss()`` checks the inputs, extracts the features, evaluates the heads and hands a
:class:`Step` to the method's ``_loss(step)``, which returns the loss. A method:

* reads ``step.logits``, ``step.target``, ``step.features``, ``step.outputs`` (raw encoder
  outputs), ``step.unimodal`` (head logits by name) and ``step.training``;
* computes the task's losses with :meth:`Step.fused_loss`, :meth:`Step.head_terms` and
  :meth:`Step.loss_sums` (classification or regression alike);
* reduces per-sample statistics with :meth:`Step.mean` (over all ranks with ``sync="global"``;
  every rank must make the same calls in the same order);
* honours missing modalities (``loss(..., present=)``, :attr:`Step.present`) with
  :meth:`Step.present_sums`, :meth:`Step.present_mean`, :meth:`Step.modality_mean`,
  :meth:`Step.score_mean` and :meth:`Step.keep_if_seen`: per-modality statistics over the
  samples where the modality is present (:meth:`head_terms`, :meth:`loss_sums`,
  :meth:`score_sums`, :meth:`accuracy_sums` and :meth:`sample_sums` do it already), and a
  modality absent from the whole global batch keeps its coefficient and score (:meth:`store`
  does it);
* keeps running state with :meth:`Step.keep_if_finite` (or :meth:`Step.update_state` for a
  state declared with ``add_state``);
* records the step's coefficients and scores once with :meth:`Step.store` (training only);
* routes tensors whose gradient its coefficients scale through :meth:`Step.scale`.

A step never reaches back into its balancer: it holds a :class:`StepContext` (the names, the
task, the reduction group, the non-finite guard, the previous results), and the balancer reads
:attr:`Step.stored` once the method's ``_loss`` has returned. Nothing here synchronises with
the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from gradbalance._distributed import local_mean, reduce_mean, reduce_sum
from gradbalance._finite import NonFiniteGuard, is_finite, nonfinite_message
from gradbalance._scale import Binding, scale_grad
from gradbalance.coefficients import true_class_probability
from gradbalance.errors import NonFiniteError

if TYPE_CHECKING:
    from gradbalance._task import Task

Stored = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]
"""What :meth:`Step.store` hands to the balancer: coefficients, scores (float32, on the
balancer's device; the previous ones where the step was not finite) and the device-side
finiteness flag (``None`` where a non-finite step raised at once instead)."""


@dataclass(frozen=True)
class StepContext:
    """What a :class:`Step` needs from its balancer, given once at the start of ``loss()``.

    Attributes:
        names: the encoders' names, in order.
        task: the balancer's task (losses and scores of classification or regression).
        device: the device of the balancer's results (coefficients, scores).
        synced: whether the statistics of a training step are all-reduced over the ranks
            (``sync="global"`` under torch.distributed); else local means.
        process_group: the group of that reduction (``None``: the world).
        guard: the balancer's non-finite guard.
        index: the number of training steps before this one (for error messages).
        previous: the last coefficients and scores (kept by a non-finite step).
        world_size: the number of ranks of ``process_group`` (1 outside torch.distributed).
    """

    names: list[str]
    task: Task
    device: torch.device
    synced: bool
    process_group: Any
    guard: NonFiniteGuard
    index: int
    previous: tuple[torch.Tensor, torch.Tensor]
    world_size: int = 1


class Step:
    """The data and the per-step services of one ``loss()`` call, handed to a method's
    ``_loss(step)``.

    Data: :attr:`logits`, :attr:`target`, :attr:`features` (``{name: (B, D)}``),
    :attr:`outputs` (raw encoder outputs), :attr:`unimodal` (heads' logits), :attr:`training`,
    :attr:`present` (the ``(B, M)`` mask of present modalities, or ``None``).
    Services: :meth:`fused_loss`, :meth:`head_terms`, :meth:`loss_sums`, :meth:`score_sums`,
    :meth:`accuracy_sums`, :meth:`sample_sums`, :meth:`mean`, :meth:`present_sums`,
    :meth:`present_mean`, :meth:`modality_mean`, :meth:`score_mean`, :meth:`keep_if_seen`,
    :meth:`keep_if_finite`, :meth:`scale`, :meth:`store`.

    Example:
        >>> import torch, gradbalance as gb
        >>> class HalfVideo(gb.Method):
        ...     def _loss(self, step: gb.Step) -> torch.Tensor:
        ...         if step.training:
        ...             step.store(torch.tensor([1.0, 0.5]), torch.zeros(2))
        ...         return step.fused_loss()
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = HalfVideo(model, [model.audio, model.video], num_classes=3)
        >>> y = torch.tensor([0, 1, 2, 0])
        >>> bal.loss(model(torch.randn(4, 8), torch.randn(4, 6)), y).backward()
        >>> bal.coefficients["video"]
        tensor(0.5000)
    """

    def __init__(
        self,
        context: StepContext,
        logits: torch.Tensor,
        target: torch.Tensor,
        features: dict[str, torch.Tensor],
        outputs: dict[str, Any],
        training: bool,
        binding: Binding | None,
        present: torch.Tensor | None = None,
    ) -> None:
        self.context = context
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
        self.stored: Stored | None = None
        self.present = present
        """``(B, M)`` bool: whether sample i has modality m (``loss(..., present=)``); ``None``:
        every sample has every modality."""
        self.seen: torch.Tensor | None = None
        """``(M,)`` bool on the balancer's device, once a :meth:`modality_mean` ran with a mask:
        whether modality m is present in some sample of the global batch (``None``: all)."""
        self._global_counts: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.target.shape[0]

    @property
    def unimodal(self) -> dict[str, torch.Tensor]:
        """``{name: (B, K)}``: each head's logits (empty without heads)."""
        if self._unimodal is None:
            stacked = self.stacked_unimodal
            names = self.context.names
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
        so every rank skips the same steps); otherwise the local ``sums / count``. ``count``
        may be a tensor broadcastable to ``sums`` (a count per modality).
        """
        if not self._synced():
            return local_mean(sums, count)
        mean, reduced = reduce_mean(sums, count, self.context.process_group, self._flag())
        self._agree(reduced)
        return mean

    def _synced(self) -> bool:
        return self.training and self.context.synced

    def _flag(self) -> torch.Tensor | None:
        """The step's non-finite flag, to ride along the step's first all-reduce."""
        if self.finite is None or self.finite_reduced:
            return None
        return (~self.finite).float().reshape(1)

    def _agree(self, reduced: torch.Tensor | None) -> None:
        if reduced is not None:
            self.finite = reduced[0] == 0
            self.finite_reduced = True

    def _sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks when the step's statistics are (float32, detached)."""
        if not self._synced():
            return values.detach().float()
        total, reduced = reduce_sum(values, self.context.process_group, self._flag())
        self._agree(reduced)
        return total

    def _mask(self, like: torch.Tensor) -> torch.Tensor:
        """``(M, B, 1, ...)``: the mask transposed, shaped and placed to select in ``like``."""
        present = self.present
        assert present is not None
        # contiguous: a transposed mask would lay the selection out transposed, and the sum
        # over the batch would then add in another order than the unmasked sum
        mask = present.t().contiguous().to(like.device)
        return mask.view(*mask.shape, *([1] * (like.dim() - 2)))

    def _counts(self) -> torch.Tensor:
        """``(M,)`` float32 on the balancer's device: present samples per modality, here."""
        assert self.present is not None
        return self.present.sum(0).to(device=self.context.device, dtype=torch.float32)

    def present_sums(self, values: torch.Tensor) -> torch.Tensor:
        """``(M, ...)``: each modality's sum over the samples where it is present, for
        ``(M, B, ...)`` per-sample values (the plain sum over the batch without a mask)."""
        if self.present is None:
            return values.sum(1)
        return torch.where(self._mask(values), values, 0).sum(1)

    def present_mean(self, values: torch.Tensor) -> torch.Tensor:
        """``(M, ...)`` with graph: each modality's mean of ``(M, B, ...)`` per-sample values
        (losses) over the samples where it is present; absent samples get exactly no gradient.

        A modality absent from the whole batch gives 0. With a mask, in a training step with
        ``sync="global"`` under torch.distributed, each rank returns its share of the global
        mean (its sum times the world size over the global count), so the gradient average of
        DDP equals one process on the concatenated batch.
        """
        if self.present is None:
            return values.mean(1)
        counts = self._reduced_counts().clamp_min(1)
        world = self.context.world_size if self._synced() else 1
        share = torch.full_like(counts, float(self.batch_size * world)) / counts
        share = share.to(device=values.device, dtype=values.dtype)
        return torch.where(self._mask(values), values, 0).mean(1) * share.view(
            -1, *([1] * (values.dim() - 2))
        )

    def _reduced_counts(self) -> torch.Tensor:
        """``(M,)``: present samples per modality in the global batch (computed once)."""
        if self._global_counts is None:
            self._global_counts = self._sum_over_ranks(self._counts())
        return self._global_counts

    def modality_mean(
        self, sums: torch.Tensor, fallback: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(M, ...)`` float32, detached: each modality's mean over the global batch of a
        per-sample statistic whose ``(M, ...)`` sums :meth:`present_sums` gave.

        Without a mask, ``mean(sums, batch_size)``. With one, the sums and the per-modality
        counts ride in one all-reduce (``sync="global"``); a modality absent from the whole
        global batch gets ``fallback`` (default 0) instead of 0/0, and :attr:`seen` records it.
        """
        if self.present is None:
            return self.mean(sums, self.batch_size)
        shape = (-1, *([1] * (sums.dim() - 1)))
        counts = self._counts()
        packed = torch.cat([sums.detach().float().reshape(-1).to(counts.device), counts])
        total = self._sum_over_ranks(packed)
        sums_total, counts_total = total[: sums.numel()].view(sums.shape), total[sums.numel() :]
        self._global_counts = counts_total
        self.seen = counts_total > 0
        mean = sums_total / counts_total.clamp_min(1).view(shape)
        if not self._synced():
            # a complete column divides as the unmasked step does (by the Python number B: a
            # multiplication by 1/B on CUDA), so an all-true mask is bitwise on every device
            complete = (counts_total == self.batch_size).view(shape)
            mean = torch.where(complete, sums_total / self.batch_size, mean)
        other = torch.zeros_like(mean) if fallback is None else fallback.to(mean)
        return torch.where(self.seen.view(shape), mean, other)

    def score_mean(self, sums: torch.Tensor) -> torch.Tensor:
        """``(M,)`` scores: :meth:`modality_mean` of the ``(M,)`` score sums, a modality absent
        from the global batch given its previous score (the one :meth:`store` keeps), so that
        it enters the other modalities' coefficients as last seen. At the first training step
        there is no previous score: it gets the mean of the present modalities' scores."""
        if self.present is None:
            return self.mean(sums, self.batch_size)
        if self.context.index > 0 or not self.training:
            return self.modality_mean(sums, fallback=self.context.previous[1])
        scores = self.modality_mean(sums)
        seen = self.seen
        assert seen is not None
        average = (scores * seen).sum() / seen.sum()  # every sample has a present modality
        return torch.where(seen, scores, average)

    def keep_if_seen(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """``(M, ...)``: ``new`` for the modalities present somewhere in the global batch,
        ``old`` for the others (after a :meth:`modality_mean`; ``new`` without a mask)."""
        if self.seen is None:
            return new
        seen = self.seen.to(new.device)
        return torch.where(seen.view(-1, *([1] * (new.dim() - 1))), new, old)

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
        """Batch sums of the true-class probability of ``(M, B, K)`` logits (or a list), over
        each modality's present samples (:meth:`present_sums`)."""
        device = self.context.device
        if self.present is not None:
            stacked = logits if isinstance(logits, torch.Tensor) else torch.stack(
                [u.to(self.logits.device) for u in logits]
            )
            target = self.target.to(stacked.device)
            probabilities = true_class_probability(stacked.detach(), target, "none")
            return self.present_sums(probabilities).to(device)
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

    def accuracy_sums(self, logits: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """``(M,)`` float32: the count of samples whose arg-max class is the label, for
        ``(M, B, K)`` logits (or a list), classification only; over each modality's present
        samples (:meth:`present_sums`), for :meth:`modality_mean`."""
        device = self.context.device

        def hits(outputs: torch.Tensor) -> torch.Tensor:
            correct = outputs.detach().argmax(-1) == self.target.to(outputs.device)
            return correct.to(device, torch.float32)

        if isinstance(logits, torch.Tensor):
            return self.present_sums(hits(logits))
        return self.present_sums(torch.stack([hits(u) for u in logits]))

    def sample_sums(self, values: torch.Tensor) -> torch.Tensor:
        """``(..., B) -> (...)`` float32, detached: the batch sums of a method's own per-sample
        statistic (an entropy per sample, one-hot labels), for :meth:`modality_mean`.

        With a mask the leading dimension is the modality's: ``(M, ..., B) -> (M, ...)``, each
        modality's sum over the samples where it is present (e.g. the labels of those samples,
        ``labels.expand(M, K, B)``).
        """
        values = values.detach().float()
        if self.present is not None:
            mask = self.present.t().contiguous().to(values.device)
            shape = (mask.shape[0], *([1] * (values.dim() - 2)), mask.shape[1])
            values = torch.where(mask.view(shape), values, 0)
        return values.sum(-1).to(self.context.device)

    def fused_loss(self, logits: torch.Tensor | None = None) -> torch.Tensor:
        """The task's mean training loss (cross-entropy, or the regression loss) of the
        fused logits, or of ``logits`` of the same shape, with graph."""
        return self.context.task.fused_loss(self.logits if logits is None else logits, self.target)

    def head_terms(self, scaled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's mean training loss (with graph) and score, both ``(M,)``.

        Classification: the mean cross-entropy and the batch-mean true-class probability;
        regression: the regression loss and the batch error (lower is better). The scores are
        float32, detached and over all ranks with ``sync="global"``. ``scaled`` routes the
        head outputs through this step's coefficients (the gradient into head m and, from it,
        into encoder m is multiplied by k_m).
        """
        return self.context.task.head_terms(self, scaled)

    def loss_sums(self, predictions: torch.Tensor) -> torch.Tensor:
        """``(M,)`` float32: the batch sum of each sample's training loss, for ``(M, B, K)``
        predictions (classification: cross-entropy; regression: the mean loss per sample),
        over each modality's present samples (:meth:`present_sums`)."""
        task = self.context.task
        if self.present is None:
            return task.loss_sums(predictions, self.target)
        return self.present_sums(task.sample_losses(predictions, self.target))

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

        Writes them into this forward's binding (its backward applies them); the balancer
        copies them into its buffers and history when the method's ``_loss`` returns. A
        non-finite step (see ``nonfinite``) keeps the previous coefficients and scores; so does
        a modality absent from the whole global batch (:attr:`seen`), for its own (at the
        first training step, which has no previous score, its score is the one given).
        """
        context = self.context
        with torch.no_grad():
            coefficients = coefficients.to(device=context.device, dtype=torch.float32)
            scores = scores.to(device=context.device, dtype=torch.float32)
            if self.seen is not None:  # a modality absent from the global batch keeps its own
                coefficients = torch.where(self.seen, coefficients, context.previous[0])
                if context.index > 0:  # the first step has no previous score to keep
                    scores = torch.where(self.seen, scores, context.previous[1])
            values_finite = (coefficients.sum() + scores.sum()) * 0 == 0
            finite: torch.Tensor | None = None
            if context.guard.raises_at_once(coefficients):
                try:  # on the CPU the assertion is synchronous (and no device synchronisation)
                    torch._assert_async(values_finite, "non-finite")
                except RuntimeError:
                    message = nonfinite_message("the coefficients or scores", context.index)
                    raise NonFiniteError(message) from None
            else:
                finite = values_finite
                if self.finite is not None:
                    finite = finite & self.finite.to(context.device)
                last_coefficients, last_scores = context.previous
                coefficients = torch.where(finite, coefficients, last_coefficients)
                scores = torch.where(finite, scores, last_scores)
            if self.binding is not None:
                self.binding.write(coefficients)
        self.stored = (coefficients, scores, finite)

