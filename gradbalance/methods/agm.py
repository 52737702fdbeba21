"""AGM: Adaptive Gradient Modulation (Li et al., ICCV 2023)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.utils import _pytree as pytree

from gradbalance._checks import (
    check_alpha,
    check_choice,
    check_feature_dims,
    check_int,
    check_number,
)
from gradbalance._named_parameters import NamedParameters
from gradbalance._shapley import EXACT_PASS_LIMIT, ShapleyMode, ShapleyPlan, exact_passes
from gradbalance._step import Step
from gradbalance.coefficients import agm_coefficients, agm_losses
from gradbalance.errors import ConfigurationError, CostWarning, MissingCallWarning
from gradbalance.methods._base import Method, WindowUnit, eval_mode
from gradbalance.methods._earlier_states import per_modality_running_counts
from gradbalance.methods._fusion_call import (
    MISSING_FUSION,
    FusionCall,
    call_fusion,
    check_static_widths,
)
from gradbalance.methods._fusion_call import fusion_call as _fusion_call

Masking = Literal["feature", "input"]
FusionInputs = Literal["features", "outputs"]


class AGM(Method):
    """AGM: scale each modality's Shapley logit path by ``exp(alpha * (o - r))``.

    Every training step AGM splits the fused logits into per-modality Shapley contributions
    from passes with modalities masked (for two modalities
    ``phi_a = (f - f(a masked) + f(v masked)) / 2``; for M modalities the Shapley value over
    the 2^M - 2 masked coalitions, without the empty coalition, so ``sum_m phi_m = f``). From
    each ``phi_m``'s mean cross-entropy ``l_m`` on the batch it forms
    ``r_m = exp((mean(l) - l_m) M / (M - 1))``, compares it with the same ratio ``o_m`` of the
    running means of the losses since the start of training, and sets
    ``k_m = exp(alpha * min(o_m - r_m, max_exponent))``
    (:func:`~gradbalance.coefficients.agm_coefficients`). The returned loss is
    ``CE(sum_m phi_m)`` where each ``phi_m`` passes through a gradient scaling by ``k_m``
    (the official code's backward hooks on the per-modality logits), so ``backward()`` sends
    ``k_m`` times the gradient down modality m's Shapley path.

    Two masking modes:

    * ``"feature"`` (default, cheap): zero that encoder's captured feature and re-run only
      ``fusion`` (the fused head), e.g. ``fusion=model.fusion`` for a head called as
      ``fusion(z_a, z_v)``. The other encoders' train-mode features are reused.
    * ``"input"`` (faithful to the official code): ``forward_masked(masked)`` re-runs the whole
      model with the inputs of the modalities named in the frozenset ``masked`` zeroed, and
      returns the fused logits. The balancer runs it with the taps paused and, with
      ``eval_masked``, the model in eval mode (BN on running statistics, dropout off), then
      restores each submodule's mode. The official code's unused ``f(all masked)`` pass is
      not run.

    With bias-free encoders (``encoder(0) = 0``) and a head without batch statistics the two
    modes coincide.

    Cost: the exact decomposition runs ``2^M - 2`` masked passes per training step (2 for
    M = 2, 14 for M = 4, 65,534 for M = 16). Above 254 (M > 8) the constructor warns
    (:class:`~gradbalance.errors.CostWarning`, giving the number) unless ``shapley="exact"``
    is passed explicitly. ``shapley="sampled"`` estimates the Shapley values from
    ``shapley_samples`` random orders of the modalities per step (Castro et al., 2009): each
    modality's marginal contribution ``f(before + m) - f(before)`` averaged over the orders,
    unbiased, summing to ``f`` exactly, in at most ``shapley_samples * (M - 1)`` passes. The
    orders come from a CPU generator seeded with ``shapley_seed`` (in ``state_dict``), so
    every DDP rank runs the same passes.

    Args:
        model: the multimodal model (unchanged by the balancer).
        encoders: one submodule per modality (list or dict ``name -> module``), M >= 2.
        num_classes: number of classes (left out with ``task="regression"``).
        alpha: strength, >= 0.
        masking: ``"feature"`` or ``"input"``.
        fusion: for ``"feature"``: the model's fused head, called on the features in encoder
            order, either as ``fusion(z_1, ..., z_M)`` (a head taking one feature tensor per
            modality, e.g. :class:`~gradbalance.MMCosineHead`) or, when it takes one tensor
            (an ``nn.Linear`` over the concatenated features, an ``nn.Sequential``, any module
            or function with one positional parameter), as
            ``fusion(torch.cat([z_1, ..., z_M], dim=-1))``; :attr:`fusion_call` says which.
            An ``nn.Linear``'s ``in_features`` must be the sum of the feature widths.
        forward_masked: for ``"input"``: ``forward_masked(masked: frozenset[str]) -> logits`` on
            the current batch (a closure over your loop's batch variables works).
        fusion_inputs: ``"features"`` (default): ``fusion`` receives the ``(B, D)`` features
            (after ``pool``/``features``); ``"outputs"``: the encoders' raw outputs.
        eval_masked: run the masked passes in eval mode (the official behaviour).
        max_exponent: upper clamp of ``o - r`` (10 in the official two-modality code).
        min_coefficient: optional lower clamp of k (the official code has none, so k can
            underflow to 0 and freeze a modality).
        update_running_first: update the running means with this batch before computing
            ``o`` (the MLB authors' three-modality code); default: after (the official code).
        clip: apply the official clipping rule in :meth:`after_backward`: when any gradient
            element of the ``clip_watch`` parameters lies outside ``[-clip_threshold,
            clip_threshold]``, clip the global norm of all the model's gradients to
            ``clip_max_norm``.
        clip_watch: the parameters whose gradients trigger the clipping (default: the model's
            parameters outside the encoders, i.e. the fusion).
        clip_threshold, clip_max_norm: 1.0 and 1.0 in the official code (5 and 5 in the MLB authors'
            three-modality code).
        shapley: ``"exact"`` (the default: every coalition) or ``"sampled"`` (the
            permutation estimate above). Left out, exact, with a warning above 254 passes.
        shapley_samples: orders drawn per step with ``"sampled"`` (default 16).
        shapley_seed: seed of the orders' generator (use the same on every rank).
        probes: attach detached linear probes (stop-gradient heads that never reach the
            encoders; their own cross-entropy is added to the loss), so that
            :meth:`~gradbalance.Balancer.unimodal_logits` has a classifier of each modality
            alone. AGM itself never reads them.
        enabled: modulate at all. Disabled (or outside the window) the loss is the plain fused
            cross-entropy, no masked pass runs and nothing is recorded.
        window, window_unit: the modulation window, as :class:`OGM`.
        **common: the options of :class:`~gradbalance.balancer.Balancer`.

    ``bal.scores`` are ``exp(-l_m)``, each modality's geometric-mean true-class probability
    under its Shapley logits; the running means live in the ``running_losses`` buffer.

    Regression (``task="regression"``, with ``loss`` and ``output_dim``): ``l_m`` is the mean
    regression loss (L1 by default) of the Shapley output ``phi_m`` against the target, in
    place of its cross-entropy; ratios, running means and coefficients follow the same rule,
    the returned loss is the regression loss of ``sum_m phi_m`` and ``bal.scores`` are the
    ``l_m`` themselves (lower is better).

    Example:
        >>> import torch, gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.AGM(model, encoders=[model.audio, model.video], num_classes=3, alpha=1.0,
        ...              fusion=model.fusion)  # an nn.Linear over the concatenated features
        >>> bal.fusion_call
        'concatenated'
        >>> y = torch.tensor([0, 1, 2, 0])
        >>> bal.loss(model(torch.randn(4, 8), torch.randn(4, 6)), y).backward()
        >>> bal.after_backward()
        >>> sorted(bal.coefficients), int(bal.running_count)
        (['audio', 'video'], 1)
    """

    running_losses: torch.Tensor
    running_count: torch.Tensor
    modality_counts: torch.Tensor
    _shapley: torch.Tensor
    _model: nn.Module

    head_mode = "none"
    scales_gradients = False
    supported_tasks: tuple[str, ...] = ("classification", "regression")
    _transient = (*Method._transient, "_last_outputs")

    def __init__(
        self,
        model: nn.Module,
        encoders: Sequence[nn.Module] | Mapping[str, nn.Module],
        num_classes: int | None = None,
        *,
        alpha: float = 1.0,
        masking: Masking = "feature",
        fusion: Callable[..., torch.Tensor] | None = None,
        forward_masked: Callable[[frozenset[str]], torch.Tensor] | None = None,
        fusion_inputs: FusionInputs = "features",
        eval_masked: bool = True,
        max_exponent: float = 10.0,
        min_coefficient: float | None = None,
        update_running_first: bool = False,
        clip: bool = False,
        clip_watch: Iterable[nn.Parameter] | None = None,
        clip_threshold: float = 1.0,
        clip_max_norm: float = 1.0,
        shapley: ShapleyMode | None = None,
        shapley_samples: int = 16,
        shapley_seed: int = 0,
        probes: bool = False,
        enabled: bool = True,
        window: Sequence[int | None] = (0, None),
        window_unit: WindowUnit = "epoch",
        **common: Any,
    ) -> None:
        alpha = check_alpha(alpha)
        if common.get("error") is not None:
            raise ConfigurationError(
                "AGM's statistic is each Shapley output's training loss (loss=); error= "
                "applies to MLB, MultiLoss and Joint"
            )
        if masking == "feature":
            if not callable(fusion):
                raise ConfigurationError(MISSING_FUSION)
        elif masking == "input":
            if not callable(forward_masked):
                raise ConfigurationError(
                    "masking='input' needs forward_masked=callable(masked: frozenset of "
                    "encoder names) -> fused logits of the model with those inputs zeroed"
                )
        else:
            check_choice("masking", masking, ("feature", "input"))
        check_choice("fusion_inputs", fusion_inputs, ("features", "outputs"))
        if shapley is not None:
            check_choice("shapley", shapley, ("exact", "sampled"))
        shapley_samples = check_int("shapley_samples", shapley_samples, minimum=1)
        shapley_seed = check_int("shapley_seed", shapley_seed, minimum=0)
        max_exponent = check_number("max_exponent", max_exponent, minimum=0.0, strict=True)
        if min_coefficient is not None:
            min_coefficient = check_number("min_coefficient", min_coefficient, minimum=0.0)
        clip_threshold = check_number("clip_threshold", clip_threshold, minimum=0.0, strict=True)
        clip_max_norm = check_number("clip_max_norm", clip_max_norm, minimum=0.0, strict=True)
        encoder_params = {id(p) for m in _encoder_modules(encoders) for p in m.parameters()}
        if clip_watch is None:
            watch = [p for p in model.parameters() if id(p) not in encoder_params]
        else:
            watch = list(clip_watch)
        if clip and not watch:
            raise ConfigurationError(
                "clip=True needs parameters to watch: the model has none outside the encoders; "
                "pass clip_watch=[...] (the fused head's parameters)"
            )
        super().__init__(
            model,
            encoders,
            num_classes,
            enabled=enabled,
            window=window,
            window_unit=window_unit,
            head_mode="probe" if probes else "none",
            **common,
        )
        self.fusion_call: FusionCall = "per-modality"
        if masking == "feature" and fusion is not None:
            self.fusion_call = _fusion_call(fusion, len(self.names))
            if self.fusion_call == "concatenated" and fusion_inputs == "outputs":
                raise ConfigurationError(
                    "fusion_inputs='outputs' passes each encoder's raw output as one argument: "
                    "fusion must take one argument per modality, fusion(out_1, ..., out_M)"
                )
            widths = check_feature_dims(common.get("feature_dims"), self.names)
            check_static_widths(fusion, list(widths.values()))
        self.alpha = alpha
        self.masking = masking
        self.__dict__["_fusion"] = fusion
        self.__dict__["_forward_masked"] = forward_masked
        self.fusion_inputs = fusion_inputs
        self.eval_masked = bool(eval_masked)
        self.max_exponent = max_exponent
        self.min_coefficient = min_coefficient
        self.update_running_first = bool(update_running_first)
        self.clip = bool(clip)
        self.clip_threshold = clip_threshold
        self.clip_max_norm = clip_max_norm
        self.__dict__["_clip_watch"] = NamedParameters(model, watch)
        passes = exact_passes(len(self.names))
        if shapley is None and passes > EXACT_PASS_LIMIT:
            warnings.warn(
                f"AGM's exact Shapley decomposition over {len(self.names)} modalities runs "
                f"{passes} masked fusion passes per training step (2^M - 2; more than "
                f"{EXACT_PASS_LIMIT} is slow): pass shapley='sampled' for an unbiased estimate "
                f"in at most shapley_samples * (M - 1) passes ({shapley_samples} orders: "
                f"{shapley_samples * (len(self.names) - 1)}), or shapley='exact' to keep it",
                CostWarning,
                stacklevel=3,
            )
        self.shapley = shapley or "exact"
        self._plan = ShapleyPlan(len(self.names), self.shapley, shapley_samples, shapley_seed)
        device = self.last_scores.device
        exact = torch.zeros(0, 0) if self._plan.exact is None else self._plan.exact[1]
        self.register_buffer("_shapley", exact.to(torch.float32).to(device), persistent=False)
        self.add_state("running_losses", torch.zeros(len(self.names)))
        self.add_state("running_count", torch.zeros((), dtype=torch.int64))
        self.add_state("modality_counts", torch.zeros(len(self.names), dtype=torch.int64))
        self._after_backward_calls = 0
        self._warned = False

    def _masked_logits(
        self, coalition: frozenset[int], features: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The fused logits with only the modalities in ``coalition`` present."""
        masked = frozenset(n for i, n in enumerate(self.names) if i not in coalition)
        model = self.model
        if self.masking == "input":
            with self.paused(), eval_mode(model, self.eval_masked):
                return self.__dict__["_forward_masked"](masked)
        if self.fusion_inputs == "features":
            inputs = [features[n] for n in self.names]
        else:
            outputs = self.__dict__["_last_outputs"]
            inputs = [outputs[n] for n in self.names]
        inputs = [
            pytree.tree_map_only(torch.Tensor, torch.zeros_like, x) if n in masked else x
            for n, x in zip(self.names, inputs)
        ]
        with eval_mode(model, self.eval_masked):
            return call_fusion(self.__dict__["_fusion"], self.fusion_call, inputs)

    def shapley_logits(
        self, logits: torch.Tensor, features: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``(M, B, K)``: each modality's Shapley logits for the last forward (with graph).

        Runs the 2^M - 2 masked passes (with ``shapley="sampled"``, those of freshly drawn
        orders). ``logits`` are the fused logits of that forward.
        """
        if features is None:
            features = self.features()
            self.__dict__["_last_outputs"] = self.encoder_outputs()
        coalitions, weights = self._plan.draw()
        values = [logits]
        for coalition in coalitions[1:]:
            masked_logits = self._masked_logits(coalition, features)
            if not isinstance(masked_logits, torch.Tensor) or masked_logits.shape != logits.shape:
                shape = getattr(masked_logits, "shape", type(masked_logits).__name__)
                raise ValueError(
                    f"the masked pass returned {shape}, expected fused logits of shape "
                    f"{tuple(logits.shape)}"
                )
            values.append(masked_logits.to(logits.device))
        if self._plan.exact is not None:
            weights = self._shapley  # cached on the device
        elif logits.device.type != "cpu":  # pinned: copied without a host synchronisation
            weights = weights.float().pin_memory().to(logits.device, non_blocking=True)
        weights = weights.to(device=logits.device, dtype=logits.dtype)
        stacked = torch.stack(values)
        if stacked.dim() == 2:  # regression with one output predicted as (B,)
            stacked = stacked.unsqueeze(-1)
        return torch.einsum("mc,cbk->mbk", weights, stacked)

    def _loss(self, step: Step) -> torch.Tensor:
        regression = self.task == "regression"
        if not step.training or not self.active():
            return step.fused_loss() + self._probe_loss(step)
        self.__dict__["_last_outputs"] = step.outputs
        phi = self.shapley_logits(step.logits, step.features)
        device = self.running_losses.device
        # Batch means, over all ranks with sync="global" (one all-reduce, no host sync), each
        # modality over the samples where it is present; one absent from the whole batch
        # stands at its running mean (and keeps it, its coefficient and its score).
        if regression:  # each Shapley output's regression loss
            sums = step.loss_sums(phi.detach()).to(device)
        else:
            sums = step.present_sums(agm_losses(phi.detach(), step.target, "none")).to(device)
        losses = self._absent_at_running_mean(step, step.modality_mean(sums, self.running_losses))
        if self.update_running_first:
            self._update_running(step, losses)
        coefficients = agm_coefficients(losses, self.running_losses, self.alpha, self.max_exponent)
        if self.min_coefficient is not None:
            coefficients = coefficients.clamp_min(self.min_coefficient)
        if not self.update_running_first:
            self._update_running(step, losses)
        step.store(coefficients, losses if regression else torch.exp(-losses))
        if self.clip and not self._after_backward_calls and self.steps >= 50 and not self._warned:
            self._warned = True
            warnings.warn(
                "AGM(clip=True) clips the gradients in bal.after_backward(), which was never "
                "called: call it after loss.backward() (after scaler.unscale_(opt) under AMP) "
                "and before opt.step(); without it AGM trains without the clipping",
                MissingCallWarning,
                stacklevel=4,
            )
        return step.fused_loss(step.scale(phi).sum(0)) + self._probe_loss(step)

    def _absent_at_running_mean(self, step: Step, losses: torch.Tensor) -> torch.Tensor:
        """``losses`` with a modality absent from the global batch at its running mean (given
        as the fallback of the step's mean) or, before its first step with samples, at the mean
        of the present modalities' losses (it then leaves the others' ratios as they are)."""
        seen = step.seen
        if seen is None:
            return losses
        average = (losses * seen).sum() / seen.sum()  # every sample has a present modality
        return torch.where(~seen & (self.modality_counts == 0), average, losses)

    @torch.no_grad()
    def _update_running(self, step: Step, losses: torch.Tensor) -> None:
        """Cumulative mean of each modality's losses over the modulated steps where it is
        present (``running_count`` counts the modulated steps, ``modality_counts`` each
        modality's).

        A step with non-finite losses (or skipped by ``nonfinite="skip"``) leaves it unchanged.
        """
        count = self.running_count + 1
        counts = step.keep_if_seen(self.modality_counts + 1, self.modality_counts)
        updated = self.running_losses + (losses - self.running_losses) / counts
        updated = step.keep_if_seen(updated, self.running_losses)  # 0 / 0 before its first
        finite = torch.isfinite(updated).all()
        self.update_state(step, "running_count", torch.where(finite, count, self.running_count))
        counts = torch.where(finite, counts, self.modality_counts)
        self.update_state(step, "modality_counts", counts)
        self.update_state(step, "running_losses", updated)

    @torch.no_grad()
    def after_backward(self) -> None:
        """The official clipping rule (with ``clip=True``); call before ``opt.step()``.

        When any gradient element of the watched (fusion) parameters lies outside
        ``[-clip_threshold, clip_threshold]``, the gradients of all the model's parameters are
        clipped to a global norm of ``clip_max_norm`` (as ``clip_grad_norm_``). Decided on the
        device, without a host synchronisation. Under AMP call it after
        ``scaler.unscale_(opt)``. Without ``clip`` it does nothing.
        """
        self._after_backward_calls += 1
        if not self.clip:
            return
        watched = [p.grad for p in self.__dict__["_clip_watch"].current() if p.grad is not None]
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not watched or not grads:
            return
        # Fused multi-tensor kernels: a handful of launches whatever the number of tensors.
        device = watched[0].device
        largest = torch.stack(
            [n.float().to(device) for n in torch._foreach_norm(watched, float("inf"))]
        ).max()
        norms = torch._foreach_norm(grads)
        total = torch.linalg.vector_norm(torch.stack([n.float().to(device) for n in norms]))
        factor = (self.clip_max_norm / (total + 1e-6)).clamp_max(1.0)
        factor = torch.where(largest > self.clip_threshold, factor, torch.ones_like(factor))
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for grad in grads:
            groups.setdefault((grad.device, grad.dtype), []).append(grad)
        for (grad_device, dtype), group in groups.items():
            torch._foreach_mul_(group, factor.to(device=grad_device, dtype=dtype))

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        state_dict = per_modality_running_counts(state_dict, prefix, len(self.names))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "shapley": self._plan.state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self._plan.load(state.get("shapley", {}))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, alpha={self.alpha}, masking={self.masking!r}, "
            f"shapley={self.shapley!r}, "
            f"clip={self.clip}, {self._window_repr()}"
        )


def _encoder_modules(encoders: Sequence[nn.Module] | Mapping[str, nn.Module]) -> list[nn.Module]:
    """The encoder modules as given (validated later by the balancer's constructor)."""
    values = encoders.values() if isinstance(encoders, Mapping) else encoders
    return [module for module in values if isinstance(module, nn.Module)]
