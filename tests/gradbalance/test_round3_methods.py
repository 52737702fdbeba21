"""Contract tests of the third round of off-the-happy-path cases, one group per row:

* row 1: OGM-GE's noise std is that of the unscaled gradient for every k, 0 included;
* row 4: per-parameter scaling never leaves a re-parametrized or replaced parameter unscaled;
* row 5: AGM with many modalities: the cost is announced, and a sampled Shapley estimate;
* row 7: ``PMR(batch_norm=True)`` on a batch of one sample.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import MultiTowerNet, make_batch
from contract_models import ConvTowerNet, conv_batch

import gradbalance as gb
from gradbalance.coefficients import ogm_coefficients


def plain_gradients(model, inputs, target):
    """``{parameter name: gradient}`` of the plain fused cross-entropy on a deep copy."""
    reference = copy.deepcopy(model)
    names = [name for name, _ in reference.named_parameters()]
    loss = F.cross_entropy(reference(*inputs), target)
    grads = torch.autograd.grad(loss, [p for _, p in reference.named_parameters()])
    return dict(zip(names, grads))


# -- row 1: OGM-GE's noise for every k, 0 included -------------------------------------------


def _ogm_ge_case(parameters):
    torch.manual_seed(0)
    if parameters == "conv":
        model = ConvTowerNet(channels=6)
        inputs, target = conv_batch(batch=8)
    else:
        model = MultiTowerNet((5, 7))
        inputs, target = make_batch((5, 7), batch=12)
    return model, inputs, target


@pytest.mark.parametrize("parameters", ["encoder", "conv"])
@pytest.mark.parametrize("alpha", [50.0, 6.0, 0.8])  # k = 0 exactly, k ~ 1e-5, k ~ 0.1
def test_row1_ogm_ge_noise_std_is_the_unscaled_gradients_for_every_k(parameters, alpha):
    model, inputs, target = _ogm_ge_case(parameters)
    plain = plain_gradients(model, inputs, target)
    bal = gb.OGMGE(
        model, list(model.towers), num_classes=4, alpha=alpha, parameters=parameters, seed=3
    )
    bal.loss(model(*inputs), target).backward()
    bal.after_backward()
    k = [float(v) for v in bal.coefficients.values()]
    scores = bal.last_scores.clone()
    expected_k = ogm_coefficients(scores, alpha)  # k applied by hand below
    assert k == expected_k.tolist()
    if alpha == 50.0:
        assert min(k) == 0.0
    # The official update, g <- k g + N(0, (std(g) + 1e-8)^2), std of the unscaled g, the
    # draws of each modality taken as one block in parameter order.
    generator = torch.Generator().manual_seed(3)
    selected = (lambda p: p.dim() == 4) if parameters == "conv" else (lambda p: True)
    for m, tower in enumerate(model.towers):
        prefix = f"towers.{m}."
        noised = [
            (name, p)
            for name, p in model.named_parameters()
            if name.startswith(prefix) and selected(p) and p.numel() > 1
        ]
        draws = torch.randn(sum(p.numel() for _, p in noised), generator=generator)
        for (name, p), noise in zip(noised, draws.split([p.numel() for _, p in noised])):
            g = plain[name]
            expected = k[m] * g + noise.view_as(g) * (g.std() + 1e-8)
            torch.testing.assert_close(p.grad, expected, atol=1e-6, rtol=1e-4)
    fusion = dict(model.named_parameters())
    for name, g in plain.items():
        if name.startswith("fusion."):
            torch.testing.assert_close(fusion[name].grad, g)


def test_row1_ogm_ge_k_zero_noise_is_not_the_epsilon():
    """The symptom: with k = 0 the dominant encoder's noise had std 1e-8."""
    model, inputs, target = _ogm_ge_case("encoder")
    plain = plain_gradients(model, inputs, target)
    bal = gb.OGMGE(model, list(model.towers), num_classes=4, alpha=50.0, seed=0)
    bal.loss(model(*inputs), target).backward()
    bal.after_backward()
    dominant = min(range(2), key=lambda m: float(bal.last_coefficients[m]))
    weight = model.towers[dominant][0].weight
    ratio = weight.grad.std() / plain[f"towers.{dominant}.0.weight"].std()
    assert 0.7 < float(ratio) < 1.3  # 60 draws: the std estimate is within ~10%


# -- row 7: PMR(batch_norm=True) on a batch of one -------------------------------------------


def _pmr_with_prototypes(source):
    torch.manual_seed(0)
    model = MultiTowerNet((5, 7))
    bal = gb.PMR(
        model, list(model.towers), num_classes=4, batch_norm=True, prototypes=source, momentum=0.0
    )
    inputs, target = make_batch((5, 7), batch=16)
    if source == "explicit":
        with torch.no_grad():
            model(*inputs)
            bal.collect(target)
    else:
        bal.loss(model(*inputs), target)
    bal.update_prototypes()
    return model, bal


@pytest.mark.parametrize("source", ["accumulate", "explicit"])
def test_row7_pmr_batch_norm_batch_of_one_is_defined(source):
    model, bal = _pmr_with_prototypes(source)
    prototypes = bal.prototypes()
    inputs, target = make_batch((5, 7), batch=1, seed=5)
    plain = plain_gradients(model, inputs, target)
    loss = bal.loss(model(*inputs), target)  # was: ValueError (BatchNorm on one value)
    assert torch.isfinite(loss)
    loss.backward()
    # The standardised feature of a batch of one is 0: no prototype gradient reaches the
    # encoders, the step trains as the fused cross-entropy ...
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], atol=1e-7, rtol=1e-6)
    # ... and adds nothing to the next prototypes.
    bal.update_prototypes()
    for name, before in prototypes.items():
        torch.testing.assert_close(bal.prototypes()[name], before)
    logits = bal.prototype_logits()
    for name, proto in bal.prototypes().items():
        torch.testing.assert_close(logits[name], -proto.norm(dim=1).unsqueeze(0))


def test_row7_pmr_batch_norm_standardisation_is_batch_norm_for_larger_batches():
    z = torch.randn(9, 6, dtype=torch.float64).float()
    reference = F.batch_norm(z, None, None, training=True, momentum=0.0, eps=1e-5)
    torch.testing.assert_close(gb.methods.pmr.batch_standardise(z), reference)
