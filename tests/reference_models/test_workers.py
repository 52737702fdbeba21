"""run_jobs: spawned workers, a bounded time per job, crashed and hung workers replaced."""

from __future__ import annotations

import time

import pytest
import worker_jobs

from reference_models.data.workers import JobFailure, run_jobs

pytestmark = pytest.mark.slow  # each test starts spawned workers (seconds each)


def outcomes(jobs, **options):
    return dict(run_jobs(worker_jobs.work, jobs, **options))


def test_every_job_runs_once_with_its_arguments_and_the_initializer():
    jobs = [str(n) for n in range(7)]
    results = outcomes(
        jobs,
        workers=2,
        timeout=60,
        arguments=(10,),
        initializer=worker_jobs.set_offset,
        initargs=(1,),
    )
    assert results == {job: int(job) * 10 + 1 for job in jobs}


def test_a_hung_a_crashed_and_a_raising_job_fail_by_name_while_the_others_complete():
    jobs = ["1", "hang", "2", "crash", "3", "raise", "4"]
    start = time.monotonic()
    results = outcomes(jobs, workers=2, timeout=4)
    elapsed = time.monotonic() - start
    assert {job: results[job] for job in ("1", "2", "3", "4")} == {"1": 1, "2": 2, "3": 3, "4": 4}
    assert results["hang"] == JobFailure("timed out after 4 s (its worker was killed)")
    assert results["crash"] == JobFailure("its worker process died (exit code 3)")
    assert results["raise"] == JobFailure("OSError: corrupt input")
    assert elapsed < 60  # the hung worker was killed, not waited for


def test_a_failing_initializer_is_a_clear_error_not_a_hang():
    with pytest.raises(RuntimeError, match="failed to start(.|\n)*ValueError: bad weights"):
        outcomes(["1", "2"], workers=2, timeout=60, initializer=worker_jobs.fail_to_start)


def test_leaving_the_loop_early_kills_every_worker():
    jobs = run_jobs(worker_jobs.work, ["1", "hang", "hang"], workers=3, timeout=600)
    job, result = next(jobs)
    assert (job, result) == ("1", 1)
    start = time.monotonic()
    jobs.close()
    assert time.monotonic() - start < 10


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="workers >= 1"):
        outcomes(["1"], workers=0, timeout=1)
