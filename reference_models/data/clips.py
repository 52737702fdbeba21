"""The prepared on-disk layout and the dataset base class shared by CREMA-D, AVE and UCF101.

``python -m reference_models.data.prepare`` writes every dataset in one layout::

    ROOT/
      audio/<clip>.wav              16-bit PCM mono at the dataset's sample rate
      frames/<clip>/<second>.jpg    1 frame per second: 0000.jpg, 0001.jpg, ...
      splits/                       the dataset's split and class files, copied from the raw data
      prepare_report.json           counts, failures and clips without audio

Clips that failed to prepare are named in a warning whenever a dataset is built on the root.

:class:`PreparedClips` reads that layout: it checks the root and the clip list, accounts for every
listed clip whose files are missing (an error by default; ``missing="skip"`` leaves them out
with a warning naming them, and lists them in ``excluded``), and returns
``(spectrogram, frames (3, T, H, W), label)`` items: the clip's audio segment is tiled to a fixed
duration, clipped to [-1, 1] and turned into a spectrogram; its frames go through
:class:`~reference_models.data.frames.ClipTransform`. Subclasses build the clip list and may choose
the audio segment and the frames used.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from reference_models.data.audio import load_waveform, tile_to_length
from reference_models.data.frames import ClipTransform, list_frames, load_frames

__all__ = [
    "MISSING_POLICIES",
    "Clip",
    "PreparedClips",
    "check_prepared_root",
    "read_lines",
    "read_prepare_report",
]

MISSING_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class Clip:
    """One labelled clip of a split.

    Attributes:
        name: file stem in ``audio/`` and folder name in ``frames/``.
        label: class index.
        start: start of the annotated segment in seconds (AVE), else 0.
        end: end of the segment in seconds, or ``None`` for the whole clip.
    """

    name: str
    label: int
    start: float = 0.0
    end: float | None = None


def check_prepared_root(root: str | Path, dataset: str) -> Path:
    """Return ``root`` as a path after checking it holds the prepared ``audio/`` and ``frames/``.

    Raises:
        FileNotFoundError: the root or one of its folders is missing.
    """
    root = Path(root)
    for folder in (root, root / "audio", root / "frames"):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{dataset}: {folder} does not exist. Prepare the dataset first: "
                f"python -m reference_models.data.prepare {dataset} --raw RAW_DIR --out {root}"
            )
    return root


def _name_list(names: Iterable[str], limit: int = 10) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def read_prepare_report(root: Path) -> dict:
    """The ``prepare_report.json`` of a prepared root, or ``{}`` if there is none."""
    path = root / "prepare_report.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def read_lines(path: Path, dataset: str) -> list[str]:
    """The non-empty stripped lines of a split file.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file lists nothing.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"{dataset}: split file {path} does not exist; re-run "
            f"`python -m reference_models.data.prepare {dataset}` or copy it into {path.parent}"
        )
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{dataset}: split file {path} is empty")
    return lines


class PreparedClips(Dataset):
    """Base class of the audio-visual datasets: clips in the prepared layout.

    Subclasses build the clip list and may override :meth:`audio_segment` and
    :meth:`select_frames`.

    Args:
        root: the prepared dataset folder.
        clips: the clips of this split.
        classes: class names, indexed by label.
        dataset: the dataset's CLI name, for messages.
        num_frames: frames per clip ``T``; clips with fewer frames are padded with zeros (the
            normalised mean colour), as the official loaders do.
        image_size: frame height and width after the transform.
        augment: apply the training augmentation.
        sample_rate: rate the waveform is loaded at.
        duration: seconds the audio segment is tiled (or cut) to.
        spectrogram: maps the fixed-length waveform to the ``(F, T)`` audio input; a picklable
            callable (e.g. a ``functools.partial``) so that DataLoader workers can use it.
        missing: ``"error"`` raises ``FileNotFoundError`` when listed clips lack their wav or
            frames; ``"skip"`` leaves them out, warns with their names and records them in
            ``excluded``.
    """

    def __init__(
        self,
        root: Path,
        clips: Sequence[Clip],
        classes: Sequence[str],
        *,
        dataset: str,
        num_frames: int,
        image_size: int,
        augment: bool,
        sample_rate: int,
        duration: float,
        spectrogram: Callable[[torch.Tensor], torch.Tensor],
        missing: str = "error",
    ) -> None:
        if missing not in MISSING_POLICIES:
            raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.root = root
        self.classes = list(classes)
        self.num_frames = num_frames
        self.sample_rate = sample_rate
        self.num_samples = round(duration * sample_rate)
        self.spectrogram = spectrogram
        self.transform = ClipTransform(image_size, train=augment)
        self.excluded: dict[str, str] = {}
        failed = read_prepare_report(root).get("failed", {})
        if failed:
            warnings.warn(
                f"{dataset}: {len(failed)} clip(s) failed to prepare and are not available: "
                f"{_name_list(failed)}; see {root / 'prepare_report.json'}",
                stacklevel=3,
            )
        clips = self._drop_missing(list(clips), dataset, missing)
        if not clips:
            raise ValueError(
                f"{dataset}: the requested split of {root} has no clips with audio and frames; "
                "check the split, the fold and that the dataset was prepared completely"
            )
        self.clips = clips

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def _drop_missing(self, clips: list[Clip], dataset: str, missing: str) -> list[Clip]:
        with os.scandir(self.root / "audio") as entries:
            wavs = {entry.name[:-4] for entry in entries if entry.name.endswith(".wav")}
        with os.scandir(self.root / "frames") as entries:
            folders = {entry.name for entry in entries if entry.is_dir()}
        absent = {
            clip.name: "no wav" if clip.name not in wavs else "no frames"
            for clip in clips
            if clip.name not in wavs or clip.name not in folders
        }
        if not absent:
            return clips
        if missing == "error":
            raise FileNotFoundError(
                f"{dataset}: {len(absent)} of {len(clips)} listed clip(s) of {self.root} lack "
                f"files: "
                f"{_name_list(absent)}. Re-run prepare (its report says why they failed), or "
                "pass missing='skip' to leave them out"
            )
        self.exclude(absent, f"{dataset}: listed clips of {self.root} lack files (missing='skip')")
        return [clip for clip in clips if clip.name not in absent]

    def exclude(self, reasons: dict[str, str], why: str) -> None:
        """Record clips left out of the split (name → reason) and warn once, naming them."""
        if reasons:
            self.excluded.update(reasons)
            warnings.warn(
                f"{why}; {len(reasons)} clip(s) left out: {_name_list(reasons)}", stacklevel=3
            )

    def __len__(self) -> int:
        return len(self.clips)

    def audio_segment(self, waveform: torch.Tensor, clip: Clip) -> torch.Tensor:
        """The part of a clip's waveform that is used: all of it."""
        return waveform

    def select_frames(self, frames: list[Path], clip: Clip) -> list[Path]:
        """The frames used for a clip, from its sorted frame files: the first ``num_frames``."""
        return frames[: self.num_frames]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        clip = self.clips[index]
        waveform = load_waveform(self.root / "audio" / f"{clip.name}.wav", self.sample_rate)
        waveform = tile_to_length(self.audio_segment(waveform, clip), self.num_samples)
        spectrogram = self.spectrogram(waveform.clamp(-1.0, 1.0))
        frames = self.transform(load_frames(self.select_frames(self.frame_paths(clip), clip)))
        shortfall = self.num_frames - frames.shape[1]
        if shortfall > 0:
            frames = torch.nn.functional.pad(frames, (0, 0, 0, 0, 0, shortfall))
        return spectrogram, frames, clip.label

    def frame_paths(self, clip: Clip) -> list[Path]:
        """All prepared frames of a clip, in time order."""
        return list_frames(self.root / "frames" / clip.name)
