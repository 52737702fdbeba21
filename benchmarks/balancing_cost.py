"""The balancing work alone, gradbalance's vs the official approach's, on one model and batch.

gradbalance's balancing work per step is: the heads' true-class probabilities, the
coefficients, writing them into the buffers and the history, and in the backward one multiply
per encoder output (and per head's logits) plus one clone per encoder output in the forward.
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
from gradbalance.coefficients import mlb_coefficients, true_class_probability


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


def ours(unimodal, outputs, output_grads, target, buffers, history, alpha=1.0):
    """Exactly the work MLB adds to a Multi-Loss step."""
    scores = torch.stack([true_class_probability(u, target) for u in unimodal])
    k = mlb_coefficients(scores, alpha, 2.0)
    for index, buffer in enumerate(buffers):
        buffer.copy_(k[index])
    history.record(k, scores)
    for output, grad, logits, buffer in zip(outputs, output_grads, unimodal, buffers):
        output.clone()
        grad * buffer
        logits * buffer


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
    buffers = [torch.ones((), device=target.device) for _ in encoders]
    history = gb.History([str(i) for i in range(len(encoders))], 256, device=target.device)
    variants = {
        "gradbalance": lambda: ours(unimodal, outputs, output_grads, target, buffers, history),
        "official": lambda: official_balancing_step(model, unimodal, target, prefixes),
    }
    return interleaved_times(
        variants, rounds=rounds, calls_per_round=5, warmup=min(rounds, 2), sync=sync
    )
