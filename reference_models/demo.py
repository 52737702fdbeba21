"""``make demo``: every method on the embedded audio-visual set, one table, the plots.

Trains the unimodal baselines, Joint, Multi-Loss, MLB, OGM, AGM, PMR, MSLR, MMCosine, Gradient
Blending, MMPareto, CGGM, InfoReg, AMSS, AMSS+ and OPM on the generated set of
:mod:`reference_models.data.synthetic` (waveforms through the log-STFT front end, frame clips
through the visual encoder) with reduced-width
ResNet-18 encoders (width 4), through the same training harness as the paper's runs
(:mod:`reference_models.train`), and prints one table: fused test accuracy, each modality's
accuracy (a detached linear probe on its encoder, trained alongside, the same measure for every
method), the fused ECE, the final coefficients and the time. It writes each run's outputs and a
combined coefficient plot (appendix Figure 7) under ``--out`` (``outputs/demo``).

    python -m reference_models.demo                 # the full demo (3-5 min on 2 CPU cores)
    python -m reference_models.demo --seeds 0 1 2   # mean over several data/training seeds
    python -m reference_models.demo --missing video=0.5   # half the clips lose their video

In the generated set audio is the strong modality (learned within a few epochs, capped by
its ambiguity) and video the weak one (learned slowly from a faint signal): trained jointly,
the video encoder ends clearly worse than the same encoder trained alone.

``--missing video=0.5`` runs the missing-modality demo instead
(:mod:`reference_models.missing_demo`): Joint, Multi-Loss and MLB with and without the
presence mask on the same incomplete data.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, TypeVar

import torch

from reference_models.coefficients_figure import plot_coefficients, read_history
from reference_models.train import TrainConfig, train

__all__ = [
    "DEMO_CONFIG",
    "DEMO_METHODS",
    "format_cell",
    "format_table",
    "main",
    "mean_of",
    "run_demo",
    "train_all",
]

Key = TypeVar("Key", bound=Hashable)

DEMO_METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("Video only", "video_only", {}),
    ("Audio only", "audio_only", {}),
    ("Joint", "joint", {}),
    ("Multi-Loss", "multiloss", {}),
    ("MLB", "mlb", {"alpha": 2.0, "beta_max": 3.0}),
    ("OGM", "ogm", {"alpha": 1.0}),
    ("AGM", "agm", {"alpha": 3.0, "clip": True}),
    ("PMR", "pmr", {"alpha": 2.0}),
    ("MSLR", "mslr", {"initial": [0.7, 1.3], "memory_epochs": 3}),
    ("MMCosine", "mmcosine", {"scale": 10.0}),
    ("G-Blend", "gblend", {"every": 2}),
    ("MMPareto", "mmpareto", {}),
    ("CGGM", "cggm", {"rho": 1.3, "lam": 0.2}),
    ("InfoReg", "inforeg", {"strength": [0.95, 0.1], "trace_epochs": 3}),
    ("AMSS", "amss", {"parameters": "conv"}),
    ("AMSS+", "amss_plus", {"parameters": "conv"}),
    ("OPM", "opm", {}),
)
"""(label, method, method options) of each demo row. Hyperparameters: Table 2's CREMA-D ResNet
column where it fits this short run (OGM α 1, AGM α 3 with its clipping, PMR α 2, MSLR λ
(0.7, 1.3), MMCosine s 10); MLB α 2 and β_max 3; MSLR's memory shortened to 3
epochs for a 12-epoch run; PMR's prototypes accumulated from the training steps (the library's
default, no extra pass); G-Blend re-estimates its loss weights every 2 epochs on the validation
split (k: the unimodal heads' weights, which sum to 1 with the fused one); MMPareto with the
authors' gamma 1.5 (k: 1, it scales no modality); CGGM with the official code's rho 1.3 and its
CMU-MOSI/IEMOCAP lam 0.2 (the direction term on the Late-Linear head's weight blocks), the gains
from the probes' batch accuracies as the official code (k: rho * B_m, averaged over the steps);
InfoReg with the authors' CREMA-D strengths (0.95 audio, 0.1 video) and a 3-epoch trace average
instead of 10, so that its prime learning window can close within 12 epochs (with 10 the zeros
before the first epoch keep it open throughout; k: the proximal strengths beta, it scales no
gradient); AMSS and AMSS+ with the official defaults (temperature 0.2, offset 0.5, bias 0),
masking the encoders' conv kernels channel by channel as the official code (k: the keep rates,
the fraction of each kernel's output channels that are updated; the masks are not a scaling of
the gradient by k); OPM with the authors' script values (q_base 0.5, lambda 0.5, p_exe 0.7, its
defaults) dropping from the first epoch (the official 6 warm-up epochs would be half of this
run; k: 1, it drops features instead of scaling gradients)."""

DEMO_CONFIG: dict[str, Any] = {
    "dataset": "synthetic",
    "backbone": "resnet18",
    "fusion": "linear",
    "width": 4,
    "batch_size": 64,
    "eval_batch_size": 300,
    "max_epochs": 12,
    "patience": 0,
    "schedule": "constant",
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "log_every": 5,
    "checkpoint_every": 0,
    "progress": False,
    "threads": 1,
    "data_options": {"train_size": 1200, "val_size": 500, "test_size": 1000},
}
"""The demo's shared settings: the paper's optimiser (Adam, lr 1e-3, wd 1e-4, ε 1e-7); a
constant LR because the official warm-up (780 steps) is longer than the whole run; no early
stopping. The table shows the test metrics at the end of training; each run's results.json
also holds those of the best-validation checkpoint (``test``, the protocol's numbers). One
thread per run: these width-4 encoders are bound by per-operator overhead, a second thread
barely helps and, on a busy machine, spins (measured 5-30x slower); two runs go at once
instead (``jobs``)."""

_SCALING_METHODS = frozenset({"mlb", "ogm", "ogm_ge", "agm", "mslr", "cggm"})
_COLUMNS = ("method", "fused", "audio", "video", "ECE", "k audio", "k video", "time")


def format_cell(value: float | None, digits: int = 3) -> str:
    """A table cell: ``value`` with ``digits`` decimals, or a dash for ``None``."""
    return "–" if value is None else f"{value:.{digits}f}"


def format_table(rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> str:
    """The demo's table as fixed-width text (also valid markdown)."""
    header = "| " + " | ".join(_COLUMNS) + " |"
    lines = [header, "|" + "|".join("---" for _ in _COLUMNS) + "|"]
    for row in rows:
        cells = [
            row["label"],
            format_cell(row["fused"]),
            format_cell(row.get("audio")),
            format_cell(row.get("video")),
            format_cell(row["ece"]),
            format_cell(row.get("k_audio"), 2),
            format_cell(row.get("k_video"), 2),
            f"{row['time']:.0f} s",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    seeds_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean of seeds {list(seeds)}"
    lines.append(
        f"\nTest accuracy at the end of training ({seeds_text}); audio/video: a detached linear "
        "probe on each encoder (unimodal rows: fused = the model's own classifier); ECE: fused, "
        "15 bins; k: mean coefficient over the last epoch (PMR: its prototype-loss weights). "
        "The protocol's best-validation numbers are in summary.json and each run's "
        "results.json."
    )
    return "\n".join(lines)


def mean_of(values: list[float | None]) -> float | None:
    """The mean of the values that are not ``None`` (``None`` if there are none)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _train_one(config: dict[str, Any]) -> dict[str, Any]:
    """One demo run (in a worker process when ``jobs > 1``)."""
    start = time.perf_counter()
    results = train(TrainConfig.from_dict(config), verbose=False)
    results["run_time_s"] = time.perf_counter() - start
    return results


def train_all(
    configs: Mapping[Key, dict[str, Any]],
    jobs: int,
    report: Callable[[Key, dict[str, Any]], None],
) -> None:
    """Train every configuration (``jobs`` at once, each in its own process; 1: in this
    process) and pass each run's results to ``report`` as it finishes (with its
    ``run_time_s``)."""
    if jobs <= 1:
        for key, config in configs.items():
            report(key, _train_one(config))
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(_train_one, config): key for key, config in configs.items()}
        for future in as_completed(futures):
            report(futures[future], future.result())


def run_demo(
    out: str | Path = "outputs/demo",
    *,
    seeds: Sequence[int] = (0,),
    methods: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
    jobs: int = 2,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train every demo method (per seed), print and return the table.

    Args:
        out: output folder.
        seeds: data and training seeds; the table shows the mean over them.
        methods: a subset of the method names of :data:`DEMO_METHODS`.
        overrides: changes to :data:`DEMO_CONFIG` (e.g. smaller sizes for a quick check).
        jobs: runs trained at once, each in its own process (1: all in this process).
        verbose: print progress lines and the table.

    Returns:
        ``{"rows": [...], "table": str, "wall_time_s": float, "plot": path or None, ...}``;
        each row's ``time`` is its runs' own training time (summed over seeds).
    """
    start = time.perf_counter()
    out = Path(out)
    chosen = [entry for entry in DEMO_METHODS if methods is None or entry[1] in methods]
    if methods is not None and len(chosen) != len(set(methods)):
        known = [m for _, m, _ in DEMO_METHODS]
        raise ValueError(f"unknown demo method(s) in {list(methods)}; known: {known}")
    base = {**DEMO_CONFIG, **(overrides or {})}
    configs = {
        (method, seed): {
            **base,
            "method": method,
            "method_options": dict(options),
            "seed": seed,
            "out": str(out / method / f"seed{seed}"),
        }
        for _, method, options in chosen
        for seed in seeds
    }
    for config in configs.values():
        TrainConfig.from_dict(config)  # refuse a bad configuration before any training
    finished: dict[tuple[str, int], dict[str, Any]] = {}

    def report(key: tuple[str, int], results: dict[str, Any]) -> None:
        finished[key] = results
        if verbose:
            test = results["test_last"]
            parts = [f"fused {format_cell(test['fused']['accuracy'])}"] + [
                f"{m} {format_cell(test.get(m, {}).get('probe_accuracy'))}"
                for m in ("audio", "video")
            ]
            print(
                f"[demo] {key[0]:<11} seed {key[1]}: "
                + "  ".join(parts)
                + f"  ({results['run_time_s']:.0f} s)",
                flush=True,
            )

    train_all(configs, jobs, report)

    rows = []
    histories: dict[str, dict[str, list[float]]] = {}
    for label, method, _ in chosen:
        per_seed = [finished[(method, seed)] for seed in seeds]
        histories[label] = read_history(Path(configs[(method, seeds[0])]["out"]) / "history.csv")
        test = [r["test_last"] for r in per_seed]
        best = [r["test"] for r in per_seed]
        row: dict[str, Any] = {
            "label": label,
            "method": method,
            "fused": mean_of([t["fused"]["accuracy"] for t in test]),
            "ece": mean_of([t["fused"]["ece"] for t in test]),
            "time": sum(r["run_time_s"] for r in per_seed),
        }
        for modality in ("audio", "video"):
            row[modality] = mean_of([t.get(modality, {}).get("probe_accuracy") for t in test])
            row[f"k_{modality}"] = mean_of(
                [r["final_coefficients"].get(modality) for r in per_seed]
            )
        row["best_validation"] = {
            "fused": mean_of([t["fused"]["accuracy"] for t in best]),
            **{
                m: mean_of([t.get(m, {}).get("probe_accuracy") for t in best])
                for m in ("audio", "video")
            },
        }
        row["per_seed"] = [
            {
                "seed": s,
                "fused": t["fused"]["accuracy"],
                **{m: t.get(m, {}).get("probe_accuracy") for m in ("audio", "video")},
                "best_epoch": r["best_epoch"],
                "best_validation_fused": b["fused"]["accuracy"],
            }
            for s, t, b, r in zip(seeds, test, best, per_seed)
        ]
        rows.append(row)
    table = format_table(rows, seeds)
    # Figure 7 compares the methods whose k scales the encoders' gradients.
    plotted = {
        label: (method, histories[label])
        for label, method, _ in chosen
        if method in _SCALING_METHODS and histories[label]
    }
    steps = max((len(h.get("step", [])) for _, h in plotted.values()), default=0)
    plot = (
        plot_coefficients(plotted, out / "coefficients.png", kernel=max(1, steps // 25))
        if plotted
        else None
    )
    wall = time.perf_counter() - start
    summary = {
        "rows": rows,
        "table": table,
        "wall_time_s": wall,
        "plot": None if plot is None else str(plot),
        "seeds": list(seeds),
        "jobs": jobs,
        "config": base,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(
        table + f"\n\nTotal wall time: {wall:.0f} s\n", encoding="utf-8"
    )
    (out / "summary.json").write_text(
        json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8"
    )
    if verbose:
        print()
        print(table)
        print(
            f"\nTotal wall time: {wall:.0f} s ({jobs} run(s) at a time, "
            f"{base.get('threads') or torch.get_num_threads()} thread(s) each). "
            f"Plots: {out}/coefficients.png and {out}/<method>/seed*/"
        )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m reference_models.demo``."""
    from reference_models.missing_demo import MISSING_DEMO_METHODS, parse_rates, run_missing_demo

    parser = argparse.ArgumentParser(
        prog="python -m reference_models.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", help="default outputs/demo (outputs/demo_missing with --missing)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", help="comma-separated subset, e.g. joint,mlb,video_only")
    parser.add_argument("--epochs", type=int, help=f"default {DEMO_CONFIG['max_epochs']}")
    parser.add_argument("--threads", type=int, help="torch threads per run (default 1)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument(
        "--missing",
        metavar="NAME=RATE[,NAME=RATE]",
        help="missing-modality demo: this share of the clips of every split loses the "
        f"modality; runs {', '.join(MISSING_DEMO_METHODS)} with and without the mask",
    )
    parser.add_argument(
        "--fill",
        default="input",
        choices=("input", "zero", "learned"),
        help="with --missing: what the fusion head sees for a missing input when the model "
        "is told (default input: the encoder's output of the zeros)",
    )
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.epochs:
        overrides["max_epochs"] = args.epochs
    if args.threads:
        overrides["threads"] = args.threads
    methods = args.methods.split(",") if args.methods else None
    if args.missing:
        run_missing_demo(
            parse_rates(args.missing),
            args.out or "outputs/demo_missing",
            seeds=args.seeds,
            methods=methods,
            fill=args.fill,
            overrides=overrides,
            jobs=args.jobs,
        )
        return 0
    run_demo(
        args.out or "outputs/demo",
        seeds=args.seeds,
        methods=methods,
        overrides=overrides,
        jobs=args.jobs,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
