"""Accelerate and Lightning DDP on 2 CPU processes: replicas bitwise equal, the one-process k.

Each launcher runs once per test session (a FileLock lets pytest-xdist workers share the
run); every process saves its batches, its coefficients at every step and its final
parameters. The reference is one process on the concatenated batches (rank 0's samples
first), from the same initial values: the coefficients agree bitwise between the processes
(they all-reduce the same statistics); against one process they differ only by the order of
the sums (two half-batch sums all-reduced, DDP's mean of two half-batch gradients): float32
rounding.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.slow

ROUNDING = {"rtol": 1e-5, "atol": 1e-6}
"""float32 sums in another order (see the module docstring)."""

OFFLINE = {
    "CUDA_VISIBLE_DEVICES": "",  # never a GPU
    "HF_HUB_OFFLINE": "1",  # never the network
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PYTHONPATH": os.pathsep.join([str(EXAMPLES), str(ROOT)]),
}


@pytest.fixture
def examples_importable(monkeypatch):
    """The examples import their toy model (``toy_audio_visual``) from their own folder."""
    monkeypatch.syspath_prepend(str(EXAMPLES))


def run_once(tmp_path_factory, request, name: str, command: list[str]) -> tuple[dict, dict]:
    """Run ``command`` (which writes ``OUT/rank{0,1}.pt``) once per session; both results."""
    base = tmp_path_factory.getbasetemp()
    under_xdist = hasattr(request.config, "workerinput")
    shared = (base.parent if under_xdist else base) / f"gradbalance-{name}"
    shared.mkdir(exist_ok=True)
    out = shared / "out"
    with FileLock(str(shared / "lock")):
        if not (out / "rank1.pt").exists():
            out.mkdir(exist_ok=True)
            done = subprocess.run(
                [*command, str(out)],
                capture_output=True,
                text=True,
                timeout=300,
                env={**os.environ, **OFFLINE},
                cwd=shared,
            )
            assert done.returncode == 0, done.stdout + done.stderr
    return tuple(torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))


def concatenated(first: dict, second: dict) -> list[list[torch.Tensor]]:
    """Each step's global batch: rank 0's samples, then rank 1's."""
    return [
        [torch.cat([a, b]) for a, b in zip(one, two)]
        for one, two in zip(first["batches"], second["batches"])
    ]


def assert_replicas_equal(first: dict, second: dict) -> None:
    assert torch.equal(first["parameters"], second["parameters"])
    assert torch.equal(first["coefficients"], second["coefficients"])
    # Each process saw its own samples (not a copy of the other's).
    assert not torch.equal(first["batches"][0][0], second["batches"][0][0])


@pytest.fixture(scope="session")
def accelerate_ranks(tmp_path_factory, request):
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",  # with --cpu below: two gloo processes (torchrun), no GPU
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        str(EXAMPLES / "accelerate_train.py"),
        "--cpu",
        "--out",
    ]
    return run_once(tmp_path_factory, request, "accelerate", command)


def test_accelerate_replicas_equal_and_one_process_k(accelerate_ranks, examples_importable):
    first, second = accelerate_ranks
    assert_replicas_equal(first, second)
    example = runpy.run_path(str(EXAMPLES / "accelerate_train.py"))
    model, bal, opt = example["build"](torch.device("cpu"))
    coefficients = []
    for batch in concatenated(first, second):
        example["train_step"](model, bal, opt, batch)
        coefficients.append(torch.stack(list(bal.coefficients.values())))
    parameters = torch.cat([p.detach().reshape(-1) for m in (model, bal) for p in m.parameters()])
    torch.testing.assert_close(first["coefficients"], torch.stack(coefficients), **ROUNDING)
    torch.testing.assert_close(first["parameters"], parameters, **ROUNDING)


@pytest.fixture(scope="session")
def lightning_ranks(tmp_path_factory, request):
    command = [sys.executable, str(HERE / "lightning_ddp_run.py")]
    return run_once(tmp_path_factory, request, "lightning-ddp", command)


def test_lightning_ddp_replicas_equal_and_one_process_k(lightning_ranks, examples_importable):
    import pytorch_lightning as pl

    first, second = lightning_ranks
    assert_replicas_equal(first, second)
    assert first["heads_in_ddp"] and second["heads_in_ddp"]  # DDP syncs the heads itself
    example = runpy.run_path(str(EXAMPLES / "lightning_module.py"))
    pl.seed_everything(0, verbose=False)
    module = example["BalancedModule"]()
    opt = module.configure_optimizers()
    coefficients = []
    for audio, video, y in concatenated(first, second):
        opt.zero_grad()
        module.balancer.loss(module.model(audio, video), y).backward()
        module.balancer.after_backward()
        opt.step()
        coefficients.append(torch.stack(list(module.balancer.coefficients.values())))
    parameters = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    torch.testing.assert_close(first["coefficients"], torch.stack(coefficients), **ROUNDING)
    torch.testing.assert_close(first["parameters"], parameters, **ROUNDING)
