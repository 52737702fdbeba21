"""What a run reports: log records, the per-step history, plots and the summary."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import gradbalance as gb
from reference_models.training.step import RunState

__all__ = [
    "history",
    "write_outputs",
    "progress",
    "step_record",
    "summary_text",
    "write_history_csv",
    "write_plots",
]


def step_record(state: RunState, epoch: int, step: int, batch_index: int) -> dict[str, Any]:
    """The ``step`` log record (one host synchronisation every ``log_every`` steps)."""
    record: dict[str, Any] = {
        "kind": "step",
        "epoch": epoch,
        "step": step,
        "batch": batch_index,
        "lr": state.optimizer.param_groups[0]["lr"],
    }
    values = [state.window_loss / max(state.window_samples, 1)]
    if state.balancer is not None:
        values.append(
            torch.stack([state.balancer.coefficient_buffer(n).float() for n in state.names])
        )
        values.append(state.balancer.last_scores.float())
    flat = torch.cat([v.reshape(-1).cpu() for v in values]).tolist()
    record["loss"] = flat[0]  # mean of the method's loss over the steps since the last record
    if state.balancer is not None:
        m = len(state.names)
        record["coefficients"] = dict(zip(state.names, flat[1 : 1 + m]))
        record["scores"] = dict(zip(state.names, flat[1 + m : 1 + 2 * m]))
    state.window_loss.zero_()
    state.window_samples = 0
    return record


def history(state: RunState, prefix: torch.Tensor | None) -> torch.Tensor:
    """Per-step ``(steps, 2, M)`` coefficients and scores, including before a resume."""
    if state.balancer is None:
        return torch.zeros(0, 2, len(state.names))
    table = state.balancer.history
    current = (
        torch.stack(
            [
                torch.stack([table[n]["coefficients"], table[n]["scores"]], dim=1)
                for n in state.names
            ],
            dim=2,
        )
        if table and len(table[state.names[0]]["coefficients"])
        else torch.zeros(0, 2, len(state.names))
    )
    if prefix is None or prefix.numel() == 0:
        return current
    return torch.cat([prefix, current])


def write_history_csv(history: torch.Tensor, names: Sequence[str], path: Path) -> None:
    """Per-step coefficients and scores: ``step,k_<name>...,score_<name>...``."""
    header = ["step", *(f"k_{n}" for n in names), *(f"score_{n}" for n in names)]
    rows = torch.cat([history[:, 0], history[:, 1]], dim=1).tolist()
    lines = [",".join(header)]
    lines += [",".join([str(i), *(f"{v:.6g}" for v in row)]) for i, row in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _history_dict(
    history: torch.Tensor, names: Sequence[str]
) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {"coefficients": history[:, 0, index], "scores": history[:, 1, index]}
        for index, name in enumerate(names)
    }


def _plot_learning_curves(epochs: list[dict[str, Any]], names: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [record["epoch"] for record in epochs]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(x, [r["train"]["loss"] for r in epochs], label="train (method's loss)")
    ax_loss.plot(x, [r["val"]["fused"]["loss"] for r in epochs], label="validation (fused CE)")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_acc.plot(x, [r["train"]["accuracy"] for r in epochs], label="train fused", linestyle="--")
    ax_acc.plot(x, [r["val"]["fused"]["accuracy"] for r in epochs], label="val fused")
    for name in names:
        values = [r["val"][name].get("probe_accuracy") for r in epochs]
        if all(v is not None for v in values):
            ax_acc.plot(x, values, label=f"val {name} (probe)")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(
    out: Path, history: torch.Tensor, epochs: list[dict[str, Any]], names: Sequence[str], title: str
) -> list[str]:
    """``coefficients.png`` (Figure 7) and ``learning_curves.png``; the names written."""
    written = []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn(
            "matplotlib is not installed: no plots (pip install 'gradbalance[plot]')", stacklevel=2
        )
        return written
    if history.shape[0]:
        gb.plot_history(_history_dict(history, names), out / "coefficients.png", title=title)
        written.append("coefficients.png")
    if epochs:
        _plot_learning_curves(epochs, names, out / "learning_curves.png")
        written.append("learning_curves.png")
    return written


def progress(total: int, description: str, enabled: bool) -> Any:
    """A tqdm bar, or ``None`` when disabled or tqdm is missing."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is part of the models extra
        return None
    return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def summary_text(results: Mapping[str, Any]) -> str:
    """The one-screen text summary of a finished run (from its ``results.json`` dict)."""
    config = results["config"]
    test, val = results["test"], results["val"]
    lines = [
        f"{config['method']} | {config['dataset']} {config['backbone']} {config['fusion']} | "
        f"fold {config['fold']} seed {results['seed']} | {results['device']}",
        f"epochs run {results['epochs_run']} (best {results['best_epoch']}), steps "
        f"{results['steps']}, {results['wall_time_s']:.1f} s"
        + (", stopped early" if results.get("stopped_early") else ""),
        f"{'':<12}{'val acc':>9}{'test acc':>10}{'test ECE':>10}{'test loss':>11}",
        f"{'fused':<12}{_fmt(val['fused']['accuracy']):>9}{_fmt(test['fused']['accuracy']):>10}"
        f"{_fmt(test['fused']['ece']):>10}{_fmt(test['fused']['loss']):>11}",
    ]
    for name in results["modalities"]:
        for kind in ("probe", "head"):
            if f"{kind}_accuracy" in test.get(name, {}):
                lines.append(
                    f"{name + ' ' + kind:<12}"
                    f"{_fmt(val[name].get(f'{kind}_accuracy')):>9}"
                    f"{_fmt(test[name][f'{kind}_accuracy']):>10}"
                    f"{_fmt(test[name][f'{kind}_ece']):>10}{_fmt(test[name][f'{kind}_loss']):>11}"
                )
    if "accuracy_complete" in test["fused"]:
        fused = test["fused"]
        lines.append(
            f"test fused accuracy on {fused['complete']} complete samples "
            f"{_fmt(fused['accuracy_complete'])}, on {fused['incomplete']} with a modality "
            f"missing {_fmt(fused['accuracy_incomplete'])}"
        )
    left_out = {
        split: n["left_out"] for split, n in results.get("data", {}).items() if n["left_out"]
    }
    if left_out:
        lines.append(
            "clips of the split missing from the prepared data (left out): "
            + ", ".join(f"{split} {count}" for split, count in left_out.items())
        )
    coefficients = results.get("final_coefficients") or {}
    if coefficients:
        lines.append(
            "final coefficients (mean of the last epoch): "
            + ", ".join(f"{n} {v:.3f}" for n, v in coefficients.items())
        )
    lines.append(f"outputs: {results['output_dir']}")
    return "\n".join(lines)


def write_outputs(
    out: Path,
    results: dict[str, Any],
    history: torch.Tensor,
    epochs: list[dict[str, Any]],
    *,
    verbose: bool,
) -> None:
    """Write a finished run's plots, ``history.csv``, ``results.json`` and ``summary.txt``.

    ``results["plots"]`` gets the names of the plots written; with ``verbose`` the summary is
    printed.
    """
    config, names = results["config"], results["modalities"]
    title = f"{config['method']} on {config['dataset']}: coefficients k and scores per step"
    results["plots"] = write_plots(out, history, epochs, names, title) if config["plots"] else []
    if history.shape[0]:
        write_history_csv(history, names, out / "history.csv")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    text = summary_text(results)
    (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
    if verbose:
        print(text)
