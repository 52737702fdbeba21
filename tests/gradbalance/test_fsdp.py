"""FSDP2 (``fully_shard``) on 2 gloo processes (CPU): the same k and parameters as one process.

One run of ``tests/gradbalance/fsdp_worker.py`` (two spawned ranks, every scenario) per test
session; the tests below read its results. The balancer is built on the plain model, then
``fully_shard`` wraps each encoder and the model, then the optimizer is built. Each rank sees
half of every step's batch; the reference is one process on the concatenated batch, from the
same initial values. Coefficients agree bitwise between the ranks (they all-reduce the same
statistics); against one process they differ only by the order of the sums (two half-batch
sums all-reduced instead of one sum over the batch, FSDP's reduce-scatter of two half-batch
gradients instead of one gradient): float32 rounding, ``rtol=1e-5, atol=1e-6``.
"""

from __future__ import annotations

import pytest
import torch
from fsdp_worker import METHODS, reference
from two_ranks import result, run_once

pytestmark = pytest.mark.slow

ROUNDING = {"rtol": 1e-5, "atol": 1e-6}
"""float32 sums in another order (see the module docstring)."""
BF16 = {"rtol": 0.0, "atol": 2e-2}
"""bf16 compute (MixedPrecisionPolicy) against the float32 process: bf16 keeps 8 bits of
mantissa (relative step 2**-8 ~ 4e-3), accumulated over 5 steps."""


@pytest.fixture(scope="session")
def ranks(tmp_path_factory, request) -> tuple[dict, dict]:
    """Both ranks' results; computed once even when pytest-xdist runs several workers."""
    return run_once(tmp_path_factory, request, "fsdp_worker.py")


def assert_ranks_agree(first, second):
    """Every rank holds the same k at every step and, gathered, the same parameters."""
    assert first["sharded"] and second["sharded"]
    assert torch.equal(first["coefficients"], second["coefficients"])
    assert torch.equal(first["scores"], second["scores"])
    assert torch.equal(first["parameters"], second["parameters"])


@pytest.mark.parametrize("name", METHODS)
def test_fsdp2_equals_one_process_on_the_concatenated_batch(ranks, name):
    first, second = result(ranks, name)
    assert_ranks_agree(first, second)
    expected = reference(name)
    torch.testing.assert_close(first["coefficients"], expected["coefficients"], **ROUNDING)
    torch.testing.assert_close(first["parameters"], expected["parameters"], **ROUNDING)


def test_root_resharded_after_forward(ranks):
    """``reshard_after_forward=True`` on every module, the root included: MLB reads only
    the encoders' outputs and its own heads, so it is unaffected."""
    first, second = result(ranks, "mlb-reshard-root")
    assert_ranks_agree(first, second)
    expected = reference("mlb")
    torch.testing.assert_close(first["coefficients"], expected["coefficients"], **ROUNDING)
    torch.testing.assert_close(first["parameters"], expected["parameters"], **ROUNDING)


def test_bf16_mixed_precision_policy(ranks):
    """``MixedPrecisionPolicy(param_dtype=bfloat16)``: the statistics stay float32 and close
    to the float32 process."""
    first, second = result(ranks, "mlb-bf16-params")
    assert_ranks_agree(first, second)
    assert first["scores"].dtype == first["coefficients"].dtype == torch.float32
    expected = reference("mlb")
    torch.testing.assert_close(first["coefficients"], expected["coefficients"], **BF16)
    torch.testing.assert_close(first["parameters"], expected["parameters"], **BF16)


def test_fused_head_resharded_before_loss_is_refused(ranks):
    """OGM reads the fused head's weights in ``loss()``: resharded there, a clear error."""
    for rank in result(ranks, "ogm-reshard-root"):
        assert rank["type"] == "OrderError"
        assert "fusion_head holds parameters sharded by FSDP2" in rank["message"]
        assert "reshard_after_forward=False" in rank["message"]


def test_per_parameter_scaling_is_refused(ranks):
    """Gradient hooks sit on the parameters fully_shard replaces: refused, not ignored."""
    for rank in result(ranks, "ogm-per-parameter"):
        assert rank["type"] == "OrderError"
        assert "Per-parameter scaling is not supported under fully_shard" in rank["message"]


def test_optimizer_without_the_heads_is_refused(ranks):
    """The watch of optimizer steps follows the sharded parameters fully_shard registers."""
    for rank in result(ranks, "optimizer-without-heads"):
        assert rank["type"] == "OrderError"
        assert "no optimizer updates the balancer's heads" in rank["message"]


@pytest.mark.parametrize("name", ["amss", "inforeg"])
def test_gradient_changing_methods_refuse_a_model_sharded_after_them(ranks, name):
    """AMSS masks and InfoReg pulls the gradients of the parameters they chose; fully_shard
    replaces those parameters: refused at the next training step, not worked on stale ones."""
    for rank in result(ranks, f"{name}-after-balancer"):
        assert rank["type"] == "OrderError"
        assert "fully_shard" in rank["message"] or "new parameter objects" in rank["message"]
