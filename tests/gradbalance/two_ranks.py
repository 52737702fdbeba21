"""Run a two-rank worker script once per test session and read both ranks' results.

The worker (``python WORKER OUT_DIR``) spawns two gloo ranks that each save
``OUT_DIR/rank{r}.pt``; a file lock lets every pytest-xdist worker share one run (also
without pytest-xdist: ``-p no:xdist``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from filelock import FileLock

HERE = Path(__file__).resolve().parent


def run_once(tmp_path_factory, request, worker: str) -> tuple[dict, dict]:
    """Both ranks' results of ``worker`` (a script beside this file), computed once."""
    base = tmp_path_factory.getbasetemp()
    under_xdist = hasattr(request.config, "workerinput")
    shared = (base.parent if under_xdist else base) / f"gradbalance-{Path(worker).stem}"
    shared.mkdir(exist_ok=True)
    with FileLock(str(shared / "lock")):
        if not (shared / "rank1.pt").exists():
            done = subprocess.run(
                [sys.executable, str(HERE / worker), str(shared)],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stdout + done.stderr
    return tuple(torch.load(shared / f"rank{r}.pt", weights_only=False) for r in (0, 1))


def result(ranks: tuple[dict, dict], key: str) -> tuple[dict, dict]:
    """Scenario ``key`` of both ranks; a scenario that raised fails with its traceback."""
    first, second = ranks[0][key], ranks[1][key]
    for found in (first, second):
        assert "error" not in found, found["error"]
    return first, second
