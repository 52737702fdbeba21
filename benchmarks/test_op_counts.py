"""Balancing work is O(1) in the number of modalities: MLB's aten ops beyond plain Joint.

Targets: at most 80 extra ops for ``loss()`` + ``backward()`` at M = 2, and at most 1.5 times
that at M = 8 (heads of equal width evaluated together, one check for all modalities); a
presence mask (``present=``) adds the same ops to MLB as to Multi-Loss.
"""

from __future__ import annotations

import torch

from benchmarks.op_counts import OpCounter, extra_ops, mask_ops, table

MAX_EXTRA_AT_TWO = 80
MAX_GROWTH_TO_EIGHT = 1.5


def test_the_counter_counts_dispatched_ops():
    x = torch.ones(3)
    with OpCounter() as counter:
        (x + 1).sum()
    assert counter.ops == {"aten.add": 1, "aten.sum": 1}


def test_mlb_extra_ops_at_two_modalities():
    extra = extra_ops(2)
    print(f"\n{table()}")
    assert extra <= MAX_EXTRA_AT_TWO, f"MLB adds {extra} ops beyond Joint at M = 2"


def test_mlb_extra_ops_grow_at_most_one_and_a_half_times_from_two_to_eight_modalities():
    two, eight = extra_ops(2), extra_ops(8)
    assert eight <= MAX_GROWTH_TO_EIGHT * two, f"{two} ops at M = 2, {eight} at M = 8"


def test_a_presence_mask_adds_the_same_ops_to_mlb_as_to_multiloss():
    """``loss(..., present=)``: the masked heads' losses, scores and counts are Multi-Loss's
    work too; MLB's coefficients add nothing to it (so MLB / Multi-Loss keeps its ratio)."""
    for modalities in (2, 8):
        assert mask_ops("mlb", modalities) == mask_ops("multiloss", modalities) > 0
