"""Lifecycle contracts off the happy path, for every method of ``gb.METHODS``: encoders in eval
mode, the balancer's own train/eval switch, copies and pickles of a module that holds the
balancer, the history across a checkpoint, a misspelt option, and the Trainer's predictions."""

from __future__ import annotations

import copy
import io
import os
import runpy
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from balancer_factories import (
    FACTORIES,
    INPUT_DIMS,
    NUM_CLASSES,
    factory_params,
    flat_parameters,
    make_batch_for,
    train_step,
)
from contract_models import TowerNet, footprint
from torch import nn
from torch.optim.swa_utils import AveragedModel

import gradbalance as gb
import gradbalance._state

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

COPYABLE = {"agm": lambda model: {"fusion": model.fusion, "feature_dims": [12, 12]}}
"""Options that make a method's every callable part of the model (a module, not a closure):
``copy.deepcopy`` copies modules but shares functions, and pickling refuses closures."""


def build(name, seed=0, **options):
    torch.manual_seed(seed)
    model = TowerNet(INPUT_DIMS)
    extra = COPYABLE.get(name, lambda _: {})(model)
    bal = FACTORIES[name](model, **{**extra, **options})
    return model, bal


def optimizer(model, bal):
    return torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)


def run(model, bal, seeds):
    """Ordinary training steps (a fresh SGD: it keeps no state between steps)."""
    opt = optimizer(model, bal)
    for seed in seeds:
        train_step(model, bal, opt, *make_batch_for("mlb", INPUT_DIMS, seed=seed))


def snapshot(model, bal):
    """What a training run produces: parameters, coefficients, history, counters."""
    history = bal.history
    table = torch.stack([history[n][q] for n in bal.names for q in ("coefficients", "scores")])
    return {
        "parameters": flat_parameters(model, bal),
        "coefficients": bal.last_coefficients.clone(),
        "scores": bal.last_scores.clone(),
        "history": table,
        "history_steps": history.steps.clone(),
        "steps": torch.tensor(bal.steps),
    }


def assert_same_run(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


# --- row 3: an encoder's train/eval mode never changes a training step -----------------------


def set_modes(model, case):
    if case == "one-encoder-eval":  # a pretrained backbone kept in eval mode (frozen BN)
        model.towers[0].eval()
    else:  # model.eval() to switch dropout off while fine-tuning
        model.eval()


@pytest.mark.parametrize("case", ["one-encoder-eval", "model-eval", "model-eval-bal-train"])
@pytest.mark.parametrize("name", factory_params())
def test_eval_mode_encoders_train_with_the_method_rule(name, case):
    """The towers hold no dropout or BatchNorm, so eval mode changes nothing they compute:
    a run with encoders in eval mode must be bitwise the run in train mode (MMPareto's
    combination and gamma included), for every method."""
    reference = build(name)
    run(*reference, seeds=(0, 1, 2))
    model, bal = build(name)
    set_modes(model, case)
    if case == "model-eval-bal-train":
        bal.train()  # says "I train in eval mode on purpose": no warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(model, bal, seeds=(0, 1, 2))
    messages = [str(w.message) for w in caught if "eval mode" in str(w.message)]
    assert_same_run(snapshot(model, bal), snapshot(*reference))
    if case == "model-eval":
        assert len(messages) == 1 and "bal.eval()" in messages[0]
        assert "torch.no_grad()" in messages[0] and "bal.train()" in messages[0]
    else:
        assert messages == []


@pytest.mark.parametrize("name", factory_params())
def test_balancer_eval_is_evaluation_and_the_message_names_the_switch(name):
    model, bal = build(name)
    run(model, bal, seeds=(0,))
    before = snapshot(model, bal)
    bal.eval()
    inputs, target = make_batch_for(name, INPUT_DIMS, seed=5)
    with pytest.warns(UserWarning, match=r"treated as evaluation.*Call bal\.train\(\)"):
        loss = bal.loss(model(*inputs), target)
    assert torch.isfinite(loss) and loss.requires_grad
    assert_same_run(snapshot(model, bal), before)
    bal.train()
    run(model, bal, seeds=(1,))
    assert bal.steps == 2


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("name", factory_params())
def test_validation_without_gradients_is_never_a_step(name, mode):
    """Whatever the modes of the model and the balancer (train mode here)."""
    model, bal = build(name)
    run(model, bal, seeds=(0,))
    before = snapshot(model, bal)
    inputs, target = make_batch_for(name, INPUT_DIMS, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
            loss = bal.loss(model(*inputs), target)
    assert torch.isfinite(loss)
    assert_same_run(snapshot(model, bal), before)


class Holder(nn.Module):
    """The documented Lightning layout: the model and its balancer as two submodules."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.model, self.balancer = build(name)


def test_a_parent_module_sets_the_switch_like_lightning():
    """Lightning's validation loop calls ``.eval()`` on the module and restores each
    submodule's ``training`` flag afterwards by assignment; training resumes as training,
    also when the encoders stay in eval mode (a frozen backbone)."""
    holder = Holder("mlb")
    holder.model.towers[0].eval()
    holder.model.towers[1].eval()
    modes = {module: module.training for module in holder.modules()}
    holder.eval()
    inputs, target = make_batch_for("mlb", INPUT_DIMS, seed=5)
    with torch.no_grad():
        holder.balancer.loss(holder.model(*inputs), target)
    for module, training in modes.items():
        module.training = training
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(holder.model, holder.balancer, seeds=(0,))
    assert holder.balancer.steps == 1 and holder.balancer.history.steps.tolist() == [0]


# --- row 6: copies of a module that holds the balancer ---------------------------------------


@pytest.mark.parametrize("how", ["deepcopy", "AveragedModel"])
@pytest.mark.parametrize("name", factory_params())
def test_copy_of_a_module_holding_the_balancer_is_an_attached_twin(name, how):
    """After training steps the copy is a usable balancer on the copy of the model: trained
    side by side with the original on the same batches, both runs are bitwise identical."""
    holder = Holder(name)
    run(holder.model, holder.balancer, seeds=(0, 1))
    if how == "deepcopy":
        twin = copy.deepcopy(holder)
    else:
        twin = AveragedModel(holder).module
    assert twin.balancer is not holder.balancer and twin.model is not holder.model
    assert_same_run(snapshot(twin.model, twin.balancer), snapshot(holder.model, holder.balancer))
    for seeds in ((2,), (3,)):
        run(holder.model, holder.balancer, seeds)
        run(twin.model, twin.balancer, seeds)
    assert_same_run(snapshot(twin.model, twin.balancer), snapshot(holder.model, holder.balancer))


def test_averaged_model_of_a_module_holding_the_balancer_updates_and_evaluates():
    holder = Holder("mlb")
    run(holder.model, holder.balancer, seeds=(0,))
    averaged = AveragedModel(holder)
    run(holder.model, holder.balancer, seeds=(1,))
    averaged.update_parameters(holder)
    inputs, target = make_batch_for("mlb", INPUT_DIMS, seed=5)
    copy_ = averaged.module
    with torch.no_grad():
        loss = copy_.balancer.loss(copy_.model(*inputs), target)
    assert torch.isfinite(loss) and copy_.balancer.steps == 1


@pytest.mark.parametrize("name", factory_params())
def test_deepcopy_of_the_balancer_alone_keeps_its_state(name):
    """``copy.deepcopy(bal)`` copies the model with it (it holds the model): the copy has the
    original's state, and the original keeps training on its own model."""
    model, bal = build(name)
    run(model, bal, seeds=(0, 1))
    before = footprint(model)
    twin = copy.deepcopy(bal)
    assert_same_run(snapshot(model, twin), snapshot(model, bal))
    assert footprint(model) == before
    run(model, bal, seeds=(2,))
    assert bal.steps == 3 and twin.steps == 2


# --- row 11: the balancer object pickled with its model --------------------------------------


@pytest.mark.parametrize("name", factory_params())
def test_saved_model_and_balancer_restore_attached_and_train_as_before(name):
    model, bal = build(name)
    run(model, bal, seeds=(0, 1))
    buffer = io.BytesIO()
    torch.save({"model": model, "bal": bal}, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert_same_run(snapshot(restored["model"], restored["bal"]), snapshot(model, bal))
    run(model, bal, seeds=(2, 3))
    run(restored["model"], restored["bal"], seeds=(2, 3))
    assert_same_run(snapshot(restored["model"], restored["bal"]), snapshot(model, bal))


LOAD_AND_TRAIN = """
import sys, torch
sys.path[:0] = [{tests!r}, {here!r}]
from test_round3_lifecycle import run, snapshot
saved = torch.load({path!r}, weights_only=False)
run(saved["model"], saved["bal"], seeds=(2, 3))
torch.save(snapshot(saved["model"], saved["bal"]), {out!r})
"""


@pytest.mark.slow
def test_saved_model_and_balancer_load_and_train_in_a_fresh_process(tmp_path):
    model, bal = build("mlb")
    run(model, bal, seeds=(0, 1))
    torch.save({"model": model, "bal": bal}, tmp_path / "pair.pt")
    run(model, bal, seeds=(2, 3))
    script = LOAD_AND_TRAIN.format(
        tests=str(HERE.parent),
        here=str(HERE),
        path=str(tmp_path / "pair.pt"),
        out=str(tmp_path / "run.pt"),
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True, env=env)
    assert_same_run(torch.load(tmp_path / "run.pt"), snapshot(model, bal))


# --- row 13: the history across a checkpoint -------------------------------------------------


@pytest.mark.parametrize("name", factory_params())
def test_history_survives_a_state_dict_round_trip(name):
    model, bal = build(name)
    run(model, bal, seeds=(0, 1))
    inputs, target = make_batch_for(name, INPUT_DIMS, seed=5)
    with torch.no_grad():  # the validation MSLR and G-Blend read at epoch_end()
        bal.loss(model(*inputs), target)
    bal.epoch_end()
    run(model, bal, seeds=(2,))
    resumed_model, resumed = build(name, seed=1)
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(bal.state_dict())
    assert_same_run(snapshot(resumed_model, resumed), snapshot(model, bal))
    assert torch.equal(resumed.history.epochs, torch.tensor([0, 0, 1]))
    run(model, bal, seeds=(3,))
    run(resumed_model, resumed, seeds=(3,))
    assert_same_run(snapshot(resumed_model, resumed), snapshot(model, bal))


def test_the_state_dict_keeps_the_most_recent_steps_of_the_history(monkeypatch):
    monkeypatch.setattr(gradbalance._state, "HISTORY_IN_STATE", 2)
    model, bal = build("mlb")
    run(model, bal, seeds=(0, 1, 2))
    _, resumed = build("mlb", seed=1)
    resumed.load_state_dict(bal.state_dict())
    assert resumed.history.steps.tolist() == [1, 2]
    for name in bal.names:
        expected = bal.history[name]["coefficients"][-2:]
        assert torch.equal(resumed.history[name]["coefficients"], expected)


# --- row 15: a misspelt option ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(gb.METHODS))
def test_a_misspelt_option_lists_the_valid_options(name):
    model = TowerNet(INPUT_DIMS)
    before = footprint(model)
    cls = gb.METHODS[name]
    with pytest.raises(TypeError) as error:
        gb.make(name, model, list(model.towers), num_classes=NUM_CLASSES, feature_dim=12)
    message = str(error.value)
    assert isinstance(error.value, gb.errors.InputTypeError)
    assert message.startswith(f"{cls.__name__} got an unexpected keyword argument 'feature_dim'")
    assert "did you mean 'feature_dims'" in message
    assert "num_classes" in message and "nonfinite" in message and "check_gradients" in message
    assert footprint(model) == before  # refused before anything was attached


def test_a_misspelt_method_option_suggests_it():
    model = TowerNet(INPUT_DIMS)
    with pytest.raises(TypeError, match=r"'alpah' \(did you mean 'alpha'\?\); its options "):
        gb.make("mlb", model, list(model.towers), num_classes=NUM_CLASSES, alpah=1)
    with pytest.raises(TypeError, match=r"did you mean 'gamma'\?.*\bgamma\b"):
        gb.MMPareto(model, list(model.towers), num_classes=NUM_CLASSES, gama=1.5)


# --- row 12: the Hugging Face Trainer example ------------------------------------------------


@pytest.mark.slow
def test_hugging_face_trainer_predicts_one_row_per_sample_with_aligned_metrics(
    tmp_path, monkeypatch
):
    # Part of the dev extra (pinned in constraints.txt): a missing install fails, never skips.
    import transformers  # noqa: F401

    monkeypatch.syspath_prepend(str(ROOT / "examples"))  # its shared toy problem, as scripts do
    example = runpy.run_path(str(ROOT / "examples" / "hf_trainer.py"))
    trainer, bal = example["main"](str(tmp_path), max_steps=2)
    data = trainer.eval_dataset  # 256 samples in batches of 128
    prediction = trainer.predict(data)
    assert prediction.predictions.shape == (len(data), 6)
    assert torch.equal(torch.as_tensor(prediction.label_ids), data.labels)
    with torch.no_grad():
        logits = trainer.model(data.audio, data.video)
    torch.testing.assert_close(torch.as_tensor(prediction.predictions), logits)
    accuracy = float((logits.argmax(1) == data.labels).float().mean())
    fused = float(torch.nn.functional.cross_entropy(logits, data.labels))
    assert prediction.metrics["test_accuracy"] == pytest.approx(accuracy)
    assert prediction.metrics["test_fused_loss"] == pytest.approx(fused, rel=1e-5)
    assert prediction.metrics["test_loss"] > prediction.metrics["test_fused_loss"]  # + heads


# --- rows 6 and 13 with Lightning itself -----------------------------------------------------


@pytest.mark.slow
def test_lightning_module_copies_and_checkpoints_keep_an_attached_balancer(tmp_path, monkeypatch):
    # Part of the dev extra (pinned in constraints.txt): a missing install fails, never skips.
    import pytorch_lightning  # noqa: F401

    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    example = runpy.run_path(str(ROOT / "examples" / "lightning_module.py"))
    trainer, module = example["main"](max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    bal = module.balancer
    assert bal.steps == 2
    batch = next(iter(trainer.train_dataloader))
    for twin in (copy.deepcopy(module), AveragedModel(module).module):
        assert twin.balancer.steps == 2
        assert torch.equal(twin.balancer.history.steps, bal.history.steps)
        twin.training_step(batch, 0).backward()  # the copy balances the copy of the model
        assert twin.balancer.steps == 3 and len(twin.balancer.history.steps) == 3
    assert bal.steps == 2
    path = tmp_path / "lightning.ckpt"
    trainer.save_checkpoint(path)
    restored = example["BalancedModule"].load_from_checkpoint(path).balancer
    assert restored.steps == 2
    for name in bal.names:
        for quantity in ("coefficients", "scores"):
            assert torch.equal(restored.history[name][quantity], bal.history[name][quantity])


class SelfBalanced(nn.Module):
    """A model that holds the balancer of its own encoders (not the documented layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TowerNet(INPUT_DIMS)
        self.bal = gb.MLB(self, list(self.net.towers), NUM_CLASSES, feature_dims=12)

    def forward(self, *inputs):
        return self.net(*inputs)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_balancer_copied_inside_the_model_it_balances_says_so(how):
    """Its copy cannot be re-attached while the model is still being restored: the first
    use says what happened and what to do, instead of a missing-output error."""
    model = SelfBalanced()
    inputs, target = make_batch_for("mlb", INPUT_DIMS)
    model.bal.loss(model(*inputs), target).backward()
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    with pytest.raises(gb.errors.CaptureError, match="copied or unpickled as part of the model"):
        twin.bal.loss(twin(*inputs), target)
    model.bal.loss(model(*inputs), target).backward()  # the original is untouched
    assert model.bal.steps == 2
