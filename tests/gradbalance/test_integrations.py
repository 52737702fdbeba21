"""The Lightning and Hugging Face Trainer examples run (when the package is installed).

Neither takes over the loop: Lightning with automatic optimisation, the HF ``Trainer`` with a
``compute_loss`` override. Gradient accumulation is on in both, checkpoints hold the
balancer's state, and evaluation leaves the coefficients alone.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(autouse=True)
def examples_importable(monkeypatch):
    """The examples import their shared toy problem from their own folder, as scripts do."""
    monkeypatch.syspath_prepend(str(EXAMPLES))


pytestmark = pytest.mark.slow


def test_lightning_module_with_automatic_optimisation(tmp_path):
    # Part of the dev extra (pinned in constraints.txt): a missing install fails, never skips.
    import pytorch_lightning  # noqa: F401

    example = runpy.run_path(str(EXAMPLES / "lightning_module.py"))
    trainer, module = example["main"](
        max_epochs=1, limit_train_batches=4, limit_val_batches=1, accumulate_grad_batches=2
    )
    bal = module.balancer
    assert module.automatic_optimization
    assert trainer.global_step == 2  # optimizer steps: 4 micro-batches / 2
    assert bal.steps == 4  # one balanced loss per micro-batch; validation is not a step
    assert len(bal.history["audio"]["coefficients"]) == 4
    assert any(abs(float(k) - 1) > 1e-3 for k in bal.coefficients.values())

    path = tmp_path / "lightning.ckpt"
    trainer.save_checkpoint(path)
    restored = example["BalancedModule"].load_from_checkpoint(path)
    assert restored.balancer.steps == 4
    for key, value in bal.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, restored.balancer.state_dict()[key]), key


def test_hugging_face_trainer_compute_loss(tmp_path):
    # Part of the dev extra (pinned in constraints.txt): a missing install fails, never skips.
    import accelerate  # noqa: F401
    import transformers  # noqa: F401

    example = runpy.run_path(str(EXAMPLES / "hf_trainer.py"))
    trainer, bal = example["main"](
        str(tmp_path),
        max_steps=3,
        gradient_accumulation_steps=2,
        save_strategy="steps",
        save_steps=3,
    )
    assert trainer.state.global_step == 3
    assert bal.steps == 6  # micro-batches; the evaluation after training is not a step
    assert any(abs(float(k) - 1) > 1e-3 for k in bal.coefficients.values())
    saved = torch.load(tmp_path / "checkpoint-3" / "balancer.pt", weights_only=False)
    assert saved["_extra_state"]["steps"] == 6
    head = bal.heads["audio"].weight
    assert any(p is head for group in trainer.optimizer.param_groups for p in group["params"])
