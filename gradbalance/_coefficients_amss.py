"""AMSS and AMSS+'s rule (Yang et al., "Learning to Rebalance Multi-Modal Optimization by
Adaptively Masking Subnetworks", TPAMI 2025): keep rates from the modalities' significance,
and the masks of the gradient units sampled by their Fisher importance.

Pure functions of tensors, without host synchronisation; the random draws are inputs.
"""

from __future__ import annotations

import torch

RATE_BOUNDS = (0.1, 0.9)
"""The official code clamps every keep rate to this range."""

FALLBACK_RATE = 0.5
"""The official code's keep rate when the significance is undefined (:func:`amss_keep_rates`)."""


def amss_label_entropy(frequencies: torch.Tensor) -> torch.Tensor:
    """The label term ``H_Y`` of AMSS's significance, as the official code computes it.

    ``H_Y = -sum_k p_k log softmax(p)_k`` for the batch's class frequencies ``p`` (the
    cross-entropy of ``p`` taken as logits against ``p`` as soft labels). For a class-balanced
    batch it is the label entropy ``ln K``; otherwise it stays close to it.

    Args:
        frequencies: ``(K,)`` the batch's class frequencies (they sum to 1).
    """
    return -(frequencies * torch.log_softmax(frequencies, dim=-1)).sum(-1)


def amss_keep_rates(
    losses: torch.Tensor,
    feature_entropies: torch.Tensor,
    label_entropy: torch.Tensor,
    temperature: float = 0.2,
    offset: float = 0.5,
    bias: float = 0.0,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """AMSS's keep rate per modality, from its mutual-information rate.

    Modality m's significance is ``t_m = (H_Y - L_m + offset) / (H(z_m) T)``, with ``L_m``
    its head's mean cross-entropy (so ``H_Y - L_m`` estimates the mutual information of its
    feature and the label) and ``H(z_m)`` the mean entropy of the softmax of its features.
    The more significant a modality, the fewer of its gradient units are kept:
    ``rate_m = clamp(1 - softmax(t)_m + bias, 0.1, 0.9)`` (with two modalities
    ``1 - softmax(t)_a = softmax(t)_v``, the official two-modality formula). A non-finite
    rate, or any ``H_Y - L_m + offset <= 0``, gives every modality 0.5 (as the official code);
    the softmax is the stable one, so a large ``t`` gives the exact clamped rates where the
    official float32 ``exp(t)`` overflows (``t > 88.7``) and falls back to 0.5.

    Args:
        losses: ``(M,)`` each head's mean cross-entropy.
        feature_entropies: ``(M,)`` each modality's mean entropy of the softmax of its features.
        label_entropy: ``()`` the label term (:func:`amss_label_entropy`).
        temperature: ``T > 0`` (0.2 in the official audio-video code).
        offset: added to ``H_Y - L_m`` (0.5 in the official audio-video code).
        bias: added to every rate before the clamp (0 for CREMA-D and Kinetics-Sounds).
        seen: ``(M,)`` bool, whether each modality is present in the batch (``None``: all).
            An absent modality's statistics are undefined: it enters the softmax with the
            mean significance of the present ones (it neither takes nor leaves them a share
            of its own) and is left out of the ``<= 0`` test; its rate is meaningless (the
            caller keeps the previous one).
    """
    information = label_entropy - losses + offset
    significance = information / (feature_entropies * temperature)
    if seen is not None:
        seen = seen.to(significance.device)
        known = torch.where(seen, significance, 0)
        significance = torch.where(seen, significance, known.sum() / seen.sum())
        information = torch.where(seen, information, 1.0)
    rates = 1 - torch.softmax(significance, dim=-1) + bias
    rates = torch.where(torch.isnan(rates), FALLBACK_RATE, rates.clamp(*RATE_BOUNDS))
    undefined = (information <= 0).any()
    return torch.where(undefined, torch.full_like(rates, FALLBACK_RATE), rates)


def amss_unit_masks(
    importance: torch.Tensor,
    lengths: torch.Tensor,
    rates: torch.Tensor,
    uniforms: torch.Tensor,
    unbiased: bool = False,
) -> torch.Tensor:
    """The masks of the gradient units of several parameters, in one pass.

    The ``U`` units (a parameter's output channels, or its elements) are split into
    consecutive segments, one per parameter (``lengths``, ``N_j`` units each). In segment j,
    ``n_j = ceil(N_j rate_j)`` units are drawn without replacement with probabilities
    proportional to their importance ``w_i`` (the official code's
    ``torch.multinomial(w / sum(w), n_j, replacement=False)``), by the exponential race
    (Efraimidis and Spirakis, 2006): unit i draws ``E_i = -log u_i`` and the ``n_j`` largest
    ``w_i / E_i`` of the segment are kept. A kept unit's mask is 1 (AMSS); with ``unbiased``
    (AMSS+) it is ``1 / pi_i``, ``pi_i = clamp(n_j q_i, 1 / N_j, 1)`` the unit's inclusion
    probability to first order in its share ``q_i = w_i / sum_segment w`` (a segment whose
    importance is all 0 has ``q_i = 1 / N_j``). Dropped units get 0.

    Args:
        importance: ``(U,)`` each unit's importance (its summed squared gradient), >= 0.
        lengths: ``(S,)`` integer units per segment (summing to ``U``).
        rates: ``(S,)`` each segment's keep rate in ``[0, 1]``.
        uniforms: ``(U,)`` uniform draws in ``[0, 1)`` (the randomness, an input).
        unbiased: rescale the kept units by ``1 / pi_i`` (AMSS+).
    """
    total = importance.shape[0]
    index = torch.arange(lengths.shape[0], device=importance.device)
    segment = torch.repeat_interleave(index, lengths, output_size=total)
    sizes = lengths.to(importance.dtype)
    keep_counts = torch.ceil(sizes * rates.to(importance.dtype))
    keys = importance / -torch.log(uniforms)  # w_i / E_i, E_i ~ Exp(1); u = 0 gives key 0
    order = torch.argsort(keys, descending=True, stable=True)
    order = order[torch.argsort(segment[order], stable=True)]
    starts = torch.cumsum(lengths, 0) - lengths
    positions = torch.arange(total, device=importance.device) - starts[segment[order]]
    rank = torch.empty_like(order).scatter_(0, order, positions)
    kept = (rank < keep_counts[segment]).to(importance.dtype)
    if not unbiased:
        return kept
    sums = torch.segment_reduce(importance, "sum", lengths=lengths, unsafe=True)
    uniform_share = 1 / sizes
    shares = torch.where(
        (sums > 0)[segment], importance / sums.clamp_min(1e-30)[segment], uniform_share[segment]
    )
    inclusion = torch.maximum((keep_counts[segment] * shares).clamp(max=1), uniform_share[segment])
    return kept / inclusion
