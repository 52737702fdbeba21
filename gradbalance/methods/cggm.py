"""CGGM: Classifier-guided Gradient Modulation (Guo et al., NeurIPS 2024)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from gradbalance._checks import check_choice, check_number
from gradbalance._sharded import refuse_sharded
from gradbalance._step import Step
from gradbalance.coefficients import cggm_balance, cggm_direction_loss
from gradbalance.errors import ConfigurationError
from gradbalance.methods._base import Method, WindowUnit

Metric = Literal["accuracy", "score"]
FusionWeights = nn.Linear | Sequence[torch.Tensor]


class CGGM(Method):
    """CGGM: scale encoder m's gradients by ``rho * B_m``, the other modalities' share of the
    classifiers' gain, and align the fused classifier with each modality's own classifier
    (Guo et al., "Classifier-guided Gradient Modulation for Enhanced Multimodal Learning",
    NeurIPS 2024).

    Every encoder gets a classifier on its features: a detached linear probe, trained by its
    own cross-entropy, which never reaches the encoder (the paper's classifiers ``f_m``, fed
    detached features in the official code). Every training step, each probe's metric
    ``a_m`` (its batch accuracy, over all ranks under DDP) is compared with the previous
    step's: ``gain_m = a_m - a_m^prev``, and

    * magnitude: ``B_m = (G + eps - gain_m) / (G + eps)``, ``G = sum_j gain_j``, and the
      gradient reaching encoder m is multiplied by ``k_m = rho * B_m``
      (:func:`~gradbalance.coefficients.cggm_coefficients`): the modality that gained the
      most this step is slowed the most;
    * direction (``lam > 0``, needs ``fusion_weights``): the loss gets
      ``lam * L_gm``, ``L_gm = (sum_m |B_m| - sum_m B_m cos(W_m, W_f,m)) / M``
      (:func:`~gradbalance.coefficients.cggm_direction_loss`), with ``W_m`` probe m's weight
      (detached) and ``W_f,m`` the fused linear head's weight block for modality m: its
      gradient turns each block towards its modality's classifier, more for the modalities
      that lag (large ``B_m``). As the official code, the cosine is taken between the
      classifiers' *weights* (the paper writes gradients).

    The loss is the fused loss + the probes' own losses (+ ``lam * L_gm``).

    Missing modalities (``loss(..., present=)``): each probe is trained and measured on the
    samples where its modality is present; a modality absent from the whole (global) batch
    keeps its metric (its gain is 0, never a fake drop to an empty batch's accuracy) and its
    coefficient.

    Args:
        model: the multimodal model (unchanged by the balancer).
        encoders: the M >= 2 modality submodules (list or dict ``name -> module``).
        num_classes: number of classes (left out with ``task="regression"``).
        rho: the scale of the factors (> 0; 1.3 in the official code for every dataset).
        lam: weight of the direction term (>= 0; the official code uses 0.05 on Food-101 and
            0.2 on CMU-MOSI and IEMOCAP). 0 (default) leaves it out; > 0 needs
            ``fusion_weights``.
        fusion_weights: the fused classifier whose weight blocks the direction term turns: an
            ``nn.Linear`` over the concatenated features in encoder order (its weight is
            split by the features' widths), or the M weight blocks ``(K, D_m)`` themselves
            (e.g. ``[block.weight for block in head.linears]`` of a per-modality late-linear
            head).
        metric: what the gain measures. ``"accuracy"`` (the default for classification, as
            the official code): each probe's batch accuracy. ``"score"``: its mean true-class
            probability (smoother on small batches); with ``task="regression"`` (where it is
            the default and the only choice) the decrease of its batch error.
        clamp: bound each ``B_m`` to ``[0, 1]`` (default). With gains of mixed signs ``G``
            can be near 0 (e.g. one accuracy up one sample, another down one) and the
            paper's ``B_m`` then reaches ``±1e8``; the official code survives it only through
            gradient-norm clipping. ``False`` keeps the unbounded value.
        enabled: modulate at all (False: every k is 1 and no direction term; the metrics are
            still tracked).
        window: ``(start, end)`` inclusive range of epochs (or steps) in which CGGM
            modulates; ``end=None`` never ends.
        window_unit: ``"epoch"`` (counted by :meth:`epoch_end`) or ``"step"``.
        **common: the options of :class:`~gradbalance.Balancer` (``feature_dims``, ``pool``,
            ``features``, ``task``, ...).

    Example:
        >>> import torch, gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.CGGM(model, encoders=[model.audio, model.video], num_classes=3,
        ...               rho=1.3, lam=0.2, fusion_weights=model.fusion)
        >>> opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
        >>> y = torch.tensor([0, 1, 2, 0])
        >>> for _ in range(2):
        ...     bal.loss(model(torch.randn(4, 8), torch.randn(4, 6)), y).backward()
        ...     opt.step()
        ...     opt.zero_grad()
        >>> k = torch.stack(list(bal.coefficients.values()))
        >>> bool(((k >= 0) & (k <= 1.3)).all())
        True
    """

    previous_metric: torch.Tensor

    head_mode = "probe"
    scales_gradients = True
    supported_tasks: tuple[str, ...] = ("classification", "regression")

    def __init__(
        self,
        model: nn.Module,
        encoders: Sequence[nn.Module] | Mapping[str, nn.Module],
        num_classes: int | None = None,
        *,
        rho: float = 1.3,
        lam: float = 0.0,
        fusion_weights: FusionWeights | None = None,
        metric: Metric | None = None,
        clamp: bool = True,
        enabled: bool = True,
        window: Sequence[int | None] = (0, None),
        window_unit: WindowUnit = "epoch",
        **common: Any,
    ) -> None:
        self.rho = check_number("rho", rho, minimum=0.0, strict=True)
        self.lam = check_number("lam", lam, minimum=0.0)
        self.clamp = bool(clamp)
        super().__init__(
            model,
            encoders,
            num_classes,
            enabled=enabled,
            window=window,
            window_unit=window_unit,
            **common,
        )
        self.metric: Metric = self._check_metric(metric)
        self.__dict__["_fusion_weights"] = self._check_fusion_weights(fusion_weights)
        if self.lam > 0 and fusion_weights is None:
            raise ConfigurationError(
                f"CGGM's direction term (lam={self.lam}) turns the fused classifier: pass "
                "fusion_weights= (the fused nn.Linear or its per-modality weight blocks), or lam=0"
            )
        # The previous step's metric of each probe (0 before the first step, as the paper).
        self.add_state("previous_metric", torch.zeros(len(self.names)))

    def _check_metric(self, metric: Metric | None) -> Metric:
        if self.task == "regression":
            if metric not in (None, "score"):
                raise ConfigurationError(
                    f"CGGM with task='regression' measures the gain as the decrease of each "
                    f"head's batch error: metric must be 'score' (or left out), got {metric!r}"
                )
            return "score"
        chosen = "accuracy" if metric is None else metric
        return check_choice("metric", chosen, ("accuracy", "score"))

    def _check_fusion_weights(self, head: FusionWeights | None) -> FusionWeights | None:
        if head is None or isinstance(head, nn.Linear):
            if head is not None:
                refuse_sharded(head, "fusion_weights")
            return head
        if isinstance(head, nn.Module) or not isinstance(head, Sequence):
            raise ConfigurationError(
                "fusion_weights must be an nn.Linear over the concatenated features or a "
                f"sequence of the {len(self.names)} per-modality weight blocks, got "
                f"{type(head).__name__}"
            )
        blocks = list(head)
        if len(blocks) != len(self.names) or not all(
            isinstance(b, torch.Tensor) and b.dim() == 2 for b in blocks
        ):
            raise ConfigurationError(
                f"fusion_weights as weight blocks needs {len(self.names)} 2-D tensors (one "
                f"(K, D_m) block per encoder, in order), got {len(blocks)} items"
            )
        return blocks

    @property
    def fusion_weights(self) -> FusionWeights | None:
        """The fused classifier the direction term turns (``None``: no direction term)."""
        return self.__dict__["_fusion_weights"]

    def _loss(self, step: Step) -> torch.Tensor:
        losses, scores = step.head_terms(scaled=False)
        total = step.fused_loss()
        total = total + losses.sum().to(total.device)
        if not step.training:
            return total
        # a modality absent from the global batch keeps its metric: no gain, no fake change
        metric = step.keep_if_seen(self._metric(step, scores), self.previous_metric)
        gains = metric - self.previous_metric
        if self.task == "regression":  # the scores are errors: a gain is a decrease
            gains = -gains
        self.update_state(step, "previous_metric", metric)
        if not self.active():
            step.store(torch.ones_like(metric), metric)
            return total
        balance = cggm_balance(gains, self.clamp)
        step.store(self.rho * balance, metric)
        if self.lam > 0:
            cosines = self.weight_cosines(step.features)
            total = total + self.lam * cggm_direction_loss(balance, cosines).to(total.device)
        return total

    def _metric(self, step: Step, scores: torch.Tensor) -> torch.Tensor:
        if self.metric == "score":
            return scores
        return step.modality_mean(step.accuracy_sums(step.unimodal_stack()))

    def weight_blocks(self, features: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The fused classifier's weight block of each modality, ``(K, D_m)``, with graph."""
        head = self.fusion_weights
        if head is None:
            raise ConfigurationError("CGGM was built without fusion_weights: no weight blocks")
        if isinstance(head, nn.Linear):
            widths = [features[name].shape[-1] for name in self.names]
            if sum(widths) != head.weight.shape[1]:
                raise ConfigurationError(
                    f"fusion_weights is an nn.Linear with {head.weight.shape[1]} inputs but the "
                    f"encoders' features have widths {widths} (sum {sum(widths)}); pass the "
                    "linear layer that takes the concatenated features, in encoder order"
                )
            return list(head.weight.split(widths, dim=1))
        return list(head)

    def weight_cosines(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(M,)``: ``cos(W_m, W_f,m)`` between each probe's weight (detached) and the fused
        classifier's block for that modality (with graph into the block)."""
        cosines = []
        for name, block in zip(self.names, self.weight_blocks(features)):
            weight = cast(torch.Tensor, self.heads[name].weight)
            probe = weight.detach().to(block.device, block.dtype)
            if probe.shape != block.shape:
                raise ConfigurationError(
                    f"the fusion_weights block for {name!r} has shape {tuple(block.shape)} but the "
                    f"classifier of {name!r} has {tuple(probe.shape)}: pass the fused head's "
                    "(K, D_m) weight block of each modality"
                )
            cosines.append(F.cosine_similarity(probe.flatten(), block.flatten(), dim=0))
        return torch.stack(cosines)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rho={self.rho}, lam={self.lam}, metric={self.metric!r}, "
            f"clamp={self.clamp}, {self._window_repr()}"
        )
