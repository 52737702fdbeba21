"""The sharp edges: one meaning of unimodal_logits(), fused-head slices by name, AGM's fusion
forms, MMCosineHead's call forms and the warning of a loop that skips epoch_end()."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradbalance as gb
from gradbalance.errors import (
    ConfigurationError,
    InputError,
    MissingCallWarning,
    UnavailableError,
)

Y = torch.tensor([0, 1, 2, 0, 1, 2])


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(6, 8, generator=generator), torch.randn(6, 6, generator=generator)


def net(seed: int = 0) -> gb.testing.TwoTowerNet:
    torch.manual_seed(seed)
    return gb.testing.TwoTowerNet()


def cat_fusion(model):
    return lambda a, v: model.fusion(torch.cat([a, v], 1))


BUILDERS = {
    "joint": lambda m, **o: gb.Joint(m, [m.audio, m.video], 3, **o),
    "agm": lambda m, **o: gb.AGM(m, [m.audio, m.video], 3, fusion=cat_fusion(m), **o),
    "pmr": lambda m, **o: gb.PMR(m, [m.audio, m.video], 3, **o),
    "ogm-fused": lambda m, **o: gb.OGM(m, [m.audio, m.video], 3, fusion_head=m.fusion, **o),
    "ogmge-fused": lambda m, **o: gb.OGMGE(m, [m.audio, m.video], 3, fusion_head=m.fusion, **o),
    "mslr-fused": lambda m, **o: gb.MSLR(m, [m.audio, m.video], 3, fusion_head=m.fusion, **o),
}


# --- unimodal_logits(): a classifier of the modality alone, or a clear error ----------------


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_without_a_unimodal_classifier_the_error_names_the_fix(name):
    model = net()
    bal = BUILDERS[name](model)
    bal.loss(model(*batch()), Y).backward()
    with pytest.raises(UnavailableError, match=r"probes=True") as caught:
        bal.unimodal_logits()
    assert isinstance(caught.value, RuntimeError)
    assert ("modality_slices()" in str(caught.value)) == name.endswith("-fused")


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_probes_are_linear_heads_on_the_detached_features(name):
    model = net()
    bal = BUILDERS[name](model, probes=True)
    audio, video = batch()
    loss = bal.loss(model(audio, video), Y)
    loss.backward()
    logits = bal.unimodal_logits()
    with torch.no_grad():  # the reference: each probe applied by hand to the encoder's output
        for tower, x in (("audio", audio), ("video", video)):
            head = bal.heads[tower]
            expected = getattr(model, tower)(x) @ head.weight.T + head.bias
            torch.testing.assert_close(logits[tower], expected)
            assert not logits[tower].requires_grad
    assert all(p.grad is not None for p in bal.heads.parameters())


@pytest.mark.parametrize("name", ["agm", "pmr", "ogm-fused", "mslr-fused"])
def test_probes_never_change_what_reaches_the_model(name):
    runs = []
    for probes in (False, True):
        model = net()
        bal = BUILDERS[name](model, probes=probes)
        for step in range(3):
            model.zero_grad()
            bal.loss(model(*batch(step)), Y).backward()
            bal.after_backward()
        runs.append((model, bal))
    (plain, plain_bal), (probed, probed_bal) = runs
    for a, b in zip(plain.parameters(), probed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    torch.testing.assert_close(plain_bal.last_coefficients, probed_bal.last_coefficients)
    # The returned loss gains exactly the probes' cross-entropy (a plain sum, written out).
    audio, video = batch(9)
    with torch.no_grad():
        with probed_bal.paused():
            expected = F.cross_entropy(probed(audio, video), Y) + sum(
                F.cross_entropy(probed_bal.heads[t](getattr(probed, t)(x)), Y)
                for t, x in (("audio", audio), ("video", video))
            )
        torch.testing.assert_close(probed_bal.loss(probed(audio, video), Y), expected)


@pytest.mark.parametrize("name", ["ogm-fused", "ogmge-fused", "mslr-fused"])
def test_modality_slices_are_the_fused_heads_blocks(name):
    model = net()
    bal = BUILDERS[name](model)
    audio, video = batch()
    bal.loss(model(audio, video), Y).backward()
    slices = bal.modality_slices()
    weight, bias = model.fusion.weight, model.fusion.bias
    with torch.no_grad():  # W_m z_m + b / 2, written out
        torch.testing.assert_close(
            slices["audio"], model.audio(audio) @ weight[:, :16].T + bias / 2
        )
        torch.testing.assert_close(
            slices["video"], model.video(video) @ weight[:, 16:].T + bias / 2
        )


def test_modality_slices_without_a_fused_head_say_to_read_the_probes():
    model = net()
    bal = gb.OGM(model, [model.audio, model.video], 3)
    bal.loss(model(*batch()), Y).backward()
    assert sorted(bal.unimodal_logits()) == ["audio", "video"]
    with pytest.raises(UnavailableError, match=r"without fusion_head.*unimodal_logits\(\)"):
        bal.modality_slices()


# --- AGM: a fused head over the concatenated features ---------------------------------------


def agm_run(fusion_of, **options):
    model = net()
    bal = gb.AGM(
        model, [model.audio, model.video], 3, alpha=1.0, fusion=fusion_of(model), **options
    )
    for step in range(3):
        model.zero_grad()
        loss = bal.loss(model(*batch(step)), Y)
        loss.backward()
    return bal, loss, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "fusion_of",
    [
        lambda m: m.fusion,  # the nn.Linear itself
        lambda m: nn.Sequential(m.fusion),  # a module taking one tensor
        lambda m: lambda z: m.fusion(z),  # a one-argument function
    ],
    ids=["linear", "sequential", "function"],
)
def test_agm_concatenates_for_a_one_tensor_head(fusion_of):
    bal, loss, grads = agm_run(fusion_of)
    assert bal.fusion_call == "concatenated"
    reference, ref_loss, ref_grads = agm_run(cat_fusion)  # the explicit per-modality form
    assert reference.fusion_call == "per-modality"
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(bal.last_coefficients, reference.last_coefficients, rtol=0, atol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_agm_calls_a_per_modality_head_with_one_argument_per_modality():
    model = net()
    head = gb.MMCosineHead([16, 16], 3)
    bal = gb.AGM(model, [model.audio, model.video], 3, fusion=head)
    assert bal.fusion_call == "per-modality"


def test_agm_without_fusion_says_exactly_what_to_pass():
    model = net()
    with pytest.raises(ConfigurationError) as caught:
        gb.AGM(model, [model.audio, model.video], 3)
    assert str(caught.value) == (
        "masking='feature' needs fusion=, the model's fused head, called on the features in "
        "encoder order: either fusion(z_1, ..., z_M) (a head taking one feature tensor per "
        "modality), or a head taking one tensor (e.g. nn.Linear(sum of the feature widths, "
        "num_classes)), which the balancer calls on torch.cat([z_1, ..., z_M], dim=-1); or use "
        "masking='input' with forward_masked=callable(masked: frozenset of encoder names) -> "
        "fused logits"
    )


def test_agm_linear_of_the_wrong_width_is_refused_with_the_widths():
    model = net()
    wrong = nn.Linear(20, 3)
    message = (
        r"AGM: fusion is an nn.Linear with in_features=20, but the concatenated features have "
        r"width 32 \(widths \[16, 16\] in encoder order\)"
    )
    with pytest.raises(ConfigurationError, match=message):  # widths known: at construction
        gb.AGM(model, [model.audio, model.video], 3, fusion=wrong, feature_dims=16)
    bal = gb.AGM(model, [model.audio, model.video], 3, fusion=wrong)
    with pytest.raises(InputError, match=message):  # else at the first training step
        bal.loss(model(*batch()), Y)


def test_agm_refuses_a_one_tensor_head_on_raw_outputs():
    model = net()
    with pytest.raises(ConfigurationError, match="fusion must take one argument per modality"):
        gb.AGM(model, [model.audio, model.video], 3, fusion=model.fusion, fusion_inputs="outputs")


# --- MMCosineHead: separate arguments or one list -------------------------------------------


def test_mmcosine_head_takes_a_list_or_tuple_of_features():
    head = gb.MMCosineHead([8, 6], 3)
    a, v = batch()
    expected = head(a, v)
    torch.testing.assert_close(head([a, v]), expected, rtol=0, atol=0)
    torch.testing.assert_close(head((a, v)), expected, rtol=0, atol=0)
    for one, other in zip(head.modality_logits([a, v]), head.modality_logits(a, v)):
        torch.testing.assert_close(one, other, rtol=0, atol=0)
    # The reference: s * cos(z_m, w_m) summed over the modalities, written out.
    manual = sum(
        10.0 * (z / z.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
        for z, w in zip((a, v), head.weights)
    )
    torch.testing.assert_close(expected, manual)


def test_mmcosine_head_wrong_count_states_the_call_convention():
    head = gb.MMCosineHead([8, 6], 3)
    with pytest.raises(ValueError) as caught:
        head(torch.randn(2, 8))
    assert str(caught.value) == (
        "MMCosineHead takes one feature tensor per modality, as head(z_1, ..., z_M) or "
        "head([z_1, ..., z_M]): it was built for 2 modalities, got 1"
    )


@pytest.mark.parametrize("cls", [gb.GBlend, gb.MMPareto], ids=["gblend", "mmpareto"])
def test_methods_with_trained_heads_return_them_as_unimodal_logits(cls):
    model = net()
    bal = cls(model, [model.audio, model.video], 3)
    bal.loss(model(*batch()), Y).backward()
    features, logits = bal.features(), bal.unimodal_logits()
    for name in ("audio", "video"):
        assert torch.allclose(logits[name], bal.heads[name](features[name]), atol=1e-6)


# --- forgotten epoch_end() ------------------------------------------------------------------


EPOCH_METHODS = {
    "pmr": lambda m: gb.PMR(m, [m.audio, m.video], 3),
    "mslr": lambda m: gb.MSLR(m, [m.audio, m.video], 3),
    "ogm-window": lambda m: gb.OGM(m, [m.audio, m.video], 3, window=(0, 50)),
    "pmr-blend": lambda m: gb.PMR(m, [m.audio, m.video], 3, prototypes="explicit",
                                  first_blend_epoch=1),
    "gblend": lambda m: gb.GBlend(m, [m.audio, m.video], 3),
}  # fmt: skip
NO_EPOCH_METHODS = {
    "mlb": lambda m: gb.MLB(m, [m.audio, m.video], 3),
    "joint": lambda m: gb.Joint(m, [m.audio, m.video], 3),
    "ogm": lambda m: gb.OGM(m, [m.audio, m.video], 3),
    "pmr-explicit": lambda m: gb.PMR(m, [m.audio, m.video], 3, prototypes="explicit"),
    "mmpareto": lambda m: gb.MMPareto(m, [m.audio, m.video], 3),
}


def epochs(bal, model, *, call_epoch_end, evaluation="no_grad", count=3):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(count):
            for step in range(2):
                bal.loss(model(*batch(step)), Y).backward()
            if evaluation == "no_grad":
                with torch.no_grad():
                    bal.loss(model(*batch(5)), Y)
            elif evaluation == "eval":
                model.eval()
                model(*batch(5))
                model.train()
            elif evaluation == "paused":
                with bal.paused(), torch.no_grad():
                    model(*batch(5))
            if call_epoch_end:
                bal.epoch_end()
    return [w for w in caught if issubclass(w.category, MissingCallWarning)]


@pytest.mark.parametrize("name", sorted(EPOCH_METHODS))
def test_a_loop_without_epoch_end_warns_once(name):
    model = net()
    bal = EPOCH_METHODS[name](model)
    caught = epochs(bal, model, call_epoch_end=False)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith(f"{type(bal).__name__} needs bal.epoch_end() once per training")
    assert "MissingCallWarning" in message  # says how to silence it
    assert message == gb._duties.epoch_end_message(type(bal).__name__, bal.epoch_end_reason())


@pytest.mark.parametrize("name", sorted(EPOCH_METHODS))
def test_a_loop_with_epoch_end_does_not_warn(name):
    model = net()
    assert epochs(EPOCH_METHODS[name](model), model, call_epoch_end=True) == []


@pytest.mark.parametrize("name", sorted(NO_EPOCH_METHODS))
def test_methods_that_do_not_need_epoch_end_never_warn(name):
    model = net()
    bal = NO_EPOCH_METHODS[name](model)
    assert bal.epoch_end_reason() is None
    assert epochs(bal, model, call_epoch_end=False) == []


def test_an_eval_mode_pass_counts_and_a_paused_pass_does_not():
    model = net()
    assert len(epochs(gb.PMR(model, [model.audio, model.video], 3), model,
                      call_epoch_end=False, evaluation="eval")) == 1  # fmt: skip
    model = net()
    assert epochs(gb.PMR(model, [model.audio, model.video], 3), model,
                  call_epoch_end=False, evaluation="paused") == []  # fmt: skip


def test_the_pmr_reason_is_what_goes_wrong():
    model = net()
    bal = gb.PMR(model, [model.audio, model.video], 3)
    epochs(bal, model, call_epoch_end=False)
    # Without epoch_end() PMR never gets prototypes: every weight stays 0 (it trains as Joint).
    assert not bal.ready and float(bal.last_coefficients.abs().sum()) == 0.0
    assert "trains as Joint" in bal.epoch_end_reason()


def test_agm_clip_without_after_backward_warns_once():
    model = net()
    bal = gb.AGM(model, [model.audio, model.video], 3, fusion=model.fusion, clip=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(52):
            bal.loss(model(*batch(step % 3)), Y).backward()
    missing = [w for w in caught if issubclass(w.category, MissingCallWarning)]
    assert len(missing) == 1 and "after_backward()" in str(missing[0].message)
    model = net()
    bal = gb.AGM(model, [model.audio, model.video], 3, fusion=model.fusion, clip=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(52):
            bal.loss(model(*batch(step % 3)), Y).backward()
            bal.after_backward()
    assert not [w for w in caught if issubclass(w.category, MissingCallWarning)]


def test_the_bookkeeping_keeps_the_balancer_picklable():
    import pickle

    model = net()
    bal = gb.PMR(model, [model.audio, model.video], 3)
    epochs(bal, model, call_epoch_end=True, count=1)
    copy = pickle.loads(pickle.dumps(bal))
    assert copy.epoch == 1 and copy.epoch_end_reason() == bal.epoch_end_reason()
