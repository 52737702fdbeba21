"""Missing modalities: ``bal.loss(logits, target, present=mask)``.

The Step services (head losses and scores, score and loss sums, per-modality means, the store
rule) and the methods built on them: Joint (probes), Multi-Loss, MLB, OGM, OGM-GE and the
regression entries. With a mask, each score is the per-sample mean over the samples where the
modality is present (the same as an unmasked step on that sub-batch), the coefficients follow
from those scores by the method's formula, absent rows give exactly no gradient to the heads, a
modality absent from the whole batch keeps its coefficient and score, and an all-true mask is
bitwise the unmasked step. The other methods' properties: ``test_missing_methods.py``; the
shared pieces: ``missing_cases.py``; DDP with uneven presence: ``test_missing_ddp.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from balancer_factories import ALL_FACTORIES, INPUT_DIMS, flat_state
from conftest import MultiTowerNet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from missing_cases import (
    CORE,
    batch,
    build,
    head_gradients,
    masks,
    optimizer_step,
    step,
    sub_batch_scores,
    twin,
)

import gradbalance as gb
from gradbalance.errors import InputError


def _mlb(scores: torch.Tensor, alpha: float, beta_max: float, errors: bool) -> torch.Tensor:
    """MLB's k for two modalities, written out: r_m = s_other / s_m (errors: inverted)."""
    a, b = scores.double().clamp_min(1e-8).unbind()
    ratios = torch.stack([a / b, b / a]) if errors else torch.stack([b / a, a / b])
    shifted = torch.tanh(alpha * (ratios - 1))
    return (1 + torch.where(ratios > 1, (beta_max - 1) * shifted, shifted)).float()


def _ogm(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """OGM's k for two modalities: the one above the other gets 1 - tanh(alpha * ratio)."""
    a, b = scores.double().clamp_min(1e-8).unbind()
    first = a >= b
    ratio = a / b if first else b / a
    slowed = 1 - math.tanh(alpha * float(ratio))
    return torch.tensor([slowed, 1.0] if first else [1.0, slowed])


def first_step_scores(scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """The scores of a first training step: a modality absent from the batch has no previous
    score and gets the mean of the present modalities' scores."""
    seen = present.any(0)
    return torch.where(seen, scores, scores[seen].mean())


def _ones(bal, scores):
    return torch.ones_like(scores)


EXPECTED_COEFFICIENTS = {
    "joint": _ones,
    "multiloss": _ones,
    "joint_regression": _ones,
    "multiloss_regression": _ones,
    "mlb": lambda bal, s: _mlb(s, bal.alpha, bal.beta_max, errors=False),
    "mlb_regression": lambda bal, s: _mlb(s, bal.alpha, bal.beta_max, errors=True),
    "ogm": lambda bal, s: _ogm(s, bal.alpha),
    "ogm_ge": lambda bal, s: _ogm(s, bal.alpha),
}
"""This file's methods: the coefficients from the scores, by hand."""

assert set(EXPECTED_COEFFICIENTS) == set(CORE)
HEADS = [name for name in CORE if not name.startswith("ogm") or name == "ogm_ge"]
"""The entries with trained heads or probes (``ogm`` scores the fused head's slices)."""

PROPERTY = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- the statistics are those of the present samples --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", CORE)
@PROPERTY
@given(present=masks())
def test_scores_and_coefficients_are_those_of_the_present_sub_batches(name, present):
    model, bal = build(name)
    inputs, target = batch(name, present.shape[0])
    expected_scores = first_step_scores(
        sub_batch_scores(model, bal, inputs, target, present), present
    )
    previous = bal.last_coefficients.clone()
    step(model, bal, inputs, target, present)
    torch.testing.assert_close(bal.last_scores, expected_scores, rtol=1e-5, atol=1e-6)
    seen = present.any(0)  # a modality absent from the batch keeps its coefficient
    expected = torch.where(seen, EXPECTED_COEFFICIENTS[name](bal, expected_scores), previous)
    torch.testing.assert_close(bal.last_coefficients, expected, rtol=1e-5, atol=1e-6)


class CosineTowers(MultiTowerNet):
    """The towers fused by an MMCosine head."""

    def __init__(self) -> None:
        super().__init__(INPUT_DIMS)
        self.fusion = gb.MMCosineHead([12, 12], 4)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.fusion(*[tower(x) for tower, x in zip(self.towers, inputs)])


@pytest.mark.slow
@PROPERTY
@given(present=masks())
def test_ogm_on_an_mmcosine_head_scores_its_slices_on_the_present_samples(present):
    torch.manual_seed(0)
    model = CosineTowers()
    bal = gb.OGM(model, list(model.towers), 4, alpha=0.8, fusion_head=model.fusion)
    inputs, target = batch("ogm", present.shape[0])
    expected_scores = first_step_scores(
        sub_batch_scores(model, bal, inputs, target, present), present
    )
    step(model, bal, inputs, target, present)
    torch.testing.assert_close(bal.last_scores, expected_scores, rtol=1e-5, atol=1e-6)
    expected = torch.where(present.any(0), _ogm(expected_scores, 0.8), torch.ones(2))
    torch.testing.assert_close(bal.last_coefficients, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in HEADS if n.startswith(("multiloss", "joint"))])
@PROPERTY
@given(present=masks())
def test_head_gradients_are_those_of_the_present_sub_batches(name, present):
    """Head m's parameter gradient is that of its mean loss over the samples where m is present
    (the fused loss does not reach the heads; Multi-Loss scales nothing)."""
    model, bal = build(name)
    inputs, target = batch(name, present.shape[0])
    expected = []
    for index in range(present.shape[1]):
        rows = present[:, index]
        copy_model, copy_bal = twin(model, bal)
        if not rows.any():  # absent from the batch: no gradient at all
            expected.append(torch.zeros_like(head_gradients(copy_bal)[index]))
            continue
        step(copy_model, copy_bal, [x[rows] for x in inputs], target[rows])
        expected.append(head_gradients(copy_bal)[index])
    step(model, bal, inputs, target, present)
    for got, want in zip(head_gradients(bal), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", HEADS)
@PROPERTY
@given(present=masks(), seed=st.integers(0, 99))
def test_absent_rows_give_the_heads_exactly_no_gradient(name, present, seed):
    """Whatever the inputs of the absent rows hold, the heads' gradients are bitwise the same:
    each absent row contributes exactly zero."""
    model, bal = build(name)
    inputs, target = batch(name, present.shape[0])
    other_model, other_bal = twin(model, bal)
    g = torch.Generator().manual_seed(seed)
    noisy = []
    for index, x in enumerate(inputs):
        garbage = 1e3 * torch.randn(x.shape, generator=g)
        noisy.append(torch.where(present[:, index : index + 1], x, garbage))
    step(model, bal, inputs, target, present)
    step(other_model, other_bal, noisy, target, present)
    for got, want in zip(head_gradients(other_bal), head_gradients(bal)):
        assert torch.equal(got, want)


# --- an all-true mask is the unmasked step ----------------------------------------------------


@pytest.mark.parametrize("name", list(ALL_FACTORIES))
def test_an_all_true_mask_is_bitwise_the_unmasked_step(name):
    """Every method, over 3 steps with an optimizer: the same parameters, state, coefficients
    and scores, bit for bit, as a tensor mask or a dict."""
    model, bal = build(name)
    runs = []
    for form in (None, "tensor", "dict"):
        copy_model, copy_bal = twin(model, bal)
        opt = torch.optim.SGD([*copy_model.parameters(), *copy_bal.parameters()], lr=0.1)
        for index in range(3):
            inputs, target = batch(name, 8, seed=index)
            present = None if form is None else torch.ones(8, 2, dtype=torch.bool)
            if form == "dict":
                present = dict(zip(copy_bal.names, present.unbind(1)))
            optimizer_step(copy_model, copy_bal, opt, inputs, target, present)
        runs.append((flat_state(copy_model, copy_bal), copy_bal.coefficients, copy_bal.scores))
    for state, k, scores in runs[1:]:
        assert torch.equal(state, runs[0][0])
        assert k == runs[0][1] and scores == runs[0][2]


# --- a modality absent from the whole batch ---------------------------------------------------


@pytest.mark.parametrize("name", CORE)
@pytest.mark.parametrize("absent", [0, 1])
def test_a_modality_absent_from_the_batch_keeps_its_coefficient_and_score(name, absent):
    """Its k and score stay those of the step before; its head gets no gradient; the other
    modality's k uses the kept score; no NaN anywhere."""
    model, bal = build(name)
    inputs, target = batch(name, 8, seed=1)
    step(model, bal, inputs, target)  # a first, complete step
    before_k, before_s = bal.last_coefficients.clone(), bal.last_scores.clone()
    bal.zero_grad(set_to_none=True)
    present = torch.ones(8, 2, dtype=torch.bool)
    present[:, absent] = False
    loss = step(model, bal, *batch(name, 8, seed=2), present)
    assert torch.isfinite(loss)
    assert bal.last_coefficients[absent] == before_k[absent]
    assert bal.last_scores[absent] == before_s[absent]
    other = 1 - absent
    scores = bal.last_scores.clone()
    torch.testing.assert_close(
        bal.last_coefficients[other], EXPECTED_COEFFICIENTS[name](bal, scores)[other]
    )
    if bal.heads:
        assert not head_gradients(bal)[absent].any()
        assert head_gradients(bal)[other].any()


@pytest.mark.parametrize("name", ["mlb", "mlb_regression"])
def test_a_modality_absent_from_the_first_batch_moves_no_other_coefficient(name):
    """The first step has no previous score to keep: the absent modality's score is the present
    one's, so MLB's ratio is 1 and both coefficients stay 1."""
    model, bal = build(name)
    present = torch.ones(8, 2, dtype=torch.bool)
    present[:, 1] = False
    step(model, bal, *batch(name, 8), present)
    assert bal.last_scores[1] == bal.last_scores[0] > 0
    assert torch.equal(bal.last_coefficients, torch.ones(2))


def test_evaluation_loss_with_a_mask_changes_nothing():
    model, bal = build("mlb")
    inputs, target = batch("mlb", 6)
    present = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    with torch.no_grad():
        masked = bal.loss(model(*inputs), target, present=present)
        full = bal.loss(model(*inputs), target)
    assert bal.steps == 0 and not torch.equal(masked, full)


def test_the_loss_adds_each_heads_present_mean_to_the_fused_loss():
    """Multi-Loss's value: CE(fused) + sum_m mean over present samples of CE(head_m)."""
    model, bal = build("multiloss")
    inputs, target = batch("multiloss", 6)
    present = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 1], [1, 0], [0, 1]], dtype=torch.bool)
    loss = bal.loss(model(*inputs), target, present=present)
    with bal.paused():  # the reference's own forward is not a training step
        features = [tower(x) for tower, x in zip(model.towers, inputs)]
        expected = torch.nn.functional.cross_entropy(model(*inputs), target)
    for index, head in enumerate(bal.heads.values()):
        rows = present[:, index]
        expected = expected + torch.nn.functional.cross_entropy(
            head(features[index][rows]), target[rows]
        )
    torch.testing.assert_close(loss, expected)


# --- refused masks ----------------------------------------------------------------------------

FORM = "present= must be a (B, M) bool tensor"


def _refused():
    ones = torch.ones(6, dtype=torch.bool)
    return [
        pytest.param(torch.ones(6, 3, dtype=torch.bool), "got shape (6, 3)", id="shape"),
        pytest.param(torch.ones(5, 2, dtype=torch.bool), "got shape (5, 2)", id="batch"),
        pytest.param(torch.ones(6, 2), "got dtype torch.float32", id="dtype"),
        pytest.param(torch.ones(6, 2, dtype=torch.bool, device="meta"), "on meta", id="device"),
        pytest.param([[True, True]] * 6, "got list", id="list"),
        pytest.param({"towers_0": ones}, "leaves out ['towers_1']", id="missing-name"),
        pytest.param(
            {"towers_0": ones, "towers_1": ones, "audio": ones},
            "unknown encoders ['audio']",
            id="unknown-name",
        ),
        pytest.param(
            {"towers_0": ones, "towers_1": ones[:4]}, "entries of shapes [(6,), (4,)]", id="entry"
        ),
        pytest.param(
            {"towers_0": ones, "towers_1": ones.int()}, "got dtype torch.int32", id="entry-dtype"
        ),
    ]


@pytest.mark.parametrize("present, match", _refused())
def test_a_mask_of_the_wrong_form_is_refused(present, match):
    model, bal = build("mlb")
    inputs, target = batch("mlb", 6)
    with pytest.raises(InputError, match="present= must be") as error:
        bal.loss(model(*inputs), target, present=present)
    assert match in str(error.value)
    assert "towers_0" in str(error.value) and "B = 6" in str(error.value)
    assert bal.steps == 0


def test_a_sample_with_every_modality_absent_is_refused_with_its_index():
    model, bal = build("mlb")
    inputs, target = batch("mlb", 6)
    present = torch.ones(6, 2, dtype=torch.bool)
    present[[1, 4]] = False
    with pytest.raises(InputError, match=r"every modality absent .*\(samples \[1, 4\]\)"):
        bal.loss(model(*inputs), target, present=present)
    assert bal.steps == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device-side assertion needs CUDA")
def test_on_an_accelerator_a_sample_with_every_modality_absent_fails_on_the_device():
    torch.manual_seed(0)
    model, bal = build("mlb")
    model.cuda(), bal.cuda()
    inputs, target = batch("mlb", 6)
    present = torch.ones(6, 2, dtype=torch.bool, device="cuda")
    present[3] = False
    bal.loss(model(*[x.cuda() for x in inputs]), target.cuda(), present=present)
    with pytest.raises(RuntimeError):
        torch.cuda.synchronize()


def test_the_dict_form_equals_the_tensor_form():
    present = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 1]], dtype=torch.bool)
    results = []
    for form in (present, {"towers_1": present[:, 1], "towers_0": present[:, 0]}):
        model, bal = build("mlb")
        step(model, bal, *batch("mlb", 4), form)
        results.append((bal.last_coefficients, head_gradients(bal)))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


# --- the Step services a method builds on -----------------------------------------------------


class FeatureNorms(gb.Method):
    """Records each modality's mean feature norm over its present samples (a running state kept
    for a modality absent from the batch) and adds each modality's present-mean norm to the
    loss."""

    def __init__(self, *args, **options) -> None:
        super().__init__(*args, head_mode="none", **options)
        self.add_state("norms", torch.full((len(self.names),), -1.0))
        self.seen_norms: torch.Tensor | None = None

    def _loss(self, step: gb.Step) -> torch.Tensor:
        norms = torch.stack([f.norm(dim=1) for f in step.features.values()])  # (M, B)
        mean = step.modality_mean(step.present_sums(norms.detach()))
        if step.training:
            self.update_state(step, "norms", step.keep_if_seen(mean, self.norms))
            step.store(torch.ones_like(mean), mean)
        return step.fused_loss() + step.present_mean(norms).sum()


def test_a_method_built_on_the_step_services_uses_the_present_samples_only():
    torch.manual_seed(0)
    model = MultiTowerNet(INPUT_DIMS)
    bal = FeatureNorms(model, list(model.towers), 4)
    inputs, target = batch("joint", 6)
    present = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    loss = bal.loss(model(*inputs), target, present=present)
    with bal.paused():
        norms = [tower(x).norm(dim=1) for tower, x in zip(model.towers, inputs)]
        fused = torch.nn.functional.cross_entropy(model(*inputs), target)
    expected = torch.stack([n[present[:, m]].mean() for m, n in enumerate(norms)])
    torch.testing.assert_close(bal.norms, expected.detach())
    torch.testing.assert_close(loss, fused + expected.sum())
    loss.backward()
    absent = torch.tensor([[1, 0]] * 6, dtype=torch.bool)
    bal.loss(model(*inputs), target, present=absent).backward()
    assert bal.norms[1] == expected[1]  # kept: absent from the batch
    assert bal.last_scores[1] == expected[1]
