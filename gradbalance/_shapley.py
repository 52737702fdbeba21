"""AGM's Shapley decomposition, exact or estimated from sampled permutations.

Exact, the Shapley value of modality m needs the fused output of every coalition: 2^M - 2
masked passes per training step (65,534 for M = 16). The permutation estimate (Castro et
al., "Polynomial calculation of the Shapley value based on sampling", 2009) draws n orders
of the modalities uniformly; in each order a modality's marginal contribution is
``f(P ∪ {m}) - f(P)``, P the modalities before it (``f(∅) = 0``, as the exact form drops
the empty coalition). The mean over the n orders is unbiased for every m, sums to
``f(all)`` exactly in every draw (the contributions of one order telescope), and needs at
most ``n (M - 1)`` masked passes (coalitions shared by several orders are run once).

The orders come from a CPU ``torch.Generator`` seeded with ``shapley_seed``: every DDP rank
draws the same orders, so all run the same passes; the draw never touches an accelerator
(no host synchronisation).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from gradbalance.coefficients import shapley_matrix

ShapleyMode = Literal["exact", "sampled"]

EXACT_PASS_LIMIT = 254
"""Masked passes per step (M = 8) above which an exact decomposition warns at construction."""


def exact_passes(num_modalities: int) -> int:
    """Masked fusion passes per training step of the exact decomposition: 2^M - 2."""
    return 2**num_modalities - 2


def permutation_matrix(orders: torch.Tensor) -> tuple[list[frozenset[int]], torch.Tensor]:
    """The coalitions and weights of the permutation estimate over the given orders.

    ``phi_m = sum_S C[m, S] f(S)`` is the mean over the orders of m's marginal contribution;
    the full coalition comes first (its output is the model's own fused logits), then the
    others in order of first use.

    Args:
        orders: ``(n, M)`` integer tensor on the CPU, each row a permutation of ``0..M-1``.

    Returns:
        ``(coalitions, C)``: the distinct non-empty coalitions and the ``(M, len)`` float64
        weights.

    Example:
        >>> coalitions, weights = permutation_matrix(torch.tensor([[0, 1], [1, 0]]))
        >>> [sorted(s) for s in coalitions]
        [[0, 1], [0], [1]]
        >>> weights
        tensor([[ 0.5000,  0.5000, -0.5000],
                [ 0.5000, -0.5000,  0.5000]], dtype=torch.float64)
    """
    count, num_modalities = orders.shape
    everyone = frozenset(range(num_modalities))
    column = {everyone: 0}
    rows: list[int] = []
    columns: list[int] = []
    signs: list[float] = []
    for order in orders.tolist():
        before: frozenset[int] = frozenset()
        for m in order:
            after = before | {m}
            rows.append(m)
            columns.append(column.setdefault(after, len(column)))
            signs.append(1.0)
            if before:
                rows.append(m)
                columns.append(column[before])
                signs.append(-1.0)
            before = after
    weights = torch.zeros(num_modalities, len(column), dtype=torch.float64)
    weights.index_put_(
        (torch.tensor(rows), torch.tensor(columns)),
        torch.tensor(signs, dtype=torch.float64),
        accumulate=True,
    )
    return list(column), weights / count


class ShapleyPlan:
    """Which coalitions a training step runs, and their weights: fixed or drawn per step.

    Args:
        num_modalities: M >= 2.
        mode: ``"exact"`` (every coalition) or ``"sampled"`` (``samples`` orders a step).
        samples: orders drawn per step for ``"sampled"``.
        seed: seed of the CPU generator of the orders (the same on every rank).

    Example:
        >>> plan = ShapleyPlan(4, "sampled", samples=2, seed=0)
        >>> coalitions, weights = plan.draw()
        >>> plan.passes(), len(coalitions) - 1 <= plan.passes(), tuple(weights.shape[:1])
        (6, True, (4,))
        >>> sums = weights.sum(0)  # sum_m phi_m = f(all): 1 on the full coalition, 0 elsewhere
        >>> sums[0].item(), sums[1:].abs().max().item()
        (1.0, 0.0)
    """

    def __init__(self, num_modalities: int, mode: ShapleyMode, samples: int, seed: int) -> None:
        self.num_modalities = num_modalities
        self.mode = mode
        self.samples = samples
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.exact = shapley_matrix(num_modalities) if mode == "exact" else None

    def passes(self) -> int:
        """The most masked passes one step runs."""
        if self.mode == "exact":
            return exact_passes(self.num_modalities)
        return min(self.samples * (self.num_modalities - 1), exact_passes(self.num_modalities))

    def draw(self) -> tuple[list[frozenset[int]], torch.Tensor]:
        """This step's coalitions (the full one first) and ``(M, len)`` float64 weights."""
        if self.exact is not None:
            return self.exact
        keys = torch.rand(self.samples, self.num_modalities, generator=self.generator)
        return permutation_matrix(keys.argsort(dim=1))

    def state(self) -> dict[str, Any]:
        """The generator's state (for the balancer's ``state_dict``)."""
        return {"generator": self.generator.get_state()}

    def load(self, state: dict[str, Any]) -> None:
        """Resume the orders from :meth:`state`."""
        if "generator" in state:
            self.generator.set_state(state["generator"])
