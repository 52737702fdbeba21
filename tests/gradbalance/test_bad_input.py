"""Bad input gets a clear, actionable error (or the documented skip policy), never a silently
wrong model. One test per row of the table "What each bad input gets" (docs/errors.md)."""

from __future__ import annotations

import warnings

import pytest
import torch
from balancer_factories import FACTORIES, INPUT_DIMS, factory_params, train_step
from conftest import MultiTowerNet, make_batch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradbalance as gb


def build(name="mlb", seed=0, **options):
    torch.manual_seed(seed)
    model = MultiTowerNet(INPUT_DIMS)
    bal = FACTORIES[name](model, **options)
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
    return model, bal, opt


def tensors_of(bal):
    return {k: v.clone() for k, v in bal.state_dict().items() if torch.is_tensor(v)}


def poisoned(seed, value, tower=1):
    inputs, target = make_batch(INPUT_DIMS, seed=seed)
    inputs[tower] = inputs[tower].clone()
    inputs[tower][3, 2] = value
    return inputs, target


# --- non-finite logits or features ---------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", factory_params())
def test_nonfinite_feature_raises_naming_the_modality_and_step(name, value):
    model, bal, opt = build(name)
    for step in range(2):
        train_step(model, bal, opt, *make_batch(INPUT_DIMS, seed=step))
    before = tensors_of(bal)
    bias = model.towers[1][2].bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias[0] = value  # the encoder's output (its feature) is non-finite
    inputs, target = make_batch(INPUT_DIMS, seed=2)
    with pytest.raises(RuntimeError, match=r"feature of encoder 'towers_1' at training step 2"):
        bal.loss(model(*inputs), target)
    assert all(torch.equal(v, tensors_of(bal)[k]) for k, v in before.items())
    with torch.no_grad():
        bias.copy_(saved)
    train_step(model, bal, opt, *make_batch(INPUT_DIMS, seed=3))  # training can go on


def test_nonfinite_fused_logits_raise():
    model, bal, _ = build()
    with torch.no_grad():
        model.fusion.bias[1] = float("inf")
    with pytest.raises(RuntimeError, match="non-finite values .* in the fused logits at training"):
        bal.loss(model(*make_batch(INPUT_DIMS)[0]), make_batch(INPUT_DIMS)[1])


@pytest.mark.parametrize("name", factory_params())
def test_nonfinite_skip_leaves_the_balancer_unchanged(name):
    model, bal, opt = build(name, nonfinite="skip")
    train_step(model, bal, opt, *make_batch(INPUT_DIMS, seed=0))
    before, history = tensors_of(bal), len(bal.history[bal.names[0]]["coefficients"])
    loss = bal.loss(model(*poisoned(1, float("nan"))[0]), make_batch(INPUT_DIMS, seed=1)[1])
    loss.backward()  # the loss is NaN: the caller skips the optimizer step
    assert not torch.isfinite(loss)
    assert not bool(bal.last_step_finite)
    after = tensors_of(bal)
    assert int(after.pop("nonfinite_steps")) == int(before.pop("nonfinite_steps")) + 1
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert len(bal.history[bal.names[0]]["coefficients"]) == history
    opt.zero_grad()
    train_step(model, bal, opt, *make_batch(INPUT_DIMS, seed=2))
    assert bool(bal.last_step_finite)
    assert len(bal.history[bal.names[0]]["coefficients"]) == history + 1


def test_nonfinite_error_on_an_accelerator_is_raised_at_the_next_flush():
    """Off the CPU the check stays on the device (no host sync): the step is skipped and the
    error comes at the next history flush or check_finite(). Simulated on the CPU."""
    model, bal, opt = build(flush_every=4)
    bal._guard.defer_errors = True
    train_step(model, bal, opt, *make_batch(INPUT_DIMS, seed=0))
    k = bal.coefficients
    bal.loss(model(*poisoned(1, float("nan"), tower=0)[0]), make_batch(INPUT_DIMS)[1])
    assert bal.coefficients == k
    with pytest.raises(RuntimeError, match="feature of encoder 'towers_0' at training step 1"):
        bal.check_finite()
    bal.check_finite()  # reported once
    model.zero_grad()
    bal.loss(model(*poisoned(2, float("nan"), tower=1)[0]), make_batch(INPUT_DIMS)[1])
    with pytest.raises(RuntimeError, match="feature of encoder 'towers_1' at training step 2"):
        bal.loss(model(*make_batch(INPUT_DIMS)[0]), make_batch(INPUT_DIMS)[1])  # 4th call


@pytest.mark.parametrize("mode", ["skip", "deferred"])
@pytest.mark.parametrize("name", factory_params())
def test_nonfinite_checks_make_no_host_sync(name, mode):
    """The device-side checks (skip, and the accelerator path of "raise") never sync."""
    from test_no_host_sync import FailOnHostSync

    model, bal, opt = build(name, nonfinite="skip" if mode == "skip" else "raise")
    bal._guard.defer_errors = mode == "deferred"
    train_step(model, bal, opt, *make_batch(INPUT_DIMS, seed=0))
    for step in range(1, 3):
        inputs, target = poisoned(step, float("nan")) if step == 1 else make_batch(INPUT_DIMS)
        with FailOnHostSync():
            opt.zero_grad()
            bal.loss(model(*inputs), target).backward()
    assert int(bal.nonfinite_steps) == 1


def test_nonfinite_option_is_checked():
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        build(nonfinite="ignore")


# --- labels and logits ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_target, error, match",
    [
        (torch.full((10,), 4), RuntimeError, r"in \[0, 4\)"),
        (torch.full((10,), -1), RuntimeError, r"in \[0, 4\)"),
        (torch.zeros(10, 1, dtype=torch.long), ValueError, r"shape \(10,\)"),
        (torch.zeros(9, dtype=torch.long), ValueError, r"shape \(10,\)"),
        (torch.zeros(10), TypeError, "integer class indices"),
        (torch.zeros(10, dtype=torch.bool), TypeError, "integer class indices"),
        (torch.zeros(10, dtype=torch.long, device="meta"), ValueError, "labels to the logits"),
    ],
    ids=["too-large", "negative", "2-d", "wrong-length", "float", "bool", "other-device"],
)
def test_bad_labels(bad_target, error, match):
    model, bal, _ = build()
    with pytest.raises(error, match=match):
        bal.loss(model(*make_batch(INPUT_DIMS)[0]), bad_target)


@pytest.mark.parametrize(
    "logits, error, match",
    [
        (torch.randn(10, 5), ValueError, r"\(B, num_classes=4\), got \(10, 5\)"),
        (torch.randn(10), ValueError, r"got \(10,\)"),
        (torch.zeros(10, 4, dtype=torch.long), TypeError, "floating point"),
    ],
    ids=["width", "1-d", "integer"],
)
def test_bad_logits(logits, error, match):
    model, bal, _ = build()
    model(*make_batch(INPUT_DIMS)[0])
    with pytest.raises(error, match=match):
        bal.loss(logits, make_batch(INPUT_DIMS)[1])


# --- forwards: missing, repeated, validation, extra passes ------------------------------------


def test_encoder_not_called_in_the_forward():
    model, bal, _ = build()
    inputs, target = make_batch(INPUT_DIMS)
    z = model.towers[0](inputs[0])
    with pytest.raises(RuntimeError, match=r"encoder\(s\) \['towers_1'\] produced no output"):
        bal.loss(model.fusion(torch.cat([z, z[:, :12]], 1)), target)


def test_a_second_forward_before_loss_supersedes_the_first():
    model, bal, _ = build()
    inputs, target = make_batch(INPUT_DIMS)
    model(*[2 * x for x in inputs])  # abandoned: its captures must not be used
    with pytest.warns(UserWarning, match="not followed by bal.loss"):
        logits = model(*inputs)
    bal.loss(logits, target)
    torch.testing.assert_close(bal.features()["towers_0"], model.towers[0](inputs[0]))


class TwiceNet(MultiTowerNet):
    def forward(self, *inputs):
        first = self.towers[0](inputs[0])
        again = self.towers[0](inputs[0] * 2)
        return self.fusion(torch.cat([first + again, self.towers[1](inputs[1])], -1))


def test_encoder_called_twice_in_one_forward():
    model = TwiceNet(INPUT_DIMS)
    gb.MLB(model, list(model.towers), num_classes=4, feature_dims=[12, 12])
    with pytest.raises(RuntimeError, match="'towers_0' was called twice in one forward"):
        model(*make_batch(INPUT_DIMS)[0])


def test_validation_and_extra_passes_are_not_steps():
    """Forwards under no_grad (with or without loss()), forwards in eval mode without loss()
    and passes inside bal.paused() never trip the checks nor change the balancer."""
    model, bal, opt = build()
    train_step(model, bal, opt, *make_batch(INPUT_DIMS, seed=0))
    state = tensors_of(bal)
    inputs, target = make_batch(INPUT_DIMS, seed=1)
    with torch.no_grad():
        for _ in range(3):
            model(*inputs)  # e.g. a metric computed without loss()
        assert torch.isfinite(bal.loss(model(*inputs), target))
    model.eval()
    model(*inputs)  # eval mode, gradients on, no loss()
    model.train()
    logits = model(*inputs)
    with bal.paused():
        model(*[x.flip(0) for x in inputs])  # a second view, not balanced
    feature = bal.features()["towers_0"]
    with bal.paused():
        torch.testing.assert_close(feature, model.towers[0](inputs[0]))
    assert all(torch.equal(v, tensors_of(bal)[k]) for k, v in state.items())
    bal.loss(logits, target).backward()
    assert bal.steps == 2


@pytest.mark.parametrize("name", factory_params())
def test_activation_checkpointing_of_an_encoder(name):
    """use_reentrant=False re-runs the encoder inside backward: not a new forward; the
    gradients equal those without checkpointing."""

    class Checkpointed(MultiTowerNet):
        def forward(self, *inputs):
            zs = [checkpoint(t, x, use_reentrant=False) for t, x in zip(self.towers, inputs)]
            return self.fusion(torch.cat(zs, -1))

    torch.manual_seed(0)
    model = Checkpointed(INPUT_DIMS)
    bal = FACTORIES[name](model)
    plain_model, plain, _ = build(name)
    plain_model.load_state_dict(model.state_dict())
    plain.load_state_dict(bal.state_dict())
    for step in range(2):
        inputs, target = make_batch(INPUT_DIMS, seed=step)
        for m, b in ((model, bal), (plain_model, plain)):
            m.zero_grad()
            b.zero_grad()
            b.loss(m(*inputs), target).backward()
        for p, q in zip(model.parameters(), plain_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad)


def test_reentrant_activation_checkpointing_is_explained():
    class Reentrant(MultiTowerNet):
        def forward(self, *inputs):
            zs = [checkpoint(t, x, use_reentrant=True) for t, x in zip(self.towers, inputs)]
            return self.fusion(torch.cat(zs, -1))

    model = Reentrant(INPUT_DIMS)
    bal = gb.MLB(model, list(model.towers), num_classes=4)
    inputs, target = make_batch(INPUT_DIMS)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        bal.loss(model(*[x.requires_grad_() for x in inputs]), target)


# --- devices, modes, order ---------------------------------------------------------------------


@pytest.mark.parametrize("lazy", [False, True])
def test_model_moved_after_the_balancer(lazy):
    model, bal, _ = build(feature_dims=None if lazy else [12, 12])
    model.to("meta")
    inputs, target = make_batch(INPUT_DIMS)
    logits = model(*[x.to("meta") for x in inputs])
    with pytest.raises(RuntimeError, match="'towers_0' produced its output on meta but the"):
        bal.loss(logits, target.to("meta"))


def test_eval_mode_encoders_train_and_warn_once():
    """The encoders' modes never make a step evaluation: a model in eval mode with gradients
    on is trained (one warning saying how to evaluate instead; none after bal.train())."""
    model, bal, opt = build()
    train_step(model, bal, opt, *make_batch(INPUT_DIMS, seed=0))
    state = tensors_of(bal)
    model.eval()
    inputs, target = make_batch(INPUT_DIMS, seed=1)
    with pytest.warns(UserWarning, match="every encoder is in eval mode.*bal.eval"):
        bal.loss(model(*inputs), target)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bal.loss(model(*inputs), target)  # warned once
    assert not torch.equal(state["last_coefficients"], bal.last_coefficients)
    assert bal.steps == 3


def test_balancer_in_eval_mode_is_evaluation_and_changes_nothing():
    model, bal, opt = build()
    train_step(model, bal, opt, *make_batch(INPUT_DIMS, seed=0))
    state = tensors_of(bal)
    bal.eval()
    inputs, target = make_batch(INPUT_DIMS, seed=1)
    with pytest.warns(UserWarning, match="treated as evaluation.*Call bal.train"):
        bal.loss(model(*inputs), target)  # encoders in train mode: probably a forgotten train()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bal.loss(model(*inputs), target)  # eval mode everywhere: plain evaluation
    assert all(torch.equal(v, tensors_of(bal)[k]) for k, v in state.items())
    assert bal.steps == 1


def test_no_grad_loss_is_evaluation():
    model, bal, opt = build()
    train_step(model, bal, opt, *make_batch(INPUT_DIMS, seed=0))
    state = tensors_of(bal)
    with torch.no_grad():
        loss = bal.loss(model(*make_batch(INPUT_DIMS, seed=1)[0]), make_batch(INPUT_DIMS)[1])
    assert torch.isfinite(loss) and not loss.requires_grad
    assert all(torch.equal(v, tensors_of(bal)[k]) for k, v in state.items())


def test_no_grad_forward_then_training_loss():
    model, bal, _ = build()
    inputs, target = make_batch(INPUT_DIMS)
    with torch.no_grad():
        logits = model(*inputs)
    with pytest.raises(RuntimeError, match=r"ran under torch.no_grad\(\) but loss\(\) is called"):
        bal.loss(logits.requires_grad_(), target)


def test_optimizer_without_the_heads_is_refused():
    """The optimizer built before the balancer (or from model.parameters() only)."""
    torch.manual_seed(0)
    model = MultiTowerNet(INPUT_DIMS)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bal = gb.MLB(model, list(model.towers), num_classes=4)
    train_step(model, bal, opt, *make_batch(INPUT_DIMS, seed=0))
    with pytest.raises(RuntimeError, match=r"no optimizer updates the balancer's heads"):
        train_step(model, bal, opt, *make_batch(INPUT_DIMS, seed=1))


def test_optimizer_without_the_heads_is_refused_after_parameters_are_replaced():
    """As FSDP2's fully_shard after the balancer: the model's parameters are new objects, and
    an optimizer over them (without the heads) is still recognised as stepping the model."""
    torch.manual_seed(0)
    model = MultiTowerNet(INPUT_DIMS)
    bal = gb.MLB(model, list(model.towers), num_classes=4)
    originals = list(model.parameters())  # alive: their ids are never reused
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(param.detach().clone()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(model, bal, opt, *make_batch(INPUT_DIMS, seed=0))
    with pytest.raises(RuntimeError, match=r"no optimizer updates the balancer's heads"):
        train_step(model, bal, opt, *make_batch(INPUT_DIMS, seed=1))
    assert all(p is not q for p, q in zip(originals, model.parameters()))


def test_lazy_heads_with_the_optimizer_in_the_documented_order():
    """Balancer, then optimizer (before the first forward, heads still lazy), or one optimizer
    per module: the heads train and nothing is refused."""
    torch.manual_seed(0)
    model = MultiTowerNet(INPUT_DIMS)
    bal = gb.MLB(model, list(model.towers), num_classes=4)  # lazy heads
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    head_opt = torch.optim.SGD(bal.parameters(), lr=0.1)
    for step in range(3):
        inputs, target = make_batch(INPUT_DIMS, seed=step)
        opt.zero_grad()
        head_opt.zero_grad()
        bal.loss(model(*inputs), target).backward()
        opt.step()
        head_opt.step()
    assert bal.heads["towers_0"].weight.shape == (4, 12)
