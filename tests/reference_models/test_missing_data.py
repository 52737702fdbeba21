"""``with_missing``: which samples lose which modality, what the items and batches carry."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_models.data.missing import (
    PresentCollate,
    draw_present,
    with_missing,
)
from reference_models.data.synthetic import SyntheticAudioVisual
from reference_models.training.batches import padded_batch

NAMES = ("audio", "video")
SMALL = {
    "sample_rate": 4000,
    "duration": 0.25,
    "n_fft": 64,
    "hop_length": 64,
    "num_frames": 2,
    "image_size": 16,
}


@pytest.fixture(scope="module")
def test_split():
    return SyntheticAudioVisual("test", size=20, seed=0, **SMALL)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 300),
    audio=st.floats(0.0, 0.99),
    share=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_each_incomplete_sample_misses_one_modality_at_the_asked_rates(size, audio, share, seed):
    video = min((1.0 - audio) * share, 0.99)
    present = draw_present(size, {"audio": audio, "video": video}, NAMES, seed)
    absent = (~present).sum(dim=0).tolist()
    # Disjoint sets cut from one permutation at the rounded cumulative rates.
    assert absent == [round(audio * size), round((audio + video) * size) - round(audio * size)]
    assert bool(present.any(dim=1).all())  # no sample loses every modality
    assert torch.equal(present, draw_present(size, {"audio": audio, "video": video}, NAMES, seed))


def test_items_blank_the_absent_inputs_and_carry_the_mask(test_split):
    data = with_missing(test_split, {"audio": 0.25, "video": 0.5}, seed=3)
    assert (~data.present).sum(dim=0).tolist() == [5, 10]
    for index in range(len(data)):
        spectrogram, frames, label, present = data[index]
        original = test_split[index]
        assert torch.equal(present, data.present[index]) and label == original[2]
        for column, (blanked, raw) in enumerate(zip((spectrogram, frames), original[:2])):
            expected = raw if present[column] else torch.zeros_like(raw)
            assert torch.equal(blanked, expected)


def test_in_memory_tensors_equal_the_items(test_split):
    data = with_missing(test_split, {"video": 0.4}, seed=1)
    audio, video, labels, present = data.tensors()
    items = [data[i] for i in range(len(data))]
    assert torch.equal(audio, torch.stack([item[0] for item in items]))
    assert torch.equal(video, torch.stack([item[1] for item in items]))
    assert labels.tolist() == [item[2] for item in items]
    assert torch.equal(present, data.present)


def test_a_dataset_without_tensors_gets_none():
    items = [(torch.ones(3), torch.ones(2), 0)] * 4
    data = with_missing(items, {"audio": 0.5}, seed=0, split="train")
    assert not hasattr(data, "tensors")
    assert data[0][3].dtype == torch.bool


@pytest.mark.parametrize(
    ("mode", "blanked"),
    [("both", {"train", "val", "test"}), ("train", {"train"}), ("test", {"val", "test"})],
)
def test_the_mode_picks_the_splits_that_lose_modalities(mode, blanked):
    for split in ("train", "val", "test"):
        data = with_missing(list(range(10)), {"video": 0.5}, seed=0, mode=mode, split=split)
        assert int((~data.present).sum()) == (5 if split in blanked else 0), split


def test_each_split_draws_its_own_samples():
    draws = [
        with_missing(list(range(50)), {"video": 0.5}, seed=0, split=s).present
        for s in ("train", "val", "test")
    ]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


@pytest.mark.parametrize(
    ("rates", "options", "match"),
    [
        ({"depth": 0.3}, {}, "unknown modalities"),
        ({"video": 1.0}, {}, r"in \[0, 1\)"),
        ({"video": -0.1}, {}, r"in \[0, 1\)"),
        ({"video": "half"}, {}, r"in \[0, 1\)"),
        ({"audio": 0.6, "video": 0.5}, {}, "sum to more than 1"),
        ({"video": 0.5}, {"mode": "val"}, "missing mode"),
        ({"video": 0.5}, {"split": None}, "needs the split"),
    ],
)
def test_bad_rates_and_modes_are_refused(rates, options, match):
    with pytest.raises(ValueError, match=match):
        with_missing([1, 2, 3], rates, seed=0, **{"split": "test", **options})


def test_the_collate_puts_the_mask_after_the_labels():
    items = [
        (torch.randn(5 + i), torch.randn(2 + i, 4), i, torch.tensor([True, i % 2 == 0]))
        for i in range(3)
    ]
    waveform, faces, labels, present, waveform_mask, faces_mask = PresentCollate(padded_batch)(
        items
    )
    assert present.tolist() == [[True, True], [True, False], [True, True]]
    assert labels.tolist() == [0, 1, 2] and waveform.shape == (3, 7) and faces.shape == (3, 4, 4)
    assert waveform_mask.tolist()[0] == [False] * 5 + [True] * 2
