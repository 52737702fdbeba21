"""gb.make and gb.METHODS: every method by name, for the training CLI."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch

import gradbalance as gb

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
}


def test_methods_lists_every_balancer():
    assert dict(gb.METHODS) == EXPECTED
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
