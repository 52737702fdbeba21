"""Module-level jobs for the worker-pool tests (spawned workers import them by name)."""

from __future__ import annotations

import os
import time

_offset = 0


def set_offset(offset: int) -> None:
    global _offset
    _offset = offset


def fail_to_start() -> None:
    raise ValueError("bad weights")


def work(job: str, scale: int = 1) -> str | int:
    """``"hang"`` sleeps forever, ``"crash"`` kills its process, ``"raise"`` raises; else int."""
    if job == "hang":
        time.sleep(3600)
    if job == "crash":
        os._exit(3)
    if job == "raise":
        raise OSError("corrupt input")
    return int(job) * scale + _offset
