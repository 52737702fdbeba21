"""The missing-modality demo: ``python -m reference_models.demo --missing video=0.5``.

On the demo's generated set (:data:`reference_models.demo.DEMO_CONFIG`), a share of the clips
of every split loses a modality (zero input, :func:`reference_models.data.missing.with_missing`,
the same clips in every run). Joint, Multi-Loss and MLB are trained twice on that data:

* **no mask**: nobody is told which inputs are missing (``missing_mask=false``): the zeros are
  data, the unimodal heads learn from them and MLB scores them;
* **mask**: the model and ``bal.loss(..., present=...)`` get the presence mask: the heads learn
  from the present samples only and every statistic a method reads skips the absent ones.

The fused loss is the model's business, so Joint trains identically in both rows (a check).
The table shows the fused test accuracy on the complete and the incomplete test clips, each
modality's probe accuracy on the test clips where it is present (a detached linear probe on
its encoder, trained on the present samples in every row: the same measure everywhere) and
the final coefficients.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reference_models.demo import (
    DEMO_CONFIG,
    DEMO_METHODS,
    format_cell,
    mean_of,
    train_all,
)
from reference_models.training.config import TrainConfig
from reference_models.training.overrides import parse_value

__all__ = [
    "MISSING_DEMO_METHODS",
    "format_missing_table",
    "parse_rates",
    "run_missing_demo",
]

MISSING_DEMO_METHODS: tuple[str, ...] = ("joint", "multiloss", "mlb")
"""The methods of the missing-modality demo (options as in :data:`DEMO_METHODS`)."""

_COLUMNS = (
    "method",
    "mask",
    "fused complete",
    "fused incomplete",
    "audio",
    "video",
    "k audio",
    "k video",
    "time",
)


def parse_rates(text: str) -> dict[str, float]:
    """``"video=0.5"`` or ``"audio=0.2,video=0.3"`` as ``{modality: rate}``.

    Example:
        >>> parse_rates("audio=0.2,video=0.3")
        {'audio': 0.2, 'video': 0.3}
    """
    rates = {}
    for part in text.split(","):
        name, equals, value = part.partition("=")
        rate = parse_value(value.strip())
        if not equals or isinstance(rate, (str, bool)):
            raise ValueError(f"--missing takes NAME=RATE[,NAME=RATE], e.g. video=0.5; got {text!r}")
        rates[name.strip()] = rate
    return rates


def format_missing_table(
    rows: Sequence[Mapping[str, Any]], seeds: Sequence[int], rates: Mapping[str, float]
) -> str:
    """The missing-modality demo's table as fixed-width text (also valid markdown)."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "|".join("---" for _ in _COLUMNS) + "|"]
    for row in rows:
        cells = [
            row["label"],
            "yes" if row["mask"] else "no",
            format_cell(row["fused_complete"]),
            format_cell(row["fused_incomplete"]),
            format_cell(row.get("audio")),
            format_cell(row.get("video")),
            format_cell(row.get("k_audio"), 2),
            format_cell(row.get("k_video"), 2),
            f"{row['time']:.0f} s",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    seeds_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean of seeds {list(seeds)}"
    missing = ", ".join(f"{name} {rate:g}" for name, rate in rates.items())
    lines.append(
        f"\nMissing in every split: {missing}. Test accuracy at the end of training "
        f"({seeds_text}); fused complete/incomplete: on the test clips with every modality / "
        "with one missing; audio/video: a detached linear probe on each encoder, on the test "
        "clips where that modality is present; k: mean coefficient over the last epoch. "
        "mask: whether the model and bal.loss(present=...) were told which inputs are missing."
    )
    return "\n".join(lines)


def _row(label: str, mask: bool, per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    test = [r["test_last"] for r in per_seed]
    row: dict[str, Any] = {
        "label": label,
        "mask": mask,
        "fused_complete": mean_of([t["fused"]["accuracy_complete"] for t in test]),
        "fused_incomplete": mean_of([t["fused"]["accuracy_incomplete"] for t in test]),
        "time": sum(r["run_time_s"] for r in per_seed),
    }
    for modality in ("audio", "video"):
        row[modality] = mean_of([t[modality].get("probe_accuracy_present") for t in test])
        row[f"k_{modality}"] = mean_of([r["final_coefficients"].get(modality) for r in per_seed])
    return row


def run_missing_demo(
    rates: Mapping[str, float],
    out: str | Path = "outputs/demo_missing",
    *,
    seeds: Sequence[int] = (0,),
    methods: Sequence[str] | None = None,
    fill: str = "input",
    overrides: dict[str, Any] | None = None,
    jobs: int = 2,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train each method with and without the mask on data missing ``rates``; print and
    return the table.

    Args:
        rates: ``{modality: share of the clips that lose it}`` in every split.
        out: output folder (one run per ``<method>_<mask|nomask>/seed<s>``).
        seeds: data and training seeds; the table shows the mean over them.
        methods: a subset of :data:`MISSING_DEMO_METHODS`.
        fill: the model's fill in the rows with the mask (``input``, ``zero``, ``learned``;
            the rows without it always see the zero input).
        overrides: changes to :data:`reference_models.demo.DEMO_CONFIG`.
        jobs: runs trained at once, each in its own process.
        verbose: print progress lines and the table.

    Returns:
        ``{"rows": [...], "table": str, "wall_time_s": float, ...}``, also written to
        ``summary.json`` and ``summary.md`` under ``out``.
    """
    start = time.perf_counter()
    out = Path(out)
    chosen = methods if methods is not None else MISSING_DEMO_METHODS
    unknown = sorted(set(chosen) - set(MISSING_DEMO_METHODS))
    if unknown:
        raise ValueError(
            f"unknown missing-demo method(s) {unknown}; known: {list(MISSING_DEMO_METHODS)}"
        )
    entries = [entry for entry in DEMO_METHODS if entry[1] in chosen]
    base = {**DEMO_CONFIG, **(overrides or {}), "missing": dict(rates), "missing_mode": "both"}
    configs = {
        (method, mask, seed): {
            **base,
            "method": method,
            "method_options": dict(options),
            "missing_mask": mask,
            "missing_fill": fill if mask else "input",
            "seed": seed,
            "out": str(out / f"{method}_{'mask' if mask else 'nomask'}" / f"seed{seed}"),
        }
        for _, method, options in entries
        for mask in (False, True)
        for seed in seeds
    }
    for config in configs.values():
        TrainConfig.from_dict(config)  # refuse a bad configuration before any training
    finished: dict[tuple[str, bool, int], dict[str, Any]] = {}

    def report(key: tuple[str, bool, int], results: dict[str, Any]) -> None:
        finished[key] = results
        if verbose:
            fused = results["test_last"]["fused"]
            print(
                f"[demo --missing] {key[0]:<10} mask {'yes' if key[1] else 'no ':<3} seed "
                f"{key[2]}: fused complete {format_cell(fused['accuracy_complete'])}, "
                f"incomplete {format_cell(fused['accuracy_incomplete'])} "
                f"({results['run_time_s']:.0f} s)",
                flush=True,
            )

    train_all(configs, jobs, report)
    rows = [
        _row(label, mask, [finished[(method, mask, seed)] for seed in seeds])
        for label, method, _ in entries
        for mask in (False, True)
    ]
    table = format_missing_table(rows, seeds, rates)
    wall = time.perf_counter() - start
    summary = {
        "rows": rows,
        "table": table,
        "wall_time_s": wall,
        "seeds": list(seeds),
        "rates": dict(rates),
        "fill": fill,
        "jobs": jobs,
        "config": base,
    }
    out.mkdir(parents=True, exist_ok=True)
    text = table + f"\n\nTotal wall time: {wall:.0f} s\n"
    (out / "summary.md").write_text(text, encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if verbose:
        print()
        print(table)
        print(f"\nTotal wall time: {wall:.0f} s ({jobs} run(s) at a time). Runs: {out}/")
    return summary
