"""The balancing work alone, gradbalance's vs the official approach's, on one model and batch.

gradbalance's balancing work per step is the library's own code for the heads' true-class
probabilities, the coefficients, the finiteness checks, the buffer and history writes, plus
one multiply per encoder output and per head's logits in the backward and one clone per
encoder output in the forward.
The official approach's is :func:`benchmarks.official_balancing.official_balancing_step`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import gradbalance as gb
from benchmarks.interleave import interleaved_times
from benchmarks.official_balancing import official_balancing_step
from gradbalance._step import Step


def prepared(model: nn.Module, encoders: list[nn.Module], inputs, target, num_classes: int):
    """Run one plain Multi-Loss step so every gradient is populated; return what both need."""
    outputs: list[torch.Tensor] = []
    handles = [e.register_forward_hook(lambda m, i, o: outputs.append(o)) for e in encoders]
    logits = model(*inputs)
    for handle in handles:
        handle.remove()
    features = [o.mean(tuple(range(2, o.dim()))) if o.dim() > 2 else o for o in outputs]
    heads = [nn.Linear(f.shape[1], num_classes, device=f.device) for f in features]
    unimodal = [h(f) for h, f in zip(heads, features)]
    loss = F.cross_entropy(logits, target) + sum(F.cross_entropy(u, target) for u in unimodal)
    output_grads = torch.autograd.grad(loss, outputs, retain_graph=True)
    loss.backward()
    return [u.detach() for u in unimodal], [o.detach() for o in outputs], list(output_grads)


def ours(bal: gb.MLB, unimodal, outputs, output_grads, target) -> None:
    """The work MLB adds to a Multi-Loss step, through the library's own code.

    Its statistics (one log-softmax for the heads' scores), coefficients, checks, buffer and
    history writes, then what the backward adds (one multiply per encoder output) and the
    forward's clones.
    """
    stacked = torch.stack(list(unimodal.values()))
    context = bal._step_context()
    step = Step(context, stacked[0], target, {}, {}, training=True, binding=bal._binding)
    step.set_unimodal(stacked, None)
    _, scores = step.head_terms(scaled=True)
    step.store(bal._coefficients(scores), scores)
    bal._commit(*step.stored)
    for view, output, grad in zip(bal._binding.views, outputs, output_grads):
        output.clone()
        grad * view


def compare(
    model,
    encoders,
    prefixes,
    inputs,
    target,
    num_classes,
    rounds,
    sync: Callable[[], object] = lambda: None,
):
    unimodal, outputs, output_grads = prepared(model, encoders, inputs, target, num_classes)
    bal = gb.MLB(model, encoders, num_classes, feature_dims=[u.shape[1] for u in outputs])
    by_name = dict(zip(bal.names, unimodal))
    variants = {
        "gradbalance": lambda: ours(bal, by_name, outputs, output_grads, target),
        "official": lambda: official_balancing_step(model, unimodal, target, prefixes),
    }
    try:
        return interleaved_times(
            variants, rounds=rounds, calls_per_round=5, warmup=min(rounds, 2), sync=sync
        )
    finally:
        bal.remove()
