"""CREMA-D: labels, speaker-independent folds, split files, items and errors on fixtures."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures_media import cremad_name, write_json, write_prepared_clip
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_models.data.cremad import (
    EMOTIONS,
    PAPER_FOLDS,
    CremaD,
    actor_of,
    emotion_label,
    fold_clip_names,
    read_split_file,
    speaker_independent_folds,
)

ACTORS = range(1001, 1092)  # the 91 CREMA-D actors
FIXTURE_ACTORS = range(1001, 1008)
SMALL = dict(split_file="generated", val_actors=2, test_actors=2, image_size=16)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """7 actors x 2 emotions, 1.4 s clips at 22,050 Hz, 2 frames each."""
    root = tmp_path_factory.mktemp("cremad")
    for actor in FIXTURE_ACTORS:
        for emotion in ("ANG", "NEU"):
            write_prepared_clip(root, cremad_name(actor, emotion), seconds=1.4, sample_rate=22050)
    return root


def test_labels_come_from_the_emotion_code():
    for index, code in enumerate(EMOTIONS):
        assert emotion_label(f"1001_DFA_{code}_XX") == index
    assert emotion_label("1091_WSI_SAD_HI.wav") == 2
    assert actor_of("1091_WSI_SAD_HI") == 1091
    with pytest.raises(ValueError, match="ACTOR_SENTENCE_EMOTION_LEVEL"):
        emotion_label("1001_DFA_XXX_XX")


def test_official_actor_counts_and_disjoint_sets():
    folds = speaker_independent_folds(ACTORS)
    assert len(folds) == 3
    for fold in folds:
        train, val, test = (set(fold[split]) for split in ("train", "val", "test"))
        assert (len(train), len(val), len(test)) == (63, 14, 14)
        assert not train & val and not train & test and not val & test
        assert train | val | test == set(ACTORS)
    tests = [set(fold["test"]) for fold in folds]
    assert not tests[0] & tests[1] and not tests[0] & tests[2] and not tests[1] & tests[2]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), num_folds=st.integers(1, 5))
def test_every_generated_fold_is_actor_disjoint_and_deterministic(seed, num_folds):
    folds = speaker_independent_folds(ACTORS, num_folds, seed=seed)
    assert folds == speaker_independent_folds(ACTORS, num_folds, seed=seed)
    for fold in folds:
        sets = [set(fold[split]) for split in ("train", "val", "test")]
        assert sum(map(len, sets)) == len(set().union(*sets)) == 91
    # Fold k does not depend on how many folds were generated.
    assert folds[0] == speaker_independent_folds(ACTORS, 1, seed=seed)[0]


def test_seeds_give_different_folds_and_too_few_actors_fail():
    assert speaker_independent_folds(ACTORS, seed=0) != speaker_independent_folds(ACTORS, seed=1)
    with pytest.raises(ValueError, match="more than 98 actors"):
        speaker_independent_folds(ACTORS, 6)


def test_official_split_file_format(tmp_path):
    path = write_json(
        tmp_path / "splits.json",
        {
            "1": {
                "train": ["1001_DFA_ANG_XX.wav", "1002_DFA_NEU_XX.wav"],
                "val": [["1003_DFA_ANG_XX.wav", 5]],
                "test": ["1004_DFA_NEU_XX.wav"],
            }
        },
    )
    assert read_split_file(path, 1) == {
        "train": ["1001_DFA_ANG_XX", "1002_DFA_NEU_XX"],
        "val": ["1003_DFA_ANG_XX"],
        "test": ["1004_DFA_NEU_XX"],
    }
    with pytest.raises(ValueError, match="no fold '2'"):
        read_split_file(path, 2)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_split_file(tmp_path / "broken.json", 1)
    with pytest.raises(FileNotFoundError, match="absent.json"):
        read_split_file(tmp_path / "absent.json", 1)


def test_items_have_the_paper_shapes_and_dtypes(prepared):
    dataset = CremaD(prepared, "test", fold=0, **SMALL)
    spectrogram, frames, label = dataset[0]
    assert spectrogram.shape == (257, 188) and spectrogram.dtype == torch.float32
    assert frames.shape == (3, 3, 16, 16) and frames.dtype == torch.float32
    assert label == emotion_label(dataset.clips[0].name)
    # The clips have 2 frames at 1 fps: the third stays zero, as in the official loader.
    assert torch.all(frames[:, 2] == 0) and frames[:, 1].abs().sum() > 0
    assert dataset.num_classes == 6 and not dataset.transform.train
    assert CremaD(prepared, "train", **SMALL).transform.train


def test_generated_splits_are_speaker_independent_and_cover_the_clips(prepared):
    splits = {split: CremaD(prepared, split, fold=1, **SMALL) for split in ("train", "val", "test")}
    actors = {split: {actor_of(c.name) for c in data.clips} for split, data in splits.items()}
    assert (len(actors["train"]), len(actors["val"]), len(actors["test"])) == (3, 2, 2)
    assert not actors["train"] & actors["val"] and not actors["train"] & actors["test"]
    assert not actors["val"] & actors["test"]
    assert sum(len(data) for data in splits.values()) == 2 * len(FIXTURE_ACTORS)
    again = CremaD(prepared, "val", fold=1, **SMALL)
    assert again.clips == splits["val"].clips
    reseeded = [CremaD(prepared, "val", fold=1, seed=seed, **SMALL).clips for seed in range(1, 6)]
    assert any(clips != again.clips for clips in reseeded)


def test_split_file_selects_its_clips(prepared, tmp_path):
    names = [cremad_name(1001, "ANG"), cremad_name(1002, "NEU")]
    path = one_fold(tmp_path, names)
    dataset = CremaD(prepared, "train", split_file=path, image_size=16)
    assert [clip.name for clip in dataset.clips] == names
    assert [clip.label for clip in dataset.clips] == [5, 0]
    with pytest.raises(ValueError, match="no clips"):
        CremaD(prepared, "val", split_file=path, image_size=16)


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="reference_models.data.prepare cremad"):
        CremaD(tmp_path / "nowhere")


def one_fold(tmp_path, train_names):
    content = {"1": {"train": [f"{name}.wav" for name in train_names], "val": [], "test": []}}
    return write_json(tmp_path / "split.json", content)


def test_missing_clip_files_are_reported_by_name(prepared, tmp_path):
    absent = cremad_name(1099, "SAD")
    path = one_fold(tmp_path, [cremad_name(1001, "ANG"), absent])
    with pytest.raises(FileNotFoundError, match=absent):
        CremaD(prepared, "train", split_file=path, image_size=16)
    with pytest.warns(UserWarning, match=absent):
        dataset = CremaD(prepared, "train", split_file=path, image_size=16, missing="skip")
    assert len(dataset) == 1 and dataset.excluded == {absent: "no wav"}


def test_corrupt_wav_names_the_file(tmp_path):
    name = cremad_name(1001, "HAP")
    write_prepared_clip(tmp_path / "cremad", name, seconds=1.0, sample_rate=22050)
    (tmp_path / "cremad" / "audio" / f"{name}.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    dataset = CremaD(tmp_path / "cremad", split_file=one_fold(tmp_path, [name]), image_size=16)
    with pytest.raises(RuntimeError, match=f"{name}.wav"):
        dataset[0]


def test_batches_from_worker_processes(prepared):
    dataset = CremaD(prepared, "train", **SMALL)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=4, num_workers=2, multiprocessing_context="spawn"
    )
    spectrograms, frames, labels = next(iter(loader))
    assert spectrograms.shape == (4, 257, 188) and frames.shape == (4, 3, 3, 16, 16)
    assert labels.dtype == torch.int64
    assert labels.tolist() == [clip.label for clip in dataset.clips[:4]]


# The paper's folds (Goncalves et al.): clips per split of the first three fold keys.
PAPER_COUNTS = {0: (4043, 878, 899), 1: (4024, 881, 915), 2: (4017, 869, 934)}


def test_the_shipped_paper_folds_are_the_default_and_speaker_independent():
    content = json.loads(PAPER_FOLDS.read_text())
    clips = set(content["clips"])
    assert len(clips) == 5820 and sorted(content["folds"]) == ["1", "2", "3", "4", "5"]
    for fold in range(5):
        names = fold_clip_names([], fold)
        assert names == read_split_file(PAPER_FOLDS, fold + 1)
        if fold in PAPER_COUNTS:
            assert (
                tuple(len(names[split]) for split in ("train", "val", "test"))
                == (PAPER_COUNTS[fold])
            )
        actors = {split: {actor_of(n) for n in names[split]} for split in names}
        assert [len(actors[s]) for s in ("train", "val", "test")] == [63, 14, 14]
        assert not actors["train"] & actors["val"] and not actors["train"] & actors["test"]
        assert not actors["val"] & actors["test"]
        assert set().union(*names.values()) == clips
        assert {str(a) for a in actors["test"]} == set(
            content["folds"][str(fold + 1)]["test_actors"]
        )
    with pytest.raises(ValueError, match="0-based"):
        fold_clip_names([], -1)
    with pytest.raises(ValueError, match="no fold '6'"):
        fold_clip_names([], 5)


def test_paper_folds_report_the_clips_missing_from_the_prepared_data(prepared):
    fixture = {cremad_name(actor, e) for actor in FIXTURE_ACTORS for e in ("ANG", "NEU")}
    listed = json.loads(PAPER_FOLDS.read_text())["folds"]["1"]
    expected = sorted(
        name
        for name in fixture & set(json.loads(PAPER_FOLDS.read_text())["clips"])
        if str(actor_of(name)) in listed["test_actors"]
    )
    absent = 899 - len(expected)
    with pytest.raises(FileNotFoundError, match=rf"{absent} of 899 listed clip\(s\).*lack"):
        CremaD(prepared, "test", image_size=16)
    with pytest.warns(UserWarning, match=f"{absent} clip\\(s\\) left out"):
        dataset = CremaD(prepared, "test", image_size=16, missing="skip")
    assert expected and sorted(clip.name for clip in dataset.clips) == expected
    assert len(dataset.excluded) == absent


def test_split_files_sharing_actors_are_refused_naming_them(tmp_path):
    vavl = {
        "1": {
            "train": ["1001_DFA_ANG_XX.wav", "1002_DFA_NEU_XX.wav"],
            "val": ["1001_IEO_SAD_LO.wav"],
            "test": ["1002_IEO_HAP_HI.wav", "1003_DFA_ANG_XX.wav"],
        }
    }
    path = write_json(tmp_path / "shared.json", vavl)
    with pytest.raises(
        ValueError, match="actor 1001 in train and val; actor 1002 in train and test"
    ):
        fold_clip_names([], 0, split_file=path)
    actors = {
        "clips": ["1001_DFA_ANG_XX"],
        "folds": {"1": {"val_actors": ["1001", "1005"], "test_actors": ["1005"]}},
    }
    with pytest.raises(ValueError, match=r"actors \[1005\] in both val and test"):
        fold_clip_names([], 0, split_file=write_json(tmp_path / "actors.json", actors))


def test_the_harness_starts_loader_workers_with_spawn(prepared):
    from reference_models.training.batches import make_loader

    dataset = CremaD(prepared, "train", **SMALL)
    loader = make_loader(
        dataset, 4, train=False, workers=1, generator=None, device=torch.device("cpu")
    )
    assert loader.multiprocessing_context.get_start_method() == "spawn"
    spectrograms, frames, labels = next(iter(loader))
    assert labels.tolist() == [clip.label for clip in dataset.clips[:4]]
    assert torch.equal(spectrograms[0], dataset[0][0])
