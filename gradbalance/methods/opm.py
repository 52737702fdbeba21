"""OPM: On-the-fly Prediction Modulation (Wei et al., TPAMI 2024)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gradbalance._checks import check_number
from gradbalance._step import Step
from gradbalance.coefficients import opm_drop_probabilities, opm_fusion_scale
from gradbalance.errors import ConfigurationError
from gradbalance.methods._base import SlicedScoresMethod, WindowUnit
from gradbalance.methods._feature_drop import drop_samples, hash_uniform


class OPM(SlicedScoresMethod):
    """OPM: drop the dominant modality's feature at the fusion input, per sample.

    Wei, Hu, Du & Wen, "On-the-fly Modulation for Balanced Multimodal Learning", TPAMI 2024
    (On-the-fly Prediction Modulation), as the authors' code. Each training step scores every
    modality as :class:`OGM` does (its mean true-class probability on the batch, from the
    fused head's slices with ``fusion_head`` or else from detached linear probes) and turns
    the ratio ``rho_m = s_m / mean_{j != m} s_j`` into drop probabilities
    ``q_m = clip(q_base (1 + lam tanh(rho_m - 1)), 0, 1)`` for a dominant modality
    (``rho_m > 1``), 0 for the others (:func:`~gradbalance.coefficients.opm_drop_probabilities`).
    In a training forward the drop runs with probability ``p_exe`` (one draw for the whole
    batch); then each sample's feature of modality m is zeroed with probability ``q_m``
    (independently per sample and modality) and every feature is multiplied by
    ``1 / (1 - theta)``, ``theta = sum_m d_m q_m / sum_m d_m``
    (:func:`~gradbalance.coefficients.opm_fusion_scale`). The loss is the fused
    cross-entropy of the dropped forward (plus the probes' own, which reaches only the
    probes). Nothing changes in evaluation, and the coefficients are all 1 (no gradient is
    scaled): the modulation is the forward's drop.

    Where the drop happens: the model's branch of each encoder's output (the hook
    :meth:`_fork_output`) is multiplied by the per-sample factors along its first (batch)
    dimension, so the model's fusion sees the dropped features while the balancer's heads
    and scores read the full ones. For an encoder that returns pooled ``(B, D)`` features (or
    when what follows it up to the fusion is linear per sample, e.g. average pooling) this
    is exactly the authors' drop at the fusion input.

    Missing modalities (``loss(..., present=)``): each score is the mean over the samples
    where the modality is present (the probes' loss likewise), and a modality absent from the
    whole global batch keeps its score and drop probability. The drop itself is drawn in the
    forward, before the mask reaches ``loss()``: every sample draws, an absent one too (zeroing
    a blank feature changes nothing), the rescaling does not count absent samples apart, and a
    sample whose only present modality is the dropped one stays in the fused loss.

    Deviations from the authors' code: (1) the probabilities of a forward are those computed
    at the previous training step (the labels reach the balancer only in ``loss()``, after
    the forward; the official model scores the batch inside its forward), so the first
    training forward drops nothing; (2) no sample ever loses every modality (at most the
    modalities above the others' mean are dropped, never all), so the official removal of
    such samples never applies (without a mask); (3) the random numbers come from a
    counter-based hash seeded with ``seed`` (identical on every DDP rank and under
    ``torch.compile``; the counter is in ``state_dict``), not NumPy's global generator;
    (4) for M > 2 modalities the ratio compares each modality with the mean of the others, as
    :class:`OGM`.

    Args:
        model: the multimodal model (unchanged by the balancer).
        encoders: the M >= 2 modality submodules (list or dict ``name -> module``); each
            returns its features (or a container of tensors) with the batch first.
        num_classes: number of classes (classification only, as the paper).
        q_base: base drop probability of a dominant modality, in [0, 1] (official 0.5).
        lam: growth of the probability with the lead (``lambda``), >= 0 (official 0.5).
        p_exe: probability that a training forward drops at all, in [0, 1] (official 0.7).
        seed: seed of the drop's random numbers, an int >= 0 (the same on every rank).
        fusion_head: as :class:`OGM`: the late-linear fused head whose slices give the
            scores (``nn.Linear`` over the concatenated features or a module with
            ``modality_logits``); ``None``: detached probes.
        probes: with ``fusion_head``, also attach detached probes (as :class:`OGM`).
        enabled: modulate at all (False: no drop; scores are still recorded).
        window: ``(start, end)`` inclusive range of epochs (or steps) in which forwards drop;
            the official code starts after 6 warm-up epochs, ``(6, None)``.
        window_unit: ``"epoch"`` (counted by :meth:`epoch_end`) or ``"step"``.
        **common: the options of :class:`~gradbalance.balancer.Balancer` (``feature_dims``,
            ``pool``, ``features``, ``flush_every``).

    Example:
        >>> import torch, gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.OPM(model, encoders=[model.audio, model.video], num_classes=3,
        ...              q_base=0.5, lam=0.5, p_exe=1.0, fusion_head=model.fusion)
        >>> opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
        >>> for _ in range(3):
        ...     x_a, x_v, y = torch.randn(8, 8), torch.randn(8, 6), torch.randint(0, 3, (8,))
        ...     bal.loss(model(x_a, x_v), y).backward()
        ...     opt.step()
        ...     opt.zero_grad()
        >>> q = bal.drop_probabilities  # those of the next training forward
        >>> int((q > 0).sum()) <= 1, float(q.max()) <= 0.75
        (True, True)
    """

    head_mode = "probe"
    scales_gradients = False
    drop_probabilities: torch.Tensor
    drop_executes: torch.Tensor
    fusion_scale: torch.Tensor
    draws: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        encoders: Sequence[nn.Module] | Mapping[str, nn.Module],
        num_classes: int | None = None,
        *,
        q_base: float = 0.5,
        lam: float = 0.5,
        p_exe: float = 0.7,
        seed: int = 0,
        fusion_head: nn.Module | None = None,
        probes: bool = False,
        enabled: bool = True,
        window: Sequence[int | None] = (0, None),
        window_unit: WindowUnit = "epoch",
        **common: Any,
    ) -> None:
        self.q_base = check_number("q_base", q_base, minimum=0.0, maximum=1.0)
        self.lam = check_number("lam", lam, minimum=0.0)
        self.p_exe = check_number("p_exe", p_exe, minimum=0.0, maximum=1.0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigurationError(f"seed must be an int >= 0, got {seed!r}")
        self.seed = seed
        super().__init__(
            model,
            encoders,
            num_classes,
            enabled=enabled,
            window=window,
            window_unit=window_unit,
            fusion_head=fusion_head,
            probes=probes,
            **common,
        )
        m = len(self.names)
        self.add_state("drop_probabilities", torch.zeros(m))
        self.add_state("drop_executes", torch.zeros(()))
        self.add_state("fusion_scale", torch.ones(()))
        self.add_state("draws", torch.zeros((), dtype=torch.int64))
        self._opm_widths: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}

    def _widths(self, widths: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The features' widths as a tensor on ``device``, made once (no copy per step)."""
        key = (widths, str(device))
        if key not in self._opm_widths:
            self._opm_widths[key] = torch.tensor(widths, device=device)
        return self._opm_widths[key]

    def _loss(self, step: Step) -> torch.Tensor:
        total = F.cross_entropy(step.logits, step.target) + self._probe_loss(step)
        if not step.training:
            return total
        scores = step.score_mean(step.score_sums(self._modality_logits(step)))
        step.store(torch.ones_like(scores), scores)
        # The drop of the next training forward: probabilities (a modality absent from the
        # global batch keeps its own), the batch-wide draw, scale.
        q = opm_drop_probabilities(scores, self.q_base, self.lam).to(self.drop_probabilities)
        q = step.keep_if_seen(q, self.drop_probabilities)
        widths = self._widths(tuple(step.features[n].shape[-1] for n in self.names), q.device)
        executes = hash_uniform(self.seed, self.draws, len(self.names), 1)[0] < self.p_exe
        scale = torch.where(executes, opm_fusion_scale(q, widths), 1.0)
        # Replaced, not written in place: this step's forward graph may hold the old ones.
        self.update_state(step, "drop_probabilities", q, replace=True)
        self.update_state(step, "drop_executes", executes.to(q), replace=True)
        self.update_state(step, "fusion_scale", scale, replace=True)
        self.update_state(step, "draws", self.draws + 1, replace=True)
        return total

    def _fork_output(self, name: str, output: Any, watch: Any) -> tuple[Any, Any] | None:
        """The model continues with the dropped (and rescaled) output; the heads read it whole.

        Only in a training forward (the balancer in training mode, whatever the encoders'
        modes) inside the window."""
        if not (self.active() and self.training):
            return None
        index = self.names.index(name)
        q = self.drop_probabilities[index] * self.drop_executes

        rank = dist.get_rank(self.process_group) if self.world_size() > 1 else 0

        def keep(batch: int) -> torch.Tensor:
            # each sample's own uniform, indexed in the global batch (rank r holds samples
            # r*B, ..., r*B + B - 1 of equal local batches): the drops of one process on the
            # concatenated batch, and no two ranks drawing the same numbers
            first = rank * batch
            u = hash_uniform(self.seed, self.draws, index, batch, self.draws.device, first)
            return (u >= q).to(self.fusion_scale) * self.fusion_scale

        return drop_samples(output, keep, watch, name), output

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, q_base={self.q_base}, lam={self.lam}, p_exe={self.p_exe}, "
            f"seed={self.seed}, {self._window_repr()}"
        )
