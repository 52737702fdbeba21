"""CREMA-D for the Conformer setting: 16 kHz waveforms and per-frame face features.

Reads what ``python -m reference_models.data.prepare cremad --faces`` writes (``wav16k/`` and
``faces/``, see :mod:`reference_models.data.prepare_faces`) and yields
``(waveform (S,), faces (T, 1408), label)`` per clip:

* ``waveform``: the clip's whole 16 kHz waveform, z-normalised with the training fold's global
  mean and standard deviation;
* ``faces``: the face features of the first ``max_frames`` (150) video frames, z-normalised per
  dimension with the training fold's statistics;
* ``label``: the emotion (NEU 0, HAP 1, SAD 2, FEA 3, DIS 4, ANG 5).

Items have clip-dependent lengths: batch them with
:func:`~reference_models.data.padding.pad_collate`, which zero-pads (after normalisation, as the
recipe) and returns the padding masks. The folds are those of
:class:`~reference_models.data.cremad.CremaD`
(:func:`~reference_models.data.cremad.fold_clip_names`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from reference_models.data.audio import load_waveform
from reference_models.data.clips import MISSING_POLICIES, read_prepare_report
from reference_models.data.cremad import EMOTIONS, SPLITS, emotion_label, fold_clip_names
from reference_models.data.normalisation import FoldStatistics, cached_fold_statistics
from reference_models.data.prepare_faces import FACE_SAMPLE_RATE, MAX_FACE_FRAMES

__all__ = ["CremaDWaveformFaces"]


def _names(names: list[str], limit: int = 10) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(sorted(names)[:limit]) + more


class CremaDWaveformFaces(Dataset):
    """CREMA-D clips as ``(waveform (S,), faces (T, 1408), label)`` for the Conformer models.

    Args:
        root: the prepared dataset (``prepare cremad --faces``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        fold: fold number, 0-based, as :class:`~reference_models.data.cremad.CremaD`.
        split_file: as :class:`~reference_models.data.cremad.CremaD`: ``None`` for the paper's
            folds, a split file, or ``"generated"`` for speaker-independent folds generated
            over the clips that have face features.
        seed: seed of the generated folds.
        val_actors: validation actors per generated fold.
        test_actors: test actors per generated fold.
        max_frames: face frames used per clip (at most; 150 in the recipe).
        normalise: z-normalise with the training fold's statistics (computed over the
            training split on first use and cached in ``root/normalisation/``); ``False``
            returns the raw waveform and features.
        missing: ``"error"`` or ``"skip"`` for listed clips without their wav or features
            (this applies to the training clips the statistics come from, too).

    Attributes:
        clips: ``(name, label)`` of every item, in order.
        statistics: the :class:`~reference_models.data.normalisation.FoldStatistics` used, or
            ``None`` without normalisation.
        excluded: clips left out with ``missing="skip"`` (name → reason).

    Example:
        >>> from reference_models.data.padding import pad_collate
        >>> train = CremaDWaveformFaces("data/cremad", "train", fold=0)   # doctest: +SKIP
        >>> loader = torch.utils.data.DataLoader(
        ...     train, batch_size=8, shuffle=True, collate_fn=pad_collate
        ... )  # doctest: +SKIP
        >>> wave, wave_mask, faces, faces_mask, labels = next(iter(loader))  # doctest: +SKIP
    """

    classes = list(EMOTIONS)

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        fold: int = 0,
        *,
        split_file: str | Path | None = None,
        seed: int = 0,
        val_actors: int = 14,
        test_actors: int = 14,
        max_frames: int = MAX_FACE_FRAMES,
        normalise: bool = True,
        missing: str = "error",
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if missing not in MISSING_POLICIES:
            raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.root = Path(root)
        self.max_frames = max_frames
        self.excluded: dict[str, str] = {}
        extractor = self._check_root()
        available = sorted(path.stem for path in (self.root / "faces").glob("*.npz"))
        splits = fold_clip_names(
            available,
            fold,
            split_file=split_file,
            seed=seed,
            val_actors=val_actors,
            test_actors=test_actors,
            root=self.root,
        )
        names = self._drop_missing(splits[split], missing)
        if not names:
            raise ValueError(
                f"cremad: the {split} split of fold {fold} of {self.root} has no clips with face "
                "features; check the split, the fold and that prepare --faces ran completely"
            )
        self.clips = [(name, emotion_label(name)) for name in names]
        self.statistics: FoldStatistics | None = None
        if normalise:
            train = names if split == "train" else self._drop_missing(splits["train"], missing)
            self.statistics = cached_fold_statistics(self.root, train, extractor, max_frames)

    @property
    def num_classes(self) -> int:
        """Number of classes (6)."""
        return len(self.classes)

    def _check_root(self) -> dict:
        for folder in (self.root, self.root / "wav16k", self.root / "faces"):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"cremad: {folder} does not exist. Prepare the Conformer inputs first: "
                    f"python -m reference_models.data.prepare cremad --raw RAW_DIR --out "
                    f"{self.root} --faces --face-weights WEIGHTS"
                )
        failed = read_prepare_report(self.root).get("failed", {})
        if failed:
            warnings.warn(
                f"cremad: {len(failed)} clip(s) failed to prepare and are not available: "
                f"{_names(list(failed))}; see {self.root / 'prepare_report.json'}",
                stacklevel=3,
            )
        extractor = json.loads((self.root / "faces" / "extractor.json").read_text())
        if extractor.get("weights_sha256") == "random":
            warnings.warn(
                f"cremad: the face features of {self.root} come from a RANDOM EfficientNet-B2 "
                "(prepare --face-weights random): fine for smoke tests, meaningless for results",
                stacklevel=3,
            )
        return extractor

    def _missing_file(self, name: str) -> str | None:
        if not (self.root / "faces" / f"{name}.npz").is_file():
            return "no face features"
        if not (self.root / "wav16k" / f"{name}.wav").is_file():
            return "no 16 kHz wav"
        return None

    def _drop_missing(self, names: list[str], missing: str) -> list[str]:
        reasons = {name: self._missing_file(name) for name in names}
        absent = {name: reason for name, reason in reasons.items() if reason is not None}
        if absent and missing == "error":
            raise FileNotFoundError(
                f"cremad: {len(absent)} listed clip(s) of {self.root} lack their 16 kHz wav or "
                f"face features: {_names(list(absent))}. Re-run prepare --faces (its report says "
                "why they failed), or pass missing='skip' to leave them out"
            )
        new = {name: reason for name, reason in absent.items() if name not in self.excluded}
        if new:
            self.excluded.update(new)
            warnings.warn(
                f"cremad: {len(new)} listed clip(s) lack files and are left out "
                f"(missing='skip'): {_names(list(new))}",
                stacklevel=3,
            )
        return [name for name in names if name not in absent]

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        name, label = self.clips[index]
        waveform = load_waveform(self.root / "wav16k" / f"{name}.wav", FACE_SAMPLE_RATE)
        with np.load(self.root / "faces" / f"{name}.npz") as archive:
            faces = torch.from_numpy(archive["features"][: self.max_frames].astype(np.float32))
        if waveform.numel() == 0 or len(faces) == 0:
            raise ValueError(f"cremad: clip {name} of {self.root} has no audio or no face frames")
        if self.statistics is not None:
            waveform = self.statistics.normalise_waveform(waveform)
            faces = self.statistics.normalise_faces(faces)
        return waveform, faces, label
