"""PMR: Prototypical Modal Rebalance (Fan et al., CVPR 2023)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from gradbalance._checks import (
    check_alpha,
    check_choice,
    check_feature_dims,
    check_int,
    check_number,
)
from gradbalance._presence_checks import check_present
from gradbalance._step import Step
from gradbalance.coefficients import pmr_weights
from gradbalance.errors import ConfigurationError, InputError
from gradbalance.methods._base import Method, WindowUnit
from gradbalance.methods._earlier_states import per_modality_classes
from gradbalance.methods._prototypes import (
    batch_standardise,
    mask_missing_prototypes,
    prototype_cross_entropy,
    prototype_logits,
)

PrototypeSource = Literal["accumulate", "explicit"]


class PMR(Method):
    """PMR: a prototype cross-entropy for the weaker modalities, weighted by ``alpha``.

    Each modality keeps one prototype per class (the mean of its training features of that
    class). Every training step the distances ``d_m(i, k) = ||z_m(i) - c_m^k||`` give
    prototype logits ``-d_m``; their mean true-class probability is the modality's score, and
    ``alpha * CE(-d_m, y)`` is added to the fused cross-entropy for the modality with the lower
    score only (none on a tie; with M > 2 modalities, for every modality whose score is below
    the mean of the others' scores; :func:`~gradbalance.coefficients.pmr_weights`). The gradient
    flows through the features into that encoder; prototypes are constants.

    Prototypes:

    * ``"accumulate"`` (default, no extra pass): the features of the training steps (detached)
      are summed per class with ``index_add_``; :meth:`epoch_end` turns them into the next
      epoch's prototypes. They are therefore train-mode features of a model that changed
      during the epoch, and the first epoch has no prototypes (it trains as Joint).
    * ``"explicit"`` (the official code: an eval-mode pass, usually over part of the training
      set): run forwards yourself and call :meth:`collect` after each, then
      :meth:`update_prototypes` (e.g. before each epoch)::

          model.eval()
          with torch.no_grad():
              for audio, video, y in some_batches:
                  model(audio, video)
                  bal.collect(y)
          bal.update_prototypes()
          model.train()

    New prototypes are blended with the previous ones, ``c <- (1 - momentum) c_new + momentum
    c_old``; a class absent from a collection keeps its previous prototype, and a class never
    seen gets probability 0 (its samples are left out of the prototype loss): no NaN.

    ``bal.coefficients`` hold the prototype-loss weights of the last step (``alpha`` or 0)
    and ``bal.scores`` the prototype scores (0 before the first prototypes exist).

    Args:
        model: the multimodal model (unchanged by the balancer).
        encoders: the M >= 2 modality submodules (list or dict ``name -> module``).
        num_classes: number of classes.
        alpha: weight of the weaker modality's prototype loss (official default 1.0).
        momentum: weight μ of the previous prototypes (official 0.2; 0 in the MLB authors' code).
        prototypes: ``"accumulate"`` or ``"explicit"``.
        batch_norm: standardise the features with their batch statistics before prototypes and
            distances (the extra ``BatchNorm1d(affine=False)`` of the MLB authors' code,
            :func:`batch_standardise`). A training batch of one sample has no batch
            statistics: its standardised features are 0, so the step gets no prototype
            gradient (its prototype scores, and so the weights, are those of a zero feature)
            and adds nothing to the prototypes; the fused cross-entropy trains as usual.
        first_blend_epoch: prototypes updated while :attr:`epoch` is below it are the plain
            class means (no blending with ``momentum``). The default 0 blends whenever
            previous prototypes exist; the official PMR code blends for the first time after
            epoch 1: ``first_blend_epoch=1`` (with ``prototypes="explicit"`` and a pass before
            training, as the official schedule).
        probes: attach detached linear probes (stop-gradient heads that never reach the
            encoders; their own cross-entropy is added to the loss), so that
            :meth:`~gradbalance.Balancer.unimodal_logits` has a classifier of each modality
            alone. PMR itself never reads them.
        enabled, window, window_unit: as :class:`OGM`; outside the window no prototype loss is
            added (prototypes are still accumulated).
        **common: the options of :class:`~gradbalance.balancer.Balancer`.

    Example:
        >>> import torch, gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.PMR(model, encoders=[model.audio, model.video], num_classes=3, alpha=1.0)
        >>> a, v, y = torch.randn(6, 8), torch.randn(6, 6), torch.tensor([0, 1, 2, 0, 1, 2])
        >>> for epoch in range(2):
        ...     bal.loss(model(a, v), y).backward()
        ...     bal.epoch_end()  # prototypes from this epoch's features
        >>> bal.prototypes()["audio"].shape
        torch.Size([3, 16])
        >>> sorted(bal.coefficients.values(), key=float)  # alpha for the weaker modality
        [tensor(0.), tensor(1.)]
    """

    class_counts: torch.Tensor
    prototype_valid: torch.Tensor

    head_mode = "none"
    scales_gradients = False

    def __init__(
        self,
        model: nn.Module,
        encoders: Sequence[nn.Module] | Mapping[str, nn.Module],
        num_classes: int | None = None,
        *,
        alpha: float = 1.0,
        momentum: float = 0.2,
        prototypes: PrototypeSource = "accumulate",
        batch_norm: bool = False,
        first_blend_epoch: int = 0,
        probes: bool = False,
        enabled: bool = True,
        window: Sequence[int | None] = (0, None),
        window_unit: WindowUnit = "epoch",
        **common: Any,
    ) -> None:
        alpha = check_alpha(alpha)
        momentum = check_number("momentum", momentum, minimum=0.0)
        if momentum >= 1.0:
            raise ConfigurationError(f"momentum must be in [0, 1), got {momentum!r}")
        check_choice("prototypes", prototypes, ("accumulate", "explicit"))
        check_int("first_blend_epoch", first_blend_epoch, 0)
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
        self.alpha = alpha
        self.momentum = momentum
        self.first_blend_epoch = first_blend_epoch
        self.prototype_source = prototypes
        self.batch_norm = bool(batch_norm)
        num_classes = self.output_dim
        dims = check_feature_dims(common.get("feature_dims"), self.names)
        device = self.last_scores.device
        for name in self.names:
            dim = dims[name] or 0
            self.register_buffer(f"prototypes_{name}", torch.zeros(num_classes, dim, device=device))
            self.register_buffer(
                f"feature_sums_{name}", torch.zeros(num_classes, dim, device=device)
            )
        m = len(self.names)
        # Per modality: a modality's samples may be missing (loss(..., present=)).
        self.add_state("class_counts", torch.zeros(m, num_classes))
        self.add_state("prototype_valid", torch.zeros(m, num_classes, dtype=torch.bool))
        self.ready = False
        self._collected = 0

    # -- prototypes ---------------------------------------------------------------------

    def prototypes(self) -> dict[str, torch.Tensor]:
        """``{name: (K, D)}``: the current prototypes (rows of classes never seen are 0)."""
        return {name: getattr(self, f"prototypes_{name}").clone() for name in self.names}

    def _standardise(self, feature: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        feature = feature.float()
        if self.batch_norm:
            feature = batch_standardise(feature, present)
        return feature

    def _sized(self, kind: str, name: str, dim: int) -> torch.Tensor:
        buffer = getattr(self, f"{kind}_{name}")
        if buffer.shape[1] != dim:
            if buffer.shape[1] != 0:
                raise ConfigurationError(
                    f"encoder {name!r} has feature width {dim}, but its prototypes were built "
                    f"for width {buffer.shape[1]}"
                )
            buffer = torch.zeros(self.output_dim, dim, device=buffer.device)
            self.register_buffer(f"{kind}_{name}", buffer)
        return buffer

    @torch.no_grad()
    def _accumulate(
        self,
        features: Mapping[str, torch.Tensor],
        target: torch.Tensor,
        step: Step | None,
        present: torch.Tensor | None,
    ) -> None:
        """Per-class sums of the (detached) features with ``index_add_``, each modality over
        its present samples (``present``: ``(B, M)`` bool, ``None``: all); non-finite features
        (or a training ``step`` skipped by ``nonfinite="skip"``) add nothing."""
        if self.batch_norm and target.shape[0] == 1:
            return  # a standardised batch of one is 0 whatever the sample: no information
        keep = step.keep_if_finite if step is not None else (lambda new, old: new)
        counts = self.class_counts
        target = target.to(counts.device)
        added = []
        class_rows = []
        for index, name in enumerate(self.names):
            column = None if present is None else present[:, index].to(counts.device)
            feature = self._standardise(features[name].detach(), column).to(counts.device)
            sums = self._sized("feature_sums", name, feature.shape[1])
            self._sized("prototypes", name, feature.shape[1])
            if column is None:
                ones = torch.ones_like(target, dtype=counts.dtype)
            else:
                if self.batch_norm:  # one present sample has no batch statistics either
                    column = column & (column.sum() > 1)
                feature = torch.where(column.unsqueeze(1), feature, 0)
                ones = column.to(counts.dtype)
            added.append((sums, torch.zeros_like(sums).index_add_(0, target, feature)))
            class_rows.append(torch.zeros_like(counts[index]).index_add_(0, target, ones))
        finite = torch.stack([torch.isfinite(delta).all() for _, delta in added]).all()
        new_counts = counts + torch.stack(class_rows)
        for sums, delta in added:
            sums.copy_(keep(torch.where(finite, sums + delta, sums), sums))
        counts.copy_(keep(torch.where(finite, new_counts, counts), counts))
        self._collected += 1

    def collect(
        self,
        target: torch.Tensor,
        present: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Add the features of the last forward (class ``target``) to the next prototypes.

        For ``prototypes="explicit"``: call after each forward of your prototype pass.
        ``present`` marks missing modalities as in :meth:`~gradbalance.Balancer.loss`: a
        modality's prototypes then average only the samples where it is present.
        """
        if not isinstance(target, torch.Tensor) or target.dim() != 1:
            raise InputError("collect(target) takes the (B,) class labels of the last forward")
        mask = check_present(present, self.names, target.shape[0], target.device)
        features = self.take_features()  # consumes them, as loss() would
        if any(f.shape[0] != target.shape[0] for f in features.values()):
            raise InputError(
                f"collect(target): {target.shape[0]} labels for features of batch size "
                f"{next(iter(features.values())).shape[0]}"
            )
        self._accumulate(features, target.long(), None, mask)

    @torch.no_grad()
    def update_prototypes(self) -> None:
        """Turn the collected features into prototypes (blended with ``momentum``).

        Classes absent from the collection keep their previous prototype. Does nothing when
        nothing was collected. No host synchronisation. Under ``torch.distributed`` with
        ``sync="global"`` the sums and counts of all ranks are combined (one all-reduce): call
        it on every rank.
        """
        if not self._collected:
            return
        names = self.names
        local = [getattr(self, f"feature_sums_{name}") for name in names]
        packed = torch.cat([*local, self.class_counts.t()], dim=1)
        totals = self.reduce_mean(packed, 1)  # global sums (count 1: a plain all-reduce)
        counts = totals[:, -len(names) :]  # (K, M): each modality's samples per class
        seen = counts > 0
        valid = self.prototype_valid
        start = 0
        for index, (name, sums_buffer) in enumerate(zip(names, local)):
            width = sums_buffer.shape[1]
            sums = totals[:, start : start + width]
            start += width
            old = self._sized("prototypes", name, width)
            new = sums / counts[:, index].clamp_min(1).unsqueeze(1)
            blended = (1 - self.momentum) * new + self.momentum * old
            blends = valid[index]
            if self.epoch < self.first_blend_epoch:
                blends = torch.zeros_like(blends)
            blended = torch.where(blends.unsqueeze(1), blended, new)
            old.copy_(torch.where(seen[:, index].unsqueeze(1), blended, old))
            sums_buffer.zero_()
        valid |= seen.t()
        self.class_counts.zero_()
        self._collected = 0
        self.ready = True

    def epoch_end(self) -> None:
        """End of a training epoch: with ``"accumulate"``, build the next prototypes."""
        if self.prototype_source == "accumulate":
            self.update_prototypes()
        super().epoch_end()

    def epoch_end_reason(self) -> str | None:
        """Why PMR needs :meth:`epoch_end` (see :meth:`Method.epoch_end_reason`)."""
        if self.prototype_source == "accumulate":
            return "it builds the prototypes there; without it PMR trains as Joint"
        if self.first_blend_epoch > 0:
            return f"first_blend_epoch={self.first_blend_epoch} is counted in epochs"
        return super().epoch_end_reason()

    # -- loss ---------------------------------------------------------------------------

    def prototype_logits(
        self,
        features: Mapping[str, torch.Tensor] | None = None,
        present: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{name: (B, K)}`` prototype logits ``-distance`` of the (last) features, with graph
        (with ``batch_norm``, standardised over each modality's present samples when a
        ``(B, M)`` bool ``present`` is given)."""
        if features is None:
            features = self.features()
        out = {}
        for index, name in enumerate(self.names):
            column = None if present is None else present[:, index]
            feature = self._standardise(features[name], column)
            prototypes = self._sized("prototypes", name, feature.shape[1])
            out[name] = prototype_logits(feature, prototypes.to(feature.device))
        return out

    def _loss(self, step: Step) -> torch.Tensor:
        total = F.cross_entropy(step.logits, step.target) + self._probe_loss(step)
        if not step.training:
            return total
        present = step.present
        if self.prototype_source == "accumulate":
            self._accumulate(step.features, step.target, step, present)
        device = self.last_scores.device
        if not (self.ready and self.active()):
            zeros = torch.zeros(len(self.names), device=device)
            step.store(zeros, zeros)
            return total
        valid = self.prototype_valid
        proto_logits = self.prototype_logits(step.features, present)
        sums = step.score_sums(
            [
                mask_missing_prototypes(z.detach(), valid[index].to(z.device))
                for index, z in enumerate(proto_logits.values())
            ]
        )
        # Over all ranks with sync="global", each modality over its present samples; one absent
        # from the whole batch is weighed with its previous score (and keeps it).
        scores = step.score_mean(sums)
        weights = pmr_weights(scores, self.alpha)
        step.store(weights, scores)
        for index, z in enumerate(proto_logits.values()):
            column = None if present is None else present[:, index].to(z.device)
            term = prototype_cross_entropy(
                z, step.target.to(z.device), valid[index].to(z.device), column
            )
            total = total + (weights[index].to(term.device) * term).to(total.device)
        return total

    # -- state --------------------------------------------------------------------------

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        state_dict = per_modality_classes(state_dict, prefix, len(self.names))
        for name in self.names:
            for kind in ("prototypes", "feature_sums"):
                key = f"{prefix}{kind}_{name}"
                incoming = state_dict.get(key)
                own = getattr(self, f"{kind}_{name}")
                if incoming is not None and own.shape[1] == 0 and incoming.shape != own.shape:
                    self.register_buffer(
                        f"{kind}_{name}", torch.zeros(incoming.shape, device=own.device)
                    )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "ready": self.ready, "collected": self._collected}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.ready = bool(state.get("ready", False))
        self._collected = int(state.get("collected", 0))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, alpha={self.alpha}, momentum={self.momentum}, "
            f"prototypes={self.prototype_source!r}, first_blend_epoch={self.first_blend_epoch}, "
            f"{self._window_repr()}"
        )
