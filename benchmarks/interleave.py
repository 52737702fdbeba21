"""Interleaved A/B timing: run several variants in turn in one process, report median ratios.

Machines are noisy; timing variant A for a minute and then variant B confounds the variants
with the machine's drift. Here every round runs each variant once (in rotating order), so
drift hits all variants alike, and the result is the median (and min-max) of per-round ratios.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


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


def ratio_table(times: Mapping[str, list[float]], baselines: Sequence[str]) -> dict[str, Ratio]:
    """``{"<variant> / <baseline>": ratio}`` of every variant to each baseline in turn, leaving
    out each baseline and the baselines before it (``Joint``, then ``MultiLoss``: Multi-Loss
    appears over Joint, not Joint over Multi-Loss)."""
    table = {}
    for index, baseline in enumerate(baselines):
        for name, ratio in ratios(times, baseline).items():
            if name not in baselines[: index + 1]:
                table[f"{name} / {baseline}"] = ratio
    return table


def write_results(
    path: Path,
    times: Mapping[str, list[float]],
    table: Mapping[str, Ratio],
    rounds: int,
    **context: Any,
) -> None:
    """Write one interleaved measurement as JSON: the rounds, the torch version, ``context``
    (threads, device, batch, ...), each variant's median seconds and the ratio ``table``."""
    path.parent.mkdir(exist_ok=True)
    seconds = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
    record = {
        "rounds": rounds,
        "torch": torch.__version__,
        **context,
        "median_seconds": seconds,
        "ratios": {name: vars(ratio) for name, ratio in table.items()},
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
