"""The appendix's Figure 7 from real runs: each method's coefficients per encoder over training.

Usage::

    python -m benchmarks.figure7 runs/reproduce/table3_cremad_resnet18_linear_*/fold0
    python -m benchmarks.figure7 RUN_DIR... --kernel 500 --out figure7.png

Each ``RUN_DIR`` is a training run's output folder (``results.json`` and ``history.csv``).
Runs of the same method (e.g. its folds) are averaged step by step over the steps all of them
have; each curve is then smoothed with a moving average over ``--kernel`` steps (1,000 by
default) and drawn in the method's colour of the demo, one panel per encoder. Runs without
per-step coefficients (the unimodal baselines) are left out with a message.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from reference_models.coefficients_figure import mean_curve, plot_coefficients, read_history
from reference_models.recipes import METHODS

__all__ = ["collect_curves", "main"]


def collect_curves(
    run_dirs: Sequence[Path],
) -> tuple[dict[str, tuple[str, dict[str, list[float]]]], list[str], list[str]]:
    """Per method, the mean ``k_<modality>`` curves of its runs.

    Returns:
        ``({label: (method, {"k_<modality>": curve})}, modalities, skipped run folders)``.

    Raises:
        FileNotFoundError: a folder without ``results.json`` (not a finished run).
    """
    per_method: dict[str, list[dict[str, list[float]]]] = {}
    modalities: list[str] = []
    skipped = []
    for run_dir in run_dirs:
        results_path = Path(run_dir) / "results.json"
        if not results_path.is_file():
            raise FileNotFoundError(f"{run_dir} has no results.json: not a training run's folder")
        results = json.loads(results_path.read_text(encoding="utf-8"))
        history = read_history(Path(run_dir) / "history.csv")
        if not history:
            skipped.append(str(run_dir))
            continue
        per_method.setdefault(results["config"]["method"], []).append(history)
        modalities += [m for m in results["modalities"] if m not in modalities]
    curves = {}
    for method, histories in per_method.items():
        label = METHODS[method].label if method in METHODS else method
        if len(histories) > 1:
            label += f" (mean of {len(histories)} runs)"
        columns = {
            f"k_{m}": mean_curve([h[f"k_{m}"] for h in histories])
            for m in modalities
            if all(f"k_{m}" in h for h in histories)
        }
        curves[label] = (method, columns)
    return curves, modalities, skipped


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.figure7",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", type=Path, help="training run folders")
    parser.add_argument("--kernel", type=int, default=1000, help="moving average, in steps")
    parser.add_argument("--out", type=Path, default=Path("figure7.png"), help="the PNG written")
    args = parser.parse_args(argv)
    if args.kernel < 1:
        parser.error("--kernel must be >= 1")
    try:
        curves, modalities, skipped = collect_curves(args.runs)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for run_dir in skipped:
        print(f"left out (no per-step coefficients): {run_dir}")
    if not curves:
        print("error: none of the runs has per-step coefficients", file=sys.stderr)
        return 2
    path = plot_coefficients(curves, args.out, kernel=args.kernel, modalities=modalities)
    if path is None:
        print("error: drawing needs matplotlib (pip install 'gradbalance[plot]')", file=sys.stderr)
        return 2
    print(f"Figure 7 ({', '.join(curves)}) written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
