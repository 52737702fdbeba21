"""AVE: split files, event-segment crop of audio and frames, shapes, errors, on fixtures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures_media import colour_of_second, tone, write_lines, write_prepared_clip

from reference_models.data.ave import AVE, parse_split_line
from reference_models.data.frames import IMAGENET_MEAN, IMAGENET_STD

RATE = 16000
SEGMENT_TONE = 1000.0  # Hz inside the annotated segment; 250 Hz outside
SPLITS = {
    "trainSet.txt": [
        "Dog&vidA&good&3&7",
        "Church bell&vidB&good&0&10",
        "Dog&vidA&good&0&2",  # duplicate id: the first line wins
    ],
    "valSet.txt": ["Rodent&vidC&bad&8&10"],
    "testSet.txt": ["Church bell&vidD&good&1&5"],
}


def segment_audio(start: float, end: float) -> np.ndarray:
    audio = tone(10, RATE, 250.0)
    inside = slice(round(start * RATE), round(end * RATE))
    audio[inside] = tone(end - start, RATE, SEGMENT_TONE)
    return audio


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("ave")
    for file, lines in SPLITS.items():
        write_lines(root / "splits" / file, lines)
    for line in [line for lines in SPLITS.values() for line in lines]:
        _, video, start, end = parse_split_line(line)
        if not (root / "audio" / f"{video}.wav").exists():
            audio = segment_audio(start, end)
            write_prepared_clip(root, video, seconds=10, sample_rate=RATE, audio=audio)
    return root


def normalised(colour):
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD)])


def frame_seconds(frames: torch.Tensor) -> list[int]:
    """Which fixture second each frame of a (3, T, H, W) clip shows, from its colour."""
    candidates = {second: normalised(colour_of_second(second)) for second in range(5)}
    seconds = []
    for t in range(frames.shape[1]):
        mean = frames[:, t].mean(dim=(1, 2))
        seconds.append(min(candidates, key=lambda s: (candidates[s] - mean).abs().sum()))
    return seconds


def test_split_line_parsing():
    assert parse_split_line("Church bell&RUhOCu3LNXM&good&0&10") == (
        "Church bell",
        "RUhOCu3LNXM",
        0.0,
        10.0,
    )
    with pytest.raises(ValueError, match="Category&VideoID"):
        parse_split_line("Church bell&RUhOCu3LNXM&0&10")
    with pytest.raises(ValueError, match="empty or negative"):
        parse_split_line("Dog&x&good&5&5")


def test_items_shapes_labels_and_classes(prepared):
    train = AVE(prepared, "train", image_size=16)
    assert train.classes == ["Church bell", "Dog", "Rodent"]
    assert [(clip.name, clip.label, clip.start, clip.end) for clip in train.clips] == [
        ("vidA", 1, 3.0, 7.0),
        ("vidB", 0, 0.0, 10.0),
    ]
    spectrogram, frames, label = AVE(prepared, "test", image_size=16)[0]
    assert spectrogram.shape == (257, 1004) and spectrogram.dtype == torch.float32
    assert frames.shape == (3, 4, 16, 16) and frames.dtype == torch.float32
    assert label == 0


def test_audio_and_frames_come_from_the_event_segment(prepared):
    dataset = AVE(prepared, "train", image_size=16, augment=False)
    spectrogram, frames, _ = dataset[0]  # vidA, segment [3, 7)
    tone_bin = round(SEGMENT_TONE / RATE * 512)
    assert torch.all(spectrogram.argmax(dim=0) == tone_bin)
    assert frame_seconds(frames) == [3 % 5, 4 % 5, 5 % 5, 6 % 5]


def test_short_segments_repeat_their_frames_in_order(prepared):
    _, frames, label = AVE(prepared, "val", image_size=16)[0]  # vidC, segment [8, 10)
    assert frame_seconds(frames) == [8 % 5, 8 % 5, 9 % 5, 9 % 5]
    assert label == 2


def test_missing_and_empty_split_files(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="reference_models.data.prepare ave"):
        AVE(tmp_path / "nowhere")
    root = tmp_path / "ave"
    (root / "audio").mkdir(parents=True)
    (root / "frames").mkdir()
    with pytest.raises(FileNotFoundError, match="trainSet.txt"):
        AVE(root)
    write_lines(root / "splits" / "trainSet.txt", [])
    write_lines(root / "splits" / "valSet.txt", SPLITS["valSet.txt"])
    write_lines(root / "splits" / "testSet.txt", SPLITS["testSet.txt"])
    with pytest.raises(ValueError, match="trainSet.txt is empty"):
        AVE(root)
