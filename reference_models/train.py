"""Training and evaluation with the paper's protocol: ``python -m reference_models.train``.

One run trains one method × fusion × backbone × dataset × fold and writes, under ``--out``:

* ``log.jsonl``: one JSON object per line; ``{"kind": "epoch", ...}`` per epoch (losses,
  accuracies and ECE of the fused prediction and of each modality, mean coefficients and
  scores, learning rate, time) and ``{"kind": "step", ...}`` every ``log_every`` steps
  (coefficients, scores, running loss);
* ``tensorboard/`` with ``--logger tensorboard``: the step and epoch records' scalars and the
  balancer's values (``gradbalance/k_audio``, ...) as TensorBoard events;
* ``results.json``: the configuration, the best epoch, and the validation and test metrics of
  the best-validation checkpoint (``val``, ``test``: fused and per modality), the test metrics
  of the last epoch (``test_last``), final coefficients, timings;
* ``coefficients.png`` (each modality's coefficient and score per step: the appendix's
  Figure 7) and ``learning_curves.png``;
* ``summary.txt``: the one-screen summary printed at the end;
* ``last.pt`` (every epoch, for ``--resume``) and ``best.pt`` (best validation accuracy).

The protocol (the paper's appendix B.2): Adam (β 0.9/0.999, ε 1e-7, L2 weight decay), a
constant warm-up then cosine annealing with warm restarts (T_0 = 4, T_mult = 2; the official
step-indexed behaviour or the appendix's epoch reading, :mod:`reference_models.schedule`),
validation every epoch, early stopping on the fused validation accuracy (strictly better
resets the patience), at most ``max_epochs`` epochs, test metrics of the best-validation
checkpoint. Every method also trains a detached linear probe per modality (stop-gradient:
it never reaches the encoders), so each modality's accuracy is measured the same way
whatever the method (``probe_*`` keys); methods with a classifier of each modality alone
(the heads of Multi-Loss and MLB, detached probes of their own) report it under ``head_*``,
and OGM and MSLR with a fused head report that head's per-modality slices under ``slice_*``
(what they score; not a per-modality accuracy).

The harness is split by concern under :mod:`reference_models.training` (configuration,
components, step, loop, checkpoints, report); this module is its command line and re-exports
its public names. The components are listed once in :mod:`reference_models.recipes`.

Between two logging steps the training step makes no host synchronisation: losses, accuracy
counts and coefficient sums are accumulated on the device and read every ``log_every`` steps
and at the end of each epoch.

Missing modalities: ``--set missing.video=0.5`` blanks the video of half the samples
(:func:`reference_models.data.missing.with_missing`; ``missing_mode``, ``missing_fill``,
``missing_mask`` in :class:`TrainConfig`); the harness passes the presence mask to the model and
to ``bal.loss(..., present=...)``, and ``results.json`` reports each split's accuracies on the
complete and incomplete samples and with each modality present and absent.

Example (a tiny run on the embedded generated set)::

    python -m reference_models.train --dataset synthetic --method mlb --opt alpha=2.0 \\
        --width 4 --epochs 10 --batch-size 64 --out runs/demo_mlb
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from reference_models.recipes import BACKBONES, DATASETS, FUSIONS, METHODS
from reference_models.schedule import SCHEDULES
from reference_models.training.batches import InMemoryBatches
from reference_models.training.components import (
    build_balancer,
    build_datasets,
    build_model_for,
)
from reference_models.training.config import (
    CONFIG_DIR,
    FOLD_SEEDS,
    TrainConfig,
    load_config,
    resolve_preset,
)
from reference_models.training.loop import Session, build_run, train
from reference_models.training.overrides import key_values, nest_dotted, parse_value
from reference_models.training.report import summary_text
from reference_models.training.step import RunState, evaluate, train_step
from reference_models.training.tensorboard import LOGGERS
from reference_models.unimodal import UnimodalClassifier

__all__ = [
    "CONFIG_DIR",
    "DATASETS",
    "FOLD_SEEDS",
    "METHOD_NAMES",
    "UNIMODAL",
    "InMemoryBatches",
    "RunState",
    "Session",
    "TrainConfig",
    "UnimodalClassifier",
    "build_balancer",
    "build_datasets",
    "build_model_for",
    "build_run",
    "config_from_args",
    "evaluate",
    "load_config",
    "main",
    "parse_value",
    "resolve_preset",
    "summary_text",
    "train",
    "train_step",
]

METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
"""Every ``method`` the harness accepts (:data:`reference_models.recipes.METHODS`)."""

UNIMODAL: dict[str, str] = {
    name: recipe.modality for name, recipe in METHODS.items() if recipe.modality is not None
}
"""The unimodal baselines of Table 3: one encoder and a linear classifier."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reference_models.train",
        description="Train one method × fusion × backbone × dataset × fold with the paper's "
        "protocol. A TOML preset (--config) sets any option; flags override it.",
    )
    add = parser.add_argument
    add(
        "--config",
        help="TOML preset: a path or a name under reference_models/configs "
        "(e.g. table3/cremad_resnet18_linear_mlb)",
    )
    add("--dataset", choices=tuple(DATASETS))
    add("--root", help="prepared dataset folder (not needed for synthetic)")
    add("--backbone", choices=BACKBONES)
    add("--fusion", choices=FUSIONS)
    add("--method", help=f"one of {', '.join(METHOD_NAMES)}")
    add(
        "--opt",
        action="append",
        metavar="KEY=VALUE",
        help="method option (repeatable), e.g. --opt alpha=5.0 --opt beta_max=2",
    )
    add(
        "--data-opt",
        action="append",
        metavar="KEY=VALUE",
        help="dataset option (repeatable), e.g. --data-opt video_contrast=0.8",
    )
    add("--fusion-opt", action="append", metavar="KEY=VALUE", help="fusion-head option")
    add("--width", type=int, help="ResNet-18 base width (64 = the paper's)")
    add("--fold", type=int, help="0-based fold (0, 1, 2: the paper's three)")
    add("--seed", type=int)
    add("--device", help="cpu, cuda, cuda:1, ...")
    add("--epochs", dest="max_epochs", type=int, help="at most this many epochs")
    add("--patience", type=int, help="early-stopping patience in epochs (0: off)")
    add("--batch-size", type=int)
    add("--eval-batch-size", type=int)
    add("--lr", type=float)
    add("--weight-decay", type=float)
    add("--schedule", choices=SCHEDULES)
    add("--warmup-steps", type=int)
    add("--warmup-epochs", type=float)
    add("--amp", action="store_true", default=None, help="bf16 autocast")
    add("--workers", type=int)
    add("--log-every", type=int)
    add(
        "--logger",
        choices=LOGGERS,
        help="also log to TensorBoard under OUT/tensorboard (log.jsonl is always written)",
    )
    add("--checkpoint-every", type=int)
    add("--stop-after", type=int, help="stop after N epochs of this invocation (resumable)")
    add("--threads", type=int)
    add("--out", help="output folder")
    add("--resume", action="store_true", default=None, help="continue from OUT/last.pt")
    add("--no-progress", dest="progress", action="store_false", default=None)
    add(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any configuration field; a dotted key sets a table's entry, e.g. "
        "--set missing.video=0.5 (half the samples lose their video)",
    )
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse the command line into a :class:`TrainConfig`."""
    args = _parser().parse_args(argv)
    values = vars(args)
    overrides: dict[str, Any] = nest_dotted(key_values(values.pop("set"), "--set"))
    for table, flag in (
        ("method_options", "opt"),
        ("data_options", "data_opt"),
        ("fusion_options", "fusion_opt"),
    ):
        given = key_values(values.pop(flag), "--" + flag.replace("_", "-"))
        overrides[table] = {**overrides.get(table, {}), **given}
    preset = values.pop("config")
    overrides.update({k: v for k, v in values.items() if v is not None})
    return load_config(preset, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``gradbalance-train``)."""
    try:
        config = config_from_args(argv)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
