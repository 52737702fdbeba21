"""UCF101: classes with audio, group-disjoint validation, protocol exclusions, items."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures_media import write_lines, write_prepared_clip

from reference_models.data.ucf101 import UCF101, group_of, validation_groups

CLASSES = ["Archery", "Basketball", "Drumming"]  # Basketball videos have no audio
TRAIN_GROUPS = range(8, 13)
SILENT_IN_AUDIO_CLASS = "v_Drumming_g09_c02"
TOO_FEW_FRAMES = "v_Archery_g10_c01"


def clip(name: str, group: int, index: int) -> str:
    return f"v_{name}_g{group:02d}_c{index:02d}"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("ucf101")
    write_lines(root / "splits" / "classInd.txt", [f"{i + 1} {n}" for i, n in enumerate(CLASSES)])
    train = [
        f"{name}/{clip(name, group, index)}.avi {label + 1}"
        for label, name in enumerate(CLASSES)
        for group in TRAIN_GROUPS
        for index in (1, 2)
    ]
    test = [f"{name}/{clip(name, group, 1)}.avi" for name in CLASSES for group in (1, 2)]
    write_lines(root / "splits" / "trainlist01.txt", train)
    write_lines(root / "splits" / "testlist01.txt", test)
    no_audio = []
    for entry in train + test:
        name = entry.split()[0].split("/")[1][:-4]
        if "Basketball" in name or name == SILENT_IN_AUDIO_CLASS:
            write_prepared_clip(root, name, seconds=4, sample_rate=16000)
            (root / "audio" / f"{name}.wav").unlink()
            no_audio.append(name)
        else:
            frames = 3 if name == TOO_FEW_FRAMES else 4
            write_prepared_clip(root, name, seconds=3.5, sample_rate=16000, num_frames=frames)
    (root / "prepare_report.json").write_text(json.dumps({"no_audio": no_audio}))
    return root


def test_group_parsing():
    assert group_of("v_ApplyEyeMakeup_g08_c01") == "ApplyEyeMakeup_g08"
    assert group_of("v_Apply_Eye_g25_c07") == "Apply_Eye_g25"
    with pytest.raises(ValueError, match="v_Class_gXX_cYY"):
        group_of("v_ApplyEyeMakeup")


def test_validation_groups_are_stratified_and_seeded():
    groups = {name: [f"{name}_g{g:02d}" for g in range(8, 26)] for name in ("A", "B", "C")}
    picked = validation_groups(groups, 0.1, seed=109)
    assert all(sum(g.startswith(f"{name}_") for g in picked) == 2 for name in groups)
    assert picked == validation_groups(groups, 0.1, seed=109)
    assert picked != validation_groups(groups, 0.1, seed=19)
    with pytest.raises(ValueError, match="fraction"):
        validation_groups(groups, 1.5)


def test_classes_are_those_with_audio_in_class_index_order(prepared):
    dataset = UCF101(prepared, "test", image_size=16)
    assert not dataset.excluded
    assert dataset.classes == ["Archery", "Drumming"]
    assert sorted({c.label for c in dataset.clips}) == [0, 1]
    assert all(("Archery" in c.name) == (c.label == 0) for c in dataset.clips)


def test_train_and_validation_share_no_group(prepared):
    with pytest.warns(UserWarning):
        train = UCF101(prepared, "train", val_fraction=0.4, seed=3, image_size=16)
    with pytest.warns(UserWarning):
        val = UCF101(prepared, "val", val_fraction=0.4, seed=3, image_size=16)
    train_groups = {group_of(c.name) for c in train.clips}
    val_groups = {group_of(c.name) for c in val.clips}
    assert not train_groups & val_groups
    assert len(val_groups) == 4  # round(0.4 * 5) = 2 per class, 2 classes with audio
    everything = {c.name for c in train.clips + val.clips} | set(train.excluded) | set(val.excluded)
    expected = {
        clip(n, g, i) for n in ("Archery", "Drumming") for g in TRAIN_GROUPS for i in (1, 2)
    }
    assert everything == expected


def test_protocol_exclusions_are_reported(prepared):
    with pytest.warns(UserWarning, match=SILENT_IN_AUDIO_CLASS) as record:
        train = UCF101(prepared, "train", val_fraction=0.1, seed=0, image_size=16)
        val = UCF101(prepared, "val", val_fraction=0.1, seed=0, image_size=16)
    excluded = {**train.excluded, **val.excluded}
    assert excluded == {
        SILENT_IN_AUDIO_CLASS: "no audio track",
        TOO_FEW_FRAMES: "fewer than 4 frames",
    }
    assert any(TOO_FEW_FRAMES in str(warning.message) for warning in record)
    names = {c.name for c in train.clips + val.clips}
    assert SILENT_IN_AUDIO_CLASS not in names and TOO_FEW_FRAMES not in names


def test_items_have_the_paper_shapes(prepared):
    with pytest.warns(UserWarning):
        dataset = UCF101(prepared, "train", image_size=16)
    spectrogram, frames, label = dataset[0]
    assert spectrogram.shape == (257, 136) and spectrogram.dtype == torch.float32
    assert frames.shape == (3, 4, 16, 16) and frames.dtype == torch.float32
    assert label in (0, 1)


def test_errors(prepared, tmp_path):
    with pytest.raises(ValueError, match="folds 0, 1 and 2"):
        UCF101(prepared, fold=3)
    with pytest.raises(FileNotFoundError, match="reference_models.data.prepare ucf101"):
        UCF101(tmp_path / "nowhere")
    root = tmp_path / "copy"
    (root / "audio").mkdir(parents=True)
    (root / "frames").mkdir()
    for file in ("classInd.txt", "trainlist01.txt", "testlist01.txt"):
        write_lines(root / "splits" / file, (prepared / "splits" / file).read_text().splitlines())
    with pytest.raises(FileNotFoundError, match="prepare_report.json"):
        UCF101(root)
    with pytest.raises(FileNotFoundError, match="trainlist02.txt"):
        UCF101(prepared, fold=1)
