"""Matplotlib, imported only when a figure is asked for (the ``plot`` extra)."""

from __future__ import annotations

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
