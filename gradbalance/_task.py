"""The learning task of a balancer: classification (the default) or regression.

A balancer holds one task object. Classification is the paper's setting: integer labels,
cross-entropy losses, each head's score is its mean true-class probability (higher is
better). Regression is the variant the MLB authors ran on CMU-MOSEI (Kontras et al., BMVC
2024, multi-modal sentiment regression): the fused output and every head predict the target
(``output_dim`` values per sample), every loss is a regression loss (L1 by default, as in
their code), and each head's score is its batch error (lower is better, so MLB inverts its
ratio, see :func:`gradbalance.coefficients.mlb_error_coefficients`).

Targets of a regression task are floating point, ``(B, output_dim)`` or, when
``output_dim == 1``, ``(B,)``; the fused prediction may likewise be ``(B,)`` for one output.
Inside a step the target is ``(B, output_dim)``. Nothing here synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from gradbalance._attach import module_device
from gradbalance._checks import EMPTY_BATCH, check_choice, check_int, check_loss_inputs
from gradbalance.errors import ConfigurationError, InputError, InputTypeError

if TYPE_CHECKING:
    from gradbalance._step import Step

TaskName = Literal["classification", "regression"]
RegressionLoss = Literal["l1", "mse", "huber"]
RegressionError = Literal["mse", "mae"]

TASKS: tuple[str, ...] = ("classification", "regression")
REGRESSION_LOSSES: tuple[str, ...] = ("l1", "mse", "huber")
REGRESSION_ERRORS: tuple[str, ...] = ("mse", "mae")


class Task:
    """Classification: integer labels, cross-entropy, true-class-probability scores."""

    name: str = "classification"
    regression: bool = False
    score_label: str = "score"
    """How a plot names the history's scores (their meaning is the method's, higher is better
    for every classification method, e.g. MLB's mean true-class probability)."""

    def check_classes(self, num_classes: Any) -> int | None:
        """``num_classes`` (an int >= 2)."""
        return check_int("num_classes", num_classes, 2)

    def output_width(self, num_classes: int | None) -> int:
        """The width of the fused output and of every head's output."""
        return num_classes  # type: ignore[return-value]

    def make_head(
        self, dim: int | None, num_classes: int | None, device: torch.device
    ) -> nn.Module:
        """A linear head ``dim -> output_width`` (lazy when ``dim`` is None)."""
        width = self.output_width(num_classes)
        if dim is None:
            return nn.LazyLinear(width, device=device)
        return nn.Linear(dim, width, device=device)

    def make_heads(
        self,
        dims: Mapping[str, int | None],
        encoders: Mapping[str, nn.Module],
        num_classes: int | None,
    ) -> nn.ModuleDict:
        """One head per encoder (:meth:`make_head`), in order, on the encoder's device."""
        return nn.ModuleDict(
            {
                name: self.make_head(dims[name], num_classes, module_device(encoder))
                for name, encoder in encoders.items()
            }
        )

    def check_inputs(self, logits: Any, target: Any, num_classes: int | None) -> torch.Tensor:
        """The checked labels (see :func:`gradbalance._checks.check_loss_inputs`)."""
        return check_loss_inputs(logits, target, num_classes)  # type: ignore[arg-type]

    def fused_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy of the fused logits."""
        return F.cross_entropy(logits, target)

    def head_terms(self, step: Step, scaled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's mean cross-entropy (with graph) and score, both ``(M,)``.

        The score is the head's batch-mean true-class probability (float32, detached, over
        all ranks with ``sync="global"``); both come from one log-softmax. ``scaled`` routes
        the head logits through the step's coefficients.
        """
        true_class = _true_class_log_probability(step.head_outputs(scaled), step.target)
        if step.present is None:
            sums = true_class.detach().exp().sum(-1).to(step.context.device)
            return -true_class.mean(-1), step.mean(sums, step.batch_size)
        return _masked_head_terms(step, -true_class, true_class.detach().exp())

    def loss_sums(self, predictions: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(M,)`` float32: the batch sum of each sample's cross-entropy, for ``(M, B, K)``
        logits."""
        return -_true_class_log_probability(predictions, target).sum(-1)

    def sample_losses(self, predictions: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(M, B)`` float32: each sample's cross-entropy, for ``(M, B, K)`` logits."""
        return -_true_class_log_probability(predictions, target)

    def describe(self) -> str:
        return ""


class Regression(Task):
    """Regression: real targets, a regression loss, batch-error scores (lower is better).

    Args:
        output_dim: values predicted per sample (the heads' output width), >= 1.
        loss: every training loss: ``"l1"`` (mean absolute error, the MLB authors'
            regression loss), ``"mse"`` or ``"huber"`` (``torch.nn.functional.huber_loss``,
            ``delta = 1``).
        error: each head's score: its batch mean squared error (``"mse"``, the statistic of the
            MLB authors' regression code) or mean absolute error (``"mae"``).
    """

    name = "regression"
    regression = True
    score_label = "score (batch error, lower is better)"

    def __init__(self, output_dim: int, loss: str, error: str) -> None:
        self.output_dim = check_int("output_dim", output_dim, 1)
        self.loss = check_choice("loss", loss, REGRESSION_LOSSES)
        self.error = check_choice("error", error, REGRESSION_ERRORS)

    def check_classes(self, num_classes: Any) -> int | None:
        if num_classes is not None:
            raise ConfigurationError(
                "task='regression' has no classes: leave num_classes out and give the width "
                f"of the target with output_dim= (got num_classes={num_classes!r})"
            )
        return None

    def output_width(self, num_classes: int | None) -> int:
        return self.output_dim

    def check_inputs(self, logits: Any, target: Any, num_classes: int | None) -> torch.Tensor:
        """The target as ``(B, output_dim)``, after checking predictions and target.

        Raises:
            InputTypeError: not tensors; integer predictions or targets.
            InputError: shapes that do not match ``(B, output_dim)`` (or ``(B,)`` for one
                output); an empty batch; target on another device.
        """
        if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise InputTypeError("loss(predictions, target) takes two tensors")
        width = self.output_dim
        shapes = f"(B, {width})" + (" or (B,)" if width == 1 else "")
        if not _has_width(logits, width):
            raise InputError(
                f"task='regression' with output_dim={width}: the predictions must have shape "
                f"{shapes}, got {tuple(logits.shape)}"
            )
        if logits.shape[0] == 0:
            raise InputError(EMPTY_BATCH)
        if not logits.is_floating_point():
            raise InputTypeError(f"predictions must be floating point, got {logits.dtype}")
        if not target.is_floating_point():
            raise InputTypeError(
                f"task='regression' needs floating-point targets, got {target.dtype} (class "
                "labels belong to task='classification'; real values: target.float())"
            )
        if not _has_width(target, width) or target.shape[0] != logits.shape[0]:
            raise InputError(
                f"task='regression' with output_dim={width}: the target must have shape "
                f"{shapes.replace('B', str(logits.shape[0]))} to match the predictions, got "
                f"{tuple(target.shape)}"
            )
        if target.device != logits.device:
            raise InputError(
                f"target is on {target.device} but the predictions are on {logits.device}: "
                "move the target to the predictions' device (target.to(predictions.device))"
            )
        return target.reshape(target.shape[0], width)

    def elementwise(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss of each element (``target`` broadcast to ``prediction``)."""
        target = target.to(prediction.dtype).expand_as(prediction)
        if self.loss == "l1":
            return F.l1_loss(prediction, target, reduction="none")
        if self.loss == "mse":
            return F.mse_loss(prediction, target, reduction="none")
        return F.huber_loss(prediction, target, reduction="none", delta=1.0)

    def fused_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mean training loss of the fused prediction (reshaped to the target's shape)."""
        return self.elementwise(logits.reshape(target.shape), target).mean()

    def loss_sums(self, predictions: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(M,)`` float32: the batch sum of each sample's mean loss, for ``(M, B, T)``
        predictions (AGM's statistic on its Shapley outputs)."""
        return self.elementwise(predictions.float(), target).mean(-1).sum(-1)

    def sample_losses(self, predictions: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(M, B)`` float32: each sample's mean loss, for ``(M, B, T)`` predictions."""
        return self.elementwise(predictions.float(), target).mean(-1)

    def head_terms(self, step: Step, scaled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's mean training loss (with graph) and batch error (float32, detached,
        over all ranks with ``sync="global"``), both ``(M,)``.

        ``scaled`` routes the head predictions through this step's coefficients, so the
        gradient into head m and, from it, into encoder m is multiplied by k_m.
        """
        target = step.target
        predictions = step.head_outputs(scaled).float().to(target.device)
        losses = self.elementwise(predictions, target).mean(-1)  # (M, B)
        with torch.no_grad():
            difference = predictions.detach() - target.to(predictions.dtype)
            errors = (difference.square() if self.error == "mse" else difference.abs()).mean(-1)
        if step.present is not None:
            return _masked_head_terms(step, losses, errors)
        sums = errors.sum(-1).to(step.context.device)
        return losses.mean(-1), step.mean(sums, step.batch_size)

    def describe(self) -> str:
        return f", task='regression', output_dim={self.output_dim}, loss={self.loss!r}"


CLASSIFICATION = Task()
"""The default task of every balancer."""


def _true_class_log_probability(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[..., i, target[i]]`` in float32, for ``(..., B, K)`` logits."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    index = target.to(logits.device).expand(log_probs.shape[:-1]).unsqueeze(-1)
    return log_probs.gather(-1, index).squeeze(-1)


def _masked_head_terms(
    step: Step, losses: torch.Tensor, scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's mean loss over its present samples (with graph) and mean score over them
    (a modality absent from the global batch: see ``Step.score_mean``), from ``(M, B)``
    per-sample losses and scores."""
    sums = step.present_sums(scores).to(step.context.device)
    return step.present_mean(losses), step.score_mean(sums)


def _has_width(tensor: torch.Tensor, width: int) -> bool:
    return (tensor.dim() == 2 and tensor.shape[1] == width) or (tensor.dim() == 1 and width == 1)


def make_task(
    method: str,
    task: Any,
    loss: Any,
    output_dim: Any,
    error: Any,
    supported: Sequence[str],
) -> Task:
    """The task object of a method's ``task=``, ``loss=``, ``output_dim=`` and ``error=``.

    Raises:
        ConfigurationError: an unknown task; a task the method does not support; regression
            options given with ``task="classification"``.
    """
    check_choice("task", task, TASKS)
    if task not in supported:
        raise ConfigurationError(
            f"{method} does not support task={task!r}: its statistic needs class labels "
            "(true-class probabilities or class prototypes); for regression use "
            "gb.MLB, gb.MultiLoss, gb.Joint or gb.AGM with task='regression'"
        )
    if task == "classification":
        options = (("loss", loss), ("output_dim", output_dim), ("error", error))
        given = [name for name, value in options if value is not None]
        if given:
            raise ConfigurationError(
                f"{', '.join(n + '=' for n in given)} only for task='regression' (classification "
                "trains with cross-entropy on num_classes logits)"
            )
        return CLASSIFICATION
    return Regression(
        1 if output_dim is None else output_dim,
        "l1" if loss is None else loss,
        "mse" if error is None else error,
    )
