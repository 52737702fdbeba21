"""AVE: 28 audio-visual event classes, official train/val/test split files.

Split files ``splits/{trainSet,valSet,testSet}.txt`` have lines
``Category&VideoID&Quality&StartSecond&EndSecond``; a video listed twice keeps its first line.
Classes are the sorted categories of the three files. Each item uses only the annotated event
segment: audio cropped to [start, end), tiled to 10 s at 16 kHz, clipped to [-1, 1], and turned
into :func:`~reference_models.data.audio.log_power_spectrogram` (scipy-style PSD, n_fft 512,
overlap 353) → 257×1004; video: the first 4 frames (1 fps) inside the segment. A segment shorter
than 4 s repeats its frames in order to fill 4 (the official extraction fills with random frames
of the segment).
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch

from reference_models.data.audio import log_power_spectrogram
from reference_models.data.clips import Clip, PreparedClips, check_prepared_root, read_lines
from reference_models.data.frames import frame_second

__all__ = ["AVE", "SPLIT_FILES", "parse_split_line"]

SPLIT_FILES = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
"""The official split file of each split, as found in ``AVE_Dataset/``."""


def parse_split_line(line: str) -> tuple[str, str, float, float]:
    """``(category, video id, start, end)`` of one split line ``Category&ID&Quality&Start&End``.

    Raises:
        ValueError: the line does not have the five ``&``-separated fields.
    """
    fields = line.split("&")
    if len(fields) != 5:
        raise ValueError(f"AVE split line {line!r} is not Category&VideoID&Quality&Start&End")
    category, video, _, start, end = fields
    start_second, end_second = float(start), float(end)
    if not 0 <= start_second < end_second:
        raise ValueError(f"AVE split line {line!r} has an empty or negative event segment")
    return category, video, start_second, end_second


class AVE(PreparedClips):
    """AVE event clips: ``(spectrogram (257, 1004), frames (3, 4, 224, 224), label)``.

    Args:
        root: the prepared dataset (``python -m reference_models.data.prepare ave``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        augment: random crop/flip per clip; default: on for ``"train"`` only.
        num_frames: frames per clip.
        image_size: frame size.
        sample_rate: audio rate.
        duration: seconds the event segment's audio is tiled to.
        n_fft: samples per spectrogram frame.
        noverlap: overlap of spectrogram frames.
        missing: ``"error"`` or ``"skip"`` for listed clips without files.

    Example:
        >>> test = AVE("data/ave", "test")          # doctest: +SKIP
        >>> [x.shape for x in test[0][:2]]          # doctest: +SKIP
        [torch.Size([257, 1004]), torch.Size([3, 4, 224, 224])]
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        augment: bool | None = None,
        num_frames: int = 4,
        image_size: int = 224,
        sample_rate: int = 16000,
        duration: float = 10.0,
        n_fft: int = 512,
        noverlap: int = 353,
        missing: str = "error",
    ) -> None:
        if split not in SPLIT_FILES:
            raise ValueError(f"split must be one of {tuple(SPLIT_FILES)}, got {split!r}")
        root = check_prepared_root(root, "ave")
        parsed = {
            name: [parse_split_line(line) for line in read_lines(root / "splits" / file, "ave")]
            for name, file in SPLIT_FILES.items()
        }
        classes = sorted({category for rows in parsed.values() for category, *_ in rows})
        labels = {name: label for label, name in enumerate(classes)}
        clips: dict[str, Clip] = {}
        for category, video, start, end in parsed[split]:
            clips.setdefault(video, Clip(video, labels[category], start, end))
        super().__init__(
            root,
            list(clips.values()),
            classes,
            dataset="ave",
            num_frames=num_frames,
            image_size=image_size,
            augment=split == "train" if augment is None else augment,
            sample_rate=sample_rate,
            duration=duration,
            spectrogram=partial(
                log_power_spectrogram, sample_rate=sample_rate, n_fft=n_fft, noverlap=noverlap
            ),
            missing=missing,
        )

    def audio_segment(self, waveform: torch.Tensor, clip: Clip) -> torch.Tensor:
        """The annotated event segment ``[start, end)`` of the clip's audio."""
        return waveform[round(clip.start * self.sample_rate) : round(clip.end * self.sample_rate)]

    def select_frames(self, frames: list[Path], clip: Clip) -> list[Path]:
        """The first ``num_frames`` frames taken inside the segment, repeated in order if fewer."""
        inside = [path for path in frames if clip.start <= frame_second(path) < clip.end]
        if not inside:
            raise ValueError(
                f"ave: clip {clip.name} has no frame in its event segment "
                f"[{clip.start}, {clip.end}) s; re-run prepare for it"
            )
        if len(inside) >= self.num_frames:
            return inside[: self.num_frames]
        step = len(inside) / self.num_frames
        return [inside[math.floor(index * step)] for index in range(self.num_frames)]
