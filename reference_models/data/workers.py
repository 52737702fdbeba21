"""Run jobs in worker processes that are safe after threads and survive a hung or crashed worker.

Every process pool of the project starts its workers with ``spawn``, never ``fork``. A forked
child inherits the parent's memory but only the forking thread: once PyAV (FFmpeg's slice
threads in libswscale), OpenCV or torch's intra-op pool has started threads in the parent, a
child that needs one of their locks or waits on one of them waits forever. ``spawn`` starts a
fresh interpreter, whatever the parent did before.

:func:`run_jobs` also bounds each job: a worker that exceeds ``timeout`` seconds on one job is
killed, a worker that dies (a crash in a decoder, the out-of-memory killer) is replaced, and
either way the job comes back as a :class:`JobFailure` naming the reason while the other jobs
go on. Nothing waits forever on a worker.
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

__all__ = ["DEFAULT_JOB_TIMEOUT", "JobFailure", "run_jobs"]

Job = TypeVar("Job")

DEFAULT_JOB_TIMEOUT = 600.0
"""Seconds a worker may spend on one job (a clip) before it is killed, unless told otherwise."""

_CONTEXT = multiprocessing.get_context("spawn")
_START_LIMIT = 300.0  # seconds a worker may take to import and initialise
_STOP_GRACE = 5.0  # seconds a worker gets to exit after the last job before it is killed


@dataclass(frozen=True)
class JobFailure:
    """A job that did not return: its worker timed out, died, or the function raised."""

    reason: str


def _serve(
    connection: Connection,
    function: Callable[..., Any],
    arguments: tuple[Any, ...],
    initializer: Callable[..., None] | None,
    initargs: tuple[Any, ...],
) -> None:
    """A worker's loop: initialise, say ready, then answer jobs until ``None`` arrives."""
    try:
        if initializer is not None:
            initializer(*initargs)
    except BaseException:
        connection.send(("init-error", traceback.format_exc()))
        return
    connection.send(("ready", None))
    while (job := connection.recv()) is not None:
        try:
            connection.send(("done", function(job, *arguments)))
        except Exception as error:  # reported as the job's failure; the worker goes on
            connection.send(("error", f"{type(error).__name__}: {error}"))


class _Worker:
    """One spawned process, its end of the pipe, and the job it is running (if any)."""

    def __init__(self, target_arguments: tuple[Any, ...]) -> None:
        self.connection, child = _CONTEXT.Pipe()
        self.process: BaseProcess = _CONTEXT.Process(
            target=_serve, args=(child, *target_arguments), daemon=True
        )
        self.process.start()
        child.close()
        self.ready = False
        self.job: Any = None
        self.deadline = time.monotonic() + _START_LIMIT  # to be ready; then one per job

    def give(self, job: Any, timeout: float) -> None:
        self.job, self.deadline = job, time.monotonic() + timeout
        try:
            self.connection.send(job)
        except OSError:  # the worker died just now: its sentinel reports the job as failed
            pass

    def take(self) -> Any:
        job, self.job, self.deadline = self.job, None, float("inf")
        return job

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.connection.close()


def _died(worker: _Worker) -> str:
    worker.process.join()
    return f"its worker process died (exit code {worker.process.exitcode})"


def run_jobs(
    function: Callable[..., Any],
    jobs: Sequence[Job],
    *,
    workers: int,
    timeout: float,
    arguments: tuple[Any, ...] = (),
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Iterator[tuple[Job, Any]]:
    """Yield ``(job, function(job, *arguments))`` for every job, in completion order.

    ``function``, ``initializer`` and every argument must be picklable (module-level
    functions): the workers are fresh ``spawn`` processes. ``initializer(*initargs)`` runs once
    in each worker before its first job.

    A job whose worker runs longer than ``timeout`` seconds on it, whose worker dies, or whose
    function raises yields a :class:`JobFailure` instead of a result; its worker is replaced
    and the remaining jobs run. Leaving the loop early (an exception, ``break``) kills every
    worker.

    Raises:
        RuntimeError: a worker could not start: ``initializer`` raised (its traceback is in the
            message), the process exited before it was ready, or it was not ready within
            5 minutes.
    """
    if workers < 1 or timeout <= 0:
        raise ValueError(f"need workers >= 1 and timeout > 0, got {workers} and {timeout}")
    pending = list(reversed(jobs))
    target_arguments = (function, arguments, initializer, initargs)
    pool = [_Worker(target_arguments) for _ in range(min(workers, len(pending)))]
    try:
        while pool:
            next_deadline = min(worker.deadline for worker in pool)
            ready = wait(
                [worker.connection for worker in pool] + [w.process.sentinel for w in pool],
                timeout=None
                if next_deadline == float("inf")
                else max(0.0, next_deadline - time.monotonic()),
            )
            for worker in list(pool):
                outcome = _collect(worker, ready, timeout)
                if outcome is not None:
                    yield outcome
                if worker.job is not None:
                    continue
                if worker.process.is_alive() and worker.ready and pending:
                    worker.give(pending.pop(), timeout)
                elif worker.process.is_alive() and worker.ready:
                    worker.connection.send(None)
                    worker.process.join(_STOP_GRACE)
                    worker.kill()
                    pool.remove(worker)
                elif not worker.process.is_alive():
                    worker.kill()
                    pool.remove(worker)
                    if pending:
                        pool.append(_Worker(target_arguments))
    finally:
        for worker in pool:
            worker.kill()


def _collect(worker: _Worker, ready: list[Any], timeout: float) -> tuple[Any, Any] | None:
    """The finished job of ``worker`` (result or failure), if any; kills a timed-out worker."""
    if worker.connection in ready:
        try:
            kind, value = worker.connection.recv()
        except (EOFError, OSError):
            return (worker.take(), JobFailure(_died(worker))) if worker.job is not None else None
        if kind == "init-error":
            raise RuntimeError(f"a worker process failed to start:\n{value}")
        if kind == "ready":
            worker.ready, worker.deadline = True, float("inf")
            return None
        return worker.take(), value if kind == "done" else JobFailure(value)
    if not worker.ready and (not worker.process.is_alive() or time.monotonic() >= worker.deadline):
        worker.kill()
        raise RuntimeError(
            f"a worker process did not start within {_START_LIMIT:g} s "
            f"(exit code {worker.process.exitcode}); run with workers=1 to see the error here"
        )
    if worker.job is not None and not worker.process.is_alive():
        return worker.take(), JobFailure(_died(worker))
    if worker.job is not None and time.monotonic() >= worker.deadline:
        worker.kill()
        return worker.take(), JobFailure(f"timed out after {timeout:g} s (its worker was killed)")
    return None
