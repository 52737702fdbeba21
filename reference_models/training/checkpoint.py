"""Checkpoints of a run: atomic saves, random state, module state, resume checks."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from reference_models.training.config import RESUMABLE_CHANGES, TrainConfig
from reference_models.training.step import RunState

__all__ = [
    "atomic_save",
    "check_resumable",
    "load_modules",
    "modules_state",
    "rng_state",
    "set_rng_state",
]


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename it: a crash never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """The global random states: torch (CPU and every CUDA device) and Python."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def modules_state(state: RunState) -> dict[str, Any]:
    """The state dicts of the model, the balancer and the probes."""
    return {
        "model": state.model.state_dict(),
        "balancer": None if state.balancer is None else state.balancer.state_dict(),
        "probes": state.probes.state_dict(),
    }


def load_modules(state: RunState, saved: Mapping[str, Any]) -> None:
    """Load what :func:`modules_state` returned."""
    state.model.load_state_dict(saved["model"])
    if state.balancer is not None and saved.get("balancer") is not None:
        state.balancer.load_state_dict(saved["balancer"])
    state.probes.load_state_dict(saved["probes"])


def check_resumable(saved: Mapping[str, Any], config: TrainConfig) -> None:
    """Refuse to resume a checkpoint made with other settings than ``config``.

    The saved configuration is completed with the current defaults first, so checkpoints
    written before a field existed still resume.
    """
    saved = TrainConfig.from_dict(saved).to_dict()
    current = config.to_dict()
    different = sorted(
        key
        for key in set(saved) | set(current)
        if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key)
    )
    if different:
        raise ValueError(
            f"cannot resume {config.output_dir}: its checkpoint was made with other settings "
            f"({', '.join(f'{k}: {saved.get(k)!r} -> {current.get(k)!r}' for k in different)}); "
            "use another --out or the same settings"
        )
