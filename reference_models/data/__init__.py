"""Datasets of the paper (CREMA-D, AVE, UCF101) and their shared audio/frame front ends.

Each dataset reads the layout written by ``python -m reference_models.data.prepare`` and returns
``(spectrogram, frames (3, T, H, W), label)`` items with the paper's preprocessing;
:class:`CremaDWaveformFaces` returns the Conformer setting's ``(waveform (S,), faces (T, 1408),
label)``, batched with :func:`pad_collate`.
"""

from reference_models.data.audio import (
    load_waveform,
    log_power_spectrogram,
    log_spectrogram,
    tile_to_length,
)
from reference_models.data.ave import AVE
from reference_models.data.clips import Clip, PreparedClips
from reference_models.data.cremad import CremaD, fold_clip_names, speaker_independent_folds
from reference_models.data.cremad_faces import CremaDWaveformFaces
from reference_models.data.frames import ClipTransform
from reference_models.data.padding import pad_collate, pad_sequences
from reference_models.data.ucf101 import UCF101

__all__ = [
    "AVE",
    "UCF101",
    "Clip",
    "ClipTransform",
    "CremaD",
    "CremaDWaveformFaces",
    "PreparedClips",
    "fold_clip_names",
    "load_waveform",
    "log_power_spectrogram",
    "log_spectrogram",
    "pad_collate",
    "pad_sequences",
    "speaker_independent_folds",
    "tile_to_length",
]
