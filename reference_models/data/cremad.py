"""CREMA-D: 6 emotions, 91 actors, speaker-independent folds.

Clips are named ``<actor>_<sentence>_<emotion>_<level>`` (``1001_DFA_ANG_XX``); the label is the
emotion code: NEU 0, HAP 1, SAD 2, FEA 3, DIS 4, ANG 5. Audio: 22,050 Hz, tiled and cut to 3 s,
clipped to [-1, 1], :func:`~reference_models.data.audio.log_spectrogram` with n_fft 512 and hop
353 → 257×188. Video: the first 3 frames (1 fps), 224×224, ImageNet normalisation.

Splits are speaker independent. By default they are the paper's: the five folds of Goncalves
et al. shipped with this package (:data:`PAPER_FOLDS`; 63/14/14 actors per fold over 5,820 of
the 7,442 clips; the paper reports folds 0, 1 and 2). A split file of the official VAVL format
(JSON ``{"1": {"train": [wav names], "val": [...], "test": [...]}, ...}``) can replace them,
and ``split_file="generated"`` asks for folds generated from a seed with the same actor counts
over all prepared clips (:func:`speaker_independent_folds`). Folds are 0-based everywhere;
fold ``k`` is the key ``str(k + 1)`` of a split file (as the authors' loader reads it). Every
split is checked for actors shared between train, validation and test.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import torch

from reference_models.data.audio import log_spectrogram
from reference_models.data.clips import Clip, PreparedClips, check_prepared_root

__all__ = [
    "EMOTIONS",
    "GENERATED",
    "PAPER_FOLDS",
    "SPLITS",
    "CremaD",
    "actor_of",
    "check_speaker_independent",
    "emotion_label",
    "fold_clip_names",
    "read_split_file",
    "speaker_independent_folds",
]

EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
"""Emotion codes in label order."""

SPLITS = ("train", "val", "test")

PAPER_FOLDS = Path(__file__).resolve().with_name("cremad_folds.json")
"""The paper's five speaker-independent folds (Goncalves et al.), shipped with the package:
``{"clips": [5,820 names], "folds": {"1": {"val_actors": [...], "test_actors": [...]}, ...}}``;
a clip belongs to the split of its actor."""

GENERATED = "generated"
"""``split_file=GENERATED``: seeded folds over the prepared clips instead of a split file."""


def emotion_label(name: str) -> int:
    """The label of a clip from its name, e.g. ``1001_DFA_ANG_XX`` → 5 (ANG).

    Raises:
        ValueError: the name has no known emotion code in third position.
    """
    parts = Path(name).stem.split("_")
    if len(parts) < 3 or parts[2] not in EMOTIONS:
        raise ValueError(
            f"CREMA-D clip name {name!r} does not look like ACTOR_SENTENCE_EMOTION_LEVEL with "
            f"an emotion in {EMOTIONS}"
        )
    return EMOTIONS.index(parts[2])


def actor_of(name: str) -> int:
    """The actor id of a clip, e.g. ``1001_DFA_ANG_XX`` → 1001."""
    head = Path(name).stem.split("_")[0]
    if not head.isdigit():
        raise ValueError(f"CREMA-D clip name {name!r} does not start with a numeric actor id")
    return int(head)


def speaker_independent_folds(
    actors: Sequence[int],
    num_folds: int = 3,
    *,
    val_actors: int = 14,
    test_actors: int = 14,
    seed: int = 0,
) -> list[dict[str, list[int]]]:
    """Seeded speaker-independent folds: disjoint train/val/test actor sets.

    The actors are shuffled once with ``seed``; fold ``k`` tests on the ``k``-th block of
    ``test_actors`` actors, validates on the ``val_actors`` actors that follow it, and trains on
    all others. So within a fold no actor is in two sets, the test sets of different folds are
    disjoint (cross-validation), and fold ``k`` does not depend on ``num_folds``. With the 91
    CREMA-D actors the defaults give 63/14/14 actors per fold, as the official splits.

    Args:
        actors: the actor ids (duplicates are ignored).
        num_folds: number of folds.
        val_actors: validation actors per fold.
        test_actors: test actors per fold.
        seed: the shuffle seed; the same seed always gives the same folds.

    Returns:
        One dict per fold with sorted actor lists under ``"train"``, ``"val"``, ``"test"``.

    Raises:
        ValueError: too few actors for the requested folds.

    Example:
        >>> folds = speaker_independent_folds(range(1001, 1092))
        >>> [len(folds[0][split]) for split in ("train", "val", "test")]
        [63, 14, 14]
    """
    unique = sorted(set(actors))
    needed = num_folds * test_actors + val_actors
    if num_folds < 1 or val_actors < 1 or test_actors < 1 or len(unique) <= needed:
        raise ValueError(
            f"{num_folds} folds of {test_actors} test and {val_actors} validation actors need "
            f"more than {needed} actors (some must be left for training), got {len(unique)}"
        )
    generator = torch.Generator().manual_seed(seed)
    order = [unique[i] for i in torch.randperm(len(unique), generator=generator).tolist()]
    folds = []
    for fold in range(num_folds):
        test_start = fold * test_actors
        val_start = test_start + test_actors
        test = order[test_start:val_start]
        val = order[val_start : val_start + val_actors]
        held_out = set(test) | set(val)
        train = [actor for actor in order if actor not in held_out]
        folds.append({"train": sorted(train), "val": sorted(val), "test": sorted(test)})
    return folds


def read_split_file(path: str | Path, fold: int) -> dict[str, list[str]]:
    """Clip names of one fold of a CREMA-D split file.

    Two formats are read: the package's :data:`PAPER_FOLDS` (``"clips"`` and, per fold key,
    ``"val_actors"`` and ``"test_actors"``; the other actors train), and the official VAVL
    format mapping fold keys ``"1"``, ``"2"``, ... to ``{"train": [...], "val": [...],
    "test": [...]}`` lists of wav names (``1001_DFA_ANG_XX.wav``); an entry may also be a list
    whose first element is the name (anything after it is ignored; labels always come from the
    name).

    Args:
        path: the split file.
        fold: the fold's key in the file (``1`` for the 0-based fold 0).

    Returns:
        ``{"train": [clip names], "val": [...], "test": [...]}`` without the ``.wav`` suffix.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not such JSON, or lacks the fold.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CREMA-D split file {path} does not exist")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"CREMA-D split file {path} is not valid JSON: {error}") from error
    folds = content.get("folds", content) if isinstance(content, dict) else content
    if not isinstance(folds, dict) or str(fold) not in folds:
        keys = sorted(folds) if isinstance(folds, dict) else type(folds).__name__
        raise ValueError(f"CREMA-D split file {path} has no fold {str(fold)!r} (found {keys})")
    entry = folds[str(fold)]
    if isinstance(entry, dict) and {"val_actors", "test_actors"} <= set(entry):
        return _actor_split(content.get("clips", []), entry, path, fold)
    if not isinstance(entry, dict) or any(split not in entry for split in SPLITS):
        raise ValueError(f"fold {fold} of {path} must have 'train', 'val' and 'test' lists")
    return {
        split: [Path(item[0] if isinstance(item, list) else item).stem for item in entry[split]]
        for split in SPLITS
    }


def _actor_split(
    clips: Sequence[str], entry: Mapping[str, Sequence[str]], path: Path, fold: int
) -> dict[str, list[str]]:
    """The clips of a fold given by its validation and test actors (the others train)."""
    held_out = {"val": {int(a) for a in entry["val_actors"]}}
    held_out["test"] = {int(a) for a in entry["test_actors"]}
    shared = held_out["val"] & held_out["test"]
    if shared:
        raise ValueError(
            f"fold {fold} of {path} puts actors {sorted(shared)} in both val and test; a split "
            "must be speaker independent"
        )
    names = [Path(name).stem for name in clips]
    split_of = {
        name: next((s for s, actors in held_out.items() if actor_of(name) in actors), "train")
        for name in names
    }
    return {split: [name for name in names if split_of[name] == split] for split in SPLITS}


def check_speaker_independent(splits: Mapping[str, Sequence[str]], source: str) -> None:
    """Refuse a split whose train, validation and test clips share actors.

    Raises:
        ValueError: naming each shared actor and the splits it is in.

    Example:
        >>> check_speaker_independent({"train": ["1001_DFA_ANG_XX"], "val": ["1001_IEO_SAD_LO"],
        ...                            "test": []}, "my split")
        Traceback (most recent call last):
        ...
        ValueError: my split is not speaker independent: actor 1001 in train and val; ...
    """
    actors = {split: {actor_of(name) for name in names} for split, names in splits.items()}
    shared = []
    for index, first in enumerate(SPLITS):
        for second in SPLITS[index + 1 :]:
            both = actors.get(first, set()) & actors.get(second, set())
            shared += [f"actor {actor} in {first} and {second}" for actor in sorted(both)]
    if shared:
        raise ValueError(
            f"{source} is not speaker independent: {'; '.join(shared)}; each actor must be in "
            "one split only (fix the split file)"
        )


def fold_clip_names(
    available: Sequence[str],
    fold: int,
    *,
    split_file: str | Path | None = None,
    seed: int = 0,
    val_actors: int = 14,
    test_actors: int = 14,
    root: str | Path = "the prepared root",
) -> dict[str, list[str]]:
    """The clip names of each split of a fold, checked to be speaker independent.

    Args:
        available: the prepared clips (used only to generate folds).
        fold: fold number, 0-based (key ``fold + 1`` of a split file).
        split_file: ``None`` (the paper's folds, :data:`PAPER_FOLDS`), a split file
            (:func:`read_split_file`), or :data:`GENERATED` for
            :func:`speaker_independent_folds` over the actors of ``available``.
        seed: seed of the generated folds.
        val_actors: validation actors per generated fold.
        test_actors: test actors per generated fold.
        root: where ``available`` came from, for the error message.

    Returns:
        ``{"train": [names], "val": [...], "test": [...]}``.

    Raises:
        ValueError: a negative fold, no prepared clips to generate folds from, or actors shared
            between splits (named).

    Example:
        >>> [len(names) for names in fold_clip_names([], 0).values()]
        [4043, 878, 899]
        >>> names = [f"{actor}_DFA_ANG_XX" for actor in range(1001, 1008)]
        >>> split = fold_clip_names(names, 0, split_file=GENERATED, val_actors=2, test_actors=2)
        >>> [len(split[key]) for key in SPLITS]
        [3, 2, 2]
    """
    if fold < 0:
        raise ValueError(f"fold is 0-based (key fold + 1 of the split file), got {fold}")
    if str(split_file) != GENERATED:
        path = PAPER_FOLDS if split_file is None else Path(split_file)
        names = read_split_file(path, fold + 1)
        check_speaker_independent(names, f"fold {fold} (key {fold + 1!r}) of {path}")
        return names
    if not available:
        raise ValueError(f"cremad: {root} has no prepared clips")
    folds = speaker_independent_folds(
        [actor_of(name) for name in available],
        fold + 1,
        val_actors=val_actors,
        test_actors=test_actors,
        seed=seed,
    )
    actors = {split: set(folds[fold][split]) for split in SPLITS}
    return {
        split: [name for name in available if actor_of(name) in actors[split]] for split in SPLITS
    }


class CremaD(PreparedClips):
    """CREMA-D audio-visual emotion clips: ``(spectrogram (257, 188), frames (3, 3, 224, 224),
    label)``.

    Args:
        root: the prepared dataset (``python -m reference_models.data.prepare cremad``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        fold: fold number, 0-based (the paper reports folds 0, 1, 2; key ``fold + 1`` of the
            split file).
        split_file: ``None``: the paper's folds (:data:`PAPER_FOLDS`); a split file of the
            official VAVL format; or ``"generated"``: speaker-independent folds over all
            prepared clips from ``seed`` (:func:`speaker_independent_folds`). Clips of the
            split missing from the prepared data are reported by name (see ``missing``).
        seed: seed of the generated folds.
        val_actors: validation actors per generated fold.
        test_actors: test actors per generated fold.
        augment: random crop/flip per clip; default: on for ``"train"`` only.
        num_frames: frames per clip.
        image_size: frame size.
        sample_rate: audio rate.
        duration: seconds of audio (tiled when the clip is shorter).
        n_fft: STFT size.
        hop_length: STFT hop.
        missing: ``"error"`` or ``"skip"`` for listed clips without files.

    Example:
        >>> train = CremaD("data/cremad", "train", fold=0)  # doctest: +SKIP
        >>> spectrogram, frames, label = train[0]           # doctest: +SKIP
        >>> spectrogram.shape, frames.shape                 # doctest: +SKIP
        (torch.Size([257, 188]), torch.Size([3, 3, 224, 224]))
    """

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
        augment: bool | None = None,
        num_frames: int = 3,
        image_size: int = 224,
        sample_rate: int = 22050,
        duration: float = 3.0,
        n_fft: int = 512,
        hop_length: int = 353,
        missing: str = "error",
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        root = check_prepared_root(root, "cremad")
        available = []
        if str(split_file) == GENERATED:
            available = sorted(
                {path.stem for path in (root / "audio").glob("*.wav")}
                | {path.name for path in (root / "frames").iterdir() if path.is_dir()}
            )
        names = fold_clip_names(
            available,
            fold,
            split_file=split_file,
            seed=seed,
            val_actors=val_actors,
            test_actors=test_actors,
            root=root,
        )[split]
        super().__init__(
            root,
            [Clip(name, emotion_label(name)) for name in names],
            EMOTIONS,
            dataset="cremad",
            num_frames=num_frames,
            image_size=image_size,
            augment=split == "train" if augment is None else augment,
            sample_rate=sample_rate,
            duration=duration,
            spectrogram=partial(log_spectrogram, n_fft=n_fft, hop_length=hop_length),
            missing=missing,
        )
