"""Reproduce the paper's tables: every method × fold of a table, then mean ± std beside the paper.

Usage::

    python -m benchmarks.reproduce --table 3 --dataset cremad --root data/cremad
    python -m benchmarks.reproduce --table 3 --dataset ave --root data/ave --jobs 2 --device cuda
    python -m benchmarks.reproduce --table 4 --backbone resnet18 --fusion film --root data/cremad

Each run uses its preset (``reference_models/configs/table3|table4|journal``), runs under
``<out>/<preset name>/fold<k>/`` and writes its own ``config.toml`` there. A run whose
``results.json`` says it finished is not run again; an interrupted one resumes from its
``last.pt``. ``--jobs N`` runs N trainings at once (separate processes). The result is a
markdown table (printed and written to ``<out>/table<T>_<dataset>_<backbone>.md``) with, per
method, the test accuracy of the best-validation checkpoint as mean ± sample std over the folds,
the paper's number and the difference.

``--dataset synthetic`` runs the table's methods on the embedded generated set with the
CREMA-D ResNet presets (no paper numbers; for smoke tests and CPU-only machines).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.paper_numbers import METHOD_LABELS, paper_accuracy
from reference_models.presets import (
    TABLE3_METHODS,
    TABLE4_FUSIONS,
    TABLE4_METHODS,
    preset_name,
    render_toml,
)
from reference_models.recipes import BACKBONES, DATASETS
from reference_models.train import TrainConfig, key_values, load_config, train

__all__ = ["TABLE_ECE", "Run", "main", "markdown_table", "plan_runs", "run_all", "summarise"]

TABLE_ECE = "ece_torchmetrics"
"""The ECE the tables report: torchmetrics' binning (``[lo, hi)`` plus a bin for confidence 1),
which the official numbers used; ``results.json`` also has ``ece_classical`` (eq. 10)."""


@dataclass(frozen=True)
class Run:
    """One training run of a table: its cell, fold and configuration."""

    setting: str
    method: str
    fold: int
    config: TrainConfig

    @property
    def results_path(self) -> Path:
        return self.config.output_dir / "results.json"


def plan_runs(
    table: int,
    dataset: str,
    backbone: str,
    *,
    root: str | None,
    out: Path,
    folds: Sequence[int] = (0, 1, 2),
    methods: Sequence[str] | None = None,
    fusions: Sequence[str] | None = None,
    group: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[Run]:
    """The runs of one table column (Table 3) or of the chosen fusions (Table 4)."""
    overrides = dict(overrides or {})
    if table == 3:
        cells = [("linear", m) for m in (methods or TABLE3_METHODS)]
        group = group or "table3"
    elif table == 4:
        if dataset not in ("cremad", "synthetic"):
            raise ValueError("Table 4 is on CREMA-D (or --dataset synthetic)")
        cells = [(f, m) for f in (fusions or TABLE4_FUSIONS) for m in (methods or TABLE4_METHODS)]
        group = group or "table4"
    else:
        raise ValueError(f"--table must be 3 or 4, got {table}")
    preset_dataset = "cremad" if dataset == "synthetic" else dataset
    runs = []
    for fusion, method in cells:
        name = preset_name(group, preset_dataset, backbone, fusion, method)
        for fold in folds:
            changes: dict[str, Any] = {"fold": fold, "resume": True, "progress": False}
            if dataset == "synthetic":
                changes.update({"dataset": "synthetic", "root": None})
            elif root is not None:
                changes["root"] = root
            changes.update(overrides)
            setting = f"{dataset} {backbone} {fusion}"
            run_dir = (
                out / name.replace("/", "_").replace(preset_dataset, dataset, 1) / f"fold{fold}"
            )
            changes["out"] = str(run_dir)
            runs.append(Run(setting, method, fold, load_config(name, **changes)))
    return runs


def _finished(run: Run) -> dict[str, Any] | None:
    if run.results_path.is_file():
        results = json.loads(run.results_path.read_text(encoding="utf-8"))
        if results.get("finished"):
            return results
    return None


def _run_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Worker entry point (a separate process under ``--jobs``)."""
    return train(TrainConfig.from_dict(config_dict), verbose=False)


def run_all(runs: Sequence[Run], jobs: int = 1) -> list[dict[str, Any]]:
    """Run (or reuse) every run; returns their results in the order of ``runs``."""
    results: list[dict[str, Any] | None] = [_finished(run) for run in runs]
    pending = [i for i, r in enumerate(results) if r is None]
    for run in runs:
        run.config.output_dir.mkdir(parents=True, exist_ok=True)
        (run.config.output_dir / "config.toml").write_text(
            render_toml({k: v for k, v in run.config.to_dict().items() if v is not None}),
            encoding="utf-8",
        )
    if jobs <= 1:
        for index in pending:
            run = runs[index]
            print(f"[reproduce] {run.setting} {run.method} fold {run.fold}", flush=True)
            results[index] = _run_config(run.config.to_dict())
    else:
        context = multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = {}
            for index in pending:
                config = runs[index].config
                if config.threads is None:
                    config = config.replace(threads=threads)
                futures[index] = pool.submit(_run_config, config.to_dict())
            for index, future in futures.items():
                results[index] = future.result()
    return [r for r in results if r is not None]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance)


def summarise(
    runs: Sequence[Run], results: Sequence[dict[str, Any]], table: int
) -> list[dict[str, Any]]:
    """One row per (setting, method): our mean ± std (%), the paper's, the difference."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for run, result in zip(runs, results):
        key = (run.setting, run.method)
        row = rows.setdefault(
            key,
            {
                "setting": run.setting,
                "method": run.method,
                "accuracy": [],
                "ece": [],
                "config": run.config,
            },
        )
        row["accuracy"].append(100.0 * result["test"]["fused"]["accuracy"])
        fused = result["test"]["fused"]
        row["ece"].append(100.0 * fused.get(TABLE_ECE, fused["ece"]))
    out = []
    for row in rows.values():
        config: TrainConfig = row.pop("config")
        mean, std = _mean_std(row["accuracy"])
        paper = paper_accuracy(table, config.dataset, config.backbone, config.fusion, row["method"])
        out.append(
            {
                **row,
                "mean": mean,
                "std": std,
                "folds": len(row["accuracy"]),
                "ece_mean": _mean_std(row["ece"])[0],
                "paper": paper,
                "difference": None if paper is None else mean - paper[0],
            }
        )
    return out


def markdown_table(rows: Sequence[dict[str, Any]], title: str) -> str:
    """The summary rows as a markdown table."""
    lines = [
        f"### {title}",
        "",
        "Test accuracy (%) of the best-validation checkpoint, mean ± sample std over folds; "
        "ECE with torchmetrics' binning, as the official numbers (results.json has both).",
        "",
        "| setting | method | ours | folds | ECE (%, torchmetrics bins) | paper | difference |",
        "|---|---|---|---|---|---|---|",
    ]
    if any(row["setting"].endswith(" mlp") and row["paper"] is not None for row in rows):
        lines[2] += (
            " The paper's Table 4 'MLP' block repeats its Table 3 Late-Linear numbers"
            "; the runs here use the MLP fusion its label names."
        )
    for row in rows:
        paper = "–" if row["paper"] is None else f"{row['paper'][0]:.1f} ± {row['paper'][1]:.1f}"
        difference = "–" if row["difference"] is None else f"{row['difference']:+.1f}"
        lines.append(
            f"| {row['setting']} | {METHOD_LABELS.get(row['method'], row['method'])} | "
            f"{row['mean']:.1f} ± {row['std']:.1f} | {row['folds']} | {row['ece_mean']:.1f} | "
            f"{paper} | {difference} |"
        )
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.reproduce",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--table", type=int, choices=(3, 4), required=True)
    add("--dataset", default="cremad", choices=tuple(DATASETS))
    add("--backbone", default="resnet18", choices=BACKBONES)
    add("--root", help="prepared dataset folder")
    add(
        "--folds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="0-based folds (default 0 1 2, the paper's; CREMA-D also has 3 and 4)",
    )
    add("--methods", help="comma-separated subset of the table's methods")
    add("--fusion", action="append", choices=TABLE4_FUSIONS, help="Table 4: fusion(s) to run")
    add(
        "--presets",
        choices=("paper", "journal"),
        default="paper",
        help="paper: Table 2's hyperparameters; journal: the IJCV scripts'",
    )
    add("--jobs", type=int, default=1, help="trainings at once")
    add("--device", help="cpu, cuda, ...")
    add("--out", default="runs/reproduce", help="where the runs and the table go")
    add(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a configuration field of every run (e.g. max_epochs=2)",
    )
    add("--data-opt", action="append", metavar="KEY=VALUE", help="dataset option of every run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    args = _parser().parse_args(argv)
    if args.dataset != "synthetic" and not args.root:
        print("error: --root DIR (the prepared dataset) is needed", file=sys.stderr)
        return 2
    overrides = key_values(args.set, "--set")
    if args.data_opt:
        overrides["data_options"] = key_values(args.data_opt, "--data-opt")
    if args.device:
        overrides["device"] = args.device
    methods = args.methods.split(",") if args.methods else None
    group = None if args.presets == "paper" else "journal"
    out = Path(args.out)
    runs = plan_runs(
        args.table,
        args.dataset,
        args.backbone,
        root=args.root,
        out=out,
        folds=args.folds,
        methods=methods,
        fusions=args.fusion,
        group=group,
        overrides=overrides,
    )
    results = run_all(runs, jobs=args.jobs)
    rows = summarise(runs, results, args.table)
    title = f"Table {args.table}: {args.dataset} {args.backbone} ({args.presets} presets)"
    text = markdown_table(rows, title)
    path = out / f"table{args.table}_{args.dataset}_{args.backbone}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(text)
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
