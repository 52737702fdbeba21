"""The appendix's Figure 7: each method's coefficient per encoder over the training steps.

Runs of the training harness write their per-step coefficients to ``history.csv``
(``step,k_<modality>...,score_<modality>...``); :func:`plot_coefficients` draws one panel per
encoder with one smoothed curve per method, each method in its own colour
(:data:`METHOD_COLOURS`, shared by the demo and ``python -m benchmarks.figure7``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["METHOD_COLOURS", "mean_curve", "plot_coefficients", "read_history", "smooth"]

METHOD_COLOURS: dict[str, str] = {
    "mlb": "C0",
    "ogm": "C1",
    "agm": "C2",
    "mslr": "C3",
    "ogm_ge": "C4",
    "joint": "C5",
    "multiloss": "C6",
    "pmr": "C7",
    "mmcosine": "C8",
    "cggm": "C9",
    "inforeg": "black",
    "amss": "olive",
    "amss_plus": "teal",
    "opm": "navy",
}
"""Matplotlib colour of each method's curve (the demo's: MLB blue, OGM orange, AGM green,
MSLR red)."""


def read_history(path: Path) -> dict[str, list[float]]:
    """The columns of a run's ``history.csv`` by header name; ``{}`` when there is none."""
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    names = lines[0].split(",")
    columns: dict[str, list[float]] = {name: [] for name in names}
    for line in lines[1:]:
        for name, value in zip(names, line.split(",")):
            columns[name].append(float(value))
    return columns


def smooth(values: Sequence[float], kernel: int) -> list[float]:
    """Moving average over ``kernel`` points (edges replicated); fewer points: unchanged.

    Example:
        >>> smooth([0.0, 0.0, 3.0, 0.0, 0.0], 3)
        [0.0, 1.0, 1.0, 1.0, 0.0]
    """
    if len(values) < kernel or kernel < 2:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    weights = torch.ones(kernel, dtype=torch.float64) / kernel
    padded = torch.nn.functional.pad(
        tensor[None, None], (kernel // 2, kernel - 1 - kernel // 2), mode="replicate"
    )
    return torch.nn.functional.conv1d(padded, weights[None, None])[0, 0].tolist()


def mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    """The step-wise mean of several runs' curves, over the steps all of them have.

    Example:
        >>> mean_curve([[1.0, 2.0, 3.0], [3.0, 4.0]])
        [2.0, 3.0]
    """
    length = min(len(curve) for curve in curves)
    return torch.tensor([list(curve[:length]) for curve in curves]).mean(dim=0).tolist()


def plot_coefficients(
    curves: dict[str, tuple[str, dict[str, list[float]]]],
    path: Path,
    *,
    kernel: int,
    modalities: Sequence[str] = ("audio", "video"),
    title: str = "coefficient k (smoothed)",
) -> Path | None:
    """Draw Figure 7: one panel per encoder, one curve per entry of ``curves``.

    Args:
        curves: ``{label: (method, history columns)}``; the method picks the colour.
        path: the PNG written.
        kernel: moving-average width in steps.
        modalities: one panel each, from the ``k_<modality>`` columns.
        title: the panels' title after the encoder's name.

    Returns:
        ``path``, or ``None`` when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - plot extra missing
        return None
    fig, axes = plt.subplots(1, len(modalities), figsize=(5.5 * len(modalities), 4), sharey=True)
    for axis, modality in zip(list(axes) if len(modalities) > 1 else [axes], modalities):
        for label, (method, columns) in curves.items():
            values = columns.get(f"k_{modality}")
            if values:
                axis.plot(smooth(values, kernel), label=label, color=METHOD_COLOURS.get(method))
        axis.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        axis.set_title(f"{modality} encoder: {title}")
        axis.set_xlabel("training step")
    first = axes[0] if len(modalities) > 1 else axes
    first.set_ylabel("k")
    first.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
