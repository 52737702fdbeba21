"""Small prepared CREMA-D, AVE and UCF101 layouts (the real on-disk formats) for harness runs.

Each layout has 8 training clips (one batch of 8), 4 validation and 4 test clips, with short
audio and 2-4 frames of 32x24 pixels; :data:`TINY_DATA_OPTIONS` shrinks what the datasets
compute from them (low sample rate, small STFT, 16x16 frames), so a run of one epoch on a
width-2 model takes about a second.
"""

from __future__ import annotations

import json
from pathlib import Path

from fixtures_media import write_lines, write_prepared_clip

from reference_models.data.cremad import EMOTIONS, emotion_label, fold_clip_names

RATE = 4000
SIZES = {"train": 8, "val": 4, "test": 4}

TINY_DATA_OPTIONS: dict[str, dict[str, object]] = {
    "cremad": {"sample_rate": RATE, "duration": 0.5, "n_fft": 64, "hop_length": 64,
               "num_frames": 2, "image_size": 16},
    "ave": {"sample_rate": RATE, "duration": 1.0, "n_fft": 64, "noverlap": 32, "num_frames": 2,
            "image_size": 16},
    "ucf101": {"sample_rate": RATE, "duration": 0.5, "n_fft": 64, "hop_length": 64,
               "num_frames": 2, "image_size": 16},
}  # fmt: skip
"""``data_options`` (``--data-opt``) for the layouts below, per dataset."""


def cremad_fold0_clips() -> dict[str, list[str]]:
    """Clips of the paper's fold 0, per split, covering as many emotions as the split size."""
    names = fold_clip_names([], 0)
    chosen = {}
    for split, size in SIZES.items():
        by_emotion = {label: [] for label in range(len(EMOTIONS))}
        for name in names[split]:
            by_emotion[emotion_label(name)].append(name)
        rounds = [name for group in zip(*by_emotion.values()) for name in group]
        chosen[split] = rounds[:size]
    return chosen


def prepared_cremad(root: Path) -> Path:
    """Clips of the paper's fold 0 in the prepared layout (the others are missing)."""
    for names in cremad_fold0_clips().values():
        for index, name in enumerate(names):
            write_prepared_clip(
                root, name, seconds=0.6, sample_rate=RATE, num_frames=2, frequency=300 + 90 * index
            )
    return root


def prepared_ave(root: Path) -> Path:
    """Three events over the three official split files, 2-second videos."""
    events = ("Dog", "Church bell", "Rodent")
    lines = {}
    for split, size in SIZES.items():
        lines[split] = [f"{events[index % 3]}&{split}{index}&good&0&2" for index in range(size)]
    files = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
    for split, file in files.items():
        write_lines(root / "splits" / file, lines[split])
        for index, line in enumerate(lines[split]):
            write_prepared_clip(
                root, line.split("&")[1], seconds=2, sample_rate=RATE, frequency=200 + 60 * index
            )
    return root


def prepared_ucf101(root: Path) -> Path:
    """Two classes, training groups 8-11 (validation draws whole groups) and test groups 1-2."""
    classes = ("Archery", "Drumming")
    write_lines(root / "splits" / "classInd.txt", [f"{i + 1} {n}" for i, n in enumerate(classes)])

    def clip(name: str, group: int, index: int) -> str:
        return f"v_{name}_g{group:02d}_c{index:02d}"

    train = [
        f"{name}/{clip(name, group, 1)}.avi {label + 1}"
        for label, name in enumerate(classes)
        for group in range(8, 14)
    ]
    test = [f"{name}/{clip(name, group, 1)}.avi" for name in classes for group in (1, 2)]
    write_lines(root / "splits" / "trainlist01.txt", train)
    write_lines(root / "splits" / "testlist01.txt", test)
    for index, entry in enumerate(train + test):
        name = entry.split()[0].split("/")[1][:-4]
        write_prepared_clip(
            root, name, seconds=0.6, sample_rate=RATE, num_frames=2, frequency=200 + 40 * index
        )
    (root / "prepare_report.json").write_text(json.dumps({"no_audio": []}))
    return root


PREPARED = {"cremad": prepared_cremad, "ave": prepared_ave, "ucf101": prepared_ucf101}
"""Layout writer of each dataset: ``PREPARED[dataset](root) -> root``."""


def prepared_cremad_faces(root: Path) -> Path:
    """The Conformer layout (``wav16k/``, ``faces/``) for the clips of :func:`cremad_fold0_clips`:
    0.2-0.3 s waveforms and 3-6 random face-feature frames."""
    import numpy as np
    from fixtures_media import tone, write_face_clip

    generator = np.random.default_rng(0)
    for names in cremad_fold0_clips().values():
        for index, name in enumerate(names):
            samples = tone(0.2 + 0.01 * index, 16000, 300 + 90 * index)
            features = generator.standard_normal((3 + index % 4, 1408)).astype(np.float32)
            write_face_clip(root, name, samples, features)
    return root


TINY_CONFORMER = {
    "audio_options": "{front_end_layers = 1, model_dim = 16, num_layers = 1, num_heads = 2, "
    "front_end_options = {embed_dim = 16, num_heads = 2, ffn_dim = 32, "
    "conv_layers = [[8, 10, 5], [8, 3, 2]], pos_conv_kernel = 4, pos_conv_groups = 2}}",
    "video_options": "{model_dim = 16, num_layers = 1, num_heads = 2}",
    "wav2vec2_checkpoint": "random",
}
"""``--set`` values of a tiny Conformer model (random weights) for CPU runs of every cell."""
