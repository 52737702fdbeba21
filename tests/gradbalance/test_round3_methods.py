"""Contract tests of the third round of off-the-happy-path cases, one group per row:

* row 1: OGM-GE's noise std is that of the unscaled gradient for every k, 0 included;
* row 4: per-parameter scaling never leaves a re-parametrized or replaced parameter unscaled;
* row 5: AGM with many modalities: the cost is announced, and a sampled Shapley estimate;
* row 7: ``PMR(batch_norm=True)`` on a batch of one sample.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import MultiTowerNet, make_batch
from contract_models import ConvTowerNet, conv_batch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

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
    for m in range(len(model.towers)):
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


# -- row 4: per-parameter scaling and a model changed after the balancer ---------------------


def _per_parameter_balancer(method, model):
    """Each method of ``gb.METHODS`` that scales gradients per parameter, on a conv model."""
    if method == "mlb":  # the fused head's weight(s), scaled with the first modality
        weights = [p for name, p in model.fusion.named_parameters() if "bias" not in name]
        return gb.MLB(
            model,
            list(model.towers),
            num_classes=4,
            feature_dims=[4, 4],
            extra_parameters={"towers_0": weights},
        )
    if method == "inforeg":
        return gb.InfoReg(model, list(model.towers), num_classes=4, feature_dims=[4, 4])
    return gb.METHODS[method](
        model, list(model.towers), num_classes=4, feature_dims=[4, 4], parameters="conv"
    )


PER_PARAMETER = ("mlb", "ogm", "ogm_ge", "amss", "amss_plus", "inforeg")
"""Methods that scale (or, AMSS and InfoReg, change in ``after_backward()``) the gradients of
parameters they chose at construction."""


def _scaled_layer(method, model):
    """(parent, attribute) of the layer holding a per-parameter-scaled weight."""
    return (model, "fusion") if method == "mlb" else (model.towers[0], "0")


class LowRankAdapter(nn.Module):
    """A LoRA-style adapter: the wrapped layer plus a trainable low-rank update of its output."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        width = base.out_channels if isinstance(base, nn.Conv2d) else base.out_features
        shape = (width, 1, 1, 1) if isinstance(base, nn.Conv2d) else (width,)
        self.delta = nn.Parameter(torch.zeros(shape))

    def forward(self, x):
        out = self.base(x)
        delta = self.delta if out.dim() == 2 else self.delta.view(1, -1, 1, 1)
        return out + delta


class Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


def _weight_norm(parent, attribute):
    parametrizations.weight_norm(getattr(parent, attribute))


def _custom_parametrization(parent, attribute):
    parametrize.register_parametrization(getattr(parent, attribute), "weight", Doubled())


def _adapter(parent, attribute):
    setattr(parent, attribute, LowRankAdapter(getattr(parent, attribute)))


CHANGES = {
    "weight_norm": _weight_norm,
    "parametrize": _custom_parametrization,
    "adapter": _adapter,
}


def test_row4_covers_every_method_with_per_parameter_scaling():
    def options(cls):
        names = set()
        for klass in cls.__mro__:
            if "__init__" in vars(klass):
                names |= set(inspect.signature(klass.__init__).parameters)
        return names

    per_parameter = {
        name
        for name, cls in gb.METHODS.items()
        if {"parameters", "extra_parameters"} & options(cls)
    }
    assert per_parameter | {"inforeg"} == set(PER_PARAMETER)  # InfoReg: every parameter


@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("method", PER_PARAMETER)
def test_row4_model_changed_after_the_balancer_is_refused_at_next_loss(method, change):
    torch.manual_seed(0)
    model = ConvTowerNet()
    inputs, target = conv_batch()
    bal = _per_parameter_balancer(method, model)
    bal.loss(model(*inputs), target).backward()
    parent, attribute = _scaled_layer(method, model)
    scaled = "fusion.weight" if method == "mlb" else "towers.0.0.weight"
    CHANGES[change](parent, attribute)
    for _ in range(2):  # every training step, not only the first after the change
        with pytest.raises(gb.errors.OrderError, match=re.escape(repr(scaled))) as error:
            bal.loss(model(*inputs), target)
        assert "bal.remove()" in str(error.value)
    # The fix: a balancer built on the changed model trains, with the old one's state.
    bal.remove()
    fresh = _per_parameter_balancer(method, model)
    if method == "inforeg":  # its epoch-start copy is of the replaced parameters: not loadable
        with pytest.raises(RuntimeError, match="epoch_start"):
            fresh.load_state_dict(bal.state_dict())
        fresh.loss(model(*inputs), target).backward()
        return
    fresh.load_state_dict(bal.state_dict())
    fresh.loss(model(*inputs), target).backward()
    assert fresh.steps == 2


@pytest.mark.parametrize("method", ("ogm", "ogm_ge"))
def test_row4_new_parameter_matching_the_rule_is_refused(method):
    torch.manual_seed(0)
    model = ConvTowerNet()
    inputs, target = conv_batch()
    bal = _per_parameter_balancer(method, model)
    bal.loss(model(*inputs), target).backward()
    model.towers[1][0].register_parameter("extra", nn.Parameter(torch.zeros(4, 1, 1, 1)))
    with pytest.raises(gb.errors.OrderError, match=re.escape("'towers.1.0.extra'")):
        bal.loss(model(*inputs), target)


@pytest.mark.parametrize("method", PER_PARAMETER)
def test_row4_unrelated_changes_train_on_with_the_same_gradients(method):
    torch.manual_seed(0)
    model = ConvTowerNet()
    inputs, target = conv_batch()
    twin = copy.deepcopy(model)
    torch.manual_seed(1)
    bal = _per_parameter_balancer(method, model)
    torch.manual_seed(1)  # the same heads
    reference = _per_parameter_balancer(method, twin)
    model.extra = nn.Linear(2, 2)  # a new layer outside what is scaled: no alarm
    model.towers[0].add_module("spare", nn.Identity())
    bal.loss(model(*inputs), target).backward()
    reference.loss(twin(*inputs), target).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    # Still watched, the new modules included.
    _weight_norm(*_scaled_layer(method, model))
    with pytest.raises(gb.errors.OrderError):
        bal.loss(model(*inputs), target)


# -- row 5: AGM over many modalities ---------------------------------------------------------


def _agm_case(num_modalities, hidden=4):
    """A model of M towers whose fusion has interactions (so the Shapley values are not the
    modalities' separate contributions), its features and fused logits."""
    torch.manual_seed(0)
    dims = (3,) * num_modalities
    model = MultiTowerNet(dims, hidden=hidden)
    inputs, target = make_batch(dims, batch=6)

    def fusion(*z):
        product = z[0] * z[1] if len(z) == 2 else z[0] * z[1] + z[1] * z[2]
        return model.fusion(torch.cat(z, 1)) + torch.tanh(product)[:, :4]

    with torch.no_grad():
        features = [tower(x) for tower, x in zip(model.towers, inputs)]
        logits = fusion(*features)
    names = [f"towers_{m}" for m in range(num_modalities)]
    return model, fusion, dict(zip(names, features)), logits, (inputs, target)


def _masked_fusion(fusion, features, coalition):
    """``f(S)``: the fusion with the features outside ``coalition`` zeroed."""
    values = list(features.values())
    return fusion(*(z if m in coalition else torch.zeros_like(z) for m, z in enumerate(values)))


def plain_permutation_estimate(fusion, features, logits, orders):
    """The permutation estimate written plainly: each modality's marginal contribution
    ``f(before + m) - f(before)`` (``f(empty) = 0``, ``f(all)`` the fused logits) averaged
    over the orders."""
    num_modalities = len(features)
    phi = torch.zeros(num_modalities, *logits.shape)
    for order in orders:
        before, previous = set(), torch.zeros_like(logits)
        for m in order:
            before = before | {m}
            if len(before) == num_modalities:
                current = logits
            else:
                current = _masked_fusion(fusion, features, before)
            phi[m] += current - previous
            previous = current
    return phi / len(orders)


def test_row5_agm_exact_over_many_modalities_warns_with_the_pass_count():
    model, fusion, *_ = _agm_case(9)
    with pytest.warns(gb.errors.CostWarning, match="runs 510 masked fusion passes per"):
        bal = gb.AGM(model, list(model.towers), num_classes=4, fusion=fusion)
    bal.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gb.AGM(model, list(model.towers), num_classes=4, fusion=fusion, shapley="exact").remove()
        small, small_fusion, *_ = _agm_case(8)  # 254 passes: the documented limit
        gb.AGM(small, list(small.towers), num_classes=4, fusion=small_fusion).remove()


@pytest.mark.parametrize("num_modalities", [2, 3, 4])
def test_row5_agm_sampled_against_a_plain_permutation_estimate(num_modalities):
    model, fusion, features, logits, _ = _agm_case(num_modalities)
    bal = gb.AGM(
        model,
        list(model.towers),
        num_classes=4,
        fusion=fusion,
        shapley="sampled",
        shapley_samples=5,
        shapley_seed=11,
    )
    # The documented draw: the argsort of uniform draws of a CPU generator seeded with
    # shapley_seed, shapley_samples orders per step.
    generator = torch.Generator().manual_seed(11)
    for _ in range(3):
        orders = torch.rand(5, num_modalities, generator=generator).argsort(dim=1).tolist()
        expected = plain_permutation_estimate(fusion, features, logits, orders)
        phi = bal.shapley_logits(logits, features)
        torch.testing.assert_close(phi, expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(phi.sum(0), logits, atol=1e-6, rtol=1e-5)  # efficiency


@pytest.mark.parametrize("num_modalities", [3, 4])
def test_row5_agm_sampled_is_unbiased_mean_over_seeds_is_exact(num_modalities):
    model, fusion, features, logits, _ = _agm_case(num_modalities)
    exact_bal = gb.AGM(model, list(model.towers), num_classes=4, fusion=fusion, shapley="exact")
    exact = exact_bal.shapley_logits(logits, features)
    exact_bal.remove()
    # All M! orders, each once, give the exact value: the estimate's expectation.
    orders = [list(p) for p in itertools.permutations(range(num_modalities))]
    everything = plain_permutation_estimate(fusion, features, logits, orders)
    torch.testing.assert_close(everything, exact, atol=1e-6, rtol=1e-5)
    draws = []
    for seed in range(300):
        bal = gb.AGM(
            model,
            list(model.towers),
            num_classes=4,
            fusion=fusion,
            shapley="sampled",
            shapley_samples=1,
            shapley_seed=seed,
        )
        draws.append(bal.shapley_logits(logits, features).detach())
        bal.remove()
    draws = torch.stack(draws)
    spread = draws.std(0)
    assert float(spread.max()) > 1e-3  # the estimate does vary (the fusion has interactions)
    error = (draws.mean(0) - exact).abs()
    assert bool((error <= 5 * spread / len(draws) ** 0.5 + 1e-6).all())


def test_row5_agm_sampled_at_sixteen_modalities_runs_a_bounded_number_of_passes():
    model, fusion, _, _, (inputs, target) = _agm_case(16)
    calls = []

    def counted(*z):
        calls.append(1)
        return fusion(*z)

    bal = gb.AGM(
        model, list(model.towers), num_classes=4, fusion=counted, shapley="sampled",
        shapley_samples=4,
    )
    logits = model(*inputs)
    calls.clear()
    bal.loss(logits, target).backward()
    assert 0 < len(calls) <= 4 * 15  # exact: 65,534
    assert all(p.grad is not None for p in model.towers[15].parameters())


def test_row5_agm_sampled_orders_are_the_same_on_every_rank_and_after_a_checkpoint():
    model, fusion, features, logits, _ = _agm_case(4)
    twin = copy.deepcopy(model)
    options = {"num_classes": 4, "shapley": "sampled", "shapley_samples": 2, "shapley_seed": 5}
    first = gb.AGM(model, list(model.towers), fusion=fusion, **options)
    second = gb.AGM(twin, list(twin.towers), fusion=fusion, **options)  # another "rank"
    for _ in range(3):
        torch.testing.assert_close(
            first.shapley_logits(logits, features), second.shapley_logits(logits, features)
        )
    state = first.state_dict()
    ahead = first.shapley_logits(logits, features)
    second.remove()
    resumed = gb.AGM(twin, list(twin.towers), fusion=fusion, **options)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.shapley_logits(logits, features), ahead)


def test_row5_agm_shapley_options_are_checked():
    model, fusion, *_ = _agm_case(2)
    towers = list(model.towers)
    with pytest.raises(gb.errors.ConfigurationError, match="shapley must be one of"):
        gb.AGM(model, towers, num_classes=4, fusion=fusion, shapley="approx")
    with pytest.raises(gb.errors.ConfigurationError, match="shapley_samples must be an int"):
        gb.AGM(model, towers, num_classes=4, fusion=fusion, shapley="sampled", shapley_samples=0)
