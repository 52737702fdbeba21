"""Missing modalities (``loss(..., present=)``) in AGM, PMR, MSLR, G-Blend and MMPareto.

Each method's statistic is taken over the samples where each modality is present: AGM's
Shapley losses and running means, PMR's prototypes and prototype scores, MSLR's validation
accuracies, G-Blend's training and held-out losses, MMPareto's gradient statistics. The
references are unmasked runs of copies on the present sub-batches, or the rule written plainly.
The shared pieces: ``missing_cases.py``; the all-true mask of every method: ``test_missing.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from missing_cases import batch, build, head_gradients, masks, step, sub_batch_scores, twin
from test_missing_ddp import check_one_process, missing_ranks  # noqa: F401 - the fixture

import gradbalance as gb
from gradbalance.methods._pareto import pareto_combination
from gradbalance.methods.pmr import batch_standardise

PROPERTY = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _absent_from(present: torch.Tensor, column: int) -> torch.Tensor:
    """``present`` with modality ``column`` absent everywhere (the other present)."""
    out = torch.ones_like(present)
    out[:, column] = False
    return out


# --- the heads and probes learn from the present samples only -----------------------------------

WITH_HEADS = {
    "agm": {"probes": True, "feature_dims": [12, 12]},  # heads built at once
    "pmr": {"probes": True},
    "mslr": {},
    "gblend": {},
    "mmpareto": {},
}
"""This file's methods with heads (G-Blend, MMPareto) or probes (MSLR by default)."""


@pytest.mark.parametrize("name", list(WITH_HEADS))
@PROPERTY
@given(present=masks(), seed=st.integers(0, 99))
def test_absent_rows_give_the_heads_exactly_no_gradient(name, present, seed):
    """Whatever the inputs of the absent rows hold, the heads' (probes') gradients are bitwise
    the same."""
    model, bal = build(name, **WITH_HEADS[name])
    inputs, target = batch(name, present.shape[0])
    other_model, other_bal = twin(model, bal)
    g = torch.Generator().manual_seed(seed)
    noisy = [
        torch.where(present[:, index : index + 1], x, 1e3 * torch.randn(x.shape, generator=g))
        for index, x in enumerate(inputs)
    ]
    step(model, bal, inputs, target, present)
    step(other_model, other_bal, noisy, target, present)
    assert bal.heads
    for got, want in zip(head_gradients(other_bal), head_gradients(bal)):
        assert torch.equal(got, want)


# --- AGM: Shapley losses and running means over the present samples -----------------------------


def agm_k(losses, running, alpha, cap=10.0):
    """AGM's k written out: r and o of the batch and running losses, k = exp(a min(o - r, cap))."""
    m = len(losses)
    ratio = lambda values, i: math.exp((sum(values) / m - values[i]) * m / (m - 1))  # noqa: E731
    return [
        math.exp(alpha * min(ratio(running, i) - ratio(losses, i), cap)) for i in range(m)
    ]


@pytest.mark.parametrize("name", ["agm", "agm_regression"])
@PROPERTY
@given(present=masks())
def test_agm_losses_scores_and_coefficients_are_those_of_the_present_sub_batches(name, present):
    model, bal = build(name)
    inputs, target = batch(name, present.shape[0])
    expected_scores = sub_batch_scores(model, bal, inputs, target, present)
    step(model, bal, inputs, target, present)
    seen = present.any(0)
    torch.testing.assert_close(bal.last_scores[seen], expected_scores[seen], rtol=1e-5, atol=1e-6)
    # the first step's running means are its losses (classification scores: exp(-l)); an absent
    # modality, never seen, stands at the present ones' mean loss, keeps its k (1) and its
    # running mean (0)
    sub_losses = expected_scores if name == "agm_regression" else -expected_scores.log()
    losses = torch.where(seen, sub_losses, sub_losses[seen].mean()).tolist()
    k = torch.where(seen, torch.tensor(agm_k(losses, [0.0, 0.0], bal.alpha)), torch.ones(2))
    torch.testing.assert_close(bal.last_coefficients, k, rtol=1e-5, atol=1e-6)
    running = torch.where(seen, sub_losses, 0.0)
    torch.testing.assert_close(bal.running_losses, running, rtol=1e-5, atol=1e-6)
    assert bal.modality_counts.tolist() == seen.long().tolist() and int(bal.running_count) == 1


@pytest.mark.parametrize("absent", [0, 1])
def test_agm_a_modality_absent_from_the_batch_keeps_its_running_mean_and_k(absent):
    model, bal = build("agm")
    step(model, bal, *batch("agm", 8, seed=1))
    first = bal.running_losses.clone()
    before_k, before_s = bal.last_coefficients.clone(), bal.last_scores.clone()
    inputs, target = batch("agm", 8, seed=2)
    copy_model, copy_bal = twin(model, bal)
    step(copy_model, copy_bal, inputs, target)  # the present modality's loss of this batch
    other = 1 - absent
    loss_other = float(-copy_bal.last_scores[other].log())
    step(model, bal, inputs, target, _absent_from(torch.ones(8, 2, dtype=torch.bool), absent))
    assert bal.last_coefficients[absent] == before_k[absent]
    assert bal.last_scores[absent] == before_s[absent]
    assert bal.running_losses[absent] == first[absent]
    assert bal.modality_counts.tolist() == [2 - (i == absent) for i in range(2)]
    assert int(bal.running_count) == 2
    running = (first[other] + loss_other) / 2
    torch.testing.assert_close(bal.running_losses[other], running, rtol=1e-5, atol=1e-6)
    losses = [0.0, 0.0]
    losses[other], losses[absent] = loss_other, float(first[absent])
    k = agm_k(losses, first.tolist(), bal.alpha)
    assert float(bal.last_coefficients[other]) == pytest.approx(k[other], rel=1e-5)


def test_agm_state_dict_without_modality_counts_loads():
    """A state dict of the release before missing modalities: every step had every modality."""
    model, bal = build("agm")
    for seed in range(3):
        step(model, bal, *batch("agm", 6, seed=seed))
    state = bal.state_dict()
    del state["modality_counts"]
    _, fresh = build("agm")
    fresh.load_state_dict(state)
    assert fresh.modality_counts.tolist() == [3, 3]
    assert torch.equal(fresh.running_losses, bal.running_losses)


# --- PMR: prototypes and prototype scores over the present samples ------------------------------


def pmr_weights_plainly(scores, alpha):
    """PMR for two modalities: alpha for the one with the lower score, none on a tie."""
    a, b = scores.tolist()
    return torch.tensor([alpha * (a < b), alpha * (b < a)], dtype=torch.float32)


@PROPERTY
@given(present=masks())
def test_pmr_scores_and_weights_are_those_of_the_present_sub_batches(present):
    model, bal = build("pmr")
    inputs, target = batch("pmr", present.shape[0])
    expected_scores = sub_batch_scores(model, bal, inputs, target, present)
    previous = bal.last_coefficients.clone()
    step(model, bal, inputs, target, present)
    seen = present.any(0)  # the first step has no score to keep: the present ones' mean
    expected_scores = torch.where(seen, expected_scores, expected_scores[seen].mean())
    torch.testing.assert_close(bal.last_scores, expected_scores, rtol=1e-5, atol=1e-6)
    weights = pmr_weights_plainly(expected_scores, bal.alpha)
    torch.testing.assert_close(bal.last_coefficients, torch.where(seen, weights, previous))


@PROPERTY
@given(present=masks())
def test_pmr_prototype_loss_averages_the_present_samples(present):
    """The loss is CE(fused) + sum_m w_m * mean over m's present samples of CE(-||z_m - c_m||)."""
    model, bal = build("pmr")
    inputs, target = batch("pmr", present.shape[0])
    loss = bal.loss(model(*inputs), target, present=present)
    with bal.paused():
        features = [tower(x) for tower, x in zip(model.towers, inputs)]
        expected = F.cross_entropy(model(*inputs), target)
    prototypes = bal.prototypes()
    for index, name in enumerate(bal.names):
        rows = present[:, index]
        if rows.any():
            distances = torch.cdist(features[index][rows], prototypes[name])
            term = F.cross_entropy(-distances, target[rows])
            expected = expected + bal.last_coefficients[index] * term
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@PROPERTY
@given(present=masks(min_batch=6, max_batch=12), explicit=st.booleans())
def test_pmr_prototypes_are_the_class_means_of_the_present_samples(present, explicit):
    torch.manual_seed(0)
    model, bal = build("pmr", prototypes="explicit" if explicit else "accumulate", momentum=0.0)
    bal.prototype_valid.zero_()  # forget the factory's pass: these prototypes only
    inputs, target = batch("pmr", present.shape[0])
    if explicit:
        with torch.no_grad():
            model(*inputs)
            bal.collect(target, present=present)
        bal.update_prototypes()
    else:
        bal.loss(model(*inputs), target, present=present).backward()
        bal.epoch_end()
    with torch.no_grad(), bal.paused():
        features = [tower(x) for tower, x in zip(model.towers, inputs)]
    for index, name in enumerate(bal.names):
        for c in range(4):
            rows = present[:, index] & (target == c)
            assert bool(bal.prototype_valid[index, c]) == bool(rows.any())
            if rows.any():
                want = features[index][rows].mean(0)
                torch.testing.assert_close(bal.prototypes()[name][c], want, rtol=1e-5, atol=1e-6)


def test_pmr_collect_refuses_a_bad_mask():
    model, bal = build("pmr")
    inputs, target = batch("pmr", 6)
    present = torch.ones(6, 2, dtype=torch.bool)
    present[4] = False
    cases = [
        (torch.ones(6, 3, dtype=torch.bool), r"present= must be .* got shape \(6, 3\)"),
        (present, r"every modality absent .*\(samples \[4\]\)"),
    ]
    for mask, match in cases:
        with torch.no_grad():
            model(*inputs)
            with pytest.raises(gb.errors.InputError, match=match):
                bal.collect(target, present=mask)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(st.booleans(), min_size=2, max_size=9).filter(any),
    seed=st.integers(0, 99),
)
def test_pmr_batch_standardise_uses_the_present_rows_statistics(rows, seed):
    x = torch.randn(len(rows), 3, generator=torch.Generator().manual_seed(seed))
    present = torch.tensor(rows)
    got = batch_standardise(x, present)
    torch.testing.assert_close(got[present], batch_standardise(x[present]), rtol=1e-5, atol=1e-5)
    assert torch.equal(batch_standardise(x, torch.ones_like(present)), batch_standardise(x))


def test_pmr_state_dict_with_shared_class_counts_loads():
    """A state dict of the release before missing modalities (one class count for all)."""
    model, bal = build("pmr")
    state = bal.state_dict()
    state["class_counts"] = state["class_counts"][0].clone()
    state["prototype_valid"] = state["prototype_valid"][0].clone()
    _, fresh = build("pmr")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.prototype_valid, bal.prototype_valid)
    assert torch.equal(fresh.class_counts, bal.class_counts)


# --- MSLR: validation accuracies over the present samples ---------------------------------------


def _validate(model, bal, inputs, target, present=None):
    with torch.no_grad():
        bal.loss(model(*inputs), target, present=present)


@PROPERTY
@given(present=masks())
def test_mslr_accuracies_are_those_of_the_present_sub_batches(present):
    model, bal = build("mslr")
    inputs, target = batch("mslr", present.shape[0])
    expected = []
    for index in range(2):
        rows = present[:, index]
        copy_model, copy_bal = twin(model, bal)
        if rows.any():
            _validate(copy_model, copy_bal, [x[rows] for x in inputs], target[rows])
            copy_bal.epoch_end()
        expected.append(copy_bal.accuracies[index])
    _validate(model, bal, inputs, target, present)
    bal.epoch_end()
    torch.testing.assert_close(bal.accuracies, torch.stack(expected))


def test_mslr_a_modality_absent_from_the_validation_keeps_its_accuracy_and_k():
    model, bal = build("mslr")
    for epoch in range(2):  # memory_epochs=1: the second epoch sets k from the trend
        _validate(model, bal, *batch("mslr", 8, seed=epoch))
        bal.epoch_end()
    before_acc, before_k = bal.accuracies.clone(), bal.epoch_coefficients.clone()
    memory = bal.memory.clone()
    inputs, target = batch("mslr", 8, seed=5)
    copy_model, copy_bal = twin(model, bal)
    _validate(copy_model, copy_bal, inputs, target)
    copy_bal.epoch_end()
    _validate(model, bal, inputs, target, _absent_from(torch.ones(8, 2, dtype=torch.bool), 1))
    bal.epoch_end()
    assert bal.accuracies[1] == before_acc[1] and bal.epoch_coefficients[1] == before_k[1]
    assert bal.accuracies[0] == copy_bal.accuracies[0]
    want = copy_bal.accuracies[0] / memory[-1, 0] * bal.initial[0]
    torch.testing.assert_close(bal.epoch_coefficients[0], want)
    assert torch.isfinite(bal.memory).all()


def test_mslr_state_dict_without_validation_counts_loads():
    model, bal = build("mslr")
    _validate(model, bal, *batch("mslr", 6))
    state = bal.state_dict()
    del state["validation_counts"]
    _, fresh = build("mslr")
    fresh.load_state_dict(state)
    assert fresh.validation_counts.tolist() == [6.0, 6.0]


# --- G-Blend: training and held-out losses over the present samples -----------------------------


def _component_means(bal, split):
    return bal.sums[split] / bal.counts[split]


@PROPERTY
@given(present=masks(), held_out=st.booleans())
def test_gblend_losses_are_those_of_the_present_sub_batches(present, held_out):
    """Each head's collected loss is its mean over the samples where its modality is present;
    the fused loss's is over the whole batch."""
    model, bal = build("gblend")
    inputs, target = batch("gblend", present.shape[0])
    split = 1 if held_out else 0
    run = _validate if held_out else step
    full_model, full_bal = twin(model, bal)
    run(full_model, full_bal, inputs, target)
    expected = [_component_means(full_bal, split)[0]]
    for index in range(2):
        rows = present[:, index]
        copy_model, copy_bal = twin(model, bal)
        if rows.any():
            run(copy_model, copy_bal, [x[rows] for x in inputs], target[rows])
        expected.append(_component_means(copy_bal, split)[1 + index])
    run(model, bal, inputs, target, present)
    got = _component_means(bal, split)
    seen = torch.cat([torch.tensor([True]), present.any(0)])
    torch.testing.assert_close(got[seen], torch.stack(expected)[seen], rtol=1e-5, atol=1e-6)
    counts = [present.shape[0], *present.sum(0).tolist()]
    assert bal.counts[split].tolist() == counts


def test_gblend_a_component_without_held_out_samples_keeps_its_weight():
    """The others share the rest in proportion to their G / O^2 scores; its reference stays."""
    model, bal = build("gblend")
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.5)
    present = torch.ones(8, 2, dtype=torch.bool)
    for epoch in range(3):
        opt.zero_grad()
        step(model, bal, *batch("gblend", 8, seed=epoch))
        opt.step()
        held_out = _absent_from(present, 1) if epoch == 2 else None
        _validate(model, bal, *batch("gblend", 8, seed=10 + epoch), held_out)
        if epoch == 2:
            previous, before = bal.previous.clone(), bal.loss_weights.clone()
            train_now = _component_means(bal, 0)
            val_now = _component_means(bal, 1)
        bal.epoch_end()
    gain = previous[1] - val_now
    change = (val_now - train_now) - (previous[1] - previous[0])
    scores = [max(g, 0.0) / max(o, 1e-3) ** 2 for g, o in zip(gain.tolist(), change.tolist())]
    scores[2] = 0.0  # video had no held-out sample: left out
    rest = 1 - float(before[2])
    want = [rest * s / sum(scores) for s in scores[:2]] + [float(before[2])]
    assert bal.loss_weights.tolist() == pytest.approx(want, rel=1e-5)
    assert torch.equal(bal.previous[:, 2], previous[:, 2])
    assert torch.isfinite(bal.gains).all() and torch.isfinite(bal.overfitting).all()


def test_gblend_state_dict_with_shared_counts_loads():
    model, bal = build("gblend")
    step(model, bal, *batch("gblend", 6))
    state = bal.state_dict()
    state["counts"] = state["counts"][:, 0].clone()
    del state["referenced"]
    _, fresh = build("gblend")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.counts, bal.counts)
    assert not fresh.referenced.any()


# --- MMPareto: the gradient statistics of the present samples -----------------------------------


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.booleans(), min_size=1, max_size=7).filter(any),
    seed=st.integers(0, 999),
    gamma=st.sampled_from([1.0, 1.5]),
)
def test_mmpareto_combination_is_that_of_the_present_rows(rows, seed, gamma):
    """Present rows: the combination of the present sub-batch; absent rows: g_mm unchanged."""
    g = torch.Generator().manual_seed(seed)
    g_mm, g_uni = torch.randn(2, len(rows), 3, generator=g, dtype=torch.float64).unbind()
    present = torch.tensor(rows)
    g_uni = torch.where(present.unsqueeze(1), g_uni, 0)  # a head gets no absent row
    got, stats = pareto_combination(g_mm, g_uni, gamma, present=present)
    want, want_stats = pareto_combination(g_mm[present], g_uni[present], gamma)
    torch.testing.assert_close(got[present], want)
    torch.testing.assert_close(stats, want_stats)
    assert torch.equal(got[~present], g_mm[~present])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mmpareto_encoder_gradients_and_cosines_with_a_mask(seed):
    """Against autograd: g_mm and g_uni at each encoder's output, the rule on the present rows
    (cosine and conflicts included), g_mm on the absent rows."""
    model, bal = build("mmpareto", seed=seed)
    inputs, target = batch("mmpareto", 9, seed=seed)
    present = torch.tensor(
        [[1, 1], [1, 0], [0, 1], [1, 1], [1, 0], [1, 1], [0, 1], [1, 1], [1, 0]], dtype=torch.bool
    )
    reference_model, reference_bal = twin(model, bal)
    step(model, bal, inputs, target, present)
    heads = reference_bal.heads
    with reference_bal.paused():
        outputs = [tower(x) for tower, x in zip(reference_model.towers, inputs)]
        fused = F.cross_entropy(reference_model.fusion(torch.cat(outputs, -1)), target)
    cosines = []
    for index, (name, z) in enumerate(zip(bal.names, outputs)):
        rows = present[:, index]
        (g_mm,) = torch.autograd.grad(fused, z, retain_graph=True)
        head_loss = F.cross_entropy(heads[name](z[rows]).float(), target[rows])
        (g_uni,) = torch.autograd.grad(head_loss, z, retain_graph=True)
        a, b = g_mm[rows].double(), g_uni[rows].double()
        cosines.append(float((a * b).sum() / (a.norm() * b.norm())))
        combined = g_mm.clone()
        combined[rows] = pareto_combination(a, b, bal.gamma)[0].to(g_mm.dtype)
        params = list(reference_model.towers[index].parameters())
        want = torch.autograd.grad(z, params, combined, retain_graph=True)
        for got, expected in zip(model.towers[index].parameters(), want):
            torch.testing.assert_close(got.grad, expected, rtol=1e-5, atol=1e-7)
    assert [float(c) for c in bal.cosines.values()] == pytest.approx(cosines, rel=1e-4)
    assert bal.conflicts.tolist() == [int(c < 0) for c in cosines]


@pytest.mark.parametrize("absent", [0, 1])
def test_mmpareto_a_modality_absent_from_the_batch_keeps_its_cosine(absent):
    model, bal = build("mmpareto")
    step(model, bal, *batch("mmpareto", 8, seed=1))
    cosines, conflicts = bal.cosine_values.clone(), bal.conflicts.clone()
    inputs, target = batch("mmpareto", 8, seed=2)
    copy_model, copy_bal = twin(model, bal)
    step(copy_model, copy_bal, inputs, target)
    model.zero_grad(set_to_none=True)
    step(model, bal, inputs, target, _absent_from(torch.ones(8, 2, dtype=torch.bool), absent))
    other = 1 - absent
    assert bal.cosine_values[absent] == cosines[absent]
    assert bal.conflicts[absent] == conflicts[absent]
    assert bal.cosine_values[other] != cosines[other]
    encoder = list(model.towers[absent].parameters())  # its rows all keep g_mm: Multi-Loss's
    with copy_bal.paused():  # the plain fused loss, no fork
        fused = F.cross_entropy(copy_model(*inputs), target)
    want = torch.autograd.grad(fused, list(copy_model.towers[absent].parameters()))
    for got, expected in zip(encoder, want):
        torch.testing.assert_close(got.grad, expected)


def test_mmpareto_refuses_a_mask_for_outputs_without_the_batch_first():
    class SequenceFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.audio = torch.nn.Linear(4, 6)
            self.video = torch.nn.Linear(4, 6)
            self.fusion = torch.nn.Linear(12, 3)

        def forward(self, a, v):  # (T, B, D) inputs, time first
            za, zv = self.audio(a), self.video(v)
            return self.fusion(torch.cat([za.mean(0), zv.mean(0)], -1))

    model = SequenceFirst()
    bal = gb.MMPareto(model, [model.audio, model.video], num_classes=3,
                      features=lambda out: out.mean(0))
    a, v, y = torch.randn(5, 4, 4), torch.randn(5, 4, 4), torch.tensor([0, 1, 2, 0])
    present = torch.tensor([[1, 1], [1, 0], [0, 1], [1, 1]], dtype=torch.bool)
    with pytest.raises(gb.errors.InputError, match="batch first"):
        bal.loss(model(a, v), y, present=present)


# --- DDP with uneven presence ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["agm", "agm_regression", "pmr", "mslr", "gblend", "mmpareto"])
def test_uneven_presence_under_ddp_equals_one_process(missing_ranks, name):  # noqa: F811
    """2 gloo ranks, rank 0 without the second modality: the coefficients, scores and heads'
    gradients of one process on the concatenated batch and mask; at a step where no rank has
    the second modality it keeps its k and score."""
    check_one_process(missing_ranks, name)
