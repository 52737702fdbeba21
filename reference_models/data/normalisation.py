"""Training-fold normalisation statistics of the Conformer setting, computed once and cached.

The recipe z-normalises the waveform with one global mean and standard deviation, and the face
features per dimension, both over the training split of the fold. The
statistics are population moments (``ddof = 0``) accumulated in float64 over every sample and
every face frame of the training clips. They are cached in ``ROOT/normalisation/<key>.pt``,
where the key is a digest of the training clip names, the face extractor that made the features
and the frame cap, so another fold, split file or extractor gets its own file, and a cache never
goes stale silently.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch

__all__ = ["FoldStatistics", "cached_fold_statistics", "compute_fold_statistics"]

STD_FLOOR = 1e-6
"""Smallest standard deviation divided by (a constant dimension is not blown up)."""


@dataclass(frozen=True)
class FoldStatistics:
    """Means and standard deviations of a training split.

    Attributes:
        waveform_mean: mean of all waveform samples.
        waveform_std: their standard deviation.
        face_mean: per-dimension mean of the face features ``(D,)``.
        face_std: per-dimension standard deviation ``(D,)``.
        clips: how many training clips they were computed from.

    Example:
        >>> stats = FoldStatistics(0.5, 2.0, torch.zeros(3), torch.ones(3), clips=1)
        >>> stats.normalise_waveform(torch.tensor([2.5]))
        tensor([1.])
    """

    waveform_mean: float
    waveform_std: float
    face_mean: torch.Tensor
    face_std: torch.Tensor
    clips: int

    def normalise_waveform(self, waveform: torch.Tensor) -> torch.Tensor:
        """``(waveform - mean) / std`` with the global statistics."""
        return (waveform - self.waveform_mean) / max(self.waveform_std, STD_FLOOR)

    def normalise_faces(self, faces: torch.Tensor) -> torch.Tensor:
        """``(faces - mean) / std`` per dimension, for ``(T, D)`` features."""
        return (faces - self.face_mean) / self.face_std.clamp_min(STD_FLOOR)


def compute_fold_statistics(
    wav_paths: Sequence[Path], face_paths: Sequence[Path], max_frames: int
) -> FoldStatistics:
    """Statistics over the given wav files and face-feature ``.npz`` files (first frames only).

    Raises:
        ValueError: no files, or only empty ones.
    """
    wave_sum = wave_squares = 0.0
    wave_count = 0
    for path in wav_paths:
        samples = soundfile.read(path, dtype="float64", always_2d=True)[0].mean(axis=1)
        wave_sum += samples.sum()
        wave_squares += np.square(samples).sum()
        wave_count += samples.size
    face_sum = face_squares = 0.0
    face_count = 0
    for path in face_paths:
        with np.load(path) as archive:
            features = archive["features"][:max_frames].astype(np.float64)
        face_sum = face_sum + features.sum(axis=0)
        face_squares = face_squares + np.square(features).sum(axis=0)
        face_count += len(features)
    if wave_count == 0 or face_count == 0:
        raise ValueError(
            "cannot compute normalisation statistics: the training split has no audio samples "
            "or no face frames"
        )
    wave_mean = wave_sum / wave_count
    face_mean = face_sum / face_count
    return FoldStatistics(
        waveform_mean=float(wave_mean),
        waveform_std=float(np.sqrt(max(wave_squares / wave_count - wave_mean**2, 0.0))),
        face_mean=torch.from_numpy(face_mean).float(),
        face_std=torch.from_numpy(
            np.sqrt(np.maximum(face_squares / face_count - face_mean**2, 0))
        ).float(),
        clips=len(face_paths),
    )


def cached_fold_statistics(
    root: Path, train_names: Sequence[str], extractor: dict, max_frames: int
) -> FoldStatistics:
    """The statistics of the training clips ``train_names`` of a prepared root, from the cache.

    Computes them (reading ``wav16k/`` and ``faces/``) and writes the cache atomically the
    first time; later calls, in any process, read the file.

    Args:
        root: the prepared root.
        train_names: the training clips.
        extractor: the face extractor's identity (``faces/extractor.json``), part of the key.
        max_frames: frames per clip used, part of the key.
    """
    key_text = json.dumps(
        {"clips": sorted(train_names), "extractor": extractor, "frames": max_frames},
        sort_keys=True,
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    path = root / "normalisation" / f"{key}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return FoldStatistics(**saved["statistics"])
    stats = compute_fold_statistics(
        [root / "wav16k" / f"{name}.wav" for name in train_names],
        [root / "faces" / f"{name}.npz" for name in train_names],
        max_frames,
    )
    path.parent.mkdir(exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"key": key_text, "statistics": stats.__dict__}, temporary)
    os.replace(temporary, path)
    return stats
