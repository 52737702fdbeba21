"""The harness's per-modality keys: ``head_*`` only from a classifier of the modality alone
(``bal.unimodal_logits()``), ``slice_*`` from the fused head's slices of OGM/MSLR."""

from __future__ import annotations

import pytest
import torch
from test_train import tiny

from reference_models.train import build_run
from reference_models.training.step import evaluate


@pytest.fixture
def session(tmp_path):
    sessions = []

    def make(**changes):
        sessions.append(build_run(tiny(tmp_path, **changes)))
        return sessions[-1]

    yield make
    for built in sessions:
        built.close()


@pytest.mark.parametrize(
    "method, options, heads, slices",
    [
        ("ogm", {}, False, True),  # Late-Linear: the slices OGM scores, no classifier alone
        ("ogm", {"probes": True}, True, True),
        ("mslr", {}, False, True),
        ("mlb", {}, True, False),
        ("agm", {}, False, False),
        ("agm", {"probes": True}, True, False),
    ],
)
def test_keys_follow_what_the_balancer_has(session, method, options, heads, slices):
    run = session(method=method, method_options=options)
    result = evaluate(run.state, run.val_loader)
    keys = set(result["video"])
    assert ("head_accuracy" in keys) == heads
    assert ("slice_accuracy" in keys) == slices
    assert "probe_accuracy" in keys


def test_slice_accuracy_is_the_accuracy_of_the_slices(session):
    run = session(method="ogm")
    state = run.state
    result = evaluate(state, run.val_loader)
    correct = total = 0
    state.model.eval()
    with torch.no_grad():
        for audio, video, y, *masks in run.val_loader:
            state.model(audio, video, *masks)
            slices = state.balancer.modality_slices()["video"]
            correct += int((slices.argmax(1) == y).sum())
            total += len(y)
    assert result["video"]["slice_accuracy"] == pytest.approx(correct / total)
