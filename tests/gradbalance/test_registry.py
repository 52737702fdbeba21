"""gb.make and gb.METHODS: every method by name, for the training CLI."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch
from custom_method import ScoreRatio

import gradbalance as gb
from reference_models.recipes import METHOD_ALIASES
from reference_models.recipes import METHODS as HARNESS_METHODS

EXPECTED = {
    "joint": gb.Joint,
    "multiloss": gb.MultiLoss,
    "mlb": gb.MLB,
    "ogm": gb.OGM,
    "ogm_ge": gb.OGMGE,
    "agm": gb.AGM,
    "pmr": gb.PMR,
    "mslr": gb.MSLR,
    "gblend": gb.GBlend,
    "mmpareto": gb.MMPareto,
    "cggm": gb.CGGM,
    "inforeg": gb.InfoReg,
    "amss": gb.AMSS,
    "amss_plus": gb.AMSSPlus,
    "opm": gb.OPM,
}


REGISTERED_IN_TESTS = {"score_ratio": ScoreRatio}
"""Registered by ``custom_method`` (imported by the factories of every suite)."""


def test_methods_lists_every_balancer():
    assert dict(gb.METHODS) == {**EXPECTED, **REGISTERED_IN_TESTS}
    assert all(issubclass(cls, gb.Balancer) for cls in gb.METHODS.values())
    with pytest.raises(TypeError):
        gb.METHODS["new"] = gb.MLB  # read-only


@pytest.mark.parametrize("name", list(EXPECTED))
def test_make_builds_a_working_balancer(name, two_tower):
    options = (
        {"fusion": lambda a, v: two_tower.fusion(torch.cat([a, v], 1))} if name == "agm" else {}
    )
    bal = gb.make(name, two_tower, list(two_tower.towers), num_classes=4, **options)
    assert type(bal) is EXPECTED[name]
    inputs, target = make_batch((5, 7))
    bal.loss(two_tower(*inputs), target).backward()
    bal.after_backward()
    assert sorted(bal.coefficients) == ["towers_0", "towers_1"]


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("MLB", "mlb"),
        ("OGM-GE", "ogm_ge"),
        ("ogmge", "ogm_ge"),
        (" Multi-Loss ", "multiloss"),
        ("Gradient-Blending", "gblend"),
        ("MM-Pareto", "mmpareto"),
    ],
)
def test_names_are_forgiving(alias, canonical, two_tower):
    bal = gb.make(alias, two_tower, list(two_tower.towers), num_classes=4)
    assert type(bal) is EXPECTED[canonical]


def test_unknown_name_and_options_are_refused(two_tower):
    with pytest.raises(ValueError, match="unknown balancing method 'mmcosine'.*'agm'"):
        gb.make("mmcosine", two_tower, list(two_tower.towers), num_classes=4)
    with pytest.raises(TypeError):
        gb.make("ogm", two_tower, list(two_tower.towers), num_classes=4, beta_max=2.0)
    with pytest.raises(TypeError):
        gb.make(3, two_tower, list(two_tower.towers), num_classes=4)


class _Plain(gb.Joint):
    """Joint training under another name."""


@pytest.fixture
def plain():
    gb.register_method("plain", _Plain, aliases=["plain-joint", "Just Joint"])
    yield _Plain
    gb.unregister_method("plain")


def test_a_registered_method_is_built_by_name_and_alias(plain, two_tower):
    assert gb.METHODS["plain"] is plain and gb.registry.ALIASES["just_joint"] == "plain"
    for name in ("plain", "Plain-Joint", "just joint"):
        bal = gb.make(name, two_tower, list(two_tower.towers), num_classes=4)
        assert type(bal) is plain
        bal.remove()


def test_unregister_removes_the_method_and_its_aliases(plain):
    gb.unregister_method("plain-joint")
    assert "plain" not in gb.METHODS and "plain_joint" not in gb.registry.ALIASES
    with pytest.raises(ValueError, match="unknown balancing method 'plain'"):
        gb.registry.canonical_name("plain")
    gb.register_method("plain", plain)  # the fixture removes it again


@pytest.mark.parametrize("name", ["mlb", "MLB", "ogmge", "multi-loss"])
def test_a_taken_name_or_alias_is_refused_without_force(name):
    with pytest.raises(ValueError, match="already registered for .*force=True"):
        gb.register_method(name, _Plain)
    with pytest.raises(ValueError, match="already registered"):
        gb.register_method("fresh", _Plain, aliases=[name])
    assert "fresh" not in gb.METHODS
    assert gb.METHODS["mlb"] is gb.MLB and gb.registry.ALIASES["ogmge"] == "ogm_ge"


def test_registering_the_same_class_again_is_harmless(plain):
    gb.register_method("plain", plain, aliases=["plain-joint"])
    assert gb.METHODS["plain"] is plain


def test_force_replaces_a_method_and_takes_an_alias_over():
    gb.register_method("joint", _Plain, force=True)
    try:
        assert gb.METHODS["joint"] is _Plain
    finally:
        gb.register_method("joint", gb.Joint, force=True)
    assert gb.METHODS["joint"] is gb.Joint
    gb.register_method("other", _Plain, aliases=["ogmge"], force=True)
    try:
        assert gb.registry.canonical_name("OGMGE") == "other"
    finally:
        gb.unregister_method("other")
        gb.register_method("ogm_ge", gb.OGMGE, aliases=["ogmge"])
    assert gb.registry.canonical_name("OGMGE") == "ogm_ge"


def test_only_balancer_classes_are_registered():
    with pytest.raises(TypeError, match="Balancer subclass"):
        gb.register_method("linear", torch.nn.Linear)  # type: ignore[arg-type]


def test_the_harness_takes_names_and_aliases_from_the_registry(plain):
    assert set(gb.METHODS) <= set(HARNESS_METHODS)
    assert HARNESS_METHODS["plain"].balancer == "plain"
    assert HARNESS_METHODS["plain"].label == "_Plain"
    assert dict(gb.registry.ALIASES).items() <= dict(METHOD_ALIASES).items()
    assert METHOD_ALIASES["plain_joint"] == "plain"
    assert {r.balancer for r in HARNESS_METHODS.values()} - {None} <= set(gb.METHODS)


def test_the_custom_method_trains_through_make(two_tower):
    bal = gb.make("Score-Ratio-Test", two_tower, list(two_tower.towers), num_classes=4)
    opt = torch.optim.SGD([*two_tower.parameters(), *bal.parameters()], lr=0.1)
    for seed in range(3):
        inputs, target = make_batch((5, 7), seed=seed)
        bal.loss(two_tower(*inputs), target).backward()
        opt.step()
        opt.zero_grad()
    average = bal.average_scores
    assert bal.steps == 3 and "average_scores" in bal.state_dict()
    expected = (average.mean() / average) ** bal.alpha
    torch.testing.assert_close(bal.last_coefficients, expected)


def test_the_suites_pick_up_a_registered_method():
    """The contract, DDP, compile, AMP and checkpoint matrices are built from ``gb.METHODS``:
    the test method registered by ``custom_method`` is in them without a factory of its own."""
    from balancer_factories import FACTORIES, REGRESSION_FACTORIES, WIRED, factory_params

    assert "score_ratio" in FACTORIES and "score_ratio" not in WIRED
    assert "score_ratio_regression" in REGRESSION_FACTORIES
    assert "score_ratio" in {p.id for p in factory_params()}
    assert "mmpareto_regression" not in REGRESSION_FACTORIES  # classification only
