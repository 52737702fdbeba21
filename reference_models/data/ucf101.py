"""UCF101 with audio: the 51 action classes whose videos have sound.

Official lists ``splits/trainlist0{f}.txt`` (``Class/v_Class_gXX_cYY.avi label``) and
``splits/testlist0{f}.txt`` for f = 1, 2, 3 (folds are 0-based: fold k reads f = k + 1), class
order from ``splits/classInd.txt``.
The classes are those with at least one video with an audio track (``prepare`` writes no wav for
a silent video and lists it under ``no_audio`` in ``prepare_report.json``); they are numbered
0..50 in ``classInd`` order. Validation is 10% of the training *groups* (``Class_gXX``, all clips
of a group together), drawn per class with a seed, so train and validation share no group.
As the official protocol, clips of those classes without audio or with fewer than ``num_frames``
frames are left out; they are listed in ``excluded`` and reported in a warning.

Audio: 16 kHz, the first 3 s (48,000 samples, tiled if shorter), clipped to [-1, 1],
:func:`~reference_models.data.audio.log_spectrogram` with n_fft 512 and hop 353 → 257×136.
Video: the first 4 frames (1 fps) as RGB in [0, 1], ImageNet-normalised (the official loader
normalises 0–255 BGR values), one crop and flip per clip.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from pathlib import Path

import torch

from reference_models.data.audio import log_spectrogram
from reference_models.data.clips import (
    Clip,
    PreparedClips,
    check_prepared_root,
    read_lines,
    read_prepare_report,
)

__all__ = ["SPLITS", "UCF101", "group_of", "validation_groups"]

SPLITS = ("train", "val", "test")


def _clip_name(entry: str) -> str:
    """``Class/v_Class_g08_c01.avi 1`` → ``v_Class_g08_c01``."""
    return Path(entry.split()[0]).stem


def _class_of(entry: str) -> str:
    return entry.split()[0].split("/")[0]


def group_of(name: str) -> str:
    """The group of a clip, ``v_ApplyEyeMakeup_g08_c01`` → ``ApplyEyeMakeup_g08``."""
    stem = name[2:] if name.startswith("v_") else name
    group, separator, _ = stem.rpartition("_c")
    if not separator or "_g" not in group:
        raise ValueError(f"UCF101 clip name {name!r} does not look like v_Class_gXX_cYY")
    return group


def validation_groups(
    groups_by_class: dict[str, list[str]], fraction: float = 0.1, seed: int = 0
) -> set[str]:
    """Pick ``round(fraction * n)`` (at least 1) groups of every class with ``n >= 2`` groups.

    Stratified by class and deterministic for a seed (UCF101 training classes have 18 groups,
    so 2 per class: about 11% of the training clips).

    Example:
        >>> picked = validation_groups({"A": [f"A_g{i:02d}" for i in range(8, 26)]}, seed=1)
        >>> len(picked)
        2
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    picked: set[str] = set()
    for name in sorted(groups_by_class):
        groups = sorted(set(groups_by_class[name]))
        if len(groups) < 2:
            continue
        count = max(1, round(fraction * len(groups)))
        order = torch.randperm(len(groups), generator=generator)[:count].tolist()
        picked.update(groups[index] for index in order)
    return picked


class UCF101(PreparedClips):
    """UCF101 (51 classes with audio): ``(spectrogram (257, 136), frames (3, 4, 224, 224),
    label)``.

    Args:
        root: the prepared dataset (``python -m reference_models.data.prepare ucf101``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        fold: 0, 1 or 2: the official split files ``trainlist0{fold + 1}.txt``.
        val_fraction: fraction of training groups held out for validation.
        seed: seed of the validation split (the paper uses 109, 19, 337 for folds 0–2).
        augment: random crop/flip per clip; default: on for ``"train"`` only.
        num_frames: frames per clip; clips with fewer are left out.
        image_size: frame size.
        sample_rate: audio rate.
        duration: seconds of audio used from the start of the clip.
        n_fft: STFT size.
        hop_length: STFT hop.
        missing: ``"error"`` or ``"skip"`` for listed clips without files.

    Example:
        >>> val = UCF101("data/ucf101", "val", fold=0, seed=109)   # doctest: +SKIP
        >>> val.num_classes                                        # doctest: +SKIP
        51
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        fold: int = 0,
        *,
        val_fraction: float = 0.1,
        seed: int = 0,
        augment: bool | None = None,
        num_frames: int = 4,
        image_size: int = 224,
        sample_rate: int = 16000,
        duration: float = 3.0,
        n_fft: int = 512,
        hop_length: int = 353,
        missing: str = "error",
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if fold not in (0, 1, 2):
            raise ValueError(
                f"UCF101 has folds 0, 1 and 2 (the official split files 1-3, 0-based), got {fold}"
            )
        root = check_prepared_root(root, "ucf101")
        splits = root / "splits"
        train = read_lines(splits / f"trainlist0{fold + 1}.txt", "ucf101")
        test = read_lines(splits / f"testlist0{fold + 1}.txt", "ucf101")
        silent = self._videos_without_audio(root)
        with_audio = {_class_of(entry) for entry in train + test if _clip_name(entry) not in silent}
        all_classes = [line.split()[1] for line in read_lines(splits / "classInd.txt", "ucf101")]
        classes = [name for name in all_classes if name in with_audio]
        labels = {name: label for label, name in enumerate(classes)}
        train = [entry for entry in train if _class_of(entry) in labels]
        if split == "test":
            entries = [entry for entry in test if _class_of(entry) in labels]
        else:
            groups: dict[str, list[str]] = defaultdict(list)
            for entry in train:
                groups[_class_of(entry)].append(group_of(_clip_name(entry)))
            held_out = validation_groups(groups, val_fraction, seed)
            entries = [
                entry
                for entry in train
                if (group_of(_clip_name(entry)) in held_out) == (split == "val")
            ]
        clips = [Clip(_clip_name(entry), labels[_class_of(entry)]) for entry in entries]
        super().__init__(
            root,
            [clip for clip in clips if clip.name not in silent],
            classes,
            dataset="ucf101",
            num_frames=num_frames,
            image_size=image_size,
            augment=split == "train" if augment is None else augment,
            sample_rate=sample_rate,
            duration=duration,
            spectrogram=partial(log_spectrogram, n_fft=n_fft, hop_length=hop_length),
            missing=missing,
        )
        reasons = {clip.name: "no audio track" for clip in clips if clip.name in silent}
        reasons.update(
            {
                clip.name: f"fewer than {num_frames} frames"
                for clip in self.clips
                if len(self.frame_paths(clip)) < num_frames
            }
        )
        self.exclude(
            reasons,
            "ucf101: as in the official protocol, clips without an audio track or with fewer "
            f"than {num_frames} frames are not used",
        )
        self.clips = [clip for clip in self.clips if clip.name not in reasons]
        if not self.clips:
            raise ValueError(f"ucf101: no clip of split {split!r} has audio and enough frames")

    @staticmethod
    def _videos_without_audio(root: Path) -> set[str]:
        report = read_prepare_report(root)
        if "no_audio" not in report:
            raise FileNotFoundError(
                f"ucf101: {root / 'prepare_report.json'} does not exist or lists no 'no_audio' "
                "videos. Prepare the dataset with "
                f"`python -m reference_models.data.prepare ucf101 --out {root}`"
            )
        return set(report["no_audio"])
