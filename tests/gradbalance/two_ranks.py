"""Run a two-rank worker script once per test session and read both ranks' results.

The worker (``python WORKER OUT_DIR``) calls :func:`serve`: two spawned gloo ranks run its
jobs and each saves ``OUT_DIR/rank{r}.pt``. In the tests, :func:`run_once` starts it under a
file lock, so every pytest-xdist worker shares one run (also without pytest-xdist:
``-p no:xdist``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from filelock import FileLock

Jobs = Callable[[int], list[tuple[str, Callable[[], Any]]]]
"""A rank's named jobs: ``jobs(rank) -> [(key, job), ...]``, the same keys on every rank."""

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


def serve(jobs: Jobs) -> None:
    """A worker script's entry: two ranks, spawned (never forked: importing torch has already
    started threads here), each saving ``{key: job() or {"error": traceback}}``."""
    mp.start_processes(_rank, args=(jobs, sys.argv[1]), nprocs=2, join=True, start_method="spawn")


def _rank(rank: int, jobs: Jobs, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(out_dir, 'store')}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=60),
    )
    results: dict = {}
    for key, job in jobs(rank):
        try:
            results[key] = job()
        except Exception:  # recorded for the test to report
            results[key] = {"error": traceback.format_exc()}
        dist.barrier()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # no rank tears its connections down while another still uses them
    dist.destroy_process_group()
