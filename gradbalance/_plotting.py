"""Matplotlib, imported only when a figure is asked for (the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot(caller: str) -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend.

    Raises:
        ImportError: matplotlib is not installed; the message names ``caller`` and the extra.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError(f"{caller} needs matplotlib: pip install 'gradbalance[plot]'") from error
    return plt


def save_figure(plt: Any, fig: Any, path: str | Path) -> Path:
    """Lay out ``fig``, write it to ``path`` as a PNG (creating the folder) and close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
