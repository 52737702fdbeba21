"""``task="regression"``: MLB, Multi-Loss, Joint and AGM against plainly written references
(losses, batch errors, the inverted MLB ratio, per-parameter gradients), the pure error
coefficients' properties, target validation and the methods that refuse the task."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import MultiTowerNet
from hypothesis import given, settings
from hypothesis import strategies as st

import gradbalance as gb
from gradbalance.coefficients import mlb_error_coefficients, mlb_error_ratios
from gradbalance.errors import ConfigurationError, InputError, InputTypeError

DIMS = (5, 7, 3)


def plain_error_coefficients(errors, alpha, beta_max):
    """MLB's regression coefficients written plainly: r_m = e_m / mean_{j != m} e_j."""
    out = []
    for m, e in enumerate(errors):
        others = [max(x, 1e-8) for j, x in enumerate(errors) if j != m]
        r = max(e, 1e-8) / (sum(others) / len(others))
        beta = beta_max if r > 1 else 2.0
        out.append(1 + (beta - 1) * math.tanh(alpha * (r - 1)))
    return out


def plain_loss(kind, prediction, target):
    if kind == "l1":
        return (prediction - target).abs().mean()
    if kind == "mse":
        return ((prediction - target) ** 2).mean()
    d = (prediction - target).abs()
    return torch.where(d < 1, 0.5 * d**2, d - 0.5).mean()


def batch(dims=DIMS, width=1, n=16, seed=0, flat=False):
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(n, d, generator=g) for d in dims]
    target = torch.randn(n, width, generator=g) * 2
    return inputs, target.reshape(n) if flat else target


def model_and_mlb(width=1, seed=0, **options):
    torch.manual_seed(seed)
    model = MultiTowerNet(DIMS, num_classes=width)
    options = {"alpha": 1.5, "beta_max": 3.0, "feature_dims": 12, **options}
    return model, gb.MLB(model, list(model.towers), task="regression", output_dim=width, **options)


# --- the pure error coefficients --------------------------------------------------------------

error = st.floats(min_value=1e-4, max_value=100.0, allow_nan=False)
errors_st = st.integers(2, 6).flatmap(lambda m: st.lists(error, min_size=m, max_size=m))


@settings(max_examples=200, deadline=None)
@given(errors_st, st.floats(0.0, 5.0), st.floats(0.1, 20.0))
def test_error_coefficients_match_the_plain_formula(errors, alpha, beta_max):
    k = mlb_error_coefficients(torch.tensor(errors, dtype=torch.float64), alpha, beta_max)
    assert k.tolist() == pytest.approx(plain_error_coefficients(errors, alpha, beta_max), rel=1e-9)


@settings(max_examples=200, deadline=None)
@given(errors_st, st.floats(0.05, 5.0), st.floats(1.01, 20.0))
def test_a_modality_is_sped_up_iff_its_error_exceeds_the_others_mean(errors, alpha, beta_max):
    e = torch.tensor(errors, dtype=torch.float64)
    k = mlb_error_coefficients(e, alpha, beta_max)
    for m in range(len(errors)):
        others = (e.sum() - e[m]) / (len(errors) - 1)
        ratio = (e[m] / others).item()
        if abs(ratio - 1) < 1e-9:
            continue
        assert (k[m].item() > 1) == (ratio > 1)
        assert 1 - math.tanh(alpha) - 1e-12 <= k[m].item() <= beta_max + 1e-12


@settings(max_examples=200, deadline=None)
@given(errors_st, st.floats(1e-3, 1e3), st.floats(0.0, 5.0), st.floats(0.1, 20.0))
def test_error_coefficients_are_invariant_to_the_scale_of_the_errors(errors, c, alpha, beta_max):
    e = torch.tensor(errors, dtype=torch.float64)
    assert torch.allclose(mlb_error_ratios(e * c), mlb_error_ratios(e), rtol=1e-9)
    expected = mlb_error_coefficients(e, alpha, beta_max)
    assert torch.allclose(mlb_error_coefficients(e * c, alpha, beta_max), expected, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 6), error, st.floats(0.0, 5.0))
def test_equal_errors_give_ones(m, e, alpha):
    k = mlb_error_coefficients(torch.full((m,), e, dtype=torch.float64), alpha)
    assert torch.allclose(k, torch.ones(m, dtype=torch.float64), atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.floats(1e-3, 10.0), st.floats(1e-3, 10.0), st.floats(0.0, 5.0))
def test_two_modalities_error_ratio_is_the_inverse_of_the_score_ratio(a, b, alpha):
    """For M = 2 the inverted ratio of errors equals MLB's ratio of their reciprocals."""
    e = torch.tensor([a, b], dtype=torch.float64)
    assert torch.allclose(
        mlb_error_coefficients(e, alpha), gb.coefficients.mlb_coefficients(1 / e, alpha)
    )


# --- MLB: the gradients against a manual per-parameter computation --------------------------


@pytest.mark.parametrize("loss", ["l1", "mse", "huber"])
@pytest.mark.parametrize("error_kind", ["mse", "mae"])
@pytest.mark.parametrize("width", [1, 3])
def test_mlb_gradients_equal_a_manual_computation(loss, error_kind, width):
    """Every parameter reached only through encoder m holds k_m times its gradient from the
    fused and the heads' losses; head m holds k_m times its own; the fusion is untouched; k
    is the plain formula on the heads' batch errors."""
    model, bal = model_and_mlb(width, loss=loss, error=error_kind)
    inputs, target = batch(width=width)
    bal.loss(model(*inputs), target).backward()

    bal.remove()  # the same forward, written out on the plain model: towers, heads, losses, k
    features = [tower(x) for tower, x in zip(model.towers, inputs)]
    fused = model.fusion(torch.cat(features, dim=1))
    heads = [bal.heads[f"towers_{m}"] for m in range(3)]
    predictions = [head(z) for head, z in zip(heads, features)]
    with torch.no_grad():
        differences = [p - target for p in predictions]
        errors = [
            (d**2).mean().item() if error_kind == "mse" else d.abs().mean().item()
            for d in differences
        ]
    k = plain_error_coefficients(errors, 1.5, 3.0)
    assert [bal.scores[f"towers_{m}"].item() for m in range(3)] == pytest.approx(errors, rel=1e-5)
    assert [bal.coefficients[f"towers_{m}"].item() for m in range(3)] == pytest.approx(k, rel=1e-5)
    fused_loss = plain_loss(loss, fused, target)
    head_losses = [plain_loss(loss, p, target) for p in predictions]
    total = fused_loss + sum(head_losses)
    for m in range(3):
        tower_params = list(model.towers[m].parameters())
        expected = torch.autograd.grad(total, tower_params, retain_graph=True)
        for p, g in zip(tower_params, expected):
            torch.testing.assert_close(p.grad, k[m] * g, rtol=1e-5, atol=1e-7)
        head_params = list(heads[m].parameters())
        expected = torch.autograd.grad(head_losses[m], head_params, retain_graph=True)
        for p, g in zip(head_params, expected):
            torch.testing.assert_close(p.grad, k[m] * g, rtol=1e-5, atol=1e-7)
    fusion_params = list(model.fusion.parameters())
    for p, g in zip(fusion_params, torch.autograd.grad(fused_loss, fusion_params)):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_mlb_flat_and_column_targets_give_the_same_step():
    """Targets (B,) with predictions (B,) train exactly as (B, 1) with (B, 1)."""
    grads = []
    for flat in (False, True):
        model, bal = model_and_mlb(1)
        inputs, target = batch(flat=flat)
        out = model(*inputs)
        bal.loss(out.reshape(-1) if flat else out, target).backward()
        params = (*model.parameters(), *bal.parameters())
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
        coefficients = bal.coefficients
    assert torch.equal(grads[0], grads[1])
    assert all(v.dim() == 0 for v in coefficients.values())


def test_unimodal_logits_are_the_heads_predictions():
    model, bal = model_and_mlb(2)
    inputs, target = batch(width=2)
    bal.loss(model(*inputs), target).backward()
    predictions = bal.unimodal_logits()
    with torch.no_grad():
        for m, tower in enumerate(model.towers):
            expected = bal.heads[f"towers_{m}"](tower(inputs[m]))
            torch.testing.assert_close(predictions[f"towers_{m}"], expected)
    assert bal.task == "regression" and bal.output_dim == 2 and bal.num_classes is None


def test_mlb_regression_trains_the_weaker_modality_faster_until_errors_meet():
    """A few steps: the modality with the larger head error gets k > 1, the others k < 1."""
    model, bal = model_and_mlb(1)
    opt = torch.optim.Adam([*model.parameters(), *bal.parameters()], lr=1e-2)
    inputs, target = batch(n=64)
    for _ in range(5):
        opt.zero_grad()
        bal.loss(model(*inputs), target).backward()
        opt.step()
    scores = torch.stack(list(bal.scores.values()))
    coefficients = torch.stack(list(bal.coefficients.values()))
    worst, best = scores.argmax(), scores.argmin()
    assert coefficients[worst] > 1 > coefficients[best]
    history = bal.history["towers_0"]
    assert history["coefficients"].shape == (5,) and history["scores"].shape == (5,)


def test_evaluation_loss_leaves_the_coefficients_alone():
    model, bal = model_and_mlb(1)
    inputs, target = batch()
    bal.loss(model(*inputs), target).backward()
    before = dict(bal.coefficients)
    with torch.no_grad():
        value = bal.loss(model(*batch(seed=3)[0]), batch(seed=3)[1])
    assert value.dim() == 0 and bal.steps == 1 and bal.coefficients == before


# --- Multi-Loss and Joint -----------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["l1", "mse", "huber"])
def test_multiloss_loss_is_fused_plus_heads(loss):
    torch.manual_seed(0)
    model = MultiTowerNet(DIMS, num_classes=1)
    bal = gb.MultiLoss(model, list(model.towers), task="regression", loss=loss, feature_dims=12)
    inputs, target = batch()
    value = bal.loss(model(*inputs), target)
    with torch.no_grad():
        features = [tower(x) for tower, x in zip(model.towers, inputs)]
        expected = plain_loss(loss, model.fusion(torch.cat(features, 1)), target) + sum(
            plain_loss(loss, bal.heads[f"towers_{m}"](z), target) for m, z in enumerate(features)
        )
    torch.testing.assert_close(value, expected)
    assert all(k.item() == 1.0 for k in bal.coefficients.values())


def test_joint_probes_do_not_reach_the_encoders():
    """Joint regression: the encoders get exactly the fused L1 loss's gradient; the probes
    train on detached features; scores are their batch errors (MSE)."""
    torch.manual_seed(0)
    model = MultiTowerNet(DIMS, num_classes=1)
    bal = gb.Joint(model, list(model.towers), task="regression", probes=True, feature_dims=12)
    inputs, target = batch()
    bal.loss(model(*inputs), target).backward()
    towers = list(model.towers.parameters())
    expected = torch.autograd.grad(F.l1_loss(model(*inputs), target), towers)
    for p, g in zip(towers, expected):
        torch.testing.assert_close(p.grad, g)
    with torch.no_grad():
        features = [tower(x) for tower, x in zip(model.towers, inputs)]
        heads = [bal.heads[f"towers_{m}"] for m in range(3)]
        errors = [((head(z) - target) ** 2).mean() for head, z in zip(heads, features)]
    torch.testing.assert_close(torch.stack(list(bal.scores.values())), torch.stack(errors))
    assert all(p.grad is not None for p in bal.parameters())


# --- AGM ------------------------------------------------------------------------------------


def test_agm_regression_follows_the_running_mean_rule_with_l1_losses():
    """Two modalities, feature masking: phi_a = (f - f(a masked) + f(v masked)) / 2; the
    statistic is each phi's L1 loss; k = exp(alpha * min(o - r, 10)) with r from this batch
    and o from the running means before it; gradients follow k-scaled Shapley paths."""
    torch.manual_seed(0)
    model = MultiTowerNet((5, 7), num_classes=1)
    fusion = lambda *z: model.fusion(torch.cat(z, 1))  # noqa: E731
    bal = gb.AGM(model, list(model.towers), task="regression", alpha=1.0, fusion=fusion)
    opt = torch.optim.SGD([*model.parameters()], lr=0.05)
    running = [0.0, 0.0]
    for step in range(3):
        inputs, target = batch((5, 7), seed=step)
        opt.zero_grad()
        bal.loss(model(*inputs), target).backward()
        # The same step, written out (the taps paused: no capture).
        with bal.paused():
            a, v = (tower(x) for tower, x in zip(model.towers, inputs))
        full, without_a, without_v = fusion(a, v), fusion(0 * a, v), fusion(a, 0 * v)
        phi = [(full - without_a + without_v) / 2, (full - without_v + without_a) / 2]
        losses = [(p - target).abs().mean().item() for p in phi]
        r_a = math.exp(losses[1] - losses[0])
        o_a = math.exp(running[1] - running[0])
        k = [math.exp(min(o_a - r_a, 10)), math.exp(min(1 / o_a - 1 / r_a, 10))]
        assert [c.item() for c in bal.coefficients.values()] == pytest.approx(k, rel=1e-5)
        assert [s.item() for s in bal.scores.values()] == pytest.approx(losses, rel=1e-6)
        running = [(r * step + x) / (step + 1) for r, x in zip(running, losses)]
        assert bal.running_losses.tolist() == pytest.approx(running, rel=1e-6)
        # Gradient: d/dtheta of sum_m k_m <G, phi_m>, with G the gradient of the L1 loss at
        # the (unscaled) combined output.
        combined = (phi[0] + phi[1]).detach().requires_grad_(True)
        (grad_combined,) = torch.autograd.grad(F.l1_loss(combined, target), combined)
        surrogate = sum(km * (p * grad_combined).sum() for km, p in zip(k, phi))
        params = list(model.parameters())
        expected = torch.autograd.grad(surrogate, params)
        for p, g in zip(params, expected):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
        opt.step()


# --- validation and refusals ------------------------------------------------------------------


@pytest.mark.parametrize("method", [gb.OGM, gb.OGMGE, gb.PMR, gb.MSLR])
def test_label_based_methods_refuse_regression(method):
    model = MultiTowerNet((5, 7), num_classes=1)
    with pytest.raises(ConfigurationError, match="does not support task='regression'"):
        method(model, list(model.towers), task="regression")


@pytest.mark.parametrize(
    "options, match",
    [
        ({"task": "ranking"}, "task"),
        ({"task": "regression", "loss": "l2"}, "loss"),
        ({"task": "regression", "error": "rmse"}, "error"),
        ({"task": "regression", "output_dim": 0}, "output_dim"),
        ({"task": "regression", "num_classes": 4}, "no classes"),
        ({"num_classes": 4, "loss": "l1"}, "loss= only for task='regression'"),
        ({"num_classes": 4, "output_dim": 2}, "output_dim= only"),
        ({}, "num_classes"),
    ],
)
def test_bad_task_options_are_refused(options, match):
    model = MultiTowerNet((5, 7), num_classes=1)
    with pytest.raises(ConfigurationError, match=match):
        gb.MLB(model, list(model.towers), **options)


def test_agm_refuses_error_option():
    model = MultiTowerNet((5, 7), num_classes=1)
    with pytest.raises(ConfigurationError, match="error="):
        gb.AGM(
            model, list(model.towers), task="regression", error="mae",
            fusion=lambda *z: model.fusion(torch.cat(z, 1)),
        )


@pytest.mark.parametrize(
    "prediction_shape, target, error, match",
    [
        ((16, 1), torch.arange(16), InputTypeError, "floating-point targets"),
        ((16, 1), torch.randn(16, 2), InputError, "target must have shape"),
        ((16, 1), torch.randn(15), InputError, "target must have shape"),
        ((16, 1, 1), torch.randn(16, 1), InputError, "predictions must have shape"),
        ((16,), torch.randn(16, 1), None, None),
        ((0, 1), torch.randn(0, 1), InputError, "empty batch"),
    ],
)
def test_regression_inputs_are_checked(prediction_shape, target, error, match):
    model, bal = model_and_mlb(1)
    inputs, _ = batch(n=prediction_shape[0])
    out = model(*inputs).reshape(prediction_shape)
    if error is None:
        assert torch.isfinite(bal.loss(out, target))
        return
    with pytest.raises(error, match=match):
        bal.loss(out, target)


def test_classification_is_the_default_and_unchanged():
    """``task="classification"`` given explicitly trains bitwise as the default."""
    runs = []
    for options in ({}, {"task": "classification"}):
        torch.manual_seed(0)
        model = MultiTowerNet((5, 7))
        bal = gb.MLB(model, list(model.towers), num_classes=4, alpha=1.0, **options)
        g = torch.Generator().manual_seed(0)
        inputs = [torch.randn(8, 5, generator=g), torch.randn(8, 7, generator=g)]
        bal.loss(model(*inputs), torch.arange(8) % 4).backward()
        params = (*model.parameters(), *bal.parameters())
        runs.append(torch.cat([p.grad.reshape(-1) for p in params]))
        assert bal.task == "classification" and bal.output_dim == 4
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_nan_target_is_a_nonfinite_step(mode):
    """A NaN in a regression target makes the heads' errors NaN: ``"raise"`` raises at once
    on the CPU; ``"skip"`` keeps the coefficients, counts the step and reports it in
    ``last_step_finite`` (the documented guard of a loop without a GradScaler)."""
    model, bal = model_and_mlb(1, nonfinite=mode)
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    inputs, target = batch()
    target[3] = float("nan")
    if mode == "raise":
        with pytest.raises(gb.errors.NonFiniteError):
            bal.loss(model(*inputs), target)
        return
    loss = bal.loss(model(*inputs), target)
    opt.zero_grad()
    loss.backward()
    if bal.last_step_finite:
        opt.step()
    assert torch.isnan(loss)
    assert int(bal.nonfinite_steps) == 1 and not bool(bal.last_step_finite)
    assert all(k.item() == 1.0 for k in bal.coefficients.values())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
