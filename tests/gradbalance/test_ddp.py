"""DistributedDataParallel on 2 gloo processes (CPU): replicas stay bitwise identical.

One run of ``tests/ddp_worker.py`` (two spawned ranks, every scenario) per test session; the
tests below read its results. Each balancer of ``balancer_factories.ALL_FACTORIES`` (the
regression variants included) trains 5 steps with different initial values per rank and
unequal per-rank batch sizes, with ``sync="global"`` and ``sync="local"``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from balancer_factories import ALL_FACTORIES, factory_params
from conftest import MultiTowerNet
from ddp_worker import global_batch
from two_ranks import result, run_once

import gradbalance as gb

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent.parent / "examples" / "ddp_train.py"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def ranks(tmp_path_factory, request) -> tuple[dict, dict]:
    """Both ranks' results; computed once even when pytest-xdist runs several workers (and
    also without pytest-xdist: ``-p no:xdist``)."""
    return run_once(tmp_path_factory, request, "ddp_worker.py")


@pytest.mark.parametrize("sync", ["global", "local"])
@pytest.mark.parametrize("name", factory_params(regression=True))
def test_replicas_stay_bitwise_identical(ranks, name, sync):
    first, second = result(ranks, f"{name}-{sync}")
    assert torch.equal(first["parameters"], second["parameters"])
    assert first["history"] == second["history"] == 5
    if sync == "global":
        # Every rank computed the same coefficients at every step, and holds the same state.
        assert torch.equal(first["coefficients"], second["coefficients"])
        assert torch.equal(first["state"], second["state"])


def test_local_sync_uses_each_ranks_own_coefficients(ranks):
    first, second = result(ranks, "mlb-local")
    assert not torch.equal(first["coefficients"], second["coefficients"])
    assert torch.equal(first["parameters"], second["parameters"])


@pytest.mark.parametrize("name", factory_params(regression=True))
def test_global_statistics_equal_one_process_on_the_concatenated_batch(ranks, name):
    """Step 0 from rank 0's initial state (DDP broadcasts it): same scores and coefficients."""
    first, second = result(ranks, f"{name}-global")
    model_state, balancer_state = first["init"]
    model = MultiTowerNet((5, 7))
    model.load_state_dict(model_state)
    bal = ALL_FACTORIES[name](model)
    bal.load_state_dict(balancer_state)
    inputs, target = global_batch(0, name)
    bal.loss(model(*inputs), target).backward()
    expected_k = torch.stack(list(bal.coefficients.values()))
    expected_s = torch.stack(list(bal.scores.values()))
    for rank in (first, second):
        torch.testing.assert_close(rank["coefficients"][0], expected_k, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank["scores"][0], expected_s, rtol=1e-5, atol=1e-6)


def test_lazy_heads_start_equal_on_every_rank(ranks):
    first, second = result(ranks, "mlb-lazy-heads")
    assert torch.equal(first["state"], second["state"])


def test_gradient_accumulation_with_no_sync(ranks):
    first, second = result(ranks, "accumulate")
    assert torch.equal(first["state"], second["state"])


def test_nonfinite_step_is_skipped_on_every_rank(ranks):
    """Rank 1 alone sees a NaN: with nonfinite="skip" both ranks skip the step alike."""
    first, second = result(ranks, "skip-nonfinite")
    for rank in (first, second):
        assert rank["finite"] == [True, True, False, True]
        assert rank["nonfinite_steps"] == 1
        assert rank["history"] == 3
        assert torch.equal(rank["coefficients"][2], rank["coefficients"][1])
        assert torch.isfinite(rank["state"]).all()
    assert torch.equal(first["coefficients"], second["coefficients"])
    assert torch.equal(first["state"], second["state"])


def test_reduce_mean_equals_the_concatenated_batch(ranks):
    """``Balancer.reduce_mean``: what a method calls to reduce its per-modality statistics."""
    first, second = result(ranks, "reduce-mean")
    sums = torch.arange(6.0).reshape(3, 2)
    expected = (sums * 1 + sums * 2) / (torch.tensor([[1.0], [2.0], [3.0]]) * 2 + 1)
    for rank in (first, second):
        torch.testing.assert_close(rank["mean"], expected)
        torch.testing.assert_close(rank["scalar"], (sums * 3) / 5)
        torch.testing.assert_close(rank["summed"], sums * 1 + sums * 2)
        torch.testing.assert_close(rank["averaged"], torch.tensor([[1.5], [2.5], [3.5]]))


def test_balancer_inside_the_ddp_module(ranks):
    """Lightning / HF Trainer pattern: DDP syncs the heads, the balancer sees it."""
    first, second = result(ranks, "inside-ddp")
    assert first["heads_in_ddp"] and second["heads_in_ddp"]
    assert torch.equal(first["parameters"], second["parameters"])


def test_ddp_before_the_balancer_is_refused(ranks):
    first, second = result(ranks, "wrong-order")
    for rank in (first, second):
        assert "Create the balancer on the plain model first" in rank["construct"]
        assert "wrapped in DistributedDataParallel before the balancer" in rank["forward"]
        assert "model = DDP(model); model = torch.compile(model)" in rank["forward"]


def test_data_parallel_is_refused(two_tower):
    with pytest.raises(ValueError, match="nn.DataParallel is not supported"):
        gb.MLB(torch.nn.DataParallel(two_tower), list(two_tower.towers), num_classes=4)


def test_data_parallel_after_the_balancer_is_refused(two_tower):
    """DataParallel runs replicas (``_is_replica``) in threads; CPU-only DP runs none, so the
    replica is simulated as DataParallel.replicate marks it."""
    bal = gb.MLB(two_tower, list(two_tower.towers), num_classes=4)
    two_tower.towers[0]._is_replica = True
    with pytest.raises(RuntimeError, match="nn.DataParallel is not supported"):
        two_tower(torch.randn(2, 5), torch.randn(2, 7))
    bal.remove()


def test_sync_option_is_checked(two_tower):
    with pytest.raises(ValueError, match="sync must be one of"):
        gb.MLB(two_tower, list(two_tower.towers), num_classes=4, sync="all")


def test_example_runs_under_torchrun(tmp_path):
    checkpoint = tmp_path / "ddp.pt"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(EXAMPLE),
            "--epochs",
            "1",
            "--samples",
            "256",
            "--accumulate",
            "2",
            "--checkpoint",
            str(checkpoint),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "replicas identical: True" in done.stdout
    state = torch.load(checkpoint, weights_only=False)
    assert set(state) == {"model", "balancer", "optimizer"}
