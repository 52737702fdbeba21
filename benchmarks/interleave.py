"""Interleaved A/B timing: run several variants in turn in one process, report median ratios.

Machines are noisy; timing variant A for a minute and then variant B confounds the variants
with the machine's drift. Here every round runs each variant once (in rotating order), so
drift hits all variants alike, and the result is the median (and min-max) of per-round ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass
class Ratio:
    """Per-round time ratio of a variant to the baseline: median, min and max."""

    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.3f} ({self.low:.3f}-{self.high:.3f})"


def interleaved_times(
    variants: Mapping[str, Callable[[], object]],
    rounds: int,
    calls_per_round: int = 1,
    warmup: int = 2,
    sync: Callable[[], object] = lambda: None,
) -> dict[str, list[float]]:
    """Seconds per call of each variant, one entry per round, variants interleaved."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for _ in range(calls_per_round):
                variants[name]()
            sync()
            times[name].append((time.perf_counter() - start) / calls_per_round)
    return times


def ratios(times: Mapping[str, list[float]], baseline: str) -> dict[str, Ratio]:
    """Per-round ratios of every variant to ``baseline``."""
    out = {}
    for name, values in times.items():
        per_round = [v / b for v, b in zip(values, times[baseline])]
        out[name] = Ratio(statistics.median(per_round), min(per_round), max(per_round))
    return out
