"""Missing modalities under DistributedDataParallel (2 gloo processes on the CPU).

One run of ``missing_ddp_worker.py`` per session: every entry of ``ALL_FACTORIES`` trains with
uneven presence (rank 0 lacks the second modality in every sample, rank 1 in some; at step 1
no rank has it). With ``sync="global"`` the per-modality counts ride in the statistics'
all-reduce, so the coefficients, scores and the heads' averaged gradients equal one process
on the concatenated batch and mask; the modality absent from the global batch keeps its k.
``test_missing_methods.py`` checks its methods with :func:`check_one_process`.
"""

from __future__ import annotations

import pytest
import torch
from balancer_factories import ALL_FACTORIES
from conftest import MultiTowerNet
from ddp_worker import global_batch
from missing_cases import CORE
from missing_ddp_worker import global_mask, head_gradients
from two_ranks import result, run_once

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def missing_ranks(tmp_path_factory, request) -> tuple[dict, dict]:
    return run_once(tmp_path_factory, request, "missing_ddp_worker.py")


def check_one_process(ranks: tuple[dict, dict], name: str) -> None:
    """Step 0 of entry ``name`` on both ranks equals one process on the concatenated batch
    (coefficients, scores, heads' gradients); step 1 keeps the absent modality's k."""
    first, second = result(ranks, f"{name}-global")
    model_state, balancer_state = first["init"]
    model = MultiTowerNet((5, 7))
    model.load_state_dict(model_state)
    bal = ALL_FACTORIES[name](model)
    bal.load_state_dict(balancer_state)
    inputs, target = global_batch(0, name)
    bal.loss(model(*inputs), target, present=global_mask(0)).backward()
    bal.after_backward()
    for rank in (first, second):
        torch.testing.assert_close(rank["coefficients"][0], bal.last_coefficients)
        torch.testing.assert_close(rank["scores"][0], bal.last_scores)
        torch.testing.assert_close(rank["head_gradients"][0], head_gradients(bal))
        assert rank["coefficients"][1][1] == rank["coefficients"][0][1]
        assert rank["scores"][1][1] == rank["scores"][0][1]
    assert torch.equal(first["coefficients"], second["coefficients"])


@pytest.mark.parametrize("name", CORE)
def test_uneven_presence_equals_one_process_on_the_concatenated_batch(missing_ranks, name):
    check_one_process(missing_ranks, name)


@pytest.mark.parametrize("sync", ["global", "local"])
@pytest.mark.parametrize("name", list(ALL_FACTORIES))
def test_replicas_stay_bitwise_identical_with_uneven_presence(missing_ranks, name, sync):
    first, second = result(missing_ranks, f"{name}-{sync}")
    assert torch.equal(first["parameters"], second["parameters"])
    assert torch.isfinite(first["coefficients"]).all() and torch.isfinite(first["scores"]).all()
