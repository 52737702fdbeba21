"""The contract between ``Balancer`` and a method, checked from the source.

A method module (``gradbalance/methods/*.py``) uses the documented extension surface only
(``Step``'s services, the balancer's public members, ``add_state``/``update_state``,
``scale_parameter_gradients``, ``reduce_mean``, ``encoder_outputs``, ``take_features``) and
overrides the documented hooks only (``_loss``, ``_fork_output``): no attribute access
``self._x`` / ``bal._x`` where ``_x`` is a private member of ``Balancer`` or of the private
bases it is built on (``BalancerState``, ``MethodServices``), and no override of one.
``Step`` knows nothing of the balancer.
"""

from __future__ import annotations

import ast
import copy
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_batch
from custom_method import ScoreRatio
from torch import nn

import gradbalance as gb
from gradbalance import _services, _state, _step, balancer

PACKAGE = Path(gb.__file__).parent
METHOD_MODULES = sorted((PACKAGE / "methods").glob("*.py"))
HOOKS = {"_loss", "_fork_output"}
"""The private names a method may define (override) and that the front calls."""
OWNERS = {"self", "bal", "balancer"}


def _private_members(path: Path, classes: set[str]) -> set[str]:
    """Private names the classes of ``path`` define: methods, class attributes, and
    ``self._x = ...`` / ``self.__dict__["_x"] = ...`` in their methods."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if not (isinstance(node, ast.ClassDef) and node.name in classes):
            continue
        for item in ast.walk(node):
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.add(item.name)
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                found.add(item.target.id)
            elif isinstance(item, ast.Assign):
                for target in item.targets:
                    if isinstance(target, ast.Name):
                        found.add(target.id)
                    elif isinstance(target, ast.Attribute) and _owner(target.value):
                        found.add(target.attr)
                    elif isinstance(target, ast.Subscript) and _dict_key(target) is not None:
                        found.add(str(_dict_key(target)))
    return {name for name in found if name.startswith("_") and not name.startswith("__")}


def _owner(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id in OWNERS


def _dict_key(node: ast.Subscript) -> str | None:
    """``"_x"`` for ``self.__dict__["_x"]``."""
    value = node.value
    if isinstance(value, ast.Attribute) and value.attr == "__dict__" and _owner(value.value):
        key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            return key.value
    return None


FORBIDDEN = (
    _private_members(Path(balancer.__file__), {"Balancer"})
    | _private_members(Path(_state.__file__), {"BalancerState"})
    | _private_members(Path(_services.__file__), {"MethodServices"})
) - HOOKS - set(dir(nn.Module))
"""torch's own hooks of ``nn.Module`` (``_load_from_state_dict``) stay a method's to use."""


def violations(source: str) -> list[str]:
    """Each use of a private member of the balancer in ``source``: ``line: what``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _owner(node.value) and node.attr in FORBIDDEN:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Subscript) and _dict_key(node) in FORBIDDEN:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name in FORBIDDEN:
                    found.append(f"{item.lineno}: overrides {item.name}")
    return found


def test_the_forbidden_names_are_the_balancers_private_state():
    assert {"_captures", "_guard", "_index", "_paused", "_root_model", "_task"} <= FORBIDDEN
    assert {"_on_output", "_feature", "_encoders", "_history", "_commit"} <= FORBIDDEN
    assert not HOOKS & FORBIDDEN and "names" not in FORBIDDEN


def test_the_check_finds_what_the_methods_used_to_do():
    """The accesses this contract replaced (MMPareto's tap, AGM and PMR's captures, AGM's
    second copy of the model) are all reported."""
    source = """
class Old(MultiLoss):
    def _on_output(self, name, module, output):
        if self._paused:
            return self._guard.watch(self._index[name])
    def _loss(self, step):
        captures = self._captures.latest_captures()
        model = self.__dict__["_model"]
        return self._task.fused_loss(step.logits, step.target)
"""
    found = sorted(line.split(": ", 1)[1] for line in violations(source))
    assert found == [
        "overrides _on_output",
        "self._captures",
        "self._guard",
        "self._index",
        "self._paused",
        "self._task",
    ]


@pytest.mark.parametrize("path", METHOD_MODULES, ids=lambda p: p.name)
def test_a_method_module_uses_only_the_extension_surface(path):
    assert violations(path.read_text()) == [], (
        f"{path.name} reaches into the balancer's private state: use the documented surface "
        "(docs/writing-a-method.md)"
    )


def test_step_does_not_know_the_balancer():
    source = Path(_step.__file__).read_text()
    imported = {
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.module
    }
    tree = ast.parse(source)
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert "gradbalance.balancer" not in imported and "balancer" not in attributes


def test_internal_helpers_are_private_and_their_old_names_warn(two_tower):
    bal = gb.MLB(two_tower, list(two_tower.towers), num_classes=4)
    inputs, target = make_batch((5, 7))
    bal.loss(two_tower(*inputs), target).backward()
    with pytest.warns(DeprecationWarning, match="record_history"):
        bal.record_history(bal.last_coefficients, bal.last_scores, None)
    assert bal.history["towers_0"]["coefficients"].shape == (2,)
    with pytest.warns(DeprecationWarning, match="raises_at_once"):
        assert bal.raises_at_once(torch.zeros(1))
    with pytest.warns(DeprecationWarning, match="note_finite"):
        bal.note_finite(torch.tensor(True))
    opt = torch.optim.SGD(bal.parameters(), lr=0.1)
    with pytest.warns(DeprecationWarning, match="optimizer_step"):
        bal.optimizer_step(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        opt.step()  # the watch calls the private one: no warning


def test_the_api_page_hides_the_internal_helpers():
    page = (PACKAGE.parent / "docs" / "api.md").read_text()
    for name in ("optimizer_step", "raises_at_once", "note_finite", "record_history"):
        assert f"!^{name}$" in page


def test_a_declared_state_travels_and_keeps_its_value_on_a_nonfinite_step(two_tower):
    """``ScoreRatio`` (``custom_method``) keeps its moving average with ``add_state``."""
    bal = ScoreRatio(two_tower, list(two_tower.towers), num_classes=4, nonfinite="skip")
    inputs, target = make_batch((5, 7))
    bal.loss(two_tower(*inputs), target).backward()
    kept = bal.average_scores.clone()
    assert not torch.equal(kept, torch.ones(2))
    inputs[0][0, 0] = float("nan")
    bal.loss(two_tower(*inputs), target).backward()
    assert int(bal.nonfinite_steps) == 1 and torch.equal(bal.average_scores, kept)
    assert torch.equal(bal.state_dict()["average_scores"], kept)
    twin = copy.deepcopy(bal)
    assert torch.equal(twin.average_scores, kept)
    other = copy.deepcopy(two_tower)
    fresh = ScoreRatio(other, list(other.towers), num_classes=4)
    fresh.load_state_dict(bal.state_dict())
    assert torch.equal(fresh.average_scores, kept)


def test_synced_state_is_the_local_value_in_one_process_and_needs_a_reduction(two_tower):
    bal = gb.Joint(two_tower, list(two_tower.towers), num_classes=4)
    bal.add_state("counts", torch.tensor([1.0, 3.0]), reduce="sum")
    bal.add_state("plain", torch.zeros(2))
    assert torch.equal(bal.synced_state("counts"), torch.tensor([1.0, 3.0]))
    with pytest.raises(ValueError, match="no reduction across ranks"):
        bal.synced_state("plain")
    with pytest.raises(ValueError, match="reduce must be one of"):
        bal.add_state("other", torch.zeros(2), reduce="max")
